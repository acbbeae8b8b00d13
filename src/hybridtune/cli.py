"""The command line: arguments -> api calls. No logic of its own.

A `UserError` (bad recipe, data row, path) prints one line and exits with code 2; anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer

from hybridtune.errors import EXIT_USER_ERROR, UserError

app = typer.Typer(
    help="Fine-tune Hugging Face models with hybrid strategies.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def friendly(fn):
    """Turn a UserError into one message on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            raise typer.Exit(EXIT_USER_ERROR) from None

    return wrapper


def _recipe(args: list[str] | None):
    from hybridtune.recipe import load_recipe

    args = list(args or [])
    path = args.pop(0) if args and "=" not in args[0] else None
    return load_recipe(path, args)


@app.command()
@friendly
def train(
    args: list[str] = typer.Argument(
        None, help="[RECIPE.yaml] [key.path=value ...]; no recipe = the default recipe"
    ),
) -> None:
    """Train a recipe (default: MiniLM fully fine-tuned on Rotten Tomatoes) and evaluate it on the test split."""
    from hybridtune import api
    from hybridtune.report.console import console, params_table

    recipe = _recipe(args)
    console.print(
        f"[bold]recipe[/] {recipe.name}: model {recipe.model.name}, data {recipe.data.source or recipe.data.train}"
    )
    summary = api.train(recipe)
    run = Path(summary["run_dir"])
    console.print(params_table(json.loads((run / "params.json").read_text())))
    for table in api.TASKS[recipe.task].eval_tables(json.loads((run / "eval.json").read_text())):
        console.print(table)
    console.print(
        f"trained in {summary['train_seconds']:.0f} s ({summary['train_samples_per_second']:.1f} samples/s, "
        f"{summary['precision']}); run dir: [bold]{run}[/]"
    )


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
    from hybridtune import api
    from hybridtune.recipe import load_recipe
    from hybridtune.report.console import console

    if run_dir.endswith((".yaml", ".yml")):
        recipe = load_recipe(run_dir, overrides)
        report, task = api.evaluate_zero_shot(recipe, data), api.TASKS[recipe.task]
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

    items = list(texts or [])
    if file is not None:
        if not file.is_file():
            raise UserError(f"--file {file}", "no such file", "a text file with one text per line")
        try:
            lines = file.read_text(encoding="utf-8-sig").splitlines()
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
def params(
    args: list[str] = typer.Argument(None, help="[RECIPE.yaml] [key.path=value ...]"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """What a recipe trains, per layer, without training."""
    from hybridtune import api
    from hybridtune.report.console import console, params_table

    table = api.params(_recipe(args))
    if as_json:
        typer.echo(json.dumps(table, indent=2))
    else:
        console.print(params_table(table))


@app.command()
@friendly
def compare(
    suite: str = typer.Argument(None, help="a suite YAML (default: the default suite on the bundled data)"),
    seeds: int = typer.Option(None, "--seeds", help="run every strategy with this many seeds (42, 43, ...)"),
    out: str = typer.Option(None, "--out", help="the compare dir (default: runs/compare-<suite name>)"),
) -> None:
    """Train strategies side by side: a table, comparison.csv/json, plots and report.html. Resumable."""
    from rich.table import Table

    from hybridtune.compare import compare as run_compare
    from hybridtune.report.compare import table_rows
    from hybridtune.report.console import console
    from hybridtune.rundir import read_json

    root = run_compare(
        suite, out, seeds, echo=lambda text: console.print(text, markup=False, highlight=False)
    )
    summary = read_json(root / "comparison.json")["summary"]
    header, body = table_rows(summary)
    table = Table(title=f"compare: {root}")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in body:
        table.add_row(*row)
    console.print(table)
    console.print(f"report: [bold]{root / 'report.html'}[/]")


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
