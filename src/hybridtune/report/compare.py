"""The outputs of a compare: rows read from each run dir, mean ± std over seeds, comparison.csv /
.json, PNG plots and a self-contained report.html (no CDN: images are inlined, works offline).

Every number comes from a run's own files (report.json, eval.json, params.json, metrics.jsonl) or
from the compare's measurement of the run's process (measured.json: wall time, peak RSS).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hybridtune import durable, rundir  # noqa: E402

COLUMNS = [
    ("test_metric", "test {metric}", "pct"),
    ("test_f1_macro", "test macro-F1", "pct"),
    ("trainable", "trainable params", "int"),
    ("trainable_pct", "trainable %", "float3"),
    ("train_seconds", "train time s", "float1"),
    ("samples_per_second", "samples/s", "float1"),
    ("tokens_per_second", "tokens/s", "int"),
    ("peak_rss_mib", "peak RSS MiB", "int"),
    ("seconds_to_best", "time to best val s", "float1"),
    ("cached_blocks", "frozen blocks cached", "int"),  # the frozen-trunk cache's depth (docs/speed.md)
]


def run_row(run_dir: Path, measured: dict) -> dict:
    report = rundir.read_json(run_dir / "report.json")
    logs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    metric = report["metric"]
    evals = [r for r in logs if f"eval_{metric}" in r]
    key, best = (
        "eval_" + report["best_validation_metric"].removeprefix("eval_"),
        report.get("best_validation"),
    )
    best_eval = next(
        (r for r in evals if best is not None and abs(r.get(key, float("nan")) - best) < 1e-12), None
    )
    test = report["test"]
    return {
        "metric": metric,
        "test_metric": test.get(metric),
        "test_f1_macro": test.get("f1_macro"),
        "trainable": report["trainable"],
        "total": report["total"],
        "trainable_pct": report["trainable_pct"],
        "train_seconds": report["train_seconds"],
        "samples_per_second": report.get("train_samples_per_second"),
        "tokens_per_second": report.get("train_tokens_per_second"),
        "peak_rss_mib": measured.get("peak_rss_mib"),
        "cuda_peak_mib": report.get("cuda_peak_mib"),
        "wall_seconds": measured.get("wall_seconds"),
        "seconds_to_best": best_eval["time_s"] if best_eval else None,
        # the depth the run started caching at; an ensemble's report has none (its members do)
        "cached_blocks": (report.get("trunk_cache") or {}).get("depth"),
        "curve": [(r["time_s"], r["step"], r[f"eval_{metric}"]) for r in evals],
    }


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per strategy, in suite order: mean and std of every column over its seeds."""
    out: dict[str, dict] = {}
    for row in rows:
        entry = out.setdefault(row["strategy"], {"strategy": row["strategy"], "seeds": [], "runs": []})
        entry["seeds"].append(row["seed"])
        entry["runs"].append(row)
    for entry in out.values():
        for key, _, _ in COLUMNS:
            entry[key], entry[key + "_std"] = _mean_std([r[key] for r in entry["runs"]])
        entry["metric"] = entry["runs"][0]["metric"]
    return list(out.values())


def _fmt(value, std, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        text = f"{100 * value:.2f}"
        return text + (f" ± {100 * std:.2f}" if std else "")
    if kind == "int":
        return f"{value:,.0f}"
    digits = 3 if kind == "float3" else 1
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std and kind != "float3" else "")


def table_rows(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    metric = summary[0]["metric"]
    header = ["strategy", "seeds"] + [label.format(metric=metric) for _, label, _ in COLUMNS]
    body = [
        [s["strategy"], str(len(s["seeds"]))] + [_fmt(s[k], s[k + "_std"], kind) for k, _, kind in COLUMNS]
        for s in summary
    ]
    return header, body


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plots(summary: list[dict]) -> dict[str, bytes]:
    metric = summary[0]["metric"]
    out = {}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        ax.errorbar(
            s["trainable"], 100 * s["test_metric"], yerr=100 * (s["test_metric_std"] or 0), fmt="o", capsize=3
        )
        ax.annotate(
            s["strategy"],
            (s["trainable"], 100 * s["test_metric"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set(
        xlabel="trainable parameters (log scale)",
        ylabel=f"test {metric} %",
        title=f"Test {metric} vs trainable parameters",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out["metric_vs_params.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        curve = s["runs"][0]["curve"]
        if curve:
            ax.plot([t for t, _, _ in curve], [100 * v for _, _, v in curve], marker="o", label=s["strategy"])
    ax.set(xlabel="training time s (first seed)", ylabel=f"validation {metric} %", title="Learning curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out["learning_curves.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        ax.errorbar(
            s["train_seconds"],
            100 * s["test_metric"],
            xerr=s["train_seconds_std"] or 0,
            yerr=100 * (s["test_metric_std"] or 0),
            fmt="s",
            capsize=3,
        )
        ax.annotate(
            s["strategy"],
            (s["train_seconds"], 100 * s["test_metric"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set(xlabel="training time s", ylabel=f"test {metric} %", title=f"Test {metric} vs training time")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out["time_vs_metric.png"] = _png(fig)
    return out


CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
img{max-width:100%;margin:1em 0;border:1px solid #eee}pre{background:#f7f7f7;padding:8px;overflow:auto}.plots{display:flex;flex-wrap:wrap;gap:1em}"""


def html_report(
    name: str, header: list[str], body: list[list[str]], images: dict[str, bytes], recipes: dict[str, str]
) -> str:
    rows = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    imgs = "\n".join(
        f'<img id="{html.escape(k)}" alt="{html.escape(k)}" src="data:image/png;base64,{base64.b64encode(v).decode()}">'
        for k, v in images.items()
    )
    details = "\n".join(
        f"<details><summary>{html.escape(k)}</summary><pre>{html.escape(v)}</pre></details>"
        for k, v in recipes.items()
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>hybridtune compare: {html.escape(name)}</title>
<style>{CSS}</style></head><body><h1>hybridtune compare: {html.escape(name)}</h1>
<p>Mean ± std over seeds. Every figure is read from the run dirs under <code>runs/</code>.</p>
<table id="comparison"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr></thead><tbody>
{rows}</tbody></table><div class="plots">{imgs}</div><h2>Recipes (resolved)</h2>{details}</body></html>"""


def write_outputs(root: Path, runs: list[dict], measured: dict, name: str) -> list[dict]:
    rows = []
    for entry in runs:
        row = run_row(root / "runs" / entry["run"], measured.get(entry["run"], {}))
        rows.append({"strategy": entry["strategy"], "seed": entry["seed"], "run": entry["run"], **row})
    summary = aggregate(rows)
    header, body = table_rows(summary)
    flat = [{k: v for k, v in r.items() if k != "curve"} for r in rows]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(flat[0]))
    writer.writeheader()
    writer.writerows(flat)
    rundir.write_text(root / "comparison.csv", text.getvalue())
    rundir.write_json(
        root / "comparison.json",
        {
            "name": name,
            "runs": rows,
            "summary": [{k: v for k, v in s.items() if k != "runs"} for s in summary],
        },
    )
    images = plots(summary)
    for file, data in images.items():
        durable.write_bytes(root / file, data)
    recipes = {
        s["strategy"]: (root / "runs" / s["runs"][0]["run"] / "recipe.yaml").read_text() for s in summary
    }
    rundir.write_text(root / "report.html", html_report(name, header, body, images, recipes))
    return summary
