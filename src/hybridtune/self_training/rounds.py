"""The rounds of self-training: each an ordinary run (`run.train`) in the run dir; one is the result.

    runs/<name>/
      recipe.yaml             the self-training recipe
      round-0/                the first teacher: the recipe trained on the labelled rows alone
                              (absent with self_training.teacher, which is then the first teacher)
      pseudo-labels/          round-<r>.jsonl: the rows round r adds; round-<r>.json: how they were chosen
      round-1/ .. round-<R>/  the students: the recipe trained from the pretrained weights on the
                              labelled + pseudo-labelled rows (`data.pseudo_labels`); each teaches the next
      final/ run.json params.json eval.json metrics.jsonl   the kept round's (final/'s files hard-linked)
      self_training.json      every round's record; report.json: the kept round's, with `self_training`

The kept round (`self_training.keep`): best, the round trained here with the best validation score
(ties: the earlier round; a given teacher is no candidate: it is not this recipe's model), or last.
Picking on validation is ordinary model selection: the rounds never see the test split, and a
student can validate worse than its teacher (docs/few_shot.md, draws 3 and 4). A round that adds
fewer than `self_training.min_added` texts stops the rounds before its student trains.

Every round re-labels the whole unlabelled set with the newest model (Xie et al. 2020: the student
becomes the teacher, and pseudo-labels are made afresh, not accumulated) and trains from the
pretrained weights, not from the teacher's, so the teacher's errors are not inherited through the
weights (Noisy Student's image students start from scratch; NLP self-training restarts from the
pretrained model, e.g. Du et al. 2021, "Self-training Improves Pre-training for NLU").

Every check (recipe, data, unlabelled texts, teacher, the first round's model and strategy) runs
before the run dir exists. A killed self-training resumes at its round (`hybridtune train --resume
RUN_DIR`): finished rounds and written pseudo-labels are kept, the round in progress goes on from
its last checkpoint (or starts over when it had none).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridtune import durable, rundir, tasks
from hybridtune.data.unlabeled import Unlabeled, read_unlabeled
from hybridtune.errors import RunFailed, TrainingStopped, UserError, one_line
from hybridtune.recipe import Recipe, apply_override, load_recipe, recipe_to_yaml, validate_recipe
from hybridtune.self_training.config import SUMMARY
from hybridtune.self_training.pseudo import check_teacher, pseudo_label

# the kept round's files the run dir holds too, so that it loads, evaluates and compares as one run
COPIED = ("run.json", "params.json", "eval.json", "metrics.jsonl")


@dataclass
class Context:
    """What the rounds need, built and checked before anything is written."""

    recipe: Recipe
    run: Path
    labels: Any
    unlabeled: Unlabeled
    labelled_rows: int
    prepared: Any = None  # run.Prepared of round 0, when it trains (checked, then trained as is)
    step: str = "self-training"  # what runs now: failed.json names it


def round_recipe(recipe: Recipe, run: Path, number: int, pseudo: Path | None) -> Recipe:
    """Round `number`'s recipe: this one without `self_training` and `data.unlabeled`, written to
    <run>/round-<number>, with `data.pseudo_labels` (absolute: a resume may start elsewhere) and, for
    the students, `self_training.student_overrides`."""
    raw = recipe.model_dump(mode="json")
    cfg = recipe.self_training
    raw["self_training"] = None
    raw["data"] |= {"unlabeled": None, "pseudo_labels": str(pseudo.resolve()) if pseudo else None}
    raw["output"] |= {"dir": str(run), "name": f"round-{number}"}
    for item in cfg.student_overrides if number > 0 else ():
        apply_override(raw, item)
    return validate_recipe(raw, f"self_training (round {number})")


def check(recipe: Recipe, run: Path, prepare_first: bool = True) -> Context:
    """Every check of a self-training recipe (UserError, nothing written); with `prepare_first`, the
    first round is prepared too (its model, strategy and data: what `run.prepare` checks)."""
    from hybridtune import run as one_run

    cfg = recipe.self_training
    task = tasks.for_recipe(recipe)
    splits = task.load_splits(recipe.data)
    labels = task.label_space(splits, recipe.data)
    unlabeled = read_unlabeled(recipe.data, splits, labels)
    classes = len(labels.names)
    if cfg.per_class == "balanced" and cfg.max_per_round is not None and cfg.max_per_round < classes:
        raise UserError(
            "self_training.max_per_round",
            f"{cfg.max_per_round} with {classes} classes and per_class: balanced",
            f"at least {classes} (a round adds max_per_round // classes per class)",
        )
    if cfg.teacher:
        check_teacher(cfg.teacher, recipe.task, labels)
    first = round_recipe(recipe, run, 1 if cfg.teacher else 0, None)
    student = round_recipe(recipe, run, 1, None)  # the students' overrides, validated
    metric = recipe.train.early_stopping.metric
    if cfg.keep == "best" and student.train.early_stopping.metric != metric:
        raise UserError(
            "self_training.student_overrides",
            f"train.early_stopping.metric={student.train.early_stopping.metric} with keep: best",
            f"the recipe's metric ({metric}): the rounds are compared on it",
        )
    prepared = one_run.prepare(first) if prepare_first else None
    if cfg.teacher:
        prepared = None  # round 1 trains on pseudo-labels: it prepares its own data
    return Context(recipe, run, labels, unlabeled, len(splits.train), prepared)


def train(recipe: Recipe) -> dict:
    """Self-train `recipe` (its `self_training` and `data.unlabeled`): every check, then the rounds."""
    run = rundir.run_dir_path(recipe.output.dir, recipe.output.name, recipe.name)
    ctx = check(recipe, run)
    with rundir.new_run_dir(run):  # the run dir's lock, held while the rounds train
        rundir.write_text(run / "recipe.yaml", recipe_to_yaml(recipe))
        return _guarded(ctx)


def resume(run: Path) -> dict:
    """Go on with an interrupted self-training run dir at its round (module docstring)."""
    where = f"--resume {run}"
    if (run / "report.json").is_file():
        raise UserError(where, "a finished self-training run (report.json present)", "an interrupted run")
    with durable.lock_dir(run, where):
        recipe = load_recipe(run / "recipe.yaml")
        return _guarded(check(recipe, run, prepare_first=False))


def _guarded(ctx: Context) -> dict:
    """The rounds; a failure marks the run dir failed and names the command that goes on."""
    try:
        return _rounds(ctx)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        rundir.mark_failed(ctx.run, ctx.step, one_line(e), None)
        if isinstance(e, UserError | TrainingStopped):
            raise
        cause = str(e).split("; resume: ")[0]  # a round's own hint names the round, not the run
        raise RunFailed(f"{cause}; resume: hybridtune train --resume {ctx.run}") from e


def _rounds(ctx: Context) -> dict:
    recipe, run = ctx.recipe, ctx.run
    cfg = recipe.self_training
    records, summaries, stopped = [], {}, None  # summaries: round number -> its report.json
    if cfg.teacher:
        teacher = Path(cfg.teacher)
        records.append({"round": 0, "given": True, **_scores(teacher)})
    else:
        summaries[0] = _train_round(ctx, 0, None)
        teacher = run / "round-0"
        records.append({"round": 0, "given": False, "trained": True, **_scores(teacher)})
    for number in range(1, cfg.rounds + 1):
        pseudo = run / "pseudo-labels" / f"round-{number}.jsonl"
        record_file = pseudo.with_suffix(".json")
        if record_file.is_file() and pseudo.is_file():  # labelled before a kill: the same rows again
            record = rundir.read_json(record_file)
        else:
            pseudo.parent.mkdir(exist_ok=True)
            texts = ctx.unlabeled.texts
            ctx.step = f"round {number}: pseudo-labelling"
            record = pseudo_label(teacher, texts, ctx.labels, cfg, recipe.data, pseudo, number)
            rundir.write_json(record_file, record)
        durable.maybe_kill("round", number)  # the test hook: a kill between labelling and training
        added = record["added_total"]
        if added < cfg.min_added and summaries:  # a given teacher's round 1 trains: nothing else would
            stopped = f"stopped after round {number - 1}: round {number} " + (
                "would train on the same rows"  # from the same start: the same model again
                if not added
                else f"adds {added} texts, fewer than self_training.min_added ({cfg.min_added})"
            )
            records.append({**record, "trained": False, "warnings": [*record["warnings"], stopped]})
            break
        if added < cfg.min_added:
            record = {**record, "warnings": [*record["warnings"], _few(number, added, cfg.min_added)]}
        summaries[number] = _train_round(ctx, number, pseudo if added else None)
        teacher = run / f"round-{number}"
        records.append({**record, "trained": True, **_scores(teacher)})
    return _finish(ctx, records, summaries, stopped)


def _few(number: int, added: int, min_added: int) -> str:
    return (
        f"round {number}: adds {added} texts, fewer than self_training.min_added ({min_added}), and "
        "trains all the same: the given teacher's first round is the run's only model"
    )


def kept(records: list[dict], keep: str) -> tuple[int, str]:
    """The round whose model is the result, and why: `keep` best, the round trained here with the
    best validation score (ties: the earlier round); last (or no round with a score), the last."""
    trained = [r for r in records if r.get("trained")]
    scored = [r for r in trained if r.get("validation") is not None]
    last = trained[-1]["round"]
    if keep == "last":
        return last, "the last round trained (self_training.keep: last)"
    if not scored:
        return last, "the last round trained: no round has a validation score to choose on"
    metric = (scored[0].get("validation_metric") or "").removeprefix("eval_")
    # max / min return the first of equals: a tie keeps the earlier round
    pick = max if tasks.higher_is_better(metric) else min
    best = pick(scored, key=lambda r: r["validation"])
    scores = ", ".join(f"round {r['round']} {r['validation']:.4f}" for r in scored)
    return best["round"], f"the best validation {metric} (self_training.keep: best): {scores}"


def _train_round(ctx: Context, number: int, pseudo: Path | None) -> dict:
    """Round `number`'s summary: read when it finished, resumed from its last checkpoint when it has
    one, else trained (again: a round killed before its first checkpoint starts over)."""
    from hybridtune import run as one_run

    target = ctx.run / f"round-{number}"
    ctx.step = f"round {number}: training"
    if (target / "report.json").is_file():
        return rundir.read_json(target / "report.json")
    if target.is_dir() and rundir.last_checkpoint(target) is not None:
        return one_run.train(resume=target)
    if target.exists():
        shutil.rmtree(target)  # ours, inside the run dir whose lock we hold; nothing to go on from
    recipe = round_recipe(ctx.recipe, ctx.run, number, pseudo)
    prepared = ctx.prepared if number == 0 else None
    ctx.prepared = None  # its model trains once
    return one_run.train(recipe, prepared=prepared)


def _scores(run: Path) -> dict:
    """A round's (or a given teacher's) validation and test scores, from its report.json."""
    path = run / "report.json"
    report = rundir.read_json(path) if path.is_file() else {}
    return {
        "run_dir": str(run),
        "validation": report.get("best_validation"),
        "validation_metric": report.get("best_validation_metric"),
        "test": report.get("test"),
        "train_seconds": report.get("train_seconds"),
    }


def _link_tree(src: Path, dst: Path) -> None:
    """`src`'s files at `dst`: hard links (no second copy of the weights), a copy across filesystems."""
    for here, _, files in os.walk(src):
        out = dst / Path(here).relative_to(src)
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            try:
                os.link(Path(here) / name, out / name)
            except OSError:
                shutil.copy2(Path(here) / name, out / name)


def _finish(ctx: Context, records: list[dict], summaries: dict[int, dict], stopped: str | None) -> dict:
    """The run dir as one run: the kept round's final/ and files, self_training.json, report.json."""
    run, cfg = ctx.run, ctx.recipe.self_training
    ctx.step = "writing the result"
    number, why = kept(records, cfg.keep)
    chosen = run / f"round-{number}"
    rundir.save_dir_atomically(run / "final", lambda tmp: _link_tree(chosen / "final", tmp))
    for name in COPIED:
        if (chosen / name).is_file():
            rundir.write_text(run / name, (chosen / name).read_text(encoding="utf-8"))
        else:  # no stale copy of another round's file
            (run / name).unlink(missing_ok=True)
    result = summaries[number]
    summaries = list(summaries.values())
    label_seconds = sum(r.get("label_seconds") or 0 for r in records)
    seconds = sum(s["train_seconds"] for s in summaries)
    samples = sum((s["train_samples_per_second"] or 0) * s["train_seconds"] for s in summaries)
    tokens = sum((s["train_tokens_per_second"] or 0) * s["train_seconds"] for s in summaries)
    warnings = [w for r in records for w in r.get("warnings", [])]
    section = {
        "rounds": records,
        "unlabeled": ctx.unlabeled.summary(),
        "labelled_rows": ctx.labelled_rows,
        "threshold": cfg.threshold,
        "per_class": cfg.per_class,
        "max_per_round": cfg.max_per_round,
        "teacher": cfg.teacher,
        "label_seconds": round(label_seconds, 2),
        "min_added": cfg.min_added,
        "keep": cfg.keep,
        "final_round": number,  # the kept round: final/ and the scores of report.json are its
        "kept_because": why,
        "last_round": max(r["round"] for r in records if r.get("trained")),
        "stopped": stopped,
        "warnings": warnings,
    }
    rundir.write_json(run / SUMMARY, section)
    summary = {
        **result,
        "run_dir": str(run),
        "recipe": ctx.recipe.name,
        "best_checkpoint": result.get("best_checkpoint"),
        "warnings": [*result.get("warnings", []), *warnings],
        # the whole cost: every round trained here and the labelling between them
        "train_seconds": round(seconds + label_seconds, 2),
        "train_samples_per_second": round(samples / seconds, 3) if seconds else None,
        "train_tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "steps": sum(s["steps"] for s in summaries),
        "cuda_peak_mib": max((s.get("cuda_peak_mib") or 0) for s in summaries) or None,
        "self_training": section,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (run / rundir.FAILED).unlink(missing_ok=True)  # a failed run resumed to its end is no longer failed
    rundir.write_json(run / "report.json", summary)
    return summary
