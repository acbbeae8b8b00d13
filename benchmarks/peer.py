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
    set_seed,
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


def llrd_optimizer(model, args):
    """Layer-wise lr decay as a Trainer user writes it: one AdamW param group per layer, the lr
    multiplied by `layer_decay` per layer down from the head (embeddings lowest); no weight decay
    on biases and LayerNorms."""
    import torch

    layers = model.config.num_hidden_layers

    def depth(name: str) -> int:  # 0 = the head, layers .. 1 = the blocks top down, layers + 1 = embeddings
        if ".encoder.layer." in name:
            return layers - int(name.split(".encoder.layer.")[1].split(".")[0])
        return layers + 1 if ".embeddings." in name else 0

    groups: dict[tuple[int, bool], list] = {}
    for name, p in model.named_parameters():
        no_decay = name.endswith(".bias") or "LayerNorm" in name
        groups.setdefault((depth(name), no_decay), []).append(p)
    return torch.optim.AdamW(
        [
            {"params": ps, "lr": args.lr * args.layer_decay**d, "weight_decay": 0.0 if nd else 0.01}
            for (d, nd), ps in groups.items()
        ],
        lr=args.lr,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument(
        "--strategy",
        choices=["full", "lora", "top2", "head", "bitfit", "prompt_tuning", "llrd"],
        required=True,
    )
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--group-by-length", action="store_true")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--eval-steps", type=int, default=None, help="evaluate every N steps (default: every epoch)"
    )
    ap.add_argument("--layer-decay", type=float, default=0.8, help="llrd: lr factor per layer, top down")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    files = {s: os.path.join(args.data, f"{s}.jsonl") for s in ("train", "validation", "test")}
    raw = load_dataset("json", data_files=files)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = raw.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True)
    set_seed(
        args.seed
    )  # the new head's (and LoRA's) initialisation: Trainer seeds only after the model exists
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    if args.strategy == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1))
    elif args.strategy == "prompt_tuning":
        from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

        config = PromptTuningConfig(
            task_type="SEQ_CLS",
            num_virtual_tokens=20,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text="Is this movie review positive or negative?",
            tokenizer_name_or_path=args.model,
        )
        model = get_peft_model(model, config)
    elif args.strategy in ("top2", "head", "bitfit"):
        keep = ("bert.pooler", "classifier") + (
            ("bert.encoder.layer.4.", "bert.encoder.layer.5.") if args.strategy == "top2" else ()
        )
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(keep) or (args.strategy == "bitfit" and name.endswith(".bias")))
    optimizers = (llrd_optimizer(model, args), None) if args.strategy == "llrd" else (None, None)

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
        **(
            {"eval_strategy": "steps", "eval_steps": args.eval_steps}
            if args.eval_steps
            else {"eval_strategy": "epoch"}
        ),
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
        optimizers=optimizers,
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
