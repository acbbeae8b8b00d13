"""Shared-trunk ensembles: the cost of K members above a frozen trunk vs one member.

    .venv/bin/python benchmarks/bench_shared_trunk.py [--members 5] [--repeats 3]
    .venv/bin/python benchmarks/bench_shared_trunk.py --train [--members 5] [--train-samples 2000]

Training (--train): one head-only member vs K head-only members trained together above the shared
trunk (`ensemble.shared_trunk: true`), each 1 epoch of the first N training sentences, alternating,
wall time of `api.train` (which includes the test-split evaluation) compared.

Inference (default):
Members are MiniLM classifiers that differ only above a frozen trunk, as head-only or top-1 runs of
one base do: head-only = a new head per member (seeded), all 6 blocks shared; top-1 = the top block
perturbed per member as well, 5 blocks shared. Their weights are not trained here because inference
cost does not depend on the values; the test split of the bundled Rotten Tomatoes data (853 texts,
batch 128, fp32) is scored by one member, by K members one after another, and by K members with
the shared trunk (hybridtune.ensemble.SharedTrunk), alternating, and the medians compared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hybridtune import api
from hybridtune.ensemble import Member, SharedTrunk
from hybridtune.model.loading import load_tokenizer, resolve
from hybridtune.recipe import load_recipe
from hybridtune.tasks import classification


def members(kind: str, k: int) -> list[Member]:
    recipe = load_recipe()
    path = resolve(recipe.model.name)
    tokenizer = load_tokenizer(path)
    labels = classification.Labels(values=[0, 1], names=["negative", "positive"])
    out = []
    for i in range(k):
        torch.manual_seed(i)  # a new head per member
        model, _ = classification.load_model(path, tokenizer, labels)
        if kind == "top1":
            with torch.no_grad():
                for p in model.bert.encoder.layer[-1].parameters():
                    p.add_(1e-3 * torch.randn_like(p))
        model.eval()
        out.append(Member(path=None, loaded=api.LoadedRun(None, recipe, model, tokenizer, labels)))
    return out


def bench_training(k: int, samples: int, repeats: int) -> None:
    import tempfile

    common = [
        "freeze.trainable=[head]",
        "train.epochs=1",
        "train.lr=2e-3",
        f"data.max_train_samples={samples}",
        f"output.dir={tempfile.mkdtemp(prefix='bench-trunk-')}",
    ]
    times: dict[str, list[float]] = {"one member": [], f"{k} members, shared trunk": []}
    for r in range(repeats):
        for name, extra in (
            ("one member", []),
            (f"{k} members, shared trunk", [f"ensemble.members={k}", "ensemble.shared_trunk=true"]),
        ):
            started = time.perf_counter()
            api.train(load_recipe(None, [*common, *extra, f"output.name={len(extra)}-{r}"]))
            times[name].append(time.perf_counter() - started)
    one = statistics.median(times["one member"])
    print(f"\ntraining, head-only, 1 epoch of {samples} sentences:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:26s} {median:7.1f} s   {median / one:5.2f}x one member")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="time training instead of inference")
    parser.add_argument("--train-samples", type=int, default=2000)
    args = parser.parse_args()
    if args.train:
        bench_training(args.members, args.train_samples, args.repeats)
        return
    torch.set_num_threads(torch.get_num_threads())
    frame = classification.load_splits(load_recipe().data).test
    print(f"{len(frame)} texts, {args.members} members, torch threads {torch.get_num_threads()}")
    for kind in ("head_only", "top1"):
        ms = members(kind, args.members)
        shared = SharedTrunk.of(members(kind, args.members))
        times: dict[str, list[float]] = {"one member": [], "members in turn": [], "shared trunk": []}
        for _ in range(args.repeats):
            for name, fn in (
                ("one member", lambda ms=ms: ms[0].logits(frame)),
                ("members in turn", lambda ms=ms: [m.logits(frame) for m in ms]),
                ("shared trunk", lambda shared=shared: shared.logits(frame)),
            ):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
        one = statistics.median(times["one member"])
        print(f"\n{kind}: trunk of {shared.depth} blocks shared")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:16s} {median:7.2f} s   {median / one:5.2f}x one member")


if __name__ == "__main__":
    main()
