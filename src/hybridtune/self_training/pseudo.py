"""A teacher's pseudo-labels: its class probabilities for the unlabelled texts, and which of them join.

Selection (Lee 2013, "Pseudo-Label"; Xie et al. 2020, "Self-training with Noisy Student", §3): a text
joins with the teacher's most probable class as a hard label when that class's probability is at
least `threshold`. Hard labels, not soft ones: a pseudo-labelled row is then an ordinary training row,
so every strategy trains on it unchanged (Noisy Student found soft and hard labels to work alike on
in-domain data).

Class balance, `per_class: balanced`: every class gets as many texts as the class with the fewest
confident texts, each class's most confident first. Noisy Student balances to a fixed count per
class, duplicating texts of the classes short of it and keeping the most confident of the others;
we keep only the cutting half: duplicating a class's few pseudo-labels would repeat their errors,
and cutting alone already keeps the pseudo-labelled set from shifting the class prior towards the
classes the teacher is most sure of (the failure Zou et al. 2018's class-balanced self-training
addresses). A class with no confident text makes the round add nothing (the report warns).
`max_per_round` caps a round: balanced, `max_per_round // classes` per class; otherwise the most
confident overall. Ties in confidence go to the earlier text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from hybridtune import rundir
from hybridtune.ensemble.config import MANIFEST, is_ensemble
from hybridtune.errors import UserError

CHUNK = 8192  # texts per prediction call: bounds the memory of encoding a large unlabelled set
KEY = "self_training.teacher"


def check_teacher(path: str, task: str, labels) -> None:
    """A finished run or ensemble dir of `task` with the recipe's label set (names and values, in
    order: its probabilities are read by class index), else a UserError naming `self_training.teacher`."""
    root = Path(path)
    if is_ensemble(root):
        meta = root / MANIFEST
    else:
        try:
            meta = rundir.check_run_dir(path) / "run.json"
        except UserError as e:
            raise UserError(KEY, f"'{path}': {e.found}", e.expected) from None
    info = rundir.read_meta(meta, {"task": str})
    if info["task"] != task:
        raise UserError(KEY, f"'{path}', a {info['task']} run", f"a {task} run (the recipe's task)")
    names, values = info.get("labels"), info.get("label_values")
    if names != labels.names or values != labels.values:
        raise UserError(
            KEY,
            f"'{path}' with the labels {names} (values {values})",
            f"the recipe's labels {labels.names} (values {labels.values}), in that order",
        )


def teacher_probs(path: str | Path, texts: list[str]) -> np.ndarray:
    """[texts, classes]: the probabilities the teacher's own prediction path gives (`hybridtune
    predict`'s: the task's `predict` on the run's model, LoRA folded in, under the run's precision;
    an ensemble's combination), in the teacher's label order."""
    from hybridtune.tasks.classification import prediction_frame

    if is_ensemble(path):
        from hybridtune.ensemble import Ensemble

        ensemble = Ensemble(path)
        return np.concatenate(
            [
                ensemble.probs(prediction_frame(ensemble.data_cfg, texts[i : i + CHUNK]))
                for i in range(0, len(texts), CHUNK)
            ]
        )
    from hybridtune.export import merged_for_inference
    from hybridtune.inference import load_run, place
    from hybridtune.train.precision import autocast

    loaded = load_run(str(path))
    model = place(merged_for_inference(loaded.model), precision="fp32")  # on the GPU when there is one
    names = loaded.labels.names
    out = []
    with autocast(loaded.recipe.train.precision):
        for i in range(0, len(texts), CHUNK):
            rows = loaded.task.predict(
                model, loaded.tokenizer, loaded.labels, loaded.recipe.data, texts[i : i + CHUNK]
            )
            out.append(np.array([[row["probs"][n] for n in names] for row in rows], dtype=np.float64))
    return np.concatenate(out) if out else np.zeros((0, len(names)))


def select(probs: np.ndarray, threshold: float, per_class: str, max_per_round: int | None) -> list[int]:
    """The indices of the texts that join (sorted), by the rule of the module docstring."""
    confidence, predicted = probs.max(1), probs.argmax(1)
    classes = probs.shape[1]
    ranked = []  # per class: its confident texts, most confident first (ties: the earlier text)
    for c in range(classes):
        idx = np.flatnonzero((predicted == c) & (confidence >= threshold))
        ranked.append(idx[np.lexsort((idx, -confidence[idx]))])
    if per_class == "balanced":
        n = min(len(r) for r in ranked)
        if max_per_round is not None:
            n = min(n, max_per_round // classes)
        chosen = np.concatenate([r[:n] for r in ranked])
    else:
        chosen = np.concatenate(ranked)
        if max_per_round is not None:
            chosen = chosen[np.lexsort((chosen, -confidence[chosen]))][:max_per_round]
    return sorted(int(i) for i in chosen)


def pseudo_label(
    teacher: str | Path, texts: list[str], labels, cfg, data_cfg, out: Path, round_no: int
) -> dict:
    """Label `texts` with `teacher`, write the chosen rows to `out` (jsonl: the recipe's text and
    label columns, the confidence, the text's index in the unlabelled set) and return the round's
    record: per class, how many were confident and how many joined."""
    started = time.perf_counter()
    probs = teacher_probs(teacher, texts)
    chosen = select(probs, cfg.threshold, cfg.per_class, cfg.max_per_round)
    confidence, predicted = probs.max(1), probs.argmax(1)
    confident = confidence >= cfg.threshold
    names = labels.names
    rows = [
        {
            data_cfg.text_column: texts[i],
            data_cfg.label_column: labels.values[int(predicted[i])],
            "confidence": float(confidence[i]),
            "unlabeled_index": i,
        }
        for i in chosen
    ]
    rundir.write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    added = {n: int(sum(predicted[i] == c for i in chosen)) for c, n in enumerate(names)}
    above = {n: int(np.sum(confident & (predicted == c))) for c, n in enumerate(names)}
    warnings = []
    if cfg.per_class == "balanced" and not chosen and any(above.values()):
        short = [n for n in names if above[n] == 0]
        warnings.append(
            f"round {round_no}: no text of class {', '.join(short)} at confidence >= {cfg.threshold}: "
            "balanced adds none; lower self_training.threshold, or per_class: none"
        )
    elif not chosen:
        warnings.append(f"round {round_no}: no text at confidence >= {cfg.threshold}: nothing added")
    return {
        "round": round_no,
        "teacher": str(teacher),
        "unlabeled": len(texts),
        "above_threshold": above,
        "added": added,
        "added_total": len(chosen),
        "mean_confidence_added": round(float(confidence[chosen].mean()), 4) if chosen else None,
        "pseudo_labels": str(out),
        "label_seconds": round(time.perf_counter() - started, 2),
        "warnings": warnings,
    }
