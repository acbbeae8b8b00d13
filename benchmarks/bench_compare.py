"""Benchmark: the default compare suite against the sum of the peer's runs doing the same work.

    .venv/bin/python benchmarks/bench_compare.py [--ours COMPARE_DIR] [--order ours-first|peer-first]

hybridtune: `hybridtune compare` (the default suite: eleven strategies, one epoch of the Rotten
Tomatoes train split each, validation every 54 steps, one process per run). The peer: one plain
`Trainer` + peft process (benchmarks/peer.py, at its defaults: fp32, random order) per run, on the
same rows, with the same lr, batch size, epochs and validation schedule, for every strategy a
Trainer + peft user can express without writing the method itself: full, head-only, top-2, BitFit,
LoRA, prompt tuning, LLRD (a hand-built param-group optimizer, as a Trainer user writes it) and the
3-member LoRA ensemble (three seeds). Houlsby adapters, soft prompt + LoRA and ULMFiT staged
unfreezing have no Trainer + peft equivalent: they are left out of the ratio (their times are shown).

`--ours DIR` reuses a finished compare dir instead of running one (its per-run wall times).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import PYTHON, export_split, machine, peer, run_child

# suite strategy -> (peer strategy, lr, extra peer args, seeds)
PEER = {
    "full": ("full", 5e-5, [], [42]),
    "head_only": ("head", 2e-3, [], [42]),
    "freeze_top2": ("top2", 1e-4, [], [42]),
    "bitfit": ("bitfit", 1e-3, [], [42]),
    "lora": ("lora", 1e-3, [], [42]),
    "prompt_tuning": ("prompt_tuning", 3e-2, ["--max-length", "96"], [42]),
    "llrd": ("llrd", 1e-4, [], [42]),
    "ensemble_lora": ("lora", 1e-3, [], [42, 43, 44]),
}
EVAL_STEPS = 54


def run_ours(out: Path) -> dict:
    measured = run_child([PYTHON, "-m", "hybridtune", "compare", "--out", str(out)])
    return {"wall_s": measured["wall_s"], "max_rss_mib": measured["max_rss_mib"], **read_ours(out)}


def read_ours(out: Path) -> dict:
    runs = {}
    for row in json.loads((out / "comparison.json").read_text())["runs"]:
        runs[row["strategy"]] = {"wall_s": row["wall_seconds"], "test_accuracy": row["test_metric"]}
    return {"runs": runs}


def run_peer(data: Path, work: Path, model: str) -> dict:
    runs = {}
    for name, (strategy, lr, extra, seeds) in PEER.items():
        walls, accs = [], []
        for seed in seeds:
            out = work / f"{name}-{seed}.json"
            r = peer(
                strategy,
                data,
                out,
                epochs=1,
                lr=lr,
                best=False,
                model=model,
                extra=["--eval-steps", str(EVAL_STEPS), "--seed", str(seed), *extra],
            )
            walls.append(r["wall_s"])
            accs.append(r["test_accuracy"])
            print(
                f"  peer {name} seed {seed}: {r['wall_s']:.0f} s, test {100 * r['test_accuracy']:.2f} %",
                flush=True,
            )
        runs[name] = {"wall_s": sum(walls), "test_accuracy": accs}
    return runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", help="a finished compare dir of the default suite (skip running one)")
    ap.add_argument("--order", choices=["ours-first", "peer-first"], default="ours-first")
    args = ap.parse_args()
    from hybridtune.model.loading import resolve

    work = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    data = export_split()
    model = resolve("bundled:minilm")
    ours = peer_runs = None
    for side in ("ours", "peer") if args.order == "ours-first" else ("peer", "ours"):
        if side == "ours":
            ours = read_ours(Path(args.ours)) if args.ours else run_ours(work / "ours")
            print(
                f"hybridtune compare: {sum(r['wall_s'] for r in ours['runs'].values()):.0f} s in its runs",
                flush=True,
            )
        else:
            peer_runs = run_peer(data, work / "peer", model)
    print(report(ours, peer_runs))
    print(f"\nmachine: {machine()}")


def report(ours: dict, peer_runs: dict) -> str:
    lines = [
        "| strategy | hybridtune s | peer s | peer / hybridtune | hybridtune test acc | peer test acc |",
        "|---|---|---|---|---|---|",
    ]
    matched_ours = matched_peer = 0.0
    for name, row in ours["runs"].items():
        p = peer_runs.get(name)
        if p is None:
            lines.append(f"| {name} | {row['wall_s']:.0f} | — | — | {100 * row['test_accuracy']:.2f} % | — |")
            continue
        matched_ours += row["wall_s"]
        matched_peer += p["wall_s"]
        peer_acc = " / ".join(f"{100 * a:.2f}" for a in p["test_accuracy"])
        lines.append(
            f"| {name} | {row['wall_s']:.0f} | {p['wall_s']:.0f} | {p['wall_s'] / row['wall_s']:.2f}x | "
            f"{100 * row['test_accuracy']:.2f} % | {peer_acc} % |"
        )
    total = sum(r["wall_s"] for r in ours["runs"].values())
    lines += [
        "",
        f"strategies with a peer equivalent: hybridtune {matched_ours:.0f} s, peer {matched_peer:.0f} s: "
        f"**{matched_peer / matched_ours:.2f}x**",
        f"hybridtune's whole suite (all {len(ours['runs'])} strategies): {total:.0f} s in its runs"
        + (f", {ours['wall_s']:.0f} s wall" if "wall_s" in ours else ""),
        "(the ensemble row's peer accuracy lists its three members; hybridtune's is the ensemble's)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
