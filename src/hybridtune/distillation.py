"""`hybridtune distill TEACHER_RUN`: a student trained on a finished run's soft labels (the `distill`
part, strategy/distill.py), then set beside its teacher: validation and test scores, parameters, size
on disk and scoring speed.

    hybridtune distill runs/full --blocks 3                     # the teacher's base, its bottom 3 blocks
    hybridtune distill runs/full --student ./minilm-l3 distill.temperature=4
    hybridtune distill runs/full --blocks 3 recipes/lora.yaml   # the student trained with LoRA

The student's recipe is RECIPE's (default: the teacher's own strategy and training settings) with the
teacher's task and data (so its labels), the student model (`--student MODEL`, or with `--blocks K`
the teacher's base model cut to its bottom K blocks) and a `distill` section naming the teacher;
`key=value` overrides come last. Every check runs before the student's run dir is written.

Scoring speed is texts per second on the teacher's test split through the task's `predict` (what
`hybridtune predict` and serve run: batches sorted by length), each model as `inference.load` places
it (the GPU in bf16 where there is one, else the CPU in fp32, LoRA folded in), in this one process,
so with the same threads and batch size; the best of `repeats` passes after a warm-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from hybridtune import inference, rundir
from hybridtune.errors import UserError
from hybridtune.export import merged_for_inference
from hybridtune.model.loading import resolve
from hybridtune.recipe import Recipe, apply_override, load_recipe, read_recipe, validate_recipe

RESULT = "distill.json"  # in the student's run dir; report.json gets it too, as "distillation"
WEIGHTS = (".safetensors", ".bin", ".pt")


def student_recipe(
    teacher: str,
    student: str | None = None,
    blocks: int | None = None,
    recipe: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Recipe:
    """The student's recipe (see the module docstring); a UserError for what cannot be one."""
    root = Path(teacher)
    if (root / inference.ENSEMBLE_JSON).is_file():
        raise UserError(
            "TEACHER_RUN", f"an ensemble dir ({teacher})", "a run dir (distil from an ensemble's best member)"
        )
    rundir.check_run_dir(teacher)
    if (root / rundir.FAILED).is_file():
        raise UserError("TEACHER_RUN", f"'{teacher}', a failed run ({rundir.FAILED})", "a finished run")
    if student is not None and blocks is not None:
        raise UserError(
            "--student / --blocks", "both", "one of them: another model, or the teacher's base cut"
        )
    if student is None and blocks is None and recipe is None:
        raise UserError(
            "distill", "no student", "--student MODEL, --blocks K, or a RECIPE whose model is the student"
        )
    theirs = load_recipe(root / "recipe.yaml").model_dump(mode="json")
    if recipe is None:
        raw = {**theirs, "name": f"distill-{theirs['name']}", "ensemble": None}
    else:
        raw = read_recipe(recipe)  # validated once completed: its distill section needs no teacher
    raw["task"], raw["data"] = theirs["task"], theirs["data"]
    if student is not None:
        raw["model"] = {"name": student}
    elif blocks is not None:
        raw["model"] = theirs["model"]
    section = dict(raw.get("distill") or {})  # RECIPE's temperature and alpha, if it has them
    section["teacher"] = str(root)
    if blocks is not None:
        section["student_blocks"] = blocks
    elif student is not None:
        section.pop("student_blocks", None)
    raw["distill"] = section
    for item in overrides:
        apply_override(raw, item)
    out = validate_recipe(raw, recipe or "distill")
    if out.ensemble is not None:
        raise UserError("ensemble", "an ensemble recipe", "one student (distil each member on its own)")
    return out


def distill(
    teacher: str,
    student: str | None = None,
    blocks: int | None = None,
    recipe: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    repeats: int = 3,
    echo: Callable[[str], None] = lambda _: None,
) -> dict:
    """Train the student, compare it with the teacher, and write the comparison into the student's
    run dir (distill.json, and report.json's "distillation"); returns the comparison."""
    from hybridtune import run

    if repeats < 1:
        raise UserError("--repeats", str(repeats), "1 or more timed passes")
    summary = run.train(student_recipe(teacher, student, blocks, recipe, overrides))
    echo(f"student trained: {summary['run_dir']}; timing teacher and student on the test split")
    return write_comparison(Path(summary["run_dir"]), compare(teacher, summary["run_dir"], repeats))


def write_comparison(student_run: Path, comparison: dict) -> dict:
    rundir.write_json(student_run / RESULT, comparison)
    report = rundir.read_json(student_run / "report.json")
    rundir.write_json(student_run / "report.json", {**report, "distillation": comparison})
    return comparison


def compare(teacher: str, student: str, repeats: int = 3) -> dict:
    """Teacher and student side by side: validation, test, parameters, weights on disk, texts / s."""
    loaded = inference.load(teacher)
    frame = loaded.task.eval_frame(None, loaded.data_cfg, loaded.labels)
    data = loaded.data_cfg
    texts = frame[data.text_column].tolist()
    pairs = frame[data.text_pair_column].tolist() if data.text_pair_column else None
    sides = {"teacher": _side(Path(teacher), loaded, texts, pairs, repeats)}
    del loaded
    sides["student"] = _side(Path(student), inference.load(student), texts, pairs, repeats)
    t, s = sides["teacher"], sides["student"]
    metric = rundir.read_json(Path(student) / "report.json")["metric"]
    soft = Path(student) / "soft_labels.safetensors"
    return {
        **sides,
        "metric": metric,
        # points of the headline test metric the student gives up, and what it gains for them
        "test_lost": round(t["test"][metric] - s["test"][metric], 6),
        "speedup": round(s["texts_per_second"] / t["texts_per_second"], 3),
        "parameters_ratio": round(s["parameters"] / t["parameters"], 4),
        "weights_ratio": round(s["weights_mib"] / t["weights_mib"], 4),
        "scoring": {
            "texts": len(texts),
            "device": inference.device().type,
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "how": "the task's predict (batches sorted by length), best of the timed passes",
        },
        "soft_labels": _soft_labels_info(soft) if soft.is_file() else None,
    }


def _side(run: Path, loaded, texts: list[str], pairs: list[str] | None, repeats: int) -> dict:
    # a soup or merged-adapter run dir has eval.json (its test report) but no report.json
    report = rundir.read_json(run / "report.json") if (run / "report.json").is_file() else {}
    test = rundir.read_json(run / "eval.json")
    model = merged_for_inference(loaded.model)
    return {
        "run": str(run),
        "validation": report.get("best_validation"),
        "validation_metric": report.get("best_validation_metric"),
        "test": {k: test[k] for k in ("accuracy", "f1_macro", "n") if k in test},
        "blocks": _blocks(model),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_mib": round(weights_bytes(run) / 2**20, 2),
        "texts_per_second": round(texts_per_second(loaded, model, texts, pairs, repeats), 1),
    }


def _blocks(model) -> int | None:
    from hybridtune.model.anatomy import Anatomy

    try:
        return Anatomy.of(model).num_blocks
    except ValueError:
        return None


def texts_per_second(loaded, model, texts: list[str], pairs: list[str] | None, repeats: int) -> float:
    """Texts scored per second by the task's `predict`: the best of `repeats` passes, after one
    warm-up pass over a few texts (kernel selection, allocator)."""

    def predict(n: int | None = None) -> None:
        part = texts[:n] if n else texts
        loaded.task.predict(
            model, loaded.tokenizer, loaded.labels, loaded.data_cfg, part, pairs and pairs[: len(part)]
        )

    predict(16)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        predict()  # returns host-side rows: the GPU's work is done when it returns
        best = min(best, time.perf_counter() - started)
    return len(texts) / best


def weights_bytes(run: Path) -> int:
    """What serving the run reads as weights: final/'s weight files, plus the base model's for a peft
    run (its adapter is loaded onto the base)."""
    info = rundir.read_json(run / "run.json")
    dirs = [run / "final"]
    if info.get("format") == "peft":
        dirs.append(Path(resolve(info["base_model"])))
    return sum(
        f.stat().st_size for d in dirs for f in d.iterdir() if f.is_file() and f.name.endswith(WEIGHTS)
    )


def _soft_labels_info(path: Path) -> dict:
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}
