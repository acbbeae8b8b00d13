"""The command line: arguments -> calls -> rendering (report/console.py). No logic of its own.

The commands on one run and on many runs are here; those built on finished runs (ensemble, soup,
merge-adapters, export, serve) are in cli_artifacts.py and registered below with the same error
handling.

A `UserError` (bad recipe, data row, path) prints one line and exits with code 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from pathlib import Path

import typer

from hybridtune import cli_artifacts as artifacts
from hybridtune.errors import (
    EXIT_TRAINING_STOPPED,
    EXIT_USER_ERROR,
    RunFailed,
    TrainingStopped,
    UserError,
    one_line,
)

app = typer.Typer(
    help="Fine-tune Hugging Face models with hybrid strategies.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


DEBUG = {"on": os.environ.get("HYBRIDTUNE_DEBUG", "") not in ("", "0")}


@app.callback()
def options(
    debug: bool = typer.Option(
        False, "--debug", help="print the traceback of a failure (also: HYBRIDTUNE_DEBUG=1)"
    ),
) -> None:
    if debug:
        DEBUG["on"] = True


def friendly(fn):
    """Turn a UserError into one message on stderr and exit code 2; a failure after the run dir exists
    (RunFailed), a training stop (NaN loss) or anything unexpected into one message and exit code 3.
    `--debug` prints the traceback as well."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except (TrainingStopped, RunFailed) as e:
            if DEBUG["on"]:
                traceback.print_exception(e.__cause__ or e)
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_TRAINING_STOPPED) from None
        except (KeyboardInterrupt, typer.Exit, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - a bug or the machine: one line, the traceback on request
            if DEBUG["on"]:
                traceback.print_exception(e)
            hint = "" if DEBUG["on"] else " (--debug prints the traceback)"
            typer.secho(
                f"error: {fn.__name__.rstrip('_')} failed: {one_line(e)}{hint}", fg=typer.colors.RED, err=True
            )
            raise typer.Exit(EXIT_TRAINING_STOPPED) from None

    return wrapper


def _recipe(args: list[str] | None):
    from hybridtune.recipe import load_recipe

    args = list(args or [])
    path = args.pop(0) if args and "=" not in args[0] else None
    return load_recipe(path, args)


def _print_precision(precision: str) -> None:
    from hybridtune.report.console import console, precision_line
    from hybridtune.train.precision import choose

    console.print(precision_line(choose(precision)), highlight=False)


@app.command()
@friendly
def train(
    args: list[str] = typer.Argument(
        None, help="[RECIPE.yaml] [key.path=value ...]; no recipe = the default recipe"
    ),
    resume: str = typer.Option(
        None, "--resume", help="continue an interrupted run dir from its last checkpoint (its own recipe)"
    ),
    resume_weights_only: bool = typer.Option(
        False,
        "--resume-weights-only",
        help="with --resume: go on from a checkpoint whose optimizer state is missing (a fresh "
        "optimizer: not the run an uninterrupted training gives)",
    ),
) -> None:
    """Train a recipe (default: MiniLM fully fine-tuned on Rotten Tomatoes) and evaluate it on the test split."""
    from hybridtune import api
    from hybridtune.report.console import console, ensemble_run, params_table, recipe_line, trained_line

    if resume and args:
        raise UserError("--resume", f"a recipe or overrides too ({' '.join(args)})", "--resume RUN_DIR alone")
    if resume_weights_only and not resume:
        raise UserError(
            "--resume-weights-only", "no --resume RUN_DIR", "--resume RUN_DIR --resume-weights-only"
        )
    if resume:
        console.print(f"[bold]resuming[/] {resume} from its last checkpoint")
        if (Path(resume) / "recipe.yaml").is_file():  # else api.train says what is missing
            _print_precision(_recipe([str(Path(resume) / "recipe.yaml")]).train.precision)
        summary = api.train(resume=resume, resume_weights_only=resume_weights_only)
        recipe = _recipe([str(Path(resume) / "recipe.yaml")])  # the run's own, for what follows
    else:
        recipe = _recipe(args)
        console.print(recipe_line(recipe))
        _print_precision(recipe.train.precision)
        summary = api.train(recipe)
    if summary.get("rank"):  # another process of a multi-process run: rank 0 reports
        return
    run = Path(summary["run_dir"])
    if recipe.ensemble is not None:
        for part in ensemble_run(summary):
            console.print(part)
        return
    if recipe.self_training is not None:  # per round: the pseudo-labels added and the scores
        from hybridtune.report.console import self_training_table

        console.print(self_training_table(summary))
    console.print(params_table(json.loads((run / "params.json").read_text())))
    for table in api.task_of(str(run)).eval_tables(json.loads((run / "eval.json").read_text())):
        console.print(table)
    console.print(trained_line(summary, run))


@app.command("eval")
@friendly
def eval_(
    run_dir: str = typer.Argument(
        ..., help="a run dir written by `hybridtune train`, or a prompt recipe (.yaml): zero-shot"
    ),
    data: str = typer.Option(
        None, "--data", help="evaluate on every row of this file / dataset dir instead of the test split"
    ),
    overrides: list[str] = typer.Option(
        None, "--set", help="with a recipe: key.path=value overrides (repeatable)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
) -> None:
    """Evaluate a finished run: accuracy, macro-F1, per-class report, confusion matrix (classification);
    entity precision / recall / F1 per type (token classification). Given a prompt_classification
    recipe instead of a run dir: its base model, untrained (zero-shot)."""
    from hybridtune import api, tasks
    from hybridtune.recipe import load_recipe
    from hybridtune.report.console import console

    if run_dir.endswith((".yaml", ".yml")):
        recipe = load_recipe(run_dir, overrides)
        report, task = api.evaluate_zero_shot(recipe, data), tasks.load(recipe.task)
    else:
        report, task = api.evaluate(run_dir, data), api.task_of(run_dir)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    for table in task.eval_tables(report, title=data or "test"):
        console.print(table)


@app.command()
@friendly
def predict(
    run_dir: str = typer.Argument(..., help="a run dir written by `hybridtune train`"),
    texts: list[str] = typer.Argument(None, help="texts to classify or to tag"),
    file: Path = typer.Option(None, "--file", "-f", help="a text file, one text per line"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per text"),
) -> None:
    """Classify texts (or find their entities) with a finished run."""
    from hybridtune import api
    from hybridtune.data.lines import text_lines

    items = list(texts or [])
    if file is not None:
        if not file.is_file():
            raise UserError(f"--file {file}", "no such file", "a text file with one text per line")
        try:
            lines = text_lines(file.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError:
            raise UserError(f"--file {file}", "bytes that are not UTF-8", "a UTF-8 text file") from None
        items += [line for line in lines if line.strip()]
    if not items:
        raise UserError("predict", "no text", "texts as arguments or --file FILE")
    task = api.task_of(run_dir)
    for row in api.predict(run_dir, items):
        typer.echo(json.dumps(row) if as_json else task.format_prediction(row))


@app.command()
@friendly
def generate(
    run_dir: str = typer.Argument(..., help="a causal_lm run dir written by `hybridtune train`"),
    prompts: list[str] = typer.Argument(..., help="one or more prompts"),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="default: the recipe's generation"),
    sample: bool = typer.Option(False, "--sample", help="sample instead of greedy decoding"),
    temperature: float = typer.Option(1.0, "--temperature", help="with --sample"),
    top_p: float = typer.Option(1.0, "--top-p", help="with --sample: nucleus sampling"),
    seed: int = typer.Option(None, "--seed", help="with --sample: a reproducible draw"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per prompt"),
) -> None:
    """Answer prompts with a causal_lm run (in the prompt format it trained with, as serve does)."""
    from hybridtune import api

    answers = api.generate(run_dir, prompts, max_new_tokens, sample, temperature, top_p, seed)
    for prompt, answer in zip(prompts, answers, strict=True):
        typer.echo(json.dumps({"prompt": prompt, "response": answer}) if as_json else answer)


@app.command()
@friendly
def params(
    args: list[str] = typer.Argument(None, help="[RECIPE.yaml] [key.path=value ...]"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """What a recipe trains, per layer, without training."""
    from hybridtune import api
    from hybridtune.report.console import console, params_table, spectrum_table

    table = api.params(_recipe(args))
    if as_json:
        typer.echo(json.dumps(table, indent=2))
    else:
        console.print(params_table(table))
        if "spectrum" in table:  # freeze.spectrum: the scores behind its choice
            console.print(spectrum_table(table["spectrum"]))


@app.command()
@friendly
def compare(
    args: list[str] = typer.Argument(
        None,
        help="[SUITE.yaml] [key.path=value ...]: a suite (default: the default suite on the bundled data) "
        "and overrides applied to every strategy, e.g. train.precision=fp32 train.max_steps=50",
    ),
    seeds: int = typer.Option(None, "--seeds", help="run every strategy with this many seeds (42, 43, ...)"),
    out: str = typer.Option(None, "--out", help="the compare dir (default: runs/compare-<suite name>)"),
    reference: str = typer.Option(
        None,
        "--reference",
        help="a strategy of the suite (e.g. full): every other one paired with it seed by seed, "
        "with a 95 % interval and better / no difference detectable / worse",
    ),
) -> None:
    """Train strategies side by side: a table, comparison.csv/json, plots and report.html. Resumable."""
    from hybridtune.compare import compare as run_compare
    from hybridtune.report.console import compare_table, console
    from hybridtune.rundir import read_json

    args = list(args or [])
    suite = args.pop(0) if args and "=" not in args[0] else None
    root = run_compare(
        suite,
        out,
        seeds,
        echo=lambda text: console.print(text, markup=False, highlight=False),
        overrides=args,
        reference=reference,
    )
    comparison = read_json(root / "comparison.json")
    console.print(compare_table(root, comparison["summary"]))
    for sentence in comparison.get("sentences", []):
        console.print(sentence, markup=False, highlight=False)
    console.print(f"report: [bold]{root / 'report.html'}[/]")


@app.command()
@friendly
def runs(
    root: str = typer.Argument("runs", help="a dir of runs (default: runs/), a compare dir or one run dir"),
    clean: str = typer.Option(
        None, "--clean", help="remove the runs of this status (failed | interrupted), after listing them"
    ),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """List run dirs with their status (finished / failed / resumable / interrupted), headline metric
    and size; `--clean failed` removes the failed ones."""
    import shutil

    from hybridtune import rundir
    from hybridtune.report.console import console, runs_table

    base = Path(root)
    if not base.is_dir():
        raise UserError(root, "no such directory", "a dir holding run dirs (default: runs/)")
    if clean is not None and clean not in ("failed", "interrupted"):
        raise UserError(
            "--clean", repr(clean), "failed or interrupted (finished and resumable runs are kept)"
        )
    rows = [rundir.describe(run) for run in rundir.find_runs(base)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        console.print(runs_table(rows, f"runs under {base}: {len(rows)}"))
    if clean is not None:
        doomed = [r for r in rows if r["status"] == clean]
        for r in doomed:
            shutil.rmtree(r["run"])
            typer.echo(f"removed {r['run']} ({clean})")
        typer.echo(f"removed {len(doomed)} {clean} run(s)")


for _name, _command in artifacts.COMMANDS.items():  # ensemble, soup, merge-adapters, export, serve
    app.command(_name)(friendly(_command))


@app.command()
@friendly
def search(
    args: list[str] = typer.Argument(
        None, help="[SPACE.yaml] [key.path=value ...]; no space = the default space over every family"
    ),
    budget: str = typer.Option(None, "--budget", help="time for the trials, e.g. 90s, 60m, 1.5h"),
    trials: int = typer.Option(None, "--trials", help="number of trials (default 20 without --budget)"),
    out: str = typer.Option(None, "--out", help="the search dir (default: runs/search-<space name>)"),
    seeds: int = typer.Option(None, "--seeds", help="verdict: seeds per retrained recipe (default 3)"),
    threads: int = typer.Option(
        None, "--threads", help="torch threads of the trials (default: every CPU); ray: the local Ray's CPUs"
    ),
    backend: str = typer.Option("local", "--backend", help="local (one trial at a time) or ray (Ray Tune)"),
    address: str = typer.Option(None, "--address", help="ray: a running cluster (host:6379 or auto)"),
    cpus_per_trial: int = typer.Option(None, "--cpus-per-trial", help="ray: CPUs (threads) per trial (1)"),
    gpus_per_trial: float = typer.Option(
        None, "--gpus-per-trial", help="ray: GPUs per trial (default 1 where there are GPUs)"
    ),
) -> None:
    """Search strategies and their settings (Optuna, pruned), then retrain the best with seeds and test
    them against full fine-tuning. Resumable. `--backend ray` runs the trials side by side on Ray Tune."""
    from hybridtune.report.console import console
    from hybridtune.search import run_search

    items = list(args or [])
    space = items.pop(0) if items and "=" not in items[0] else None
    root = run_search(
        space,
        items,
        out,
        budget,
        trials,
        threads,
        seeds,
        echo=lambda text: console.print(text, markup=False, highlight=False),
        backend=backend,
        address=address,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
    )
    console.print(f"report: [bold]{root / 'report.html'}[/]; Pareto recipes: [bold]{root / 'pareto'}[/]")


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
