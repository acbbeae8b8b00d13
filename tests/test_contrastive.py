"""The pooling part and the contrastive stage (SetFit): the head reads the mean-pooled embedding on
any architecture, pairs are what the sampling says, the stage tunes what the parts left trainable
(at their layer-wise lrs), the logistic head survives save / load, and `then` decides what trains next."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridtune import api
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.strategy import contrastive, pooling
from hybridtune.strategy.contrastive import ContrastiveConfig, make_pairs

RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.mark.parametrize("model", ["tiny_bert", "tiny_gpt2"])
def test_pooling_head_reads_the_normalised_mean(model, request, quick):
    prep = api.prepare(load_recipe(None, quick(request.getfixturevalue(model), "pooling=mean")))
    net = prep.model.eval()
    batch = prep.tokenizer(["a great film", "the plot was dull and long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = net(**batch).logits
        hidden = pooling.backbone(net)(**batch)[0]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        p = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        head = net.classifier if hasattr(net, "classifier") else net.score
        assert torch.allclose(logits, head(p), atol=1e-5)
        # the same model without the part reads its first / last token: another answer
        other = api.prepare(load_recipe(None, quick(request.getfixturevalue(model))))
        other.model.load_state_dict(net.state_dict())
        assert not torch.allclose(other.model.eval()(**batch).logits, logits, atol=1e-4)


def test_pooling_freezes_what_it_bypasses(quick, tiny_bert):
    prep = api.prepare(load_recipe(None, quick(tiny_bert, "pooling=mean", "freeze.trainable=[head]")))
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}  # BERT's pooler gets no gradient


def test_random_pairs_draw_r_partners_of_each_kind_per_text():
    labels = [0, 0, 0, 1, 1, 2]
    pairs = make_pairs(labels, ContrastiveConfig(pairs=3), np.random.default_rng(0))
    assert len(pairs) == 2 * 3 * len(labels)
    for i, j, target in pairs:
        assert (labels[i] == labels[j]) == (target == 1.0)
        assert i != j or labels.count(labels[i]) == 1  # a lone text pairs with itself only
    assert sum(t for *_, t in pairs) == 3 * len(labels)


def test_cycle_pairs_are_setfits_num_iterations():
    """SetFit's ContrastiveDataset with num_iterations R: R·n pairs of each kind, taken in turn from
    the distinct pairs (self-pairs included), so each is used as often as any other, ±1."""
    labels = [0, 0, 0, 1, 1, 2]  # same-label: 3 + 1 distinct + 6 self = 10; other-label: 11
    pairs = make_pairs(labels, ContrastiveConfig(pairs=3, sampling="cycle"), np.random.default_rng(0))
    pos = Counter((i, j) for i, j, t in pairs if t == 1.0)
    neg = Counter((i, j) for i, j, t in pairs if t == 0.0)
    assert sum(pos.values()) == sum(neg.values()) == 3 * len(labels)
    assert len(pos) == 10 and set(pos.values()) == {1, 2}  # 18 pairs over 10: each once or twice
    assert len(neg) == 11 and set(neg.values()) == {1, 2}
    assert {(i, i) for i in range(6)} <= set(pos)
    assert all((labels[i] == labels[j]) == (t == 1.0) and i <= j for i, j, t in pairs)
    alone = make_pairs(
        labels, ContrastiveConfig(pairs=3, sampling="cycle", self_pairs=False), np.random.default_rng(0)
    )
    assert all(i < j for i, j, _ in alone) and len({(i, j) for i, j, t in alone if t == 1.0}) == 4


@pytest.mark.parametrize(
    ("sampling", "self_pairs", "pos", "neg"),
    [
        ("unique", True, 10, 11),
        ("oversampling", True, 11, 11),
        ("undersampling", True, 10, 10),
        ("unique", False, 4, 11),
        ("oversampling", False, 11, 11),
        ("undersampling", False, 4, 4),
    ],
)
def test_unique_over_and_undersampling(sampling, self_pairs, pos, neg):
    labels = [0, 0, 0, 1, 1, 2]  # 3 + 1 same-label pairs (+ 6 self-pairs), 15 - 4 = 11 different-label
    config = ContrastiveConfig(sampling=sampling, self_pairs=self_pairs)
    pairs = make_pairs(labels, config, np.random.default_rng(0))
    assert sum(t == 1.0 for *_, t in pairs) == pos and sum(t == 0.0 for *_, t in pairs) == neg
    capped = make_pairs(labels, config.model_copy(update={"max_pairs": 5}), np.random.default_rng(0))
    assert len(capped) == 5


def _stage(quick, model, *extra):
    recipe = load_recipe(
        None,
        quick(model, "data.shots=8", "pooling=mean", "contrastive.pairs=4", "contrastive.lr=0.001", *extra),
    )
    prep = api.prepare(recipe)
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters()}
    record = contrastive.run(prep, "fp32")
    changed = {n for n, p in prep.model.named_parameters() if not torch.equal(before[n], p.detach())}
    prep.before = before
    return prep, record, changed


def test_stage_tunes_exactly_what_the_parts_leave_trainable(quick, tiny_bert6):
    prep, record, changed = _stage(
        quick, tiny_bert6, "freeze.trainable=[{top_k: 2}, head]", "contrastive.then=all"
    )
    assert record["pairs"] == 2 * 4 * 16 and record["steps"] == 8  # 128 pairs, 16 per step
    assert record["loss_first"] > 0
    body = {n for n in changed if not n.startswith("classifier.")}
    assert body and all(n.startswith(("bert.encoder.layer.4.", "bert.encoder.layer.5.")) for n in body)
    assert not any(n.startswith("classifier.") for n in changed)  # head: train -> the Trainer's job
    assert record["trainable_after"] == sum(p.numel() for p in prep.model.parameters() if p.requires_grad)


def test_stage_uses_layer_wise_lrs(quick, tiny_bert6):
    # layer decay 0.1: block 4 moves at a tenth of block 5's lr, block 3 at a hundredth (AdamW's
    # steps are about lr in size, so the weights' mean change follows the lr)
    prep, _, _ = _stage(quick, tiny_bert6, "lr.layer_decay=0.1", "freeze.trainable=[{top_k: 3}, head]")

    def moved(block: int) -> float:
        name = f"bert.encoder.layer.{block}.attention.self.query.weight"
        return float((dict(prep.model.named_parameters())[name] - prep.before[name]).abs().mean())

    assert moved(5) > 4 * moved(4) > 16 * moved(3) > 0


def test_then_head_leaves_only_the_head_trainable_and_logistic_fits_it(quick, tiny_bert):
    prep, record, changed = _stage(quick, tiny_bert, "contrastive.head=logistic", "contrastive.then=head")
    assert {"classifier.weight", "classifier.bias"} <= changed  # written by the logistic fit
    assert {n for n, p in prep.model.named_parameters() if p.requires_grad} == {
        "classifier.weight",
        "classifier.bias",
    }
    assert 0.5 <= record["head"]["train_accuracy"] <= 1.0


def test_epochs_zero_is_a_linear_probe_on_the_pretrained_embedding(quick, tiny_bert):
    from sklearn.linear_model import LogisticRegression

    prep, record, changed = _stage(quick, tiny_bert, "contrastive.epochs=0", "contrastive.head=logistic")
    assert record["steps"] == record["pairs"] == 0
    assert changed == {"classifier.weight", "classifier.bias"}  # the body as pretrained
    # the head is scikit-learn's fit on the pretrained pooled embeddings, as a binary softmax
    texts = prep.splits.train["text"].tolist()
    labels = [prep.labels.values.index(v) for v in prep.splits.train["label"]]
    with torch.no_grad():
        batch = prep.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        x = pooling.embedding(prep.model, dict(batch), True).numpy()
    coef = LogisticRegression(max_iter=1000).fit(x, labels).coef_[0]
    weight = prep.model.classifier.weight.detach()
    assert torch.allclose(weight[1] - weight[0], torch.as_tensor(coef, dtype=weight.dtype), atol=1e-3)


def test_blend_is_wise_ft_between_the_weights_before_and_after(quick, tiny_bert):
    """`blend: b`: each tuned weight ends at b·tuned + (1 − b)·before (the same seed tunes alike);
    b = 0 leaves the body as it was, as a linear probe does."""
    args = ("contrastive.head=logistic", "contrastive.then=head")
    tuned, _, changed = _stage(quick, tiny_bert, *args)
    blended, record, _ = _stage(quick, tiny_bert, *args, "contrastive.blend=0.25")
    assert record["blend"] == 0.25
    body = [n for n in changed if not n.startswith("classifier.")]
    assert body
    after, mixed = dict(tuned.model.named_parameters()), dict(blended.model.named_parameters())
    for n in body:
        want = 0.25 * after[n].detach() + 0.75 * tuned.before[n]
        assert torch.allclose(mixed[n].detach(), want, atol=1e-6), n
    _, _, none_changed = _stage(quick, tiny_bert, *args, "contrastive.blend=0")
    assert none_changed == {"classifier.weight", "classifier.bias"}


def test_epochs_zero_without_the_logistic_head_is_refused():
    with pytest.raises(UserError, match="contrastive.epochs: found 0 with head: train"):
        load_recipe(None, ["pooling=mean", "contrastive.epochs=0"])


def test_stage_with_lora_tunes_lora_only(quick, tiny_bert):
    _, _, changed = _stage(quick, tiny_bert, "peft.method=lora", "peft.r=4", "contrastive.head=logistic")
    assert changed and all("lora_" in n or "classifier" in n for n in changed)
    assert any("lora_" in n for n in changed) and any("classifier" in n for n in changed)


def test_setfit_recipe_end_to_end_logistic_head_survives_save_and_load(tmp_path, tiny_bert6, sentiment_csv):
    overrides = [
        f"model={tiny_bert6}",
        f"data.source={sentiment_csv}",
        "contrastive.pairs=2",
        "train.precision=fp32",
        f"output.dir={tmp_path / 'runs'}",
    ]
    recipe = load_recipe(RECIPES / "setfit.yaml", overrides)
    summary = api.train(recipe)
    run = Path(summary["run_dir"])
    record = json.loads((run / "contrastive.json").read_text())
    assert summary["steps"] == 0 and summary["contrastive"]["then"] == "none"
    assert record["pairs"] == 2 * 2 * 16 and len(record["losses"]) == record["steps"]
    # the 16 training rows, scored by the loaded run: what the logistic fit scored on its embeddings
    train = api.task_for(recipe).load_splits(recipe.data).train
    rows = tmp_path / "train.csv"
    train[["text", "label"]].to_csv(rows, index=False)
    assert api.evaluate(str(run), str(rows))["accuracy"] == pytest.approx(
        record["head"]["train_accuracy"], abs=1e-4
    )


def test_export_refuses_a_pooled_run(trained_run, tmp_path):
    from hybridtune.export import export

    run = trained_run("pooled", "pooling=mean")
    with pytest.raises(UserError, match="mean pooling"):
        export(str(run), "merged", str(tmp_path / "out"))


def test_logistic_head_refused_where_the_head_is_not_one_linear_layer(quick, tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = RobertaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=160,
        pad_token_id=tok.pad_token_id,
    )
    RobertaModel(config).save_pretrained(tmp_path / "roberta")
    tok.save_pretrained(tmp_path / "roberta")
    recipe = load_recipe(None, quick(str(tmp_path / "roberta"), "pooling=mean", "contrastive.head=logistic"))
    with pytest.raises(
        UserError, match=r"contrastive\.head: found logistic with a head of RobertaClassificationHead"
    ):
        api.prepare(recipe)
