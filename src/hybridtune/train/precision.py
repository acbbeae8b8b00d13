"""Precision: `auto` resolves to bf16 where the hardware runs bf16 matmuls natively, and the same
autocast for the passes Trainer does not run (test report, eval, predict). Light on imports (torch
only): the CLI's commands that do not train import it too."""

from __future__ import annotations

import torch


def native_bf16() -> bool:
    """True where bf16 matmuls run natively: CUDA GPUs that support it, CPUs with AVX512-BF16 / AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


def autocast(precision: str):
    """The recipe's precision outside Trainer (test report, eval, predict): bf16 autocast where it
    resolves to bf16, as Trainer's own training and validation passes run; a no-op for fp32."""
    import contextlib

    if resolve_precision(precision) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
