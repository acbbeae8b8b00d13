"""Where the frozen trunk's outputs live: per split, one flat [tokens, hidden] tensor + offsets.

Each example's states are kept unpadded (its own length x hidden), back to back; `offsets[i]` is where
example i starts. The dtype is bf16 when the run's precision is bf16, else fp32. The flat tensor is
held in RAM up to `RAM_LIMIT` bytes; a bigger one is a numpy memmap on an *unlinked* temp file (the
mapping lives as long as the process holds it; nothing is left on disk, even after a crash).

With `HYBRIDTUNE_CACHE_DIR` set (compare sets it for its runs), a split's states are stored there under
a key that hashes the frozen part's weights, the depth, the split's token ids, max_length and the
dtype, so the seeds of one strategy, and strategies with the same frozen depth, compute them once.
An entry is a directory written under a temp name and renamed when complete (a concurrent writer of
the same key loses the rename and reads the winner's).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hybridtune.errors import UserError
from hybridtune.rundir import CACHE_DIR_ENV, DISK_ERRORS, publish_dir, shared_dir  # noqa: F401  (CACHE_DIR_ENV: its old home)

RAM_LIMIT = 1 << 30  # bytes of one split's states held in RAM; more goes to a memmapped file
FORMAT = 1  # bump when what an entry holds (or how it is computed) changes
STATES, OFFSETS, META = "states.bin", "offsets.npy", "meta.json"
# config keys that say nothing about the trunk's computation (labels, names, versions)
CONFIG_NOISE = {
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "finetuning_task",
    "_name_or_path",
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
}


@dataclass
class Layout:
    """What the cached block returns: a tensor (`items` 0) or a tuple of `items` whose first item is
    the hidden states (the others are given as None), in the dtype it returned them."""

    items: int
    dtype: torch.dtype

    @classmethod
    def of(cls, output) -> Layout:
        if isinstance(output, torch.Tensor):
            return cls(0, output.dtype)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return cls(len(output), output[0].dtype)
        raise TypeError(f"a block output the trunk cache cannot replay: {type(output).__name__}")

    def hidden(self, output) -> torch.Tensor:
        return output if self.items == 0 else output[0]

    def wrap(self, states: torch.Tensor):
        return states if self.items == 0 else (states, *([None] * (self.items - 1)))


@dataclass
class Store:
    """One split's cached states."""

    flat: torch.Tensor  # [tokens, hidden]
    offsets: np.ndarray  # [n + 1] int64
    layout: Layout
    where: str  # "ram" | "memmap" | "shared"
    mapped: np.memmap | None = None  # the file mapping behind `flat`, if any

    def padded(self, rows: list[int], mask: torch.Tensor) -> torch.Tensor:
        """The states of `rows`, placed at the positions `mask` marks as tokens (either padding side),
        zeros elsewhere: [len(rows), mask's length, hidden]."""
        mask = mask.detach().to("cpu", torch.bool)
        out = self.flat.new_zeros((len(rows), mask.shape[1], self.flat.shape[1]))
        for i, row in enumerate(rows):
            start, stop = int(self.offsets[row]), int(self.offsets[row + 1])
            if int(mask[i].sum()) != stop - start:
                raise RuntimeError(
                    f"trunk cache: row {row} holds {stop - start} tokens, the batch gives it {int(mask[i].sum())}"
                )
            out[i, mask[i]] = self.flat[start:stop]
        return out

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def _np_dtype(dtype: torch.dtype):
    return np.uint16 if dtype == torch.bfloat16 else np.float32  # numpy has no bf16: its bits as uint16


def allocate(tokens: int, hidden: int, dtype: torch.dtype, path: Path | None, scratch: Path | None):
    """An empty [tokens, hidden] tensor: in RAM, or a memmap of `path` (the shared dir), or of an
    unlinked temp file in `scratch` when bigger than RAM_LIMIT. Returns (tensor, where, mapping)."""
    nbytes = tokens * hidden * torch.finfo(dtype).bits // 8
    if path is None and (nbytes <= RAM_LIMIT or tokens == 0):
        return torch.empty((tokens, hidden), dtype=dtype), "ram", None
    if path is None:
        fd, name = tempfile.mkstemp(prefix=".trunk-cache-", suffix=".bin", dir=scratch)
        os.close(fd)
        array = np.memmap(name, dtype=_np_dtype(dtype), mode="w+", shape=(tokens, hidden))
        os.unlink(name)  # the mapping stays valid; the file is gone from the directory already
        where = "memmap"
    else:
        array = np.memmap(path, dtype=_np_dtype(dtype), mode="w+", shape=(tokens, hidden))
        where = "shared"
    return torch.from_numpy(array).view(dtype), where, array


@torch.no_grad()
def compute(
    run_trunk: Callable[[dict], object],
    features: dict[str, list],
    dtype: torch.dtype,
    batch_size: int,
    pad_id: int = 0,
    path: Path | None = None,
    scratch: Path | None = None,
) -> Store:
    """The states of every example: `run_trunk(batch)` returns the cached block's output for a
    right-padded batch of token columns (`features`: column -> one list per example; input_ids
    padded with `pad_id`, the others with 0). Batches are
    made of examples of similar length (little padding); each example is stored unpadded."""
    lengths = np.array([len(ids) for ids in features["input_ids"]], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    order = np.argsort(lengths, kind="stable")
    flat, layout, where, mapped = None, None, "ram", None
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size].tolist()
        width = int(lengths[rows].max())
        batch = {
            name: torch.tensor(
                [
                    [*values[r], *[pad_id if name == "input_ids" else 0] * (width - len(values[r]))]
                    for r in rows
                ]
            )
            for name, values in features.items()
        }
        batch["attention_mask"] = (
            torch.arange(width)[None] < torch.from_numpy(lengths[rows])[:, None]
        ).long()
        output = run_trunk(batch)
        layout = layout or Layout.of(output)
        hidden = layout.hidden(output).detach().to("cpu", dtype)
        if flat is None:
            flat, where, mapped = allocate(int(offsets[-1]), hidden.shape[-1], dtype, path, scratch)
        for i, row in enumerate(rows):
            flat[offsets[row] : offsets[row + 1]] = hidden[i, : lengths[row]]
    if flat is None:
        raise ValueError("trunk cache: an empty split")
    return Store(flat, offsets, layout, where, mapped)


# --------------------------------------------------------------------------------------------------
# the shared cache dir


def weights_digest(model_name: str, config: dict, named_params, depth: int) -> str:
    """A hash of what the trunk computes with: the model class and config (labels aside), the depth
    and every weight of the frozen part (`named_params`: (canonical name, tensor), any order)."""
    h = hashlib.blake2b(digest_size=16)
    settings = {k: v for k, v in config.items() if k not in CONFIG_NOISE}
    h.update(json.dumps([FORMAT, model_name, depth, settings], sort_keys=True, default=str).encode())
    for name, tensor in sorted(named_params, key=lambda item: item[0]):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def entry_key(weights: str, features: dict[str, list], max_length: int | None, dtype: torch.dtype) -> str:
    """The key of one split's entry: the trunk's weights digest, the split's token columns, max_length
    and the storage dtype."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{weights}:{max_length}:{dtype}".encode())
    for name in sorted(features):
        h.update(name.encode())
        for values in features[name]:
            h.update(np.asarray(values, dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()


def load(entry: Path) -> Store | None:
    """A complete entry of the shared dir, memory-mapped read-only (None when there is none)."""
    if not (entry / META).is_file():
        return None
    meta = json.loads((entry / META).read_text(encoding="utf-8"))
    dtype = getattr(torch, meta["dtype"])
    shape = tuple(meta["shape"])
    array = np.memmap(entry / STATES, dtype=_np_dtype(dtype), mode="c", shape=shape)  # copy-on-write
    layout = Layout(meta["items"], getattr(torch, meta["output_dtype"]))
    return Store(torch.from_numpy(array).view(dtype), np.load(entry / OFFSETS), layout, "shared", array)


def compute_shared(entry: Path, compute_into: Callable[[Path], Store]) -> Store:
    """Compute a split's entry into a temp dir beside `entry` and rename it into place; if another
    process got there first, read theirs. Returns the stored states, mapped from `entry`."""

    def write(tmp: Path) -> None:
        store = compute_into(tmp / STATES)
        if store.mapped is not None:
            store.mapped.flush()
        np.save(tmp / OFFSETS, store.offsets)
        meta = {
            "dtype": str(store.flat.dtype).removeprefix("torch."),
            "shape": list(store.flat.shape),
            "items": store.layout.items,
            "output_dtype": str(store.layout.dtype).removeprefix("torch."),
        }
        (tmp / META).write_text(json.dumps(meta), encoding="utf-8")

    try:
        publish_dir(entry, write)
    except OSError as e:
        if e.errno in DISK_ERRORS:
            raise UserError(
                CACHE_DIR_ENV,
                f"'{entry.parent}' that could not be written ({e.strerror or e})",
                "a writable directory with free space for the trunk cache (or unset it)",
            ) from None
        raise
    found = load(entry)
    if found is None:
        raise RuntimeError(f"trunk cache: {entry} was not written")
    return found
