"""Spectrum's data-free score of the pretrained weight matrices: the `freeze.spectrum` selector's helper.

    freeze:
      spectrum: {share: 0.25}              # the top quarter of each matrix type trains (+ the head)
      spectrum: {share: 0.25, unit: block} # the top quarter of the blocks trains, whole

Spectrum (Hartford et al. 2024, "Spectrum: Targeted Training on Signal to Noise Ratio",
https://arxiv.org/abs/2406.06623) trains only the layers whose weights carry the most signal: each
weight matrix W (n x m) of the blocks is scored by the signal-to-noise ratio of its singular values
S, and within each matrix type (query, key, value, output, up, down, ...) the top share trains.
The score is the one of the authors' code (github.com/cognitivecomputations/spectrum, spectrum.py):

    sigma = IQR(S) / 1.349                      # a robust noise scale (the IQR of a normal is 1.349 sigma)
    threshold = sigma * (1 + sqrt(min(n, m) / max(n, m)))   # the Marchenko-Pastur bulk edge
    snr = sum(S[S > threshold]) / sum(S[S <= threshold])    # noise 1.0 when no value is below
    score = snr / max(S)

Two choices of ours: a share of a type's k matrices is round-half-up(share x k), at least one (the
rule of every fraction of blocks, model/depth.py; Spectrum floors, which names none of a type for a
small share of a shallow model), and ties go to the lower block. A chosen matrix trains with its
bias (Spectrum's list names modules, which match as prefixes). `unit: block` ranks the blocks by
the mean of their matrices' scores, each divided by the best score of its type (types differ in
scale), and trains the chosen blocks whole.

The scores cost one SVD per matrix (on one CPU thread MiniLM's 36 take 0.6-1.2 s, SmolLM2-135M's
210 take 34 s; docs/strategies.md), so
they are cached per model: `$HYBRIDTUNE_CACHE/spectrum/<digest>.json` (default ~/.cache/hybridtune),
named by a digest of the matrices' names, shapes and contents, so another checkpoint at the same
path never reads a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from hybridtune import durable
from hybridtune.model.anatomy import Anatomy, canonical, linear_layers, unwrap
from hybridtune.model.depth import fraction_blocks
from hybridtune.model.gguf import cache_root

IQR_OF_NORMAL = 1.349  # the interquartile range of a standard normal distribution
VERSION = "1"  # of the score: part of the cache key, so a changed formula never reads old entries


class SpectrumConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="the share of each matrix type (or of the blocks) that trains, in (0, 1]",
    )
    unit: Literal["matrix", "block"] = Field(
        "matrix",
        description="matrix: the top share of each matrix type; block: the top share of the blocks, whole",
    )


def snr_score(weight: torch.Tensor) -> float:
    """Spectrum's score of one weight matrix (see the module docstring)."""
    s = torch.linalg.svdvals(weight.detach().float())
    if float(s[0]) == 0.0:
        return 0.0  # an all-zero matrix carries no signal (Spectrum's code would divide 0 by 0)
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / IQR_OF_NORMAL
    n, m = weight.shape[-2:]
    threshold = sigma * (1 + math.sqrt(min(n, m) / max(n, m)))
    above = s > threshold
    signal = float(s[above].sum()) if above.any() else 0.0
    noise = float(s[~above].sum()) if (~above).any() else 1.0
    snr = signal / noise if noise != 0 else math.inf
    return snr / float(s[0])


def matrices(model: nn.Module, anatomy: Anatomy) -> list[tuple[str, str, int, nn.Parameter]]:
    """(parameter name, type, block, weight) of each linear layer's weight inside the blocks; the type
    is its path inside the block (`attention.self.query`, `mlp.down_proj`), which is the same in every block."""
    plain = unwrap(model)
    blocks = plain.get_submodule(anatomy.blocks_path)
    out = []
    for b, block in enumerate(blocks):
        for path, layer in linear_layers(block):
            weight = getattr(layer, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.ndim == 2:
                out.append((f"{anatomy.blocks_path}.{b}.{path}.weight", path, b, weight))
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names.get(id(w), name), kind, b, w) for name, kind, b, w in out]


def _digest(found: list[tuple[str, str, int, nn.Parameter]]) -> str:
    h = hashlib.blake2b(VERSION.encode(), digest_size=16)
    for name, _, _, weight in found:
        h.update(f"{canonical(name)}:{tuple(weight.shape)}:{weight.dtype};".encode())
        h.update(weight.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def scores(found: list[tuple[str, str, int, nn.Parameter]]) -> tuple[dict[str, float], dict[str, Any]]:
    """{parameter name: score} of the matrices `found` (`matrices`), from the cache when it has them,
    and {seconds, from_cache, cache}: where they came from and what computing them took."""
    started = time.perf_counter()
    entry = cache_root() / "spectrum" / f"{_digest(found)}.json"
    cached = _read(entry)
    if cached is not None and set(cached) == {canonical(n) for n, *_ in found}:
        out = {name: cached[canonical(name)] for name, *_ in found}
        from_cache = True
    else:
        out = {name: snr_score(weight) for name, _, _, weight in found}
        from_cache = False
        _write(entry, {canonical(n): s for n, s in out.items()})
    info = {"seconds": round(time.perf_counter() - started, 3), "from_cache": from_cache, "cache": str(entry)}
    return out, info


def _read(entry: Path) -> dict[str, float] | None:
    try:
        data = json.loads(entry.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and all(isinstance(v, int | float) for v in data.values())
    return data if ok else None


def _write(entry: Path, data: dict[str, float]) -> None:
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        durable.write_bytes(entry, json.dumps(data, indent=1).encode())
    except OSError:
        pass  # a cache that cannot be written is no cache: the next run scores again


def _top(items: list[tuple[Any, float, int]], share: float) -> list[Any]:
    """The keys of the top round-half-up(share x len) items by score, ties to the lower block."""
    ranked = sorted(items, key=lambda item: (-item[1], item[2]))
    return [key for key, _, _ in ranked[: fraction_blocks(len(items), share)]]


def choose(model: nn.Module, anatomy: Anatomy, config: SpectrumConfig) -> tuple[set[str], dict]:
    """The parameter names that train (the chosen matrices, or every parameter of the chosen
    blocks) and the report `hybridtune params` shows: each matrix's score and whether it was chosen."""
    found = matrices(model, anatomy)
    score, info = scores(found)
    by_type: dict[str, list[tuple[str, float, int]]] = {}
    for name, kind, block, _ in found:
        by_type.setdefault(kind, []).append((name, score[name], block))
    rows = [
        {"name": canonical(name), "type": kind, "block": block, "score": score[name]}
        for name, kind, block, _ in found
    ]
    report: dict[str, Any] = {"unit": config.unit, "share": config.share, **info, "types": list(by_type)}
    if config.unit == "matrix":
        chosen = {name for items in by_type.values() for name in _top(items, config.share)}
        for row, (name, *_) in zip(rows, found, strict=True):
            row["chosen"] = name in chosen
        report["matrices"] = rows
        # a chosen layer trains whole, its bias too (Spectrum's list names modules, matched as prefixes)
        names = {n for n, _ in model.named_parameters()}
        return chosen | {n.removesuffix("weight") + "bias" for n in chosen} & names, report
    best = {kind: max(s for _, s, _ in items) or 1.0 for kind, items in by_type.items()}
    relative: dict[int, list[float]] = {}
    for name, kind, block, _ in found:
        relative.setdefault(block, []).append(score[name] / best[kind])
    block_scores = [(b, sum(v) / len(v), b) for b, v in sorted(relative.items())]
    picked = set(_top(block_scores, config.share))
    report["matrices"] = [{**row, "chosen": row["block"] in picked} for row in rows]
    report["blocks"] = [{"block": b, "score": s, "chosen": b in picked} for b, s, _ in block_scores]
    names = {n for n, _ in model.named_parameters() if anatomy.block_of(n) in picked}
    return names, report
