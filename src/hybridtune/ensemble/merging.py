"""Adapter merging: LoRA members combined into one adapter by peft's add_weighted_adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from hybridtune import rundir
from hybridtune.ensemble.config import MERGE_METHODS, check_weights
from hybridtune.ensemble.members import load_member
from hybridtune.ensemble.outputs import headline_metrics, split_frames, y_true
from hybridtune.errors import UserError
from hybridtune.model.loading import resolve
from hybridtune.recipe import recipe_to_yaml
from hybridtune.strategy.peft import save_base_config
from hybridtune.tasks import classification
from hybridtune.tasks.classification import full_report


def merge_adapters(
    paths: list[str],
    out: str,
    method: str = "cat",
    weights: list[float] | None = None,
    density: float | None = None,
) -> dict:
    """One LoRA adapter from several, by peft's add_weighted_adapter; saved as a normal peft run dir.

    `cat` with the default weights (1/K each) is the exact mean of the members' updates BA (the
    adapter's rank is the sum of theirs); `linear` averages A and B separately (same rank, only
    approximately the mean update); svd / ties / dare_* as in peft. A classification head trained
    beside the adapter (peft's modules_to_save) is not handled by add_weighted_adapter: it is averaged
    with the same weights here."""
    from peft import PeftModel

    if len(paths) < 2:
        raise UserError("merge-adapters", f"{len(paths)} member", "at least 2 LoRA run dirs")
    if method not in MERGE_METHODS:
        raise UserError("--method", repr(method), "one of " + ", ".join(MERGE_METHODS))
    check_weights(weights, len(paths), "--weights")
    weights = weights or [1 / len(paths)] * len(paths)
    if method in ("ties", "dare_ties", "dare_linear", "magnitude_prune", "ties_svd") and density is None:
        density = 0.5
    target = Path(out)
    if target.exists():
        raise UserError(str(out), "a path that already exists", "a new directory for the merged adapter")
    infos = []
    for p in paths:
        run = rundir.check_run_dir(p)
        info = rundir.read_meta(run / "run.json", {"task": str, "format": str, "labels": list})
        if info["task"] != "classification":
            raise UserError(str(p), f"a {info['task']} run", "classification LoRA runs")
        cfg_path = run / "final" / "adapter_config.json"
        peft_type = rundir.read_meta(cfg_path).get("peft_type") if cfg_path.is_file() else None
        if info["format"] != "peft" or peft_type != "LORA":
            raise UserError(str(p), f"a run whose final/ is {peft_type or 'a full model'}", "LoRA runs")
        infos.append(info)
    if len({str(i.get("base_model")) for i in infos}) > 1 or len({tuple(i["labels"]) for i in infos}) > 1:
        raise UserError("merge-adapters", "runs of different bases or label sets", "LoRA runs of one base")
    first = load_member(paths[0])
    tokenizer, labels, recipe = first.loaded.tokenizer, first.labels, first.loaded.recipe
    base, _ = classification.load_model(resolve(recipe.model.name), tokenizer, labels)
    names = [f"member{i}" for i in range(len(paths))]
    model = PeftModel.from_pretrained(base, str(Path(paths[0]) / "final"), adapter_name=names[0])
    for name, p in zip(names[1:], paths[1:], strict=True):
        model.load_adapter(str(Path(p) / "final"), adapter_name=name)
    kwargs = {"density": density} if density is not None else {}
    heads = _take_saved_modules(model, names)
    model.add_weighted_adapter(names, weights, "default", combination_type=method, **kwargs)
    _put_merged_modules(heads, names, weights, "default")
    model.set_adapter("default")
    for name in names:
        model.delete_adapter(name)
    model.eval()
    frames = split_frames(first)
    truth = {s: y_true(f, first) for s, f in frames.items()}
    dataset = {s: classification.encode(f, tokenizer, None, recipe.data) for s, f in frames.items()}
    logits = {
        s: classification.logits_of(model, tokenizer, d, pool_by=labels.pool) for s, d in dataset.items()
    }
    test = full_report(truth["test"], logits["test"], labels)
    summary = {
        "kind": f"merge_adapters:{method}",
        "members": [str(p) for p in paths],
        "weights": weights,
        "merged": {
            "validation": headline_metrics(truth["validation"], logits["validation"], labels),
            "test": {k: test[k] for k in ("accuracy", "f1_macro", "n")},
        },
    }
    info = infos[0]

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp / "final", selected_adapters=["default"])
        tokenizer.save_pretrained(tmp / "final")
        save_base_config(model, tmp / "final")
        merged = recipe.model_copy(update={"name": f"{recipe.name}-merged"})
        rundir.write_text(tmp / "recipe.yaml", recipe_to_yaml(merged))
        rundir.write_json(tmp / "run.json", {**info, "merged_from": summary["members"]})
        rundir.write_json(tmp / "eval.json", test)
        rundir.write_json(tmp / "merge.json", summary)

    target.parent.mkdir(parents=True, exist_ok=True)
    rundir.save_dir_atomically(target, save)
    return summary


def _take_saved_modules(model, names: list[str]) -> dict:
    """The members' modules_to_save copies (a classification head), all but the active one taken
    out of peft's wrappers: add_weighted_adapter refuses adapters that share one, and does not merge
    them anyway."""
    from peft.utils import ModulesToSaveWrapper

    taken = {}
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            copies = {n: module.modules_to_save[n] for n in names if n in module.modules_to_save}
            for n in names[1:]:
                if n in module.modules_to_save:
                    module.modules_to_save.pop(n)
            if copies:
                taken[module] = copies
    return taken


def _put_merged_modules(taken: dict, names: list[str], weights: list[float], adapter: str) -> None:
    """Give the merged adapter the weighted mean of the members' copies."""
    total = sum(weights)
    for wrapper, copies in taken.items():
        wrapper.update(adapter)
        merged = wrapper.modules_to_save[adapter]
        with torch.no_grad():
            for key, value in merged.state_dict().items():
                if torch.is_floating_point(value):
                    parts = [
                        w * copies[n].state_dict()[key].float() for n, w in zip(names, weights, strict=True)
                    ]
                    value.copy_((sum(parts) / total).to(value.dtype))
