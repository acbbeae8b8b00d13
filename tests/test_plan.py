"""Layer-wise learning rates, schedules (incl. STLR) and staged unfreezing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridtune import api
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.strategy.schedule import ScheduleConfig, lr_lambda, multiplier
from hybridtune.strategy.stages import StagePlan, enter_stage


# ---------------------------------------------------------------------------------------------- schedules
def test_stlr_matches_howard_and_ruder_eq3():
    cfg = ScheduleConfig(name="stlr", cut_frac=0.1, ratio=32)
    total = 1000
    cut = 100
    assert multiplier(cfg, 0, total) == pytest.approx(1 / 32)
    assert multiplier(cfg, cut, total) == pytest.approx(1.0)
    for t in (37, 100, 450, 999):  # eq. 3 of the paper
        p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / 0.1 - 1))
        assert multiplier(cfg, t, total) == pytest.approx((1 + p * 31) / 32)
    values = [multiplier(cfg, t, total) for t in range(total)]
    assert values.index(max(values)) == cut


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup"])
def test_schedules_match_transformers(name):
    from transformers import get_scheduler

    total, warmup = 50, 0.1
    cfg = ScheduleConfig(name=name, warmup=warmup)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = get_scheduler(name, opt, num_warmup_steps=math.ceil(warmup * total), num_training_steps=total)
    for step in range(total):
        assert multiplier(cfg, step, total) == pytest.approx(ref.get_last_lr()[0], abs=1e-9), step
        opt.step()
        ref.step()


def test_stage_scales_and_per_stage_restart():
    cfg = ScheduleConfig(name="linear", warmup=0.0, per_stage=True)
    fn = lr_lambda(cfg, total=30, bounds=[0, 10, 20], scales=[1.0, 0.5, 0.25])
    assert fn(0) == pytest.approx(1.0) and fn(10) == pytest.approx(0.5) and fn(20) == pytest.approx(0.25)
    assert fn(15) == pytest.approx(0.5 * 0.5)
    whole = lr_lambda(ScheduleConfig(name="linear", warmup=0.0), total=30, bounds=[0, 10], scales=[1.0, 2.0])
    assert whole(15) == pytest.approx(2.0 * (1 - 15 / 30))


# ---------------------------------------------------------------------------------------------- lr plan
def _prep(quick, *extra):
    return api.prepare(load_recipe(None, quick(None, *extra)))


def test_layer_decay_gives_each_block_its_own_lr(quick):
    prep = _prep(quick, "lr.layer_decay=0.5", "train.lr=0.01")
    rows = {r["slot"]: r for r in prep.params["rows"]}
    assert rows["head"]["lr"] == pytest.approx(0.01)
    assert rows["block.1"]["lr"] == pytest.approx(0.005)
    assert rows["block.0"]["lr"] == pytest.approx(0.0025)
    assert rows["embeddings"]["lr"] == pytest.approx(0.00125)


def test_head_lr_and_explicit_groups_override(quick):
    prep = _prep(
        quick, "lr.layer_decay=0.5", "lr.head=0.1", "lr.groups=[{blocks: [0], lr: 0.3}]", "train.lr=0.01"
    )
    rows = {r["slot"]: r for r in prep.params["rows"]}
    assert rows["head"]["lr"] == pytest.approx(0.1) and rows["block.0"]["lr"] == pytest.approx(0.3)


def test_ahf_levels_split_blocks_bottom_middle_top(quick, tmp_path):
    prep = _prep(quick, "lr.levels=2", "lr.level_lr=[0.001, 0.002]")
    rows = {r["slot"]: r for r in prep.params["rows"]}
    assert rows["embeddings"]["lr"] == 0.001 and rows["block.0"]["lr"] == 0.001
    assert rows["block.1"]["lr"] == 0.002 and rows["head"]["lr"] == 0.002


def test_optimizer_param_groups_follow_the_plan_and_skip_decay_on_bias_and_norms(quick, tmp_path):
    from hybridtune.train.engine import make_trainer, training_arguments

    recipe = load_recipe(None, quick(None, "lr.layer_decay=0.5", "train.lr=0.01", "train.weight_decay=0.1"))
    prep = api.prepare(recipe)
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    trainer = make_trainer(
        prep.model, prep.tokenizer, prep.datasets, recipe, args, tmp_path, None, plan=prep.plan
    )
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in prep.model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            assert group["lr"] == pytest.approx(prep.plan.lrs[name][0])
            is_no_decay = name.endswith("bias") or "LayerNorm" in name
            assert group["weight_decay"] == (0.0 if is_no_decay else 0.1), name
    held = {names[id(p)] for g in optimizer.param_groups for p in g["params"]}
    assert held == {n for n, p in prep.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "extra, where",
    [
        (["lr.groups=[{blocks: [0], lr: 0.1}, {match: 'layer\\.0\\.', lr: 0.2}]"], "lr.groups[1]"),
        (["lr.groups=[{blocks: [7], lr: 0.1}]"], "lr.groups[0].blocks"),
        (["lr.groups=[{match: 'nothing-like-this', lr: 0.1}]"], "lr.groups[0]"),
        (["stages=[{steps: 1, train: [head]}, {train: [{layers: [9]}]}]"], "stages.plan[1].train[0].layers"),
        (["stages=[{steps: 500, train: [head]}, {train: [all]}]"], "stages.plan[1]"),
    ],
)
def test_impossible_plans_are_refused_before_training(quick, tmp_path, extra, where):
    with pytest.raises(UserError) as info:
        api.train(load_recipe(None, quick(None, *extra)))
    assert str(info.value).startswith(where), str(info.value)
    assert not (tmp_path / "runs").exists()


def test_freeze_and_stages_together_are_refused():
    with pytest.raises(UserError, match="give `freeze` or `stages`, not both"):
        load_recipe(None, ["freeze.trainable=[head]", "stages=[{train: [all]}]"])


# ---------------------------------------------------------------------------------------------- stages
def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / "model.safetensors")


STAGES = "stages=[{steps: 2, train: [head]}, {steps: 2, train: [{top_k: 1}]}, {train: [all], lr_scale: 0.5}]"


def test_gradual_unfreezing_trains_exactly_the_stage_selection(quick, tiny_bert):
    """Checkpoints after stage 0 (step 2) and stage 1 (step 4): what changed is what the stages train."""
    before = {"bert." + k: v for k, v in load_file(Path(tiny_bert) / "model.safetensors").items()}
    extra = (
        STAGES,
        "train.max_steps=6",
        "train.eval_steps=2",
        "output.keep_checkpoints=5",
        "train.early_stopping.patience=null",
    )
    run = Path(api.train(load_recipe(None, quick(None, *extra)))["run_dir"])

    def changed_at(step: int) -> set[str]:
        after = load_file(run / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")
        return {k for k, v in before.items() if not torch.equal(v, after[k])}

    assert changed_at(2) and all(k.startswith("bert.pooler.") for k in changed_at(2)), changed_at(2)
    at4 = changed_at(4)
    assert any(k.startswith("bert.encoder.layer.1.") for k in at4)
    assert all(k.startswith(("bert.pooler.", "bert.encoder.layer.1.")) for k in at4), at4
    assert any(k.startswith(("bert.encoder.layer.0.", "bert.embeddings.")) for k in changed_at(6))


def test_stage_changes_are_logged(quick):
    summary = api.train(load_recipe(None, quick(None, STAGES, "train.max_steps=6")))
    records = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    stages = [r for r in records if "stage" in r]
    assert [(r["stage"], r["step"]) for r in stages] == [(0, 0), (1, 2), (2, 4)]
    assert stages[0]["trainable"] < stages[1]["trainable"] < stages[2]["trainable"]
    assert stages[2]["lr_scale"] == 0.5
    report = json.loads((Path(summary["run_dir"]) / "report.json").read_text())
    assert report["trainable"] == stages[2]["trainable"]  # the most any stage trains
    lrs = [r["learning_rate"] for r in records if "learning_rate" in r]
    assert lrs, "no lr logged"


def test_unfrozen_parameters_start_with_clean_optimizer_state():
    model = torch.nn.Linear(2, 2)
    names = {n for n, _ in model.named_parameters()}
    plan = StagePlan(starts=[0, 1], scales=[1.0, 1.0], trainable=[set(), set(names)])
    opt = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        opt.state[p] = {"exp_avg": torch.ones_like(p)}
    enter_stage(model, plan, 0, names, opt)
    assert not any(p.requires_grad for p in model.parameters())
    enter_stage(model, plan, 1, names, opt)
    assert all(p.requires_grad for p in model.parameters())
    assert all(p not in opt.state for p in model.parameters())


def test_non_cumulative_stages_train_only_their_own_selection(quick):
    recipe = load_recipe(
        None,
        quick(None, "stages={cumulative: false, plan: [{steps: 1, train: [head]}, {train: [{top_k: 1}]}]}"),
    )
    prep = api.prepare(recipe)
    assert prep.plan.stages.trainable[1].isdisjoint(
        {n for n in prep.plan.stages.trainable[0] if "classifier" in n}
    )


def test_stage_lengths_as_fractions_fit_any_budget(quick):
    stages = "stages=[{fraction: 0.25, train: [head]}, {fraction: 0.5, train: [{top_k: 1}]}, {train: [all]}]"
    for steps, starts in ((8, [0, 2, 6]), (20, [0, 5, 15])):
        prep = api.prepare(load_recipe(None, quick(None, stages, f"train.max_steps={steps}")))
        assert prep.plan.stages.starts == starts
