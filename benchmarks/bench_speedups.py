"""Each of hybridtune's speed-ups switched off in turn, on the same work (MiniLM, full fine-tuning
or any recipe, 2,000 RT sentences, 1 epoch), alternating, several repeats: what each one is worth.

    .venv/bin/python benchmarks/bench_speedups.py [--recipe full.yaml] [--repeats 2] [--compile]

Sides: hybridtune's defaults (precision auto = bf16 autocast on a CPU with native bf16, length-grouped
batches); precision fp32; random order (no length grouping; padding to the longest of each random
batch, as Trainer's default sampler does); with `--compile`, `train.compile=true` (torch.compile).
The token cache is measured inside the runs: a first run with an empty HYBRIDTUNE_CACHE_DIR encodes
the splits, the next ones read them; report.json's `token_cache.seconds` is printed for both.
The frozen-trunk cache has its own on/off sides in bench_head.py and bench_top2.py.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import export_split, machine, median, ours, table

SIDES = {
    "hybridtune (defaults)": [],
    "precision fp32": ["train.precision=fp32"],
    "no length grouping": ["train.group_by_length=false"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="full.yaml")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=2000)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--compile", action="store_true", help="also a side with train.compile=true")
    args = ap.parse_args()
    sides = dict(SIDES)
    if args.compile:
        sides["torch.compile"] = ["train.compile=true"]
    data = export_split(max_train=args.max_train)
    work = Path(tempfile.mkdtemp(prefix="bench-speedups-"))
    cache = {"HYBRIDTUNE_CACHE_DIR": str(work / "cache")}
    rows: dict[str, list[dict]] = {s: [] for s in sides}
    for r in range(args.repeats):
        seed = 42 + r
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for side in order:
            out = work / f"{side.split()[0]}-{side.split()[-1]}-{r}"
            out.mkdir()
            overrides = [f"train.epochs={args.epochs}", f"train.lr={args.lr}", f"train.seed={seed}"]
            rows[side].append(ours(args.recipe, data, out, [*overrides, *sides[side]], env=cache))
            got = rows[side][-1]
            print(
                f"  repeat {r} {side}: {got['samples_per_s']:.1f} samples/s, test "
                f"{100 * got['test_accuracy']:.2f} %, tokenized in {got['token_cache']['seconds']:.2f} s "
                f"(from cache: {got['token_cache']['from_cache'] or 'none'})",
                flush=True,
            )
    text = table(
        f"speed-ups off one at a time: {args.recipe}, MiniLM, {args.max_train} RT train sentences, "
        f"{args.epochs:g} epoch(s), {args.repeats} repeats, medians",
        rows,
        "hybridtune (defaults)",
    )
    text = text.replace("vs hybridtune (defaults) (samples/s)", "vs defaults (samples/s)")
    every = [x for side in rows.values() for x in side]
    cold = [x["token_cache"]["seconds"] for x in every if not x["token_cache"]["from_cache"]]
    warm = [x["token_cache"]["seconds"] for x in every if x["token_cache"]["from_cache"]]
    text += (
        f"\n\ntoken cache: encoding the three splits {statistics.median(cold):.2f} s without "
        f"({len(cold)} run), {statistics.median(warm):.2f} s from the cache (median of {len(warm)} runs)"
        if cold and warm
        else ""
    )
    for side, xs in rows.items():
        accs = [100 * x["test_accuracy"] for x in xs]
        text += f"\ntest accuracy {side}: {statistics.mean(accs):.2f} % (seeds {', '.join(f'{a:.2f}' for a in accs)})"
    base = median(rows["hybridtune (defaults)"], "train_s")
    for side in sides:
        if side != "hybridtune (defaults)":
            text += f"\n{side}: training {median(rows[side], 'train_s') / base:.2f}x the defaults' time"
    print(text + f"\n\nmachine: {machine()}\n")


if __name__ == "__main__":
    main()
