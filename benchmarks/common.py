"""Shared by the benchmark scripts: the same data for both sides, measured child processes, a matmul
peak for MFU, and the side-by-side table with ratios.

Each side runs as its own process (so its peak RSS is its own), alternating peer / hybridtune on
every repeat (so drift of a noisy machine hits both), and the medians are compared.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("HYBRIDTUNE_CACHE_DIR", None)  # every repeat builds its own trunk cache: its cost is measured
NO_CACHE = "hybridtune (no cache)"


def export_split(source: str = "bundled:rotten_tomatoes", max_train: int | None = None) -> Path:
    """hybridtune's seeded split, written as jsonl so that the peer reads exactly the same rows."""
    from hybridtune.data import load_splits
    from hybridtune.recipe import DataConfig

    cfg = DataConfig(source=source, max_train_samples=max_train)
    splits = load_splits(cfg, {"text_column": "text", "label_column": "label"}, "label")
    out = Path(tempfile.mkdtemp(prefix="bench-data-"))
    for name in ("train", "validation", "test"):
        frame = splits[name][["text", "label"]].copy()
        frame["label"] = frame["label"].astype(int)
        frame.to_json(out / f"{name}.jsonl", orient="records", lines=True)
    return out


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run a command; wall time and the child's peak RSS (MiB) from wait4's rusage. `env`: variables
    added to the benchmark's environment."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:  # not a pipe: a chatty child would fill it and block
        proc = subprocess.Popen(
            cmd, env={**ENV, **(env or {})}, stdout=subprocess.DEVNULL, stderr=stderr, text=True
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        stderr.seek(0)
        err = stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall_s": wall, "max_rss_mib": usage.ru_maxrss / 1024}


def peer(
    strategy: str,
    data: Path,
    out: Path,
    *,
    epochs: float,
    lr: float,
    best: bool,
    model: str,
    extra: list[str] = (),
    seed: int = 42,
) -> dict:
    cmd = [
        PYTHON,
        str(ROOT / "benchmarks" / "peer.py"),
        "--model",
        model,
        "--data",
        str(data),
        "--strategy",
        strategy,
        "--epochs",
        str(epochs),
        "--lr",
        str(lr),
        "--out",
        str(out),
        "--seed",
        str(seed),
    ]
    if best:
        cmd += ["--bf16", "--group-by-length"]
    cmd += list(extra)
    measured = run_child(cmd)
    result = json.loads(out.read_text())
    evals = [(e["time_s"], e["accuracy"]) for e in result["evals"]]
    return {
        **measured,
        "samples_per_s": result["train_samples_per_second"],
        "train_s": result["train_seconds"],
        "test_accuracy": result["test_accuracy"],
        "evals": evals,
        "train_tokens": result["train_tokens"],
    }


def ours(recipe: str, data: Path, out_dir: Path, overrides: list[str], env: dict | None = None) -> dict:
    cmd = [
        PYTHON,
        "-m",
        "hybridtune",
        "train",
        str(ROOT / "recipes" / recipe),
        f"data.train={data / 'train.jsonl'}",
        f"data.validation={data / 'validation.jsonl'}",
        f"data.test={data / 'test.jsonl'}",
        f"output.dir={out_dir}",
        "train.early_stopping.patience=null",
        *overrides,
    ]
    measured = run_child(cmd, env)
    run = max(out_dir.iterdir(), key=lambda p: p.stat().st_mtime)
    report = json.loads((run / "report.json").read_text())
    logs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["time_s"], r["eval_accuracy"]) for r in logs if "eval_accuracy" in r]
    return {
        **measured,
        "samples_per_s": report["train_samples_per_second"],
        "train_s": report["train_seconds"],
        "test_accuracy": report["test"]["accuracy"],
        "evals": evals,
        "trunk_cache_s": report.get("trunk_cache", {}).get("build_seconds"),
        "token_cache": report.get("token_cache"),
    }


def time_to(evals: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, acc in evals if acc is not None and acc >= target), None)


def matmul_peak(dtype_name: str, n: int = 2048, seconds: float = 3.0) -> float:
    """GFLOP/s of square matmuls in this process, the best of a few seconds of tries."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    torch.matmul(a, b)
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def machine() -> str:
    """The CPU as `lscpu` names it, whether it has native bf16, cores, torch and its threads: what
    every figure is printed beside."""
    import torch

    from hybridtune.train.precision import NATIVE_FLAGS, cpu_model_and_flags

    model, flags = cpu_model_and_flags()
    bf16 = "native bf16" if flags & set(NATIVE_FLAGS) else "no native bf16"
    threads = torch.get_num_threads()
    return f"{model}, {bf16}, {os.cpu_count()} cores, torch {torch.__version__}, threads {threads}"


def median(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def accuracy_parity(sides: dict[str, list[dict]]) -> str:
    """Test accuracy over the seeds (repeat r = seed 42 + r on every side): mean ± sd per side, and
    hybridtune's difference to each peer side, seed by seed (same seed, same data)."""
    lines = []
    for name, rows in sides.items():
        accs = [100 * r["test_accuracy"] for r in rows]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"test accuracy {name}: {statistics.mean(accs):.2f} ± {sd:.2f} % over {len(accs)} seed(s)"
        )
    ours_acc = [100 * r["test_accuracy"] for r in sides["hybridtune"]]
    for name in [n for n in ("peer (defaults)", "peer (best)") if n in sides]:
        diffs = [a - 100 * r["test_accuracy"] for a, r in zip(ours_acc, sides[name], strict=True)]
        ci = ""
        if len(diffs) > 1:  # paired over seeds: a 95 % t interval of the mean difference
            from scipy.stats import t

            half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
            ci = f", 95 % CI {statistics.mean(diffs) - half:+.2f} .. {statistics.mean(diffs) + half:+.2f}"
        lines.append(
            f"hybridtune - {name}: mean {statistics.mean(diffs):+.2f} pt{ci} "
            f"(per seed {', '.join(f'{d:+.2f}' for d in diffs)})"
        )
    return "\n".join(lines)


def table(title: str, sides: dict[str, list[dict]], base: str, target: float | None = None) -> str:
    """Medians per side and each side's ratio to `base` (higher throughput = better)."""
    lines = [
        f"## {title}",
        "",
        "| side | samples/s | train s | wall s | peak RSS MiB | test acc | time to target s | vs "
        + base
        + " (samples/s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = median(sides[base], "samples_per_s")
    for name, rows in sides.items():
        if target is not None:
            for r in rows:
                r["tta"] = time_to(r["evals"], target)
        sps = median(rows, "samples_per_s")
        tta = median(rows, "tta") if target is not None else None
        lines.append(
            f"| {name} | {sps:.1f} | {median(rows, 'train_s'):.1f} | {median(rows, 'wall_s'):.1f} | {median(rows, 'max_rss_mib'):.0f} | "
            f"{100 * median(rows, 'test_accuracy'):.2f} % | {'-' if tta is None else f'{tta:.1f}'} | {sps / ref:.2f}x |"
        )
    return "\n".join(lines)


def scenario(
    name: str,
    *,
    peer_strategy: str,
    recipe: str,
    lr: float,
    epochs: float,
    repeats: int,
    max_train: int | None,
    target: float,
    mfu: bool = False,
    no_cache_side: bool = False,
    peer_defaults: bool = True,
) -> str:
    """Peer at its defaults (fp32, random order), peer at its best (bf16, length-grouped) and hybridtune
    (its defaults: precision auto, length-grouped), alternating, `repeats` times each.
    `no_cache_side`: also hybridtune with `train.trunk_cache=off`, the speed-up of the frozen-trunk
    cache measured in the same run."""
    from hybridtune.model.loading import resolve

    model = resolve("bundled:minilm")
    data = export_split(max_train=max_train)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    sides: dict[str, list[dict]] = {"peer (defaults)": [], "peer (best)": [], "hybridtune": []}
    if not peer_defaults:
        del sides["peer (defaults)"]
    if no_cache_side:
        sides[NO_CACHE] = []
    for r in range(repeats):
        seed = 42 + r  # every side gets the same seeds: repeats measure both speed and seed spread
        overrides = [f"train.epochs={epochs}", f"train.lr={lr}", f"train.seed={seed}"]
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for side in order:
            out = work / f"{side.replace(' ', '').replace('(', '-').replace(')', '')}-{r}"
            out.mkdir()
            if side == "hybridtune":
                sides[side].append(ours(recipe, data, out, overrides))
            elif side == NO_CACHE:
                sides[side].append(ours(recipe, data, out, [*overrides, "train.trunk_cache=off"]))
            else:
                sides[side].append(
                    peer(
                        peer_strategy,
                        data,
                        out / "r.json",
                        epochs=epochs,
                        lr=lr,
                        best="best" in side,
                        model=model,
                        seed=seed,
                    )
                )
            built = sides[side][-1].get("trunk_cache_s")
            print(
                f"  repeat {r} {side}: {sides[side][-1]['samples_per_s']:.1f} samples/s, "
                f"test {100 * sides[side][-1]['test_accuracy']:.2f} %"
                + (f", trunk cache built in {built:.1f} s" if built else ""),
                flush=True,
            )
    text = table(
        f"{name}: MiniLM, {max_train or 'all'} RT train sentences, {epochs:g} epoch(s), bs 32, lr {lr:g}, "
        f"{repeats} repeats, medians",
        sides,
        next(iter(sides)),
        target,
    )
    text += "\n\n" + accuracy_parity(sides)
    best = median(sides["peer (best)"], "samples_per_s")
    text += (
        f"\n\nhybridtune vs peer (best): {median(sides['hybridtune'], 'samples_per_s') / best:.2f}x samples/s"
    )
    if no_cache_side:
        cached, plain = (median(sides[s], "train_s") for s in ("hybridtune", NO_CACHE))
        text += (
            f"\ntrunk cache: train {plain:.1f} s without, {cached:.1f} s with (building included, "
            f"median {median(sides['hybridtune'], 'trunk_cache_s') or 0:.1f} s) = {plain / cached:.2f}x"
        )
    if mfu and peer_defaults:
        import torch  # noqa: F401

        n_params = 22_713_986 - 11_918_592  # MiniLM without the embedding tables (lookups, not matmuls)
        tokens = sides["peer (defaults)"][0]["train_tokens"]
        for dtype, side in (
            ("float32", "peer (defaults)"),
            ("bfloat16", "peer (best)"),
            ("bfloat16", "hybridtune"),
        ):
            peak = matmul_peak(dtype)
            achieved = 6 * n_params * tokens / median(sides[side], "train_s") / 1e9
            text += f"\nMFU {side}: {achieved:.1f} GFLOP/s of a measured {dtype} matmul peak {peak:.0f} GFLOP/s = {100 * achieved / peak:.1f} %"
    return text + f"\n\nmachine: {machine()}\n"


def main(**kwargs) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=kwargs.pop("repeats", 3))
    ap.add_argument("--max-train", type=int, default=kwargs.pop("max_train", 2000))
    ap.add_argument("--epochs", type=float, default=kwargs.pop("epochs", 1))
    ap.add_argument(
        "--no-peer-defaults",
        action="store_true",
        help="leave out the peer at its defaults (fp32, random order): e.g. for seed-parity runs",
    )
    args = ap.parse_args()
    print(
        scenario(
            repeats=args.repeats,
            max_train=args.max_train or None,
            epochs=args.epochs,
            peer_defaults=not args.no_peer_defaults,
            **kwargs,
        )
    )
