"""What `hybridtune distill` prints: the student beside its teacher (hybridtune/distillation.py)."""

from __future__ import annotations

from rich.table import Table


def distill_table(comparison: dict) -> Table:
    t, s, metric = comparison["teacher"], comparison["student"], comparison["metric"]
    scoring = comparison["scoring"]
    table = Table(
        title=f"student vs teacher (scoring: {scoring['texts']} test texts, {scoring['device']}, "
        f"{scoring['threads']} threads, best of {scoring['repeats']})"
    )
    for col in ("", "teacher", "student", "student / teacher"):
        table.add_column(col, justify="left" if not col else "right")

    def pct(x) -> str:
        return "—" if x is None else f"{100 * x:.2f} %"

    if t.get("validation_metric") == s.get("validation_metric") and t.get("validation") is not None:
        name = t["validation_metric"]
        value = (lambda x: f"{x:.4f}") if name == "loss" else pct
        table.add_row(f"validation {name}", value(t["validation"]), value(s.get("validation")), "")
    lost = comparison["test_lost"]
    table.add_row(
        f"test {metric}",
        pct(t["test"].get(metric)),
        pct(s["test"].get(metric)),
        f"{-100 * lost + 0.0:+.2f} points",
    )
    table.add_row("blocks", str(t["blocks"]), str(s["blocks"]), "")
    table.add_row(
        "parameters", f"{t['parameters']:,}", f"{s['parameters']:,}", f"{comparison['parameters_ratio']:.3f}×"
    )
    table.add_row(
        "weights on disk",
        f"{t['weights_mib']:.1f} MiB",
        f"{s['weights_mib']:.1f} MiB",
        f"{comparison['weights_ratio']:.3f}×",
    )
    table.add_row(
        "texts / s",
        f"{t['texts_per_second']:,.1f}",
        f"{s['texts_per_second']:,.1f}",
        f"{comparison['speedup']:.2f}×",
    )
    return table
