"""adapters: bottleneck adapters in every block (peft has none of this kind).

    adapters:
      method: houlsby         # houlsby: after attention and after the FFN | pfeiffer: after the FFN only
      reduction_factor: 16    # bottleneck = hidden size / reduction_factor
      non_linearity: swish    # relu | gelu | swish; default swish (houlsby), relu (pfeiffer)
      residual: true          # x + up(f(down(x))); false: up(f(down(x))) replaces the sublayer output

An adapter is down-projection -> non-linearity -> up-projection with a skip connection, initialised
near the identity (both projections ~ N(0, 1e-2) truncated at 2 std, zero biases: Houlsby et al.
2019, https://arxiv.org/abs/1902.00751, §2.1). Houlsby et al. put one after the attention's output
projection and one after the FFN's; Pfeiffer et al. 2020 (AdapterFusion,
https://arxiv.org/abs/2005.00247) keep only the one after the FFN. Both sit on the sublayer's output
projection, before the block's residual add and norm (adapter-transformers applies them after the
dropout; at evaluation the two are the same; Pfeiffer's variant there also re-uses the block's
LayerNorm around the adapter, which this one does not).

How they attach: a forward hook on each output projection, found in the blocks by `block_layout`
(BERT `attention.output.dense` / `output.dense`, GPT-2 `attn.c_proj` / `mlp.c_proj`, Llama
`o_proj` / `down_proj`). Hooks leave the model's module tree and parameter names untouched, so the
base (+ head) still saves as a plain transformers model and peft's target matching is unaffected; on
a peft layer (LoRA on the same projection) the hook sees the adapted output. The adapter modules live
in one ModuleDict on the transformers model, `bottleneck_adapters`, registered with the anatomy so
that the parameter table counts each in its block.

What trains: the adapters and a new head; the pretrained base is frozen except what `freeze` keeps
(Houlsby et al. also train the layer norms: `freeze: {trainable: [norms, head]}`).
Saved as final/adapters.safetensors + final/adapters.json next to the standard save of the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from hybridtune.errors import UserError
from hybridtune.model.anatomy import Anatomy, block_layout, live, unwrap
from hybridtune.strategy.base import Part

ATTR = "bottleneck_adapters"
WEIGHTS, CONFIG = "adapters.safetensors", "adapters.json"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}
DEFAULT_ACTIVATION = {"houlsby": "swish", "pfeiffer": "relu"}


class AdaptersConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and FFN; pfeiffer: after the FFN only"
    )
    reduction_factor: int = Field(16, ge=1, description="bottleneck size = hidden size / reduction_factor")
    non_linearity: Literal["relu", "gelu", "swish"] | None = Field(
        None, description="default: swish for houlsby, relu for pfeiffer (adapter-transformers' configs)"
    )
    residual: bool = Field(True, description="the adapter's own skip connection (near-identity at init)")
    init_std: float = Field(1e-2, gt=0, description="std of the projections' init (Houlsby et al.: 1e-2)")


class Bottleneck(nn.Module):
    def __init__(self, dim: int, bottleneck: int, config: AdaptersConfig):
        super().__init__()
        self.down, self.up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        self.act = ACTIVATIONS[config.non_linearity or DEFAULT_ACTIVATION[config.method]]()
        self.residual = config.residual
        std = config.init_std
        for layer in (self.down, self.up):
            nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(self.act(self.down(x)))
        return x + h if self.residual else h

    def hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        # a bound method: copy.deepcopy of the model re-binds it to the copied adapter
        return self(output)


def _positions(config: AdaptersConfig) -> tuple[str, ...]:
    return ("attn", "ffn") if config.method == "houlsby" else ("ffn",)


def _attach(model: nn.Module, config: AdaptersConfig, anatomy: Anatomy) -> nn.ModuleDict:
    """Create the adapters and hook them onto the output projections of every block."""
    base = unwrap(model)
    text_config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    dim = text_config.hidden_size
    bottleneck = max(dim // config.reduction_factor, 1)
    adapters = nn.ModuleDict()
    for i in range(anatomy.num_blocks):
        block = live(base.get_submodule(f"{anatomy.blocks_path}.{i}"))
        layout = block_layout(block)
        targets = {"attn": layout.attn_out, "ffn": layout.ffn_out}
        pair = nn.ModuleDict()
        for position in _positions(config):
            if targets[position] is None:
                raise UserError(
                    "adapters",
                    f"no {position} output projection found in block {i} of {type(base).__name__}",
                    "a transformer block with attention and feed-forward linear layers",
                )
            projection = live(block.get_submodule(targets[position]))
            weight = next(projection.parameters())
            pair[position] = Bottleneck(dim, bottleneck, config).to(weight.device, weight.dtype)
            projection.register_forward_hook(pair[position].hook)
        adapters[str(i)] = pair
    base.add_module(ATTR, adapters)
    for i in range(anatomy.num_blocks):  # each block's adapters count in that block's row
        anatomy.prefixes[f"{ATTR}.{i}"] = f"block.{i}"
    return adapters


def apply(model: nn.Module, config: AdaptersConfig, build) -> nn.Module:
    for p in model.parameters():  # the pretrained base is frozen; `freeze` may keep some of it
        if id(p) in build.pretrained:
            p.requires_grad_(False)
    _attach(model, config, build.anatomy)
    return model


def _state_keys(model: nn.Module) -> list[str]:
    prefix = next(n for n, m in model.named_modules() if n.split(".")[-1] == ATTR) + "."
    return [k for k in model.state_dict() if k.startswith(prefix)]


def save(model: nn.Module, config: AdaptersConfig, out_dir: Path) -> list[str]:
    adapters = getattr(unwrap(model), ATTR)
    save_file({k: v.detach().contiguous() for k, v in adapters.state_dict().items()}, out_dir / WEIGHTS)
    (out_dir / CONFIG).write_text(json.dumps(config.model_dump(), indent=2) + "\n", encoding="utf-8")
    return _state_keys(model)


def restore(model: nn.Module, config: AdaptersConfig, in_dir: Path) -> nn.Module:
    path = in_dir / WEIGHTS
    if not path.is_file():
        raise UserError(str(in_dir), f"no {WEIGHTS}", "the adapter weights saved with the run")
    adapters = getattr(unwrap(model), ATTR, None)
    if adapters is None:
        adapters = _attach(model, config, Anatomy.of(model))
    adapters.load_state_dict(load_file(path, device=str(next(adapters.parameters()).device)))
    return model


PART = Part(
    key="adapters",
    config=AdaptersConfig,
    apply=apply,
    save=save,
    restore=restore,
    summary="bottleneck adapters in every block (Houlsby, Pfeiffer)",
)
