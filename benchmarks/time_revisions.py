"""One recipe trained at several git revisions of hybridtune, alternating, in one sitting: whether a
slower measurement came from the code or from the machine.

    .venv/bin/python benchmarks/time_revisions.py REV [REV ...] [--recipe full.yaml] [--rounds 2]
        [key=value ...]

Each revision is checked out into a temporary git worktree and run with this checkout's .venv
(`PYTHONPATH=<worktree>/src`), so only revisions whose runtime dependencies match the lock of this
checkout compare fairly. The default work is the default compare's full fine-tuning run (1 epoch of
the bundled Rotten Tomatoes, 4 validations: `train.epochs=1 train.eval_steps=54`); key=value
overrides given on the command line replace those two. Rounds alternate the revisions (A B A B ...) so that a
machine drifting during the sitting weighs on every side alike. Printed per revision: the wall time
of each `hybridtune train` process, report.json's `train_seconds`, and the test accuracy (the same
on every revision unless the change was meant to alter the scores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path

from common import PYTHON, ROOT, machine, run_child

from hybridtune.compare import DEFAULT_SUITE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="+", help="git revisions (HEAD, a commit, a tag)")
    ap.add_argument("--recipe", default="full.yaml", help="a file of recipes/ at each revision")
    ap.add_argument("--rounds", type=int, default=2)
    args, overrides = ap.parse_known_args()
    overrides = overrides or DEFAULT_SUITE["overrides"]
    print(machine())
    rows: dict[str, list[dict]] = {rev: [] for rev in args.revs}
    with tempfile.TemporaryDirectory(prefix="bench-revs-") as tmp:
        trees = {}
        for i, rev in enumerate(args.revs):
            tree = Path(tmp) / f"rev{i}"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree), rev], check=True
            )
            trees[rev] = tree
        try:
            for r in range(args.rounds):
                for rev, tree in trees.items():
                    out = Path(tmp) / f"out-{r}-{tree.name}"
                    cmd = [PYTHON, "-m", "hybridtune", "train", str(tree / "recipes" / args.recipe)]
                    cmd += [*overrides, f"output.dir={out}"]
                    measured = run_child(cmd, {"PYTHONPATH": str(tree / "src")})
                    report = json.loads(next(out.glob("*/report.json")).read_text())
                    row = {"wall_s": measured["wall_s"], "train_s": report["train_seconds"]}
                    row["test_accuracy"] = report["test"]["accuracy"]
                    rows[rev].append(row)
                    print(
                        f"round {r + 1} {rev}: wall {row['wall_s']:.1f} s, train {row['train_s']:.1f} s, "
                        f"test accuracy {100 * row['test_accuracy']:.2f} %",
                        flush=True,
                    )
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
                )
    print(f"\n{args.recipe} {' '.join(overrides)}, {args.rounds} rounds, medians:")
    first = args.revs[0]
    base = statistics.median(r["train_s"] for r in rows[first])
    for rev, rs in rows.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        train = statistics.median(r["train_s"] for r in rs)
        accs = sorted({round(100 * r["test_accuracy"], 2) for r in rs})
        print(
            f"  {rev}: wall {wall:.1f} s, train {train:.1f} s ({base / train:.2f}x {first}'s speed), "
            f"test accuracy {accs}"
        )


if __name__ == "__main__":
    main()
