"""compare: a small suite on a tiny model — outputs, numbers equal to the run files, resume, the HTML
report rendered in headless Chromium."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hybridtune.compare import compare, load_suite
from hybridtune.errors import UserError

from .refusal import refused

RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.fixture(scope="module")
def suite(tmp_path_factory, tiny_bert, sentiment_csv) -> Path:
    path = tmp_path_factory.mktemp("suite") / "suite.yaml"
    path.write_text(
        f"""name: tiny
overrides: ["model={tiny_bert}", "data.source={sentiment_csv}", "train.max_steps=4", "train.eval_steps=2",
            "train.precision=fp32", "train.lr=0.005"]
seeds: [1]
strategies:
  - {RECIPES / "full.yaml"}
  - {{recipe: {RECIPES / "head_only.yaml"}, name: probe}}
"""
    )
    return path


@pytest.fixture(scope="module")
def compared(suite, tmp_path_factory) -> Path:
    """One compare of 2 strategies x 2 seeds, shared by the tests below (which only read it)."""
    return compare(str(suite), str(tmp_path_factory.mktemp("cmp") / "cmp"), seeds=2, echo=lambda *_: None)


def test_outputs_and_numbers_equal_the_run_files(compared):
    for name in (
        "comparison.csv",
        "comparison.json",
        "report.html",
        "metric_vs_params.png",
        "learning_curves.png",
        "time_vs_metric.png",
    ):
        assert (compared / name).stat().st_size > 0, name
    data = json.loads((compared / "comparison.json").read_text())
    assert [r["run"] for r in data["runs"]] == ["full-s1", "full-s2", "probe-s1", "probe-s2"]
    for row in data["runs"]:
        run = compared / "runs" / row["run"]
        evaluation = json.loads((run / "eval.json").read_text())
        params = json.loads((run / "params.json").read_text())
        report = json.loads((run / "report.json").read_text())
        assert row["test_metric"] == evaluation["accuracy"] and row["test_f1_macro"] == evaluation["f1_macro"]
        assert row["trainable"] == params["trainable"] and row["train_seconds"] == report["train_seconds"]
        assert row["peak_rss_mib"] > 100 and row["seconds_to_best"] is not None
        assert len(row["curve"]) == 2  # evaluations at steps 2 and 4
        assert row["cached_blocks"] == report["trunk_cache"]["depth"]
    with (compared / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["test_metric"]) for r in rows] == [r["test_metric"] for r in data["runs"]]
    full, probe = data["summary"]
    assert full["strategy"] == "full" and probe["strategy"] == "probe"
    assert full["test_metric"] == pytest.approx(
        (data["runs"][0]["test_metric"] + data["runs"][1]["test_metric"]) / 2
    )
    assert probe["trainable"] < full["trainable"]
    assert full["cached_blocks"] == 0 and probe["cached_blocks"] == 2  # head-only: both tiny blocks
    # the HTML shows the same numbers as the files
    page = (compared / "report.html").read_text()
    assert f"{100 * full['test_metric']:.2f}" in page and f"{probe['trainable']:,.0f}" in page


def test_reference_pairs_every_strategy_seed_by_seed(suite, compared, tmp_path):
    """`--reference full`: the kept runs (nothing retrained) with the search verdict's columns; the
    numbers are the run files' test scores, paired by seed."""
    from scipy import stats
    from typer.testing import CliRunner

    from hybridtune.cli import app

    copy = Path(shutil.copytree(compared, tmp_path / "copy"))
    result = CliRunner().invoke(
        app, ["compare", str(suite), "--seeds", "2", "--reference", "full", "--out", str(copy)]
    )
    assert result.exit_code == 0, (result.stdout, result.stderr)
    data = json.loads((copy / "comparison.json").read_text())
    test = {
        r["run"]: json.loads((copy / "runs" / r["run"] / "eval.json").read_text())["accuracy"]
        for r in data["runs"]
    }
    diffs = [test["probe-s1"] - test["full-s1"], test["probe-s2"] - test["full-s2"]]
    full, probe = data["summary"]
    assert full["vs_reference"] == {"reference": "full", "is_reference": True}
    v = probe["vs_reference"]
    assert v["diffs"] == pytest.approx(diffs) and v["seeds"] == [1, 2]
    half = stats.t.ppf(0.975, 1) * abs(diffs[0] - diffs[1]) / 2**0.5 / 2**0.5
    assert v["low"] == pytest.approx(sum(diffs) / 2 - half) and v["high"] == pytest.approx(
        sum(diffs) / 2 + half
    )
    word = (
        "no difference detectable" if v["low"] <= 0 <= v["high"] else ("better" if v["low"] > 0 else "worse")
    )
    assert v["verdict"] == word
    (sentence,) = data["sentences"]
    assert sentence.startswith("probe is ") and ("than full" in sentence or "different from full" in sentence)
    assert f"{100 * v['mean']:+.2f} pt test accuracy" in sentence and "2 seeds" in sentence
    with (copy / "comparison.csv").open() as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert float(rows["probe-s2"]["diff_vs_reference"]) == pytest.approx(diffs[1])
    assert rows["probe-s1"]["verdict"] == word and rows["full-s1"]["verdict"] == "(reference)"
    out = " ".join(result.stdout.split())
    assert "Δ vs full" in out and sentence in out  # the table's columns and the sentence, printed
    page = (copy / "report.html").read_text()
    assert "95 % CI of Δ" in page and f"{100 * v['mean']:+.2f}" in page and sentence in page


def test_a_bad_reference_is_refused_before_anything_runs(suite, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", str(suite), "--reference", "ful", "--out", str(out)]
    refused(args, out, "--reference", "one of full, probe", "did you mean 'full'", absent=True)


def test_resume_keeps_finished_runs_and_redoes_an_unfinished_one(suite, compared, tmp_path):
    compared = Path(shutil.copytree(compared, tmp_path / "copy"))
    before = {p.name: (p / "report.json").stat().st_mtime_ns for p in (compared / "runs").iterdir()}
    (compared / "runs" / "probe-s2" / "report.json").unlink()  # as if killed before it finished
    messages = []
    compare(str(suite), str(compared), seeds=2, echo=messages.append)
    after = {p.name: (p / "report.json").stat().st_mtime_ns for p in (compared / "runs").iterdir()}
    assert {k for k in before if before[k] != after.get(k)} == {"probe-s2"}
    assert sum("done earlier" in m for m in messages) == 3


def test_a_finished_run_whose_measurement_was_not_recorded_is_kept(suite, compared, tmp_path):
    """Killed between a run's report.json and compare's measured.json: the run is not trained again."""
    compared = Path(shutil.copytree(compared, tmp_path / "copy"))
    before = {p.name: (p / "report.json").stat().st_mtime_ns for p in (compared / "runs").iterdir()}
    measured = json.loads((compared / "measured.json").read_text())
    del measured["probe-s2"]
    (compared / "measured.json").write_text(json.dumps(measured))
    messages = []
    compare(str(suite), str(compared), seeds=2, echo=messages.append)
    after = {p.name: (p / "report.json").stat().st_mtime_ns for p in (compared / "runs").iterdir()}
    assert before == after and sum("done earlier" in m for m in messages) == 4
    assert "unmeasured" in json.loads((compared / "measured.json").read_text())["probe-s2"]
    assert [r["run"] for r in json.loads((compared / "comparison.json").read_text())["runs"]] == [
        "full-s1",
        "full-s2",
        "probe-s1",
        "probe-s2",
    ]


def test_a_run_killed_mid_training_is_resumed_from_its_checkpoint(
    tmp_path, tiny_bert, sentiment_csv, monkeypatch
):
    suite = tmp_path / "one.yaml"
    suite.write_text(
        f"""name: one
overrides: ["model={tiny_bert}", "data.source={sentiment_csv}", "train.max_steps=4", "train.eval_steps=2",
            "train.precision=fp32", "train.lr=0.005"]
seeds: [1]
strategies: [{RECIPES / "full.yaml"}]
"""
    )
    out = tmp_path / "cmp"
    monkeypatch.setenv("HYBRIDTUNE_TEST_KILL_AT", "step:3")  # the child is SIGKILLed after step 3
    with pytest.raises(UserError, match="exited with code -9"):
        compare(str(suite), str(out), echo=lambda *_: None)
    run = out / "runs" / "full-s1"
    assert (run / "checkpoints" / "checkpoint-2").is_dir() and not (run / "report.json").exists()
    monkeypatch.delenv("HYBRIDTUNE_TEST_KILL_AT")
    messages = []
    compare(str(suite), str(out), echo=messages.append)
    assert any("resumed from checkpoint-2" in m for m in messages)
    assert json.loads((out / "measured.json").read_text())["full-s1"]["resumed_from"] == "checkpoint-2"
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 4
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [
        s
        for s, x in zip(steps, (run / "metrics.jsonl").read_text().splitlines(), strict=True)
        if "eval_loss" in x
    ]
    assert evals == [2, 4]  # the evaluation at step 2 is not repeated


def test_an_interrupted_run_whose_recipe_changed_starts_over(suite, compared, tmp_path):
    from hybridtune.compare import plan_runs, resumable

    copy = Path(shutil.copytree(compared, tmp_path / "copy"))
    (copy / "runs" / "probe-s2" / "report.json").unlink()
    loaded, base = load_suite(str(suite), seeds=2)
    entry = next(e for e in plan_runs(loaded, base) if e["run"] == "probe-s2")
    assert resumable(entry, copy / "runs") is not None  # same recipe, checkpoints there
    changed = {**entry, "overrides": [*entry["overrides"], "train.lr=0.001"]}
    assert resumable(changed, copy / "runs") is None


def test_bad_suites_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategies: [x.yaml]\nseed: [1]\n")
    with pytest.raises(UserError, match="seed"):
        load_suite(str(bad))
    with pytest.raises(UserError, match="no such file"):
        load_suite(str(tmp_path / "none.yaml"))
    with pytest.raises(UserError, match="--seeds"):
        load_suite(None, seeds=0)


def test_default_suite_lists_every_family():
    suite, base = load_suite(None, seeds=3)
    assert suite.seeds == [42, 43, 44] and len(suite.strategies) >= 10
    assert all((base / s.recipe).is_file() for s in suite.strategies)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(compared, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (CI installs it)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = (compared / "report.html").as_uri()
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    assert re.search(r'<table id="comparison">', dom)
    assert len(re.findall(r"<tr>", dom)) == 1 + 2  # header + one row per strategy
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', dom)
    assert len(images) == 3
    import matplotlib.image

    for data in images:
        assert matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png").shape[0] > 100
    shot = tmp_path / "shot.png"
    subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1200,900", url],
        capture_output=True,
        timeout=120,
    )
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1200) and pixels.std() > 0.05  # not a blank page


def test_suites_in_the_repo_validate():
    from hybridtune.compare import plan_runs

    suites = sorted((Path(__file__).parent.parent / "suites").glob("*.yaml"))
    assert suites
    for path in suites:
        assert plan_runs(*load_suite(str(path)))


def test_an_ensemble_strategy_is_one_row_whose_numbers_are_its_run_files(tmp_path, tiny_bert, sentiment_csv):
    suite = tmp_path / "ens.yaml"
    suite.write_text(
        f"""name: ens
overrides: ["model={tiny_bert}", "data.source={sentiment_csv}", "train.max_steps=4", "train.eval_steps=2",
            "train.precision=fp32", "train.lr=0.005"]
strategies:
  - {{recipe: {RECIPES / "ensemble_lora.yaml"}, overrides: ["ensemble.members=2"]}}
"""
    )
    root = compare(str(suite), str(tmp_path / "cmp"), echo=lambda *_: None)
    data = json.loads((root / "comparison.json").read_text())
    (row,) = data["runs"]
    run = root / "runs" / row["run"]
    report = json.loads((run / "report.json").read_text())
    members = [json.loads((run / "members" / m / "report.json").read_text()) for m in ("0", "1")]
    assert row["test_metric"] == json.loads((run / "eval.json").read_text())["accuracy"]
    assert row["trainable"] == sum(m["trainable"] for m in members) == report["trainable"]
    assert row["train_seconds"] == report["train_seconds"]
    assert row["curve"] == [[report["train_seconds"], report["steps"], report["best_validation"]]]
