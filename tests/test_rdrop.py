"""rdrop (strategy/rdrop.py): R-Drop (Liang et al. 2021). The training loss on one batch equals the
paper's ½(CE1 + CE2) + α·½(KL(P1‖P2) + KL(P2‖P1)) computed by hand from two dropout forwards drawn
from the same RNG state; then what trains, how it composes, what is refused, and a run killed with
SIGKILL and resumed ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hybridtune import api
from hybridtune.errors import UserError
from hybridtune.model.facts import dropout_rates
from hybridtune.recipe import load_recipe
from hybridtune.strategy import rdrop

from .refusal import refused
from .test_label_loss import _one_batch, _overrides  # the same tiny runs and first batch
from .test_resume import _killed, _steps, _train
from .test_token_classification import tagged_sentences, write_conll

ALPHA = 0.7


def _hand_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """½(KL(P‖Q) + KL(Q‖P)) per row, from the definition Σ_c p_c (log p_c − log q_c)."""
    lp, lq = F.log_softmax(p_logits.double(), -1), F.log_softmax(q_logits.double(), -1)
    return 0.5 * ((lp.exp() * (lp - lq)).sum(-1) + (lq.exp() * (lq - lp)).sum(-1))


def _loss_and_grad(trainer, model, batch, seed: int, weight: torch.Tensor):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    return loss.detach().double(), weight.grad.clone()


# --------------------------------------------------------------------------------------------------
# the paper's loss


def test_the_training_loss_is_the_papers_on_two_dropout_passes(tiny_bert, sentiment_csv, tmp_path):
    recipe = load_recipe(None, _overrides(tiny_bert, sentiment_csv, tmp_path, f"rdrop.alpha={ALPHA}"))
    _, trainer, model, batch = _one_batch(recipe, tmp_path)
    weight = dict(model.named_parameters())["classifier.weight"]
    loss, grad = _loss_and_grad(trainer, model, batch, 1234, weight)

    model.zero_grad()
    torch.manual_seed(1234)  # the same masks: the training forward, then R-Drop's second pass
    first, second = model(**batch), model(**batch)
    assert not torch.allclose(first.logits, second.logits)  # dropout made the passes differ
    labels = batch["labels"]
    ce1, ce2 = F.cross_entropy(first.logits, labels), F.cross_entropy(second.logits, labels)
    kl = _hand_kl(first.logits, second.logits).mean()
    hand = 0.5 * (ce1 + ce2) + ALPHA * kl
    torch.testing.assert_close(loss, hand.detach().double(), atol=1e-6, rtol=1e-6)
    hand.backward()  # and the same gradient: both passes carry it
    torch.testing.assert_close(grad, weight.grad, atol=1e-6, rtol=1e-5)
    assert kl > 0


def test_with_label_loss_both_passes_use_its_loss(tiny_bert, sentiment_csv, tmp_path):
    recipe = load_recipe(
        None,
        _overrides(tiny_bert, sentiment_csv, tmp_path, f"rdrop.alpha={ALPHA}", "label_loss.smoothing=0.2"),
    )
    _, trainer, model, batch = _one_batch(recipe, tmp_path)
    torch.manual_seed(7)
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        torch.manual_seed(7)
        first, second = model(**batch).logits, model(**batch).logits
    labels = batch["labels"]
    smoothed = [F.cross_entropy(x, labels, label_smoothing=0.2) for x in (first, second)]
    hand = 0.5 * (smoothed[0] + smoothed[1]) + ALPHA * _hand_kl(first, second).mean()
    torch.testing.assert_close(loss.double(), hand.double(), atol=1e-6, rtol=1e-6)


def test_the_kl_is_symmetric_masked_and_shifted_for_next_token_labels():
    torch.manual_seed(0)
    p, q = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    labels = torch.tensor([[1, -100, 2, 0, -100], [-100, 3, 3, -100, -100]])
    keep = labels != -100
    expected = _hand_kl(p, q)[keep].mean()
    torch.testing.assert_close(rdrop.symmetric_kl(p, q, labels).double(), expected)
    torch.testing.assert_close(rdrop.symmetric_kl(q, p, labels), rdrop.symmetric_kl(p, q, labels))
    assert rdrop.symmetric_kl(p, p, labels).abs() < 1e-7
    # a causal LM: the logits at t are scored against the label at t + 1
    shifted = _hand_kl(p[:, :-1], q[:, :-1])[labels[:, 1:] != -100].mean()
    torch.testing.assert_close(rdrop.symmetric_kl(p, q, labels, shift=True).double(), shifted)
    # a soft prompt's virtual tokens (the first logits, no labels) are not scored
    longer_p, longer_q = torch.cat([torch.randn(2, 3, 4), p], 1), torch.cat([torch.randn(2, 3, 4), q], 1)
    torch.testing.assert_close(rdrop.symmetric_kl(longer_p, longer_q, labels).double(), expected)


def test_token_classification_scores_the_labelled_sub_tokens(tiny_bert, tmp_path):
    conll = write_conll(tmp_path / "ner.conll", tagged_sentences(80))
    recipe = load_recipe(
        None,
        _overrides(tiny_bert, str(conll), tmp_path, "task=token_classification", f"rdrop.alpha={ALPHA}"),
    )
    _, trainer, model, batch = _one_batch(recipe, tmp_path)
    with torch.no_grad():
        torch.manual_seed(3)
        loss = trainer.compute_loss(model, dict(batch))
        torch.manual_seed(3)
        first, second = model(**batch), model(**batch)
    labels = batch["labels"]
    kl = _hand_kl(first.logits, second.logits)[labels != -100].mean()
    hand = 0.5 * (first.loss + second.loss) + ALPHA * kl
    torch.testing.assert_close(loss.double(), hand.double(), atol=1e-6, rtol=1e-6)


def test_a_causal_lm_scores_next_tokens(tiny_gpt2, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"what is {i} plus one?", "response": f"it is {i + 1}"}) + "\n"
            for i in range(60)
        )
    )
    recipe = load_recipe(
        None, _overrides(tiny_gpt2, str(pairs), tmp_path, "task=causal_lm", f"rdrop.alpha={ALPHA}")
    )
    _, trainer, model, batch = _one_batch(recipe, tmp_path)
    assert trainer.model_accepts_loss_kwargs is False  # per-batch means, divided by the accumulation
    with torch.no_grad():
        torch.manual_seed(5)
        loss = trainer.compute_loss(model, dict(batch))
        torch.manual_seed(5)
        first, second = model(**batch), model(**batch)
    scored = batch["labels"][:, 1:] != -100
    kl = _hand_kl(first.logits[:, :-1], second.logits[:, :-1])[scored].mean()
    hand = 0.5 * (first.loss + second.loss) + ALPHA * kl
    torch.testing.assert_close(loss.double(), hand.double(), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# a run: logged terms, what trains, composition


def test_a_run_logs_both_terms_and_evaluates_the_task_loss(tiny_bert, sentiment_csv, tmp_path):
    recipe = load_recipe(
        None, _overrides(tiny_bert, sentiment_csv, tmp_path, f"rdrop.alpha={ALPHA}", "train.eval_steps=3")
    )
    run = Path(api.train(recipe)["run_dir"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3
    for r in steps:  # loss = L1 + ½(L2 − L1) + α·KL
        expected = r["loss_task"] + 0.5 * r["loss_rdrop_gap"] + ALPHA * r["loss_rdrop_kl"]
        assert r["loss"] == pytest.approx(expected, abs=2e-3)
        assert r["loss_rdrop_kl"] >= 0  # a tiny random model: often below the log's 4 decimals
    assert all("loss_rdrop_kl" not in r for r in rows if "eval_loss" in r)
    assert len(api.predict(str(run), ["a fine film"])) == 1  # the run loads back as any other


def test_prompt_classification_and_the_mixed_objective_weight_both_passes(
    tiny_bert_mlm, sentiment_csv, tmp_path
):
    """(1 − λ)·(R-Drop's loss) + λ·LM loss: the mixed objective's 1 − λ scales both R-Drop terms, as
    it scales the engine's first-pass task loss."""
    overrides = _overrides(
        tiny_bert_mlm,
        sentiment_csv,
        tmp_path,
        "task=prompt_classification",
        "objective.lm_weight=0.25",
        f"rdrop.alpha={ALPHA}",
        "data.max_length=48",
    )
    recipe = load_recipe(None, overrides)
    _, trainer, model, batch = _one_batch(recipe, tmp_path)
    with torch.no_grad():
        torch.manual_seed(11)
        outputs = model(**batch)
        terms = rdrop.loss_terms(recipe.rdrop, model, dict(batch), outputs.loss, outputs)
        torch.manual_seed(11)
        first, second = model(**batch), model(**batch)
    assert [(t.name, t.weight) for t in terms] == [("rdrop_gap", 0.5 * 0.75), ("rdrop_kl", ALPHA * 0.75)]
    torch.testing.assert_close(terms[0].value, second.loss - first.loss)  # class scores, not the LM's
    kl = _hand_kl(first.logits, second.logits).mean()
    torch.testing.assert_close(terms[1].value.double(), kl, atol=1e-7, rtol=1e-6)
    assert first.logits.shape[-1] == 2 and kl > 0


COMPOSE = {
    "freeze": ["freeze.trainable=[head]"],
    "peft": ["peft.method=lora"],
    "adapters": ["adapters.method=houlsby"],
    "soft_prompt": ["soft_prompt.num_virtual_tokens=4", "data.max_length=48"],
    "layer_decay": ["lr.layer_decay=0.8"],
    "stages": ["stages=[{steps: 1, train: [head]}, {train: [all]}]"],
}


@pytest.mark.parametrize("other", list(COMPOSE))
def test_composes_and_trains_exactly_what_the_other_part_trains(other, tiny_bert, sentiment_csv, tmp_path):
    from .test_recipes import _run

    overrides = _overrides(tiny_bert, sentiment_csv, tmp_path, *COMPOSE[other])
    plain_prep, plain_changed, plain_held = _run(load_recipe(None, overrides), tmp_path / "plain")
    prep, changed, held = _run(load_recipe(None, [*overrides, "rdrop.alpha=1.0"]), tmp_path / "part")
    assert changed and changed == held and held == plain_held and changed == plain_changed
    plain = dict(plain_prep.model.named_parameters())
    assert any(not torch.allclose(p, plain[n]) for n, p in prep.model.named_parameters() if n in changed)


def test_lora_dropout_is_dropout_enough(still_bert, sentiment_csv, tmp_path):
    """A base model without dropout, with LoRA's dropout on its adapters: the two passes differ."""

    def rates(*extra: str) -> dict[str, float]:
        recipe = load_recipe(None, _overrides(still_bert, sentiment_csv, tmp_path, *extra))
        return dropout_rates(api.prepare(recipe).model)

    assert rates() == {}
    lora = rates("peft.method=lora", "peft.lora_dropout=0.1")
    assert lora and all("lora_dropout" in name for name in lora)
    assert rates("peft.method=lora", "peft.lora_dropout=0.1", "rdrop.alpha=1")  # accepted


# --------------------------------------------------------------------------------------------------
# refused before anything is written


def test_a_model_without_dropout_is_refused_by_name(still_bert, sentiment_csv, tmp_path):
    args = _overrides(still_bert, sentiment_csv, tmp_path, "rdrop.alpha=1")
    refused(
        ["train", *args],
        tmp_path / "runs",
        "rdrop: found model",
        "dropout probabilities are all 0",
        "dropout > 0",
    )
    no_lora_dropout = [*args, "peft.method=lora", "peft.lora_dropout=0"]  # LoRA adds none either
    refused(["train", *no_lora_dropout], tmp_path / "runs", "rdrop: found model", "peft.lora_dropout > 0")


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("rdrop.alpha=-0.5", ["rdrop.alpha", "-0.5", "greater than or equal to 0"]),
        ("rdrop.beta=1", ["rdrop", "unknown key 'beta'"]),
        ("train.trunk_cache=on", ["train.trunk_cache", "R-Drop"]),
    ],
)
def test_bad_settings_exit_2_before_the_run_dir(setting, words, tiny_bert, sentiment_csv, tmp_path):
    args = _overrides(tiny_bert, sentiment_csv, tmp_path, "rdrop.alpha=1", "freeze.trainable=[head]", setting)
    refused(["train", *args], tmp_path / "runs", *words)


def test_a_contrastive_stage_without_trainer_steps_is_refused():
    with pytest.raises(UserError, match="rdrop: found it with contrastive.then: none"):
        load_recipe(None, ["pooling=mean", "contrastive.then=none", "rdrop.alpha=1"])


# --------------------------------------------------------------------------------------------------
# kill -9 and --resume


def test_killed_and_resumed_ends_like_an_uninterrupted_run(tiny_bert, sentiment_csv, tmp_path):
    """The second pass's masks come from the global RNG, which the checkpoint holds: a run SIGKILLed
    after step 6 and resumed from checkpoint-4 draws the same masks (label_loss's balanced weights,
    recomputed from the data on resume, ride along)."""
    args = [
        f"model={tiny_bert}",
        f"data.source={sentiment_csv}",
        "rdrop.alpha=1.0",
        "label_loss.class_weights=balanced",
        "label_loss.smoothing=0.1",
        "train.max_steps=10",
        "train.eval_steps=4",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.early_stopping.metric=loss",
        f"output.dir={tmp_path / 'runs'}",
    ]
    _train([*args, "output.name=straight"])
    _killed([*args, "output.name=killed"], "step:6")
    run, straight = tmp_path / "runs" / "killed", tmp_path / "runs" / "straight"
    assert _steps(run) == [4] and not (run / "final").exists()
    _train(["--resume", str(run)])
    last = f"checkpoints/checkpoint-{_steps(run)[-1]}"
    for where in ("final", last):
        ours, theirs = (
            load_file(run / where / "model.safetensors"),
            load_file(straight / where / "model.safetensors"),
        )
        assert ours.keys() == theirs.keys()
        diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        assert diff <= 1e-6, (where, diff)
