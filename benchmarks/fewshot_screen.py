"""A validation screen of one setting of a few-shot recipe (docs/few_shot.md): every draw of k labels
per class trained with each value of the setting through `hybridtune train`, validated on
`--validation-shots` per class drawn from the validation split, with no early stopping. The table
gives each run's validation accuracy at its last evaluation — the model that the same run without
validation ends with — per draw, the mean, and each value's paired difference to the first. The
test split is never read: a value is picked here, then measured on test draws by bench_fewshot.py.

    python benchmarks/fewshot_screen.py recipes/setfit_then_all.yaml --shots 64 --draws 5 \\
        --validation-shots 250 --setting train.epochs --values 10 3 1 --set contrastive.pairs=10 \\
        --out DIR

Runs finished in DIR (`d<draw>-<value>/done`) are kept: a stopped screen goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from statistics import mean, stdev

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, ROOT, machine, run_child  # noqa: E402

from hybridtune.report.stats import paired  # noqa: E402


def last_validation(run_dir: Path) -> float:
    """The validation accuracy (%) of a run's last evaluation, from its metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    return 100 * max(evals, key=lambda r: r["step"])["eval_accuracy"]


def screen(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    scores: dict[str, dict[int, float]] = {value: {} for value in args.values}
    for draw in range(args.first_draw, args.draws):
        for value in args.values:
            out = args.out / f"d{draw}-{value}"
            if not (out / "done").exists():
                shutil.rmtree(out, ignore_errors=True)
                cmd = [PYTHON, "-m", "hybridtune", "train", str(ROOT / args.recipe)]
                cmd += [f"data.shots={args.shots}", f"data.draws={args.draws}", f"data.draw={draw}"]
                cmd += [f"data.validation_shots={args.validation_shots}", f"train.seed={draw}"]
                cmd += ["train.early_stopping.patience=null", *args.set, f"{args.setting}={value}"]
                measured = run_child([*cmd, f"output.dir={out}"])
                (out / "done").write_text(json.dumps(measured))
                print(f"draw {draw} {args.setting}={value}: {measured['wall_s']:.1f} s", flush=True)
            run_dir = next(p for p in out.iterdir() if p.is_dir())
            scores[value][draw] = last_validation(run_dir)
    return scores


def table(scores: dict[str, dict[int, float]], setting: str) -> str:
    first = next(iter(scores.values()))
    draws = sorted(first)
    lines = [
        f"| {setting} | validation accuracy % per draw | mean ± sd | paired Δ vs the first, pt (95 % CI) |"
    ]
    lines.append("|---|---|---:|---:|")
    for value, by_draw in scores.items():
        accs = [by_draw[d] for d in draws]
        p = paired(accs, [first[d] for d in draws])
        interval = f" ({p['low']:+.2f}, {p['high']:+.2f})" if p["low"] is not None else ""
        spread = f" ± {stdev(accs):.2f}" if len(accs) > 1 else ""
        lines.append(
            f"| {value} | {', '.join(f'{a:.2f}' for a in accs)} | {mean(accs):.2f}{spread} | {p['mean']:+.2f}{interval} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a recipe file, relative to the repository")
    parser.add_argument("--shots", type=int, required=True)
    parser.add_argument("--draws", type=int, default=5, help="draws first-draw .. draws-1")
    parser.add_argument("--first-draw", type=int, default=0)
    parser.add_argument("--validation-shots", type=int, default=250)
    parser.add_argument("--setting", required=True, help="a recipe key, e.g. train.epochs")
    parser.add_argument("--values", nargs="+", required=True)
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides every run shares")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(machine())
    scores = screen(args)
    print(table(scores, args.setting))
    (args.out / "screen.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "scores": scores})
    )


if __name__ == "__main__":
    main()
