"""The families of the search space: each whole strategy (full fine-tuning, freezing, BitFit, Spectrum,
LoRA / DoRA / IA3, adapters, soft prompt + LoRA, LLRD, staged unfreezing), its settings with their
default ranges, and the recipe sections a trial of it makes (`strategy_keys`). docs/search.md's
table "The default space" is this module."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from hybridtune.search.params import param, share_to_blocks

LR = param(float, gt=0, lt=1)
SHARE = param(float, gt=0, le=1)


class Family(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, arbitrary_types_allowed=True)


# ---- the families: each one's settings and what a trial's values make of a recipe ----------------
# lrs per family: where the example recipes of recipes/ (and the papers they cite) put them


class Full(Family):
    """Full fine-tuning: every parameter trains."""

    lr: LR = {"low": 1e-5, "high": 1e-4, "log": True}


class FreezeTop(Family):
    """Only the top share of the blocks (and the head) train."""

    lr: LR = {"low": 3e-5, "high": 1e-3, "log": True}
    share: SHARE = {"low": 0.15, "high": 0.5}


class FreezeBottom(Family):
    """The embeddings and the bottom share of the blocks are frozen; the rest trains."""

    lr: LR = {"low": 2e-5, "high": 3e-4, "log": True}
    share: SHARE = {"low": 0.3, "high": 0.85}


class BitFit(Family):
    """Only the biases and the head train (Ben Zaken et al. 2022)."""

    lr: LR = {"low": 3e-4, "high": 1e-2, "log": True}


class Spectrum(Family):
    """Spectrum (Hartford et al. 2024): the top share of each weight-matrix type by the SNR of its
    singular values trains (data-free), with the head."""

    lr: LR = {"low": 3e-5, "high": 3e-4, "log": True}
    share: SHARE = [0.125, 0.25, 0.5]


class Lora(Family):
    """LoRA (Hu et al. 2021); `dora` the same settings with DoRA's magnitude (Liu et al. 2024).
    `layer_share`: LoRA only in the top share of the blocks (peft's layers_to_transform)."""

    lr: LR = {"low": 1e-4, "high": 3e-3, "log": True}
    r: param(int, ge=1) = [4, 8, 16]
    lora_alpha: param(int, ge=1) = [8, 16, 32]
    lora_dropout: param(float, ge=0, lt=1) = 0.1
    target_modules: param(str, allowed=("auto", "all-linear")) = ["auto", "all-linear"]
    layer_share: SHARE = [0.5, 1.0]


class IA3(Family):
    """IA3 (Liu et al. 2022): learned rescaling vectors; a larger lr than LoRA."""

    lr: LR = {"low": 1e-3, "high": 3e-2, "log": True}


class Adapters(Family):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020: after the FFN only)."""

    lr: LR = {"low": 1e-4, "high": 3e-3, "log": True}
    method: param(str, allowed=("houlsby", "pfeiffer")) = ["houlsby", "pfeiffer"]
    reduction_factor: param(int, ge=1) = [8, 16, 32]


class SoftPromptLora(Family):
    """A soft prompt (Lester et al. 2021) and LoRA in one model."""

    lr: LR = {"low": 1e-4, "high": 3e-3, "log": True}
    num_virtual_tokens: param(int, ge=1) = [5, 10, 20]
    r: param(int, ge=1) = [4, 8]
    lora_alpha: param(int, ge=1) = 16


class Llrd(Family):
    """Layer-wise lr decay (Clark et al. 2020; Sun et al. 2019): each block below at decay x the lr."""

    lr: LR = {"low": 3e-5, "high": 3e-4, "log": True}
    layer_decay: param(float, gt=0, le=1) = {"low": 0.6, "high": 0.95}


class Staged(Family):
    """Gradual unfreezing from the top (ULMFiT, Howard & Ruder 2018): the head for a share of the run,
    then the top half of the blocks, then everything; discriminative lrs by layer decay."""

    lr: LR = {"low": 5e-5, "high": 5e-4, "log": True}
    stage_fraction: param(float, gt=0, lt=0.5) = [0.1, 0.2]
    layer_decay: param(float, gt=0, le=1) = [0.385, 0.8, 1.0]


FAMILIES: dict[str, type[Family]] = {
    "full": Full,
    "freeze_top": FreezeTop,
    "freeze_bottom": FreezeBottom,
    "bitfit": BitFit,
    "spectrum": Spectrum,
    "lora": Lora,
    "dora": Lora,
    "ia3": IA3,
    "adapters": Adapters,
    "soft_prompt_lora": SoftPromptLora,
    "llrd": Llrd,
    "staged": Staged,
}


def _layers(share: float, blocks: int) -> list[int] | None:
    """The top share of the blocks (None = all)."""
    k = share_to_blocks(share, blocks)
    return None if k >= blocks else list(range(blocks - k, blocks))


def strategy_keys(
    family: str, v: dict[str, Any], blocks: int, linear: list[str] | None = None
) -> dict[str, Any]:
    """The recipe sections of one family's trial, from its sampled values `v`; `linear`: the linear
    layers of a block, LoRA's `all-linear` (QLoRA, Dettmers et al. 2023: adapting every linear layer
    of the blocks), named explicitly because peft's `all-linear` cannot take layers_to_transform."""
    if family == "full":
        return {}
    if family == "freeze_top":
        return {"freeze": {"trainable": [{"top_k": share_to_blocks(v["share"], blocks)}, "head"]}}
    if family == "freeze_bottom":
        return {"freeze": {"frozen": ["embeddings", {"bottom_k": share_to_blocks(v["share"], blocks)}]}}
    if family == "bitfit":
        return {"freeze": {"trainable": ["bias", "head"]}}
    if family == "spectrum":
        return {"freeze": {"spectrum": {"share": v["share"]}}}
    if family == "ia3":  # peft's IA3Config has no layers_to_transform
        return {"peft": {"method": "ia3"}}
    if family in ("lora", "dora"):
        peft: dict[str, Any] = {"method": family}
        peft |= {k: v[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules")}
        if v["target_modules"] == "all-linear" and linear:
            peft["target_modules"] = list(linear)
        layers = _layers(v["layer_share"], blocks)
        return {"peft": peft | ({"layers_to_transform": layers} if layers else {})}
    if family == "adapters":
        return {"adapters": {"method": v["method"], "reduction_factor": v["reduction_factor"]}}
    if family == "soft_prompt_lora":
        return {
            "soft_prompt": {"num_virtual_tokens": v["num_virtual_tokens"], "init": "vocab"},
            "peft": {"method": "lora", "r": v["r"], "lora_alpha": v["lora_alpha"]},
        }
    if family == "llrd":
        return {"lr": {"layer_decay": v["layer_decay"]}}
    if family == "staged":
        f = v["stage_fraction"]
        stages = [
            {"fraction": f, "train": ["head"]},
            {"fraction": f, "train": [{"top_k": max(1, blocks // 2)}]},
            {"train": ["all"]},
        ]
        return {"stages": stages} | (
            {"lr": {"layer_decay": v["layer_decay"]}} if v["layer_decay"] < 1 else {}
        )
    raise KeyError(family)


class Families(BaseModel):
    """The families searched: those named (a space file restricts the default, which has all)."""

    model_config = ConfigDict(extra="forbid")

    full: Full | None = None
    freeze_top: FreezeTop | None = None
    freeze_bottom: FreezeBottom | None = None
    bitfit: BitFit | None = None
    spectrum: Spectrum | None = None
    lora: Lora | None = None
    dora: Lora | None = None
    ia3: IA3 | None = None
    adapters: Adapters | None = None
    soft_prompt_lora: SoftPromptLora | None = None
    llrd: Llrd | None = None
    staged: Staged | None = None
