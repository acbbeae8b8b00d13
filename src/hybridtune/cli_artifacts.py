"""The commands built on finished runs: ensemble, soup, merge-adapters, distill, export, serve.

Arguments -> calls -> rendering (report/console.py), as in cli.py, which registers them (with its
error handling) under the names of `COMMANDS`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from hybridtune.errors import UserError


def _weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError("--weights", repr(text), "comma-separated numbers, e.g. 0.5,0.3,0.2") from None


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
    from hybridtune.report.console import console, ensemble_line, members_table

    result = ens.build(run_dirs, out, combine, _weights(weights))
    console.print(members_table(result["members"], result["ensemble"], f"ensemble ({combine})", "ensemble"))
    console.print(ensemble_line(result, out))


def soup(
    run_dirs: list[str] = typer.Argument(..., help="two or more runs fine-tuned from the same base model"),
    greedy: bool = typer.Option(False, "--greedy", help="greedy soup (default: uniform)"),
    out: str = typer.Option(..., "--out", help="the run dir to write (a plain model: single-model cost)"),
) -> None:
    """Average the weights of runs fine-tuned from one base (LoRA runs are merged first): a model soup."""
    from hybridtune import ensemble as ens
    from hybridtune.report.console import console, members_table, soup_line

    result = ens.soup(run_dirs, out, greedy)
    console.print(members_table(result["members"], result["soup"], result["kind"].replace("_", " "), "soup"))
    console.print(soup_line(result, len(run_dirs), out))


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
    from hybridtune.report.console import console, merged_adapters_line

    result = ens.merge_adapters(run_dirs, out, method, _weights(weights))
    console.print(merged_adapters_line(result["merged"], len(run_dirs), method, out))


def distill(
    teacher: str = typer.Argument(..., help="a finished classification run: the teacher"),
    args: list[str] = typer.Argument(
        None, help="[RECIPE.yaml] [key.path=value ...]: the student's strategy (default: the teacher's)"
    ),
    student: str = typer.Option(
        None, "--student", help="the student model (a model dir, bundled name, hub id)"
    ),
    blocks: int = typer.Option(
        None, "--blocks", help="the student: the teacher's base cut to its bottom K blocks"
    ),
    repeats: int = typer.Option(
        3, "--repeats", help="timed scoring passes over the test split (the best counts)"
    ),
) -> None:
    """Train a student on a finished run's soft labels (Hinton et al. 2015), then compare the two:
    validation / test scores, parameters, weights on disk, texts per second."""
    from hybridtune import api
    from hybridtune.report.console import console
    from hybridtune.report.distill import distill_table

    items = list(args or [])
    recipe = items.pop(0) if items and "=" not in items[0] else None
    comparison = api.distill(teacher, student, blocks, recipe, items, repeats, echo=typer.echo)
    console.print(distill_table(comparison))
    run = comparison["student"]["run"]
    typer.echo(f"student run: {run}; the comparison: {run}/distill.json (and report.json)")


def export(
    run_dir: str = typer.Argument(..., help="a run dir written by `hybridtune train`"),
    fmt: str = typer.Option(
        ..., "--format", help="merged (LoRA folded into the weights) | peft | int8 (CPU)"
    ),
    out: str = typer.Option(..., "--out", help="the export dir (new, or an earlier export to replace)"),
) -> None:
    """Export a run: merged weights, its peft adapter, or int8 with its accuracy delta and speed-up."""
    from hybridtune.export import export as run_export
    from hybridtune.report.console import int8_line

    meta = run_export(run_dir, fmt, out, echo=typer.echo)
    if "int8" in meta:
        typer.echo(int8_line(meta["int8"]))
    typer.echo(f"load: {meta['load']}")


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
    max_pending: int = typer.Option(
        64, "--max-pending", min=1, help="requests in the server at once (queued or running); more get 503"
    ),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="seconds a request may wait; then 503"),
) -> None:
    """Serve a model over HTTP: /v1/classify, or /v1/generate and OpenAI-compatible /v1/completions and
    /v1/chat/completions for causal LMs; /health, /metrics, /docs. Bearer-token auth; bounded work."""
    from hybridtune.serve import Limits, create_app, run, token_from

    if not 1 <= port <= 65535:
        raise UserError("--port", str(port), "a TCP port from 1 to 65535")
    token = token_from(token_file, no_auth)
    limits = Limits(max_body_bytes, max_batch, max_wait_ms, max_new_tokens, max_pending, timeout)
    app_ = create_app(path, token=token, limits=limits)
    typer.echo(f"serving {path} on http://{host}:{port} (auth: {'off' if no_auth else 'bearer token'})")
    run(app_, host, port, limits)


COMMANDS = {
    "ensemble": ensemble,
    "soup": soup,
    "merge-adapters": merge_adapters,
    "distill": distill,
    "export": export,
    "serve": serve,
}
