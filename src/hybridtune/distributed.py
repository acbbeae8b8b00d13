"""Multi-process training on an existing engine: `torchrun --nproc_per_node N -m hybridtune train ...`
or `accelerate launch -m hybridtune train ...`.

transformers.Trainer (through accelerate) already does the work: it reads the launcher's environment
(RANK, WORLD_SIZE, LOCAL_RANK), sets up the process group (NCCL on GPUs, gloo on CPUs), wraps the
model in DDP (or FSDP / DeepSpeed from an accelerate config) and shards the batches. What a run adds
is only who writes: every process prepares and trains; rank 0 names the run dir, writes the run
files, checkpoints (Trainer's own rule), final/, eval.json and report.json.
"""

from __future__ import annotations

import torch.distributed as dist


def setup(args) -> None:
    """Let TrainingArguments set up the devices (and, under a launcher, the process group) now."""
    _ = args.device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def broadcast(value: str) -> str:
    """Rank 0's value, on every process."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()
