"""freeze.spectrum (Hartford et al. 2024): the SNR score of each matrix equals a hand computation, the
top share of each matrix type trains (or of the blocks, whole), `hybridtune params` shows the scores,
the scores are cached per model, and bad settings stop before a run dir exists."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hybridtune import api
from hybridtune.cli import app
from hybridtune.model.anatomy import canonical
from hybridtune.recipe import load_recipe

from .refusal import refused
from .test_recipes import _run as run_steps

TYPES = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
HEAD = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def by_hand(weight: torch.Tensor) -> float:
    """Spectrum's score, written out again with numpy from the singular values (its spectrum.py)."""
    s = torch.linalg.svdvals(weight.detach().double()).numpy()
    q75, q25 = np.percentile(s, [75, 25])
    sigma = (q75 - q25) / 1.349
    n, m = weight.shape
    beta = min(n, m) / max(n, m)
    threshold = sigma * (1 + math.sqrt(beta))
    signal = s[s > threshold].sum()
    noise = s[s <= threshold].sum() if (s <= threshold).any() else 1.0
    return float(signal / noise / s.max())


def _prepare(quick, model, *extra):
    return api.prepare(load_recipe(None, quick(model, *extra)))


def test_score_of_one_matrix_equals_a_hand_computation(quick, tiny_bert6):
    prep = _prepare(quick, tiny_bert6, "freeze.spectrum.share=0.25")
    report = prep.params["spectrum"]
    rows = {m["name"]: m for m in report["matrices"]}
    assert len(rows) == 6 * len(TYPES) and report["types"] == list(TYPES)
    weights = dict(prep.model.named_parameters())
    for name in (
        "bert.encoder.layer.3.attention.self.query.weight",
        "bert.encoder.layer.0.output.dense.weight",
    ):
        assert rows[name]["score"] == pytest.approx(by_hand(weights[name]), rel=1e-4)
    # the scores differ across matrices: the ranking is by something
    assert len({round(m["score"], 6) for m in report["matrices"]}) > 30


def _top_per_type(model, k: int) -> set[str]:
    weights = dict(model.named_parameters())
    out = set()
    for kind in TYPES:
        names = [f"bert.encoder.layer.{b}.{kind}.weight" for b in range(6)]
        ranked = sorted(names, key=lambda n: (-by_hand(weights[n]), n))
        out |= {n for w in ranked[:k] for n in (w, w.removesuffix("weight") + "bias")}
    return out


@pytest.mark.parametrize("share, k", [(0.25, 2), (0.5, 3), (0.05, 1), (1.0, 6)])
def test_the_top_share_of_each_type_trains_with_the_head(quick, tiny_bert6, share, k):
    # k of 6 per type: round half up, at least one (0.25 x 6 = 1.5 -> 2; 0.05 x 6 -> 1)
    prep = _prepare(quick, tiny_bert6, f"freeze.spectrum.share={share}")
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert trainable == _top_per_type(prep.model, k) | HEAD
    chosen = {m["name"] for m in prep.params["spectrum"]["matrices"] if m["chosen"]}
    assert chosen == {n for n in trainable if n.endswith("weight") and n not in HEAD}


def test_exactly_the_chosen_matrices_change_in_training(quick, tiny_bert6, tmp_path):
    recipe = load_recipe(None, quick(tiny_bert6, "freeze.spectrum.share=0.25", "train.max_steps=3"))
    prep, changed, _ = run_steps(recipe, tmp_path)
    # the choice was made on the pretrained weights (test above: the hand-ranked top 2 of each type)
    chosen = {m["name"] for m in prep.params["spectrum"]["matrices"] if m["chosen"]}
    assert len(chosen) == 2 * len(TYPES)
    assert changed == chosen | {n.removesuffix("weight") + "bias" for n in chosen} | HEAD


def test_trainable_names_what_trains_beside_the_choice(quick, tiny_bert6):
    prep = _prepare(
        quick,
        tiny_bert6,
        "freeze.spectrum.share=0.25",
        "freeze.trainable=[embeddings]",
        "freeze.train_new_head=false",
    )
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    embeddings = {n for n, _ in prep.model.named_parameters() if n.startswith("bert.embeddings.")}
    assert trainable == _top_per_type(prep.model, 2) | embeddings


def test_block_unit_trains_the_top_blocks_whole(quick, tiny_bert6):
    prep = _prepare(quick, tiny_bert6, "freeze.spectrum.share=0.34", "freeze.spectrum.unit=block")
    weights = dict(prep.model.named_parameters())
    scores = {(b, t): by_hand(weights[f"bert.encoder.layer.{b}.{t}.weight"]) for b in range(6) for t in TYPES}
    best = {t: max(scores[b, t] for b in range(6)) for t in TYPES}
    mean = {b: sum(scores[b, t] / best[t] for t in TYPES) / len(TYPES) for b in range(6)}
    top = set(sorted(range(6), key=lambda b: -mean[b])[:2])  # 0.34 x 6 = 2.04 -> 2 blocks
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    in_top = {n for n in weights if any(n.startswith(f"bert.encoder.layer.{b}.") for b in top)}
    assert trainable == in_top | HEAD
    report = prep.params["spectrum"]
    assert {b["block"] for b in report["blocks"] if b["chosen"]} == top
    assert [b["score"] for b in report["blocks"]] == pytest.approx([mean[b] for b in range(6)], rel=1e-4)


def test_composes_with_lora(quick, tiny_bert6):
    # freeze + peft: the chosen base matrices train (peft keeps them as trainable `modules_to_save`
    # copies, strategy/__init__.py), and LoRA trains on the query / value projections not chosen
    prep = _prepare(quick, tiny_bert6, "freeze.spectrum.share=0.25", "peft.method=lora")
    chosen = {m["name"] for m in prep.params["spectrum"]["matrices"] if m["chosen"]}
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    copies = {canonical(n) for n in trainable if ".modules_to_save." in n}
    assert copies == chosen | {n.removesuffix("weight") + "bias" for n in chosen} | HEAD
    lora = {n for n, _ in prep.model.named_parameters() if "lora_" in n}
    assert lora and lora <= trainable
    assert trainable == lora | {n for n in trainable if ".modules_to_save." in n}


def test_scores_are_cached_per_model(quick, tiny_bert6, tiny_bert, cache_dir):
    first = _prepare(quick, tiny_bert6, "freeze.spectrum.share=0.25").params["spectrum"]
    again = _prepare(quick, tiny_bert6, "freeze.spectrum.share=0.5").params["spectrum"]
    other = _prepare(quick, tiny_bert, "freeze.spectrum.share=0.25").params["spectrum"]
    assert (first["from_cache"], again["from_cache"], other["from_cache"]) == (False, True, False)
    assert [m["score"] for m in again["matrices"]] == [m["score"] for m in first["matrices"]]
    assert len(list((cache_dir / "spectrum").glob("*.json"))) == 2  # one entry per model


def test_params_shows_the_scores_and_the_choice(quick, tiny_bert6):
    runner = CliRunner()
    result = runner.invoke(app, ["params", *quick(tiny_bert6, "freeze.spectrum.share=0.25"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["spectrum"]
    assert sum(m["chosen"] for m in report["matrices"]) == 2 * len(TYPES)
    shown = runner.invoke(app, ["params", *quick(tiny_bert6, "freeze.spectrum.share=0.25")])
    assert shown.exit_code == 0, shown.output
    assert "spectrum: SNR score per matrix" in shown.stdout and "block.5" in shown.stdout
    assert shown.stdout.count(" *") >= 2 * len(TYPES) - 2  # the chosen cells (rich may fold a few)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["freeze.spectrum.share=0"], ["freeze.spectrum.share", "0"]),
        (["freeze.spectrum.share=1.5"], ["freeze.spectrum.share", "1.5"]),
        (["freeze.spectrum.share=0.25", "freeze.spectrum.unit=layer"], ["freeze.spectrum.unit", "layer"]),
        (["freeze.spectrum.share=0.25", "freeze.frozen=[head]"], ["freeze.frozen", "freeze.spectrum"]),
        (["freeze.spectrum.share=0.25", "stages=[{train: [head]}]"], ["stages", "freeze"]),
    ],
)
def test_bad_settings_exit_2_before_the_run_dir(quick, tiny_bert6, tmp_path, extra, words):
    refused(["train", *quick(tiny_bert6, *extra)], tmp_path / "runs", *words)


def test_killed_and_resumed_ends_like_an_uninterrupted_run(quick, tiny_bert6, tmp_path):
    # with gradient checkpointing too: its recomputation must not disturb the resumed RNG stream
    from safetensors.torch import load_file

    from .test_resume import _killed, _steps
    from .test_resume import _train as train_cli

    args = quick(
        tiny_bert6,
        "freeze.spectrum.share=0.25",
        "train.gradient_checkpointing=true",
        "train.eval_steps=4",
        "train.early_stopping.patience=null",
    )
    train_cli([*args, "output.name=straight"])
    _killed([*args, "output.name=killed"], "step:6")
    run = tmp_path / "runs" / "killed"
    assert _steps(run) == [4]
    train_cli(["--resume", str(run)])
    ours, theirs = (
        load_file(r / "final" / "model.safetensors") for r in (run, tmp_path / "runs" / "straight")
    )
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    chosen = [
        json.loads((r / "params.json").read_text())["spectrum"] for r in (run, tmp_path / "runs" / "straight")
    ]
    assert [m["chosen"] for m in chosen[0]["matrices"]] == [m["chosen"] for m in chosen[1]["matrices"]]
