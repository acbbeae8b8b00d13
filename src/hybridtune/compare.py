"""compare: train several strategies on the same data, seeds and budget, and set them side by side.

    hybridtune compare                     # the default suite on the bundled Rotten Tomatoes data
    hybridtune compare suite.yaml --seeds 3

A suite:

    name: my-suite
    overrides: ["train.epochs=1"]          # applied to every recipe (same data, budget, seeds)
    seeds: [42]                            # or --seeds N: 42, 43, ...
    strategies:
      - recipes/full.yaml                  # a recipe file (relative to the suite file or cwd)
      - {recipe: recipes/lora.yaml, name: lora-r16, overrides: ["peft.r=16"]}

A few-shot recipe (`data.shots` k with `data.draws` n) runs once per seed *and* draw
(`<name>-s<seed>-d<draw>`, `data.draw` set), and its row is the mean ± sd over all of them.

Each run is its own `hybridtune train` process (its peak RSS is its own; a crash stops only that
run) writing a normal run dir under `<out>/runs/`. A finished run (its report.json exists) is never
redone, so an interrupted compare picks up where it stopped: the run it was in the middle of goes on
from its last checkpoint (`hybridtune train --resume`) when it has one and its recipe is the one the
suite asks for now, else starts over. The table, csv/json, plots and the
HTML report are made from the run dirs' own files (report/compare.py). The runs share the states of
their frozen trunks through `<out>/cache` (HYBRIDTUNE_CACHE_DIR, docs/speed.md), removed when the
compare finishes.

The compare dir is marked as such (`.hybridtune-compare`, paths.py): `--out` must be a new or empty
dir or an earlier compare dir, and what compare deletes (an unfinished run it starts over, its
cache) lies inside a dir it marked. Suite and strategy names are plain names (no '/', no '..').
One compare writes a compare dir at a time (its `.lock`, durable.lock_dir). The compare owns its
training child: the child is in a process group of its own and asks the kernel for SIGKILL when the
compare dies (prctl PR_SET_PDEATHSIG), so a SIGKILLed compare leaves no orphan training on; a
Ctrl-C or error in the compare stops the child's group. A run dir still held by a live process
(an orphan of an earlier compare, where the parent-death signal is not available) is refused, not
started over under it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hybridtune import children, durable, rundir, safe_yaml
from hybridtune.data import shots
from hybridtune.errors import UserError, did_you_mean
from hybridtune.paths import NAME_RULE, claim, inside, is_safe_name
from hybridtune.recipe import SEED_MAX, load_recipe, recipe_to_yaml
from hybridtune.report.compare import write_outputs
from hybridtune.rundir import CACHE_DIR_ENV
from hybridtune.train.checkpoints import checkpoints

RECIPES = Path(__file__).resolve().parent.parent.parent / "recipes"
MARKER = ".hybridtune-compare"  # in every compare dir: what compare may clean up is inside one


def _plain_name(value: str | None) -> str | None:
    # the run dirs are <out>/runs/<name>-s<seed>, deleted and redone when unfinished: a name such as
    # '../../x' or '/home/me' would point them outside the compare dir
    if value is not None and not is_safe_name(value):
        raise ValueError(NAME_RULE)
    return value


class Strategy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    recipe: str
    name: str | None = None
    overrides: list[str] = Field(default_factory=list)

    _name = field_validator("name")(_plain_name)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"recipe": value} if isinstance(value, str) else value


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "compare"
    overrides: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    strategies: list[Strategy] = Field(..., min_length=1)
    # `hybridtune compare SUITE key=value ...`: not a suite key, set by load_suite
    cli_overrides: list[str] = Field(default_factory=list, exclude=True)

    _name = field_validator("name")(_plain_name)

    @field_validator("seeds")
    @classmethod
    def _seed_range(cls, value: list[int]) -> list[int]:

        if any(not 0 <= seed <= SEED_MAX for seed in value):
            raise ValueError(f"seeds from 0 to {SEED_MAX}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_cli_key(cls, value):
        if isinstance(value, dict) and "cli_overrides" in value:
            raise ValueError("cli_overrides is set on the command line (key=value), not in a suite")
        return value


# the default suite: one of each family, 1 epoch of the full Rotten Tomatoes train split each,
# evaluated 4 times (every 54 of the 214 steps) for the learning curves; the ensemble trains 3 LoRA
# members of 1 epoch each
DEFAULT_SUITE = {
    "name": "default",
    "overrides": ["train.epochs=1", "train.eval_steps=54"],
    "strategies": [
        "full.yaml",
        "head_only.yaml",
        "freeze_top2.yaml",
        "bitfit.yaml",
        "lora.yaml",
        "houlsby_adapters.yaml",
        "prompt_tuning.yaml",
        "soft_prompt_lora.yaml",
        "llrd.yaml",
        "ulmfit.yaml",
        "ensemble_lora.yaml",
    ],
}


def load_suite(
    path: str | None, seeds: int | None = None, overrides: list[str] | None = None
) -> tuple[Suite, Path]:
    """The suite and the dir its recipe paths are relative to."""
    if path is None:
        raw, base = dict(DEFAULT_SUITE), RECIPES
    else:
        p = Path(path)
        if not p.is_file():
            raise UserError(path, "no such file", "a suite YAML file")
        try:
            raw = safe_yaml.load(p.read_text(encoding="utf-8-sig")) or {}
        except UnicodeDecodeError:
            raise UserError(path, "bytes that are not UTF-8", "a UTF-8 text file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else path
            raise UserError(
                where, f"invalid YAML ({getattr(e, 'problem', None) or e})", "a YAML mapping"
            ) from None
        if not isinstance(raw, dict):
            raise UserError(path, f"a YAML {type(raw).__name__}", "a mapping of suite keys")
        base = p.parent
    try:
        suite = Suite.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        found = repr(err.get("input"))[:100]
        expected = err["msg"].removeprefix("Value error, ")
        raise UserError(f"{path or 'default suite'}: {where}", found, expected) from None
    if seeds is not None:
        if seeds < 1:
            raise UserError("--seeds", str(seeds), "a number of seeds >= 1")
        suite.seeds = [suite.seeds[0] + i for i in range(seeds)]
    # key=value from the command line: applied to every strategy, after the suite's own (so they win)
    suite.cli_overrides = list(overrides or [])
    return suite, base


def plan_runs(suite: Suite, base: Path) -> list[dict]:
    """One entry per (strategy, seed): name, recipe path, overrides; every recipe validated first."""
    runs, names = [], set()
    for i, strategy in enumerate(suite.strategies):
        path = Path(strategy.recipe)
        path = path if path.is_absolute() or path.exists() else base / path
        overrides = [*suite.overrides, *strategy.overrides, *suite.cli_overrides]
        recipe = load_recipe(path, overrides)  # fails early, with the key path
        name = strategy.name or recipe.name
        if name in names:
            raise UserError(
                f"strategies[{i}]", f"a second strategy named '{name}'", "unique names (give `name:`)"
            )
        names.add(name)
        # few-shot (data.shots with data.draws n): every seed on every draw, mean ± sd over them all
        for seed in suite.seeds:
            for draw in shots.scored(recipe.data.shots, recipe.data.draws):
                runs.append(
                    {
                        "strategy": name,
                        "seed": seed,
                        "draw": draw,
                        "recipe": str(path),
                        "run": shots.run_name(name, seed, draw),
                        "overrides": [*overrides, f"train.seed={seed}"]
                        + ([f"data.draw={draw}"] if draw is not None else []),
                    }
                )
    return runs


def _entry_args(entry: dict, runs_dir: Path) -> list[str]:
    return [*entry["overrides"], f"output.dir={runs_dir}", f"output.name={entry['run']}"]


def resumable(entry: dict, runs_dir: Path) -> Path | None:
    """The checkpoint an interrupted run of this entry can go on from: a run dir without report.json,
    with a complete checkpoint, whose recipe.yaml is what the entry asks for now (else None)."""
    target = runs_dir / entry["run"]
    if (target / "report.json").exists() or not (target / "run.json").is_file():
        return None  # finished, or not a single run (an ensemble run is not resumable: redone)
    found = checkpoints(target / "checkpoints") if (target / "checkpoints").is_dir() else []
    if not found or not (target / "recipe.yaml").is_file():
        return None

    def settings(recipe) -> str:  # what the run trains; where it is written (a moved compare) aside
        return recipe_to_yaml(
            recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": ""})})
        )

    try:
        same = settings(load_recipe(target / "recipe.yaml")) == settings(
            load_recipe(entry["recipe"], _entry_args(entry, runs_dir))
        )
    except UserError:
        return None
    return found[-1] if same else None


def _start_over(target: Path, runs_dir: Path) -> None:
    """Remove an unfinished run of ours so that it starts over: only a real dir (not a link)
    directly inside the marked compare dir's runs/."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise UserError(str(target), "a link or a file where a run dir goes", "a run dir written by compare")
    if target.exists():
        if target.parent != runs_dir or not inside(target, runs_dir):
            raise UserError(str(target), "a run dir outside the compare dir", f"a dir inside {runs_dir}")
        shutil.rmtree(target)


def _run_one(entry: dict, runs_dir: Path, echo=print) -> dict:
    """Train one entry in its own process; wall time and the child's peak RSS (from wait4). An
    interrupted run of the entry goes on from its last checkpoint (`resumable`), else starts over."""
    target = runs_dir / entry["run"]
    holder = durable.lock_holder(target) if target.is_dir() else None
    if holder is not None:  # an orphan training of an earlier compare: not started over under it
        raise UserError(
            f"strategy {entry['strategy']} (seed {entry['seed']})",
            f"'{target}' still being written by process {holder}",
            "no other process writing this compare's runs",
            f"an earlier compare's training still runs: wait for it or stop it (kill {holder}), then "
            "run the compare again",
        )
    checkpoint = resumable(entry, runs_dir)
    if checkpoint is not None:
        echo(f"  {entry['run']}: interrupted earlier, resumed from {checkpoint.name}")
        cmd = [sys.executable, "-m", "hybridtune", "train", "--resume", str(target)]
    else:
        _start_over(target, runs_dir)
        cmd = [sys.executable, "-m", "hybridtune", "train", entry["recipe"], *_entry_args(entry, runs_dir)]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        # the runs share their frozen-trunk caches: the seeds of a strategy, and strategies with the
        # same frozen depth, compute them once (train/trunk_store.py); a user's own dir wins
        CACHE_DIR_ENV: os.environ.get(CACHE_DIR_ENV) or str(runs_dir.parent / "cache"),
    }
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        process_group=0,  # its own group: stopped whole (with any worker it starts)
        preexec_fn=children.die_with_parent(os.getpid()),
    )
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C or an error here: the child does not train on without us
        children.stop(proc)
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    code = proc.returncode
    if code != 0:
        raise UserError(
            f"strategy {entry['strategy']} (seed {entry['seed']})",
            f"a training that exited with code {code}",
            "a run that finishes (its own error is printed above)",
        )
    return {
        # of this process: a resumed run's earlier process is not counted
        "wall_seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        **({"resumed_from": checkpoint.name} if checkpoint is not None else {}),
    }


def compare(
    path: str | None = None,
    out: str | None = None,
    seeds: int | None = None,
    echo=print,
    overrides: list[str] | None = None,
    reference: str | None = None,
) -> Path:
    """Run (or resume) a suite; returns the compare dir with comparison.csv/json, plots and report.html.
    `overrides` (key.path=value) apply to every strategy, validated with each before the first run.
    `reference`: a strategy of the suite every other one is paired with, seed by seed."""
    suite, base = load_suite(path, seeds, overrides)
    runs = plan_runs(suite, base)
    names = list(dict.fromkeys(entry["strategy"] for entry in runs))
    if reference is not None and reference not in names:
        raise UserError(
            "--reference",
            f"'{reference}', not a strategy of this suite",
            "one of " + ", ".join(names),
            did_you_mean(reference, names),
        )
    root = claim(Path(out or Path("runs") / f"compare-{suite.name}"), MARKER, "compare dir", "--out")
    runs_dir = root / "runs"
    if runs_dir.is_symlink() or (runs_dir.exists() and not runs_dir.is_dir()):
        raise UserError("--out", f"'{runs_dir}', a link or a file", "a compare dir whose runs/ is its own")
    try:
        runs_dir.mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(
            "--out", f"'{root}' that cannot be written ({e.strerror})", "a writable directory"
        ) from None
    with durable.lock_dir(root, "--out"):  # one compare per compare dir
        measured = _run_all(runs, runs_dir, root / "measured.json", echo)
        echo(f"{_bar(len(runs), len(runs))} all {len(runs)} runs done")
        cache = root / "cache"  # the shared trunk caches, kept while unfinished; only our own dir's
        if cache.is_dir() and not cache.is_symlink():
            shutil.rmtree(cache, ignore_errors=True)
        write_outputs(root, runs, measured, suite.name, reference)
    return root


def _run_all(runs: list[dict], runs_dir: Path, measured_path: Path, echo) -> dict:
    """Train every entry not finished yet; measured.json after each. A run that finished but whose
    measurement was not recorded (the compare was killed in between) is kept, not trained again."""
    measured = rundir.read_json(measured_path) if measured_path.exists() else {}
    started, done_now = time.perf_counter(), 0
    for i, entry in enumerate(runs):
        bar = _bar(i, len(runs))
        if (runs_dir / entry["run"] / "report.json").exists():
            if entry["run"] not in measured:
                measured[entry["run"]] = {"unmeasured": "finished before the compare recorded it"}
                rundir.write_json(measured_path, measured)
            echo(f"{bar} {entry['run']}: done earlier, kept")
            continue
        eta = ""
        if done_now:
            per_run = (time.perf_counter() - started) / done_now
            eta = f", ETA {_clock(per_run * (len(runs) - i))}"
        echo(f"{bar} {entry['run']} ({_clock(time.perf_counter() - started)} elapsed{eta})")
        measured[entry["run"]] = _run_one(entry, runs_dir, echo)
        rundir.write_json(measured_path, measured)
        done_now += 1
    return measured


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"
