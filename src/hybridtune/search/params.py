"""One searched setting of a space: a fixed value, a list of choices, or a range.

    r: 8                                  # fixed: every trial uses 8
    r: [4, 8, 16]                         # choices (Optuna's suggest_categorical)
    lr: {low: 1.0e-5, high: 1.0e-3, log: true}   # a range (suggest_float / suggest_int, log scale)
    epochs: {low: 1, high: 3, step: 1}    # the key's kind decides int or float; `step` a grid

`param(kind, ...)` makes the pydantic type of a space key: it parses the YAML form into a `Param`
and checks every value a trial could get against the key's domain (a rank >= 1, a share in (0, 1]),
so a space that cannot produce a valid recipe is refused with its key path before anything runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator


@dataclass(frozen=True)
class Param:
    choices: tuple | None = None  # fixed = one choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    integer: bool = False

    def sample(self, trial: Any, name: str) -> Any:
        """The value of this setting in an Optuna trial; a fixed value is not a trial parameter."""
        if self.choices is not None:
            if len(self.choices) == 1:
                return self.choices[0]
            return trial.suggest_categorical(name, list(self.choices))
        if self.integer:
            return trial.suggest_int(
                name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def corners(self) -> list:
        """The values that bound what a trial can get: every choice, or both ends of the range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]

    def typical(self) -> Any:
        """One value standing for the setting (what the lr range test trains with): the fixed value
        or the first choice, or the middle of a range (geometric on a log scale, on its grid)."""
        if self.choices is not None:
            return self.choices[0]
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        if self.step is not None:
            mid = self.low + round((mid - self.low) / self.step) * self.step
        return round(mid) if self.integer else mid

    def to_yaml(self) -> Any:
        if self.choices is not None:
            return self.choices[0] if len(self.choices) == 1 else list(self.choices)
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


def _check(value: Any, kind: type, ge, gt, le, lt, allowed) -> None:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"found {value!r} ({type(value).__name__}); expected a {kind.__name__}")
    if allowed is not None and value not in allowed:
        raise ValueError(f"found {value!r}; expected one of {', '.join(map(str, allowed))}")
    checks = {">=": (ge, lambda b: value >= b), ">": (gt, lambda b: value > b),
              "<=": (le, lambda b: value <= b), "<": (lt, lambda b: value < b)}  # fmt: skip
    for word, (bound, ok) in checks.items():
        if bound is not None and not ok(bound):
            raise ValueError(f"found {value!r}; expected a value {word} {bound}")


def parse_param(raw: Any, kind: type, ge=None, gt=None, le=None, lt=None, allowed=None) -> Param:
    """The YAML form of a setting -> Param, every reachable value checked against the domain."""
    if isinstance(raw, Param):
        return raw
    if isinstance(raw, list | tuple):
        if not raw:
            raise ValueError("found an empty list; expected at least one value to choose from")
        for value in raw:
            _check(value, kind, ge, gt, le, lt, allowed)
        if len(set(map(repr, raw))) < len(raw):
            raise ValueError(f"found {list(raw)!r}, a value twice; expected distinct choices")
        return Param(choices=tuple(kind(v) if kind in (int, float) else v for v in raw))
    if isinstance(raw, dict):
        unknown = set(raw) - {"low", "high", "log", "step"}
        if unknown or not {"low", "high"} <= set(raw):
            raise ValueError(
                f"found a mapping with keys {', '.join(map(str, raw))}; expected low, high (and log, step)"
            )
        if kind not in (int, float) or allowed is not None:
            raise ValueError(f"found a range {raw!r}; expected a value or a list of values (not a range)")
        low, high = raw["low"], raw["high"]
        for value in (low, high):
            _check(value, kind, ge, gt, le, lt, allowed)
        if not low < high:
            raise ValueError(f"found low {low} >= high {high}; expected low < high (or one fixed value)")
        log = bool(raw.get("log", False))
        if log and low <= 0:
            raise ValueError(f"found log: true with low {low}; expected low > 0 on a log scale")
        step = raw.get("step")
        if step is not None and (log or not step > 0 or step > high - low):
            raise ValueError(f"found step {step}; expected 0 < step <= high - low, and no log scale")
        # the key's kind decides, not the bounds' spelling: epochs {low: 1, high: 3} takes any float
        return Param(low=kind(low), high=kind(high), log=log, step=step, integer=kind is int)
    _check(raw, kind, ge, gt, le, lt, allowed)
    return Param(choices=(kind(raw) if kind in (int, float) else raw,))


def param(kind: type, ge=None, gt=None, le=None, lt=None, allowed=None) -> Any:
    """The pydantic type of a space setting of `kind` with its domain (bounds, allowed values)."""

    def validate(raw: Any) -> Param:
        return parse_param(raw, kind, ge, gt, le, lt, allowed)

    return Annotated[Param, BeforeValidator(validate)]


def share_to_blocks(share: float, blocks: int, at_least: int = 1) -> int:
    """A share of the model's blocks as a count: round(share x L), at least `at_least`, at most L."""
    return max(at_least, min(blocks, math.floor(share * blocks + 0.5)))
