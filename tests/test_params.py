"""`hybridtune params`: per-layer counts agree with an independent count and with peft's own."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hybridtune import api
from hybridtune.cli import app
from hybridtune.recipe import load_recipe


def _independent_counts(model) -> dict[str, tuple[int, int]]:
    """Counted by name patterns of BertForSequenceClassification, without the anatomy module."""
    out: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        short = name.removeprefix("base_model.model.")
        if short.startswith("bert.embeddings."):
            slot = "embeddings"
        elif short.startswith("bert.encoder.layer."):
            slot = "block." + short.split(".")[3]
        elif short.startswith(("bert.pooler.", "classifier.")):
            slot = "head"
        else:
            slot = "added"
        total, trainable = out.setdefault(slot, [0, 0]), p.requires_grad
        total[0] += p.numel()
        total[1] += p.numel() if trainable else 0
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["freeze.trainable=[head]"],
        ["freeze.trainable=[bias, head]"],
        ["freeze.frozen=[embeddings, {bottom_k: 1}]"],
        ["peft.method=lora"],
        ["peft.method=lora", "freeze.trainable=[{top_k: 1}]"],
    ],
)
def test_table_matches_an_independent_count_and_peft(quick, extra):
    prep = api.prepare(load_recipe(None, quick(None, *extra)))
    table = prep.params
    rows = {r["slot"]: (r["total"], r["trainable"]) for r in table["rows"]}
    assert rows == _independent_counts(prep.model)
    assert table["total"] == sum(t for t, _ in rows.values())
    if hasattr(prep.model, "get_nb_trainable_parameters"):
        trainable, total = prep.model.get_nb_trainable_parameters()
        assert (table["trainable"], table["total"]) == (trainable, total)
    else:
        assert table["trainable"] == sum(p.numel() for p in prep.model.parameters() if p.requires_grad)


def test_params_cli_json(quick):
    result = CliRunner().invoke(app, ["params", *quick(None, "peft.method=lora"), "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    assert {r["slot"] for r in table["rows"]} >= {"embeddings", "block.0", "block.1", "head"}
    assert 0 < table["trainable_pct"] < 100
