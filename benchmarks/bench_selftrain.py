"""Self-training: 64 labels per class of Rotten Tomatoes, with vs without the rest of its training
split as unlabelled text (docs/few_shot.md, "Self-training on unlabelled text").

    python benchmarks/bench_selftrain.py --draws 5 --out selftrain.json
    python benchmarks/bench_selftrain.py --smoke      # a wiring check: a 400-row pool, 1 epoch, 2 draws

For each draw d (data.draw = d of --draws, train.seed = d) one `hybridtune train
recipes/self_training.yaml` process. Its round 0 *is* the run without the unlabelled texts: the
recipe without `self_training` and `data.unlabeled`, on the same draw with the same seed and
settings (checked here: round-0/recipe.yaml is the plain recipe's). Its kept round (report.json's:
self_training.keep, best on validation by default; the 2026-12-02 table was taken when the last
round was always kept) is the run with them. The gain is kept − round 0 test accuracy, paired by
draw: mean and 95 % t-interval (hybridtune.report.stats.paired, Student's t over the draws).

Also per draw: the texts each round added (per class), how many of them were labelled right (the
unlabelled texts are Rotten Tomatoes sentences whose labels `train_rest` dropped, so the truth is
known here), round 0's and the kept round's validation accuracy, and the wall time of the whole
self-training (round 0 included). Printed as markdown, written to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, ROOT, machine, run_child  # noqa: E402

RECIPE = ROOT / "recipes" / "self_training.yaml"
SMOKE = [
    "data.max_train_samples=400",  # the pool: 128 drawn, 272 unlabelled
    "data.validation_shots=16",
    "data.max_eval_samples=64",
    "train.epochs=1",
    "train.precision=fp32",
    "self_training.rounds=1",
    "self_training.threshold=0.5",  # an untrained-for-long teacher is rarely 90 % sure
    "self_training.student_overrides=[train.epochs=1]",
]


def plain_recipe_yaml(overrides: list[str], out: Path) -> str:
    """The recipe without self-training, as round 0 must have written it."""
    from hybridtune.recipe import load_recipe, recipe_to_yaml, validate_recipe

    raw = load_recipe(RECIPE, overrides).model_dump(mode="json")
    raw["self_training"] = None
    raw["data"]["unlabeled"] = None
    plain = validate_recipe(raw)
    plain.output.dir, plain.output.name = str(out), "round-0"
    return recipe_to_yaml(plain)


def truth(overrides: list[str]) -> dict[str, object]:
    """text -> true label of the unlabelled texts (the rest of the train split, labels dropped)."""
    from hybridtune.recipe import load_recipe
    from hybridtune.tasks import classification

    data = load_recipe(RECIPE, overrides).data
    rest = classification.load_splits(data).rest
    return dict(zip(rest[data.text_column], rest[data.label_column], strict=True))


def one_draw(draw: int, draws: int, extra: list[str], root: Path) -> dict:
    from hybridtune.data.lines import text_lines

    overrides = [f"data.draws={draws}", f"data.draw={draw}", f"train.seed={draw}", *extra]
    out = root / f"d{draw}"
    measured = run_child(
        [
            PYTHON,
            "-m",
            "hybridtune",
            "train",
            str(RECIPE),
            *overrides,
            f"output.dir={root}",
            f"output.name=d{draw}",
        ]
    )
    assert (out / "round-0" / "recipe.yaml").read_text() == plain_recipe_yaml(overrides, out), (
        "round 0 is not the plain recipe"
    )
    report = json.loads((out / "report.json").read_text())
    rounds = report["self_training"]["rounds"]
    labels = truth(overrides)
    added = []
    for r in rounds[1:]:
        rows = [json.loads(x) for x in text_lines(Path(r["pseudo_labels"]).read_text(encoding="utf-8"))]
        right = sum(labels[row["text"]] == row["label"] for row in rows)
        added.append({"round": r["round"], "added": r["added"], "right": right, "trained": r.get("trained")})
    return {
        "draw": draw,
        "without": rounds[0]["test"]["accuracy"],
        "with": report["test"]["accuracy"],
        "validation_without": rounds[0]["validation"],
        "validation_with": report["best_validation"],
        "final_round": report["self_training"]["final_round"],  # the kept round: "with" is its
        "keep": report["self_training"]["keep"],
        "unlabeled": report["self_training"]["unlabeled"]["texts"],
        "rounds": added,
        "wall_s": measured["wall_s"],
        "train_s": report["train_seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--out", default="selftrain-results.json")
    ap.add_argument("--smoke", action="store_true", help="tiny settings: wiring only, numbers mean nothing")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of recipes/self_training.yaml")
    a = ap.parse_args()
    extra = list(a.overrides)
    if a.smoke:
        a.draws, extra = 2, [*SMOKE, *extra]
    from hybridtune.report.stats import paired

    root = Path(tempfile.mkdtemp(prefix="bench-selftrain-"))
    rows = [one_draw(d, a.draws, extra, root) for d in range(a.draws)]
    gain = paired([r["with"] for r in rows], [r["without"] for r in rows])
    result = {"machine": machine(), "recipe": str(RECIPE), "overrides": extra, "draws": rows, "gain": gain}
    Path(a.out).write_text(json.dumps(result, indent=1))
    lines = [f"machine: {result['machine']}", f"recipe: recipes/self_training.yaml {' '.join(extra)}", ""]
    lines += [
        "| draw | test acc. without % | with % | gain pt | val. without / with % | added per round (right) | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        added = "; ".join(
            f"r{x['round']}: {sum(x['added'].values())} ({x['right']})"
            + ("" if x["trained"] else ", not trained")
            for x in r["rounds"]
        )
        val = f"{100 * (r['validation_without'] or 0):.1f} / {100 * (r['validation_with'] or 0):.1f}"
        lines.append(
            f"| {r['draw']} | {100 * r['without']:.2f} | {100 * r['with']:.2f} | "
            f"{100 * (r['with'] - r['without']):+.2f} | {val} | {added} | {r['wall_s']:.0f} |"
        )
    interval = (
        f"95 % CI {100 * gain['low']:+.2f} to {100 * gain['high']:+.2f} pt"
        if gain["low"] is not None
        else "no interval from one draw"
    )
    lines += [
        "",
        f"gain (with − without, paired by draw): {100 * gain['mean']:+.2f} pt, {interval} ({gain['verdict']})",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
