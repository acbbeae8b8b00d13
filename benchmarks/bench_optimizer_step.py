"""The contrastive stage's optimizer step: PyTorch's AdamW with its default (foreach) kernel against
the fused one (what the Trainer's default `adamw_torch_fused`, and so SetFit, uses), on the bundled
all-MiniLM-L6-v2 (22.6 M weights, all trained, as in the SetFit recipe).

    .venv/bin/python benchmarks/bench_optimizer_step.py [--steps 12] [--repeats 3]

Each step is one of strategy/contrastive.py's: 16 pairs drawn from the first 64 sentences of
bundled Rotten Tomatoes, two forward passes (its mean-pooled `pooling.embedding`), the cosine-similarity loss, backward, gradient clipping at 1, the optimizer step.
The two kernels alternate, `--repeats` rounds of `--steps` steps each; printed per round: seconds a
step and milliseconds of it in `optimizer.step()`. Run on a quiet machine; the CPU is named.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
from common import machine
from transformers import AutoModel, AutoTokenizer

from hybridtune import bundled
from hybridtune.strategy.pooling import embedding


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    path = bundled.model_path("bundled:minilm")
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    model.train()
    frame, _ = bundled.dataset("bundled:rotten_tomatoes")
    texts = frame["text"].tolist()[:64]
    rng = random.Random(0)
    pairs = [(rng.randrange(len(texts)), rng.randrange(len(texts))) for _ in range(16 * args.steps)]
    kinds = {"foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {k: torch.optim.AdamW(model.parameters(), lr=1e-7, **kw) for k, kw in kinds.items()}

    def embed(batch: list[str]) -> torch.Tensor:
        enc = tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return embedding(model, enc, normalize=False)

    def step(batch: list[tuple[int, int]], optimizer) -> float:
        a, b = embed([texts[i] for i, _ in batch]), embed([texts[j] for _, j in batch])
        F.mse_loss(F.cosine_similarity(a, b), torch.ones(len(batch))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        started = time.perf_counter()
        optimizer.step()
        spent = time.perf_counter() - started
        optimizer.zero_grad(set_to_none=True)
        return spent

    results: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for round_ in range(args.repeats):
        for kind, optimizer in optimizers.items():
            started = time.perf_counter()
            in_step = sum(step(pairs[16 * s : 16 * s + 16], optimizer) for s in range(args.steps))
            per_step = (time.perf_counter() - started) / args.steps
            results[kind].append((per_step, in_step / args.steps))
            print(
                f"round {round_} {kind:8s} {per_step:.3f} s a step, optimizer.step {1000 * in_step / args.steps:.1f} ms"
            )
    for kind, rows in results.items():
        print(
            f"{kind:8s} median: {statistics.median(r[0] for r in rows):.3f} s a step, "
            f"optimizer.step {1000 * statistics.median(r[1] for r in rows):.1f} ms"
        )


if __name__ == "__main__":
    main()
