"""Benchmark: head — the peer (Trainer + peft at its defaults and at its best) against hybridtune,
with and without its frozen-trunk cache (the side "hybridtune (no cache)").

.venv/bin/python benchmarks/bench_head.py [--repeats 3] [--max-train 2000] [--epochs 3]
"""

from common import main

if __name__ == "__main__":
    main(
        name="head",
        peer_strategy="head",
        recipe="head_only.yaml",
        lr=2e-3,
        target=0.7,
        epochs=3,
        mfu=False,
        no_cache_side=True,
    )
