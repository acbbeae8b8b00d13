"""Few-shot: SetFit vs hybridtune on the very same k-shot draws (docs/few_shot.md).

    # SetFit lives in an environment of its own (it pins its own sentence-transformers/transformers):
    python -m venv /tmp/setfit-env && /tmp/setfit-env/bin/pip install torch==2.13.0 setfit==1.2.0
    python benchmarks/bench_fewshot.py --setfit-python /tmp/setfit-env/bin/python
    python benchmarks/bench_fewshot.py --smoke          # hybridtune's side only, seconds: a wiring check

For each data set (bundled Rotten Tomatoes, 2 classes; bundled chatterbot topics, 19 classes), each
budget k (8, 16, 64 per class; a k larger than a data set's smallest class is skipped, said in the
output) and each draw (5): hybridtune's draw (data/shots.py: seeded, nested) is written as
train.jsonl and the test split as test.jsonl, and every side trains on exactly those rows, all with
the bundled all-MiniLM-L6-v2, no validation split (only the k labels per class are used):

  setfit                SetFit 1.x, paper settings (benchmarks/setfit_side.py)
  hybridtune setfit     recipes/setfit.yaml: contrastive body tuning + closed-form logistic head
  hybridtune full       recipes/few_shot_full.yaml: plain full fine-tuning, 20 epochs
  hybridtune <other>    the other candidate recipes (CANDIDATES); "best" = the best mean per budget
  hybridtune <x> + distill   a student of candidate <x>'s run (`hybridtune distill`, DISTILLED) on the
                        k labels and the rest of the draw's train split unlabelled: texts SetFit
                        never sees; its wall time includes its teacher's

Each run is its own process (wall time measured from outside, model load included). Results: mean
± sd of test accuracy over the draws, wall seconds, per data set and k, to stdout (markdown) and
to --out (JSON). "best" is picked on the test split, so it is optimistic by construction; the
table shows every candidate so that nothing is hidden behind it. To confirm a pick without that
bias, run it again on draws it was not picked on: `--first-draw 5 --draws 10` trains draws 5 .. 9
(each draw's rows depend on its number only, not on how many draws there are: data/shots.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, ROOT, machine, run_child  # noqa: E402

DATASETS = {"rotten_tomatoes": "bundled:rotten_tomatoes", "chatterbot_topics": "bundled:chatterbot_topics"}
# hybridtune's recipes on each draw: name -> (recipe file, overrides)
CANDIDATES = {
    "hybridtune setfit": ("setfit.yaml", []),
    "hybridtune full": ("few_shot_full.yaml", []),
    "hybridtune setfit+eda": ("setfit.yaml", ["data.augment.n=4"]),
    # EDA at SetFit's cost: 5x the texts, a fifth of the pairs per text (R 4): as many pairs, more kinds
    "hybridtune setfit+eda same pairs": ("setfit.yaml", ["data.augment.n=4", "contrastive.pairs=4"]),
    # SetFit computes in fp32 on CPU; hybridtune's `precision: auto` takes bf16 where the CPU has it
    "hybridtune setfit fp32": ("setfit.yaml", ["train.precision=fp32"]),
    # the pairs drawn at random with replacement: setfit.yaml's sampling until 2026-12-04
    "hybridtune setfit random pairs": ("setfit.yaml", ["contrastive.sampling=random"]),
    "hybridtune contrastive lora top": ("contrastive_lora_top.yaml", []),
    # no body tuning: the closed-form logistic head on the pretrained embedding
    "hybridtune linear probe": ("linear_probe.yaml", []),
    # WiSE-FT: the body halfway (or three quarters of the way) between pretrained and tuned
    "hybridtune setfit blend 0.5": ("setfit.yaml", ["contrastive.blend=0.5"]),
    "hybridtune setfit blend 0.75": ("setfit.yaml", ["contrastive.blend=0.75"]),
    # the recipe the few-shot search picked with 32 validation labels per class (docs/search.md,
    # "Few-shot data"): setfit.yaml with the contrastive lr at 4.5e-5 (SetFit's 2e-5)
    "hybridtune setfit lr 4.5e-5": ("setfit.yaml", ["contrastive.lr=4.5e-5"]),
    # after SetFit's two stages, 10 epochs of the Trainer (lr 5e-5): the head alone on the tuned body,
    # or end to end (the k = 8 search's second pick, docs/search.md "Few-shot data", was the former)
    "hybridtune setfit then head": ("setfit.yaml", ["contrastive.then=head", "train.epochs=10"]),
    "hybridtune setfit then all": ("setfit.yaml", ["contrastive.then=all", "train.epochs=10"]),
    # the same at half SetFit's pairs (R 10): the contrastive stage is most of its time (at k = 64,
    # 5,120 pairs, ~85 % of the training seconds), as the cheaper teacher of a student below
    "hybridtune setfit then all R10": (
        "setfit.yaml",
        ["contrastive.then=all", "train.epochs=10", "contrastive.pairs=10"],
    ),
    # R 10 at the contrastive lr the few-shot searches moved SetFit's 2e-5 to on validation labels
    # (4.5e-5 with 32 and with 16 per class, 4.2e-5 with draw rungs: docs/search.md), not on test draws
    "hybridtune setfit then all R10 lr 4.5e-5": (
        "setfit.yaml",
        ["contrastive.then=all", "train.epochs=10", "contrastive.pairs=10", "contrastive.lr=4.5e-5"],
    ),
    # R 10 with 3 end-to-end epochs: picked among 1, 3 and 10 on validation labels (250 per class from
    # the validation split, draws 0-4: benchmarks/fewshot_screen.py, docs/few_shot.md), not on test draws
    "hybridtune setfit then all R10 3 epochs": (
        "setfit.yaml",
        ["contrastive.then=all", "train.epochs=3", "contrastive.pairs=10"],
    ),
    # the regularisers of docs/strategies.md on plain full fine-tuning, at few labels (issue: do they
    # help where overfitting is the whole problem?), each at its example recipe's setting
    "hybridtune full+rdrop": ("few_shot_full.yaml", ["rdrop.alpha=1.0"]),
    "hybridtune full+l2sp": ("few_shot_full.yaml", ["l2sp.alpha=0.1"]),
    "hybridtune full+label smoothing": ("few_shot_full.yaml", ["label_loss.smoothing=0.1"]),
}
# two steps: a candidate above as the teacher, then `hybridtune distill` (docs/distill.md): a student
# learns the teacher's soft labels on the k labels and on the rest of the draw's train split, its
# labels dropped (`data.unlabeled=train_rest`) -- these use unlabelled texts, which SetFit does not.
# name -> (teacher candidate, the student's recipe, overrides); the teacher's run is the listed
# candidate's own when it is listed too (trained once), its wall time counted in the student's
DISTILLED = {
    # the student: MiniLM from its pretrained weights, plain full fine-tuning on the mean-pooled
    # embedding, 2 epochs at batch 32 (the labelled and unlabelled rows), T 2, alpha 0.5
    "hybridtune setfit then all + distill": (
        "hybridtune setfit then all",
        "few_shot_full.yaml",
        ["train.epochs=2", "train.batch_size=32", "pooling.mode=mean", "distill.temperature=2.0",
         "distill.alpha=0.5", "data.unlabeled=train_rest"],
    ),
    # teacher and student at about SetFit's time at k = 64: the teacher at R 10, the student 1 epoch
    "hybridtune setfit then all R10 + distill 1 epoch": (
        "hybridtune setfit then all R10",
        "few_shot_full.yaml",
        ["train.epochs=1", "train.batch_size=32", "pooling.mode=mean", "distill.temperature=2.0",
         "distill.alpha=0.5", "data.unlabeled=train_rest"],
    ),
}  # fmt: skip
BASELINES = ("setfit", "hybridtune setfit", "hybridtune full")


def export_draw(source: str, k: int, draws: int, draw: int, out: Path, max_test: int | None) -> int:
    """hybridtune's draw of k per class and its test split as jsonl; returns the number of classes."""
    from hybridtune.recipe import load_recipe
    from hybridtune.tasks import classification

    overrides = draw_overrides(source, k, draws, draw, max_test)
    splits = classification.load_splits(load_recipe(None, overrides).data)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        splits[name][["text", "label"]].to_json(out / f"{name}.jsonl", orient="records", lines=True)
    return splits.train["label"].nunique()


def smallest_train_class(source: str) -> int:
    from hybridtune.recipe import load_recipe
    from hybridtune.tasks import classification

    splits = classification.load_splits(load_recipe(None, [f"data.source={source}"]).data)
    return int(splits.train["label"].value_counts().min())


def draw_overrides(source: str, k: int, draws: int, draw: int, max_test: int | None) -> list[str]:
    """The data settings of one draw: `export_draw` writes it for SetFit, hybridtune's runs draw it
    themselves with the very same settings (data/shots.py is deterministic), so the rows are equal."""
    out = [f"data.source={source}", f"data.shots={k}", f"data.draws={draws}", f"data.draw={draw}"]
    return out + ["data.validation_shots=0"] + ([f"data.max_eval_samples={max_test}"] if max_test else [])


def hybridtune_run(
    recipe: str, overrides: list[str], out: Path, draw: int, teacher: dict | None = None
) -> dict:
    """One run of `recipe` on the draw (`hybridtune train`), or with `teacher` (a row of this
    function) its student (`hybridtune distill TEACHER_RUN RECIPE`, the teacher's data), the teacher's
    wall and training seconds added to the student's."""
    recipe_path = str(ROOT / "recipes" / recipe)
    if teacher is None:
        cmd = [PYTHON, "-m", "hybridtune", "train", recipe_path]
    else:  # --repeats 1: the teacher-student scoring-speed table is not what a user waits for
        cmd = [PYTHON, "-m", "hybridtune", "distill", teacher["run_dir"], recipe_path, "--repeats", "1"]
    measured = run_child([*cmd, f"train.seed={draw}", f"output.dir={out}", *overrides])
    run = max(out.iterdir(), key=lambda p: p.stat().st_mtime)
    report = json.loads((run / "report.json").read_text())
    before = teacher or {"wall_s": 0.0, "train_s": 0.0}
    return {
        "test_accuracy": report["test"]["accuracy"],
        "wall_s": before["wall_s"] + measured["wall_s"],
        "train_s": before["train_s"] + report["train_seconds"],
        "train_rows": report["few_shot"]["train_rows"],
        "run_dir": str(run),
    }


def candidate_row(
    side: str, this_draw: dict[str, dict], data: Path, settings: list[str], draw: int, max_test: int | None
) -> dict:
    """A candidate's run on a draw (`settings`: the draw's); a DISTILLED one trains its teacher first,
    unless this draw has it already (`this_draw`: the rows so far)."""
    out = data / side.replace(" ", "_").replace("+", "and")
    if side not in DISTILLED:
        recipe, overrides = CANDIDATES[side]
        this_draw[side] = hybridtune_run(recipe, [*settings, *overrides], out, draw)
        return this_draw[side]
    teacher_side, recipe, overrides = DISTILLED[side]
    teacher = this_draw.get(teacher_side) or candidate_row(
        teacher_side, this_draw, data, settings, draw, max_test
    )
    test = [f"data.max_eval_samples={max_test}"] if max_test else []  # the rest of the data: the teacher's
    this_draw[side] = hybridtune_run(recipe, [*overrides, *test], out, draw, teacher=teacher)
    return this_draw[side]


def setfit_run(python: str, data: Path, out: Path, draw: int, model: str) -> dict:
    result = out / f"setfit-{draw}.json"
    cmd = [
        python, str(ROOT / "benchmarks" / "setfit_side.py"), "--model", model,
        "--train", str(data / "train.jsonl"), "--test", str(data / "test.jsonl"),
        "--out", str(result), "--seed", str(draw),
    ]  # fmt: skip
    measured = run_child(cmd)
    return {**json.loads(result.read_text()), "wall_s": measured["wall_s"]}


def summarise(rows: list[dict]) -> dict:
    accs = [100 * r["test_accuracy"] for r in rows]
    walls = [r["wall_s"] for r in rows]
    return {
        "mean": statistics.mean(accs),
        "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "wall_s": statistics.mean(walls),
        "draws": len(rows),
    }


def versus(rows: list[dict], reference: list[dict] | None) -> str:
    """The paired difference to a reference side over the draws (same rows, same seed), in points with
    report/stats.py's 95 % t-interval; "—" without the reference or with one draw."""
    if not reference or len(rows) < 2 or rows is reference:
        return "—"
    from hybridtune.report.stats import paired

    p = paired([r["test_accuracy"] for r in rows], [r["test_accuracy"] for r in reference])
    return f"{100 * p['mean']:+.2f} ({100 * p['low']:+.2f}, {100 * p['high']:+.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--shots", nargs="+", type=int, default=[8, 16, 64])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--first-draw", type=int, default=0, help="run draws FIRST .. draws-1 (fresh draws)")
    ap.add_argument("--setfit-python", help="python of an environment with setfit installed")
    choices = [*CANDIDATES, *DISTILLED]
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=choices)
    ap.add_argument("--max-test", type=int, help="score on the first N test rows only")
    ap.add_argument("--out", default="fewshot-results.json")
    ap.add_argument("--smoke", action="store_true", help="hybridtune only, k=4, 1 draw, tiny settings")
    ap.add_argument(
        "--without-setfit", action="store_true", help="hybridtune's candidates only (no SetFit side, no Δ)"
    )
    a = ap.parse_args()
    extra: list[str] = []
    if a.smoke:
        a.datasets, a.shots, a.draws, a.setfit_python, a.max_test = ["rotten_tomatoes"], [4], 1, None, 64
        a.candidates = ["hybridtune setfit", "hybridtune full"]
        extra = ["contrastive.pairs=2", "train.epochs=1", "train.precision=fp32"]
    if not a.setfit_python and not (a.smoke or a.without_setfit):
        ap.error("--setfit-python is required (the SetFit side needs its own environment; see the docstring)")
    from hybridtune.bundled import model_path

    model = model_path("bundled:minilm")
    results: dict = {"machine": machine(), "draws": list(range(a.first_draw, a.draws)), "tables": []}
    lines = [f"machine: {results['machine']}", ""]
    root = Path(tempfile.mkdtemp(prefix="bench-fewshot-"))
    for name in a.datasets:
        source = DATASETS[name]
        smallest = smallest_train_class(source)
        for k in a.shots:
            if k > smallest:
                lines.append(f"{name} k={k}: skipped, the smallest class has {smallest} training rows")
                continue
            sides: dict[str, list[dict]] = {}
            for draw in range(a.first_draw, a.draws):
                data = root / name / f"k{k}" / f"d{draw}"
                n_classes = export_draw(source, k, a.draws, draw, data, a.max_test)
                if a.setfit_python:
                    sides.setdefault("setfit", []).append(
                        setfit_run(a.setfit_python, data, data, draw, model)
                    )
                this_draw: dict[str, dict] = {}
                settings = [*draw_overrides(source, k, a.draws, draw, a.max_test), *extra]
                for side in sorted(a.candidates, key=lambda c: c in DISTILLED):  # teachers first
                    row = candidate_row(side, this_draw, data, settings, draw, a.max_test)
                    if not any(o.startswith("data.augment") for o in CANDIDATES.get(side, ("", []))[1]):
                        assert row["train_rows"] == k * n_classes, (side, row["train_rows"])  # the draw only
                    sides.setdefault(side, []).append(row)
                progress = {**results, "partial": {"dataset": name, "k": k, "runs": sides}}
                Path(a.out).write_text(json.dumps(progress, indent=1))  # a cut-off run keeps its draws
            summary = {side: summarise(rows) for side, rows in sides.items()}
            ours = [s for s in summary if s.startswith("hybridtune")]
            best = max(ours, key=lambda s: summary[s]["mean"])
            vs_setfit = {s: versus(rows, sides.get("setfit")) for s, rows in sides.items()}
            vs_full = {s: versus(rows, sides.get("hybridtune full")) for s, rows in sides.items()}
            results["tables"].append(
                {
                    "dataset": name,
                    "k": k,
                    "classes": n_classes,
                    "sides": summary,
                    "best": best,
                    "runs": sides,
                    "vs_setfit": vs_setfit,
                    "vs_full": vs_full,
                }
            )
            numbers = f"draws {a.first_draw}-{a.draws - 1}" if a.first_draw else f"{a.draws} draws"
            lines += [f"## {name}, k = {k} per class ({n_classes} classes, {numbers})", ""]
            lines += [
                "| side | test accuracy % (mean ± sd) | paired Δ vs SetFit, pt (95 % CI) "
                "| paired Δ vs hybridtune full | wall s per run |",
                "|---|---|---|---|---|",
            ]
            for side, s in summary.items():
                mark = " (best hybridtune)" if side == best else ""
                lines.append(
                    f"| {side}{mark} | {s['mean']:.1f} ± {s['sd']:.1f} | {vs_setfit[side]} | {vs_full[side]} "
                    f"| {s['wall_s']:.1f} |"
                )
            lines.append("")
    Path(a.out).write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
