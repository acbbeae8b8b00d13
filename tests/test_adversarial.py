"""adversarial (strategy/adversarial.py): FGM's perturbation is epsilon along the embedding gradient and
its term is the task loss there; PGD's K steps match a hand computation; exactly the intended
parameters train, with every part it composes with; bad settings stop before the run dir; a killed
run resumes to the uninterrupted run's weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridtune import api, strategy
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.strategy import adversarial
from hybridtune.strategy.adversarial import adversary_of, project, unit
from hybridtune.train.engine import make_trainer, training_arguments
from tests.test_causal_lm import colour_rows, write_jsonl

from .refusal import refused
from .test_recipes import _run
from .test_resume import _killed, _metrics, _steps
from .test_resume import _train as _train_cli


def _overrides(model: str, data: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"model={model}",
        f"data.source={data}",
        "data.max_length=32",
        "train.batch_size=8",
        "train.lr=0.01",
        "train.precision=fp32",
        "train.early_stopping.patience=null",
        f"output.dir={tmp_path / 'runs'}",
        *extra,
    ]


def _trainer_and_batch(recipe, tmp_path):
    """The run's HybridTrainer (with the parts' callbacks), its model in training mode, one batch, and
    the part's hooks in place."""
    prep = api.prepare(recipe)
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    callbacks = strategy.callbacks(prep.model, recipe, prep.build)
    trainer = make_trainer(
        prep.model, prep.tokenizer, prep.datasets, recipe, args, tmp_path, None, prep.plan, callbacks
    )
    model = trainer.model.train()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert adversary_of(model) is not None
    return trainer, model, batch


def _embedding_outputs(model) -> list[torch.Tensor]:
    """What the layers after the input embeddings see, one tensor per call (a hook after the part's)."""
    seen: list[torch.Tensor] = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    return seen


def _loss_at(model, batch, embeds):
    """The task loss with the given word-embedding output, computed without the part's hooks (BERT
    adds position and token-type embeddings to `inputs_embeds` as it does to the looked-up ids)."""
    inputs = {k: v for k, v in batch.items() if k != "input_ids"}
    return model(inputs_embeds=embeds, **inputs).loss


def test_fgm_perturbs_by_epsilon_along_the_gradient_and_adds_the_loss_there(
    still_bert, sentiment_csv, tmp_path
):
    epsilon, weight = 0.7, 0.5
    recipe = load_recipe(
        None,
        _overrides(
            still_bert,
            sentiment_csv,
            tmp_path,
            f"adversarial.epsilon={epsilon}",
            f"adversarial.weight={weight}",
        ),
    )
    trainer, model, batch = _trainer_and_batch(recipe, tmp_path)
    seen = _embedding_outputs(model)
    total = trainer.compute_loss(model, dict(batch))
    assert len(seen) == 2  # the training forward, then the adversarial one
    r = seen[1] - seen[0]

    clean = seen[0].clone().requires_grad_()
    task = _loss_at(model, batch, clean)
    (g,) = torch.autograd.grad(task, clean)
    norms = r.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, epsilon), rtol=1e-4, atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(r.flatten(1), g.flatten(1), dim=1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=1e-4)
    by_hand = epsilon * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(r, by_hand, rtol=1e-3, atol=1e-5)
    # padding: out of attention and unlabelled, so no gradient and no perturbation
    pads = batch["attention_mask"] == 0
    assert pads.any() and r[pads].abs().max() == 0
    expected = task + weight * _loss_at(model, batch, seen[0] + by_hand)
    torch.testing.assert_close(total.detach(), expected.detach(), rtol=1e-5, atol=1e-5)


def test_pgd_takes_k_projected_steps_and_trains_on_the_last(still_bert, sentiment_csv, tmp_path):
    """K = 2, alpha 0.3, epsilon 0.5: the second step leaves the ball and is projected back to it."""
    eps, alpha = 0.5, 0.3
    extra = (
        "adversarial.method=pgd",
        f"adversarial.epsilon={eps}",
        f"adversarial.alpha={alpha}",
        "adversarial.steps=2",
    )
    recipe = load_recipe(None, _overrides(still_bert, sentiment_csv, tmp_path, *extra))
    trainer, model, batch = _trainer_and_batch(recipe, tmp_path)
    seen = _embedding_outputs(model)
    total = trainer.compute_loss(model, dict(batch))
    assert len(seen) == 3  # the training forward, one ascent step's, the adversarial one

    x = seen[0]
    point = x.clone().requires_grad_()
    (g0,) = torch.autograd.grad(_loss_at(model, batch, point), point)
    d1 = (alpha * g0 / g0.flatten(1).norm(dim=1).view(-1, 1, 1)).requires_grad_()
    (g1,) = torch.autograd.grad(_loss_at(model, batch, x + d1), d1)
    d2 = d1.detach() + alpha * g1 / g1.flatten(1).norm(dim=1).view(-1, 1, 1)
    d2 = d2 * (eps / d2.flatten(1).norm(dim=1)).clamp(max=1).view(-1, 1, 1)
    torch.testing.assert_close(seen[1] - x, d1.detach(), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(seen[2] - x, d2, rtol=1e-3, atol=1e-5)
    norms = d2.flatten(1).norm(dim=1)
    assert (norms - eps).abs().max() < 1e-4  # projected onto the ball's surface
    task = _loss_at(model, batch, x)
    expected = task + _loss_at(model, batch, x + d2)
    torch.testing.assert_close(total.detach(), expected.detach(), rtol=1e-5, atol=1e-5)


def test_unit_and_project_per_example():
    g = torch.tensor([[[3.0, 4.0]], [[0.0, 0.0]]])
    torch.testing.assert_close(unit(g), torch.tensor([[[0.6, 0.8]], [[0.0, 0.0]]]))
    d = torch.tensor([[[3.0, 4.0]], [[0.3, 0.4]]])
    torch.testing.assert_close(project(d, 1.0), torch.tensor([[[0.6, 0.8]], [[0.3, 0.4]]]))


def test_with_a_soft_prompt_only_the_word_embeddings_are_perturbed(
    still_bert, sentiment_csv, tmp_path, monkeypatch
):
    n, eps = 4, 0.7
    extra = (f"soft_prompt.num_virtual_tokens={n}", f"adversarial.epsilon={eps}")
    recipe = load_recipe(None, _overrides(still_bert, sentiment_csv, tmp_path, *extra))
    trainer, model, batch = _trainer_and_batch(recipe, tmp_path)
    deltas = []
    loss_at = adversarial.Adversary.loss_at
    monkeypatch.setattr(
        adversarial.Adversary, "loss_at", lambda s, m, i, e, d: deltas.append(d) or loss_at(s, m, i, e, d)
    )
    seen = _embedding_outputs(model)  # after the soft prompt's hook: what the blocks see
    trainer.compute_loss(model, dict(batch))
    (delta,) = deltas
    assert delta.shape[1] == batch["input_ids"].shape[1] + n  # the placeholders' positions are in it
    assert delta[:, :n].abs().max() == 0  # overwritten by the prompt: no gradient, no perturbation
    norms = delta[:, n:].flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, eps), rtol=1e-4, atol=1e-5)
    prompt = model.soft_prompt.weight.detach()
    for out in seen:
        torch.testing.assert_close(out[:, :n], prompt.expand(out.shape[0], -1, -1))


# exactly which parameters change, with each part it composes with (regex on names without peft's prefix)
HEAD = r"^(bert\.pooler\.|classifier\.)"
COMPOSED = {
    "full": ([], r"."),
    "freeze_top1": (["freeze.trainable=[head, {top_k: 1}]"], HEAD + r"|^bert\.encoder\.layer\.1\."),
    "lora": (["peft.method=lora"], r"\.lora_[AB]\.|^classifier\.modules_to_save\."),
    # peft's prompt learning embeds the real tokens through the same layer, then prepends the prompt
    "prompt_tuning": (
        ["peft.method=prompt_tuning", "peft.num_virtual_tokens=4"],
        r"^prompt_encoder\.|classifier\.modules_to_save\.",
    ),
    "adapters": (["adapters.method=houlsby"], r"bottleneck_|^classifier\."),
    "soft_prompt_lora": (
        ["soft_prompt.num_virtual_tokens=4", "peft.method=lora"],
        r"soft_prompt\.weight$|\.lora_[AB]\.|^classifier\.modules_to_save\.",
    ),
    "layer_decay": (["lr.layer_decay=0.5"], r"."),
    "stages": (["stages=[{fraction: 0.5, train: [head]}, {train: [all]}]"], r"."),
}


@pytest.mark.parametrize("method", ["fgm", "pgd"])
@pytest.mark.parametrize("part", COMPOSED, ids=list(COMPOSED))
def test_exactly_the_intended_parameters_train(part, method, tiny_bert, sentiment_csv, tmp_path):
    overrides, pattern = COMPOSED[part]
    steps = ["adversarial.steps=2"] if method == "pgd" else []
    extra = ("train.max_steps=4", "train.logging_steps=2", f"adversarial.method={method}", *steps, *overrides)
    recipe = load_recipe(None, _overrides(tiny_bert, sentiment_csv, tmp_path, *extra))
    prep, changed, held = _run(recipe, tmp_path)
    names = [n for n, _ in prep.model.named_parameters()]
    intended = {
        n
        for n in names
        if re.search(pattern, n.removeprefix("base_model.model.")) and "original_module" not in n
    }
    assert changed == held == intended, (sorted(intended ^ changed)[:4], sorted(held ^ changed)[:4])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert logged and all(r["loss_adv"] > 0 and "loss_task" in r for r in logged)


def test_causal_lm_sft_with_lora(tiny_gpt2, tmp_path):
    """SFT: the loss on the answer tokens, normalised by Trainer's token count (num_items_in_batch),
    which the adversarial forward gets too: with 2 micro-batches both losses are on one scale."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", colour_rows(40))
    extra = (
        "task=causal_lm",
        "data.max_length=24",
        "train.max_steps=2",
        "train.grad_accum=2",
        "train.logging_steps=1",
        "peft.method=lora",
        "adversarial.method=fgm",
        "adversarial.epsilon=0.01",  # barely moved: the two losses must be nearly equal
    )
    recipe = load_recipe(None, _overrides(tiny_gpt2, pairs, tmp_path, *extra))
    prep, changed, held = _run(recipe, tmp_path)
    lora = {n for n, _ in prep.model.named_parameters() if re.search(r"\.lora_[AB]\.", n)}
    assert changed == held == lora
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert logged and all(abs(r["loss_adv"] - r["loss_task"]) < 0.02 * r["loss_task"] for r in logged)


def test_the_trunk_cache_and_a_shared_trunk_are_refused_by_name(tmp_path):
    with pytest.raises(UserError, match=r"train\.trunk_cache: found on, with adversarial training"):
        load_recipe(None, ["adversarial.method=fgm", "freeze.trainable=[head]", "train.trunk_cache=on"])
    with pytest.raises(UserError, match=r"adversarial: found it with ensemble\.shared_trunk"):
        load_recipe(None, ["adversarial.method=fgm", "freeze.trainable=[head]", "ensemble.shared_trunk=true"])
    auto = load_recipe(None, ["adversarial.method=fgm", "freeze.trainable=[head]"])
    from hybridtune.recipe.trunk import static_reason

    assert "adversarial" in static_reason(auto)  # `auto` then runs without the cache


@pytest.mark.parametrize(
    "setting, words",
    [
        ("adversarial.steps=0", ["adversarial.steps", "greater than or equal to 1"]),
        ("adversarial.epsilon=0", ["adversarial.epsilon", "greater than 0"]),
        ("adversarial.epsilon=-1", ["adversarial.epsilon", "greater than 0"]),
        ("adversarial.weight=0", ["adversarial.weight", "greater than 0"]),
        ("adversarial.method=free", ["adversarial.method", "'fgm'", "'pgd'"]),
        ("adversarial.alpha=0.1", ["adversarial.alpha", "method fgm", "method: pgd"]),
        ("adversarial.steps=2", ["adversarial.steps", "method fgm"]),
        ("adversarial.norm=l2", ["unknown key 'norm'"]),
    ],
)
def test_bad_settings_stop_before_the_run_dir(setting, words, tiny_bert, sentiment_csv, tmp_path):
    args = ["train", f"model={tiny_bert}", f"data.source={sentiment_csv}", f"output.dir={tmp_path / 'runs'}"]
    refused([*args, setting], tmp_path / "runs", *words)


def test_pgd_on_alpha_with_method_pgd_is_accepted():
    recipe = load_recipe(None, ["adversarial.method=pgd", "adversarial.alpha=0.1", "adversarial.steps=1"])
    assert (recipe.adversarial.alpha, recipe.adversarial.steps) == (0.1, 1)


def test_killed_and_resumed_ends_like_an_uninterrupted_run(tiny_bert, sentiment_csv, tmp_path):
    """PGD with dropout: every adversarial forward draws dropout masks from the global RNG, which the
    checkpoint restores."""
    args = [
        f"model={tiny_bert}",
        f"data.source={sentiment_csv}",
        "adversarial.method=pgd",
        "adversarial.steps=2",
        "data.max_length=32",
        "train.max_steps=10",
        "train.eval_steps=4",
        "train.logging_steps=2",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.early_stopping.metric=loss",
        f"output.dir={tmp_path / 'runs'}",
    ]
    _train_cli([*args, "output.name=straight"])
    _killed([*args, "output.name=killed"], "step:6")
    run, straight = tmp_path / "runs" / "killed", tmp_path / "runs" / "straight"
    assert _steps(run) == [4]
    _train_cli(["--resume", str(run)])
    for where in ("final", f"checkpoints/checkpoint-{_steps(run)[-1]}"):
        ours, theirs = (
            load_file(run / where / "model.safetensors"),
            load_file(straight / where / "model.safetensors"),
        )
        diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        assert diff <= 1e-6, (where, diff)
    assert _metrics(run) == _metrics(straight)
    assert any("loss_adv" in r for r in _metrics(run))
