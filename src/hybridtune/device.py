"""Moving inputs to a model's device (below every layer that runs a model: tasks, generation, inference)."""

from __future__ import annotations

import torch


def to_device(batch: dict, dev: torch.device) -> dict:
    """Inputs to the model's device: pinned host memory and non-blocking copies on CUDA."""
    if dev.type != "cuda":
        return {k: v.to(dev) for k, v in batch.items()}
    return {k: v.pin_memory().to(dev, non_blocking=True) for k, v in batch.items()}
