"""One recipe, K members (`ensemble:` in a recipe): train each, combine, report as one run."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from hybridtune import run as one_run
from hybridtune import rundir
from hybridtune.ensemble.config import COMBINES
from hybridtune.ensemble.joint import train_joint
from hybridtune.ensemble.members import member_recipes
from hybridtune.ensemble.merging import merge_adapters
from hybridtune.ensemble.outputs import build
from hybridtune.ensemble.soups import soup
from hybridtune.recipe import recipe_to_yaml


def train(recipe) -> dict:
    """Train every member (each a normal run under <run>/members/<i>), combine them, and write the
    run's report.json / metrics.jsonl as one strategy of a compare would have them."""
    cfg = recipe.ensemble
    if cfg.shared_trunk:
        return train_joint(recipe)
    members = member_recipes(recipe)
    run = rundir.run_dir_path(recipe.output.dir, recipe.output.name, recipe.name)
    with rundir.new_run_dir(run):  # the run dir's lock, held while the members train
        return _train(recipe, members, run)


def _train(recipe, members: list, run: Path) -> dict:

    cfg = recipe.ensemble
    rundir.write_text(run / "recipe.yaml", recipe_to_yaml(recipe))
    summaries = []
    for i, member in enumerate(members):
        member.output.dir, member.output.name = str(run / "members"), str(i)
        summaries.append(one_run.train(member))
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
        "precision_reason": summaries[0].get("precision_reason"),
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
