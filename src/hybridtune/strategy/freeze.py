"""freeze: which parameters train, as a union of selectors over the model anatomy.

    freeze:
      trainable: [head, {top_k: 2}]        # only these train ("head only", "top-k + head", BitFit = [bias])
    freeze:
      frozen: [embeddings, {bottom_k: 8}]  # these are frozen, everything else trains

Selectors: all | none | head | embeddings | norms | final_norm | bias | {top_k: N} | {bottom_k: N} |
{layers: [i, ...]} | {patterns: [regex, ...]}. A head that the checkpoint did not have (a new
classifier) trains unless `train_new_head: false`. The same selector language is used by stages.
BitFit: Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from hybridtune.errors import UserError
from hybridtune.model.anatomy import is_norm

NAMED = ("all", "none", "head", "embeddings", "norms", "final_norm", "bias")
KEYED = ("top_k", "bottom_k", "layers", "patterns")


def parse_selector(value: Any) -> list[str | dict]:
    """Normalise a selector (one atom or a list of atoms) to a list, checking each atom's shape."""
    atoms = value if isinstance(value, list) else [value]
    out: list[str | dict] = []
    for atom in atoms:
        if isinstance(atom, str) and atom in NAMED:
            out.append(atom)
        elif isinstance(atom, dict) and len(atom) == 1 and next(iter(atom)) in KEYED:
            key, arg = next(iter(atom.items()))
            if key in ("top_k", "bottom_k"):
                if not isinstance(arg, int) or isinstance(arg, bool) or arg < 0:
                    raise ValueError(f"{key} takes a whole number >= 0, got {arg!r}")
            elif key == "layers":
                arg = [arg] if isinstance(arg, int) else arg
                if not isinstance(arg, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in arg
                ):
                    raise ValueError(f"layers takes a list of block indices, got {arg!r}")
            else:
                arg = [arg] if isinstance(arg, str) else arg
                if not isinstance(arg, list) or not all(isinstance(p, str) for p in arg):
                    raise ValueError(f"patterns takes a list of regular expressions, got {arg!r}")
                for pattern in arg:
                    try:
                        re.compile(pattern)
                    except re.error as e:
                        raise ValueError(f"pattern {pattern!r} is not a regular expression ({e})") from None
            out.append({key: arg})
        else:
            raise ValueError(
                f"a selector: one of {', '.join(NAMED)} or {{{': N}, {'.join(KEYED)}: ...}}, got {atom!r}"
            )
    return out


class FreezeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trainable: list[str | dict] | None = Field(None, description="selector of the only parameters that train")
    frozen: list[str | dict] | None = Field(None, description="selector of the parameters that are frozen")
    train_new_head: bool = Field(True, description="a head the checkpoint lacks trains unless false")

    @field_validator("trainable", "frozen", mode="before")
    @classmethod
    def _selector(cls, value: Any) -> Any:
        return None if value is None else parse_selector(value)

    @model_validator(mode="after")
    def _exactly_one(self) -> FreezeConfig:
        if (self.trainable is None) == (self.frozen is None):
            raise ValueError("give exactly one of `trainable` or `frozen`")
        return self


def select(model: nn.Module, anatomy, selector: list[str | dict], where: str) -> set[str]:
    """Names of the parameters of `model` picked by `selector` (a union of its atoms)."""
    names = [n for n, _ in model.named_parameters()]
    modules = dict(model.named_modules())
    picked: set[str] = set()
    n_blocks = anatomy.num_blocks
    for i, atom in enumerate(selector):
        at = f"{where}[{i}]"
        if isinstance(atom, dict):
            key, arg = next(iter(atom.items()))
            at += f".{key}"
            if key in ("top_k", "bottom_k"):
                if arg > n_blocks:
                    raise UserError(at, str(arg), f"at most {n_blocks} (the model has {n_blocks} blocks)")
                blocks = range(n_blocks - arg, n_blocks) if key == "top_k" else range(arg)
                picked |= {n for n in names if anatomy.block_of(n) in blocks}
            elif key == "layers":
                bad = [b for b in arg if not -n_blocks <= b < n_blocks]
                if bad:
                    raise UserError(
                        at,
                        str(bad[0]),
                        f"a block index in 0..{n_blocks - 1} (the model has {n_blocks} blocks)",
                    )
                wanted = {b % n_blocks for b in arg}
                picked |= {n for n in names if anatomy.block_of(n) in wanted}
            else:
                for pattern in arg:
                    hits = {n for n in names if re.search(pattern, n)}
                    if not hits:
                        raise UserError(
                            at,
                            f"pattern {pattern!r} matching no parameter",
                            "a pattern matching a parameter name (see `hybridtune params`)",
                        )
                    picked |= hits
        elif atom == "all":
            picked |= set(names)
        elif atom in ("head", "embeddings", "final_norm"):
            picked |= {n for n in names if anatomy.slot_of(n) == atom}
        elif atom == "bias":
            picked |= {n for n in names if n.endswith("bias")}
        elif atom == "norms":
            picked |= {n for n in names if is_norm(modules.get(n.rsplit(".", 1)[0], model))}
    return picked


def apply(model: nn.Module, config: FreezeConfig, build) -> nn.Module:
    names = {n for n, _ in model.named_parameters()}
    if config.trainable is not None:
        train = select(model, build.anatomy, config.trainable, "freeze.trainable")
        if config.train_new_head:
            train |= build.new_params & names
    else:
        train = names - select(model, build.anatomy, config.frozen, "freeze.frozen")
    for name, param in model.named_parameters():
        param.requires_grad_(name in train)
    return model
