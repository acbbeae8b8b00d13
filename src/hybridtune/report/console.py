"""What the CLI prints, rendered: evaluation results, the per-layer parameter table, the run list, the
compare table, ensemble / soup / merged-adapter scores and the int8 export's summary. cli.py only
calls and prints these."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

# piped or redirected, rich would wrap wide tables (the compare table) at 80 columns
console = Console(width=None if sys.stdout.isatty() else 200)


def eval_tables(report: dict, title: str = "test") -> list[Table]:
    summary = Table(title=f"{title}: {report['n']} examples")
    summary.add_column("metric")
    summary.add_column("value", justify="right")
    summary.add_row("accuracy", f"{100 * report['accuracy']:.2f} %")
    summary.add_row("macro-F1", f"{100 * report['f1_macro']:.2f} %")
    add_baseline_rows(summary, report, "class")

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
    return [summary, per_class, confusion, *warning_lines(report)]


def add_baseline_rows(summary: Table, report: dict, unit: str) -> None:
    """The majority baseline and the most-predicted label (tasks/baseline.py); an eval.json written
    before they existed has neither."""
    base = report.get("baseline")
    if base:
        summary.add_row(
            f"majority-{unit} baseline", f"{100 * base['majority_share']:.2f} % ({base['majority_label']})"
        )
        summary.add_row(
            f"most-predicted {unit}",
            f"{100 * base['top_predicted_share']:.2f} % ({base['top_predicted_label']})",
        )


def warning_lines(report: dict) -> list[Text]:
    return [Text(f"warning: {w}", style="bold yellow") for w in report.get("warnings", [])]


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
    lines = [part["line"] for part in table.get("parts", {}).values() if part.get("line")]
    if lines:
        out.caption = "\n".join([*([out.caption] if out.caption else []), *lines])
    return out


def spectrum_table(report: dict) -> Table:
    """freeze.spectrum's scores: a row per block, a column per matrix type; * marks what trains."""
    unit = report["unit"]
    where = "from the cache" if report["from_cache"] else f"computed in {report['seconds']:.1f} s"
    out = Table(
        title=f"spectrum: SNR score per matrix ({where}); * trains: the top {report['share']:g} "
        + ("of each type" if unit == "matrix" else "of the blocks (mean of score / best of its type)")
    )
    out.add_column("layer")
    for kind in report["types"]:
        out.add_column(kind, justify="right")
    blocks = {b["block"]: b for b in report.get("blocks", [])}
    if blocks:
        out.add_column("block score", justify="right")
    cells: dict[int, dict[str, str]] = {}
    for m in report["matrices"]:
        mark = " *" if m["chosen"] and unit == "matrix" else ""
        cells.setdefault(m["block"], {})[m["type"]] = f"{m['score']:.4g}{mark}"
    for b in sorted(cells):
        row = [f"block.{b}", *(cells[b].get(kind, "") for kind in report["types"])]
        if blocks:
            row.append(f"{blocks[b]['score']:.3f}" + (" *" if blocks[b]["chosen"] else ""))
        out.add_row(*row)
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


# --------------------------------------------------------------------------------------------------
# train


def recipe_line(recipe) -> str:
    return f"[bold]recipe[/] {recipe.name}: model {recipe.model.name}, data {recipe.data.source or recipe.data.train}"


def precision_line(choice) -> str:
    """train/precision.choose's choice and why (print with highlight=False)."""
    return f"[bold]precision[/] {choice.precision}: {choice.reason}"


def trained_line(summary: dict, run) -> str:
    return (
        f"trained in {summary['train_seconds']:.0f} s ({summary['train_samples_per_second']:.1f} samples/s, "
        f"{summary['precision']}); run dir: [bold]{run}[/]"
    )


# --------------------------------------------------------------------------------------------------
# many runs: compare, ensembles, soups, merged adapters


def compare_table(root, summary: list[dict]) -> Table:
    from hybridtune.report.compare import table_rows

    header, body = table_rows(summary)
    table = Table(title=f"compare: {root}")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in body:
        table.add_row(*row)
    return table


def members_table(members: list[dict], combined: dict, title: str, label: str) -> Table:
    """Each member's validation / test scores and the combination's (`ensemble`, `soup`)."""
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
    return table


def ensemble_run(summary: dict) -> list:
    """A trained `ensemble:` recipe: its members' and the combination's test scores, and the gain."""
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
    line = (
        f"gain over the best member: {100 * summary['gain_over_best_member']:+.2f} pt test accuracy; "
        f"trained in {summary['train_seconds']:.0f} s; run dir: [bold]{summary['run_dir']}[/]"
    )
    return [table, line]


def self_training_table(summary: dict) -> Table:
    """A self-training run: per round, its teacher, the texts that were confident and that joined
    (per class), and the round's validation and test scores; below, the round kept and why, and why
    the rounds stopped early (docs/few_shot.md)."""
    section = summary["self_training"]
    unlabeled = section["unlabeled"]
    title = (
        f"self-training: {unlabeled['texts']} unlabelled texts ({unlabeled['source']}), "
        f"threshold {section['threshold']}, per_class {section['per_class']}"
    )
    kept = section.get("final_round")
    caption = [f"kept: round {kept}, {section['kept_because']}"] if section.get("kept_because") else []
    caption += [section["stopped"]] if section.get("stopped") else []
    table = Table(title=title, caption="\n".join(caption) or None)
    for col in ("round", "trained on", "confident", "added", "validation", "test accuracy", "test macro-F1"):
        table.add_column(col, justify="left" if col in ("round", "trained on") else "right")

    def per_class(counts: dict | None) -> str:
        return " · ".join(f"{name} {n}" for name, n in counts.items()) if counts else "-"

    def share(value) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    for r in section["rounds"]:
        if r["round"] == 0:
            what = "(the given teacher)" if r.get("given") else "the labelled rows"
        else:  # the texts its teacher, the round before, labelled confidently
            what = f"+ round {r['round'] - 1}'s pseudo-labels"
        test = r.get("test") or {}
        table.add_row(
            f"{r['round']} (kept)" if r["round"] == kept and r.get("trained") else str(r["round"]),
            what,
            per_class(r.get("above_threshold")),
            per_class(r.get("added")),
            share(r.get("validation")),
            share(test.get("accuracy")),
            share(test.get("f1_macro")),
        )
    return table


def ensemble_line(result: dict, out: str) -> str:
    return (
        f"gain over the best member on validation ({result['best_member']}): "
        f"{100 * result['gain_over_best_member']:+.2f} pt test accuracy; "
        f"over the mean member: {100 * result['gain_over_mean_member']:+.2f} pt; saved: [bold]{out}[/]"
    )


def soup_line(result: dict, candidates: int, out: str) -> str:
    return (
        f"ingredients: {len(result['ingredients'])} of {candidates}; gain over the best member: "
        f"{100 * result['gain_over_best_member']:+.2f} pt test accuracy; saved: [bold]{out}[/]"
    )


def merged_adapters_line(merged: dict, adapters: int, method: str, out: str) -> str:
    return (
        f"merged {adapters} adapters ({method}): validation accuracy "
        f"{100 * merged['validation']['accuracy']:.2f} %, test {100 * merged['test']['accuracy']:.2f} %; "
        f"saved: [bold]{out}[/]"
    )


# --------------------------------------------------------------------------------------------------
# export


def int8_line(q: dict) -> str:
    """export --format int8: the metric and speed of int8 against fp32 (plain text)."""
    metric = q["metric"]
    return (
        f"int8 vs fp32 on the test split (n={q['n']}, {q['threads']} threads): {metric} "
        f"{q['fp32'][metric]:.4f} -> {q['int8'][metric]:.4f} (delta {q['delta']:+.4f}); "
        f"{q['fp32']['samples_per_second']:.1f} -> {q['int8']['samples_per_second']:.1f} samples/s "
        f"(speed-up x{q['speedup']:.2f}); weights {q['size_mb']['fp32']:.1f} -> {q['size_mb']['int8']:.1f} MiB"
    )
