"""The outputs of a compare: rows read from each run dir, mean ± std over seeds, comparison.csv /
.json, PNG plots and a self-contained report.html (no CDN: images are inlined, works offline). With
a reference strategy (`--reference`), each strategy's test metric paired seed by seed with the
reference's: the mean difference, its 95 % interval and the word (report/stats.py).

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
from hybridtune.report.stats import higher_is_better, paired, scale, sentence
from hybridtune.tasks.baseline import short

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
        "eval_" + (report["best_validation_metric"] or "").removeprefix("eval_"),  # None: no validation
        report.get("best_validation"),
    )
    best_eval = next(
        (r for r in evals if best is not None and abs(r.get(key, float("nan")) - best) < 1e-12), None
    )
    test = report["test"]
    warnings = report.get("warnings")
    if warnings is None and (run_dir / "eval.json").is_file():  # a run from before report.json had them
        warnings = rundir.read_json(run_dir / "eval.json").get("warnings")
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
        # a run no better than the majority class, or predicting one class (tasks/baseline.py)
        "warnings": warnings or [],
    }


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: list[dict]) -> list[dict]:
    """One entry per strategy, in suite order: mean and std of every column over its runs (seeds, and
    the draws of a few-shot recipe)."""
    out: dict[str, dict] = {}
    for row in rows:
        entry = out.setdefault(row["strategy"], {"strategy": row["strategy"], "seeds": [], "runs": []})
        entry["seeds"].append(row["seed"])
        entry["runs"].append(row)
    for entry in out.values():
        for key, _, _ in COLUMNS:
            entry[key], entry[key + "_std"] = _mean_std([r[key] for r in entry["runs"]])
        entry["metric"] = entry["runs"][0]["metric"]
        entry["warnings"] = warning_summary(entry["runs"])
    return list(out.values())


def warning_summary(runs: list[dict]) -> str:
    """e.g. "majority baseline 2/3, one class 1/3": how many seeds drew each kind of warning."""
    counts: dict[str, int] = {}
    for run in runs:
        for kind in dict.fromkeys(short(run["warnings"])):
            counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{kind} {n}/{len(runs)}" for kind, n in counts.items())


def add_paired(summary: list[dict], rows: list[dict], reference: str) -> list[str]:
    """Each strategy's test metric against the reference's, seed by seed (the same seed: the same
    data order and head initialisation); sets `vs_reference` on every summary entry and
    `diff_vs_reference` on every run row; returns the sentences."""
    # paired by (seed, few-shot draw): the reference's run on the same seed and the same labelled rows
    ref_by_seed = {(r["seed"], r.get("draw")): r["test_metric"] for r in rows if r["strategy"] == reference}
    for row in rows:
        ref = ref_by_seed.get((row["seed"], row.get("draw")))
        usable = row["test_metric"] is not None and ref is not None
        row["diff_vs_reference"] = row["test_metric"] - ref if usable else None
    sentences = []
    for s in summary:
        if s["strategy"] == reference:
            s["vs_reference"] = {"reference": reference, "is_reference": True}
            continue
        pairs = [
            (r["test_metric"], ref_by_seed[(r["seed"], r.get("draw"))], r["seed"])
            for r in s["runs"]
            if r["test_metric"] is not None and ref_by_seed.get((r["seed"], r.get("draw"))) is not None
        ]
        if not pairs:
            s["vs_reference"] = {"reference": reference, "verdict": None}
            continue
        p = paired([a for a, _, _ in pairs], [b for _, b, _ in pairs], higher_is_better(s["metric"]))
        s["vs_reference"] = {"reference": reference, "seeds": [seed for _, _, seed in pairs], **p}
        sentences.append(sentence(s["strategy"], p, reference, s["metric"], len(pairs)))
    return sentences


def _paired_cells(s: dict) -> list[str]:

    v = s.get("vs_reference") or {}
    if v.get("is_reference"):
        return ["(reference)", "-", "-"]
    if v.get("verdict") is None:
        return ["-", "-", "-"]
    k, _ = scale(s["metric"])
    ci = f"{k * v['low']:+.2f} to {k * v['high']:+.2f}" if v["low"] is not None else "-"
    return [f"{k * v['mean']:+.2f}", ci, v["verdict"]]


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
    # "runs": seeds × few-shot draws, the number each mean ± std is taken over
    header = ["strategy", "runs"] + [label.format(metric=metric) for _, label, _ in COLUMNS] + ["warnings"]
    body = [
        [s["strategy"], str(len(s["seeds"]))]
        + [_fmt(s[k], s[k + "_std"], kind) for k, _, kind in COLUMNS]
        + [s.get("warnings") or "-"]
        for s in summary
    ]
    reference = next((s["vs_reference"]["reference"] for s in summary if s.get("vs_reference")), None)
    if reference is not None:  # the search verdict's columns (search/report.py verdict_table)
        header += [f"Δ vs {reference}", "95 % CI of Δ", "verdict"]
        body = [row + _paired_cells(s) for row, s in zip(body, summary, strict=True)]
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
    name: str,
    header: list[str],
    body: list[list[str]],
    images: dict[str, bytes],
    recipes: dict[str, str],
    sentences: list[str] | None = None,
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
<p>Mean ± std over seeds (and few-shot draws). Every figure is read from the run dirs under <code>runs/</code>.</p>
{"".join(f"<p><b>{html.escape(x)}</b></p>" for x in sentences or [])}<table id="comparison"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr></thead><tbody>
{rows}</tbody></table><div class="plots">{imgs}</div><h2>Recipes (resolved)</h2>{details}</body></html>"""


def write_outputs(
    root: Path, runs: list[dict], measured: dict, name: str, reference: str | None = None
) -> list[dict]:
    rows = []
    for entry in runs:
        row = run_row(root / "runs" / entry["run"], measured.get(entry["run"], {}))
        rows.append(
            {
                "strategy": entry["strategy"],
                "seed": entry["seed"],
                "draw": entry.get("draw"),  # few-shot: the draw of k per class (None: the whole split)
                "run": entry["run"],
                **row,
            }
        )
    summary = aggregate(rows)
    sentences = add_paired(summary, rows, reference) if reference else []
    header, body = table_rows(summary)
    paired_of = {s["strategy"]: s.get("vs_reference") or {} for s in summary}
    flat = [
        {**{k: v for k, v in r.items() if k != "curve"}, "warnings": "; ".join(r["warnings"])}
        | (_paired_csv(paired_of[r["strategy"]]) if reference else {})
        for r in rows
    ]
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
            **({"reference": reference, "sentences": sentences} if reference else {}),
        },
    )
    images = plots(summary)
    for file, data in images.items():
        durable.write_bytes(root / file, data)
    recipes = {
        s["strategy"]: (root / "runs" / s["runs"][0]["run"] / "recipe.yaml").read_text() for s in summary
    }
    rundir.write_text(root / "report.html", html_report(name, header, body, images, recipes, sentences))
    return summary


def _paired_csv(v: dict) -> dict:
    """The strategy's paired columns on each of its run rows (the csv has one row per run)."""
    return {
        "reference": v.get("reference"),
        "vs_reference_mean": v.get("mean"),
        "vs_reference_low": v.get("low"),
        "vs_reference_high": v.get("high"),
        "verdict": "(reference)" if v.get("is_reference") else v.get("verdict"),
    }
