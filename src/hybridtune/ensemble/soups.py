"""Weight averaging: uniform and greedy soups (Wortsman et al. 2022) of runs of one base model."""

from __future__ import annotations

from pathlib import Path

import torch

from hybridtune import rundir
from hybridtune.ensemble.members import Member, load_member
from hybridtune.ensemble.outputs import check_same_labels, headline_metrics, split_frames, y_true
from hybridtune.errors import UserError
from hybridtune.recipe import recipe_to_yaml
from hybridtune.tasks.classification import full_report


def _plain_model(member: Member) -> torch.nn.Module:
    """The member as one plain model: a LoRA member merged into its base (W + BA)."""
    recipe = member.loaded.recipe
    extra = [key for key in ("adapters", "soft_prompt") if getattr(recipe, key) is not None]
    if extra:
        raise UserError(
            str(member.path),
            f"a run with {' and '.join(extra)}, weights that live outside the model",
            "runs whose final/ is a plain model or a LoRA adapter (full, freeze, bitfit, lora, ...)",
        )
    model = member.loaded.model
    if hasattr(model, "peft_config"):
        kinds = {c.peft_type.value for c in model.peft_config.values()}
        if not kinds <= {"LORA", "ADALORA", "IA3"}:
            raise UserError(
                str(member.path),
                f"a {'/'.join(sorted(kinds))} adapter, which cannot be merged into the base weights",
                "full / freeze / LoRA / IA3 runs",
            )
        model = model.merge_and_unload()
    return model


def _average(states: list[dict]) -> dict:
    out = {}
    for key, value in states[0].items():
        if torch.is_floating_point(value):
            out[key] = torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
        else:
            out[key] = value
    return out


def soup(paths: list[str], out: str, greedy: bool = False) -> dict:
    """A uniform or greedy soup of runs fine-tuned from one base; saved as a normal run dir."""
    if len(paths) < 2:
        raise UserError("soup", f"{len(paths)} member", "at least 2 run dirs")
    target = Path(out)
    if target.exists():
        raise UserError(str(out), "a path that already exists", "a new directory for the soup")
    members = [load_member(p) for p in paths]
    check_same_labels(members)
    first = members[0]
    bases = {str(rundir.read_meta(m.path / "run.json").get("base_model")) for m in members}
    if len(bases) > 1:
        raise UserError(
            "soup", f"members fine-tuned from different bases {sorted(bases)}", "members of one base model"
        )
    frames = split_frames(first)
    truth = {s: y_true(f, first) for s, f in frames.items()}
    models = [_plain_model(m) for m in members]
    states = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    for m, s in zip(members[1:], states[1:], strict=True):
        if s.keys() != states[0].keys() or any(s[k].shape != states[0][k].shape for k in s):
            raise UserError(str(m.path), "weights of another shape", f"the architecture of {first.path}")
    shell = models[0]  # its weights are replaced by each candidate soup in turn

    def score(state: dict, split: str = "validation") -> dict:
        shell.load_state_dict(state)
        return headline_metrics(truth[split], first.logits(frames[split], shell), first.labels)

    scored = []
    for i, s in enumerate(states):
        scored.append({"path": str(paths[i]), "validation": score(s), "test": score(s, "test")})
    order = sorted(range(len(states)), key=lambda i: -scored[i]["validation"]["accuracy"])
    if greedy:
        ingredients = [order[0]]
        best = scored[order[0]]["validation"]["accuracy"]
        for i in order[1:]:
            candidate = score(_average([states[j] for j in [*ingredients, i]]))["accuracy"]
            if candidate >= best:  # Wortsman et al.: keep an ingredient unless it hurts validation
                ingredients.append(i)
                best = candidate
    else:
        ingredients = list(range(len(states)))
    state = _average([states[j] for j in ingredients])
    shell.load_state_dict(state)
    validation = headline_metrics(
        truth["validation"], first.logits(frames["validation"], shell), first.labels
    )
    test = full_report(truth["test"], first.logits(frames["test"], shell), first.labels)
    summary = {
        "kind": "greedy_soup" if greedy else "uniform_soup",
        "members": scored,
        "ingredients": [str(paths[i]) for i in ingredients],
        "soup": {"validation": validation, "test": {k: test[k] for k in ("accuracy", "f1_macro", "n")}},
        "best_member": scored[order[0]]["path"],
        "gain_over_best_member": test["accuracy"] - scored[order[0]]["test"]["accuracy"],
    }
    recipe = first.loaded.recipe.model_copy(update={"peft": None, "name": f"{first.loaded.recipe.name}-soup"})
    info = rundir.read_json(first.path / "run.json")

    def save(tmp: Path) -> None:
        shell.save_pretrained(tmp / "final")
        first.loaded.tokenizer.save_pretrained(tmp / "final")
        rundir.write_text(tmp / "recipe.yaml", recipe_to_yaml(recipe))
        rundir.write_json(tmp / "run.json", {**info, "format": "model", "soup": summary["ingredients"]})
        rundir.write_json(tmp / "eval.json", test)
        rundir.write_json(tmp / "soup.json", summary)

    target.parent.mkdir(parents=True, exist_ok=True)
    rundir.save_dir_atomically(target, save)
    return summary
