"""Pair bench_fewshot.py's outputs over more draws than one run of it had, by draw (docs/few_shot.md).

    .venv/bin/python benchmarks/fewshot_pairs.py D5-9.json D0-4.json \
        [--setfit 75.15 73.27 73.97 74.21 76.55 70.93 77.49 73.62 74.79 73.74] [--reference SIDE]

The runs of each side in the given `--out` files (one data set and k each, e.g. draws 5–9 in one file
and 0–4 in another) are taken by draw number; every side is set against the reference side on the
draws both have: mean ± sd, the paired difference in points with report/stats.py's 95 % t-interval,
the draws ahead / behind, and the mean wall seconds a run. `--setfit`: SetFit's test accuracies in %,
for draws 0, 1, 2, ... in order, recorded from an earlier run of the benchmark with SetFit (SetFit 1.2.0
repeats them to the digit across machines) when the runs here were made with `--without-setfit`;
their wall times are not known then. The reference is SetFit's side, or `--reference`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hybridtune.report.stats import paired


def by_draw(files: list[str]) -> dict[str, dict[int, dict]]:
    """side -> draw -> its row, over every file (one data set and k each)."""
    sides: dict[str, dict[int, dict]] = {}
    for name in files:
        result = json.loads(Path(name).read_text(encoding="utf-8"))
        for table in result["tables"]:
            for side, rows in table["runs"].items():
                for draw, row in zip(result["draws"], rows, strict=True):
                    sides.setdefault(side, {})[draw] = row
    return sides


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="bench_fewshot.py --out files")
    ap.add_argument(
        "--setfit", nargs="+", type=float, help="SetFit's recorded accuracy (%%) per draw 0, 1, ..."
    )
    ap.add_argument("--reference", default="setfit")
    a = ap.parse_args()
    sides = by_draw(a.files)
    if a.setfit:
        sides["setfit"] = {d: {"test_accuracy": x / 100, "wall_s": None} for d, x in enumerate(a.setfit)}
    if a.reference not in sides:
        ap.error(f"--reference {a.reference}: not a side of the files (sides: {', '.join(sides)})")
    reference = sides[a.reference]
    print("| side | draws | test accuracy % (mean ± sd) | paired Δ vs reference, pt (95 % CI) | ahead / behind | wall s a run |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|")
    for side, rows in sides.items():
        draws = sorted(rows)
        acc = [100 * rows[d]["test_accuracy"] for d in draws]
        walls = [rows[d]["wall_s"] for d in draws if rows[d]["wall_s"] is not None]
        common = [d for d in draws if d in reference]
        delta, tally = "—", "—"
        if side != a.reference and len(common) > 1:
            ours = [100 * rows[d]["test_accuracy"] for d in common]
            theirs = [100 * reference[d]["test_accuracy"] for d in common]
            p = paired(ours, theirs)
            delta = f"{p['mean']:+.2f} ({p['low']:+.2f}, {p['high']:+.2f}), {len(common)} draws"
            diffs = [x - y for x, y in zip(ours, theirs, strict=True)]
            tally = f"{sum(x > 0 for x in diffs)} / {sum(x < 0 for x in diffs)}"
        spread = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
        wall = f"{statistics.fmean(walls):.1f}" if walls else "—"
        span = ", ".join(map(str, draws))
        print(f"| {side} | {span} | {statistics.fmean(acc):.2f}{spread} | {delta} | {tally} | {wall} |")


if __name__ == "__main__":
    main()
