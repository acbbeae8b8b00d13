"""The SetFit side of bench_fewshot.py: runs in its own environment, where `pip install setfit`
put SetFit and the sentence-transformers / transformers versions it wants (hybridtune is not
imported here, and setfit is no dependency of hybridtune).

    python setfit_side.py --model DIR --train train.jsonl --test test.jsonl --out result.json --seed 0

SetFit's paper settings (Tunstall et al. 2022, §4.3): batch 16, R = 20 pair iterations, one epoch,
body lr 2e-5, a logistic-regression head (scikit-learn's defaults), the sentence-transformers
model as saved (all-MiniLM-L6-v2: Transformer, mean Pooling, Normalize).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time


def read(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-iterations", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--body-lr", type=float, default=2e-5)
    a = ap.parse_args()

    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    train, test = read(a.train), read(a.test)
    started = time.perf_counter()
    model = SetFitModel.from_pretrained(a.model)
    settings = dict(
        batch_size=a.batch_size,
        num_epochs=a.epochs,
        num_iterations=a.num_iterations,
        body_learning_rate=a.body_lr,
        seed=a.seed,
        report_to="none",
        output_dir=tempfile.mkdtemp(prefix="setfit-"),  # its checkpoints: not into the caller's cwd
    )
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    args = TrainingArguments(**{k: v for k, v in settings.items() if k in known})
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(train))
    trainer.train()
    shutil.rmtree(settings["output_dir"], ignore_errors=True)
    train_s = time.perf_counter() - started
    predicted = model.predict([r["text"] for r in test])
    predicted = [p.item() if hasattr(p, "item") else p for p in predicted]
    accuracy = sum(str(p) == str(r["label"]) for p, r in zip(predicted, test, strict=True)) / len(test)
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump({"test_accuracy": accuracy, "train_s": train_s, "n_test": len(test)}, f)


if __name__ == "__main__":
    main()
