"""What a strategy trains: a per-layer table of total / trainable parameters.

One row per anatomy slot (embeddings, block 0..L-1, final norm, head), bottom to top; `added` counts
parameters the strategy created (LoRA matrices, adapters, a soft prompt, peft's copy of the head)
inside that slot; parameters living outside the model's own modules (a prefix encoder) get a row of
their own. Totals are over unique tensors, as peft's `get_nb_trainable_parameters` counts them.
"""

from __future__ import annotations

from torch import nn

from hybridtune.model.anatomy import Anatomy


def param_table(
    model: nn.Module,
    anatomy: Anatomy,
    base_ids: set[int] | None = None,
    lrs: dict[str, tuple[float, str]] | None = None,
) -> dict:
    """Rows bottom to top; `lr` per row: the learning rate of the parameters in `lrs` (those the optimizer
    holds), a [low, high] range when they differ."""
    rows = {
        slot: {"slot": slot, "total": 0, "trainable": 0, "added": 0} for slot in [*anatomy.slots, "added"]
    }
    row_lrs: dict[str, set[float]] = {slot: set() for slot in rows}
    for name, p in model.named_parameters():
        slot = anatomy.slot_of(name)
        row = rows[slot]
        row["total"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0
        row["added"] += p.numel() if base_ids is not None and id(p) not in base_ids else 0
        if lrs is not None and name in lrs:
            row_lrs[slot].add(lrs[name][0])
    table = [r for r in rows.values() if r["total"] or r["slot"] not in ("final_norm", "added")]
    total = sum(r["total"] for r in table)
    trainable = sum(r["trainable"] for r in table)
    for r in table:
        r["trainable_pct"] = round(100 * r["trainable"] / r["total"], 4) if r["total"] else 0.0
        found = sorted(row_lrs[r["slot"]])
        r["lr"] = None if not found else found[0] if len(found) == 1 else [found[0], found[-1]]
    return {
        "rows": table,
        "total": total,
        "trainable": trainable,
        "trainable_pct": round(100 * trainable / total, 4) if total else 0.0,
    }
