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

The package: `config` (the recipe section, members' recipes), `outputs` (output ensembles),
`shared` (a shared trunk at inference), `soups`, `merging` (peft adapter merging), `runs`
(`ensemble:` recipes) and `joint` (shared-trunk training). Everything public is re-exported here.

Classification runs only: a token-classification ensemble would need word-level alignment of the
members' sub-tokens, which this module does not do.
"""

from hybridtune.ensemble.config import (
    COMBINES,
    MANIFEST,
    MERGE_METHODS,
    EnsembleConfig,
    check_weights,
    is_ensemble,
    member_recipes,
)
from hybridtune.ensemble.joint import JointMembers, frozen_trunk_depth, train_joint
from hybridtune.ensemble.merging import merge_adapters
from hybridtune.ensemble.outputs import (
    Ensemble,
    Member,
    build,
    check_same_labels,
    combine,
    headline_metrics,
    load_member,
    member_logits,
    softmax,
    split_frames,
    y_true,
)
from hybridtune.ensemble.runs import train
from hybridtune.ensemble.shared import Replay, SharedTrunk, share_trunk, trunk_depth
from hybridtune.ensemble.soups import soup

__all__ = [
    "COMBINES",
    "MANIFEST",
    "MERGE_METHODS",
    "Ensemble",
    "EnsembleConfig",
    "JointMembers",
    "Member",
    "Replay",
    "SharedTrunk",
    "build",
    "check_same_labels",
    "check_weights",
    "combine",
    "frozen_trunk_depth",
    "headline_metrics",
    "is_ensemble",
    "load_member",
    "member_logits",
    "member_recipes",
    "merge_adapters",
    "share_trunk",
    "softmax",
    "soup",
    "split_frames",
    "train",
    "train_joint",
    "trunk_depth",
    "y_true",
]
