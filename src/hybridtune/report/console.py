"""Rich tables for the terminal: evaluation results and the per-layer parameter table."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

# piped or redirected, rich would wrap wide tables (the compare table) at 80 columns
console = Console(width=None if sys.stdout.isatty() else 200)


def eval_tables(report: dict, title: str = "test") -> list[Table]:
    summary = Table(title=f"{title}: {report['n']} examples")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("accuracy", f"{100 * report['accuracy']:.2f} %")
    summary.add_row("macro-F1", f"{100 * report['f1_macro']:.2f} %")

    per_class = Table(title="per class")
    for col in ("label", "precision", "recall", "F1", "support"):
        per_class.add_column(col, justify="left" if col == "label" else "right")
    for name, row in report["per_class"].items():
        per_class.add_row(
            name,
            f"{row['precision']:.3f}",
            f"{row['recall']:.3f}",
            f"{row['f1-score']:.3f}",
            str(int(row["support"])),
        )

    confusion = Table(title="confusion matrix (rows: true, columns: predicted)")
    confusion.add_column("")
    for name in report["labels"]:
        confusion.add_column(name, justify="right")
    for name, row in zip(report["labels"], report["confusion_matrix"], strict=True):
        confusion.add_row(name, *map(str, row))
    return [summary, per_class, confusion]


def params_table(table: dict) -> Table:
    out = Table(
        title=f"parameters: {table['trainable']:,} of {table['total']:,} trainable ({table['trainable_pct']:.3f} %)"
    )
    for col in ("layer", "total", "trainable", "%", "added", "lr"):
        out.add_column(col, justify="left" if col == "layer" else "right")
    for row in table["rows"]:
        lr = row.get("lr")
        lr_text = (
            "" if lr is None else f"{lr:.2e}" if not isinstance(lr, list) else f"{lr[0]:.1e}..{lr[1]:.1e}"
        )
        out.add_row(
            row["slot"],
            f"{row['total']:,}",
            f"{row['trainable']:,}",
            f"{row['trainable_pct']:.2f}",
            f"{row['added']:,}",
            lr_text,
        )
    if table.get("stages"):
        out.caption = "stages: " + "; ".join(
            f"{s['stage']} from step {s['start_step']}: {s['trainable']:,} train (lr x {s['lr_scale']:g})"
            for s in table["stages"]
        )
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def runs_table(rows: list[dict], title: str) -> Table:
    """`hybridtune runs`: one line per run dir, its status, headline metric and size."""
    table = Table(title=title)
    for col in ("run", "status", "test metric", "size", "note"):
        table.add_column(col, justify="right" if col in ("test metric", "size") else "left")
    colour = {
        "running": "cyan",
        "finished": "green",
        "failed": "red",
        "resumable": "yellow",
        "interrupted": "yellow",
    }
    for r in rows:
        metric = f"{r['metric']} {r['value']:.4f}" if isinstance(r.get("value"), int | float) else "-"
        note = r.get("error") or ""
        if r["status"] == "resumable":
            note = f"hybridtune train --resume {r['run']}"
        elif r["status"] == "interrupted":
            note = "killed before its first checkpoint: remove it and train again"
        elif r["status"] == "running":
            note = f"being written by process {r.get('pid')}"
        table.add_row(
            r["run"], f"[{colour[r['status']]}]{r['status']}[/]", metric, _size(r["size_bytes"]), note
        )
    return table
