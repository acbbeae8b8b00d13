"""`train.report_to: [mlflow]`: a run's recipe and log lines in an MLflow store (read back with
MLflow's own client); a search's trials as MLflow runs with their tags; mlflow missing: exit 2,
nothing written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from hybridtune import api
from hybridtune.recipe import load_recipe
from hybridtune.search import run_search
from hybridtune.train import tracking

from .refusal import refused

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(autouse=True)
def _no_user_store(monkeypatch):
    """The default store, whatever the machine's environment says."""
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS"):
        monkeypatch.delenv(key, raising=False)


def _client(store_parent: Path):
    db = store_parent / "mlruns" / "mlflow.db"
    assert db.is_file(), f"no store at {db}"
    return mlflow.MlflowClient(f"sqlite:///{db}")


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _same(logged: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """The same steps, the same values (MLflow stores a float64; metrics.jsonl its JSON text)."""
    return [s for s, _ in logged] == [s for s, _ in expected] and [v for _, v in logged] == pytest.approx(
        [v for _, v in expected], rel=1e-9
    )


def test_run_logs_the_recipe_and_every_log_line(quick, tmp_path):
    summary = api.train(
        load_recipe(None, quick(None, "train.report_to=[mlflow]", "train.epochs=1", "output.name=tracked"))
    )
    run = Path(summary["run_dir"])
    client = _client(tmp_path / "runs")
    (found,) = client.search_runs([client.get_experiment_by_name("hybridtune").experiment_id])
    assert found.info.run_name == "tracked" and found.info.status == "FINISHED"
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == found.info.run_id

    # params: the run's recipe, flattened
    recipe = load_recipe(run / "recipe.yaml")
    assert found.data.params == tracking.recipe_params(recipe)
    assert found.data.params["train.lr"] == "0.005" and found.data.params["train.report_to"] == '["mlflow"]'
    assert found.data.tags["recipe"] == recipe.name and found.data.tags["run_dir"] == str(run)

    # metrics: the lines of metrics.jsonl, at their steps
    lines = _lines(run)
    evals = [(x["step"], x["eval_accuracy"]) for x in lines if "eval_accuracy" in x]
    losses = [(x["step"], x["loss"]) for x in lines if "loss" in x]
    assert len(evals) == 1 and len(losses) >= 2
    assert _same(_history(client, found.info.run_id, "eval_accuracy"), evals)
    assert _same(_history(client, found.info.run_id, "loss"), losses)
    # the default store's URI was set for the run only
    assert mlflow.active_run() is None and not mlflow.is_tracking_uri_set()


def test_a_failed_run_is_marked_failed_and_resume_goes_on_in_it(quick, tmp_path, monkeypatch):
    """A NaN loss at step 7 stops the run (train.on_nan: stop): its MLflow run ends FAILED at once,
    not FINISHED at exit; `--resume` from checkpoint-4 logs on into the same MLflow run."""
    from hybridtune import run as one_run
    from hybridtune.errors import TrainingStopped

    prepare, calls = one_run.prepare, {"n": 0}

    def poisoned(recipe):
        prep = prepare(recipe)

        def hook(module, inputs, output):
            if module.training:
                calls["n"] += 1
                if calls["n"] == 7:
                    output.loss = output.loss * float("nan")
            return output

        prep.model.register_forward_hook(hook)
        return prep

    monkeypatch.setattr(one_run, "prepare", poisoned)
    overrides = quick(
        None, "train.report_to=[mlflow]", "output.name=r", "train.eval_steps=4", "train.max_steps=8"
    )
    with pytest.raises(TrainingStopped):
        api.train(load_recipe(None, overrides))
    run = tmp_path / "runs" / "r"
    client = _client(tmp_path / "runs")
    run_id = json.loads((run / "mlflow.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FAILED" and mlflow.active_run() is None

    monkeypatch.setattr(one_run, "prepare", prepare)
    api.train(resume=run)
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == run_id
    (only,) = client.search_runs([client.get_experiment_by_name("hybridtune").experiment_id])
    assert only.info.run_id == run_id and only.info.status == "FINISHED"
    evals = [(x["step"], x["eval_accuracy"]) for x in _lines(run) if "eval_accuracy" in x]
    assert [s for s, _ in evals] == [4, 8] and _same(_history(client, run_id, "eval_accuracy"), evals)


def test_search_trials_are_runs_of_the_search_experiment(tmp_path, tiny_bert, sentiment_csv):
    space = {
        "name": "tiny-tracked",
        "base": {
            "model": tiny_bert,
            "data": {"source": sentiment_csv, "max_length": 48, "max_train_samples": 96},
            "train": {"precision": "fp32", "logging_steps": 2, "report_to": ["mlflow"]},
        },
        "families": {"full": {"lr": 5e-3}, "bitfit": {"lr": 1e-2}},
        "parts": {},  # the families alone
        "enqueue": [{"family": "full"}, {"family": "bitfit"}],
        "pruner": "none",  # both trials run to the end (no rungs, no floor): the verdict has a trial
        "train": {"epochs": 1.0, "batch_size": 16, "warmup": 0.0, "weight_decay": 0.0, "schedule": "linear"},
        "verdict": {
            "top": 1,
            "seeds": 1,
            "reference": {"train": {"epochs": 1, "lr": 5e-3, "batch_size": 16}},
        },
    }
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    root = run_search(
        str(tmp_path / "space.yaml"), [], str(tmp_path / "out"), trials=2, threads=1, echo=print
    )
    trials = json.loads((root / "trials.json").read_text())["trials"]
    client = _client(root)
    experiment = client.get_experiment_by_name("tiny-tracked")
    every = client.search_runs([experiment.experiment_id])
    runs = {r.data.tags["trial"]: r for r in every if "trial" in r.data.tags}
    assert sorted(runs) == ["0", "1"] and len(trials) == 2
    for t in trials:
        found = runs[str(t["number"])]
        assert found.info.run_name == f"trial-{t['number']:04d}"
        assert found.data.tags["family"] == t["family"] and found.data.tags["state"] == t["state"]
        assert found.data.tags["search_dir"] == str(root.resolve())
        assert found.data.params["name"] == t["family"]
        assert _same(_history(client, found.info.run_id, "eval_accuracy"), [tuple(p) for p in t["curve"]])
        assert found.info.status == ("FINISHED" if t["state"] != "failed" else "FAILED")
    # the verdict's runs (the reference and the best trial, one seed): the same experiment, tagged
    verdict = json.loads((root / "verdict.json").read_text())
    tagged = {(r.data.tags["verdict"], r.data.tags["seed"]): r for r in every if "verdict" in r.data.tags}
    assert sorted(tagged) == sorted((c["name"], str(verdict["seeds"][0])) for c in verdict["candidates"])
    assert all(r.info.status == "FINISHED" and r.data.params["train.seed"] == "43" for r in tagged.values())
    # the confirmation's runs (both trials, seed 1042, before the verdict): the same experiment, tagged
    confirmed = {r.data.tags["confirm"]: r for r in every if "confirm" in r.data.tags}
    assert sorted(confirmed) == [f"trial-{t['number']:04d}" for t in trials]
    assert all(
        r.data.tags["seed"] == "1042" and r.data.params["train.seed"] == "1042" for r in confirmed.values()
    )
    assert all(r.info.status == "FINISHED" for r in confirmed.values())
    assert len(every) == 6  # 2 trials + 2 confirmation runs + 2 verdict runs, nothing else
    for stray in (root / "trials" / "mlruns", root / "confirm" / "mlruns", root / "verdict" / "mlruns"):
        assert not stray.exists()  # one store per search: its own dir's


def test_a_trial_left_running_is_ended_with_its_state(tmp_path):
    """A Ray worker stopped by ASHA (or a killed search) leaves its trial's MLflow run RUNNING: the
    search tags it and ends it by its trial number and search dir."""
    tgt = tracking.target(tmp_path, "s")
    client = mlflow.MlflowClient(tgt.uri)
    eid = tracking.experiment_id(tgt)
    mine = client.create_run(eid, tags={"trial": "3", "search_dir": "/a"}).info.run_id
    other = client.create_run(eid, tags={"trial": "3", "search_dir": "/b"}).info.run_id
    tracking.tag_runs(tgt, {"trial": 3, "search_dir": "/a"}, "pruned")
    assert (
        client.get_run(mine).data.tags["state"] == "pruned" and client.get_run(mine).info.status == "KILLED"
    )
    assert "state" not in client.get_run(other).data.tags and client.get_run(other).info.status == "RUNNING"


def test_the_users_tracking_uri_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    tgt = tracking.target(tmp_path, "s")
    assert tgt.uri == "http://tracking.example:5000" and not tgt.default and tgt.artifacts is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.target(tmp_path, "s").uri == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"


def test_mlflow_missing_exits_2_before_anything_is_written(monkeypatch, tmp_path, tiny_bert, sentiment_csv):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` fails, find_spec finds nothing
    out = tmp_path / "runs"
    args = ["train", f"model={tiny_bert}", f"data.source={sentiment_csv}", "train.max_steps=2",
            "train.report_to=[mlflow]", f"output.dir={out}"]  # fmt: skip
    message = refused(args, out, absent=True)
    assert message.endswith(
        "train.report_to: found mlflow, which is not installed; expected `pip install 'hybridtune[mlflow]'`"
    ), message

    # a search whose base asks for it: the same, with the base's key path, and no search dir
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"base": {"model": tiny_bert, "train": {"report_to": "mlflow"}}}))
    args = ["search", str(space), "--trials", "1", "--out", str(tmp_path / "s")]
    refused(args, tmp_path / "s", "base.train.report_to: found mlflow, which is not installed", absent=True)
