"""Benchmark: SmolLM2-135M-Instruct LoRA SFT on the ChatterBot pairs — the peer (Trainer + peft at
its defaults and at its best) against hybridtune, alternating, each side in its own process.

    .venv/bin/python benchmarks/bench_sft.py [--repeats 2] [--steps 30]

Same rows (hybridtune's seeded split, exported), same chat-template prompts with the loss on the
answer tokens only, LoRA r 8 / alpha 16 / dropout 0.05 on q_proj and v_proj, batch 8, lr 1e-3, the
same number of optimizer steps and one validation pass, at the end, inside the loop on both sides
(step-based evaluation: Trainer validates at the last step; eval batch 16). The peer at its
defaults: fp32, random order; at its best: bf16, length-grouped. Printed: training samples/s
(Trainer's clock on both sides), wall time, peak RSS and the held-out loss after training.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from common import PYTHON, ROOT, machine, median, run_child

SIDES = ("peer (defaults)", "peer (best)", "hybridtune")
RECIPE = ROOT / "recipes" / "sft_chatterbot_smollm2.yaml"


def export_pairs() -> Path:
    """hybridtune's seeded ChatterBot split as jsonl of {turns, response}, for the peer to read."""
    from hybridtune.recipe import load_recipe
    from hybridtune.tasks import causal_lm

    splits = causal_lm.load_splits(load_recipe(RECIPE).data)
    out = Path(tempfile.mkdtemp(prefix="bench-sft-data-"))
    for name in ("train", "validation", "test"):
        frame = getattr(splits, name)
        with (out / f"{name}.jsonl").open("w") as f:
            for turns, response in zip(frame[causal_lm.TURNS], frame[causal_lm.RESPONSE], strict=True):
                f.write(json.dumps({"turns": list(turns), "response": response}) + "\n")
    return out


def peer_child(best: bool, model_dir: str, data: str, steps: int, out: str) -> None:
    """The peer, as a transformers + peft user writes it."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(row):
        prompt = tok.apply_chat_template(row["turns"], tokenize=False, add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + r)[:128]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ([-100] * len(p) + r)[:128]}

    raw = load_dataset("json", data_files={s: f"{data}/{s}.jsonl" for s in ("train", "validation", "test")})
    data_enc = raw.map(encode, remove_columns=["turns", "response"])
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]
        ),
    )
    args = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out), "peer-ckpt"),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        max_steps=steps,
        learning_rate=1e-3,
        weight_decay=0.01,
        bf16=best,
        use_cpu=True,
        eval_strategy="steps",  # as hybridtune's run: a validation pass at the last step
        eval_steps=10 * steps,
        save_strategy="no",
        seed=42,
        train_sampling_strategy="group_by_length" if best else "random",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data_enc["train"],
        eval_dataset=data_enc["validation"],
        data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100),
    )
    result = trainer.train()
    with torch.no_grad():
        loss = trainer.evaluate(data_enc["test"])["eval_loss"]
    Path(out).write_text(
        json.dumps(
            {
                "samples_per_s": result.metrics["train_samples_per_second"],
                "train_s": result.metrics["train_runtime"],
                "val_loss": loss,
            }
        )
    )


def ours(work: Path, steps: int) -> dict:
    measured = run_child(
        [
            PYTHON, "-m", "hybridtune", "train", str(RECIPE), f"train.max_steps={steps}",
            f"train.eval_steps={10 * steps}", f"output.dir={work}", "output.name=sft",
        ]
    )  # fmt: skip
    report = json.loads((work / "sft" / "report.json").read_text())
    return {
        **measured,
        "samples_per_s": report["train_samples_per_second"],
        "train_s": report["train_seconds"],
        "val_loss": report["test"].get("loss"),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        best, model_dir, data, steps, out = args.child
        return peer_child(best == "best", model_dir, data, int(steps), out)
    from hybridtune.model.loading import resolve

    model_dir = resolve("bundled:smollm2")
    data = export_pairs()
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    rows: dict[str, list[dict]] = {s: [] for s in SIDES}
    for r in range(args.repeats):
        for side in SIDES if r % 2 == 0 else reversed(SIDES):
            out = work / f"{side.replace(' ', '').replace('(', '-').replace(')', '')}-{r}"
            out.mkdir()
            if side == "hybridtune":
                rows[side].append(ours(out, args.steps))
            else:
                mode = "best" if "best" in side else "defaults"
                cmd = [
                    PYTHON,
                    __file__,
                    "--child",
                    mode,
                    model_dir,
                    str(data),
                    str(args.steps),
                    str(out / "r.json"),
                ]
                measured = run_child(cmd)
                rows[side].append({**measured, **json.loads((out / "r.json").read_text())})
            print(f"  repeat {r} {side}: {rows[side][-1]['samples_per_s']:.2f} samples/s", flush=True)
    base = median(rows["peer (defaults)"], "samples_per_s")
    print(
        f"\n## SmolLM2-135M LoRA SFT: ChatterBot pairs, {args.steps} steps of 8, {args.repeats} repeats, medians\n"
    )
    print("| side | samples/s | vs peer (defaults) | train s | wall s | peak RSS MiB | loss after |")
    print("|---|---|---|---|---|---|---|")
    for side, rs in rows.items():
        sps = median(rs, "samples_per_s")
        loss = median(rs, "val_loss")
        print(
            f"| {side} | {sps:.2f} | {sps / base:.2f}x | {median(rs, 'train_s'):.0f} | {median(rs, 'wall_s'):.0f} | "
            f"{median(rs, 'max_rss_mib'):.0f} | {'-' if loss is None else f'{loss:.3f}'} |"
        )
    print("\n(loss after: on the test split, per answer token; the peer's is Trainer's mean of batch means)")
    print(f"machine: {machine()}")


if __name__ == "__main__":
    sys.exit(main())
