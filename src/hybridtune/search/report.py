"""The outputs of a search: trials.csv / trials.json, the Pareto fronts (pareto.json, a recipe per
Pareto point under pareto/, two plots), verdict.json's table, the lr range tests (lr_range.json and
its plot, when the space has `lr_range_test`) and report.html in compare's style.

The fronts are of finished (complete) trials: validation metric vs trainable parameters and vs
training time, and, in a multi-objective search, over the study's own objectives. A trial is on a
front when no other trial is at least as good in every measure and better in one.
"""

from __future__ import annotations

import csv
import html
import math
from pathlib import Path
from typing import Any

from hybridtune import rundir
from hybridtune.report.compare import CSS, _png, plt
from hybridtune.report.labels import place_labels
from hybridtune.search.setup import Context
from hybridtune.tasks import higher_is_better

FIELDS = [
    "number", "state", "family", "value", "evaluations", "trainable", "trainable_pct", "train_seconds",
    "peak_memory_mib", "seconds", "params", "run_dir", "error",
]  # fmt: skip


def trial_rows(study) -> list[dict]:
    """One row per trial the search ran (interrupted ones, run again under a new number, left out)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if f"interrupted_{t.number}" in study.user_attrs or t.state.name in ("RUNNING", "WAITING"):
            continue
        attrs = t.user_attrs
        row = {"number": t.number, "state": t.state.name.lower(), "params": dict(t.params)}
        row |= {k: attrs.get(k) for k in FIELDS if k not in row}
        row["values"] = list(t.values) if t.values else None
        row["curve"] = attrs.get("curve", [])
        if attrs.get("draw_values") is not None:  # a few-shot search: the value is their mean
            row["draw_values"] = attrs["draw_values"]
        rows.append(row)
    return rows


def non_dominated(points: list[tuple[float, ...]], maximize: list[bool]) -> list[int]:
    """Indices of the points no other point dominates (>= in every measure, > in one; `maximize`
    says which way each measure is better). Equal points do not dominate each other."""
    signed = [tuple(v if up else -v for v, up in zip(p, maximize, strict=True)) for p in points]
    out = []
    for i, p in enumerate(signed):
        dominated = any(
            all(a >= b for a, b in zip(q, p, strict=True)) and any(a > b for a, b in zip(q, p, strict=True))
            for j, q in enumerate(signed)
            if j != i
        )
        if not dominated:
            out.append(i)
    return out


def fronts(rows: list[dict], ctx: Context) -> dict[str, list[int]]:
    """Trial numbers on each front: metric vs params, metric vs time (and the study's objectives)."""
    done = [r for r in rows if r["state"] == "complete"]
    up = higher_is_better(ctx.metric)
    out = {
        "params": [done[i]["number"] for i in non_dominated([(r["value"], r["trainable"]) for r in done], [up, False])],
        "time": [done[i]["number"] for i in non_dominated([(r["value"], r["train_seconds"]) for r in done], [up, False])],
    }  # fmt: skip
    if len(ctx.space.objectives) > 1:
        maximize = [up] + [False] * (len(ctx.space.objectives) - 1)
        out["objectives"] = [
            done[i]["number"] for i in non_dominated([tuple(r["values"]) for r in done], maximize)
        ]
    return out


def _label(row: dict) -> str:
    return f"#{row['number']} {row['family']}"


def pareto_plot(rows: list[dict], front: list[int], key: str, xlabel: str, metric: str, log: bool) -> bytes:
    done = [r for r in rows if r["state"] == "complete" and r.get(key) is not None]
    on = sorted((r for r in done if r["number"] in front), key=lambda r: r[key])
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.scatter([r[key] for r in done], [100 * r["value"] for r in done], s=14, color="#bbb", label="trial")
    ax.step([r[key] for r in on], [100 * r["value"] for r in on], where="post", color="#1f77b4", alpha=0.6)
    ax.scatter(
        [r[key] for r in on], [100 * r["value"] for r in on], s=28, color="#1f77b4", label="Pareto front"
    )
    if log:
        ax.set_xscale("log")
    ax.set(
        xlabel=xlabel,
        ylabel=f"validation {metric} %",
        title=f"Validation {metric} vs {xlabel.split(' (')[0]}",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    left_out = place_labels(ax, [r[key] for r in on], [100 * r["value"] for r in on], [_label(r) for r in on])
    if left_out:  # no free spot on the plot: listed under it instead
        fig.text(0.01, 0.01, "also on the front: " + ", ".join(left_out), fontsize=7)
    return _png(fig)


def _cell(value: Any, kind: str = "") -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.2f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(header: list[str], body: list[list[str]], ident: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    return f'<table id="{ident}"><thead><tr>{head}</tr></thead><tbody>\n{rows}</tbody></table>'


def trials_table(rows: list[dict], metric: str, front: set[int]) -> tuple[list[str], list[list[str]]]:
    header = [
        "trial",
        "family",
        "state",
        f"val {metric}",
        "evaluations",
        "trainable",
        "train s",
        "peak MiB",
        "Pareto",
        "settings",
    ]
    body = [
        [str(r["number"]), r["family"] or "-", r["state"], _cell(r["value"], "pct") if higher_is_better(metric) else _cell(r["value"]),
         _cell(r["evaluations"]), _cell(r["trainable"]), _cell(r["train_seconds"]), _cell(r["peak_memory_mib"]),
         "yes" if r["number"] in front else "",
         ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items())]
        for r in rows
    ]  # fmt: skip
    return header, body


def verdict_table(verdict: dict) -> tuple[list[str], list[list[str]]]:
    metric = verdict["metric"]
    runs = "seeds × draws" if verdict.get("draws", 1) > 1 else "seeds"  # a few-shot search: each pair
    header = ["recipe", runs, f"test {metric} mean ± sd", "Δ vs reference", "95 % CI of Δ", "verdict"]
    scale = 100 if higher_is_better(metric) else 1
    body = []
    for c in verdict["candidates"]:
        d = c.get("paired")
        body.append([
            c["name"], str(len(c["values"])), f"{scale * c['mean']:.2f} ± {scale * c['sd']:.2f}",
            f"{scale * d['mean']:+.2f}" if d else "(reference)",
            f"{scale * d['low']:+.2f} to {scale * d['high']:+.2f}" if d and d.get("low") is not None else "-",
            c.get("verdict", "-"),
        ])  # fmt: skip
    return header, body


def confirm_table(verdict: dict) -> tuple[list[str], list[list[str]]]:
    """The confirmation (search/confirm.py): per confirmed trial its validation score with the
    search's seed and with each confirmation seed, their mean, and whether the verdict took it."""
    metric, confirm = verdict["metric"], verdict["confirm"]
    search_seed = confirm["trials"][0]["seeds"][0] if confirm["trials"] else "-"
    seeds = ", ".join(map(str, confirm["seeds"]))
    header = ["trial", "family", f"val {metric}, seed {search_seed}", f"val {metric}, seed {seeds}", "mean", "chosen"]  # fmt: skip
    scale = 100 if higher_is_better(metric) else 1

    def shown(value) -> str:
        return "failed" if value is None else f"{scale * value:.2f}"

    body = [
        [c["name"], c["family"], shown(c["values"][0]), ", ".join(shown(v) for v in c["values"][1:]),
         shown(c["mean"]), "yes" if c.get("chosen") else ""]
        for c in confirm["trials"]
    ]  # fmt: skip
    return header, body


def write_outputs(root: Path, study, ctx: Context) -> dict:
    rows = trial_rows(study)
    rundir.write_json(
        root / "trials.json", {"metric": ctx.metric, "objectives": ctx.space.objectives, "trials": rows}
    )
    with (root / ".trials.csv.tmp").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows([{k: r.get(k) for k in FIELDS} for r in rows])
    (root / ".trials.csv.tmp").replace(root / "trials.csv")
    front = fronts(rows, ctx)
    rundir.write_json(root / "pareto.json", front)
    on_any = sorted({n for numbers in front.values() for n in numbers})
    pareto_dir = root / "pareto"
    pareto_dir.mkdir(exist_ok=True)
    recipes = {}
    for n in on_any:
        recipes[f"trial-{n:04d}.yaml"] = pareto_recipe(root, n)
        rundir.write_text(pareto_dir / f"trial-{n:04d}.yaml", recipes[f"trial-{n:04d}.yaml"])
    images = {}
    if any(r["state"] == "complete" for r in rows):
        images["pareto_params.png"] = pareto_plot(
            rows, front["params"], "trainable", "trainable parameters (log scale)", ctx.metric, True
        )
        images["pareto_time.png"] = pareto_plot(
            rows, front["time"], "train_seconds", "training time s", ctx.metric, False
        )
    for name, data in images.items():
        (root / name).write_bytes(data)
    verdict = rundir.read_json(root / "verdict.json") if (root / "verdict.json").is_file() else None
    page = html_report(ctx, rows, set(on_any), images, recipes, verdict, lr_range_section(root))
    rundir.write_text(root / "report.html", page)
    return front


def pareto_recipe(root: Path, number: int) -> str:
    """A trial's recipe as `hybridtune train` runs it: written to runs/<family>-<time>, like any recipe."""
    import yaml

    from hybridtune.recipe import load_recipe, recipe_to_yaml

    recipe = load_recipe(root / "trials" / f"trial-{number:04d}" / "recipe.yaml")
    recipe = recipe.model_copy(
        update={"output": recipe.output.model_copy(update={"dir": "runs", "name": None})}
    )
    recipe = recipe.model_copy(update={"name": f"{recipe.name}-trial{number}"})
    head = f"# trial {number} of the search in {root}: `hybridtune train` runs it as is\n"
    return head + yaml.safe_dump(yaml.safe_load(recipe_to_yaml(recipe)), sort_keys=False)


def lr_range_section(root: Path) -> str:
    """The lr range tests (search/lr_range.py): their plot and, per family, what it found."""
    import base64

    from hybridtune.search.lr_range import PLOT, RESULTS

    if not (root / RESULTS).is_file():
        return ""
    header = ["family", "steps run", "diverged", "lowest-loss lr", "suggestion", "lr searched", "note"]
    body = []
    for family, r in rundir.read_json(root / RESULTS)["families"].items():
        found = "suggestion" in r
        body.append([
            family, str(r.get("steps_run", 0)), "yes" if r.get("diverged") else "no",
            f"{r['suggestions']['lowest_loss_lr']:.2g}" if found else "-",
            f"{r['suggestion']:.2g} ({r['rule']})" if found else "-",
            f"{r['range']['low']:.2g} … {r['range']['high']:.2g}" if found else "unchanged",
            r.get("note") or r.get("error") or "",
        ])  # fmt: skip
    img = ""
    if (root / PLOT).is_file():
        data = base64.b64encode((root / PLOT).read_bytes()).decode()
        img = f'<div class="plots"><img id="{PLOT}" alt="{PLOT}" src="data:image/png;base64,{data}"></div>'
    return "<h2>LR range test (before the search)</h2>" + img + _table(header, body, "lr_range")


def validation_note(n: int, metric: str) -> str:
    """How many texts the trials were ranked on and, for accuracy, the noise of a difference on them:
    two recipes that disagree on a tenth of n texts differ by about sqrt(0.1 / n) (one standard error
    of a paired difference) from the draw of the texts alone (docs/search.md, "The verdict")."""
    if n <= 0:
        return ""
    note = f" The validation split has {n} texts"
    if metric == "accuracy":
        note += (
            f": between two recipes that disagree on a tenth of them, about {100 * math.sqrt(0.1 / n):.1f} pt"
            " (one standard error) is the draw of the texts alone"
        )
    return note + "."


def html_report(
    ctx: Context, rows, front: set[int], images: dict, recipes: dict, verdict: dict | None, lr_range: str = ""
) -> str:
    import base64

    name = ctx.space.name
    counts = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail")}
    intro = (
        f"{len(rows)} trials ({counts['complete']} complete, {counts['pruned']} pruned, {counts['fail']} failed) "
        f"on the validation split; objectives: {', '.join(ctx.space.objectives)}; metric: validation {ctx.metric}."
        + validation_note(ctx.n_validation, ctx.metric)
    )
    parts = [f"<h1>hybridtune search: {html.escape(name)}</h1><p>{html.escape(intro)}</p>"]
    if verdict:
        header, body = verdict_table(verdict)
        parts.append("<h2>Verdict (test split, retrained with fresh seeds)</h2>")
        parts += [f"<p><b>{html.escape(s)}</b></p>" for s in verdict["sentences"]]
        parts.append(_table(header, body, "verdict"))
        if verdict.get("confirm"):
            header, body = confirm_table(verdict)
            parts.append(
                "<h3>Chosen by the mean over seeds (validation; search/confirm.py)</h3>"
                + _table(header, body, "confirm")
            )
    if images:
        imgs = "".join(
            f'<img id="{html.escape(k)}" alt="{html.escape(k)}" src="data:image/png;base64,{base64.b64encode(v).decode()}">'
            for k, v in images.items()
        )
        parts.append(f'<h2>Pareto fronts (validation)</h2><div class="plots">{imgs}</div>')
    header, body = trials_table(rows, ctx.metric, front)
    parts += ["<h2>Trials</h2>", _table(header, body, "trials"), lr_range]
    details = "\n".join(
        f"<details><summary>{html.escape(k)}</summary><pre>{html.escape(v)}</pre></details>"
        for k, v in recipes.items()
    )
    parts.append(
        f"<h2>Pareto recipes (<code>pareto/</code>, run with <code>hybridtune train</code>)</h2>{details}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>hybridtune search: {html.escape(name)}</title>'
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
