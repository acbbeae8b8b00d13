"""Deep ensembles and model merging, over finished run dirs.

    hybridtune ensemble runs/a runs/b runs/c --combine mean_logits --out runs/ens   # K forwards
    hybridtune soup runs/a runs/b runs/c --greedy --out runs/soup                  # one model
    hybridtune merge-adapters runs/a runs/b --method cat --out runs/merged         # one adapter

- An **output ensemble** runs every member and combines their class distributions (mean of logits,
  mean of probabilities, majority vote, weighted mean). Members may differ in seed, strategy and even
  base model; they must share the label set. It is saved as a dir with `ensemble.json` (the manifest)
  and `members/<i>/` (each member's recipe, run.json and final/), and `eval` / `predict` / `serve`
  accept that dir like a run dir.
- A **soup** (Wortsman et al. 2022) averages the weights of members fine-tuned from the same base:
  uniform (all members) or greedy (members in order of validation score, each kept only if the
  validation metric does not drop). LoRA members are merged into their base first. The result is one
  plain model, saved as a normal run dir: single-model cost.
- **Adapter merging** combines LoRA members with peft's `add_weighted_adapter` (linear, cat, svd,
  ties, dare_ties, ...) into one adapter, saved as a normal peft run dir.

The package: `config` (the recipe section), `members` (members' recipes, a finished run loaded as
a member), `outputs` (output ensembles),
`shared` (a shared trunk at inference), `soups`, `merging` (peft adapter merging), `runs`
(`ensemble:` recipes) and `joint` (shared-trunk training). Everything public is importable from here, loaded on first use (PEP 562), so that
importing the package (the recipe schema imports `ensemble.config`) imports none of the modules
that train or load runs.

Classification runs only: a token-classification ensemble would need word-level alignment of the
members' sub-tokens, which this module does not do.
"""

from importlib import import_module

_WHERE = {
    "COMBINES": "config",
    "Ensemble": "outputs",
    "EnsembleConfig": "config",
    "JointMembers": "joint",
    "MANIFEST": "config",
    "MERGE_METHODS": "config",
    "Member": "members",
    "Replay": "shared",
    "SharedTrunk": "shared",
    "build": "outputs",
    "check_same_labels": "outputs",
    "check_weights": "config",
    "combine": "outputs",
    "frozen_trunk_depth": "joint",
    "headline_metrics": "outputs",
    "is_ensemble": "config",
    "load": "outputs",
    "load_member": "members",
    "member_logits": "outputs",
    "member_recipes": "members",
    "merge_adapters": "merging",
    "share_trunk": "shared",
    "softmax": "outputs",
    "soup": "soups",
    "split_frames": "outputs",
    "train": "runs",
    "train_joint": "joint",
    "trunk_depth": "shared",
    "y_true": "outputs",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'hybridtune.ensemble' has no attribute {name!r}")
    value = getattr(import_module(f"hybridtune.ensemble.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
