"""Benchmark: top2 — the peer (Trainer + peft at its defaults and at its best) against hybridtune,
with and without its frozen-trunk cache (the side "hybridtune (no cache)").

.venv/bin/python benchmarks/bench_top2.py [--repeats 3] [--max-train 2000] [--epochs 3]
"""

from common import main

if __name__ == "__main__":
    main(
        name="top2",
        peer_strategy="top2",
        recipe="freeze_top2.yaml",
        lr=1e-4,
        target=0.75,
        epochs=3,
        mfu=False,
        no_cache_side=True,  # hybridtune with and without the frozen-trunk cache
    )
