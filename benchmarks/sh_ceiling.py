"""What successive halving can save at most: the wall-time ratio of trials run to the end one by one
against the same trials under the pruner, when there are many of them (no start-up phase), all of
one length, and nothing else differs (no start-up or test pass saved, no cache shared).

    python benchmarks/sh_ceiling.py [--evaluations 4 8 12 16] [--factors 2 4]

A trial validates E times, evenly over its training; rungs are at validations 1, f, f², ... before
the last (the last never prunes: the run has ended, search/trial.py), and each rung keeps the best
1/f of the trials that reached it (Optuna's SuccessiveHalvingPruner with min_resource 1, as
search/study.py builds it). A trial stopped at validation r has cost r/E of a whole one. Then

    cost = sum over rungs k of (share reaching rung k, stopped there) x r_k / E + (share passing all)
    ceiling = 1 / cost

The search's first trials do worse than this (the first trial of each length passes its rungs, and
with fewer than f rivals at a rung only the best so far goes on), the start-up and test pass a trial
saves in the search (~10 s a trial on the bundled MiniLM) do better, and Optuna keeps floor(n / f)
of the n trials at a rung, a little fewer than 1 / f: on 600 simulated trials under its pruner the
cost was 3-7 % below this (tests/test_sh_ceiling.py). A model, not a measurement: docs/search.md sets
it beside the measured ratios.
"""

from __future__ import annotations

import argparse


def rungs(evaluations: int, factor: int) -> list[int]:
    """The validations at which a trial of `evaluations` validations can be stopped."""
    out, r = [], 1
    while r < evaluations:
        out.append(r)
        r *= factor
    return out


def cost(evaluations: int, factor: int) -> float:
    """A trial's expected cost under the pruner, as a share of running it to the end."""
    total, reaching = 0.0, 1.0
    for r in rungs(evaluations, factor):
        stopped = reaching * (1 - 1 / factor)
        total += stopped * r / evaluations
        reaching -= stopped
    return total + reaching


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--evaluations", type=int, nargs="+", default=[4, 8, 12, 16])
    ap.add_argument("--factors", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    print(
        "| validations per trial | rungs at (f = "
        + " / ".join(map(str, args.factors))
        + ") | "
        + " | ".join(f"ceiling, f = {f}" for f in args.factors)
        + " |"
    )
    print("|---:|---|" + "---:|" * len(args.factors))
    for e in args.evaluations:
        at = " / ".join(",".join(map(str, rungs(e, f))) for f in args.factors)
        print(f"| {e} | {at} | " + " | ".join(f"{1 / cost(e, f):.2f}x" for f in args.factors) + " |")


if __name__ == "__main__":
    main()
