"""The peer: what a user would write without hybridtune — transformers.Trainer + peft, nothing else.

    python benchmarks/peer.py --strategy lora --data DIR --out result.json [--bf16] [--group-by-length]

Reads DIR/{train,validation,test}.jsonl (text, label), fine-tunes, evaluates on validation every
epoch and on test at the end, and writes one JSON object: throughput, wall times, accuracies and the
time of each validation evaluation (for time-to-accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from datasets import load_dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)


class EvalClock(TrainerCallback):
    def __init__(self):
        self.start, self.evals = time.perf_counter(), []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.evals.append(
            {
                "epoch": state.epoch,
                "time_s": time.perf_counter() - self.start,
                "accuracy": metrics.get("eval_accuracy"),
            }
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--strategy", choices=["full", "lora", "top2", "head"], required=True)
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--group-by-length", action="store_true")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    files = {s: os.path.join(args.data, f"{s}.jsonl") for s in ("train", "validation", "test")}
    raw = load_dataset("json", data_files=files)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = raw.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    if args.strategy == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1))
    elif args.strategy in ("top2", "head"):
        keep = ("bert.pooler", "classifier") + (
            ("bert.encoder.layer.4.", "bert.encoder.layer.5.") if args.strategy == "top2" else ()
        )
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(keep))

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    clock = EvalClock()
    targs = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(args.out) or ".", "peer-ckpt"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        weight_decay=0.01,
        warmup_steps=0.06,
        bf16=args.bf16,
        use_cpu=True,
        eval_strategy="epoch",
        save_strategy="no",
        seed=args.seed,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=data["train"],
        eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
        callbacks=[clock],
    )
    started = time.perf_counter()
    out = trainer.train()
    train_s = time.perf_counter() - started
    test = trainer.evaluate(data["test"], metric_key_prefix="test")
    tokens = sum(len(x) for x in data["train"]["input_ids"]) * args.epochs
    result = {
        "train_seconds": train_s,
        "train_samples_per_second": out.metrics["train_samples_per_second"],
        "train_tokens": tokens,
        "test_accuracy": test["test_accuracy"],
        "evals": clock.evals,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
