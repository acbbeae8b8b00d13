"""Benchmark: full — the peer (Trainer + peft at its defaults and at its best) against hybridtune.

.venv/bin/python benchmarks/bench_full.py [--repeats 3] [--max-train 2000] [--epochs 1]
"""

from common import main

if __name__ == "__main__":
    main(name="full", peer_strategy="full", recipe="full.yaml", lr=5e-5, target=0.8, epochs=1, mfu=True)
