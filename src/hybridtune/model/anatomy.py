"""A generic map of any HF transformer: embeddings, blocks[i], final norm, head.

Freezing, layer-wise learning rates, stages and the per-layer parameter report are all expressed
against this map, so they work the same for BERT, RoBERTa, DistilBERT, MPNet, GPT-2, Llama, Qwen,
SmolLM... without a table per architecture. The rules, in order:

- blocks: the `nn.ModuleList` of identical modules holding the most parameters (`encoder.layer`,
  `transformer.h`, `model.layers`, ...);
- head: parameters outside the backbone (`model.base_model`): classifier, score, lm_head, pre_classifier;
- inside the backbone, before the first block: embeddings; after the last block: norms are the
  final norm, embeddings (e.g. MPNet's relative attention bias) stay embeddings, anything else
  (BERT's pooler) feeds the head and counts as head.

Names are matched by module prefix, so the map made on the plain model still places the parameters of
a PEFT-wrapped one (`base_model.model.` is stripped; LoRA's `lora_A` sits under its block's prefix).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

# PeftModel -> tuner (LoraModel, ...) -> model; prompt learning: PeftModel -> model
PEFT_PREFIX = re.compile(r"^base_model\.(model\.)?")
MODULES_TO_SAVE = re.compile(r"(?<=\.)(modules_to_save\.[^.]+|original_module)\.")
SLOTS_FIXED = ("embeddings", "final_norm", "head")


def is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain transformers model under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def canonical(name: str) -> str:
    """A parameter name of a PEFT-wrapped model, as it reads on the plain model (also inside peft's
    `modules_to_save` wrapper: its trained copy and the original both read as the module itself)."""
    return MODULES_TO_SAVE.sub("", PEFT_PREFIX.sub("", name))


@dataclass
class Anatomy:
    blocks_path: str  # e.g. "bert.encoder.layer"
    num_blocks: int
    prefixes: dict[str, str] = field(default_factory=dict)  # module prefix -> slot

    @classmethod
    def of(cls, model: nn.Module) -> Anatomy:
        model = unwrap(model)
        blocks_path, blocks = _find_blocks(model)
        prefix = getattr(model, "base_model_prefix", "")
        backbone = (
            prefix + "." if prefix and hasattr(model, prefix) and getattr(model, prefix) is not model else ""
        )
        owners = {name: module for name, module in model.named_modules()}
        slots: dict[str, str] = {f"{blocks_path}.{i}": f"block.{i}" for i in range(len(blocks))}
        seen_block = False
        for name, _ in model.named_parameters():
            module_name = name.rsplit(".", 1)[0] if "." in name else ""
            if name.startswith(blocks_path + "."):
                seen_block = True
                continue
            module = owners.get(module_name, model)
            if backbone and not name.startswith(backbone):
                slot = "head"
            elif not seen_block or isinstance(module, nn.Embedding):
                slot = "embeddings"
            elif is_norm(module):
                slot = "final_norm"
            else:
                slot = "head"
            slots[module_name or name] = slot
        return cls(blocks_path=blocks_path, num_blocks=len(blocks), prefixes=slots)

    def slot_of(self, param_name: str) -> str:
        """'embeddings' | 'block.<i>' | 'final_norm' | 'head' | 'added' (e.g. a soft prompt outside the model)."""
        name = canonical(param_name)
        best, slot = -1, "added"
        for prefix, s in self.prefixes.items():
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, slot = len(prefix), s
        return slot

    def block_of(self, param_name: str) -> int | None:
        slot = self.slot_of(param_name)
        return int(slot.split(".")[1]) if slot.startswith("block.") else None

    @property
    def slots(self) -> list[str]:
        """All slots bottom to top, the order of every per-layer table."""
        return ["embeddings", *(f"block.{i}" for i in range(self.num_blocks)), "final_norm", "head"]


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__}: no stack of transformer blocks (nn.ModuleList) found")
    return best[1], best[2]


def count(params: list[tuple[str, torch.nn.Parameter]]) -> tuple[int, int]:
    """(total, trainable) elements."""
    total = sum(p.numel() for _, p in params)
    return total, sum(p.numel() for _, p in params if p.requires_grad)


# --------------------------------------------------------------------------------------------------
# inside a block: where attention and the feed-forward network write their output

# BERT `attention`, GPT-2 `attn`, Llama `self_attn`, DistilBERT `attention`
ATTENTION_HINTS = ("attn", "attention")
KEY_NAMES = ("key", "k_proj", "k_lin", "k", "wk")
VALUE_NAMES = ("value", "v_proj", "v_lin", "v", "wv")
FUSED_QKV_NAMES = ("c_attn", "query_key_value", "Wqkv", "qkv_proj", "qkv")


def live(module: nn.Module) -> nn.Module:
    """The module that actually runs: peft's `ModulesToSaveWrapper` forwards to its active trainable copy."""
    while hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        module = module.modules_to_save[module.active_adapters[0]]
    return module


def linear_layers(module: nn.Module, prefix: str = ""):
    """(path, layer) of the linear-like layers under `module`, in registration order (= forward order in
    transformers' code): nn.Linear, GPT-2's Conv1D, or a peft layer wrapping one (a leaf: its lora_A/B
    are not the model's projections)."""
    for name, child in module.named_children():
        child = live(child)
        path = prefix + name
        if isinstance(child, nn.Linear) or type(child).__name__ == "Conv1D" or hasattr(child, "base_layer"):
            yield path, child
        else:
            yield from linear_layers(child, path + ".")


@dataclass
class BlockLayout:
    """Block-relative paths of the projections adapters and IA3 attach to (None where not found)."""

    # the attention's output projection (BERT attention.output.dense, GPT-2 attn.c_proj)
    attn_out: str | None
    # the feed-forward network's output projection (output.dense, mlp.c_proj, mlp.down_proj)
    ffn_out: str | None
    keys: list[str]  # key and value projections, or the fused qkv projection
    values: list[str]


def block_layout(block: nn.Module) -> BlockLayout:
    """Found by shape, not by a table per architecture: the first child named like attention is the
    self-attention, its last linear layer the output projection; the last linear layer outside any
    attention child is the FFN's output (down) projection."""
    block = live(block)
    children = list(block.named_children())
    attention = next((n for n, _ in children if any(h in n.lower() for h in ATTENTION_HINTS)), None)
    in_attn = list(linear_layers(live(block.get_submodule(attention)), attention + ".")) if attention else []
    outside = [
        (p, m)
        for n, c in children
        if not any(h in n.lower() for h in ATTENTION_HINTS)
        for p, m in linear_layers(live(c), n + ".")
    ]
    leaf = {p: p.rsplit(".", 1)[-1] for p, _ in in_attn}
    keys = [p for p, name in leaf.items() if name in KEY_NAMES]
    values = [p for p, name in leaf.items() if name in VALUE_NAMES]
    if not keys and not values:
        keys = values = [p for p, name in leaf.items() if name in FUSED_QKV_NAMES]
    return BlockLayout(
        attn_out=in_attn[-1][0] if len(in_attn) > 1 else None,
        ffn_out=outside[-1][0] if outside else None,
        keys=keys,
        values=values,
    )
