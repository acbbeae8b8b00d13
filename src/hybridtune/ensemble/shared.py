"""A shared trunk: members whose embeddings and bottom blocks are bit-identical run them once per
batch (the leader records its blocks' outputs, the followers replay them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hybridtune.data.long_texts import DOC, pool
from hybridtune.model.anatomy import Anatomy, canonical, unwrap
from hybridtune.tasks.classification import collator, encode

if TYPE_CHECKING:
    from hybridtune.ensemble.members import Member


class Replay(torch.nn.Module):
    """Stands in for a trunk block of a follower member: returns what the leader's block returned
    for the current batch, whatever it is given."""

    def __init__(self, cache: dict, index: int):
        super().__init__()
        self.cache, self.index = cache, index

    def forward(self, *args, **kwargs):
        return self.cache[self.index]


def share_trunk(models: list[torch.nn.Module], depth: int, cache: dict) -> tuple[list, list, str]:
    """Make the followers (models[1:]) replay the leader's bottom `depth` blocks: hooks on the
    leader's blocks record each batch's outputs into `cache`, and the followers' blocks are replaced
    by `Replay` modules reading it. Returns the hook handles, the followers' own blocks and the
    blocks' path, to undo it."""
    path = Anatomy.of(models[0]).blocks_path

    def recorder(index: int):
        def hook(module, args, output):
            cache[index] = output

        return hook

    hooks = [
        block.register_forward_hook(recorder(i))
        for i, block in enumerate(unwrap(models[0]).get_submodule(path)[:depth])
    ]
    originals = []
    for model in models[1:]:
        blocks = unwrap(model).get_submodule(path)
        originals.append([blocks[i] for i in range(depth)])
        for i in range(depth):
            blocks[i] = Replay(cache, i)
    return hooks, originals, path


class SharedTrunk:
    """Members whose embeddings and bottom `depth` blocks are bit-identical run those blocks once per
    batch: the first member (the leader) runs whole and its trunk blocks record their outputs; in the
    other members those blocks are replaced by `Replay` modules (`share_trunk`). Generic over
    architectures: it only relies on the blocks being called in order, once each, per forward (true
    of every HF model whose blocks the anatomy finds). The cost of K members is one trunk + K tops."""

    def __init__(self, members: list[Member], depth: int):
        self.members, self.depth = members, depth
        self.cache: dict[int, Any] = {}
        share_trunk([m.loaded.model for m in members], depth, self.cache)

    @classmethod
    def of(cls, members: list[Member]) -> SharedTrunk | None:
        """A shared trunk when the members have one (same tokenizer and text settings, embeddings and
        at least one bottom block identical); None otherwise."""
        first = members[0].loaded
        for m in members[1:]:
            if (
                m.loaded.recipe.data.max_length != first.recipe.data.max_length
                or m.loaded.tokenizer.get_vocab() != first.tokenizer.get_vocab()
            ):
                return None
        depth = trunk_depth([m.loaded.model for m in members])
        if depth < 1:
            return None
        return cls(members, depth)

    @torch.no_grad()
    def logits(self, frame, batch_size: int = 128) -> list[np.ndarray]:

        leader = self.members[0].loaded
        dataset = encode(frame, leader.tokenizer, None, leader.recipe.data)
        collate = collator(leader.tokenizer)
        features = [{k: v for k, v in row.items() if k != DOC} for row in dataset]
        out: list[list[np.ndarray]] = [[] for _ in self.members]
        for start in range(0, len(features), batch_size):
            batch = collate(features[start : start + batch_size])
            for i, m in enumerate(self.members):  # the leader first: it fills the cache
                out[i].append(m.loaded.model(**batch).logits.float().cpu().numpy())
            self.cache.clear()
        if DOC in dataset.column_names:  # chunks members: a row per document, as each was evaluated
            return [
                pool(np.concatenate(x), dataset[DOC], m.labels.pool)
                for x, m in zip(out, self.members, strict=True)
            ]
        return [np.concatenate(x) for x in out]


def trunk_depth(models: list[torch.nn.Module]) -> int:
    """How many bottom blocks all models share bit for bit, with their embeddings (0: none)."""
    anatomy = Anatomy.of(models[0])
    by_slot: list[dict[str, dict[str, torch.Tensor]]] = []
    for model in models:
        slots: dict[str, dict[str, torch.Tensor]] = {}
        for name, p in model.named_parameters():
            slots.setdefault(anatomy.slot_of(canonical(name)), {})[name] = p
        by_slot.append(slots)

    def same(slot: str) -> bool:
        first = by_slot[0].get(slot, {})
        return all(
            s.get(slot, {}).keys() == first.keys() and all(torch.equal(s[slot][k], first[k]) for k in first)
            for s in by_slot[1:]
        )

    if not same("embeddings"):
        return 0
    depth = 0
    while depth < anatomy.num_blocks and same(f"block.{depth}"):
        depth += 1
    return depth
