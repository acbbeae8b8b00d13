"""layer_sampling (strategy/layer_sampling.py): LISA and BAdam on a 6-block tiny BERT. Which parameters
change in each interval (exactly the drawn blocks + what trains throughout), the optimizer state each
method keeps or drops at a switch, the compositions and refusals, the parameter report's average,
and kill -9 + --resume == the uninterrupted run (a kill between two switches and one at a switch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from typer.testing import CliRunner

from hybridtune import run
from hybridtune.cli import app
from hybridtune.model.anatomy import Anatomy
from hybridtune.recipe import load_recipe
from hybridtune.strategy.layer_sampling import LayerSamplingConfig, active

from .refusal import refused
from .test_resume import _killed, _metrics, _steps
from .test_resume import _train as _train_cli

SEED = 42  # train.seed's default


def _args(tmp_path: Path, model: str, data: str, *extra: str) -> list[str]:
    return [
        f"model.name={model}",
        f"data.source={data}",
        "train.max_steps=6",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.logging_steps=1",
        "train.early_stopping.metric=loss",
        f"output.dir={tmp_path / 'runs'}",
        *extra,
    ]


class Watch(TrainerCallback):
    """Per optimizer step: the slots whose parameters changed, and each parameter's Adam step count."""

    def __init__(self):
        self.changed: list[set[str]] = []  # parameter names
        self.adam: list[dict[str, int]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        now = dict(model.named_parameters())
        self.changed.append({n for n, v in self.before.items() if not torch.equal(v, now[n].detach())})
        names = {id(p): n for n, p in now.items()}
        self.adam.append({names[id(p)]: int(s["step"]) for p, s in optimizer.state.items() if s})


def _train(tmp_path, model, data, *extra) -> tuple[Watch, Anatomy, Path]:
    # a constant lr: the default schedule's first step has lr 0 and moves nothing
    recipe = load_recipe(None, _args(tmp_path, model, data, "schedule.name=constant", *extra))
    watch = Watch()
    summary = run.train(recipe, callbacks=[watch])
    anatomy = run.prepare(recipe).anatomy  # of the model before the parts, as the run reads it
    return watch, anatomy, Path(summary["run_dir"])


def _slots(anatomy: Anatomy, names: set[str]) -> set[str]:
    return {anatomy.slot_of(n) for n in names}


def _lisa_draw(switch: int, units: int = 6, draw: int = 2) -> set[int]:
    """LISA's draw, by hand: numpy's generator seeded with (train.seed, switch index)."""
    return {int(b) for b in np.random.default_rng([SEED, switch]).choice(units, draw, replace=False)}


# --------------------------------------------------------------------------------------------------
# what trains, and the optimizer state


def test_lisa_trains_exactly_the_drawn_blocks_the_embeddings_and_the_head(
    tmp_path, tiny_bert6, sentiment_csv
):
    watch, anatomy, run_dir = _train(
        tmp_path,
        tiny_bert6,
        sentiment_csv,
        "layer_sampling.method=lisa",
        "layer_sampling.gamma=0.333",
        "layer_sampling.interval=2",
    )
    draws = [_lisa_draw(s) for s in range(3)]
    assert len({frozenset(d) for d in draws}) > 1, "the draws must differ for the test to mean anything"
    for step, changed in enumerate(watch.changed):
        drawn = draws[step // 2]
        assert _slots(anatomy, changed) == {"embeddings", "head", *(f"block.{b}" for b in drawn)}, step
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["blocks"] for r in logged if "layer_sampling" in r] == [sorted(d) for d in draws]
    # Adam state: the blocks' is dropped at each draw (a block drawn again starts fresh too), the
    # embeddings' and head's is kept from step 1
    for step, counts in enumerate(watch.adam):
        for name, count in counts.items():
            slot = anatomy.slot_of(name)
            if slot.startswith("block."):
                assert int(slot[6:]) in draws[step // 2], (step, name)
                assert count == step % 2 + 1, (step, name, count)
            else:
                assert count == step + 1, (step, name, count)


def test_badam_trains_one_group_at_a_time_each_from_a_fresh_state(tmp_path, tiny_bert6, sentiment_csv):
    watch, anatomy, _ = _train(
        tmp_path,
        tiny_bert6,
        sentiment_csv,
        "layer_sampling.method=badam",
        "layer_sampling.order=ascending",
        "layer_sampling.blocks_per_group=2",
        "layer_sampling.interval=2",
    )
    groups = [{"block.0", "block.1"}, {"block.2", "block.3"}, {"block.4", "block.5"}]
    for step, changed in enumerate(watch.changed):
        assert _slots(anatomy, changed) == {"head", *groups[step // 2]}, step  # embeddings frozen
    for step, counts in enumerate(watch.adam):  # all of it cleared at each switch, the head's too
        assert counts and set(counts.values()) == {step % 2 + 1}, (step, counts)
        assert _slots(anatomy, set(counts)) == {"head", *groups[step // 2]}


@pytest.mark.parametrize(
    "order, expected",
    [
        ("ascending", [[0], [1], [2], [0], [1]]),
        ("descending", [[2], [1], [0], [2], [1]]),
    ],
)
def test_badam_orders(order, expected):
    config = LayerSamplingConfig(method="badam", order=order)
    assert [active(config, 3, 1, SEED, s) for s in range(5)] == expected


def test_badam_random_visits_every_group_once_per_pass_from_the_seed():
    config = LayerSamplingConfig(method="badam", order="random")
    order = [active(config, 4, 1, SEED, s)[0] for s in range(12)]
    for p in range(3):
        assert sorted(order[4 * p : 4 * p + 4]) == [0, 1, 2, 3]
        assert order[4 * p : 4 * p + 4] == list(np.random.default_rng([SEED, p]).permutation(4))
    assert order[:4] != order[4:8] or order[4:8] != order[8:]  # a new permutation each pass


# --------------------------------------------------------------------------------------------------
# composition


def test_with_freeze_only_the_blocks_it_leaves_are_drawn(tmp_path, tiny_bert6, sentiment_csv):
    extra = [
        "freeze.trainable=[head, {top_k: 3}]",
        "layer_sampling.method=lisa",
        "layer_sampling.gamma=0.34",
        "layer_sampling.interval=2",
        "lr.layer_decay=0.8",
    ]
    watch, anatomy, run_dir = _train(tmp_path, tiny_bert6, sentiment_csv, *extra)
    for step, changed in enumerate(watch.changed):
        slots = _slots(anatomy, changed)
        assert slots - {"head"} <= {"block.3", "block.4", "block.5"} and len(slots - {"head"}) == 1, step
    report = json.loads((run_dir / "params.json").read_text())
    assert report["parts"]["layer_sampling"]["units"] == [[3], [4], [5]]
    lrs = {r["slot"]: r["lr"] for r in report["rows"]}  # layer_decay's lrs stay per block
    assert lrs["block.5"] == pytest.approx(0.005 * 0.8) and lrs["block.3"] == pytest.approx(0.005 * 0.8**3)


def test_with_lora_the_lora_matrices_of_the_drawn_blocks_train(tmp_path, tiny_bert6, sentiment_csv):
    watch, anatomy, _ = _train(
        tmp_path,
        tiny_bert6,
        sentiment_csv,
        "peft.method=lora",
        "layer_sampling.method=lisa",
        "layer_sampling.gamma=0.333",
        "layer_sampling.interval=2",
    )
    for step, changed in enumerate(watch.changed):
        blocks = {n for n in changed if anatomy.block_of(n) is not None}
        assert blocks and all("lora_" in n for n in blocks), step  # the base weights stay frozen
        assert {anatomy.block_of(n) for n in blocks} == _lisa_draw(step // 2), step
        assert "head" in _slots(anatomy, changed)  # peft's copy of the head trains throughout


def test_with_adapters_and_a_soft_prompt_the_drawn_blocks_adapters_train(tmp_path, tiny_bert6, sentiment_csv):
    watch, anatomy, _ = _train(
        tmp_path,
        tiny_bert6,
        sentiment_csv,
        "adapters.method=houlsby",
        "soft_prompt.num_virtual_tokens=4",
        "data.max_length=64",
        "layer_sampling.method=badam",
        "layer_sampling.order=descending",
        "layer_sampling.interval=2",
    )
    for step, changed in enumerate(watch.changed):
        blocks = {anatomy.block_of(n) for n in changed if anatomy.block_of(n) is not None}
        assert blocks == {5 - step // 2}, step  # top down, one block per interval
        assert all("adapter" in n for n in changed if anatomy.block_of(n) is not None), step
        assert any("soft_prompt" in n for n in changed), step  # outside the blocks: throughout
        assert "embeddings" not in _slots(anatomy, changed)


def test_the_parameter_report_says_what_trains_on_average(tmp_path, tiny_bert6, sentiment_csv):
    args = _args(
        tmp_path, tiny_bert6, sentiment_csv, "layer_sampling.method=lisa", "layer_sampling.gamma=0.5"
    )
    prep = run.prepare(load_recipe(None, args))
    part = prep.params["parts"]["layer_sampling"]
    sizes = {r["slot"]: r["total"] for r in prep.params["rows"]}
    blocks = sum(sizes[f"block.{i}"] for i in range(6))
    assert part["always"] == prep.params["total"] - blocks  # embeddings + head
    assert part["mean_trainable"] == round(part["always"] + blocks * 3 / 6)  # 3 of 6 blocks
    assert prep.params["trainable"] == prep.params["total"]  # the table: every parameter that may train
    result = CliRunner().invoke(app, ["params", *args])
    assert result.exit_code == 0, result.output
    assert "lisa: 3 of 6 blocks every 20 steps; on average" in " ".join(result.output.split())


# --------------------------------------------------------------------------------------------------
# refusals and bad settings: exit 2, nothing written


@pytest.mark.parametrize(
    "extra, words",
    [
        (["layer_sampling.method=lisa", "layer_sampling.gamma=0"], ["layer_sampling.gamma"]),
        (["layer_sampling.method=lisa", "layer_sampling.gamma=0.05"], ["layer_sampling.gamma", "0 of the 6"]),
        (["layer_sampling.method=lisa", "layer_sampling.interval=0"], ["layer_sampling.interval"]),
        (["layer_sampling.method=lisa", "layer_sampling.order=random"], ["order", "method: lisa"]),
        (["layer_sampling.method=badam", "layer_sampling.gamma=0.5"], ["gamma", "method: badam"]),
        (
            ["layer_sampling.method=badam", "layer_sampling.blocks_per_group=7"],
            ["blocks_per_group", "at most 6"],
        ),
        (["layer_sampling.method=layers"], ["layer_sampling.method"]),
        (["layer_sampling.method=lisa", "freeze.trainable=[head]"], ["layer_sampling", "no block"]),
        (  # γ of the one block `freeze` leaves trainable
            [
                "layer_sampling.method=lisa",
                "layer_sampling.gamma=0.333",
                "freeze.trainable=[{top_k: 1}, head]",
            ],
            ["layer_sampling.gamma", "0 of the 1 trainable"],
        ),
        (["layer_sampling.method=lisa", "stages=[{train: [all]}]"], ["stages", "layer_sampling"]),
        (["layer_sampling.method=lisa", "peft.method=adalora"], ["peft.method", "adalora"]),
        (["layer_sampling.method=lisa", "contrastive.pairs=2"], ["contrastive", "layer_sampling"]),
        (["layer_sampling.method=badam", "train.trunk_cache=on"], ["train.trunk_cache", "layer_sampling"]),
        (
            ["layer_sampling.method=lisa", "ensemble.members=2", "ensemble.shared_trunk=true"],
            ["ensemble.shared_trunk", "layer_sampling"],
        ),
    ],
)
def test_bad_settings_exit_2_before_anything_is_written(tmp_path, tiny_bert6, sentiment_csv, extra, words):
    refused(["train", *_args(tmp_path, tiny_bert6, sentiment_csv, *extra)], tmp_path / "runs", *words)


# --------------------------------------------------------------------------------------------------
# kill -9 and --resume


def _same_weights(run_dir: Path, straight: Path) -> None:
    assert _steps(run_dir) == _steps(straight)
    for weights in (
        "final/model.safetensors",
        f"checkpoints/checkpoint-{_steps(run_dir)[-1]}/model.safetensors",
    ):
        ours, theirs = load_file(run_dir / weights), load_file(straight / weights)
        diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        assert diff <= 1e-6, (weights, diff)
    assert _metrics(run_dir) == _metrics(straight)  # the switches logged once each, the same blocks


@pytest.mark.parametrize(
    "method, kills",
    [
        # interval 3, a checkpoint every 2 steps. step:5 resumes from 4, inside the draw of steps 3-5;
        # step:7 resumes from 6, where a switch begins (its line, written after checkpoint-6, redone)
        (["layer_sampling.method=lisa", "layer_sampling.gamma=0.333"], ["step:5", "step:7"]),
        # killed after step 9, as the 4th switch (3 groups: the second pass's first) is due
        (
            [
                "layer_sampling.method=badam",
                "layer_sampling.order=random",
                "layer_sampling.blocks_per_group=2",
            ],
            ["step:9"],
        ),
    ],
)
def test_killed_and_resumed_ends_like_the_uninterrupted_run(
    tmp_path, tiny_bert6, sentiment_csv, method, kills
):
    args = [
        *_args(tmp_path, tiny_bert6, sentiment_csv, *method),
        "layer_sampling.interval=3",
        "train.max_steps=12",
        "train.eval_steps=2",
        "output.keep_checkpoints=3",
        "train.early_stopping.patience=10",
    ]
    _train_cli([*args, "output.name=straight"])
    run_dir, straight = tmp_path / "runs" / "killed", tmp_path / "runs" / "straight"
    _killed([*args, "output.name=killed"], kills[0])
    for kill in kills[1:]:
        _killed(["--resume", str(run_dir)], kill)
    _train_cli(["--resume", str(run_dir)])
    _same_weights(run_dir, straight)
