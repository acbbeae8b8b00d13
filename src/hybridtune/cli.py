"""The command line: arguments -> api calls. No logic of its own.

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
    from hybridtune.report.console import console
    from hybridtune.train.precision import choose

    choice = choose(precision)
    console.print(f"[bold]precision[/] {choice.precision}: {choice.reason}", highlight=False)


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
    from hybridtune.report.console import console, params_table

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
        console.print(
            f"[bold]recipe[/] {recipe.name}: model {recipe.model.name}, data {recipe.data.source or recipe.data.train}"
        )
        _print_precision(recipe.train.precision)
        summary = api.train(recipe)
    if summary.get("rank"):  # another process of a multi-process run: rank 0 reports
        return
    run = Path(summary["run_dir"])
    if recipe.ensemble is not None:
        _print_ensemble_run(summary)
        return
    console.print(params_table(json.loads((run / "params.json").read_text())))
    for table in api.task_of(str(run)).eval_tables(json.loads((run / "eval.json").read_text())):
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
    """Answer prompts with a causal_lm run (its chat template, as in training)."""
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
    from hybridtune.report.console import console, params_table

    table = api.params(_recipe(args))
    if as_json:
        typer.echo(json.dumps(table, indent=2))
    else:
        console.print(params_table(table))


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
) -> None:
    """Train strategies side by side: a table, comparison.csv/json, plots and report.html. Resumable."""
    from rich.table import Table

    from hybridtune.compare import compare as run_compare
    from hybridtune.report.compare import table_rows
    from hybridtune.report.console import console
    from hybridtune.rundir import read_json

    args = list(args or [])
    suite = args.pop(0) if args and "=" not in args[0] else None
    root = run_compare(
        suite,
        out,
        seeds,
        echo=lambda text: console.print(text, markup=False, highlight=False),
        overrides=args,
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


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError("--weights", repr(text), "comma-separated numbers, e.g. 0.5,0.3,0.2") from None


def _print_members(members: list[dict], combined: dict, title: str, label: str) -> None:
    from rich.table import Table

    from hybridtune.report.console import console

    table = Table(title=title)
    for col in ("model", "validation accuracy", "test accuracy", "test macro-F1"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in members:
        table.add_row(
            m["path"],
            f"{100 * m['validation']['accuracy']:.2f}",
            f"{100 * m['test']['accuracy']:.2f}",
            f"{100 * m['test']['f1_macro']:.2f}",
        )
    table.add_row(
        f"[bold]{label}[/]",
        f"[bold]{100 * combined['validation']['accuracy']:.2f}[/]",
        f"[bold]{100 * combined['test']['accuracy']:.2f}[/]",
        f"[bold]{100 * combined['test']['f1_macro']:.2f}[/]",
    )
    console.print(table)


def _print_ensemble_run(summary: dict) -> None:
    from rich.table import Table

    from hybridtune.report.console import console

    table = Table(title=f"ensemble of {len(summary['members'])} ({summary['combine']})")
    for col in ("member", "test accuracy", "test macro-F1"):
        table.add_column(col, justify="left" if col == "member" else "right")
    for m in summary["members"]:
        table.add_row(
            m["run_dir"], f"{100 * m['test']['accuracy']:.2f}", f"{100 * m['test']['f1_macro']:.2f}"
        )
    test = summary["test"]
    table.add_row(
        "[bold]combined[/]", f"[bold]{100 * test['accuracy']:.2f}[/]", f"{100 * test['f1_macro']:.2f}"
    )
    console.print(table)
    console.print(
        f"gain over the best member: {100 * summary['gain_over_best_member']:+.2f} pt test accuracy; "
        f"trained in {summary['train_seconds']:.0f} s; run dir: [bold]{summary['run_dir']}[/]"
    )


@app.command()
@friendly
def ensemble(
    run_dirs: list[str] = typer.Argument(..., help="two or more classification run dirs (same label set)"),
    combine: str = typer.Option(
        "mean_logits", "--combine", help="mean_logits | mean_probs | vote | weighted"
    ),
    weights: str = typer.Option(
        None,
        "--weights",
        help="weighted: one weight per member, e.g. 0.5,0.3,0.2 (default: validation accuracy)",
    ),
    out: str = typer.Option(..., "--out", help="the ensemble dir to write (manifest + members)"),
) -> None:
    """Combine finished runs' outputs; print each member's and the ensemble's scores; save the ensemble
    (`eval`, `predict` and `serve` accept the saved dir)."""
    from hybridtune import ensemble as ens
    from hybridtune.report.console import console

    result = ens.build(run_dirs, out, combine, _weights(weights))
    _print_members(result["members"], result["ensemble"], f"ensemble ({combine})", "ensemble")
    console.print(
        f"gain over the best member on validation ({result['best_member']}): "
        f"{100 * result['gain_over_best_member']:+.2f} pt test accuracy; "
        f"over the mean member: {100 * result['gain_over_mean_member']:+.2f} pt; saved: [bold]{out}[/]"
    )


@app.command()
@friendly
def soup(
    run_dirs: list[str] = typer.Argument(..., help="two or more runs fine-tuned from the same base model"),
    greedy: bool = typer.Option(False, "--greedy", help="greedy soup (default: uniform)"),
    out: str = typer.Option(..., "--out", help="the run dir to write (a plain model: single-model cost)"),
) -> None:
    """Average the weights of runs fine-tuned from one base (LoRA runs are merged first): a model soup."""
    from hybridtune import ensemble as ens
    from hybridtune.report.console import console

    result = ens.soup(run_dirs, out, greedy)
    _print_members(result["members"], result["soup"], result["kind"].replace("_", " "), "soup")
    console.print(
        f"ingredients: {len(result['ingredients'])} of {len(run_dirs)}; gain over the best member: "
        f"{100 * result['gain_over_best_member']:+.2f} pt test accuracy; saved: [bold]{out}[/]"
    )


@app.command("merge-adapters")
@friendly
def merge_adapters(
    run_dirs: list[str] = typer.Argument(..., help="two or more LoRA runs of one base model"),
    method: str = typer.Option(
        "cat", "--method", help="cat | linear | svd | ties | dare_ties | dare_linear | ..."
    ),
    weights: str = typer.Option(None, "--weights", help="one weight per adapter (default: 1/K each)"),
    out: str = typer.Option(..., "--out", help="the run dir to write (one peft adapter)"),
) -> None:
    """Merge LoRA adapters into one with peft's add_weighted_adapter."""
    from hybridtune import ensemble as ens
    from hybridtune.report.console import console

    result = ens.merge_adapters(run_dirs, out, method, _weights(weights))
    merged = result["merged"]
    console.print(
        f"merged {len(run_dirs)} adapters ({method}): validation accuracy "
        f"{100 * merged['validation']['accuracy']:.2f} %, test {100 * merged['test']['accuracy']:.2f} %; "
        f"saved: [bold]{out}[/]"
    )


@app.command()
@friendly
def export(
    run_dir: str = typer.Argument(..., help="a run dir written by `hybridtune train`"),
    fmt: str = typer.Option(
        ..., "--format", help="merged (LoRA folded into the weights) | peft | int8 (CPU)"
    ),
    out: str = typer.Option(..., "--out", help="the export dir (new, or an earlier export to replace)"),
) -> None:
    """Export a run: merged weights, its peft adapter, or int8 with its accuracy delta and speed-up."""
    from hybridtune.export import export as run_export

    meta = run_export(run_dir, fmt, out, echo=typer.echo)
    if "int8" in meta:
        q = meta["int8"]
        metric = q["metric"]
        typer.echo(
            f"int8 vs fp32 on the test split (n={q['n']}, {q['threads']} threads): {metric} "
            f"{q['fp32'][metric]:.4f} -> {q['int8'][metric]:.4f} (delta {q['delta']:+.4f}); "
            f"{q['fp32']['samples_per_second']:.1f} -> {q['int8']['samples_per_second']:.1f} samples/s "
            f"(speed-up x{q['speedup']:.2f}); weights {q['size_mb']['fp32']:.1f} -> {q['size_mb']['int8']:.1f} MiB"
        )
    typer.echo(f"load: {meta['load']}")


@app.command()
@friendly
def serve(
    path: str = typer.Argument(..., help="a run dir, an export dir or a transformers model dir"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    token_file: Path = typer.Option(
        None, "--token-file", help="a file holding the bearer token (default: $HYBRIDTUNE_TOKEN)"
    ),
    no_auth: bool = typer.Option(False, "--no-auth", help="serve without a token (trusted networks only)"),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="texts per request and per forward call"),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, help="dynamic batching window"),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", min=1, help="larger bodies get 413"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="the most a request may ask"),
) -> None:
    """Serve a model over HTTP: /v1/classify, or /v1/generate and OpenAI-compatible /v1/completions and
    /v1/chat/completions for causal LMs; /health, /metrics, /docs. Bearer-token auth."""
    import os

    import uvicorn

    from hybridtune.serve import TOKEN_ENV, Limits, create_app

    token = None
    if token_file is not None:
        if not token_file.is_file():
            raise UserError(f"--token-file {token_file}", "no such file", "a file holding the token")
        token = token_file.read_text(encoding="utf-8").strip() or None
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is None and not no_auth:
        raise UserError("serve", "no token", f"--token-file FILE or ${TOKEN_ENV} (or --no-auth)")
    limits = Limits(max_body_bytes, max_batch, max_wait_ms, max_new_tokens)
    app_ = create_app(path, token=None if no_auth else token, limits=limits)
    typer.echo(f"serving {path} on http://{host}:{port} (auth: {'off' if no_auth else 'bearer token'})")
    uvicorn.run(app_, host=host, port=port, log_level="info")


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
