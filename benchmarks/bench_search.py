"""Benchmark: `hybridtune search` with a budget, then its verdict; and what the trials would cost one
by one through `hybridtune train`.

    .venv/bin/python benchmarks/bench_search.py [SPACE.yaml] [key=value ...] [--budget 60m | --trials N]
        [--seeds 3] [--one-by-one 5] [--out DIR]
    .venv/bin/python benchmarks/bench_search.py --from SEARCH_DIR [--one-by-one 5]

1. The search (default: the default space on Rotten Tomatoes) runs as one child process with the
   budget, then retrains the best recipes and full fine-tuning with `--seeds` seeds and tests them
   (the verdict). Its wall time, peak RSS, the trials (complete / pruned / failed) and the verdict's
   sentences are printed.
2. The first `--one-by-one` finished trials, complete or pruned (their own recipe.yaml, as the search
   ran them), are each trained to the end by `hybridtune train` in a process of its own, as a user
   would without the search: the ratio of their wall times to the same trials' wall times inside
   the search (pruned early, one long-lived process, shared token and trunk caches, no checkpoints,
   no test pass) is the saving, printed for the complete and the pruned trials apart. With every
   trial rerun (`--one-by-one` at least the number of trials) after a search without a verdict
   (`verdict.top=0`), the whole search's wall time -- its start-up, the bookkeeping between trials,
   the failed trials -- is set against them too. The best validation score among them is printed
   for both sides. A few-shot trial (`data.shots` with `data.draws` n in its recipe) is n runs alone,
   one per draw (`data.draw=d`), pruned or not: a user without the search scores a recipe on every
   draw (its value is their mean, as the search's).
   Run on a quiet machine; the CPU is named in the output.

`--from SEARCH_DIR` skips step 1 and reads a finished search's trials and verdict (e.g. one run with
`--one-by-one 0` first, so that the search and its one-by-one reruns can run in separate sittings);
the search's wall time is then the one this script saved beside it (bench.json), if it ran it.
`--scratch DIR` puts the one-by-one runs there; a run finished there before (its report.json and its
wall time, alone.json) is read, not trained again, to go on after an interruption; a run cut off
midway is trained again from the start. Of each run only those two files are kept: a few-shot
space's runs are ~300 MB each with their checkpoints, tens of GB for a search's trials.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import yaml
from common import PYTHON, machine, run_child

from hybridtune.search import draws


def trials_span(search_dir: Path) -> float:
    """Seconds from the study's first trial start to its last trial end (Optuna's timestamps): the
    search's wall time less its start-up and its end, where this script did not time the search."""
    import optuna

    from hybridtune.search.study import journal

    storage = journal(search_dir)
    (name,) = optuna.get_all_study_names(storage)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    return (max(ends) - min(t.datetime_start for t in trials)).total_seconds()


def alone_run(recipe: Path, run: Path, draw: int | None) -> dict:
    """`hybridtune train RECIPE` into `run` (on `draw`), timed; only its report.json is kept, with the
    wall time beside it (`alone.json`): a run finished before is read, not trained again."""
    timed = run / "alone.json"
    if timed.is_file():
        return json.loads(timed.read_text())
    shutil.rmtree(run, ignore_errors=True)  # an interrupted run: again from the start
    alone = run_child(
        [
            PYTHON,
            "-m",
            "hybridtune",
            "train",
            str(recipe),
            f"output.dir={run.parent}",
            f"output.name={run.name}",
            *([f"data.draw={draw}"] if draw is not None else []),
        ]
    )
    for path in run.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name != "report.json":
            path.unlink()
    timed.write_text(json.dumps(alone))
    return alone


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("args", nargs="*", help="[SPACE.yaml] [key=value ...]")
    parser.add_argument("--budget", default=None)
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--one-by-one", type=int, default=5, help="trials rerun through `hybridtune train`")
    parser.add_argument("--out", default=None)
    parser.add_argument("--from", dest="done", default=None, help="a finished search dir: no new search")
    parser.add_argument("--scratch", default=None, help="the one-by-one runs' dir (finished ones are reused)")
    opts = parser.parse_args()
    if opts.budget is None and opts.trials is None:
        opts.budget = "60m"
    if opts.done:
        out, cmd = Path(opts.done), None
        saved = out.parent / "bench.json"
        searched = json.loads(saved.read_text()) if saved.is_file() else None
        span = None if searched else trials_span(out)  # the study's timestamps where the search was untimed
    else:
        out = Path(opts.out or tempfile.mkdtemp(prefix="bench-search-")) / "search"
        cmd = [
            PYTHON,
            "-m",
            "hybridtune",
            "search",
            *opts.args,
            "--out",
            str(out),
            "--seeds",
            str(opts.seeds),
        ]
        cmd += ["--budget", opts.budget] if opts.budget else ["--trials", str(opts.trials)]
        searched, span = run_child(cmd), None
        (out.parent / "bench.json").write_text(json.dumps(searched))
    trials = json.loads((out / "trials.json").read_text())["trials"]
    states = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "fail")}
    verdict_path = out / "verdict.json"
    verdict = json.loads(verdict_path.read_text()) if verdict_path.is_file() else {"sentences": []}

    chosen = [t for t in trials if t["state"] in ("complete", "pruned")][: opts.one_by_one]
    one_by_one = []
    scratch = Path(opts.scratch or tempfile.mkdtemp(prefix="bench-search-train-"))
    for t in chosen:
        recipe = Path(t["run_dir"]) / "recipe.yaml"
        walls, trains, values = [], [], []
        # a few-shot trial is n runs, one per draw (search/draws.py), the search's pruned ones too:
        # without the search, a user scores a recipe on every draw, each to its end
        for d in draws.scored(yaml.safe_load(recipe.read_text())):
            name = f"t{t['number']}" + (f"-d{d}" if d is not None else "")
            alone = alone_run(recipe, scratch / name, d)
            report = json.loads((scratch / name / "report.json").read_text())
            walls.append(alone["wall_s"])
            trains.append(report["train_seconds"])
            values.append(report["best_validation"])
        one_by_one.append(
            {
                "trial": t["number"],
                "family": t["family"],
                "state": t["state"],
                "search_val": t["value"],
                "alone_val": statistics.fmean(values),
                "alone_runs": len(values),
                "search_wall": t["seconds"],
                "search_train": t["train_seconds"],
                "alone_wall": sum(walls),
                "alone_train": sum(trains),
            }
        )

    print(f"machine: {machine()}")
    print(f"search: {' '.join(cmd[2:])}" if cmd else f"search: {out} (run before)")
    ran = f"wall {searched['wall_s']:.0f} s (trials + confirmation + verdict), peak RSS {searched['max_rss_mib']:.0f} MiB; " if searched else ""  # fmt: skip
    print(f"  {ran}{len(trials)} trials: {states['complete']} complete, {states['pruned']} pruned, {states['fail']} failed")  # fmt: skip
    for c in verdict.get("confirm", {}).get("trials", []):  # search/confirm.py: validation, by seed
        shown = ", ".join("failed" if v is None else f"{v:.4f}" for v in c["values"])
        mean = "-" if c["mean"] is None else f"{c['mean']:.4f}"
        print(f"  confirm {c['name']} ({c['family']}), seeds {c['seeds']}: {shown}; mean {mean}{' (chosen)' if c.get('chosen') else ''}")  # fmt: skip
    for sentence in verdict["sentences"]:
        print(f"  {sentence}")
    if not one_by_one:
        return
    # wall = training + what surrounds it (start-up, loading, encoding; alone also checkpoints, final/,
    # the test pass); the training seconds are shown so that a busy machine slowing one side is seen
    print(
        "trial  family            state     search wall s (train s)  train-cmd wall s (train s)  wall ratio"
    )
    if any(r["alone_runs"] > 1 for r in one_by_one):
        print(
            "(few-shot: a trial's train-cmd side is the sum of its runs, one per draw; its value their mean)"
        )
    for r in one_by_one:
        print(
            f"{r['trial']:>5}  {r['family']:<16}  {r['state']:<8}  {r['search_wall']:>13.1f} ({r['search_train']:>6.1f})"
            f"  {r['alone_wall']:>16.1f} ({r['alone_train']:>6.1f})  {r['alone_wall'] / r['search_wall']:9.2f}x"
        )
    total_in = sum(r["search_wall"] for r in one_by_one)
    total_alone = sum(r["alone_wall"] for r in one_by_one)
    over_in = sum(r["search_wall"] - r["search_train"] for r in one_by_one) / len(one_by_one)
    over_alone = sum(r["alone_wall"] - r["alone_train"] for r in one_by_one) / len(one_by_one)
    med = statistics.median(r["alone_wall"] / r["search_wall"] for r in one_by_one)
    print(
        f"total wall: search {total_in:.1f} s, one by one {total_alone:.1f} s: {total_alone / total_in:.2f}x "
        f"(median {med:.2f}x); outside training per trial: {over_in:.1f} s in the search, {over_alone:.1f} s alone"
    )
    for state in ("complete", "pruned"):  # where the saving comes from
        rows = [r for r in one_by_one if r["state"] == state]
        if rows:
            a, b = sum(r["alone_wall"] for r in rows), sum(r["search_wall"] for r in rows)
            print(f"  {len(rows)} {state}: search {b:.1f} s, one by one {a:.1f} s: {a / b:.2f}x")
    finished = [t for t in trials if t["state"] in ("complete", "pruned")]
    if searched and len(one_by_one) == len(finished) and not verdict_path.is_file():
        # every trial rerun, and the search's wall time is trials only (no confirmation, no verdict):
        # its start-up, the bookkeeping between trials and the failed trials count on its side too
        print(
            f"the whole search, wall {searched['wall_s']:.1f} s, against every trial one by one: "
            f"{total_alone / searched['wall_s']:.2f}x"
        )
    elif span and len(one_by_one) == len(finished) and not verdict_path.is_file():
        print(
            f"the search's trials, first start to last end {span:.1f} s (study timestamps: the search "
            f"untimed, its start-up and end left out), against every trial one by one: {total_alone / span:.2f}x"
        )
    best_in = (
        max(r["search_val"] for r in one_by_one if r["state"] == "complete")
        if any(r["state"] == "complete" for r in one_by_one)
        else None
    )
    best_alone = max(r["alone_val"] for r in one_by_one)
    print(f"best validation among them: search {best_in}, one by one {best_alone}")


if __name__ == "__main__":
    main()
