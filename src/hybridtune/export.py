"""Export a finished run for inference: merged weights, a peft adapter, or int8 for the CPU.

    hybridtune export RUN_DIR --format merged|peft|int8 --out DIR

merged  peft's `merge_and_unload()`: LoRA's W + BA (DoRA, AdaLoRA, IA3 likewise) folded into the
        base weights, peft's trained `modules_to_save` copies (the new head, fully trained blocks) in
        place of the originals. A plain transformers model dir: no peft at inference, no extra
        matmuls. A run trained without peft is saved as it is.
peft    final/ as peft saved it (adapter_config.json + adapter_model.safetensors + tokenizer), its
        `base_model_name_or_path` set to the run's base model.
int8    the merged model with every nn.Linear dynamically quantized
        (`torch.ao.quantization.quantize_dynamic`, qint8 weights, activations quantized per batch at
        run time; CPU only). Saved as config.json + tokenizer + model_int8.pt, the quantized state
        dict: reload = build the architecture from config.json, quantize it the same way, load the
        state dict (`inference.load_int8`, or the five lines in docs/export.md). The run's test split
        is scored with the fp32 and the int8 model (taking turns, twice; the faster pass of each counts):
        metric delta and speed-up go to export.json.

What cannot be merged is refused by name: bottleneck adapters (a non-linear module between
sublayers), a soft prompt and peft's prompt-learning methods (virtual tokens, not weights) have no
plain-weights form; `--format peft` cannot hold hybridtune's own parts either. Every export is
written to a temp dir and renamed (`rundir.save_dir_atomically`); export.json records its format,
task, labels and how to load it. An export dir holds the marker `.hybridtune-export` (paths.py):
`--out` must be a new or empty dir or an earlier export (marked); nothing else is ever replaced.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hybridtune import inference, rundir, tasks
from hybridtune.errors import UserError
from hybridtune.inference import CAUSAL, EXPORT_JSON, INT8_WEIGHTS, Loaded
from hybridtune.model.anatomy import unwrap
from hybridtune.paths import inside
from hybridtune.strategy import adapters, pooling, soft_prompt

FORMATS = ("merged", "peft", "int8")
MARKER = ".hybridtune-export"  # an export dir: the only kind of existing dir `--out` replaces


def export(run_dir: str, fmt: str, out: str, echo: Callable[[str], None] = lambda _: None) -> dict:
    """Write the export of `run_dir` in `fmt` to `out`; returns what export.json holds."""
    if fmt not in FORMATS:
        raise UserError("--format", f"'{fmt}'", "one of " + ", ".join(FORMATS))
    root = rundir.check_run_dir(run_dir)
    info = rundir.read_meta(root / "run.json", {"task": str})
    target = _target(out, root)
    # the model class export.json's load line names (the task's spec); a task without one is refused
    auto = inference.auto_class(info["task"], str(root / "run.json")).__name__
    if fmt == "int8" and info["task"] == CAUSAL:
        raise UserError("--format int8", "a causal_lm run", "a classification or token classification run")
    # merging runs on the GPU when there is one; int8 is measured against fp32 on the CPU, where it runs
    dev = torch.device("cpu") if fmt == "int8" else inference.device()
    loaded = inference.load(root, dev, precision="fp32")
    meta = {
        "format": fmt,
        "task": loaded.task_name,
        "source_run": str(root.resolve()),
        "base_model": info.get("base_model"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if loaded.prompt_format is not None:  # serve formats prompts as the run trained (generation.py)
        meta["prompt_format"] = loaded.prompt_format
    if loaded.labels is not None:
        meta |= {"labels": loaded.labels.names, "label_values": loaded.labels.values}
        data = loaded.recipe.data
        # and how it reads long texts: an export of a chunks run pools a document's windows as the run did
        keys = ("text_column", "text_pair_column", "max_length", "long_texts", "stride", "pool")
        meta["data"] = {k: getattr(data, k) for k in keys}
    if fmt == "peft":
        _check_peft(loaded, info)
        meta["load"] = f"peft.PeftModel.from_pretrained(transformers.{auto}.from_pretrained(BASE_MODEL), DIR)"
        _save(target, lambda tmp: _save_peft(root / "final", meta, tmp))
    elif fmt == "merged":
        model = merged(loaded)
        meta["load"] = f"transformers.{auto}.from_pretrained(DIR)"
        _save(target, lambda tmp: _save_merged(model, loaded.tokenizer, meta, tmp))
    else:
        model = merged(loaded)
        echo(f"int8: quantizing the merged model and scoring both on {root.name}'s test split (CPU)")
        meta["load"] = (
            f"quantize_dynamic(transformers.{auto}.from_config(AutoConfig.from_pretrained(DIR)), "
            f"{{torch.nn.Linear}}, dtype=torch.qint8).load_state_dict(torch.load(DIR/{INT8_WEIGHTS}))"
        )
        _save(target, lambda tmp: _save_int8(model, loaded, meta, tmp))
    echo(f"{fmt} export written to {target}")
    return meta


def _save(target: Path, write: Callable[[Path], None]) -> None:
    def save(tmp: Path) -> None:
        write(tmp)
        (tmp / MARKER).touch()

    rundir.save_dir_atomically(target, save)


def _target(out: str, run: Path) -> Path:
    """The export dir: new, empty, or an earlier export (marked; replaced); its parent must be
    writable. Resolved, so that '.' has a name to rename."""
    path = Path(out)
    if path.is_symlink():
        raise UserError("--out", f"'{out}', a symbolic link", "a new dir or an earlier export (not a link)")
    path = path.resolve()
    if path.exists() and not (path / MARKER).is_file() and (not path.is_dir() or any(path.iterdir())):
        raise UserError(
            "--out",
            f"'{out}', which exists and is not an export (no {MARKER})",
            "a new or empty dir, or an earlier export written by `hybridtune export`",
        )
    if inside(run, path) or path.parent == path:
        raise UserError("--out", f"'{out}', which holds the run itself", "a dir outside the run dir")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            "--out", f"'{out}' whose parent cannot be created ({e.strerror})", "a writable path"
        ) from None
    if not os.access(path.parent, os.W_OK):
        raise UserError("--out", f"'{out}' in a dir that cannot be written", "a writable path")
    return path


def own_parts(model: torch.nn.Module) -> list[str]:
    """hybridtune's parts in the model that neither peft nor transformers can save as weights."""
    base = unwrap(model)
    named = {
        adapters.ATTR: "bottleneck adapters",
        soft_prompt.ATTR: "a soft prompt",
        pooling.ATTR: "mean pooling (a head on the pooled embedding, which plain transformers does not do)",
    }
    return [what for attr, what in named.items() if getattr(base, attr, None) is not None]


def merge_refusal(model: torch.nn.Module) -> tuple[str, str] | None:
    """Why the model's trained weights cannot be folded into plain weights — (found, expected) — or
    None when they can (peft weight methods, or a model without peft)."""
    parts = own_parts(model)
    if parts:
        return (
            f"a run with {' and '.join(parts)}, which cannot be merged into plain weights",
            "a run whose trained weights are base weights or peft weights (lora, dora, adalora, ia3, ...)",
        )
    if hasattr(model, "peft_config"):
        config = next(iter(model.peft_config.values()))
        if config.is_prompt_learning:
            return (
                f"peft method {config.peft_type.value.lower()}, whose virtual tokens cannot be merged into weights",
                "a peft method that changes weights (lora, dora, adalora, ia3, ...), or --format peft",
            )
    return None


def merged_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """A run's model with a LoRA-like peft update folded into its weights (peft's merge_and_unload:
    one matmul per adapted layer instead of three); prompt-learning peft, bottleneck adapters and
    soft prompts (parts merging would drop) and plain models are returned as they are."""
    if not hasattr(model, "peft_config") or merge_refusal(model) is not None:
        return model
    return model.merge_and_unload().eval()


def merged(loaded: Loaded) -> torch.nn.Module:
    """The run's model with its peft weights folded in: a plain transformers model."""
    model = loaded.model
    refusal = merge_refusal(model)
    if refusal is not None:
        raise UserError("--format merged", *refusal)
    if hasattr(model, "peft_config"):
        model = model.merge_and_unload()
    return model.eval()


def _check_peft(loaded: Loaded, info: dict) -> None:
    parts = own_parts(loaded.model)
    if parts:
        raise UserError(
            "--format peft",
            f"a run with {' and '.join(parts)}, which a peft adapter cannot hold",
            "a run whose only added weights are peft's (serve the run dir itself)",
        )
    cut = loaded.recipe.distill.student_blocks if loaded.recipe and loaded.recipe.distill else None
    if cut is not None:  # the adapter's base is the base model cut to k blocks (strategy/distill.py)
        raise UserError(
            "--format peft",
            f"a student cut to its bottom {cut} blocks (distill.student_blocks), whose base is not the "
            "base model as published",
            "--format merged (a plain model of those blocks), or serve the run dir itself",
        )
    if info.get("format") != "peft":
        raise UserError(
            "--format peft",
            "a run trained without peft (final/ is a whole model)",
            "a run with a peft method",
        )


def _save_peft(final: Path, meta: dict, tmp: Path) -> None:
    for file in final.iterdir():
        if file.is_file():
            shutil.copy2(file, tmp / file.name)
    config = rundir.read_json(tmp / "adapter_config.json")
    if meta["base_model"]:
        config["base_model_name_or_path"] = meta["base_model"]
    rundir.write_json(tmp / "adapter_config.json", config)
    rundir.write_json(tmp / EXPORT_JSON, meta)


def _save_merged(model: torch.nn.Module, tokenizer, meta: dict, tmp: Path) -> None:
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    rundir.write_json(tmp / EXPORT_JSON, meta)


def _save_int8(model: torch.nn.Module, loaded: Loaded, meta: dict, tmp: Path) -> None:
    quantized = inference.quantize_int8(model)
    measured = measure({"fp32": model, "int8": quantized}, loaded)
    fp32, int8 = measured["fp32"], measured["int8"]
    torch.save(quantized.state_dict(), tmp / INT8_WEIGHTS)
    model.config.save_pretrained(tmp)
    loaded.tokenizer.save_pretrained(tmp)
    metric = tasks.spec(loaded.task_name).headline[0]
    meta["int8"] = {
        "metric": metric,
        "n": fp32["n"],
        "fp32": fp32,
        "int8": int8,
        "delta": round(int8[metric] - fp32[metric], 6),
        "speedup": round(fp32["seconds"] / int8["seconds"], 3),
        "threads": torch.get_num_threads(),
        "quantized_linear_layers": sum(
            isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules()
        ),
        "size_mb": {
            "fp32": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 2),
            "int8": round((tmp / INT8_WEIGHTS).stat().st_size / 2**20, 2),
        },
    }
    rundir.write_json(tmp / EXPORT_JSON, meta)


def measure(models: dict[str, torch.nn.Module], loaded: Loaded, repeats: int = 2) -> dict[str, dict]:
    """Each model's headline metric on the run's test split and its time to score it: after a
    warm-up, the models take turns `repeats` times (so a machine's drift hits each alike) and the
    fastest pass of each counts."""
    task, data_cfg = loaded.task, loaded.recipe.data
    frame = task.eval_frame(None, data_cfg, loaded.labels)
    dataset = task.encode(frame, loaded.tokenizer, loaded.labels, data_cfg)
    warm_up = dataset.select(range(min(8, len(dataset))))
    seconds: dict[str, list[float]] = {name: [] for name in models}
    reports: dict[str, dict] = {}
    for model in models.values():
        task.report(model, loaded.tokenizer, warm_up, loaded.labels)
    for _ in range(repeats):
        for name, model in models.items():
            started = time.perf_counter()
            reports[name] = task.report(model, loaded.tokenizer, dataset, loaded.labels)
            seconds[name].append(time.perf_counter() - started)
    metric = tasks.spec(loaded.task_name).headline[0]
    return {
        name: {
            metric: reports[name][metric],
            "n": reports[name]["n"],
            "seconds": round(min(seconds[name]), 4),
            "samples_per_second": round(reports[name]["n"] / min(seconds[name]), 1),
        }
        for name in models
    }
