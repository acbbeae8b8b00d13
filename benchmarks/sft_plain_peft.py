"""A causal_lm run's answers from `hybridtune generate` next to plain transformers / peft's (no
hybridtune code on the second path: the tokenizer's chat template and `model.generate`), and the
validation split's loss per response token (fp32) for comparison with the test figure.

    python benchmarks/sft_plain_peft.py RUN_DIR "What is AI?" "Tell me a joke." ...

For runs with a chat template (prompt_format "chat_template" in run.json).
"""

from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hybridtune import api
from hybridtune.tasks import causal_lm


def plain_answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    batch = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main(run: str, prompts: list[str]) -> None:
    loaded = api.load_run(run)
    max_new = loaded.recipe.generation.max_new_tokens
    val = causal_lm.encode(
        causal_lm.load_splits(loaded.recipe.data).validation,
        loaded.tokenizer,
        loaded.labels,
        loaded.recipe.data,
    )
    loss, tokens = causal_lm.response_loss(loaded.model, loaded.tokenizer, val)
    print(json.dumps({"validation_loss": loss, "validation_response_tokens": tokens}))
    ours = api.generate(run, prompts, max_new)  # `hybridtune generate`'s path
    info = json.loads(open(f"{run}/run.json").read())
    tokenizer = AutoTokenizer.from_pretrained(f"{run}/final")
    if info["format"] == "peft":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(info["base_model"])
        model = PeftModel.from_pretrained(base, f"{run}/final").eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(f"{run}/final").eval()
    for prompt, answer in zip(prompts, ours, strict=True):
        plain = plain_answer(model, tokenizer, prompt, max_new)
        print(json.dumps({"prompt": prompt, "hybridtune": answer, "plain": plain, "same": answer == plain}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
