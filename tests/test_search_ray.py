"""`hybridtune search --backend ray`: the same trials on Ray Tune (a local Ray of 2 CPUs), the same
outputs as the local backend; and the flags refused where they cannot apply."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from hybridtune.search import run_search
from tests.test_search import _space, refused_before_writing

from .refusal import refused

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not HAS_RAY, reason="ray is not installed (pip install 'hybridtune[ray]', part of the dev extra)"
)


def _table(root: Path) -> tuple[list[str], list[dict]]:
    with (root / "trials.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return list(reader.fieldnames or []), rows


@needs_ray
def test_ray_backend_writes_the_local_backends_tables(tmp_path, tiny_bert, sentiment_csv):
    """...and its confirmation and verdict run on the cluster too, side by side, with the numbers of
    the runs they trained."""
    families = {"bitfit": {"lr": [0.01, 0.02]}}
    space = _space(tmp_path / "space.yaml", tiny_bert, sentiment_csv, verdict={"top": 0}, families=families, pruner="none")  # fmt: skip
    local = run_search(str(space), [], str(tmp_path / "local"), trials=1, threads=1, echo=lambda *_: None)
    verdict = {"top": 1, "seeds": 2, "confirm": 1, "confirm_seeds": 1, "reference": {"train": {"epochs": 1}}}
    space = _space(tmp_path / "ray.yaml", tiny_bert, sentiment_csv, verdict=verdict, families=families, pruner="none")  # fmt: skip
    lines: list[str] = []
    root = run_search(
        str(space), [], str(tmp_path / "ray"), trials=2, threads=2, echo=lines.append,
        backend="ray", cpus_per_trial=1,
    )  # fmt: skip
    assert any("2 trial(s) at a time (1 CPU each)" in line for line in lines), lines
    on_ray = [line for line in lines if line.startswith("ray: ") and "run(s)" in line]
    assert [line.split(",")[0] for line in on_ray] == ["ray: 1 run(s)", "ray: 4 run(s)"], lines
    assert "up to 2 at a time" in on_ray[1] and not any(
        line.startswith("verdict: training") for line in lines
    )
    out = json.loads((root / "verdict.json").read_text())
    for c in out["candidates"]:
        assert c["values"] == [json.loads((Path(r) / "eval.json").read_text())["accuracy"] for r in c["runs"]]
        assert [Path(r).parent for r in c["runs"]] == [root / "verdict"] * 2
    (confirmed,) = out["confirm"]["trials"]
    run = Path(confirmed["runs"][1])
    assert confirmed["values"][1] == json.loads((run / "report.json").read_text())["best_validation"]
    header, rows = _table(root)
    assert header == _table(local)[0]
    assert len(rows) == 2 and all(r["state"] == "complete" for r in rows), rows
    assert sorted(r["number"] for r in rows) == ["0", "1"]
    ray_json = json.loads((root / "trials.json").read_text())
    local_json = json.loads((local / "trials.json").read_text())
    assert {k for k in ray_json if k != "trials"} == {k for k in local_json if k != "trials"}
    assert [set(t) for t in ray_json["trials"]] == [set(local_json["trials"][0])] * 2
    for t in ray_json["trials"]:
        run = Path(t["run_dir"])
        evals = [
            json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in x
        ]
        assert t["evaluations"] == len(evals) == 4 and t["value"] == max(e["eval_accuracy"] for e in evals)
        assert json.loads((run / "trial.json").read_text())["state"] == "complete"
    assert {t["params"]["bitfit.lr"] for t in ray_json["trials"]} <= {0.01, 0.02}
    for name in ("pareto.json", "report.html", "study.journal"):
        assert (root / name).stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--address", "auto"], ["--address", "--backend ray"]),
        (["--cpus-per-trial", "2"], ["--cpus-per-trial", "--backend ray"]),
        (["--backend", "spark"], ["--backend", "local or ray"]),
        (["--backend", "ray", "--cpus-per-trial", "0"], ["--cpus-per-trial", ">= 1"]),
    ],
)
def test_backend_flags_refused_before_writing(tmp_path, tiny_bert, sentiment_csv, args, words):
    refused_before_writing(tmp_path, tiny_bert, sentiment_csv, args, words)


def test_same_length_pruning_is_refused_on_ray(tmp_path, tiny_bert, sentiment_csv):
    """Ray's ASHA compares every trial at a rung: `prune_among: same_length` said outright is refused,
    not ignored (the default, unset, is all there)."""
    args = ["--backend", "ray"]
    refused_before_writing(
        tmp_path, tiny_bert, sentiment_csv, args, ["prune_among", "--backend ray"], prune_among="same_length"
    )


def test_draw_rungs_are_refused_on_ray(tmp_path, tiny_bert, sentiment_csv):
    """Rungs between draws compare the trials' means in the local study; Ray's trials cannot."""
    args = ["--backend", "ray"]
    refused_before_writing(
        tmp_path, tiny_bert, sentiment_csv, args, ["draw_rungs", "--backend ray"], draw_rungs=True
    )


def test_ray_backend_without_ray_says_how_to_install(tmp_path, tiny_bert, sentiment_csv, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    space = _space(tmp_path / "space.yaml", tiny_bert, sentiment_csv)
    args = ["search", str(space), "--backend", "ray", "--out", str(tmp_path / "o")]
    refused(args, tmp_path / "o", "pip install 'hybridtune[ray]'", absent=True)


@needs_ray
def test_runs_on_the_cluster_come_back_in_order_and_a_refusal_stays_a_refusal(tmp_path, monkeypatch):
    """`on_cluster(...)(fn, jobs)`: each job in a Ray worker (its own process), results in the
    order of the jobs; a UserError raised in a worker is raised here as itself (exit 2, one line),
    and the other jobs are not cancelled: in Ray 2.60 a cancel that meets a finishing task's reply
    aborts this process (it took down a CI worker, 1 run in 8 of this test)."""
    import os

    import ray

    from hybridtune.errors import UserError
    from hybridtune.search import ray_tune

    cancelled: list = []
    monkeypatch.setattr(ray, "cancel", lambda ref, **kw: cancelled.append(ref))
    cluster = ray_tune.connect(None, 2, 1, 0)
    try:
        each = ray_tune.on_cluster(cluster, echo=lambda *_: None)
        out = each(
            _square, [({}, x, tmp_path / f"r{x}", None) for x in (3, 4, 5)]
        )  # (raw, seed, run, tracked)
        assert [o[0] for o in out] == [9, 16, 25] and all(o[1] != os.getpid() for o in out)
        with pytest.raises(UserError, match="train.lr"):
            each(_square, [({}, x, tmp_path / f"r{x}", None) for x in (2, -1)])
        assert cancelled == []
    finally:
        cluster.close()


def _square(raw: dict, x: int, target: Path, tracked=None, echo=print):
    import os

    from hybridtune.errors import UserError

    if x < 0:
        raise UserError("train.lr", str(x), "a number > 0")
    return x * x, os.getpid()
