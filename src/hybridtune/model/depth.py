"""Blocks named relative to a model's depth: fractions of the blocks and levels.

A recipe written for one model should train the same share of any other, whatever its number of blocks
N (6 for MiniLM, 12 for BERT-base, 30 for SmolLM2-135M). Two rules, used alike by `freeze` and
`stages` selectors and by `lr` (levels, groups), so that what a selector picks and what lr a level gets
always agree:

- a fraction f in (0, 1] of the blocks is round-half-up(f x N) blocks, at least 1 and at most N:
  `{top_frac: 0.333}` is 2 of 6 blocks, 4 of 12; `{bottom_frac: 0.667}` is 4 of 6, 8 of 12.
- L levels split the blocks into L contiguous groups, bottom (level 0) to top (level L-1), as
  `numpy.array_split` does: the first N mod L levels (the lowest) get one block more. 6 blocks in 3
  levels: [0, 1] [2, 3] [4, 5]; 7 blocks: [0, 1, 2] [3, 4] [5, 6]. L must be 1..N (no empty level).
"""

from __future__ import annotations

import math


def fraction_blocks(num_blocks: int, fraction: float) -> int:
    """How many blocks a fraction in (0, 1] of `num_blocks` names: round half up, 1..num_blocks."""
    # half up, not Python's round-half-even (round(2.5) is 2, round(0.5) is 0); the epsilon keeps a
    # product that floating point puts just below .5 (0.35 x 10 in some orders of operation) at the half
    return min(num_blocks, max(1, math.floor(fraction * num_blocks + 0.5 + 1e-9)))


def level_blocks(num_blocks: int, levels: int) -> list[range]:
    """The blocks of each of `levels` contiguous levels, bottom to top (numpy.array_split's sizes)."""
    size, extra = divmod(num_blocks, levels)
    out, start = [], 0
    for k in range(levels):
        end = start + size + (1 if k < extra else 0)
        out.append(range(start, end))
        start = end
    return out


def level_of_block(num_blocks: int, levels: int) -> dict[int, int]:
    """Block index -> its level (see `level_blocks`)."""
    return {b: k for k, blocks in enumerate(level_blocks(num_blocks, levels)) for b in blocks}


def keep_bottom_blocks(model, blocks_path: str, k: int):
    """The model with only its bottom `k` blocks: the stack at `blocks_path` (Anatomy.blocks_path) cut
    to its first k, and the config's layer count (transformers' `num_hidden_layers`, which each
    config maps to its own name: GPT-2's n_layer, DistilBERT's n_layers) set to k, so that
    `save_pretrained` writes a model plain transformers loads as a k-block model. Per-layer config
    lists of the old depth (`layer_types`) are cut alike. Initialising a shallower student from the
    bottom of a pretrained stack is the "bottom layers" choice of Sanh et al. 2019 (DistilBERT took
    every other layer instead) and Sajjad et al. 2023 ("On the effect of dropping layers of
    pre-trained transformer models": dropping the top layers keeps most of the accuracy)."""
    from torch import nn

    parent_path, _, attr = blocks_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    stack = getattr(parent, attr)
    depth = len(stack)
    setattr(parent, attr, nn.ModuleList(list(stack)[:k]))
    config = model.config
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == depth:
        config.layer_types = config.layer_types[:k]
    config.num_hidden_layers = k
    return model
