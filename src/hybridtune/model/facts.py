"""What can be known of a model before any strategy part applies: its depth, a block's linear layers,
its dropout, its head's pretrained linear layers. `hybridtune search` reads them from the model's
config and its checkpoint's tensor names (the task's model built on the meta device, no weights
loaded: search/setup.py); run.prepare from the loaded model. Both with `facts_of`, so a part's
`model_check` (strategy/base.py) judges a trial's recipe at search time as the run would judge it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from hybridtune.model.anatomy import Anatomy, unwrap

DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass(frozen=True)
class ModelFacts:
    blocks: int  # the number of transformer blocks (Anatomy.num_blocks)
    linear: tuple[str, ...] = ()  # a block's nn.Linear layers, named relative to the block
    dropout: float = 0.0  # the largest dropout probability (dropout_rates); 0: none anywhere
    # the head slot's Linear layers with a pretrained weight of their own: BERT's pooler, an untied
    # lm_head; not a new classifier, not an lm_head tied to the embeddings (model/anatomy.py's slots)
    head_linear: tuple[str, ...] = ()


def dropout_rates(model: nn.Module) -> dict[str, float]:
    """The dropout probabilities above 0: the dropout modules' (peft's lora_dropout included, on a
    peft model) and the model config's (Llama's attention dropout is an argument, not a module)."""
    out = {name: m.p for name, m in model.named_modules() if isinstance(m, DROPOUT) and m.p > 0}
    config = getattr(unwrap(model), "config", None)
    for key, value in (config.to_dict() if config is not None else {}).items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ("dropout" in key or "pdrop" in key) and number and value > 0:
            out[f"config.{key}"] = float(value)
    return out


def facts_of(model: nn.Module, new: Collection[str] = ()) -> ModelFacts:
    """The facts of a model (a plain transformers one, on any device, the meta device included);
    `new`: the names of its parameters the checkpoint did not have (a new classifier)."""
    anatomy = Anatomy.of(model)
    plain = unwrap(model)
    block = plain.get_submodule(f"{anatomy.blocks_path}.0")
    linear = tuple(name for name, m in block.named_modules() if isinstance(m, nn.Linear))
    tied = {id(m.weight) for m in plain.modules() if isinstance(m, nn.Embedding)}
    head = tuple(
        name
        for name, m in plain.named_modules()
        if isinstance(m, (nn.Linear, Conv1D))
        and anatomy.slot_of(f"{name}.weight") == "head"
        and f"{name}.weight" not in new
        and id(m.weight) not in tied
    )
    return ModelFacts(anatomy.num_blocks, linear, max(dropout_rates(model).values(), default=0.0), head)
