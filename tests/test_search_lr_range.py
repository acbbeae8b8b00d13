"""The lr range test before a search (search/lr_range.py) on the tiny BERT: the exponential schedule
as the optimizer ran it, the stop at divergence, the suggestion inside the tested range, the trials
sampling inside the narrowed range, resume without a rerun, bad settings refused before anything
is written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hybridtune.search import run_search
from hybridtune.search.lr_range import CEILING, DIVERGE, bounds, lr_at, narrowed, run_test, suggestions
from hybridtune.search.params import Param
from hybridtune.search.setup import load_space, resolve
from hybridtune.search.space import LrRangeTest, Space

from .test_search import _space, refused_before_writing


def _context(tmp_path: Path, tiny_bert: str, data: str, **test):
    space = _space(tmp_path / "space.yaml", tiny_bert, data, lr_range_test=test)
    return resolve(load_space(str(space)), "space.yaml")


def test_the_lr_grows_exponentially_as_the_optimizer_ran_it(tmp_path, tiny_bert, sentiment_csv):
    """Up to 0.1 the tiny model does not diverge: every step runs, at low (high/low)^(i/(steps-1))
    as read back from the optimizer, and the suggestion follows the minimum rule."""
    ctx = _context(tmp_path, tiny_bert, sentiment_csv, steps=12, low=1e-5, high=0.1)
    record = run_test(ctx, "full")
    test = ctx.space.lr_range_test
    assert record["steps_run"] == 12 and not record["diverged"]
    expected = [1e-5 * (0.1 / 1e-5) ** (i / 11) for i in range(12)]
    assert record["lrs"] == pytest.approx(expected, rel=1e-9)
    assert [lr_at(i, test) for i in range(12)] == pytest.approx(expected, rel=1e-12)
    assert all(b > a for a, b in zip(record["lrs"], record["lrs"][1:], strict=False))
    assert len(record["losses"]) == len(record["smoothed"]) == 12
    assert all(math.isfinite(x) and x > 0 for x in record["losses"])
    lowest = min(range(12), key=record["smoothed"].__getitem__)
    assert record["suggestions"]["lowest_loss_lr"] == record["lrs"][lowest]
    assert record["suggestion"] == pytest.approx(max(record["lrs"][lowest] / 10, 1e-5))
    assert 1e-5 <= record["suggestion"] <= 0.1


def test_a_huge_high_lr_stops_the_test_at_divergence(tmp_path, tiny_bert, sentiment_csv):
    ctx = _context(tmp_path, tiny_bert, sentiment_csv, steps=60, low=1e-3, high=10.0)
    record = run_test(ctx, "full")
    assert record["diverged"] and record["steps_run"] < 60, record["smoothed"]
    smoothed = record["smoothed"]
    # stopped by the 4x rule on the smoothed loss, at the first step that broke it
    assert smoothed[-1] > DIVERGE * min(smoothed)
    assert all(smooth <= DIVERGE * min(smoothed[: i + 1]) for i, smooth in enumerate(smoothed[:-1]))
    assert 1e-3 <= record["suggestion"] < record["suggestions"]["lowest_loss_lr"] <= 10.0


def test_trials_sample_inside_the_narrowed_range_and_resume_reuses_it(tmp_path, tiny_bert, sentiment_csv):
    """full: its default lr range, which the window is cut to (or kept: `within: family`); lora: the
    space file's range, likewise; bitfit: a fixed lr, not tested. A second invocation reruns no test
    and samples from the same ranges."""
    families = {
        "full": {},
        "lora": {"lr": {"low": 1e-3, "high": 3e-2, "log": True}, "r": [2]},
        "bitfit": {"lr": 0.005},
    }
    test = {"steps": 15, "low": 1e-4, "high": 1.0}
    space = _space(
        tmp_path / "space.yaml", tiny_bert, sentiment_csv, families=families, lr_range_test=test,
        verdict={"top": 0}, enqueue=[{"family": "bitfit"}],
    )  # fmt: skip
    out = tmp_path / "out"
    lines: list[str] = []
    run_search(str(space), [], str(out), trials=4, threads=1, echo=lines.append)
    held = json.loads((out / "lr_range.json").read_text())
    assert held["settings"] == LrRangeTest(**test).model_dump()
    results = held["families"]
    assert set(results) == {"full", "lora"}
    assert any("bitfit: its lr is fixed in the space file; not tested" in line for line in lines)
    config = LrRangeTest(**test)
    assert 1e-4 <= results["full"]["suggestion"] <= 1.0
    for family, own in (
        ("full", Param(low=1e-5, high=1e-4, log=True)),
        ("lora", Param(low=1e-3, high=3e-2, log=True)),
    ):
        record = results[family]
        assert record["before"] == own.to_yaml() | {"log": True}
        window, _ = narrowed(record["suggestion"], config, None)
        if max(window.low, own.low) < min(window.high, own.high):
            assert (record["range"]["low"], record["range"]["high"]) == (
                pytest.approx(max(window.low, own.low)), pytest.approx(min(window.high, own.high))
            )  # fmt: skip
        else:
            assert (record["range"]["low"], record["range"]["high"]) == (own.low, own.high)
            assert "kept" in record["note"]
    assert (out / "lr_range.png").stat().st_size > 0
    assert 'id="lr_range"' in (out / "report.html").read_text()

    def sampled() -> list[tuple[str, float]]:
        trials = json.loads((out / "trials.json").read_text())["trials"]
        return [(k.split(".")[0], v) for t in trials for k, v in t["params"].items() if k.endswith(".lr")]

    seen = sampled()
    assert {family for family, _ in seen} <= {"full", "lora"} and seen
    for family, lr in seen:
        assert results[family]["range"]["low"] <= lr <= results[family]["range"]["high"], (family, lr)

    before = (out / "lr_range.json").read_text(), (out / "lr_range.json").stat().st_mtime_ns
    lines.clear()
    run_search(str(space), [], str(out), trials=7, threads=1, echo=lines.append)
    assert ((out / "lr_range.json").read_text(), (out / "lr_range.json").stat().st_mtime_ns) == before
    assert any("full: done earlier, kept" in line for line in lines), lines
    assert not any("steps, lr" in line for line in lines), lines  # no test ran again
    assert len(json.loads((out / "trials.json").read_text())["trials"]) == 7
    for family, lr in sampled():
        assert results[family]["range"]["low"] <= lr <= results[family]["range"]["high"], (family, lr)


def test_suggestion_rules_and_the_window():
    test = LrRangeTest(steps=5, low=1e-6, high=1.0)
    lrs = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    smoothed = [0.70, 0.69, 0.60, 0.30, 0.20, 0.90]  # falls fastest from 1e-4 to 1e-3, lowest at 1e-2
    found = suggestions(lrs, smoothed, test)
    assert found == {"minimum": pytest.approx(1e-3), "steepest": 1e-4, "lowest_loss_lr": 1e-2}
    assert suggestions(lrs, [0.5, 0.6, 0.7, 0.8, 0.9, 1.0], test)["minimum"] == 1e-6  # clipped to low
    assert narrowed(1e-3, test, None) == (Param(low=pytest.approx(1e-3 / 3), high=3e-3, log=True), None)
    assert narrowed(0.9, test, None)[0].high == CEILING  # a family's lr is < 1
    cut, note = narrowed(1e-3, test, Param(low=5e-4, high=1e-2, log=True))
    assert (cut.low, cut.high, note) == (5e-4, 3e-3, None)
    own = Param(low=1e-1, high=0.5, log=True)
    assert narrowed(1e-3, test, own)[0] is own and "kept" in narrowed(1e-3, test, own)[1]


def test_the_window_keeps_to_the_familys_range_unless_within_test():
    """`within: family` (default): the default lr range bounds the window as a space file's does;
    `within: test`: only a range the space file sets does."""
    space = Space.model_validate({"families": {"adapters": {}, "lora": {"lr": {"low": 1e-3, "high": 1e-2}}}})
    adapters, lora = space.chosen()["adapters"], space.chosen()["lora"]
    default = LrRangeTest()
    assert bounds(adapters, default) == adapters.lr == Param(low=1e-4, high=3e-3, log=True)
    assert bounds(lora, default) == bounds(lora, LrRangeTest(within="test")) == lora.lr
    assert bounds(adapters, LrRangeTest(within="test")) is None
    # the light-long search's adapters test (docs/search.md): suggestion 3.76e-3
    cut, _ = narrowed(3.76e-3, default, bounds(adapters, default))
    assert (cut.low, cut.high) == (pytest.approx(3.76e-3 / 3), 3e-3)
    assert narrowed(3.76e-3, default, None)[0].high == pytest.approx(3 * 3.76e-3)
    assert "within" not in Space.model_validate({"lr_range_test": True}).identity()["lr_range_test"]
    assert (
        Space.model_validate({"lr_range_test": {"within": "test"}}).identity()["lr_range_test"]["within"]
        == "test"
    )


def test_typical_values_of_a_setting():
    assert Param(choices=(4, 8)).typical() == 4
    assert Param(low=1e-4, high=1e-2, log=True).typical() == pytest.approx(1e-3)
    assert Param(low=0.2, high=0.6).typical() == pytest.approx(0.4)
    assert Param(low=1, high=4, integer=True).typical() == 2  # round(2.5): banker's rounding
    assert Param(low=0.0, high=1.0, step=0.3).typical() == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"low": 1e-2, "high": 1e-3}, ["lr_range_test", "low 0.01 >= high 0.001"]),
        ({"steps": 2}, ["lr_range_test.steps", "greater than or equal to 5"]),
        ({"stpes": 10}, ["lr_range_test.stpes", "did you mean 'steps'"]),
        ({"high": 50}, ["lr_range_test.high", "less than or equal to 10"]),
        ({"factor": 1}, ["lr_range_test.factor", "greater than 1"]),
        ({"suggest": "valley"}, ["lr_range_test.suggest", "minimum", "steepest"]),
        ({"within": "default"}, ["lr_range_test.within", "'family'", "'test'"]),
        ("yes", ["lr_range_test", "true, false or a mapping"]),
    ],
)
def test_bad_settings_exit_2_before_writing(tmp_path, tiny_bert, sentiment_csv, value, words):
    refused_before_writing(tmp_path, tiny_bert, sentiment_csv, [], words, lr_range_test=value)
