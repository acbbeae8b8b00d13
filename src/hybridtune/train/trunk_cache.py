"""The frozen-trunk activation cache: frozen bottom blocks computed once per example, not per epoch.

When the embeddings and the bottom m blocks are frozen (head-only, top-k), their output for an
example never changes during training. It is computed once (the model in eval mode, no grad, under
the run's precision), kept per example unpadded (trunk_store.py), and every later forward - training
steps, validation, the test evaluation - runs only the top: blocks 0..m-1 get a replaced `forward`
(an instance attribute: the module tree, state_dict, checkpoints and final/ are untouched) that
returns the cached states of the batch instead of computing. The batch names its examples by a
`trunk_row` column; a forward pre-hook on the top-level model takes it out of the kwargs before the
transformers forward sees it and places the rows' states at the batch's token positions (either
padding side, zeros on padding). Generic over architectures: it relies only on the anatomy's blocks
being called in order, once each, per forward, and returning a tensor (or a tuple led by one).

The embeddings still run: a lookup and a norm, cheap next to one block, and skipping them would need
per-architecture code (BERT has one embeddings module, GPT-2 adds two lookups in its forward).

Eligible: a task whose spec says `trunk_cacheable` (classification, token_classification: a head
over the token states), at least block 0 frozen with the embeddings,
no parameter a part added (LoRA, adapters, a soft prompt, a prefix) and no forward hook inside the
cached depth, no fusion, no mixed objective, not a shared-trunk ensemble. The depth follows stages:
when a stage unfreezes a cached block, the cache is rebuilt at the new frozen depth (dropped at 0)
before that stage's first step. Unlike a plain run, the cached blocks apply no dropout: the price
of computing them once (docs/speed.md).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from hybridtune.data.long_texts import DOC
from hybridtune.errors import UserError
from hybridtune.model.anatomy import canonical, unwrap

# what `train.trunk_cache: on` needs, and why the recipe alone rules the cache out (recipe/trunk.py)
from hybridtune.recipe.trunk import EXPECTED, expected, static_reason  # noqa: F401
from hybridtune.train import trunk_store
from hybridtune.train.trunk_store import Store

ROW = "trunk_row"  # the dataset column naming each example's cached states


class _Stop(Exception):
    """Raised by the hook on the last cached block: the rest of the forward is not needed."""


def frozen_depth(model, anatomy, base_names: set[str], moving=()) -> tuple[int, str | None]:
    """How many bottom blocks, with the embeddings, are frozen and the model's own, with no hook
    on their modules; and what stops it from being deeper (None: nothing, all blocks are).
    `moving`: names to count as trainable besides those that are now."""
    moving = set(moving)
    depth, why = anatomy.num_blocks, None
    for name, p in model.named_parameters():
        own = name in base_names
        if own and not p.requires_grad and name not in moving:
            continue
        slot = anatomy.slot_of(name)
        what = f"a trainable parameter {canonical(name)}" if own else f"an added parameter {canonical(name)}"
        if slot == "embeddings":
            return 0, f"{what} in the embeddings"
        if slot == "added":
            return 0, f"{what} outside the blocks"
        index = anatomy.block_of(name)
        if index is not None and index < depth:
            depth, why = index, f"{what} in block {index}"
    for name, module in model.named_modules():
        if not (module._forward_hooks or module._forward_pre_hooks):
            continue
        slot = anatomy.slot_of(name)
        if slot == "embeddings":
            return 0, f"a forward hook on {canonical(name)} (e.g. a soft prompt)"
        index = anatomy.block_of(name)
        if index is not None and index < depth:
            depth, why = index, f"a forward hook in block {index} ({canonical(name)})"
    return depth, why


def plan_depth(recipe, model, anatomy, base_names: set[str]) -> int:
    """The depth a run starts caching at (0: no cache), from `train.trunk_cache`; `on` where the run
    is not eligible is a UserError naming what was found."""
    setting = recipe.train.trunk_cache
    if setting == "off":
        return 0
    reason = static_reason(recipe)
    depth = 0
    if reason is None:
        depth, why = frozen_depth(model, anatomy, base_names)
        if depth == 0:
            reason = why or "no frozen block"
    if depth == 0 and setting == "on":
        raise UserError("train.trunk_cache", f"on, with {reason}", expected())
    return depth


class TrunkCache:
    """The cache of one run, installed on its model: the pre-hook that turns a batch's `trunk_row`
    into its cached states, the replaced forwards of the cached blocks, and the stores of each split
    (built on first use, at the current depth)."""

    def __init__(self, model, anatomy, base_names, tokenizer, precision: str, batch_size: int, **opts):
        self.model, self.anatomy, self.base_names = model, anatomy, base_names
        self.blocks = unwrap(model).get_submodule(anatomy.blocks_path)
        self.bf16 = precision == "bf16"
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.pad_id = tokenizer.pad_token_id or 0
        self.batch_size = batch_size
        self.max_length = opts.get("max_length")
        self.scratch: Path | None = opts.get("scratch")  # where a memmapped temp file may go
        self.stage_plan = opts.get("stage_plan")
        # never deeper than at the start: hooks and added parameters do not come and go
        self.limit = frozen_depth(model, anatomy, base_names)[0]
        self.datasets: dict = {}
        self.splits: dict[str, tuple[int, int]] = {}  # split -> its range of global rows
        self.stores: dict[str, Store] = {}
        self.depth = 0
        self.current: tuple[torch.Tensor, trunk_store.Layout] | None = None  # the batch's states
        self.changes: list[dict] = []  # {step, depth}, one per depth the run cached at
        self.builds: list[dict] = []  # one per split built or loaded
        self._replaced: dict[int, object] = {}  # block index -> its own instance forward, if any
        self._weights: str | None = None  # digest of the cached part (the shared dir's key)
        self._hooks = [
            model.register_forward_pre_hook(self._take_rows, with_kwargs=True),
            model.register_forward_hook(self._done),
        ]

    # ---- data

    def add_rows(self, datasets: dict) -> dict:
        """The datasets with a `trunk_row` column: one global row number per example."""
        out, start = {}, 0
        for name, dataset in datasets.items():
            self.splits[name] = (start, start + len(dataset))
            self.datasets[name] = dataset
            out[name] = dataset.add_column(ROW, list(range(start, start + len(dataset))))
            start += len(dataset)
        return out

    # ---- depth

    def sync(self, step: int = 0, moving=()) -> None:
        """Cache at the model's frozen depth now (rebuilt if a stage changed it); `moving`: names
        to treat as trainable too."""
        depth = min(frozen_depth(self.model, self.anatomy, self.base_names, moving)[0], self.limit)
        if depth != self.depth or not self.changes:
            self.set_depth(depth, step)

    def set_depth(self, depth: int, step: int = 0) -> None:
        self._restore()
        self.depth = depth
        for index in range(depth):
            block = self.blocks[index]
            self._replaced[index] = block.__dict__.get("forward")
            block.forward = self._replay(block.forward)
        self.changes.append({"step": step, "depth": depth})

    def _restore(self) -> None:
        """The cached blocks compute again; the stores (of the old depth) are dropped."""
        for index, own in self._replaced.items():
            if own is None:
                del self.blocks[index].forward
            else:
                self.blocks[index].forward = own
        self._replaced.clear()
        self.stores.clear()
        self.depth, self._weights = 0, None

    def _replay(self, real):
        def forward(*args, **kwargs):
            if self.current is None:  # a forward without rows (or while building): compute
                return real(*args, **kwargs)
            states, layout = self.current
            return layout.wrap(states)

        return forward

    # ---- the forward

    def _take_rows(self, module, args, kwargs):
        rows = kwargs.pop(ROW, None)
        self.current = None
        if rows is None or self.depth == 0:
            return args, kwargs
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        split = next((s for s, (a, b) in self.splits.items() if a <= rows[0] < b), None)
        start, stop = self.splits.get(split, (0, 0))
        if not all(start <= r < stop for r in rows):
            raise RuntimeError(f"trunk cache: rows {rows[:4]}... are not rows of one split it holds")
        store = self.store(split)
        mask = kwargs.get("attention_mask")
        if mask is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = torch.ones(ids.shape[:2], dtype=torch.long)
        device = next(self.model.parameters()).device
        states = store.padded([r - start for r in rows], mask)
        self.current = (states.to(device, store.layout.dtype), store.layout)
        return args, kwargs

    def _done(self, module, args, output):
        self.current = None

    # ---- building

    def store(self, split: str) -> Store:
        """The split's states at the current depth: built (or loaded from the shared dir) on first use."""
        if split not in self.stores:
            started = time.perf_counter()
            columns = [c for c in self.datasets[split].column_names if c not in ("labels", ROW, DOC)]
            features = self.datasets[split].select_columns(columns).to_dict()
            shared, loaded = trunk_store.shared_dir(), False
            if shared is None:
                store = trunk_store.compute(
                    self._run_trunk, features, self.dtype, self.batch_size, self.pad_id, scratch=self.scratch
                )
            else:
                key = trunk_store.entry_key(self._weights_digest(), features, self.max_length, self.dtype)
                store = trunk_store.load(shared / key)
                loaded = store is not None
                if store is None:
                    store = trunk_store.compute_shared(
                        shared / key,
                        lambda path: trunk_store.compute(
                            self._run_trunk, features, self.dtype, self.batch_size, self.pad_id, path=path
                        ),
                    )
            self.stores[split] = store
            self.builds.append(
                {
                    "split": split,
                    "depth": self.depth,
                    "seconds": round(time.perf_counter() - started, 3),
                    "loaded": loaded,
                    "storage": store.where,
                    "mib": round(store.nbytes / 2**20, 2),
                }
            )
        return self.stores[split]

    def _weights_digest(self) -> str:
        if self._weights is None:
            model = unwrap(self.model)
            cached = [
                (canonical(n), p)
                for n, p in self.model.named_parameters()
                if self.anatomy.slot_of(n) == "embeddings"
                or (self.anatomy.block_of(n) is not None and self.anatomy.block_of(n) < self.depth)
            ]
            self._weights = trunk_store.weights_digest(
                type(model).__name__, model.config.to_dict(), cached, self.depth
            )
        return self._weights

    @torch.no_grad()
    def _run_trunk(self, batch: dict):
        """The output of block depth-1 for a batch: the model in eval mode, stopped right there."""
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        recorded = []

        def stop(module, args, output):
            recorded.append(output)
            raise _Stop

        handle = self.blocks[self.depth - 1].register_forward_hook(stop)
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
                self.model(**batch)
        except _Stop:
            pass
        finally:
            handle.remove()
            for module, mode in modes:
                module.training = mode
        return recorded[0]

    # ---- the end

    def summary(self) -> dict:
        """What run.json / report.json say about the cache."""
        return {
            "used": bool(self.builds),
            "depth": self.changes[0]["depth"] if self.changes else 0,
            "depths": self.changes,
            "build_seconds": round(sum(b["seconds"] for b in self.builds), 3),
            "builds": self.builds,
        }

    def close(self) -> None:
        """Back to a plain model: blocks compute, hooks gone, stores freed."""
        self._restore()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


class TrunkCacheCallback(TrainerCallback):
    """Keeps the cache at the frozen depth: at the start (after a resume's stage is restored), when
    a stage begins (after StageCallback, which runs first) and at the end, where a block any stage
    trained is no longer cached (Trainer may have reloaded the best checkpoint's weights of it)."""

    def __init__(self, cache: TrunkCache):
        self.cache = cache

    def on_train_begin(self, args, state, control, **kwargs):
        self.cache.sync(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        stage_plan = self.cache.stage_plan  # only a stage changes what trains
        if stage_plan is not None and state.global_step in stage_plan.starts:
            self.cache.sync(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        stage_plan = self.cache.stage_plan
        moving = set()
        if stage_plan is not None:
            moving = set().union(
                *(
                    names
                    for start, names in zip(stage_plan.starts, stage_plan.trainable, strict=True)
                    if start < max(state.global_step, 1)
                )
            )
        self.cache.sync(state.global_step, moving)
