"""Output ensembles: every member runs, their class distributions are combined (mean of logits,
mean of probabilities, vote, weighted mean). `build` evaluates and saves one; `Ensemble` loads it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from hybridtune import rundir
from hybridtune.ensemble.config import COMBINES, MANIFEST, check_weights
from hybridtune.ensemble.members import Member, load_member
from hybridtune.ensemble.shared import SharedTrunk
from hybridtune.errors import UserError
from hybridtune.inference import Loaded
from hybridtune.paths import inside
from hybridtune.tasks import classification, spec
from hybridtune.tasks.classification import full_report, prediction_frame, prediction_rows


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


def _inputs(member: Member) -> tuple:
    data = member.loaded.recipe.data
    return data.text_column, data.text_pair_column, data.label_column


def check_same_labels(members: list[Member]) -> None:
    """Members share the label set and read the same columns (every member scores the first
    member's rows: a member of another text column would find no text in them)."""
    first = members[0]
    for m in members[1:]:
        if _inputs(m) != _inputs(first):
            raise UserError(
                str(m.path),
                f"text / text pair / label columns {_inputs(m)}",
                f"the columns of {first.path}: {_inputs(first)} (members must read the same data)",
            )
        if m.labels.names != first.labels.names:
            raise UserError(
                str(m.path),
                f"labels {m.labels.names}",
                f"the labels of {first.path}: {first.labels.names} (members must share the label set)",
            )


def split_frames(member: Member, data: str | None = None, validation: bool = True) -> dict:
    """The rows ensembles are scored on: the first member's validation and test splits, or `data`.
    Ensembles, soups and merges are weighed and reported on validation: a member trained without a
    validation split (a few-shot run with `data.validation_shots: 0`, as setfit.yaml) is refused."""
    cfg, labels = member.loaded.recipe.data, member.labels
    if data is not None:
        return {"test": classification.eval_frame(data, cfg, labels)}
    splits = classification.load_splits(cfg)
    if not validation:
        return {"test": splits.test}
    if len(splits.validation) == 0:
        raise UserError(
            str(member.path),
            "a run with no validation split (data.validation_shots: 0)",
            "runs with a validation split (ensembles, soups and merges are weighed and reported on it)",
        )
    return {"validation": splits.validation, "test": splits.test}


def y_true(frame, member: Member) -> np.ndarray:
    index = {v: i for i, v in enumerate(member.labels.values)}
    return np.asarray([index[v] for v in frame[member.loaded.recipe.data.label_column]])


def member_logits(paths: list[str], frames: dict | None = None, data: str | None = None):
    """Load each member in turn (one in memory at a time) and collect its logits on each frame."""
    out: dict[str, list[np.ndarray]] = {}
    first = None
    for path in paths:
        m = load_member(path)
        if first is None:
            first = m
            frames = frames or split_frames(m, data)
        else:
            check_same_labels([first, m])
        for split, frame in frames.items():
            out.setdefault(split, []).append(m.logits(frame))
        del m
    return first, frames, out


def build(
    paths: list[str],
    out: str,
    combine_how: str = "mean_logits",
    weights: list[float] | None = None,
    copy_members: bool = True,
) -> dict:
    """Evaluate each member and the ensemble on the test split; save the ensemble to `out`.

    `weighted` without weights uses each member's validation accuracy as its weight."""
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
                split: headline_metrics(truth[split], logits[split][i], labels)
                for split in frames  # validation and test
            },
        }
        for i, p in enumerate(paths)
    ]
    if combine_how == "weighted" and weights is None:
        weights = [m["validation"]["accuracy"] for m in members]
    scores = {split: combine(logits[split], combine_how, weights) for split in frames}
    test = full_report(truth["test"], np.log(scores["test"] + 1e-12), labels)
    validation = headline_metrics(truth["validation"], np.log(scores["validation"] + 1e-12), labels)
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


def headline_metrics(truth: np.ndarray, logits: np.ndarray, labels) -> dict:
    """The headline of the classification report: accuracy, macro-F1, n."""
    report = full_report(truth, np.asarray(logits), labels)
    return {k: report[k] for k in spec("classification").headline}


def _copy_member(src: Path, dst: Path) -> None:
    """What a member needs to be re-loaded: its resolved recipe, run.json and final/."""
    dst.mkdir(parents=True)
    for name in ("recipe.yaml", "run.json", "params.json", "eval.json", "report.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    shutil.copytree(src / "final", dst / "final")


def read_manifest(root: Path) -> dict:
    """ensemble.json, checked: a combine method, a member path inside the dir for each member, and
    finite weights (one per member) where it has them (a hand-edited manifest is bad input)."""
    path = root / MANIFEST
    manifest = rundir.read_meta(path, {"combine": str, "members": list, "task": str})
    members, weights = manifest["members"], manifest.get("weights")
    if manifest["combine"] not in COMBINES:
        raise UserError(str(path), f"combine {manifest['combine'][:40]!r}", "one of " + ", ".join(COMBINES))
    if len(members) < 2 or not all(isinstance(m, str) and m for m in members):
        raise UserError(str(path), f"members {str(members)[:100]}", "two or more member dirs")
    for m in members:
        if not inside(root / m, root):
            raise UserError(str(path), f"member '{m[:100]}' outside the ensemble dir", "members/<i>")
    if weights is not None:
        if not isinstance(weights, list) or not all(
            isinstance(w, int | float) and not isinstance(w, bool) for w in weights
        ):
            raise UserError(str(path), f"weights {str(weights)[:100]}", "a list of numbers or null")
        check_weights([float(w) for w in weights], len(members), str(path))
    return manifest


class Ensemble:
    """A saved output ensemble, loaded: every member in memory, predictions combined.

    Members that share a frozen trunk (the embeddings and the bottom blocks bit-identical, e.g.
    head-only or top-k members of one base) compute it once per batch (`SharedTrunk`)."""

    def __init__(self, path: str | Path, share_trunk: bool = True):
        self.path = Path(path)
        manifest = read_manifest(self.path)
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

        frame = split_frames(self.members[0], data, validation=False)["test"]
        return full_report(y_true(frame, self.members[0]), np.log(self.probs(frame) + 1e-12), self.labels)

    def predict(self, texts: list[str], text_pairs: list[str] | None = None) -> list[dict]:

        frame = prediction_frame(self.data_cfg, texts, text_pairs)
        return prediction_rows(texts, self.probs(frame), self.labels.names)


def load(root: str | Path):
    """A saved ensemble dir as serve loads a model (inference.Loaded): its members combined by
    `Ensemble.predict`, on the CPU where its members are."""
    root = Path(root)
    ensemble = Ensemble(root)
    first = ensemble.members[0].loaded
    return Loaded(
        "classification",
        first.model,
        first.tokenizer,
        root.name,
        ensemble.labels,
        first.task,
        ensemble.data_cfg,
        first.recipe,
        root,
        predict=ensemble.predict,
    )
