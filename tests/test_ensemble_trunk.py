"""Ensemble members over one frozen trunk: the shared blocks run once, at inference and in training
(ensemble.Ensemble's shared trunk, `ensemble.shared_trunk` in a recipe)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hybridtune import api, ensemble
from hybridtune.cli import app
from hybridtune.recipe import load_recipe
from tests.test_ensemble import _quick, _state


def test_members_above_a_frozen_trunk_run_it_once_and_predict_the_same(tmp_path, tiny_bert6, sentiment_csv):
    """Three top-1 members of a 6-block model share embeddings + 5 blocks: those run once per batch."""
    runs = [
        api.train(
            load_recipe(
                None,
                _quick(
                    tiny_bert6,
                    sentiment_csv,
                    tmp_path / "runs",
                    "train.epochs=1",
                    f"train.seed={seed}",
                    "freeze.trainable=[{top_k: 1}, head]",
                    f"output.name=top1-{seed}",
                ),
            )
        )["run_dir"]
        for seed in (1, 2, 3)
    ]
    out = tmp_path / "ens"
    ensemble.build(runs, str(out))
    shared = ensemble.Ensemble(out)
    plain = ensemble.Ensemble(out, share_trunk=False)
    assert shared.shared is not None and shared.shared.depth == 5 and plain.shared is None
    # count block forwards: a shared trunk runs 5 blocks once + 3 top blocks, instead of 3 x 6
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    for member in shared.members + plain.members:
        for block in member.loaded.model.bert.encoder.layer:
            if not isinstance(block, ensemble.Replay):
                block.register_forward_hook(count)
    frame = ensemble.split_frames(shared.members[0])["test"].iloc[:16]  # one batch
    got = shared.probs(frame)
    assert calls["n"] == 5 + 3
    calls["n"] = 0
    want = plain.probs(frame)
    assert calls["n"] == 3 * 6
    np.testing.assert_allclose(got, want, atol=1e-6)


def _no_dropout(model_dir: str, out: Path) -> Path:
    model = Path(shutil.copytree(model_dir, out))
    config = json.loads((model / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_shared_trunk_training_runs_the_trunk_once_and_each_member_learns_as_if_alone(
    tmp_path, tiny_bert6, sentiment_csv
):
    """3 top-1 members of a 6-block model trained together: member 0 ends where it ends when trained
    alone (no dropout, no gradient clipping: each member's gradients are its own)."""
    model = _no_dropout(tiny_bert6, tmp_path / "tiny")
    common = _quick(
        str(model),
        sentiment_csv,
        tmp_path / "runs",
        "train.epochs=1",
        "train.max_grad_norm=1e9",
        "freeze.trainable=[{top_k: 1}, head]",
    )
    calls = {"leader": 0}
    original = ensemble.JointMembers.__init__

    def counting_init(self, models, depth):
        original(self, models, depth)
        models[0].bert.encoder.layer[0].register_forward_hook(
            lambda *_: calls.__setitem__("leader", calls["leader"] + 1)
        )

    ensemble.JointMembers.__init__ = counting_init
    try:
        summary = api.train(
            load_recipe(
                None, [*common, "output.name=joint", "ensemble.members=3", "ensemble.shared_trunk=true"]
            )
        )
    finally:
        ensemble.JointMembers.__init__ = original
    run = Path(summary["run_dir"])
    assert summary["shared_trunk_blocks"] == 5
    # block 0 ran once per training batch and per evaluation batch, not three times
    assert 0 < calls["leader"] <= summary["steps"] + 10
    alone = Path(api.train(load_recipe(None, [*common, "output.name=alone"]))["run_dir"])
    a, j = _state(str(alone)), load_file(str(run / "members/0/final/model.safetensors"))
    assert a.keys() == j.keys()
    for key in a:
        torch.testing.assert_close(j[key], a[key], atol=1e-5, rtol=1e-4)
    # the followers are complete models of their own again, with the shared (untouched) trunk
    f = load_file(str(run / "members/2/final/model.safetensors"))
    torch.testing.assert_close(
        f["bert.encoder.layer.0.output.dense.weight"], a["bert.encoder.layer.0.output.dense.weight"]
    )
    assert not torch.equal(f["classifier.weight"], j["classifier.weight"])  # its own head (seed 44)
    assert api.evaluate(str(run))["accuracy"] == summary["test"]["accuracy"]


def test_shared_trunk_training_refuses_members_without_a_frozen_trunk(tmp_path, tiny_bert, sentiment_csv):
    res = CliRunner().invoke(
        app,
        [
            "train",
            *_quick(
                tiny_bert, sentiment_csv, tmp_path / "runs", "output.name=j", "ensemble.shared_trunk=true"
            ),
        ],
    )
    assert res.exit_code == 2 and "ensemble.shared_trunk" in res.output and "frozen" in res.output
    assert not (tmp_path / "runs" / "j").exists()
