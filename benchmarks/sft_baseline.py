"""The "before" of an SFT recipe: the base model's held-out loss, perplexity and exact match on the
recipe's own test split, untrained (same data, split, format and generation settings as the run).

    python benchmarks/sft_baseline.py recipes/sft_chatterbot_smollm2.yaml [key=value ...]

Compare with the run's eval.json (`hybridtune train` of the same recipe).
"""

from __future__ import annotations

import json
import sys

from hybridtune import api
from hybridtune.recipe import load_recipe


def main(argv: list[str]) -> None:
    recipe = load_recipe(argv[0], argv[1:])
    prep = api.prepare(recipe)  # strategy parts applied, untrained: LoRA's B is zero, so the base itself
    report = prep.task.report(prep.model, prep.tokenizer, prep.datasets["test"], prep.labels)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
