"""layer_sampling: which blocks train changes every `interval` optimizer steps (LISA, BAdam).

    layer_sampling:            # LISA: Pan et al. 2024, "LISA: Layerwise Importance Sampling for
      method: lisa             #   Memory-Efficient Large Language Model Fine-Tuning"
      gamma: 0.333             # a share of the blocks: 2 of MiniLM's 6 (round half up)
      interval: 20             # K: a new draw every 20 optimizer steps
    layer_sampling:            # BAdam: Luo et al. 2024, "BAdam: A Memory Efficient Full Parameter
      method: badam            #   Optimization Method for Large Language Models"
      order: descending        # ascending | descending | random (a new permutation each pass)
      blocks_per_group: 1      # consecutive blocks updated together
      interval: 50

What is sampled is the blocks' trainable parameters as the other parts left them: the base
weights `freeze` keeps (a block it freezes whole is never drawn), or the LoRA matrices / adapters
inside the blocks. Everything trainable outside the blocks (embeddings, final norm, head, a soft
prompt, peft's copy of the head) trains throughout, as LISA's embeddings and head do; BAdam leaves
the embeddings frozen (its `include_embedding=False`) and keeps the head training (its
`active_modules`), unless `embeddings` says otherwise.

Every parameter that may train is in the optimizer from the start (run.prepare sees it trainable:
the parameter report's `trainable` is that upper bound, `parts.layer_sampling` the average); the
callback flips `requires_grad` when a step begins, and AdamW skips a parameter without a gradient.
Optimizer state, as each method's reference does:
- LISA: at each draw the blocks' Adam state is dropped, a block drawn again included (it starts
  fresh); the embeddings' and head's state is kept. This is LMFlow's LISATrainer, which re-creates
  the optimizer at each switch and keeps only the non-block groups' state; the paper's own runs
  restarted every interval from saved weights (LMFlow issue #729), and LMFlow's callback keeps all
  state (issue #768: the memory the paper reports needs it dropped).
- BAdam: at each switch the whole Adam state is cleared (BlockOptimizer.switch_trainable_params:
  `base_optimizer.state = defaultdict(dict)`; Algorithm 1 starts each block's sub-problem at m = v = 0).

Draws are seeded by (train.seed, switch index) -- LISA: `numpy.random.default_rng([seed, s])`,
BAdam random: one permutation per pass of the groups from ([seed, pass]) -- so a resumed run draws
what the uninterrupted one drew, and `hybridtune params` can say what trains on average.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from tqdm.auto import tqdm
from transformers import TrainerCallback

from hybridtune.errors import UserError
from hybridtune.model.facts import ModelFacts
from hybridtune.strategy.base import Build, Part
from hybridtune.strategy.freeze import blocks_at_most

LISA_GAMMA = 0.25  # the default share (LISA's 2 of 8 sampled layers; 2 of 32 for LLaMA-2-7B)
BADAM_ORDER = "descending"  # BlockOptimizer's default switch_mode


class LayerSamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["lisa", "badam"] = Field(
        ..., description="`lisa`: a random share of the blocks per interval; `badam`: one group after another"
    )
    interval: int = Field(
        20, ge=1, description="optimizer steps between two switches (LISA's K, BAdam's switch_block_every)"
    )
    gamma: float | None = Field(
        None,
        gt=0,
        le=1,
        description=f"lisa: the share of the (trainable) blocks drawn each interval, round half up "
        f"(default {LISA_GAMMA}); one that draws no block is refused",
    )
    order: Literal["ascending", "descending", "random"] | None = Field(
        None,
        description=f"badam: the order of the groups, bottom up, top down, or a new random permutation "
        f"each pass (default {BADAM_ORDER})",
    )
    blocks_per_group: int | None = Field(
        None, ge=1, description="badam: consecutive blocks updated together (default 1)"
    )
    embeddings: bool | None = Field(
        None,
        description="the embeddings train throughout (default: lisa true, badam false); `freeze` can "
        "still freeze them",
    )

    @model_validator(mode="after")
    def _method_keys(self) -> LayerSamplingConfig:
        other = {"lisa": ("order", "blocks_per_group"), "badam": ("gamma",)}[self.method]
        given = [key for key in other if getattr(self, key) is not None]
        if given:
            raise ValueError(f"`{given[0]}` goes with the other method, not method: {self.method}")
        if self.method == "lisa":
            self.gamma = LISA_GAMMA if self.gamma is None else self.gamma
        else:
            self.order = self.order or BADAM_ORDER
            self.blocks_per_group = self.blocks_per_group or 1
        if self.embeddings is None:
            self.embeddings = self.method == "lisa"
        return self


# --------------------------------------------------------------------------------------------------
# what is sampled, and which units each switch makes trainable


@dataclass
class Sampling:
    """The units that take turns (LISA: one block each; BAdam: a group of blocks) and the rest."""

    blocks: list[list[int]]  # block indices of each unit, bottom to top
    members: list[list[tuple[str, nn.Parameter]]]  # the trainable parameters of each unit
    always: list[tuple[str, nn.Parameter]]  # trainable throughout (embeddings, head, a soft prompt)
    draw: int  # units trainable at a time (LISA: round(gamma x units); BAdam: 1)


def units_of(config: LayerSamplingConfig, n: int) -> tuple[int, int]:
    """(units drawn at a time, blocks per unit) with `n` blocks that can train; a setting that
    cannot work with `n` is a UserError. Called on the model's blocks (`sampling`) and on the most
    the recipe can leave trainable (`model_check`, which a search asks before it draws the part):
    the draw only grows with `n`, so what the bound refuses, the model refuses too."""
    if n == 0:
        raise UserError(
            "layer_sampling",
            "no block with a trainable parameter (freeze / peft left none inside the blocks)",
            "a recipe that trains parameters inside the transformer blocks",
        )
    if config.method == "lisa":
        # round half up, as model/depth.py's fractions, but without their floor of one block: 0 is refused
        draw = math.floor(config.gamma * n + 0.5 + 1e-9)
        if draw == 0:
            raise UserError(
                "layer_sampling.gamma",
                f"{config.gamma:g}, which draws 0 of the {n} trainable blocks",
                f"a share that draws at least one block (>= {0.5 / n:.3g} here)",
            )
        return draw, 1
    if config.blocks_per_group > n:
        raise UserError(
            "layer_sampling.blocks_per_group",
            str(config.blocks_per_group),
            f"at most {n} (the blocks that can train)",
        )
    return 1, config.blocks_per_group


def model_check(config: LayerSamplingConfig, recipe, facts: ModelFacts) -> None:
    """The settings against the most blocks the recipe can leave trainable: LoRA and adapters may put
    weights in every block; otherwise the blocks `freeze` may leave trainable (every one without it)."""
    n = facts.blocks
    if recipe.freeze is not None and recipe.peft is None and recipe.adapters is None:
        n = len(blocks_at_most(recipe.freeze, facts.blocks))
    units_of(config, n)


def sampling(model: nn.Module, config: LayerSamplingConfig, build: Build) -> Sampling:
    """What may train, split into units; a setting the model cannot meet is a UserError."""
    anatomy = build.anatomy
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad or id(p) in build.keep]
    by_block: dict[int, list[tuple[str, nn.Parameter]]] = {}
    always = []
    for name, p in trainable:
        block = anatomy.block_of(name)
        if block is not None:
            by_block.setdefault(block, []).append((name, p))
        elif config.embeddings or anatomy.slot_of(name) != "embeddings":
            always.append((name, p))
    pool = sorted(by_block)
    draw, size = units_of(config, len(pool))
    units = [pool[i : i + size] for i in range(0, len(pool), size)]
    members = [[pair for b in unit for pair in by_block[b]] for unit in units]
    return Sampling(units, members, always, draw)


def active(config: LayerSamplingConfig, n_units: int, draw: int, seed: int, switch: int) -> list[int]:
    """The units trainable from switch `switch` on (indices into Sampling.blocks), from the seed."""
    if config.method == "lisa":
        rng = np.random.default_rng([seed, switch])
        return sorted(int(u) for u in rng.choice(n_units, size=draw, replace=False))
    pos = switch % n_units
    if config.order == "ascending":
        return [pos]
    if config.order == "descending":
        return [n_units - 1 - pos]
    # BAdam's random mode: each pass visits every group once, in a new random order
    return [int(np.random.default_rng([seed, switch // n_units]).permutation(n_units)[pos])]


def shares(config: LayerSamplingConfig, s: Sampling, seed: int, total_steps: int) -> list[float]:
    """The share of the run's steps each unit trains: LISA's expectation draw / units; BAdam's
    schedule over the planned steps (deterministic, its random order from the seed)."""
    n = len(s.blocks)
    if config.method == "lisa" or total_steps <= 0:
        return [s.draw / n] * n
    steps = [0] * n
    for switch in range(math.ceil(total_steps / config.interval)):
        length = min(config.interval, total_steps - switch * config.interval)
        for u in active(config, n, s.draw, seed, switch):
            steps[u] += length
    return [x / total_steps for x in steps]


# --------------------------------------------------------------------------------------------------
# the hooks


def apply(model: nn.Module, config: LayerSamplingConfig, build: Build) -> nn.Module:
    """Checks the settings against the model; every parameter that may train stays trainable, so the
    optimizer holds it from the start. BAdam's embeddings are frozen here, for good."""
    if not config.embeddings:
        for name, p in model.named_parameters():
            if build.anatomy.slot_of(name) == "embeddings":
                p.requires_grad_(False)
                build.keep.pop(id(p), None)  # freeze's selection is not put back on them
    sampling(model, config, build)
    return model


def check(config: LayerSamplingConfig, recipe) -> None:
    """Refusals by name: two things that change what trains during the run, or a part whose own
    bookkeeping needs every trainable parameter's gradient at every step."""
    if recipe.stages is not None:
        raise ValueError(
            "stages: found `stages` with `layer_sampling`; expected one of them (both switch what "
            "trains during the run)"
        )
    if recipe.contrastive is not None:
        raise ValueError(
            "contrastive: found `contrastive` with `layer_sampling`; expected one of them (its stage "
            "before the Trainer trains every block, and its `then` sets what the Trainer trains)"
        )
    ensemble = getattr(recipe, "ensemble", None)
    if ensemble is not None and ensemble.shared_trunk:
        raise ValueError(
            "ensemble.shared_trunk: found it with `layer_sampling`; expected separate members "
            "(shared_trunk: false): the members train together in one loop, without the switches"
        )
    peft = getattr(recipe, "peft", None)
    if peft is not None and peft.method == "adalora":
        raise ValueError(
            "peft.method: found adalora with `layer_sampling`; expected another method (AdaLoRA's "
            "rank allocator reads every LoRA matrix's gradient at every step)"
        )


def trunk_cache(config: LayerSamplingConfig, recipe) -> str:
    return "layer_sampling (the trainable blocks change during the run)"


def params(model: nn.Module, config: LayerSamplingConfig, build: Build) -> dict:
    """What trains on average over the run: the parameter report's `parts.layer_sampling`."""
    s = sampling(model, config, build)
    seed = build.recipe.train.seed if build.recipe is not None else 0
    share = shares(config, s, seed, build.total_steps or 0)
    always = sum(p.numel() for _, p in s.always)
    mean = always + sum(f * sum(p.numel() for _, p in ms) for f, ms in zip(share, s.members, strict=True))
    total = sum(p.numel() for p in model.parameters())
    blocks = {f"block.{b}": round(f, 4) for unit, f in zip(s.blocks, share, strict=True) for b in unit}
    what = (
        f"{s.draw} of {len(s.blocks)} blocks"
        if config.method == "lisa"
        else f"{len(s.blocks)} groups of {config.blocks_per_group}, {config.order}"
    )
    mean_pct = round(100 * mean / total, 4) if total else 0.0
    return {
        "method": config.method,
        "interval": config.interval,
        "units": s.blocks,
        "draw": s.draw,
        "always": always,
        "block_share": blocks,  # the share of the run's steps each block trains
        "mean_trainable": round(mean),
        "mean_trainable_pct": mean_pct,
        "line": f"{config.method}: {what} every {config.interval} steps; on average "
        f"{round(mean):,} parameters train ({mean_pct:.2f} %), {always:,} of them throughout",
    }


class LayerSampling(TrainerCallback):
    """Makes the units of each switch trainable when its first optimizer step begins (the previous
    step's gradients were cleared by Trainer's zero_grad), drops the optimizer state the method
    drops, and logs the switch to metrics.jsonl."""

    def __init__(self, config: LayerSamplingConfig, s: Sampling, seed: int):
        self.config, self.s, self.seed = config, s, seed
        self.current = -1

    def _enter(self, switch: int) -> tuple[list[int], int]:
        on = set(active(self.config, len(self.s.blocks), self.s.draw, self.seed, switch))
        for u, members in enumerate(self.s.members):
            for _, p in members:
                p.requires_grad_(u in on)
                if u not in on:
                    p.grad = None
        blocks = sorted(b for u in on for b in self.s.blocks[u])
        n = sum(p.numel() for _, p in self.s.always) + sum(
            p.numel() for u in on for _, p in self.s.members[u]
        )
        return blocks, n

    def on_train_begin(self, args, state, control, **kwargs):
        """On resume, the draw the checkpoint was taken in, with the optimizer state it restored; a
        switch that falls on the checkpoint's step happens next, as it did in the first run."""
        if state.global_step > 0:
            self.current = (state.global_step - 1) // self.config.interval
            self._enter(self.current)

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        switch = state.global_step // self.config.interval
        if switch == self.current:
            return
        self.current = switch
        blocks, n = self._enter(switch)
        held = getattr(optimizer, "state", None)
        if held is not None and self.config.method == "badam":
            held.clear()  # BAdam: every sub-problem starts at m = v = 0
        elif held is not None:
            for members in self.s.members:  # LISA: the blocks' state, a block drawn again included
                for _, p in members:
                    held.pop(p, None)
        if state.is_world_process_zero:
            tqdm.write(
                f"layer_sampling from step {state.global_step}: blocks {blocks}, {n:,} parameters train"
            )
            log = Path(args.output_dir).parent / "metrics.jsonl"  # the run dir's (output_dir: checkpoints/)
            if log.parent.is_dir():
                record = {
                    "step": state.global_step,
                    "epoch": round(state.epoch or 0.0, 4),
                    "layer_sampling": switch,
                    "blocks": blocks,
                    "trainable": n,
                }
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        """The model is left as `apply` made it: every parameter that may train, trainable."""
        for members in self.s.members:
            for _, p in members:
                p.requires_grad_(True)


def callbacks(model: nn.Module, config: LayerSamplingConfig, build: Build) -> list:
    seed = build.recipe.train.seed if build.recipe is not None else 0
    return [LayerSampling(config, sampling(model, config, build), seed)]


PART = Part(
    key="layer_sampling",
    config=LayerSamplingConfig,
    apply=apply,
    check=check,
    model_check=model_check,
    trunk_cache=trunk_cache,
    callbacks=callbacks,
    params=params,
    # LISA's share of the blocks and its interval (the paper: γ = 2 of 32 layers for 7B models, K = 50;
    # small encoders have few blocks, so a third to a half); BAdam has no setting that helps a search
    search={"method": "lisa", "gamma": [0.167, 0.333, 0.5], "interval": [10, 20, 50]},
    summary="the blocks that train change every `interval` steps: LISA (a random share) or BAdam "
    "(one group after another)",
)
