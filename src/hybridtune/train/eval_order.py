"""Trainer's validation batches, every example sorted by length (the test report has its own
length-ordered loop: tasks/classification.py `logits_of`).

Trainer's length-grouped sampler (`train.group_by_length`, on by default) sorts within mega-batches
of min(n // (4 x batch), 50) batches, at least one. At the default eval batch of 128 on a validation
split of 853 texts that is one batch per mega-batch: no grouping at all, and each batch is padded to
its longest text (52-65 tokens on Rotten Tomatoes, whose mean is 26), so a validation cost twice
what its tokens need. Evaluation needs no shuffling: the metrics pool the predictions in whatever
order they come (a chunked split's windows too, engine.py `prediction_step`), so every example is
taken in order of length, longest first (the biggest batch first, as transformers does, so a batch
that does not fit in memory fails at once).
"""

from __future__ import annotations

from torch.utils.data import Sampler


class LengthOrder(Sampler[int]):
    """The indices of `lengths`, longest first (ties in index order)."""

    def __init__(self, lengths: list[int]):
        self.order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)
