"""freeze: which parameters train, as a union of selectors over the model anatomy.

    freeze:
      trainable: [head, {top_frac: 0.333}]    # only these train (the top third of the blocks + head)
    freeze:
      frozen: [embeddings, {bottom_k: 8}]      # these are frozen, everything else trains
    freeze:
      spectrum: {share: 0.25}                  # the top quarter of each matrix type by SNR (+ head)

Selectors: all | none | head | embeddings | norms | final_norm | bias | blocks by depth, relative
({top_frac: F} | {bottom_frac: F} | {level: K, levels: L}) or absolute ({top_k: N} | {bottom_k: N} |
{layers: [i, ...]}) | {patterns: [regex, ...]}. How a fraction and a level map to blocks:
model/depth.py. A relative selector trains the same share of a 6-block and a 24-block model; an
absolute one names the same blocks (and fails on a model that lacks them). A head that the checkpoint
did not have (a new classifier) trains unless `train_new_head: false`. The same selector language is
used by stages. BitFit: Ben Zaken et al. 2022, https://arxiv.org/abs/2106.10199.

`spectrum` chooses by the pretrained weights themselves, data-free: the matrices (or blocks) whose
singular values carry the most signal (Hartford et al. 2024; the score: strategy/spectrum.py). What
trains beside them is `trainable` (default [head]); `hybridtune params` shows every score and the choice.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import nn

from hybridtune.errors import UserError, did_you_mean
from hybridtune.model.anatomy import is_norm
from hybridtune.model.depth import fraction_blocks, level_blocks
from hybridtune.strategy import spectrum as spectrum_score
from hybridtune.strategy.base import Part
from hybridtune.strategy.spectrum import SpectrumConfig

NAMED = ("all", "none", "head", "embeddings", "norms", "final_norm", "bias")
KEYED = ("top_frac", "bottom_frac", "level", "top_k", "bottom_k", "layers", "patterns")
SHAPES = (
    "{top_frac: F}, {bottom_frac: F}, {level: K, levels: L}, {top_k: N}, {bottom_k: N}, "
    "{layers: [i, ...]}, {patterns: [regex, ...]}"
)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(where: str, found: Any, expected: str) -> ValueError:
    """A schema error that names its own key path (the recipe's "key.path: found X; expected Y")."""
    return ValueError(f"{where}: found {found!r}; expected {expected}")


def _atom(atom: Any, at: str) -> str | dict:
    """One selector atom, checked and normalised; errors name the atom's key path `at`."""
    if isinstance(atom, str):
        if atom in NAMED:
            return atom
        hint = did_you_mean(atom, NAMED)
        raise _bad(
            at, atom, f"a selector: one of {', '.join(NAMED)} or {SHAPES}" + (f" ({hint})" if hint else "")
        )
    if not isinstance(atom, dict) or not atom:
        raise _bad(at, atom, f"a selector: one of {', '.join(NAMED)} or {SHAPES}")
    unknown = [k for k in atom if k not in (*KEYED, "levels")]
    if unknown:
        hint = did_you_mean(unknown[0], (*KEYED, "levels"))
        raise _bad(
            f"{at}.{unknown[0]}",
            atom[unknown[0]],
            f"a depth selector key: one of {', '.join(KEYED)}" + (f" ({hint})" if hint else ""),
        )
    if "level" in atom or "levels" in atom:
        if set(atom) != {"level", "levels"}:
            raise _bad(at, atom, "{level: K, levels: L} (a level of L levels, alone in its atom)")
        levels, level = atom["levels"], atom["level"]
        if not _whole(levels) or levels < 1:
            raise _bad(f"{at}.levels", levels, "a whole number of levels >= 1")
        ks = level if isinstance(level, list) else [level]
        bad = [k for k in ks if not _whole(k) or not -levels <= k < levels]
        if bad or not ks:
            raise _bad(
                f"{at}.level",
                bad[0] if bad else level,
                f"a level (or a list of levels) in 0..{levels - 1} (negative: from the top), "
                f"below levels={levels}",
            )
        return {"level": ks, "levels": levels}
    if len(atom) != 1:
        raise _bad(at, atom, "one key per atom (a list of atoms for a union)")
    key, arg = next(iter(atom.items()))
    if key in ("top_frac", "bottom_frac"):
        if isinstance(arg, bool) or not isinstance(arg, int | float) or not 0 < arg <= 1:
            raise _bad(f"{at}.{key}", arg, "a fraction of the blocks in (0, 1] (0.333: a third)")
    elif key in ("top_k", "bottom_k"):
        if not _whole(arg) or arg < 0:
            raise _bad(f"{at}.{key}", arg, "a whole number of blocks >= 0")
    elif key == "layers":
        arg = [arg] if _whole(arg) else arg
        if not isinstance(arg, list) or not all(_whole(i) for i in arg):
            raise _bad(f"{at}.{key}", arg, "a list of block indices")
    else:
        arg = [arg] if isinstance(arg, str) else arg
        if not isinstance(arg, list) or not all(isinstance(p, str) for p in arg):
            raise _bad(f"{at}.{key}", arg, "a list of regular expressions")
        for pattern in arg:
            try:
                re.compile(pattern)
            except re.error as e:
                raise _bad(f"{at}.{key}", pattern, f"a regular expression ({e})") from None
    return {key: arg}


def parse_selector(value: Any, where: str = "selector") -> list[str | dict]:
    """Normalise a selector (one atom or a list of atoms) to a list, checking each atom's shape;
    `where` is its key path in the recipe (e.g. `freeze.trainable`), for the error message."""
    if isinstance(value, list):
        return [_atom(atom, f"{where}[{i}]") for i, atom in enumerate(value)]
    return [_atom(value, where)]


class FreezeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trainable: list[str | dict] | None = Field(
        None,
        description="selector of the only parameters that train (with spectrum: what trains beside its choice)",
    )
    frozen: list[str | dict] | None = Field(
        None,
        description="selector of the parameters that are frozen (give `trainable`, `frozen` or `spectrum`)",
    )
    spectrum: SpectrumConfig | None = Field(
        None,
        description="train the matrices (or blocks) of highest signal-to-noise ratio of their singular "
        "values (Spectrum, Hartford et al. 2024) and `trainable` (default [head])",
    )
    train_new_head: bool = Field(
        True, description="a head the checkpoint lacked (a new classifier) trains unless `false`"
    )

    @field_validator("trainable", "frozen", mode="before")
    @classmethod
    def _selector(cls, value: Any, info: ValidationInfo) -> Any:
        return None if value is None else parse_selector(value, f"freeze.{info.field_name}")

    @model_validator(mode="after")
    def _exactly_one(self) -> FreezeConfig:
        if self.spectrum is not None and self.frozen is not None:
            raise ValueError(
                "freeze.frozen: found it with freeze.spectrum; expected `spectrum` alone or with "
                "`trainable` (what trains beside its choice)"
            )
        if self.spectrum is None and (self.trainable is None) == (self.frozen is None):
            raise ValueError("give exactly one of `trainable`, `frozen` or `spectrum`")
        return self


def atom_blocks(atom: dict, num_blocks: int, at: str) -> set[int] | None:
    """The block indices a keyed atom names on a model of `num_blocks` blocks (None: not a block
    selector); a selector the model is too shallow for is a UserError at key path `at`."""
    key, arg = next(iter(atom.items()))
    n = num_blocks
    if key in ("top_frac", "bottom_frac"):
        k = fraction_blocks(n, arg)
        return set(range(n - k, n) if key == "top_frac" else range(k))
    if key == "level":
        levels = atom["levels"]
        if levels > n:
            raise UserError(f"{at}.levels", str(levels), f"at most {n} levels (the model has {n} blocks)")
        split = level_blocks(n, levels)
        return {b for k in arg for b in split[k]}
    if key in ("top_k", "bottom_k"):
        if arg > n:
            raise UserError(f"{at}.{key}", str(arg), f"at most {n} (the model has {n} blocks)")
        return set(range(n - arg, n) if key == "top_k" else range(arg))
    if key == "layers":
        bad = [b for b in arg if not -n <= b < n]
        if bad:
            raise UserError(
                f"{at}.{key}", str(bad[0]), f"a block index in 0..{n - 1} (the model has {n} blocks)"
            )
        return {b % n for b in arg}
    return None


def blocks_at_most(config: FreezeConfig, num_blocks: int) -> set[int]:
    """The blocks in which this selection may leave a parameter trainable, from the recipe alone:
    exact for the depth selectors, every block for one that may reach into any (all, norms, bias,
    patterns, spectrum's choice)."""
    every = set(range(num_blocks))
    if config.spectrum is not None:
        return every
    if config.frozen is not None:  # the blocks a depth selector (or `all`) freezes whole are out
        out = set(every)
        for i, atom in enumerate(config.frozen):
            if atom == "all":
                return set()
            if isinstance(atom, dict):
                out -= atom_blocks(atom, num_blocks, f"freeze.frozen[{i}]") or set()
        return out
    picked: set[int] = set()
    for i, atom in enumerate(config.trainable or []):
        if isinstance(atom, dict):
            blocks = atom_blocks(atom, num_blocks, f"freeze.trainable[{i}]")
            picked |= every if blocks is None else blocks  # None: patterns
        elif atom in ("all", "norms", "bias"):
            picked |= every
    return picked


# the named selectors that pick no Linear weight outside the head slot, on any model (model/anatomy.py's
# slots); `embeddings` may (ALBERT's projection), `all`, a block selector and a pattern do
NO_BODY_LINEAR = ("none", "bias", "norms", "final_norm", "head")


def may_pick_linear(selector: list[str | dict], head_linear: bool) -> bool:
    """Whether `selector` can pick a Linear layer's weight on a model, known from the selector alone
    and whether the model's head slot holds a pretrained Linear layer (`ModelFacts.head_linear`:
    BERT's pooler, an untied lm_head). BitFit's [bias, head] on a token classifier picks none."""
    if any(not isinstance(atom, str) or atom not in NO_BODY_LINEAR for atom in selector):
        return True
    return "head" in selector and head_linear


def select(model: nn.Module, anatomy, selector: list[str | dict], where: str) -> set[str]:
    """Names of the parameters of `model` picked by `selector` (a union of its atoms)."""
    names = [n for n, _ in model.named_parameters()]
    modules = dict(model.named_modules())
    picked: set[str] = set()
    for i, atom in enumerate(selector):
        at = f"{where}[{i}]"
        if isinstance(atom, dict):
            blocks = atom_blocks(atom, anatomy.num_blocks, at)
            if blocks is not None:
                picked |= {n for n in names if anatomy.block_of(n) in blocks}
                continue
            for pattern in atom["patterns"]:
                hits = {n for n in names if re.search(pattern, n)}
                if not hits:
                    raise UserError(
                        f"{at}.patterns",
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
    if config.spectrum is not None:
        chosen, build.report["spectrum"] = spectrum_score.choose(model, build.anatomy, config.spectrum)
        beside = config.trainable if config.trainable is not None else ["head"]
        train = chosen | select(model, build.anatomy, beside, "freeze.trainable")
        if config.train_new_head:
            train |= build.new_params & names
    elif config.trainable is not None:
        train = select(model, build.anatomy, config.trainable, "freeze.trainable")
        if config.train_new_head:
            train |= build.new_params & names
    else:
        train = names - select(model, build.anatomy, config.frozen, "freeze.frozen")
    for name, param in model.named_parameters():
        param.requires_grad_(name in train)
    # what later parts that freeze the base (peft, adapters, soft_prompt) must leave trainable
    build.keep = {id(p): p for p in model.parameters() if p.requires_grad}
    return model


def check(config: FreezeConfig, recipe) -> None:
    if recipe.stages is not None:
        raise ValueError(
            "stages: found `freeze` and `stages` together; expected one of them: give `freeze` or "
            "`stages`, not both (stages decide what trains in each stage)"
        )


PART = Part(
    key="freeze",
    config=FreezeConfig,
    apply=apply,
    check=check,
    summary="which parameters train: a selector over the anatomy (head-only, top-k, BitFit, ...)",
)
