"""Few-shot searches: a base recipe with `data.shots` k and `data.draws` n > 1 (docs/few_shot.md)
scores every recipe on all n draws, as `hybridtune compare` does, so that a search does not pick the
strategy that suits one lucky draw of k labels.

- A trial trains draw 0 first, in its own run dir (`trials/trial-NNNN/`, the recipe.yaml that
  `hybridtune train` runs as is), with the pruning callback: the rungs are draw 0's validations, so
  a weak trial is stopped within its first draw. A trial that completes draw 0 then trains draws
  1 .. n-1, unpruned, in `trials/trial-NNNN/draws/d<i>/`; its value is the mean of the n draws' best
  validation scores (`draw_values` in trial.json and the trials table).
- The confirmation scores a trial with a fresh seed the same way: the mean over the n draws.
- The verdict trains each recipe on every (seed, draw) and pairs candidate and reference by
  (seed, draw): the same k labels and the same seed on both sides.

Everything here reads the draws from the recipe itself (`data.shots`, `data.draws`), so a job sent
to a Ray worker carries them.
"""

from __future__ import annotations

import copy
from pathlib import Path

from hybridtune.data import shots


def scored(raw: dict) -> list[int | None]:
    """The draws a recipe (a dict, as validated) is scored on: data/shots.py's `scored`, the rule
    `hybridtune compare` follows -- 0 .. n-1, or [None] for the recipe as it is."""
    data = raw.get("data") or {}
    return shots.scored(data.get("shots"), int(data.get("draws") or 1))


def count(raw: dict) -> int:
    """How many draws a recipe is scored on."""
    return len(scored(raw))


def on_draw(raw: dict, draw: int | None) -> dict:
    """`raw` training draw `draw` (`data.draw`); None: `raw` as it is."""
    out = copy.deepcopy(raw)
    if draw is not None:
        out.setdefault("data", {})["draw"] = draw
    return out


def run_dir(run: Path, draw: int | None) -> Path:
    """Where draw `draw` of the run `run` goes: draw 0 (or None) is the run itself, the others
    beneath it (so a run's removal removes its draws)."""
    return run if not draw else run / "draws" / f"d{draw}"


def verdict_runs(name: str, seeds: list[int], raw: dict) -> list[tuple[int, int | None, str]]:
    """(seed, draw, run name) of every verdict run of the recipe `raw` named `name`, seed-major,
    named as `hybridtune compare` names them (`<name>-s<seed>[-d<draw>]`)."""
    return [(s, d, shots.run_name(name, s, d)) for s in seeds for d in scored(raw)]
