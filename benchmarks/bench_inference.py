"""Benchmark: batch inference — a trained LoRA run scores the Rotten Tomatoes test split (853
sentences), the peer's way and hybridtune's, each side in its own process, alternating.

    .venv/bin/python benchmarks/bench_inference.py [--run RUN_DIR] [--repeats 3]

The peer: what a transformers + peft user writes — the base model, `PeftModel.from_pretrained`,
`merge_and_unload()`, then `pipeline("text-classification")` over the texts; at its defaults
(batch size 1, fp32) and at its best (batch size 64, bf16 weights). hybridtune: `api.predict(run,
texts)` (LoRA merged for inference, batches sorted by length, the run's precision: bf16 autocast
here). Without --run, a LoRA run is trained first (60 steps; its accuracy is beside the point: both
sides score the same weights). Printed: texts/s of the scoring itself (model loading apart), load
time, peak RSS, test accuracy, and agreement of each side's labels with the fp32 peer's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import PYTHON, ROOT, export_split, machine, median, run_child

SIDES = ("peer (defaults)", "peer (best)", "hybridtune")


def child(side: str, run: str, data: str, out: str) -> None:
    """One side, in this process: load, score every test text, write labels and timings."""
    rows = [json.loads(x) for x in Path(data, "test.jsonl").read_text().splitlines()]
    texts = [r["text"] for r in rows]
    started = time.perf_counter()
    if side == "hybridtune":
        from hybridtune import api

        api.predict(run, texts[:8])  # load + warm up, as the peer's pipeline call below does
        loaded_s = time.perf_counter() - started
        t = time.perf_counter()
        labels = [r["label"] for r in api.predict(run, texts)]
        score_s = time.perf_counter() - t
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

        info = json.loads(Path(run, "final", "adapter_config.json").read_text())
        tokenizer = AutoTokenizer.from_pretrained(Path(run, "final"))
        base = AutoModelForSequenceClassification.from_pretrained(
            info["base_model_name_or_path"], num_labels=2
        )
        model = PeftModel.from_pretrained(base, Path(run, "final")).merge_and_unload().eval()
        best = side == "peer (best)"
        if best:
            model = model.to(torch.bfloat16)
        clf = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
        kwargs = {"batch_size": 64} if best else {}
        clf(texts[:8], truncation=True, max_length=128, **kwargs)
        loaded_s = time.perf_counter() - started
        t = time.perf_counter()
        labels = [r["label"] for r in clf(texts, truncation=True, max_length=128, **kwargs)]
        score_s = time.perf_counter() - t
    Path(out).write_text(json.dumps({"labels": labels, "score_s": score_s, "load_s": loaded_s}))


def train_run(work: Path) -> str:
    out = work / "run"
    run_child(
        [
            PYTHON, "-m", "hybridtune", "train", str(ROOT / "recipes" / "lora.yaml"),
            "train.max_steps=60", "train.eval_steps=1000", f"output.dir={out}", "output.name=lora",
        ]
    )  # fmt: skip
    return str(out / "lora")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a finished LoRA classification run (default: train one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=4, metavar=("SIDE", "RUN", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    work = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    run = args.run or train_run(work)
    data = export_split()
    truth = [json.loads(x)["label"] for x in (data / "test.jsonl").read_text().splitlines()]
    names = json.loads(Path(run, "run.json").read_text())["labels"]
    results: dict[str, list[dict]] = {s: [] for s in SIDES}
    for r in range(args.repeats):
        for side in SIDES if r % 2 == 0 else reversed(SIDES):
            out = work / f"{side.replace(' ', '').replace('(', '-').replace(')', '')}-{r}.json"
            measured = run_child([PYTHON, __file__, "--child", side, run, str(data), str(out)])
            got = json.loads(out.read_text())
            ids = [names.index(x) if x in names else int(x.split("_")[-1]) for x in got["labels"]]
            results[side].append(
                {
                    **measured,
                    "texts_per_s": len(ids) / got["score_s"],
                    "load_s": got["load_s"],
                    "accuracy": sum(a == b for a, b in zip(ids, truth, strict=True)) / len(truth),
                    "ids": ids,
                }
            )
            print(f"  repeat {r} {side}: {results[side][-1]['texts_per_s']:.1f} texts/s", flush=True)
    ref = results["peer (defaults)"][0]["ids"]
    base = median(results["peer (defaults)"], "texts_per_s")
    print(
        f"\n## batch inference: LoRA MiniLM run, {len(truth)} RT test sentences, {args.repeats} repeats, medians\n"
    )
    print(
        "| side | texts/s | vs peer (defaults) | load s | peak RSS MiB | test acc | same label as peer fp32 |"
    )
    print("|---|---|---|---|---|---|---|")
    for side, rows in results.items():
        agree = sum(a == b for a, b in zip(rows[0]["ids"], ref, strict=True)) / len(ref)
        tps = median(rows, "texts_per_s")
        print(
            f"| {side} | {tps:.1f} | {tps / base:.2f}x | {median(rows, 'load_s'):.1f} | "
            f"{median(rows, 'max_rss_mib'):.0f} | {100 * rows[0]['accuracy']:.2f} % | {100 * agree:.2f} % |"
        )
    print(f"\nmachine: {machine()}")


if __name__ == "__main__":
    sys.exit(main())
