"""What the recipe alone says about the frozen-trunk cache (train/trunk_cache.py): `train.trunk_cache:
on` is refused while the recipe is read when its task, a part or a shared-trunk ensemble rules the
cache out; what the model adds (parameters, hooks in the frozen blocks) is found at prepare."""

from __future__ import annotations

from hybridtune import strategy, tasks

EXPECTED = (
    "a {tasks} run whose embeddings and at least its bottom block are frozen, with no peft / "
    "adapter / soft prompt parameter in them, no fusion, no mixed objective and no shared-trunk "
    "ensemble (or train.trunk_cache: auto | off)"
)


def expected() -> str:
    """EXPECTED, naming the tasks whose spec says `trunk_cacheable`."""
    return EXPECTED.format(tasks=" or ".join(n for n in tasks.names() if tasks.spec(n).trunk_cacheable))


def static_reason(recipe) -> str | None:
    """Why the recipe alone rules the cache out (None: its model decides). The task says in its
    spec (`trunk_cacheable`); the parts say for themselves (their `trunk_cache` hook: fusion, the
    mixed objective); what they add to the model (parameters, forward hooks) is found on the model
    by `frozen_depth`."""
    if not tasks.spec(recipe.task).trunk_cacheable:
        return f"task {recipe.task}"
    reason = strategy.trunk_cache_reason(recipe)
    if reason is not None:
        return reason
    if recipe.ensemble is not None and recipe.ensemble.shared_trunk:
        return "ensemble.shared_trunk (its members already share one trunk forward)"
    return None
