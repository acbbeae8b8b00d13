"""Deep ensembles and model merging, over finished run dirs.

    hybridtune ensemble runs/a runs/b runs/c --combine mean_logits --out runs/ens   # K forwards
    hybridtune soup runs/a runs/b runs/c --greedy --out runs/soup                  # one model
    hybridtune merge-adapters runs/a runs/b --method cat --out runs/merged         # one adapter

- An **output ensemble** runs every member and combines their class distributions (mean of logits,
  mean of probabilities, majority vote, weighted mean). Members may differ in seed, strategy and even
  base model; they must share the label set. It is saved as a dir with `ensemble.json` (the manifest)
  and `members/<i>/` (each member's recipe, run.json and final/), and `eval` / `predict` / `serve`
  accept that dir like a run dir.
- A **soup** (Wortsman et al. 2022) averages the weights of members fine-tuned from the same base:
  uniform (all members) or greedy (members in order of validation score, each kept only if the
  validation metric does not drop). LoRA members are merged into their base first. The result is one
  plain model, saved as a normal run dir: single-model cost.
- **Adapter merging** combines LoRA members with peft's `add_weighted_adapter` (linear, cat, svd,
  ties, dare_ties, ...) into one adapter, saved as a normal peft run dir.

Classification runs only: a token-classification ensemble would need word-level alignment of the
members' sub-tokens, which this module does not do.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hybridtune import rundir
from hybridtune.errors import UserError

MANIFEST = "ensemble.json"
COMBINES = ("mean_logits", "mean_probs", "vote", "weighted")
MERGE_METHODS = ("cat", "linear", "svd", "ties", "ties_svd", "dare_ties", "dare_linear", "magnitude_prune")


class EnsembleConfig(BaseModel):
    """`ensemble:` in a recipe: train K members of the recipe and combine them in one run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    members: int | None = Field(
        None, ge=2, le=32, description="number of members (default 3; with a `vary` list: its length)"
    )
    vary: Literal["seed"] | list[list[str]] = Field(
        "seed",
        description="seed: member i trains with train.seed + i; or one list of key=value overrides per member",
    )
    combine: Literal[
        "mean_logits", "mean_probs", "vote", "weighted", "uniform_soup", "greedy_soup", "merge_adapters"
    ] = "mean_logits"
    weights: list[float] | None = Field(None, description="combine: weighted / merge_adapters")
    merge_method: Literal[MERGE_METHODS] = Field("cat", description="combine: merge_adapters (peft)")  # type: ignore[valid-type]
    shared_trunk: bool = Field(
        False,
        description="train the members together above their frozen trunk (head-only / top-k members): "
        "one trunk forward per batch for all of them",
    )

    @model_validator(mode="after")
    def _count(self) -> EnsembleConfig:
        if isinstance(self.vary, list):
            if self.members is not None and self.members != len(self.vary):
                raise ValueError(
                    f"ensemble.members: found {self.members}; expected {len(self.vary)}, "
                    "the number of override lists in ensemble.vary (or leave it out)"
                )
            if len(self.vary) < 2:
                raise ValueError("ensemble.vary: found 1 member; expected at least 2 override lists")
        return self

    @property
    def count(self) -> int:
        return len(self.vary) if isinstance(self.vary, list) else (self.members or 3)


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


# --------------------------------------------------------------------------------------------------
# combining the members' outputs


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def combine(logits: list[np.ndarray], how: str, weights: list[float] | None = None) -> np.ndarray:
    """The ensemble's class probabilities [n, classes] from each member's logits [n, classes].

    mean_logits: softmax of the mean logit; mean_probs: mean of the members' softmaxes; vote: the
    share of members voting for each class (ties broken by the mean probability); weighted: the
    weighted mean of the members' softmaxes (weights normalised to sum 1)."""
    stack = np.stack([np.asarray(x, dtype=np.float64) for x in logits])  # [k, n, c]
    probs = softmax(stack)
    if how == "mean_logits":
        return softmax(stack.mean(0))
    if how == "mean_probs":
        return probs.mean(0)
    if how == "vote":
        votes = np.eye(stack.shape[-1])[stack.argmax(-1)].mean(0)  # [n, c]
        tie_break = 1e-6 * probs.mean(0)
        shares = votes + tie_break
        return shares / shares.sum(-1, keepdims=True)
    if how == "weighted":
        w = np.asarray(weights, dtype=np.float64)
        return np.tensordot(w / w.sum(), probs, axes=1)
    raise ValueError(how)


def check_weights(weights: list[float] | None, k: int, where: str) -> None:
    if weights is None:
        return
    if len(weights) != k:
        raise UserError(where, f"{len(weights)} weights", f"one weight per member ({k})")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(where, f"weights {weights}", "non-negative weights with a positive sum")


# --------------------------------------------------------------------------------------------------
# members


@dataclass
class Member:
    """A finished classification run, loaded."""

    path: Path
    loaded: Any  # api.LoadedRun

    @property
    def labels(self):
        return self.loaded.labels

    def logits(self, frame, model: torch.nn.Module | None = None) -> np.ndarray:
        """Logits of the member (or of `model`, another set of weights read with the member's
        tokenizer and data settings) on the rows of `frame`."""
        from hybridtune.tasks.classification import encode, logits_of

        dataset = encode(frame, self.loaded.tokenizer, None, self.loaded.recipe.data)
        return logits_of(model or self.loaded.model, self.loaded.tokenizer, dataset)


def load_member(path: str | Path) -> Member:
    from hybridtune import api

    if is_ensemble(path):
        raise UserError(str(path), "an ensemble dir", "a run dir (ensembles of ensembles are not supported)")
    loaded = api.load_run(str(path))
    if loaded.recipe.task != "classification":
        raise UserError(
            str(path), f"a {loaded.recipe.task} run", "classification runs (ensembles combine class scores)"
        )
    return Member(Path(path), loaded)


def check_same_labels(members: list[Member]) -> None:
    first = members[0]
    for m in members[1:]:
        if m.labels.names != first.labels.names:
            raise UserError(
                str(m.path),
                f"labels {m.labels.names}",
                f"the labels of {first.path}: {first.labels.names} (members must share the label set)",
            )


def split_frames(member: Member, data: str | None = None) -> dict:
    """The rows ensembles are scored on: the first member's validation and test splits, or `data`."""
    from hybridtune.tasks import classification

    cfg, labels = member.loaded.recipe.data, member.labels
    if data is not None:
        return {"test": classification.eval_frame(data, cfg, labels)}
    splits = classification.load_splits(cfg)
    return {"validation": splits.validation, "test": splits.test}


def y_true(frame, member: Member) -> np.ndarray:
    index = {v: i for i, v in enumerate(member.labels.values)}
    return np.asarray([index[v] for v in frame[member.loaded.recipe.data.label_column]])


def member_logits(paths: list[str], frames: dict | None = None, data: str | None = None):
    """Load each member in turn (one in memory at a time) and collect its logits on each frame."""
    out: dict[str, list[np.ndarray]] = {}
    first = None
    names = None
    for path in paths:
        m = load_member(path)
        if first is None:
            first, names = m, m.labels.names
            frames = frames or split_frames(m, data)
        elif m.labels.names != names:
            check_same_labels([first, m])
        for split, frame in frames.items():
            out.setdefault(split, []).append(m.logits(frame))
        del m
    return first, frames, out


# --------------------------------------------------------------------------------------------------
# output ensembles


def build(
    paths: list[str],
    out: str,
    combine_how: str = "mean_logits",
    weights: list[float] | None = None,
    copy_members: bool = True,
) -> dict:
    """Evaluate each member and the ensemble on the test split; save the ensemble to `out`.

    `weighted` without weights uses each member's validation accuracy as its weight."""
    from hybridtune.tasks.classification import full_report

    if len(paths) < 2:
        raise UserError("ensemble", f"{len(paths)} member", "at least 2 run dirs")
    if combine_how not in COMBINES:
        raise UserError("--combine", repr(combine_how), "one of " + ", ".join(COMBINES))
    check_weights(weights, len(paths), "--weights")
    target = Path(out)
    if copy_members and target.exists():
        raise UserError(str(out), "a path that already exists", "a new directory for the ensemble")
    first, frames, logits = member_logits(paths)
    labels = first.labels
    truth = {split: y_true(frame, first) for split, frame in frames.items()}
    members = [
        {
            "path": str(p),
            **{
                split: _metrics(truth[split], logits[split][i], labels)
                for split in frames  # validation and test
            },
        }
        for i, p in enumerate(paths)
    ]
    if combine_how == "weighted" and weights is None:
        weights = [m["validation"]["accuracy"] for m in members]
    scores = {split: combine(logits[split], combine_how, weights) for split in frames}
    test = full_report(truth["test"], np.log(scores["test"] + 1e-12), labels)
    validation = _metrics(truth["validation"], np.log(scores["validation"] + 1e-12), labels)
    best = max(members, key=lambda m: m["validation"]["accuracy"])
    summary = {
        "kind": "output",
        "combine": combine_how,
        "weights": weights,
        "members": members,
        "ensemble": {"validation": validation, "test": {k: test[k] for k in ("accuracy", "f1_macro", "n")}},
        # the gain over the member a user would have picked: the best on validation
        "best_member": best["path"],
        "gain_over_best_member": test["accuracy"] - best["test"]["accuracy"],
        "gain_over_mean_member": test["accuracy"] - float(np.mean([m["test"]["accuracy"] for m in members])),
    }

    def save(tmp: Path) -> None:
        names = []
        for i, p in enumerate(paths):
            name = f"members/{i}"
            if copy_members:
                _copy_member(Path(p), tmp / name)
            else:
                name = str(Path(p).resolve().relative_to(target.resolve()))
            names.append(name)
        manifest = {
            "kind": "output",
            "task": "classification",
            "combine": combine_how,
            "weights": weights,
            "members": names,
            "labels": labels.names,
            "label_values": labels.values,
        }
        rundir.write_json(tmp / MANIFEST, manifest)
        rundir.write_json(tmp / "eval.json", test)
        rundir.write_json(tmp / "ensemble_report.json", summary)

    if copy_members:
        target.parent.mkdir(parents=True, exist_ok=True)
        rundir.save_dir_atomically(target, save)
    else:  # members live inside `out` already (a recipe-trained ensemble): write the files in place
        save(target)
    return summary


def _metrics(truth: np.ndarray, logits: np.ndarray, labels) -> dict:
    """The headline of the classification report: accuracy, macro-F1, n."""
    from hybridtune.tasks.classification import HEADLINE, full_report

    report = full_report(truth, np.asarray(logits), labels)
    return {k: report[k] for k in HEADLINE}


def _copy_member(src: Path, dst: Path) -> None:
    """What a member needs to be re-loaded: its resolved recipe, run.json and final/."""
    dst.mkdir(parents=True)
    for name in ("recipe.yaml", "run.json", "params.json", "eval.json", "report.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    shutil.copytree(src / "final", dst / "final")


class Ensemble:
    """A saved output ensemble, loaded: every member in memory, predictions combined.

    Members that share a frozen trunk (the embeddings and the bottom blocks bit-identical, e.g.
    head-only or top-k members of one base) compute it once per batch (`SharedTrunk`)."""

    def __init__(self, path: str | Path, share_trunk: bool = True):
        self.path = Path(path)
        manifest = rundir.read_json(self.path / MANIFEST)
        self.combine, self.weights = manifest["combine"], manifest["weights"]
        self.members = [load_member(self.path / m) for m in manifest["members"]]
        check_same_labels(self.members)
        self.labels = self.members[0].labels
        self.data_cfg = self.members[0].loaded.recipe.data
        self.shared = SharedTrunk.of(self.members) if share_trunk else None

    def probs(self, frame) -> np.ndarray:
        if self.shared is not None:
            return combine(self.shared.logits(frame), self.combine, self.weights)
        return combine([m.logits(frame) for m in self.members], self.combine, self.weights)

    def evaluate(self, data: str | None = None) -> dict:
        from hybridtune.tasks.classification import full_report

        frame = split_frames(self.members[0], data)["test"]
        return full_report(y_true(frame, self.members[0]), np.log(self.probs(frame) + 1e-12), self.labels)

    def predict(self, texts: list[str], text_pairs: list[str] | None = None) -> list[dict]:
        from hybridtune.tasks.classification import prediction_frame, prediction_rows

        frame = prediction_frame(self.data_cfg, texts, text_pairs)
        return prediction_rows(texts, self.probs(frame), self.labels.names)


class Replay(torch.nn.Module):
    """Stands in for a trunk block of a follower member: returns what the leader's block returned
    for the current batch, whatever it is given."""

    def __init__(self, cache: dict, index: int):
        super().__init__()
        self.cache, self.index = cache, index

    def forward(self, *args, **kwargs):
        return self.cache[self.index]


def share_trunk(models: list[torch.nn.Module], depth: int, cache: dict) -> tuple[list, list, str]:
    """Make the followers (models[1:]) replay the leader's bottom `depth` blocks: hooks on the
    leader's blocks record each batch's outputs into `cache`, and the followers' blocks are replaced
    by `Replay` modules reading it. Returns the hook handles, the followers' own blocks and the
    blocks' path, to undo it."""
    from hybridtune.model.anatomy import Anatomy, unwrap

    path = Anatomy.of(models[0]).blocks_path

    def recorder(index: int):
        def hook(module, args, output):
            cache[index] = output

        return hook

    hooks = [
        block.register_forward_hook(recorder(i))
        for i, block in enumerate(unwrap(models[0]).get_submodule(path)[:depth])
    ]
    originals = []
    for model in models[1:]:
        blocks = unwrap(model).get_submodule(path)
        originals.append([blocks[i] for i in range(depth)])
        for i in range(depth):
            blocks[i] = Replay(cache, i)
    return hooks, originals, path


class SharedTrunk:
    """Members whose embeddings and bottom `depth` blocks are bit-identical run those blocks once per
    batch: the first member (the leader) runs whole and its trunk blocks record their outputs; in the
    other members those blocks are replaced by `Replay` modules (`share_trunk`). Generic over
    architectures: it only relies on the blocks being called in order, once each, per forward (true
    of every HF model whose blocks the anatomy finds). The cost of K members is one trunk + K tops."""

    def __init__(self, members: list[Member], depth: int):
        self.members, self.depth = members, depth
        self.cache: dict[int, Any] = {}
        share_trunk([m.loaded.model for m in members], depth, self.cache)

    @classmethod
    def of(cls, members: list[Member]) -> SharedTrunk | None:
        """A shared trunk when the members have one (same tokenizer and text settings, embeddings and
        at least one bottom block identical); None otherwise."""
        first = members[0].loaded
        for m in members[1:]:
            if (
                m.loaded.recipe.data.max_length != first.recipe.data.max_length
                or m.loaded.tokenizer.get_vocab() != first.tokenizer.get_vocab()
            ):
                return None
        depth = trunk_depth([m.loaded.model for m in members])
        if depth < 1:
            return None
        return cls(members, depth)

    @torch.no_grad()
    def logits(self, frame, batch_size: int = 128) -> list[np.ndarray]:
        from hybridtune.tasks.classification import collator, encode

        leader = self.members[0].loaded
        dataset = encode(frame, leader.tokenizer, None, leader.recipe.data)
        collate = collator(leader.tokenizer)
        features = [dict(row) for row in dataset]
        out: list[list[np.ndarray]] = [[] for _ in self.members]
        for start in range(0, len(features), batch_size):
            batch = collate(features[start : start + batch_size])
            for i, m in enumerate(self.members):  # the leader first: it fills the cache
                out[i].append(m.loaded.model(**batch).logits.float().cpu().numpy())
            self.cache.clear()
        return [np.concatenate(x) for x in out]


def trunk_depth(models: list[torch.nn.Module]) -> int:
    """How many bottom blocks all models share bit for bit, with their embeddings (0: none)."""
    from hybridtune.model.anatomy import Anatomy, canonical

    anatomy = Anatomy.of(models[0])
    by_slot: list[dict[str, dict[str, torch.Tensor]]] = []
    for model in models:
        slots: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in model.named_parameters():
            slots.setdefault(anatomy.slot_of(canonical(name)), {})[name] = p
        by_slot.append(slots)

    def same(slot: str) -> bool:
        first = by_slot[0].get(slot, {})
        return all(
            s.get(slot, {}).keys() == first.keys() and all(torch.equal(s[slot][k], first[k]) for k in first)
            for s in by_slot[1:]
        )

    if not same("embeddings"):
        return 0
    depth = 0
    while depth < anatomy.num_blocks and same(f"block.{depth}"):
        depth += 1
    return depth


# --------------------------------------------------------------------------------------------------
# weight averaging: soups


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
    from hybridtune.recipe import recipe_to_yaml
    from hybridtune.tasks.classification import full_report

    if len(paths) < 2:
        raise UserError("soup", f"{len(paths)} member", "at least 2 run dirs")
    target = Path(out)
    if target.exists():
        raise UserError(str(out), "a path that already exists", "a new directory for the soup")
    members = [load_member(p) for p in paths]
    check_same_labels(members)
    first = members[0]
    bases = {rundir.read_json(m.path / "run.json")["base_model"] for m in members}
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
        return _metrics(truth[split], first.logits(frames[split], shell), first.labels)

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
    validation = _metrics(truth["validation"], first.logits(frames["validation"], shell), first.labels)
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


# --------------------------------------------------------------------------------------------------
# adapter merging (peft)


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

    from hybridtune.model.loading import resolve
    from hybridtune.recipe import recipe_to_yaml
    from hybridtune.tasks import classification
    from hybridtune.tasks.classification import full_report

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
        info = rundir.read_json(run / "run.json")
        if info["task"] != "classification":
            raise UserError(str(p), f"a {info['task']} run", "classification LoRA runs")
        cfg_path = run / "final" / "adapter_config.json"
        peft_type = rundir.read_json(cfg_path).get("peft_type") if cfg_path.is_file() else None
        if info["format"] != "peft" or peft_type != "LORA":
            raise UserError(str(p), f"a run whose final/ is {peft_type or 'a full model'}", "LoRA runs")
        infos.append(info)
    if len({i["base_model"] for i in infos}) > 1 or len({tuple(i["labels"]) for i in infos}) > 1:
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
    logits = {s: classification.logits_of(model, tokenizer, d) for s, d in dataset.items()}
    test = full_report(truth["test"], logits["test"], labels)
    summary = {
        "kind": f"merge_adapters:{method}",
        "members": [str(p) for p in paths],
        "weights": weights,
        "merged": {
            "validation": _metrics(truth["validation"], logits["validation"], labels),
            "test": {k: test[k] for k in ("accuracy", "f1_macro", "n")},
        },
    }
    info = infos[0]

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp / "final", selected_adapters=["default"])
        tokenizer.save_pretrained(tmp / "final")
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


# --------------------------------------------------------------------------------------------------
# one recipe, K members: `ensemble:` in a recipe


def member_recipes(recipe) -> list:
    """The members' recipes: this recipe without `ensemble`, one seed or override list each; all
    validated (and checked against the combine method) before anything trains."""
    from hybridtune.recipe import apply_override, validate_recipe

    cfg = recipe.ensemble
    base = recipe.model_dump(mode="json")
    base["ensemble"] = None
    out = []
    for i in range(cfg.count):
        raw = copy.deepcopy(base)
        raw["name"] = f"{recipe.name}-m{i}"
        if cfg.vary == "seed":
            raw["train"]["seed"] = recipe.train.seed + i
        else:
            for item in cfg.vary[i]:
                apply_override(raw, item)
        out.append(validate_recipe(raw, f"ensemble.vary[{i}]" if cfg.vary != "seed" else "ensemble"))
    if recipe.task != "classification":
        raise UserError(
            "ensemble", f"task {recipe.task}", "task classification (ensembles combine class scores)"
        )
    if cfg.combine in ("uniform_soup", "greedy_soup", "merge_adapters"):
        names = {r.model.name for r in out}
        if len(names) > 1:
            raise UserError(
                "ensemble.vary",
                f"members of different base models {sorted(names)}",
                f"one base for {cfg.combine}",
            )
    if cfg.combine == "merge_adapters":
        for i, r in enumerate(out):
            if r.peft is None or r.peft.method not in ("lora", "dora"):
                raise UserError(
                    f"ensemble.vary[{i}]" if cfg.vary != "seed" else "peft.method",
                    f"a member without LoRA ({r.peft.method if r.peft else 'no peft'})",
                    "LoRA members for combine: merge_adapters",
                )
    check_weights(cfg.weights, cfg.count, "ensemble.weights")
    return out


def train(recipe) -> dict:
    """Train every member (each a normal run under <run>/members/<i>), combine them, and write the
    run's report.json / metrics.jsonl as one strategy of a compare would have them."""
    from hybridtune import api
    from hybridtune.recipe import recipe_to_yaml

    cfg = recipe.ensemble
    if cfg.shared_trunk:
        return train_joint(recipe)
    members = member_recipes(recipe)
    run = rundir.run_dir_path(recipe.output.dir, recipe.output.name, recipe.name)
    rundir.new_run_dir(run)
    rundir.write_text(run / "recipe.yaml", recipe_to_yaml(recipe))
    summaries = []
    for i, member in enumerate(members):
        member.output.dir, member.output.name = str(run / "members"), str(i)
        summaries.append(api.train(member))
    paths = [s["run_dir"] for s in summaries]
    if cfg.combine in COMBINES:
        result = build(paths, str(run), cfg.combine, cfg.weights, copy_members=False)
        test, validation = result["ensemble"]["test"], result["ensemble"]["validation"]
    else:
        tmp = run / ".combined"
        if cfg.combine == "merge_adapters":
            result = merge_adapters(paths, str(tmp), cfg.merge_method, cfg.weights)
            test, validation = result["merged"]["test"], result["merged"]["validation"]
        else:
            result = soup(paths, str(tmp), greedy=cfg.combine == "greedy_soup")
            test, validation = result["soup"]["test"], result["soup"]["validation"]
        for item in tmp.iterdir():
            if item.name != "recipe.yaml":  # the run keeps the ensemble recipe
                os.replace(item, run / item.name)
        shutil.rmtree(tmp)
    seconds = sum(s["train_seconds"] for s in summaries)
    samples = sum((s["train_samples_per_second"] or 0) * s["train_seconds"] for s in summaries)
    tokens = sum((s["train_tokens_per_second"] or 0) * s["train_seconds"] for s in summaries)
    trainable, total = sum(s["trainable"] for s in summaries), sum(s["total"] for s in summaries)
    steps = sum(s["steps"] for s in summaries)
    # one validation point: the combined model, once every member has trained
    with (run / "metrics.jsonl").open("w", encoding="utf-8") as f:
        f.write(
            json.dumps(
                {
                    "step": steps,
                    "epoch": summaries[0]["epochs"],
                    "time_s": round(seconds, 3),
                    **{f"eval_{k}": v for k, v in validation.items() if k != "n"},
                }
            )
            + "\n"
        )
    summary = {
        "run_dir": str(run),
        "recipe": recipe.name,
        "test": test,
        "best_validation": validation["accuracy"],
        "best_checkpoint": None,
        "combine": cfg.combine,
        "members": [{"run_dir": s["run_dir"], "test": s["test"]} for s in summaries],
        # what was trained: every member's parameters, time and samples
        "trainable": trainable,
        "total": total,
        "trainable_pct": round(100 * trainable / total, 4),
        "train_seconds": round(seconds, 2),
        "train_samples_per_second": round(samples / seconds, 3) if seconds else None,
        "train_tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "cuda_peak_mib": max((s["cuda_peak_mib"] or 0) for s in summaries) or None,
        "metric": "accuracy",
        "best_validation_metric": "accuracy",
        "epochs": summaries[0]["epochs"],
        "steps": steps,
        "precision": summaries[0]["precision"],
        "gain_over_best_member": test["accuracy"] - max(s["test"]["accuracy"] for s in summaries),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    member_params = [rundir.read_json(Path(p) / "params.json") for p in paths]
    rundir.write_json(
        run / "params.json",
        {"trainable": trainable, "total": total, "members": member_params},
    )
    rundir.write_json(run / "report.json", summary)
    return summary


# --------------------------------------------------------------------------------------------------
# shared-trunk training: K members above one frozen trunk, trained together


class JointMembers(torch.nn.Module):
    """K classifiers trained as one module: the trunk they share (frozen, bit-identical) runs once
    per batch through the leader; the loss is the sum of the members' losses (each member's
    gradients are its own), the logits the mean of theirs (the ensemble's validation score)."""

    def __init__(self, models: list[torch.nn.Module], depth: int):
        from hybridtune.model.anatomy import unwrap

        super().__init__()
        self.members = torch.nn.ModuleList(models)
        self.depth = depth
        self.cache: dict[int, Any] = {}
        self.config = unwrap(models[0]).config  # what Trainer reads of a model
        # the followers' own trunk blocks are kept to be put back before the members are saved
        self._hooks, self._trunks, self._path = share_trunk(models, depth, self.cache)

    def forward(self, labels=None, **batch):
        from transformers.modeling_outputs import SequenceClassifierOutput

        outputs = [m(**batch, labels=labels) for m in self.members]  # the leader first
        self.cache.clear()
        loss = sum(o.loss for o in outputs) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=torch.stack([o.logits for o in outputs]).mean(0))

    def separate(self) -> list[torch.nn.Module]:
        """The members as independent models again (each with its own trunk blocks)."""
        from hybridtune.model.anatomy import unwrap

        for hook in self._hooks:
            hook.remove()
        for model, trunk in zip(self.members[1:], self._trunks, strict=True):
            blocks = unwrap(model).get_submodule(self._path)
            for i, block in enumerate(trunk):
                blocks[i] = block
        return list(self.members)


def frozen_trunk_depth(models: list[torch.nn.Module]) -> int:
    """The bottom blocks (with the embeddings) that are frozen and bit-identical in every model."""
    from hybridtune.model.anatomy import Anatomy, canonical

    anatomy = Anatomy.of(models[0])
    frozen: dict[str, bool] = {}
    for model in models:
        for name, p in model.named_parameters():
            slot = anatomy.slot_of(canonical(name))
            frozen[slot] = frozen.get(slot, True) and not p.requires_grad
    if not frozen.get("embeddings", True):
        return 0
    depth = trunk_depth(models)
    frozen_depth = 0
    while frozen_depth < depth and frozen.get(f"block.{frozen_depth}", True):
        frozen_depth += 1
    return frozen_depth


def train_joint(recipe) -> dict:
    """`ensemble: {shared_trunk: true}`: the members (seeds) train together above their frozen
    trunk, one trunk forward per batch; each is then saved as a normal run under members/<i>."""
    from hybridtune import api
    from hybridtune.recipe import recipe_to_yaml
    from hybridtune.strategy.plan import Plan
    from hybridtune.tasks import classification
    from hybridtune.train.engine import make_trainer, resolve_precision, training_arguments

    cfg = recipe.ensemble
    members = member_recipes(recipe)
    if cfg.vary != "seed" or recipe.stages is not None or cfg.combine not in COMBINES:
        raise UserError(
            "ensemble.shared_trunk",
            f"vary {cfg.vary!r}, combine {cfg.combine}, stages {'set' if recipe.stages else 'none'}",
            "vary: seed, an output combine (mean_logits, mean_probs, vote, weighted) and no stages "
            "(the trunk must stay frozen and the same in every member)",
        )
    preps = [api.prepare(r) for r in members]
    models = [p.model for p in preps]
    depth = frozen_trunk_depth(models)
    if depth < 1:
        raise UserError(
            "ensemble.shared_trunk",
            "members without a frozen trunk (their embeddings or bottom block train)",
            "a freeze that keeps the embeddings and at least the bottom block frozen (head-only, top-k)",
        )
    first = preps[0]
    run = rundir.run_dir_path(recipe.output.dir, recipe.output.name, recipe.name)
    rundir.new_run_dir(run)
    rundir.write_text(run / "recipe.yaml", recipe_to_yaml(recipe))
    joint = JointMembers(models, depth)
    plan = Plan(
        first.plan.steps_per_epoch,
        first.plan.total_steps,
        {f"members.{i}.{n}": v for i, p in enumerate(preps) for n, v in p.plan.lrs.items()},
        {f"members.{i}.{n}" for i, p in enumerate(preps) for n in p.plan.base_names},
        None,
        recipe.schedule,
    )
    args = training_arguments(recipe.train, recipe.output, run / "checkpoints")
    args.remove_unused_columns = False  # the joint forward takes **batch: keep the tokenized columns
    trainer = make_trainer(
        joint,
        first.tokenizer,
        first.datasets,
        members[0],
        args,
        run,
        classification.make_compute_metrics(first.labels),
        plan=plan,
        collator=classification.collator(first.tokenizer),
    )
    started = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - started
    separated = joint.separate()
    paths = []
    for i, (prep, model) in enumerate(zip(preps, separated, strict=True)):
        member_run = run / "members" / str(i)
        rundir.new_run_dir(member_run)
        rundir.write_text(member_run / "recipe.yaml", recipe_to_yaml(prep.recipe))
        rundir.write_json(
            member_run / "run.json",
            {
                "task": "classification",
                "labels": prep.labels.names,
                "label_values": prep.labels.values,
                "base_model": api.resolve(prep.recipe.model.name),
                "format": "peft" if hasattr(model, "peft_config") else "model",
                "trained_with_shared_trunk": str(run),
            },
        )
        rundir.write_json(member_run / "params.json", prep.params)

        def save(tmp: Path, model=model, prep=prep) -> None:
            model.save_pretrained(tmp)
            prep.tokenizer.save_pretrained(tmp)

        rundir.save_dir_atomically(member_run / "final", save)
        test = classification.report(model, prep.tokenizer, prep.datasets["test"], prep.labels)
        rundir.write_json(member_run / "eval.json", test)
        rundir.write_json(
            member_run / "report.json", {"test": {k: test[k] for k in ("accuracy", "f1_macro", "n")}}
        )
        paths.append(str(member_run))
    result = build(paths, str(run), cfg.combine, cfg.weights, copy_members=False)
    test, validation = result["ensemble"]["test"], result["ensemble"]["validation"]
    trainable = sum(p.params["trainable"] for p in preps)
    total = sum(p.params["total"] for p in preps)
    summary = {
        "run_dir": str(run),
        "recipe": recipe.name,
        "test": test,
        "best_validation": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "combine": cfg.combine,
        "shared_trunk_blocks": depth,
        "members": [{"run_dir": m["path"], "test": m["test"]} for m in result["members"]],
        "trainable": trainable,
        "total": total,
        "trainable_pct": round(100 * trainable / total, 4),
        "train_seconds": round(seconds, 2),
        "train_samples_per_second": out.metrics.get("train_samples_per_second"),
        "train_tokens_per_second": round(
            api.train_tokens(first.datasets["train"], trainer.state.epoch) / seconds, 1
        ),
        "cuda_peak_mib": None,
        "metric": "accuracy",
        "best_validation_metric": args.metric_for_best_model,
        "epochs": trainer.state.epoch,
        "steps": trainer.state.global_step,
        "precision": resolve_precision(recipe.train.precision),
        "gain_over_best_member": test["accuracy"] - max(m["test"]["accuracy"] for m in result["members"]),
        "ensemble_validation": validation,
    }
    rundir.write_json(
        run / "params.json", {"trainable": trainable, "total": total, "members": [p.params for p in preps]}
    )
    rundir.write_json(run / "report.json", summary)
    return summary
