"""Recipes that fit any depth: how fractions and levels map to blocks, decay per block / per level /
over a stated depth, and every example recipe training the same share of a 6-block and a 12-block model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from hybridtune import api
from hybridtune.errors import UserError
from hybridtune.model.depth import fraction_blocks, level_blocks
from hybridtune.recipe import load_recipe
from tests.test_causal_lm import colour_rows, write_jsonl

from .test_recipes import teacher_of


# ------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize(
    "blocks, fraction, expected",
    [
        (6, 0.333, 2),  # freeze_top2 on MiniLM ...
        (12, 0.333, 4),  # ... and on BERT-base
        (6, 0.667, 4),  # freeze_bottom4 on MiniLM ...
        (12, 0.667, 8),  # ... the seed's "first 8 of 12"
        (3, 0.5, 2),  # 1.5: half up (Python's round would give 2 here ...)
        (5, 0.5, 3),  # 2.5: half up (... and 2 here)
        (1, 0.5, 1),  # 0.5: half up (round gives 0)
        (30, 0.01, 1),  # at least one block for a fraction > 0
        (10, 0.35, 4),  # 3.5 in decimal, not 3.4999...
        (7, 1.0, 7),
    ],
)
def test_a_fraction_is_rounded_half_up_to_at_least_one_block(blocks, fraction, expected):
    assert fraction_blocks(blocks, fraction) == expected


def test_levels_split_the_blocks_as_numpy_array_split():
    for n in range(1, 31):
        for levels in range(1, n + 1):
            ours = [list(r) for r in level_blocks(n, levels)]
            assert ours == [list(a) for a in np.array_split(np.arange(n), levels)], (n, levels)
    assert [list(r) for r in level_blocks(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]  # the bottom gets more


def _prep(model: str, data: str, *extra: str):
    return api.prepare(load_recipe(None, [f"model={model}", f"data.source={data}", *extra]))


def _blocks(prep) -> set[int]:
    """The blocks with a trainable parameter."""
    return {
        int(r["slot"].split(".")[1])
        for r in prep.params["rows"]
        if r["slot"].startswith("block.") and r["trainable"]
    }


def _lr(prep, slot: str) -> float:
    return next(r["lr"] for r in prep.params["rows"] if r["slot"] == slot)


@pytest.mark.parametrize(
    "selector, expected",
    [
        ("{top_frac: 0.333}", {5, 6}),  # 7 x 0.333 = 2.33 -> 2
        ("{bottom_frac: 0.5}", {0, 1, 2, 3}),  # 3.5 -> 4 (half up)
        ("{level: 0, levels: 3}", {0, 1, 2}),  # array_split: the bottom level gets the extra block
        ("{level: [-1], levels: 3}", {5, 6}),  # negative levels count from the top
        ("{level: [1, 2], levels: 3}", {3, 4, 5, 6}),
    ],
)
def test_depth_selectors_pick_their_blocks_of_an_uneven_model(tiny_model, sentiment_csv, selector, expected):
    prep = _prep(
        tiny_model("bert", 7), sentiment_csv, f"freeze.trainable=[{selector}]", "freeze.train_new_head=false"
    )
    assert _blocks(prep) == expected


# ------------------------------------------------------------------------------------------ lr decay
def test_decay_per_level_gives_the_blocks_of_a_level_one_lr(tiny_model, sentiment_csv):
    prep = _prep(
        tiny_model("bert", 7),
        sentiment_csv,
        "lr.layer_decay=0.5",
        "lr.decay_per=level",
        "lr.levels=3",
        "train.lr=0.008",
    )
    lrs = [_lr(prep, f"block.{i}") for i in range(7)]  # levels [0, 1, 2] [3, 4] [5, 6]
    assert lrs == pytest.approx([0.001, 0.001, 0.001, 0.002, 0.002, 0.004, 0.004])
    assert _lr(prep, "head") == pytest.approx(0.008) and _lr(prep, "embeddings") == pytest.approx(0.0005)


def test_decay_per_level_with_a_level_per_block_is_plain_layer_decay(tiny_bert6, sentiment_csv):
    per_block = _prep(tiny_bert6, sentiment_csv, "lr.layer_decay=0.7").plan.lrs
    per_level = _prep(tiny_bert6, sentiment_csv, "lr.layer_decay=0.7", "lr.decay_per=level", "lr.levels=6")
    assert per_level.plan.lrs == per_block  # the same floats, the same group labels


@pytest.mark.parametrize("depth", [1, 2, 6, 12, 13])
def test_decay_depth_keeps_the_decay_from_the_top_block_to_the_bottom_one(tiny_model, sentiment_csv, depth):
    prep = _prep(
        tiny_model("bert", depth), sentiment_csv, "lr.layer_decay=0.5", "lr.decay_depth=6", "train.lr=0.5"
    )
    lrs = [_lr(prep, f"block.{i}") for i in range(depth)]
    assert lrs[-1] == pytest.approx(0.5**2)  # one step below the head (0.5), as in per-block LLRD
    if depth > 1:
        assert lrs[0] == pytest.approx(0.5**7)  # the bottom block, as on 6 blocks
        ratios = [lrs[i] / lrs[i + 1] for i in range(depth - 1)]
        assert ratios == pytest.approx([0.5 ** (5 / (depth - 1))] * (depth - 1))  # evenly spread
    assert _lr(prep, "embeddings") == pytest.approx(0.5**8)  # one step below the bottom, at any depth


def test_decay_depth_on_as_many_blocks_is_plain_layer_decay(tiny_bert6, sentiment_csv):
    plain = _prep(tiny_bert6, sentiment_csv, "lr.layer_decay=0.385").plan.lrs
    assert _prep(tiny_bert6, sentiment_csv, "lr.layer_decay=0.385", "lr.decay_depth=6").plan.lrs == plain


def test_lr_groups_take_depth_selectors(tiny_bert12, sentiment_csv):
    prep = _prep(
        tiny_bert12,
        sentiment_csv,
        "lr.groups=[{top_frac: 0.25, lr: 0.3}, {level: 0, levels: 4, lr_scale: 0.1}]",
        "train.lr=0.01",
    )
    lrs = [_lr(prep, f"block.{i}") for i in range(12)]
    assert lrs == pytest.approx([0.001] * 3 + [0.01] * 6 + [0.3] * 3)


def test_lr_levels_and_level_selectors_name_the_same_blocks(tiny_model, sentiment_csv):
    """`lr.levels` (level_lr) and `{level: k, levels: L}` follow one split, also on an uneven depth."""
    model = tiny_model("bert", 7)
    lr = _prep(model, sentiment_csv, "lr.levels=3", "lr.level_lr=[0.001, 0.002, 0.003]")
    for k, want in enumerate((0.001, 0.002, 0.003)):
        picked = _blocks(_prep(model, sentiment_csv, f"freeze.trainable=[{{level: {k}, levels: 3}}]"))
        assert {i for i in range(7) if _lr(lr, f"block.{i}") == want} == picked


@pytest.mark.parametrize(
    "extra, where",
    [
        (["lr.layer_decay=0.5", "lr.levels=3"], "decay_per: level"),
        (["lr.decay_per=level", "lr.levels=3"], "needs `layer_decay`"),
        (["lr.decay_depth=6"], "`decay_depth` goes with `layer_decay`"),
        (["lr.layer_decay=0.5", "lr.levels=3", "lr.level_lr=[1, 2, 3]", "lr.decay_per=level"], "not both"),
    ],
)
def test_inconsistent_lr_keys_are_refused(extra, where):
    with pytest.raises(UserError, match="lr") as info:
        load_recipe(None, extra)
    assert where in str(info.value)


# ------------------------------------------------------------------------------------------ the recipes
RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def _kind(raw: dict) -> str:
    """The tiny model of a recipe's kind: its task, encoder or decoder."""
    task = raw.get("task", "classification")
    if task == "causal_lm" or (task == "prompt_classification" and "smollm2" in raw["model"]):
        return "gpt2"
    return "bert_mlm" if task == "prompt_classification" else "bert"


@pytest.fixture(scope="module")
def data(tmp_path_factory, sentiment_csv) -> dict[str, str]:
    out = tmp_path_factory.mktemp("depth-data")
    ner = [{"tokens": ["a", f"b{i}", "c"], "tags": ["O", "B-per", "I-per"]} for i in range(40)]
    return {
        "classification": sentiment_csv,
        "prompt_classification": sentiment_csv,
        "causal_lm": write_jsonl(out / "pairs.jsonl", colour_rows(40)),
        "token_classification": write_jsonl(out / "ner.jsonl", ner),
    }


def _shares(prep) -> dict:
    """What a depth-relative recipe keeps at any depth: per stage (or once), the share of the blocks
    that train and whether the embeddings / head train; the lr of the embeddings, the bottom block,
    the top block and the head."""
    n, rows = prep.anatomy.num_blocks, {r["slot"]: r for r in prep.params["rows"]}
    if prep.plan.stages is None:
        stages = [{n for n, p in prep.model.named_parameters() if p.requires_grad}]
    else:
        added = {n for n, p in prep.model.named_parameters() if p.requires_grad} - prep.plan.base_names
        stages = [names | added for names in prep.plan.stages.trainable]
    slots = [{prep.anatomy.slot_of(name) for name in names} for names in stages]
    trained = [
        {
            "blocks": sum(f"block.{i}" in s for i in range(n)) / n,
            "embeddings": "embeddings" in s,
            "head": "head" in s,
        }
        for s in slots
    ]
    anchors = {"embeddings": "embeddings", "bottom": "block.0", "top": f"block.{n - 1}", "head": "head"}
    lrs = {name: rows[slot]["lr"] or 0.0 for name, slot in anchors.items() if slot in rows}  # None: not held
    out = {"stages": trained, "lr": lrs}
    if "spectrum" in prep.params:  # per matrix type, the share of the blocks' matrices chosen
        matrices = prep.params["spectrum"]["matrices"]
        types = {m["type"] for m in matrices}
        out["spectrum"] = {t: sum(m["chosen"] for m in matrices if m["type"] == t) / n for t in types}
    return out


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_trains_the_same_share_of_a_6_and_a_12_block_model(path, tiny_model, data, tmp_path, request):
    """No recipe is skipped: every one runs `params` on tiny models of its kind (an encoder recipe on a
    BERT, a decoder one on a GPT-2; the tiny tokenizer has no chat template, hence prompt.chat=false;
    a distill recipe learns from a tiny run; few-shot draws fit the tiny data)."""
    raw = yaml.safe_load(path.read_text())
    task = raw.get("task", "classification")
    extra = ["prompt.chat=false"] if raw.get("prompt", {}).get("chat") else []
    extra += teacher_of(path, request)
    if isinstance(raw.get("data"), dict) and raw["data"].get("shots"):
        extra += ["data.shots=8", "data.validation_shots=4"]
    shares = {}
    for depth in (6, 12):
        overrides = [
            f"model={tiny_model(_kind(raw), depth)}",
            f"data.source={data[task]}",
            "train.precision=fp32",
            f"output.dir={tmp_path}",
            *extra,
        ]
        shares[depth] = _shares(api.prepare(load_recipe(path, overrides)))
    if path.stem == "spectrum":  # it picks matrices, per type: the share of each type's matrices is kept
        for depth, share in shares.items():
            assert share["spectrum"] == {t: math.floor(0.25 * depth + 0.5) / depth for t in share["spectrum"]}
    else:
        assert shares[6]["stages"] == shares[12]["stages"]
    assert shares[12]["lr"] == pytest.approx(shares[6]["lr"], rel=1e-9), shares
    if path.stem in ("freeze_top2", "freeze_bottom4"):
        assert shares[6]["stages"][0]["blocks"] == pytest.approx(1 / 3)  # 2 of 6, 4 of 12


def test_the_recipes_use_no_absolute_block_index():
    """The example recipes train a share of any model: no top_k / bottom_k / layers / blocks."""

    def keys(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from keys(value)
        elif isinstance(node, list):
            for item in node:
                yield from keys(item)

    for path in RECIPES:
        found = set(keys(yaml.safe_load(path.read_text()))) & {"top_k", "bottom_k", "layers", "blocks"}
        assert not found, (path.name, found)
