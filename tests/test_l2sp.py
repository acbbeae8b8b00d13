"""l2sp (Li et al. 2018): the term is α·½‖w − w⁰‖² over the trained pretrained parameters + β·½‖w‖²
over the new ones, with w⁰ the checkpoint's values (read back from the file here, independently of the
part); w⁰ is in no state dict, checkpoint or final/; it composes with the other parts; bad settings stop
before the run dir; a killed and resumed run ends like an uninterrupted one (w⁰ rebuilt from the
pretrained checkpoint, not from the one it resumes)."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, Trainer

from hybridtune import api, strategy
from hybridtune.recipe import load_recipe
from hybridtune.strategy import l2sp
from hybridtune.strategy.l2sp import anchor_of
from hybridtune.train.engine import make_trainer, training_arguments

from .refusal import refused
from .test_resume import _killed, _steps
from .test_resume import _train as _cli_train

ALPHA, BETA = 0.5, 0.25


def _overrides(model: str, data: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"model={model}",
        f"data.source={data}",
        "train.max_steps=4",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.early_stopping.patience=null",
        "data.max_length=64",
        f"output.dir={tmp_path / 'runs'}",
        *extra,
    ]


def _short(name: str) -> str:
    return re.sub(r"^base_model\.model\.", "", name)


def _sets(model: str, data: str, tmp_path: Path, *extra: str) -> tuple[set[str], set[str]]:
    """(anchored, new) parameter names of the prepared model, without peft's prefix."""
    prep = api.prepare(load_recipe(None, _overrides(model, data, tmp_path, *extra)))
    anchor = anchor_of(prep.model)
    return {_short(n) for n in anchor.names}, {_short(n) for n in anchor.new_names}


# --------------------------------------------------------------------------------------------------
# the paper's term


def test_the_term_and_its_gradient_are_the_hand_computed_ones(still_bert, sentiment_csv, tmp_path):
    """On one batch of a model without dropout: (loss with the part) − (the task loss alone) is
    α/2·Σ‖w − w⁰‖² + β/2·‖head‖², with w⁰ read from the checkpoint file, and so are the gradients."""
    recipe = load_recipe(
        None, _overrides(still_bert, sentiment_csv, tmp_path, f"l2sp.alpha={ALPHA}", f"l2sp.beta={BETA}")
    )
    prep = api.prepare(recipe)
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    trainer = make_trainer(prep.model, prep.tokenizer, prep.datasets, recipe, args, tmp_path, None, prep.plan)
    model = trainer.model.train()
    params = dict(model.named_parameters())
    pretrained = {f"bert.{k}": v for k, v in load_file(Path(still_bert) / "model.safetensors").items()}
    assert set(anchor_of(model).names) == set(pretrained)  # full fine-tuning: every loaded parameter
    assert set(anchor_of(model).new_names) == {"classifier.weight", "classifier.bias"}
    torch.manual_seed(1)
    with torch.no_grad():  # the base moved away from w⁰, as after some steps
        for name in pretrained:
            params[name].add_(0.01 * torch.randn_like(params[name]))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))

    def loss_and_grads(compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = compute(trainer, model, dict(batch))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in params.items()}

    with_part, grads = loss_and_grads(type(trainer).compute_loss)
    plain, plain_grads = loss_and_grads(Trainer.compute_loss)
    drift = sum(((params[n].detach() - w0) ** 2).sum() for n, w0 in pretrained.items())
    head = sum((params[n].detach() ** 2).sum() for n in ("classifier.weight", "classifier.bias"))
    assert drift > 1 and head > 0.01
    torch.testing.assert_close(with_part - plain, ALPHA / 2 * drift + BETA / 2 * head)
    for name in (
        "bert.encoder.layer.1.attention.self.query.weight",
        "bert.embeddings.word_embeddings.weight",
    ):
        torch.testing.assert_close(
            grads[name] - plain_grads[name], ALPHA * (params[name].detach() - pretrained[name])
        )
    torch.testing.assert_close(
        grads["classifier.weight"] - plain_grads["classifier.weight"],
        BETA * params["classifier.weight"].detach(),
    )


def test_the_addends_are_logged_and_weight_decay_is_replaced(tiny_bert, sentiment_csv, tmp_path):
    """loss = task + α·l2sp + β·l2sp_new at each logged step; and with α = β = 0 the run is exactly a
    plain run with train.weight_decay 0 (the part's weight decay), not the default 0.01's."""
    base = _overrides(tiny_bert, sentiment_csv, tmp_path, "train.max_steps=6", "train.logging_steps=1")
    run = Path(
        api.train(
            load_recipe(None, [*base, f"l2sp.alpha={ALPHA}", f"l2sp.beta={BETA}", "output.name=with-part"])
        )["run_dir"]
    )
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 6 and steps[-1]["loss_l2sp"] > 0 and steps[0]["loss_l2sp_new"] > 0
    for r in steps:
        assert r["loss"] == pytest.approx(
            r["loss_task"] + ALPHA * r["loss_l2sp"] + BETA * r["loss_l2sp_new"], abs=2e-3
        )

    def final(*extra: str) -> dict[str, torch.Tensor]:
        out = api.train(load_recipe(None, [*base, *extra]))["run_dir"]
        return load_file(Path(out) / "final" / "model.safetensors")

    zero = final("l2sp.alpha=0", "l2sp.beta=0", "train.weight_decay=0.5", "output.name=zero")
    no_decay = final("train.weight_decay=0", "output.name=no-decay")
    decay = final("train.weight_decay=0.5", "output.name=decay")
    assert max((zero[k] - no_decay[k]).abs().max().item() for k in zero) <= 1e-6
    assert max((zero[k] - decay[k]).abs().max().item() for k in zero) > 1e-4


# --------------------------------------------------------------------------------------------------
# which parameters: composition with the other parts

HEAD = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}  # pretrained, in the head slot
CLASSIFIER = {"classifier.weight", "classifier.bias"}


def _block(i: int, names: set[str]) -> set[str]:
    return {n for n in names if n.startswith(f"bert.encoder.layer.{i}.")}


@pytest.fixture
def all_names(tiny_bert) -> set[str]:
    return {f"bert.{k}" for k in load_file(Path(tiny_bert) / "model.safetensors")}


def test_freeze_anchors_what_it_keeps(tiny_bert, sentiment_csv, tmp_path, all_names):
    anchored, new = _sets(
        tiny_bert, sentiment_csv, tmp_path, "l2sp.alpha=1", "freeze.trainable=[{top_k: 1}, head]"
    )
    assert anchored == _block(1, all_names) | HEAD and new == CLASSIFIER


def test_a_later_stage_is_anchored_from_the_start(tiny_bert, sentiment_csv, tmp_path, all_names):
    stages = "stages=[{steps: 2, train: [head]}, {train: [{top_k: 1}]}]"
    anchored, new = _sets(tiny_bert, sentiment_csv, tmp_path, "l2sp.alpha=1", stages)
    assert anchored == _block(1, all_names) | HEAD and new == CLASSIFIER


def test_layer_decay_anchors_every_pretrained_parameter(tiny_bert, sentiment_csv, tmp_path, all_names):
    anchored, new = _sets(tiny_bert, sentiment_csv, tmp_path, "l2sp.alpha=1", "lr.layer_decay=0.8")
    assert anchored == all_names and new == CLASSIFIER


@pytest.mark.parametrize(
    ("extra", "new_pattern"),
    [
        (["peft.method=lora"], r"lora_[AB]\.|^classifier\.modules_to_save\."),
        (["adapters.method=pfeiffer"], r"bottleneck_adapters\.|^classifier\."),
        (["soft_prompt.num_virtual_tokens=4"], r"soft_prompt|^classifier\."),
    ],
    ids=["lora", "adapters", "soft_prompt"],
)
def test_added_weights_are_new_and_the_frozen_base_is_not_anchored(
    tiny_bert, sentiment_csv, tmp_path, extra, new_pattern
):
    prep = api.prepare(
        load_recipe(None, _overrides(tiny_bert, sentiment_csv, tmp_path, "l2sp.alpha=1", *extra))
    )
    anchor = anchor_of(prep.model)
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert anchor.names == []
    assert set(anchor.new_names) == trainable and trainable
    assert all(re.search(new_pattern, _short(n)) for n in trainable), sorted(trainable)[:4]


def test_lora_beside_a_kept_block_anchors_peft_s_copy_to_the_original(
    tiny_bert, sentiment_csv, tmp_path, monkeypatch
):
    """freeze + LoRA: the kept block trains as peft's modules_to_save copy; that copy is anchored to
    the pretrained value (the frozen original), and a few steps change exactly the copies, LoRA and
    the head, as without l2sp."""
    seen = {}
    real = strategy.apply

    def spy(model, recipe, build):
        model = real(model, recipe, build)
        seen["model"], seen["before"] = model, {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch.setattr(strategy, "apply", spy)
    extra = ["l2sp.alpha=1", "peft.method=lora", "freeze.trainable=[{top_k: 1}, head]"]
    api.train(load_recipe(None, _overrides(tiny_bert, sentiment_csv, tmp_path, *extra)))
    model, before = seen["model"], seen["before"]
    anchor = anchor_of(model)
    copies = r"^bert\.(encoder\.layer\.1|pooler)\.modules_to_save\.default\."
    assert anchor.names and all(re.search(copies, _short(n)) for n in anchor.names), anchor.names[:3]
    originals = dict(model.named_parameters())
    for name, w0 in zip(anchor.names, anchor.targets, strict=True):
        assert torch.equal(w0, originals[name.replace("modules_to_save.default.", "original_module.")])
    changed = {_short(n) for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    intended = {_short(n) for n in anchor.names + anchor.new_names}
    assert changed == intended and any("lora_A" in n for n in changed)


# --------------------------------------------------------------------------------------------------
# artifacts, bad settings, resume


def _keys(path: Path) -> set[str]:
    return set(load_file(path / "model.safetensors"))


def test_w0_is_in_no_checkpoint_or_final_and_a_resumed_run_ends_like_an_uninterrupted_one(
    tiny_bert, sentiment_csv, tmp_path, monkeypatch
):
    args = [
        *_overrides(tiny_bert, sentiment_csv, tmp_path, "l2sp.alpha=2", "l2sp.beta=0.5"),
        "train.max_steps=10",
        "train.eval_steps=4",
        "train.early_stopping.metric=loss",
    ]
    _cli_train([*args, "output.name=straight"])
    _killed([*args, "output.name=killed"], "step:6")
    run, straight = tmp_path / "runs" / "killed", tmp_path / "runs" / "straight"
    control = tmp_path / "runs" / "control"
    shutil.copytree(run, control)
    _cli_train(["--resume", str(run)])
    last = f"checkpoints/checkpoint-{_steps(run)[-1]}"

    def diff(a: Path, where: str) -> float:
        ours, theirs = (
            load_file(a / where / "model.safetensors"),
            load_file(straight / where / "model.safetensors"),
        )
        assert ours.keys() == theirs.keys()
        return max((ours[k] - theirs[k]).abs().max().item() for k in ours)

    assert diff(run, "final") <= 1e-6 and diff(run, last) <= 1e-6
    # the control: anchored to the checkpoint it resumes from instead, the run ends elsewhere (so the
    # comparison above can tell the two apart)
    real = l2sp.apply

    def anchored_to_the_checkpoint(model, config, build):
        model = real(model, config, build)
        anchor, resumed = anchor_of(model), load_file(control / "checkpoints/checkpoint-4/model.safetensors")
        anchor.targets = [resumed[n].clone() for n in anchor.names]
        return model

    monkeypatch.setitem(
        strategy.PARTS, "l2sp", dataclasses.replace(l2sp.PART, apply=anchored_to_the_checkpoint)
    )
    _cli_train(["--resume", str(control)])
    assert diff(control, last) > 1e-5
    # plain transformers' keys, nothing more: no w⁰ anywhere
    model, info = AutoModelForSequenceClassification.from_pretrained(run / "final", output_loading_info=True)
    assert not any(info.values()), info
    assert _keys(run / "final") == set(model.state_dict()) == _keys(run / last)
    pretrained = load_file(Path(tiny_bert) / "model.safetensors")
    assert {f"bert.{k}" for k in pretrained} | CLASSIFIER == _keys(run / "final")


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["l2sp.alpha=-0.1"], ["l2sp.alpha", "-0.1"]),
        (["l2sp.beta=-1"], ["l2sp.beta", "-1"]),
        (["l2sp.gamma=1"], ["gamma"]),
        (["l2sp.alpha=1", "contrastive.pairs=2", "pooling=mean"], ["l2sp", "contrastive"]),
    ],
    ids=["alpha", "beta", "unknown-key", "contrastive"],
)
def test_bad_settings_stop_before_the_run_dir(tiny_bert, sentiment_csv, tmp_path, extra, words):
    refused(["train", *_overrides(tiny_bert, sentiment_csv, tmp_path, *extra)], tmp_path / "runs", *words)


def test_with_the_trunk_cache_and_a_prompt_objective(
    tiny_bert, tiny_bert_mlm, sentiment_csv, tmp_path, prompt_run
):
    """The term needs no forward: the frozen trunk is still cached; and it adds to another loss part's
    terms (PET's LM objective on a tied MLM head, with mixout mixing the trained layers)."""
    extra = ["l2sp.alpha=1", "freeze.trainable=[{top_k: 1}, head]", "train.trunk_cache=on"]
    assert (
        api.prepare(load_recipe(None, _overrides(tiny_bert, sentiment_csv, tmp_path, *extra))).trunk_depth
        == 1
    )
    args = prompt_run(tiny_bert_mlm, "train.max_steps=3", "train.logging_steps=1", "l2sp.alpha=1")
    run = Path(api.train(load_recipe(None, [*args, "objective.lm_weight=0.5", "mixout.p=0.5"]))["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(rows) == 3 and all({"loss_l2sp", "loss_lm", "loss_task"} <= set(r) for r in rows)
    assert rows[-1]["loss_l2sp"] > 0
