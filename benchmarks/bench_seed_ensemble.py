"""Benchmark: seed ensembles of a few-shot recipe, draw by draw (do deep ensembles help at k labels?).

    .venv/bin/python benchmarks/bench_seed_ensemble.py [--recipe setfit.yaml] [--shots 16] [--draws 5]
        [--members 3] [--setfit "69.28 66.59 59.67 63.66 67.41"] [--out DIR]

Draw d of Rotten Tomatoes (k per class, no validation split, as recipes/setfit.yaml) is trained by
`hybridtune train` at seeds d, d + 100, d + 200, ... — member 0 is benchmarks/bench_fewshot.py's run
of that draw (its seed is the draw) — each in a process of its own. Then every member's test logits
are read back and the first 2 .. `--members` are combined by the mean of their probabilities
(hybridtune.ensemble.combine, as `hybridtune ensemble --combine mean_probs`): test accuracy per draw,
mean ± sd over the draws, the paired difference to member 0 alone and, with `--setfit`, to SetFit's
per-draw accuracies recorded by bench_fewshot.py on the same draws. An ensemble of m members costs m
runs (their wall times are printed).

Combined here, not by `hybridtune ensemble`: that command weighs and reports members on validation,
which these runs do not have, and refuses them by name. A run dir already finished under `--out`
(its `done` marker) is not trained again, so an interrupted benchmark goes on where it stopped.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import PYTHON, ROOT, machine, run_child


def train_member(recipe: str, k: int, draws: int, draw: int, seed: int, out: Path) -> float | None:
    """One member: `hybridtune train` on draw `draw` with `seed`; its wall seconds (None: done before)."""
    if (out / "done").exists():
        return None
    cmd = [
        PYTHON, "-m", "hybridtune", "train", str(ROOT / "recipes" / recipe), f"train.seed={seed}",
        f"output.dir={out}", "data.source=bundled:rotten_tomatoes", f"data.shots={k}",
        f"data.draws={draws}", f"data.draw={draw}", "data.validation_shots=0",
    ]  # fmt: skip
    wall = run_child(cmd)["wall_s"]
    (out / "done").write_text(f"{wall}\n")
    return wall


def member_run(out: Path) -> str:
    return str(next(p for p in out.iterdir() if p.is_dir()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="setfit.yaml")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--setfit", help="SetFit's test accuracy per draw, in %, space-separated")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    root = Path(a.out or tempfile.mkdtemp(prefix="bench-seed-ensemble-"))
    seeds = [[d + 100 * i for i in range(a.members)] for d in range(a.draws)]
    walls = []
    for d in range(a.draws):
        for s in seeds[d]:
            wall = train_member(a.recipe, a.shots, a.draws, d, s, root / f"d{d}-s{s}")
            if wall is not None:
                walls.append(wall)

    from hybridtune.ensemble import combine, member_logits, y_true
    from hybridtune.recipe import load_recipe
    from hybridtune.report.stats import paired
    from hybridtune.tasks import classification

    accuracy: dict[int, list[float]] = {m: [] for m in range(1, a.members + 1)}
    lines = [f"machine: {machine()}", f"{a.recipe}, Rotten Tomatoes, k = {a.shots}, {a.draws} draws", ""]
    for d in range(a.draws):
        paths = [member_run(root / f"d{d}-s{s}") for s in seeds[d]]
        test = classification.load_splits(load_recipe(Path(paths[0]) / "recipe.yaml").data).test
        first, _, logits = member_logits(paths, {"test": test})
        truth = y_true(test, first)
        for m in accuracy:
            accuracy[m].append(float((combine(logits["test"][:m], "mean_probs").argmax(1) == truth).mean()))
        alone = [float((x.argmax(1) == truth).mean()) for x in logits["test"]]
        lines.append(f"draw {d}: members alone " + ", ".join(f"{100 * x:.2f}" for x in alone))
    setfit = [float(x) / 100 for x in a.setfit.split()] if a.setfit else None
    lines += [
        "",
        "| members | test accuracy % (mean ± sd) | paired Δ vs member 0, pt (95 % CI) | vs SetFit |",
    ]
    lines.append("|---:|---|---|---|")
    for m, accs in accuracy.items():
        cells = []
        for reference in (accuracy[1], setfit):
            p = paired(accs, reference) if reference and (m > 1 or reference is setfit) else None
            cells.append(
                f"{100 * p['mean']:+.2f} ({100 * p['low']:+.2f}, {100 * p['high']:+.2f})" if p else "—"
            )
        mean, sd = 100 * statistics.mean(accs), 100 * statistics.stdev(accs)
        lines.append(f"| {m} | {mean:.2f} ± {sd:.2f} | {cells[0]} | {cells[1]} |")
    if walls:
        lines.append(
            f"\nwall s per member run (trained now): {statistics.mean(walls):.1f} (n = {len(walls)})"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
