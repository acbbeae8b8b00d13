"""Tokenized splits, shared by the runs of an ensemble (in the process) and of a compare (on disk).

A split's encoding (what the task's `encode` returns) is keyed by everything it depends on: the
task and its recipe sections that shape the encoding (`data`, `prompt`, the model name), the
tokenizer itself (its vocabulary, normalizer, pre-tokenizer, post-processor, chat template and
special tokens; not the truncation state a previous call left on it), the label space and the
split's rows. The key is the same for every strategy and seed of one data set and tokenizer, so:

- the members of an `ensemble:` run (trained one after the other in one process) encode each split
  once: a small in-process table holds the last few encodings (datasets are immutable: sharing
  the object is safe);
- with `HYBRIDTUNE_CACHE_DIR` set (compare sets it for its runs), an encoding is also saved under
  `<dir>/tokens/<key>/` (datasets' arrow files, written under a temp name and renamed when complete)
  and the next run loads it into memory instead of tokenizing.

An entry also holds what the encoding kept of the split's texts (the truncation report's counts,
data/long_texts.py), so a run that reads its splits from the cache reports them too. `data` in
the key covers `long_texts`, `stride` and `pool`.

Why not datasets' own fingerprint cache: it keys a `.map` on the function's pickled bytes and the
source dataset's fingerprint; our splits are built from pandas frames (no source fingerprint) and
the tokenizer's pickled state changes when a call sets its truncation, so the same work would miss.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import pandas as pd

from hybridtune import __version__
from hybridtune.rundir import publish_dir, shared_dir

FORMAT = 2  # bump when what an entry holds changes (2: the truncation counts, counts.json)
COUNTS = "counts.json"  # in an entry: what the encoding kept of the split's texts (data/long_texts.py)
MEMO_SIZE = 8  # encodings kept in the process (3 splits x a couple of tasks)
_memo: OrderedDict[str, object] = OrderedDict()


def tokenizer_digest(tokenizer) -> str:
    """What the tokenizer computes with, not the state a call left on it (truncation, padding)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:  # a slow (python) tokenizer: its vocabulary
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "added": sorted(str(t) for t in tokenizer.get_added_vocab()),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "sides": [getattr(tokenizer, "padding_side", None), getattr(tokenizer, "truncation_side", None)],
        "model_max_length": getattr(tokenizer, "model_max_length", None),
        "inputs": list(getattr(tokenizer, "model_input_names", [])),
    }
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()


def frame_digest(frame: pd.DataFrame) -> str:
    h = hashlib.blake2b(digest_size=16)
    for column in frame.columns:
        h.update(str(column).encode())
        h.update(json.dumps(frame[column].tolist(), default=str).encode())
    return h.hexdigest()


def split_key(recipe, tokenizer_hash: str, labels, frame: pd.DataFrame) -> str:
    settings = {
        "format": FORMAT,
        "version": __version__,
        "task": recipe.task,
        "model": recipe.model.name,
        "data": recipe.data.model_dump(mode="json"),
        "prompt": recipe.prompt.model_dump(mode="json") if recipe.prompt is not None else None,
        "tokenizer": tokenizer_hash,
        "labels": [repr(getattr(labels, "values", None)), repr(getattr(labels, "names", None))],
        "rows": frame_digest(frame),
    }
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()


def _load(entry: Path) -> tuple | None:
    import datasets

    if not (entry / "dataset_info.json").is_file():
        return None
    counts = json.loads((entry / COUNTS).read_text()) if (entry / COUNTS).is_file() else None
    # in memory: .map never writes here
    return datasets.load_from_disk(str(entry), keep_in_memory=True), counts


def _save(entry: Path, dataset, counts: dict | None) -> None:
    def write(tmp: Path) -> None:
        dataset.save_to_disk(str(tmp))
        (tmp / COUNTS).write_text(json.dumps(counts))

    try:
        publish_dir(entry, write)
    except OSError:
        pass  # a cache that cannot be written is no cache: the run goes on with its own encoding


def encode_splits(
    task, recipe, splits, tokenizer, labels, names=("train", "validation", "test"), counted: bool = False
) -> tuple:
    """({split: task.encode(splits[split], ...)}, [the splits read from a cache], {split: what the
    encoding kept of the texts, or None for a task that does not count (data/long_texts.py)}).
    `counted`: the task counts, with `encode_counted` (its `long_texts` capability, tasks/base.py)."""
    tok = tokenizer_digest(tokenizer)
    root = shared_dir()
    out, cached, counts = {}, [], {}
    for name in names:
        frame = splits[name]
        key = split_key(recipe, tok, labels, frame)
        found = _memo.get(key)
        entry = root / "tokens" / key if root is not None else None
        if found is None and entry is not None:
            found = _load(entry)
        if found is None:
            if counted:
                found = task.encode_counted(frame, tokenizer, labels, recipe.data)
            else:
                found = task.encode(frame, tokenizer, labels, recipe.data), None
            if entry is not None:
                _save(entry, *found)
        else:
            cached.append(name)
        _memo[key] = found
        _memo.move_to_end(key)
        while len(_memo) > MEMO_SIZE:
            _memo.popitem(last=False)
        out[name], counts[name] = found
    return out, cached, counts
