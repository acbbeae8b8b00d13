"""MLflow tracking (`train.report_to: [mlflow]`): transformers' own `MLflowCallback`, pointed at
hybridtune's store, experiment and run name, with the recipe as the run's params.

    <output.dir>/mlruns/mlflow.db   the store (SQLite), unless MLFLOW_TRACKING_URI says another
    <run dir>/mlflow.json           the store, experiment and run id of the run (resume reattaches)

What is transformers': `on_log` (every numeric value of every log line, at the global step, the same
lines as metrics.jsonl; names MLflow refuses sanitised) and the end of the run at `on_train_end`.
What is replaced: `setup`, which would log TrainingArguments and the model config as the params and
read the experiment, tags and run id from environment variables; here the params are the recipe,
flattened (`train.lr`, `peft.r`), and a search gives each trial its experiment, name and tags.

The store: MLflow 3 refuses its file store (`file:./mlruns`, "maintenance mode") unless
MLFLOW_ALLOW_FILE_STORE is set and recommends SQLite for a local store, so the default is
`sqlite:///<output.dir>/mlruns/mlflow.db` (SQLAlchemy and alembic come with optuna). The store is
next to the run dirs, not in one: every run of the dir (every trial of a search) is in one store,
side by side in `mlflow ui --backend-store-uri sqlite:///runs/mlruns/mlflow.db`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.integrations import MLflowCallback

from hybridtune import rundir
from hybridtune.errors import UserError

INSTALL = "pip install 'hybridtune[mlflow]'"
STORE = "mlruns"  # in output.dir (a search: in its dir)
RUN_FILE = "mlflow.json"
URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT = "hybridtune"  # a plain run's experiment, unless MLFLOW_EXPERIMENT_NAME names one


def wanted(report_to: list[str] | None) -> bool:
    return "mlflow" in (report_to or [])


def check(report_to: list[str] | None, where: str = "train.report_to") -> None:
    """MLflow asked for and importable, before anything is written (exit 2 otherwise)."""
    if not wanted(report_to):
        return
    if importlib.util.find_spec("mlflow") is None:
        raise UserError(where, "mlflow, which is not installed", f"`{INSTALL}`")
    if os.environ.get("DISABLE_MLFLOW_INTEGRATION", "").upper() == "TRUE":  # transformers' switch
        raise UserError(
            where, "mlflow with DISABLE_MLFLOW_INTEGRATION=TRUE", "that variable unset, or no mlflow here"
        )


@dataclass(frozen=True)
class Target:
    """Where a run goes: the tracking URI, the experiment, and the artifact location of an
    experiment created there (the default store's own dir; a user's server chooses its own)."""

    uri: str
    experiment: str
    artifacts: str | None = None
    default: bool = True  # the URI is ours (set for the run, unset after), not the user's


def target(store_parent: Path, experiment: str) -> Target:
    """MLFLOW_TRACKING_URI when the user set it (in the shell, or `mlflow.set_tracking_uri`, which
    sets it), else the SQLite store in `<store_parent>/mlruns/`."""
    if os.environ.get(URI_ENV):
        return Target(os.environ[URI_ENV], experiment, default=False)
    store = Path(store_parent).resolve() / STORE
    return Target(f"sqlite:///{store / 'mlflow.db'}", experiment, (store / "artifacts").as_uri())


def experiment_id(tgt: Target) -> str:
    """The experiment's id, created if new (two processes creating it at once: one wins, the other
    reads it)."""
    import logging

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    # "Creating initial MLflow database tables..." on a new store: the run's own lines are what a user reads
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    if tgt.default:
        (Path(tgt.uri.removeprefix("sqlite:///")).parent).mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tgt.uri)
    found = client.get_experiment_by_name(tgt.experiment)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(tgt.experiment, artifact_location=tgt.artifacts)
    except MlflowException:
        found = client.get_experiment_by_name(tgt.experiment)
        if found is None:
            raise
        return found.experiment_id


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """A recipe dump as MLflow params: `section.key` -> value; lists as JSON; unset (None) keys left
    out (a part the recipe does not use is one None, not a param)."""
    if isinstance(tree, dict):
        out: dict[str, str] = {}
        for key, value in tree.items():
            out |= flatten(value, f"{prefix}{key}.")
        return out
    if tree is None:
        return {}
    return {prefix[:-1]: json.dumps(tree) if isinstance(tree, list) else str(tree)}


def recipe_params(recipe) -> dict[str, str]:
    return flatten(recipe.model_dump(mode="json"))


class MLflowTracking(MLflowCallback):
    """transformers' MLflowCallback with hybridtune's setup: the run starts in `tgt`'s experiment
    under `run_name` with `tags` (and MLFLOW_TAGS, as transformers reads them), logs `params`, and
    `run_dir/mlflow.json` records it; a resumed run (the same store) goes on in the same MLflow run.
    Only the process of rank 0 logs (transformers' rule)."""

    def __init__(
        self, tgt: Target, run_name: str, params: dict[str, str], tags: dict[str, Any], run_dir=None
    ):
        super().__init__()  # imports mlflow
        self.target, self.run_name, self.params = tgt, run_name, params
        self.tags = {k: str(v) for k, v in tags.items()}
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_id: str | None = None

    def setup(self, args, state, model) -> None:
        self._initialized = True
        if not state.is_world_process_zero:
            return
        mlflow = self._ml_flow
        self._async_log = True  # log_metrics(synchronous=False); end_run flushes the queue
        if self.target.default:
            mlflow.set_tracking_uri(self.target.uri)  # unset again when the run ends (`_close`)
        eid = experiment_id(self.target)
        held = self._held_run()
        tags = {**self.tags, **json.loads(os.environ.get("MLFLOW_TAGS") or "{}")}
        run = mlflow.start_run(
            run_id=held,
            experiment_id=None if held else eid,
            run_name=None if held else self.run_name,
            tags=None if held else tags,
            nested=mlflow.active_run() is not None,  # a caller's own run: ours goes inside it
        )
        self.run_id, self._auto_end_run = run.info.run_id, True
        if held is None:  # a resumed run has them; MLflow refuses a param logged twice with another value
            items = list(self.params.items())
            for i in range(0, len(items), self._MAX_PARAMS_TAGS_PER_BATCH):
                mlflow.log_params(
                    {
                        k: v[: self._MAX_PARAM_VAL_LENGTH]
                        for k, v in items[i : i + self._MAX_PARAMS_TAGS_PER_BATCH]
                    }
                )
        if self.run_dir is not None:
            record = {"tracking_uri": self.target.uri, "experiment_id": eid, "run_id": self.run_id}
            rundir.write_json(self.run_dir / RUN_FILE, record)

    def _held_run(self) -> str | None:
        """The MLflow run of this run dir when it is resumed into the same store."""
        path = self.run_dir / RUN_FILE if self.run_dir is not None else None
        if path is None or not path.is_file():
            return None
        held = json.loads(path.read_text(encoding="utf-8"))
        return held.get("run_id") if held.get("tracking_uri") == self.target.uri else None

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)  # transformers ends the run (FINISHED)
        self._close()

    def end(self, status: str = "FAILED") -> None:
        """A run that raised (a NaN loss, an error): its MLflow run ends with `status` now, not
        FINISHED at exit, and the next run of this process starts clean."""
        mlflow = self._ml_flow
        active = mlflow.active_run() if self._auto_end_run else None
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)
        self._close()

    def _close(self) -> None:
        # transformers' __del__ ends *the active run* while _auto_end_run holds: once ours has ended,
        # a late garbage collection would end the next trial's
        self._auto_end_run = False
        if self.target.default and self._initialized:
            self._ml_flow.set_tracking_uri(None)  # as mlflow's own _use_tracking_uri restores it


def run_callback(recipe, run_dir: Path) -> MLflowTracking:
    """The callback of a plain run: the store next to the run dir, MLFLOW_EXPERIMENT_NAME or
    `hybridtune`, the run dir's name, the recipe."""
    tgt = target(run_dir.parent, os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
    tags = {"recipe": recipe.name, "task": recipe.task, "run_dir": str(run_dir)}
    return MLflowTracking(tgt, run_dir.name, recipe_params(recipe), tags, run_dir)


def end_runs(trainer, status: str = "FAILED") -> None:
    """End the MLflow runs of a trainer whose training raised."""
    if trainer is None:
        return
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, MLflowTracking):
            callback.end(status)


# the status an MLflow run left RUNNING gets when a search ends its trial (a Ray worker stopped by
# ASHA, a search killed mid-trial) or a trial's state says more than FINISHED
STATUS = {"complete": "FINISHED", "pruned": "KILLED", "interrupted": "KILLED"}


def tag_runs(tgt: Target, where: dict[str, Any], state: str) -> None:
    """Tag `state` on the runs of `tgt`'s experiment whose tags are `where` (a search's trial: its
    number and search dir), ending any still RUNNING with the matching status."""
    from mlflow import MlflowClient

    client = MlflowClient(tgt.uri)
    found = client.get_experiment_by_name(tgt.experiment)
    if found is None:
        return
    terms = []
    for key, value in where.items():
        quote = "'" if "'" not in str(value) else '"'
        terms.append(f"tags.{key} = {quote}{value}{quote}")
    for run in client.search_runs([found.experiment_id], filter_string=" and ".join(terms)):
        client.set_tag(run.info.run_id, "state", state)
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, STATUS.get(state, "FAILED"))
