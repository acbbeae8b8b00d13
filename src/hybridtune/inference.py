"""What `export` and `serve` load: a run dir, an export dir or a plain transformers model dir.

    run dir       run.json + final/ (written by `hybridtune train`): classification and token
                  classification through `inference.load_run`; causal_lm (run.json {"task": "causal_lm",
                  "base_model", "format"}) through this module's own causal loader
    export dir    export.json + a merged model, a peft adapter or an int8 state dict (`hybridtune export`)
    ensemble dir  ensemble.json + members/ (`hybridtune ensemble`, hybridtune.ensemble): its members
                  combined, through the ensemble's own `predict`
    model dir     any `save_pretrained` dir: its config's architecture says the task (…ForCausalLM,
                  …ForSequenceClassification, …ForTokenClassification) and id2label the labels

The causal loader is plain `AutoModelForCausalLM` (+ `PeftModel` for an adapter), so serve does not
depend on the training side of the causal-LM task. Device: CUDA when there is one (bf16 weights when
the GPU supports it), else the CPU in fp32.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridtune import generation, rundir, strategy, tasks
from hybridtune.device import to_device  # noqa: F401  (tasks import it from here)
from hybridtune.errors import UserError
from hybridtune.generation import recorded_format
from hybridtune.model.loading import load_model, load_tokenizer, resolve
from hybridtune.recipe import DataConfig, Recipe, load_recipe

EXPORT_JSON = "export.json"
ENSEMBLE_JSON = "ensemble.json"  # hybridtune.ensemble.MANIFEST
INT8_WEIGHTS = "model_int8.pt"
CAUSAL = "causal_lm"
# files of strategy parts that neither a plain model nor a peft adapter holds (strategy/adapters.py, prompt.py)
PART_FILES = {"adapters.safetensors": "bottleneck adapters", "soft_prompt.safetensors": "a soft prompt"}


@dataclass
class Loaded:
    """A model ready for inference, with what its task needs to read inputs and name outputs."""

    task_name: str  # classification | token_classification | causal_lm
    model: nn.Module
    tokenizer: Any
    name: str  # what clients see as the model id
    labels: Any = None  # the task's Labels (classification tasks)
    task: Any = None  # the task module (classification tasks)
    data_cfg: DataConfig | None = None  # text columns and max_length for task.predict
    recipe: Any = None  # the run's recipe (run dirs only)
    source: Path | None = None
    # causal LMs: how training formatted prompts (run.json's prompt_format; None: no record, generation.py)
    prompt_format: str | None = None
    # predict(texts, text_pairs) -> rows, where `task.predict` on `model` is not the whole story (ensembles)
    predict: Callable[[list[str], list[str] | None], list[dict]] | None = None


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def place(model: nn.Module, dev: torch.device | None = None, precision: str = "auto") -> nn.Module:
    """Move a model for inference. Precision auto: bf16 on a GPU that supports it, fp32 otherwise
    (on the CPU bf16 is not faster everywhere); "fp32" keeps fp32 (export merges in full precision)."""
    dev = dev or device()
    if precision == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported():
        model = model.to(dtype=torch.bfloat16)
    return model.to(dev).eval()


def load(path: str | Path, dev: torch.device | None = None, precision: str = "auto") -> Loaded:
    """A run dir, an export dir or a model dir, on `dev` (default: `device()`) in `precision` (see `place`)."""
    root = Path(path)
    if (root / ENSEMBLE_JSON).is_file():  # ensembles sit above this loader: hybridtune.ensemble.load
        raise UserError(
            str(path), "an ensemble dir", "a run, export or model dir (ensembles: hybridtune.ensemble.load)"
        )
    if (root / "run.json").is_file():
        loaded = _load_run(root)
    elif (root / EXPORT_JSON).is_file():
        loaded = load_export(root)
    elif (root / "config.json").is_file():
        loaded = _load_model_dir(root)
    else:
        raise UserError(
            str(path),
            "neither run.json, export.json nor config.json",
            "a run dir (`hybridtune train`), an export dir (`hybridtune export`) or a model dir",
        )
    if not is_int8(loaded.model):
        loaded.model = place(loaded.model, dev, precision)  # int8 dynamic quantization runs on the CPU only
    loaded.model.eval()
    return loaded


def _load_run(root: Path) -> Loaded:
    rundir.check_run_dir(str(root))
    info = rundir.read_meta(root / "run.json", {"task": str})
    if info["task"] == CAUSAL:
        base, fmt = _causal_fields(info, root / "run.json")
        model, tokenizer = load_causal(root / "final", base, fmt)
        prompt_format = recorded_format(info, str(root / "run.json"))
        return Loaded(CAUSAL, model, tokenizer, root.name, source=root, prompt_format=prompt_format)
    run = load_run(str(root))
    return Loaded(
        info["task"],
        run.model,
        run.tokenizer,
        root.name,
        run.labels,
        run.task,
        run.recipe.data,
        run.recipe,
        root,
    )


def _causal_fields(info: dict, path: Path) -> tuple[str | None, str]:
    """base_model and format of a causal run.json / export.json, checked (a hand-edited file)."""
    base, fmt = info.get("base_model"), info.get("format", "model")
    if base is not None and not isinstance(base, str):
        raise UserError(str(path), f"base_model of type {type(base).__name__}", "a model path or hub id")
    if fmt not in ("model", "peft", "merged", "int8"):
        raise UserError(str(path), f"format {str(fmt)[:40]!r}", "model, peft, merged or int8")
    return base, fmt


def labels_of(task: Any, info: dict, path: Path) -> Any:
    """The task's Labels from the labels / label_values of a run.json or export.json, checked (empty
    for a task without a label space: causal_lm)."""
    names, values = info.get("labels"), info.get("label_values")
    scalar = (str, int)
    if (
        not isinstance(names, list)
        or not isinstance(values, list)
        or len(names) != len(values)
        or (not names and tasks.spec(task.NAME).label_space)
        or not all(isinstance(n, scalar) and not isinstance(n, bool) for n in [*names, *values])
    ):
        raise UserError(
            str(path),
            "labels / label_values that are not two equally long, non-empty lists of names",
            "the labels written by `hybridtune train` / `export`",
        )
    return task.Labels(values=values, names=[str(n) for n in names])


def load_causal(final: Path, base_model: str | None, fmt: str) -> tuple[nn.Module, Any]:
    """A causal LM saved whole, or a base model + the peft adapter in `final`."""
    from transformers import AutoModelForCausalLM

    for file, what in PART_FILES.items():
        if (final / file).is_file():
            raise UserError(
                str(final), f"{what} ({file})", "a causal LM or a peft adapter (no hybridtune parts)"
            )
    tokenizer = load_tokenizer(str(final), where=str(final))
    if fmt == "peft":
        from hybridtune.strategy.peft import load_adapter

        if not base_model:
            raise UserError(
                f"{final.parent}/run.json", "format peft without base_model", "the base model path"
            )
        base, _ = load_model(AutoModelForCausalLM, base_model, tokenizer, where="base_model")
        model = load_adapter(base, final)
    else:
        model, _ = load_model(AutoModelForCausalLM, str(final), tokenizer, where=str(final))
    return model, tokenizer


def load_export(root: Path) -> Loaded:
    """An export dir: merged, peft or int8 (see export.py), with the labels export.json keeps."""
    from pydantic import ValidationError

    meta = root / EXPORT_JSON
    info = rundir.read_meta(meta, {"task": str, "format": str})
    name = info["task"]
    if name == CAUSAL:
        base, fmt = _causal_fields(info, meta)
        base = base if fmt == "peft" else None
        model, tokenizer = load_causal(root, base, "peft" if fmt == "peft" else "model")
        prompt_format = recorded_format(info, str(meta))
        return Loaded(CAUSAL, model, tokenizer, root.name, source=root, prompt_format=prompt_format)
    fmt = info["format"]
    if fmt not in ("merged", "peft", "int8"):
        raise UserError(str(meta), f"format {fmt[:40]!r}", "merged, peft or int8")
    task = tasks.load(name, where=str(meta))
    labels = labels_of(task, info, meta)
    try:
        data_cfg = DataConfig(**rundir.read_meta(meta, {"data": dict})["data"])
    except (ValidationError, TypeError):
        raise UserError(
            str(meta), "a 'data' entry that is no data section", "text_column, max_length"
        ) from None
    if fmt == "peft" and not isinstance(info.get("base_model"), str):
        raise UserError(str(meta), "a peft export without base_model", "the base model path")
    if tasks.has(name, "long_texts"):  # an export of a chunks run pools a document's windows as the run did
        labels.pool = data_cfg.pool
    tokenizer = load_tokenizer(str(root), where=str(root))
    if fmt == "int8":
        model = load_int8(root)
    elif fmt == "peft":
        from hybridtune.strategy.peft import load_adapter

        base, _ = task.load_model(info["base_model"], tokenizer, labels)
        model = load_adapter(base, root)
    else:
        model, _ = task.load_model(str(root), tokenizer, labels)
    return Loaded(name, model, tokenizer, root.name, labels, task, data_cfg, source=root)


def _load_model_dir(root: Path) -> Loaded:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(root)
    arch = (config.architectures or [""])[0]
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        model, tokenizer = load_causal(root, None, "model")
        return Loaded(CAUSAL, model, tokenizer, root.name, source=root)
    # the first registered task whose model class makes this architecture (its spec's auto_model)
    kinds = {
        t.auto_model.removeprefix("AutoModel"): t.name for t in map(tasks.spec, tasks.names()) if t.auto_model
    }
    name = next((task for suffix, task in kinds.items() if arch.endswith(suffix)), None)
    if name is None:
        raise UserError(
            f"{root}/config.json",
            f"architecture '{arch or 'none'}'",
            "a " + " or ".join(f"…{suffix}" for suffix in kinds) + " model",
        )
    task = tasks.load(name)
    names = [config.id2label[i] for i in sorted(config.id2label)]
    labels = task.Labels(values=names, names=names)
    tokenizer = load_tokenizer(str(root), where=str(root))
    model, _ = task.load_model(str(root), tokenizer, labels)
    limit = min(getattr(tokenizer, "model_max_length", 512) or 512, 512)
    return Loaded(name, model, tokenizer, root.name, labels, task, DataConfig(max_length=limit), source=root)


# --------------------------------------------------------------------------------------------------
# int8: torch dynamic quantization of every nn.Linear (weights int8, activations quantized per batch)


def quantize_int8(model: nn.Module) -> nn.Module:
    """`torch.ao.quantization.quantize_dynamic` on nn.Linear, qint8: a quantized copy of an fp32 CPU model.

    torch marks torch.ao.quantization as deprecated in favour of torchao; the eager dynamic
    quantization still works in torch 2.13 and needs no other package, so its warnings are muted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)


def is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())


def load_int8(root: Path) -> nn.Module:
    """The int8 export: build the fp32 architecture from config.json, quantize it the same way, load
    the saved int8 state dict (plain torch + transformers; export.json's "load" says the same)."""
    from transformers import AutoConfig

    info = rundir.read_meta(root / EXPORT_JSON, {"task": str})
    auto = auto_class(info["task"], str(root / EXPORT_JSON))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = quantize_int8(auto.from_config(AutoConfig.from_pretrained(root)))
        model.load_state_dict(torch.load(root / INT8_WEIGHTS, weights_only=True))
    return model.eval()


def auto_class(task_name: str, where: str):
    """transformers' auto class of a task's model (its spec's `auto_model`); a task without one (the
    model decides: prompt_classification) or an unknown one is a UserError at `where`."""
    import transformers

    auto = tasks.spec(task_name, where).auto_model
    if auto is None:
        able = ", ".join(n for n in tasks.names() if tasks.spec(n).auto_model)
        raise UserError(where, f"task {task_name}, whose model class depends on the model", f"a {able} model")
    return getattr(transformers, auto)


# --------------------------------------------------------------------------------------------------
# a finished run dir, with its recipe, task and strategy parts (what api, ensemble, search and
# fusion's frozen run load)


def bind_labels(labels, recipe: Recipe, info: dict | None = None, where: str = "run.json") -> None:
    """The recipe's settings a task's evaluation reads off its labels (tasks/base.py): a `generate`
    task generates with `generation` (a saved run: in run.json's prompt format); a `long_texts` task
    pools a chunked document's windows by `data.pool`."""
    if tasks.has(recipe.task, "generate"):
        labels.generation = recipe.generation
        if info is not None:
            labels.prompt_format = generation.recorded_format(info, where)
    if tasks.has(recipe.task, "long_texts"):
        labels.pool = recipe.data.pool


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: Any
    model: torch.nn.Module
    tokenizer: Any
    labels: Any
    task: Any = None  # the task module (hybridtune.tasks.*)


def task_of(run_dir: str) -> Any:
    """The task module of a finished run or ensemble (e.g. for the CLI to print its results)."""
    from hybridtune.ensemble.config import MANIFEST, is_ensemble

    if is_ensemble(run_dir):
        path = Path(run_dir) / MANIFEST
    else:
        path = rundir.check_run_dir(run_dir) / "run.json"
    return tasks.load(rundir.read_meta(path, {"task": str})["task"], where=str(path))


def load_run(run_dir: str) -> LoadedRun:
    run = rundir.check_run_dir(run_dir)
    info = rundir.read_meta(run / "run.json", {"format": str})
    recipe = load_recipe(run / "recipe.yaml")
    task = tasks.for_recipe(recipe)
    labels = labels_of(task, info, run / "run.json")
    # a chunks run scores new texts per document, as it was evaluated; a causal run prompts as it trained
    bind_labels(labels, recipe, info, str(run / "run.json"))
    final = str(run / "final")
    tokenizer = load_tokenizer(final, where=f"{run}/final")
    if info["format"] == "peft":
        from hybridtune.strategy.peft import load_adapter

        base, _ = task.load_model(resolve(recipe.model.name), tokenizer, labels)
        # the base as the run reshaped it (distill's bottom k blocks), which the adapter was trained on
        model = load_adapter(strategy.reshape(base, recipe), final)
    else:
        model, _ = task.load_model(final, tokenizer, labels)
    model = strategy.restore(model, recipe, final, load_run=load_run)  # fusion loads its frozen run
    model.eval()
    return LoadedRun(run, recipe, model, tokenizer, labels, task)
