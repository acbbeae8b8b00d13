"""Benchmark: lora — the peer (Trainer + peft at its defaults and at its best) against hybridtune.

.venv/bin/python benchmarks/bench_lora.py [--repeats 3] [--max-train 2000] [--epochs 1]
"""

from common import main

if __name__ == "__main__":
    main(name="lora", peer_strategy="lora", recipe="lora.yaml", lr=1e-3, target=0.75, epochs=1, mfu=False)
