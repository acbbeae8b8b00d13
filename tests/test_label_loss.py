"""label_loss (strategy/label_loss.py): the classification loss replaced by cross-entropy with label
smoothing (Szegedy et al. 2016), class weights (scikit-learn's "balanced", or per label) and a focal
term (Lin et al. 2017). The term is checked against a hand computation on one batch, for sequence and
token classification; then what trains, how it composes, and what is refused before anything is written."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridtune import api
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.strategy import label_loss
from hybridtune.train.engine import make_trainer, training_arguments

from .conftest import sentiment_rows, write_csv
from .refusal import refused
from .test_token_classification import tagged_sentences, write_conll

LABELS = ("negative", "positive")


@pytest.fixture(scope="module")
def skewed_csv(tmp_path_factory) -> str:
    """3 negative rows to 1 positive: balanced class weights differ from 1."""
    rows = [r for i, r in enumerate(sentiment_rows(320)) if r[1] == "negative" or i % 6 == 1]
    return str(write_csv(tmp_path_factory.mktemp("skewed") / "skewed.csv", rows))


@pytest.fixture(scope="module")
def ner_conll(tmp_path_factory) -> str:
    return str(write_conll(tmp_path_factory.mktemp("ner") / "train.conll", tagged_sentences(120)))


def _overrides(model: str, data: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"model={model}",
        f"data.source={data}",
        "train.max_steps=3",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.logging_steps=1",
        "train.early_stopping.patience=null",
        f"output.dir={tmp_path / 'runs'}",
        *extra,
    ]


def _one_batch(recipe, tmp_path: Path):
    """(prepared run, trainer, its model in train mode, the first training batch)."""
    prep = api.prepare(recipe)
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    collator = prep.task.collator(prep.tokenizer)
    trainer = make_trainer(
        prep.model, prep.tokenizer, prep.datasets, recipe, args, tmp_path, None, prep.plan, collator=collator
    )
    model = trainer.model.train()
    return prep, trainer, model, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _balanced(counts: Counter, names: list[str]) -> torch.Tensor:
    """n / (k · n_c), written out (scikit-learn's 'balanced')."""
    n, k = sum(counts.values()), len(counts)
    return torch.tensor([n / (k * counts[c]) for c in names])


def _hand(
    logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, eps: float, gamma: float
) -> torch.Tensor:
    """Σ_i (1 − p_i,y)^γ [(1 − ε) w_y (−log p_i,y) + ε/K Σ_c w_c (−log p_i,c)] / Σ_i w_y over the scored
    positions, from log_softmax alone."""
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    keep = labels != -100
    logp, y = F.log_softmax(logits[keep].double(), -1), labels[keep]
    w = w.double()
    nll = -logp.gather(-1, y[:, None])[:, 0]
    smooth = (w * -logp).sum(-1) / logits.shape[-1]
    per = (1 - eps) * w[y] * nll + eps * smooth
    per = per * (1 - nll.neg().exp()) ** gamma
    return per.sum() / w[y].sum()


# --------------------------------------------------------------------------------------------------
# the term is the papers' loss


def test_the_training_loss_is_the_hand_computed_weighted_smoothed_focal_loss(
    still_bert, skewed_csv, tmp_path
):
    recipe = load_recipe(
        None,
        _overrides(
            still_bert,
            skewed_csv,
            tmp_path,
            "label_loss.smoothing=0.2",
            "label_loss.class_weights=balanced",
            "label_loss.focal.gamma=2.0",
        ),
    )
    prep, trainer, model, batch = _one_batch(recipe, tmp_path)
    counts = Counter(prep.splits.train["label"])  # the training split, not the whole file
    names = prep.labels.names
    assert names == list(LABELS) and counts["negative"] > 2 * counts["positive"]
    weights = _balanced(counts, names)
    assert torch.allclose(label_loss.criterion_of(model).weight, weights.float())

    loss = trainer.compute_loss(model, dict(batch))  # model without dropout: the forward is repeatable
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.detach()
    expected = _hand(logits, batch["labels"], weights, 0.2, 2.0)
    assert torch.allclose(loss.double(), expected, atol=1e-6), (loss, expected)
    plain = F.cross_entropy(logits, batch["labels"])
    assert abs(loss.item() - plain.item()) > 1e-3  # not the task's own cross-entropy


def test_with_no_setting_the_term_is_the_tasks_cross_entropy(still_bert, skewed_csv, tmp_path):
    recipe = load_recipe(None, _overrides(still_bert, skewed_csv, tmp_path, "label_loss.smoothing=0.0"))
    _, trainer, model, batch = _one_batch(recipe, tmp_path)
    loss = trainer.compute_loss(model, dict(batch))
    assert torch.allclose(loss, model(**batch).loss.detach(), atol=1e-6)


def test_gamma_zero_is_torchs_weighted_smoothed_cross_entropy():
    torch.manual_seed(0)
    logits, labels = torch.randn(9, 4), torch.tensor([0, 1, 2, 3, 3, -100, 1, 0, 2])
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    ours = label_loss.LabelLoss(w, 0.1, 0.0, 1.0)(logits, labels)
    torch.testing.assert_close(ours, F.cross_entropy(logits, labels, weight=w, label_smoothing=0.1))
    focal = label_loss.LabelLoss(None, 0.0, 2.0, 1.0)(logits, labels)
    torch.testing.assert_close(focal.double(), _hand(logits, labels, torch.ones(4), 0.0, 2.0))
    assert focal < F.cross_entropy(logits, labels)  # (1 − p_t)^γ < 1 lowers every example's share


def test_a_focal_loss_below_gamma_1_has_finite_gradients_on_certain_examples():
    """γ·(1 − p_t)^(γ − 1) is infinite at p_t = 1: a confident, right example must not make a NaN."""
    logits = torch.tensor([[40.0, -40.0], [0.3, -0.2]], requires_grad=True)
    loss = label_loss.LabelLoss(None, 0.0, 0.5, 1.0)(logits, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all() and logits.grad[1].abs().sum() > 0


def test_token_classification_ignores_minus_100_and_counts_scored_sub_tokens(still_bert, ner_conll, tmp_path):
    recipe = load_recipe(
        None,
        _overrides(
            still_bert,
            ner_conll,
            tmp_path,
            "task=token_classification",
            "label_loss.smoothing=0.1",
            "label_loss.class_weights=balanced",
            "label_loss.focal.gamma=1.5",
        ),
    )
    prep, trainer, model, batch = _one_batch(recipe, tmp_path)
    names = prep.labels.names
    ids = [i for row in prep.datasets["train"]["labels"] for i in row if i != -100]
    counts = Counter(names[i] for i in ids)
    absent = [c for c in names if c not in counts]
    assert absent == ["I-person"]  # one-word names: a tag never seen in training
    weights = _balanced(counts, [c for c in names if c in counts])
    expected_w = torch.tensor([weights.max().item() if c in absent else 0.0 for c in names])
    expected_w[[names.index(c) for c in names if c in counts]] = weights
    assert torch.allclose(label_loss.criterion_of(model).weight, expected_w.float())

    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    loss = trainer.compute_loss(model, dict(batch))
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.detach()
    expected = _hand(logits, batch["labels"], expected_w, 0.1, 1.5)
    assert torch.allclose(loss.double(), expected, atol=1e-6), (loss, expected)


def test_explicit_weights_by_label_name(still_bert, skewed_csv, tmp_path):
    recipe = load_recipe(
        None, _overrides(still_bert, skewed_csv, tmp_path, "label_loss.class_weights={positive: 3.5}")
    )
    _, trainer, model, batch = _one_batch(recipe, tmp_path)
    assert label_loss.criterion_of(model).weight.tolist() == [1.0, 3.5]
    loss = trainer.compute_loss(model, dict(batch))
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.detach()
    torch.testing.assert_close(
        loss, F.cross_entropy(logits, batch["labels"], weight=torch.tensor([1.0, 3.5]))
    )


# --------------------------------------------------------------------------------------------------
# a run: what trains, what is logged, how it composes


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_the_term_as_the_loss_and_evaluates_the_task_loss(tiny_bert, skewed_csv, tmp_path):
    recipe = load_recipe(
        None, _overrides(tiny_bert, skewed_csv, tmp_path, "label_loss.smoothing=0.1", "train.eval_steps=3")
    )
    run = Path(api.train(recipe)["run_dir"])
    rows = _metrics(run)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3
    for r in steps:  # task weight 0: Trainer's loss is the term alone
        assert r["loss"] == pytest.approx(r["loss_label"], abs=2e-3)
        assert "loss_task" in r
    assert all("loss_label" not in r for r in rows if "eval_loss" in r)
    assert "label_loss:\n  smoothing: 0.1" in (run / "recipe.yaml").read_text()
    assert len(api.predict(str(run), ["a fine film"])) == 1  # the run loads back as any other


# part sections to compose with: each must train what it trains without label_loss
COMPOSE = {
    "freeze": ["freeze.trainable=[head]"],
    "peft": ["peft.method=lora"],
    "adapters": ["adapters.method=houlsby"],
    "soft_prompt": ["soft_prompt.num_virtual_tokens=4", "data.max_length=48"],
    "layer_decay": ["lr.layer_decay=0.8"],
    "stages": ["stages=[{steps: 1, train: [head]}, {train: [all]}]"],
}


@pytest.mark.parametrize("other", list(COMPOSE))
def test_composes_and_trains_exactly_what_the_other_part_trains(other, still_bert, skewed_csv, tmp_path):
    from .test_recipes import _run

    overrides = _overrides(still_bert, skewed_csv, tmp_path, *COMPOSE[other])
    plain_prep, plain_changed, plain_held = _run(load_recipe(None, overrides), tmp_path / "plain")
    with_part = [*overrides, "label_loss.smoothing=0.1", "label_loss.class_weights=balanced"]
    prep, changed, held = _run(load_recipe(None, with_part), tmp_path / "part")
    assert changed and changed == held and held == plain_held and changed == plain_changed
    plain = dict(plain_prep.model.named_parameters())  # the loss mattered: the same steps, other weights
    assert any(not torch.allclose(p, plain[n]) for n, p in prep.model.named_parameters() if n in changed)


def test_prompt_classification_and_the_mixed_objective_weight_the_term_by_one_minus_lambda(
    tiny_bert_mlm, skewed_csv, tmp_path
):
    overrides = _overrides(
        tiny_bert_mlm,
        skewed_csv,
        tmp_path,
        "task=prompt_classification",
        "objective.lm_weight=0.25",
        "label_loss.smoothing=0.1",
        "data.max_length=48",
    )
    run = Path(api.train(load_recipe(None, overrides))["run_dir"])
    for r in (r for r in _metrics(run) if "loss" in r):
        assert r["loss"] == pytest.approx(0.75 * r["loss_label"] + 0.25 * r["loss_lm"], abs=2e-3)


def test_the_trunk_cache_serves_it_and_ends_like_an_uncached_run(still_bert, skewed_csv, tmp_path):
    """The term reads the logits only: the frozen blocks' cache stays usable, and exact."""
    from .test_trunk_cache import TOL, _max_diff

    part = [
        "label_loss.class_weights=balanced",
        "label_loss.focal.gamma=2",
        "freeze.trainable=[head, {top_k: 1}]",
    ]
    runs = {}
    for cache in ("on", "off"):
        extra = [*part, f"train.trunk_cache={cache}", "train.max_steps=8", f"output.name=cache-{cache}"]
        recipe = load_recipe(None, [*_overrides(still_bert, skewed_csv, tmp_path), *extra])
        runs[cache] = Path(api.train(recipe)["run_dir"])
    report = json.loads((runs["on"] / "report.json").read_text())
    assert report["trunk_cache"]["used"] and report["trunk_cache"]["depth"] == 2
    assert _max_diff(runs["on"], runs["off"]) <= TOL
    losses = [r["loss_label"] for r in _metrics(runs["on"]) if "loss" in r]
    assert losses == [r["loss_label"] for r in _metrics(runs["off"]) if "loss" in r] and len(losses) == 8


# --------------------------------------------------------------------------------------------------
# refused before anything is written


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("label_loss.class_weights={neutral: 2.0}", ["label_loss.class_weights.neutral", "'negative'"]),
        ("label_loss.class_weights={positive: 0}", ["label_loss.class_weights.positive: found 0", "> 0"]),
        ("label_loss.class_weights=inverse", ["label_loss.class_weights: found 'inverse'", "balanced"]),
        ("label_loss.smoothing=1.0", ["label_loss.smoothing", "1.0"]),
        ("label_loss.smoothing=-0.1", ["label_loss.smoothing"]),
        ("label_loss.focal.gamma=-1", ["label_loss.focal.gamma"]),
        ("label_loss.focal.alpha=0.25", ["label_loss.focal", "alpha"]),
    ],
)
def test_bad_settings_exit_2_before_the_run_dir(setting, words, tiny_bert, skewed_csv, tmp_path):
    refused(["train", *_overrides(tiny_bert, skewed_csv, tmp_path), setting], tmp_path / "runs", *words)


def test_causal_lm_is_refused_by_name(tmp_path):
    with pytest.raises(
        UserError, match="label_loss: found it with task causal_lm, whose logits are not class"
    ):
        load_recipe(None, ["task=causal_lm", "label_loss.smoothing=0.1", f"output.dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_a_contrastive_stage_without_trainer_steps_is_refused(tmp_path):
    with pytest.raises(UserError, match="label_loss: found it with contrastive.then: none"):
        load_recipe(None, ["pooling=mean", "contrastive.then=none", "label_loss.smoothing=0.1"])
