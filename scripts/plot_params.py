"""Draw docs/img/strategies.png: what each example recipe trains, per layer (no training needed).

.venv/bin/python scripts/plot_params.py [recipes/*.yaml ...]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hybridtune import api  # noqa: E402
from hybridtune.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(paths: list[str]) -> None:
    recipes = [Path(p) for p in paths] or sorted((ROOT / "recipes").glob("*.yaml"))
    names, tables = [], []
    for path in recipes:
        recipe = load_recipe(path)
        if recipe.task != "classification":
            continue
        names.append(recipe.name)
        tables.append(api.params(recipe))
    slots = [r["slot"] for r in tables[0]["rows"] if r["slot"] != "added"]
    if any(r["slot"] == "added" for t in tables for r in t["rows"]):
        slots.append("added")  # parameters outside the model's own modules: a prefix / prompt encoder
    grid = np.array(
        [
            [
                next((100 * r["trainable"] / r["total"] for r in t["rows"] if r["slot"] == s), 0.0)
                for s in slots
            ]
            for t in tables
        ]
    )
    fig, ax = plt.subplots(figsize=(1.1 * len(slots) + 3, 0.45 * len(names) + 1.6))
    # a log colour scale: BitFit's 0.2 % and LoRA's 0.7 % of a block must not look like 0 %
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#e8e8e8")
    shown = np.ma.masked_where(grid <= 0, np.clip(grid, 0.01, 100))
    image = ax.imshow(shown, cmap=cmap, norm=matplotlib.colors.LogNorm(vmin=0.01, vmax=100), aspect="auto")
    ax.set_xticks(range(len(slots)), slots, rotation=30, ha="right")
    ax.set_yticks(
        range(len(names)), [f"{n}  ({t['trainable_pct']:.2f} %)" for n, t in zip(names, tables, strict=True)]
    )
    for i in range(len(names)):
        for j in range(len(slots)):
            value = grid[i, j]
            text = "0" if value == 0 else f"{value:.2f}" if value < 1 else f"{value:.0f}"
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=7,
                color="black" if value == 0 or value > 30 else "white",
            )
    ax.set_title("What each strategy trains at its start: % of each layer's parameters (MiniLM, 6 blocks)")
    fig.colorbar(image, ax=ax, label="% trainable (log scale; grey = frozen)")
    fig.tight_layout()
    out = ROOT / "docs" / "img" / "strategies.png"
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
