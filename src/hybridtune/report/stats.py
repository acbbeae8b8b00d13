"""Paired comparisons over seeds: a candidate against a reference run with the same seeds (same data
order and head initialisation), so the seed-to-seed noise they share cancels in the difference.

The 95 % interval of the mean paired difference is Student's t with n - 1 degrees of freedom; the
word is "better" / "worse" when the interval excludes zero, else "no difference detectable". One
seed gives no interval. Used by `hybridtune compare --reference` and by the search's verdict.
"""

from __future__ import annotations

import math
import statistics

from hybridtune import tasks

WORDS = {
    "better": "better than",
    "worse": "worse than",
    "no difference detectable": "not detectably different from",
}


def higher_is_better(metric: str) -> bool:
    """As the registered tasks declare it (hybridtune/tasks/__init__.py: loss, perplexity are better lower)."""
    return tasks.higher_is_better(metric)


def paired(candidate: list[float], reference: list[float], higher_is_better: bool = True) -> dict:
    """Mean and 95 % t-interval of the paired differences candidate - reference, and the verdict."""
    from scipy import stats

    diffs = [a - b for a, b in zip(candidate, reference, strict=True)]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    out = {"diffs": diffs, "mean": mean, "sd": None, "low": None, "high": None}
    if n > 1:
        sd = statistics.stdev(diffs)
        half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
        out |= {"sd": sd, "low": mean - half, "high": mean + half}
    if out["low"] is not None and (out["low"] > 0 or out["high"] < 0):
        better = (out["low"] > 0) == higher_is_better
        out["verdict"] = "better" if better else "worse"
    else:
        out["verdict"] = "no difference detectable"
    return out


def scale(metric: str) -> tuple[float, str]:
    """Shares are shown in points (x 100, " pt"); a loss or perplexity as it is."""
    return (1, "") if not higher_is_better(metric) else (100, " pt")


def interval_text(p: dict, metric: str) -> str:
    k, _ = scale(metric)
    if p["low"] is None:
        return "no interval from 1 seed"
    return f"95 % CI {k * p['low']:+.2f} to {k * p['high']:+.2f}"


def sentence(name: str, p: dict, reference: str, metric: str, seeds: int, draws: int = 1) -> str:
    """e.g. "lora is better than full on the test split: +1.20 pt test accuracy (95 % CI +0.40 to
    +2.00, 3 seeds)." (with few-shot draws: "3 seeds × 5 draws")"""
    k, unit = scale(metric)
    runs = f"{seeds} seeds" + (f" × {draws} draws" if draws > 1 else "")
    return (
        f"{name} is {WORDS[p['verdict']]} {reference} on the test split: "
        f"{k * p['mean']:+.2f}{unit} test {metric} ({interval_text(p, metric)}, {runs})."
    )
