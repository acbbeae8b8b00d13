"""Benchmark: distillation. A student of the default full fine-tuning run (recipes/full.yaml: MiniLM,
6 blocks, Rotten Tomatoes), MiniLM cut to its bottom 3 blocks, learns the teacher's soft labels
(Hinton et al. 2015); the question is the accuracy it gives up against the scoring speed it gains.

    .venv/bin/python benchmarks/bench_distill.py [--seeds 3] [--blocks 3] [--teacher RUN_DIR]
        [--temperature 2] [--alpha 0.5] [--repeats 3] [--out runs/bench-distill] [--smoke]

1. The teacher: `--teacher` (a finished run), else recipes/full.yaml trained here (seed 42).
2. Per seed: `hybridtune distill TEACHER --blocks K` (api.distill): the student and its comparison
   with the teacher (test accuracy; texts / s on the test split through the same `predict`, in one
   process: same threads, same batch size, best of 3 passes).
3. The same cut model trained on the hard labels only (distill.alpha=0, everything else equal), same
   seeds: what the soft labels themselves add, as a paired difference with its 95 % t-interval.

Prints one table and writes <out>/bench_distill.json. `--smoke` runs tiny settings (256 training texts,
10 steps, 1 seed, 1 timed pass) to check the script, not to measure anything.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f}"


def main(argv: list[str] | None = None) -> dict:
    import torch

    from hybridtune import api
    from hybridtune.recipe import load_recipe
    from hybridtune.report.stats import paired

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--teacher", help="a finished run of recipes/full.yaml (default: trained here)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3, help="timed scoring passes per model (the best counts)")
    ap.add_argument("--out", default="runs/bench-distill")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: checks the script, measures nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    seeds = 1 if args.smoke else args.seeds
    small = ["data.max_train_samples=256", "train.max_steps=10", "train.eval_steps=5"] if args.smoke else []
    common = [f"output.dir={out}", *small]

    started = time.perf_counter()
    teacher = args.teacher
    if teacher is None:
        recipe = load_recipe(ROOT / "recipes" / "full.yaml", [*common, "output.name=teacher"])
        teacher = api.train(recipe)["run_dir"]
    rows: dict[str, list[dict]] = {"distilled": [], "hard labels only": []}
    for i in range(seeds):
        seed = 42 + i
        for side, alpha in (("distilled", args.alpha), ("hard labels only", 0.0)):
            overrides = [
                *common,
                f"train.seed={seed}",
                f"distill.temperature={args.temperature}",
                f"distill.alpha={alpha}",
                f"output.name={'kd' if alpha else 'ce'}-{args.blocks}blocks-seed{seed}",
            ]
            repeats = 1 if args.smoke else args.repeats
            comparison = api.distill(teacher, blocks=args.blocks, overrides=overrides, repeats=repeats)
            rows[side].append(comparison)
            t, s = comparison["teacher"], comparison["student"]
            print(
                f"seed {seed} {side}: test accuracy {100 * s['test']['accuracy']:.2f} % (teacher "
                f"{100 * t['test']['accuracy']:.2f} %), {s['texts_per_second']:.0f} vs "
                f"{t['texts_per_second']:.0f} texts/s",
                flush=True,
            )

    first = rows["distilled"][0]
    t = first["teacher"]
    lines = [
        f"distillation: MiniLM cut to {args.blocks} of {t['blocks']} blocks, T={args.temperature}, "
        f"alpha={args.alpha}, {seeds} seed(s); {platform.processor() or platform.machine()}, "
        f"{first['scoring']['device']}, {first['scoring']['threads']} threads",
        "| model | test accuracy % (mean ± sd) | texts / s | parameters | weights MiB |",
        "|---|---|---|---|---|",
        f"| teacher (full FT, {t['blocks']} blocks) | {100 * t['test']['accuracy']:.2f} | "
        f"{t['texts_per_second']:.0f} | {t['parameters']:,} | {t['weights_mib']:.1f} |",
    ]
    for side, results in rows.items():
        s = [r["student"] for r in results]
        lines.append(
            f"| {args.blocks} blocks, {side} | {_mean_sd([x['test']['accuracy'] for x in s])} | "
            f"{statistics.median(x['texts_per_second'] for x in s):.0f} | {s[0]['parameters']:,} | "
            f"{s[0]['weights_mib']:.1f} |"
        )
    kd = [r["student"]["test"]["accuracy"] for r in rows["distilled"]]
    ce = [r["student"]["test"]["accuracy"] for r in rows["hard labels only"]]
    gain = paired(kd, ce)
    speedup = statistics.median(r["speedup"] for r in rows["distilled"])
    lost = statistics.mean(r["test_lost"] for r in rows["distilled"])
    lines.append(
        f"the student gives up {100 * lost:.2f} pt of test accuracy for {speedup:.2f}× the scoring speed; "
        f"the soft labels add {100 * gain['mean']:+.2f} pt over the hard labels alone"
        + (
            f" (95 % CI {100 * gain['low']:+.2f} to {100 * gain['high']:+.2f})"
            if gain["low"] is not None
            else ""
        )
    )
    print("\n".join(lines))
    result = {
        "teacher": teacher,
        "blocks": args.blocks,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "seeds": seeds,
        "smoke": args.smoke,
        "torch_threads": torch.get_num_threads(),
        "wall_s": round(time.perf_counter() - started, 1),
        "runs": rows,
        "soft_labels_gain": gain,
        "table": lines,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_distill.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


if __name__ == "__main__":
    main()
