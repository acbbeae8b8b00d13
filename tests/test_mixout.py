"""mixout (Lee et al. 2020): the mixed weight is the paper's (M ⊙ W + (1 − M) ⊙ W⁰ − p·W⁰) / (1 − p),
its mean over many masks is W, evaluation is the plain forward; exactly the trained pretrained linear
layers are mixed, under every part it composes with; the state-dict keys stay plain transformers';
bad settings stop before the run dir; a killed and resumed run ends like an uninterrupted one."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from hybridtune import api
from hybridtune.recipe import load_recipe
from hybridtune.strategy import contrastive, mixout

from .refusal import refused
from .test_l2sp import _overrides  # the same tiny runs
from .test_resume import _killed, _steps
from .test_resume import _train as _cli_train
from .test_token_classification import tagged_sentences, write_conll

P = 0.6
BERT_LINEARS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


def _prepared(model: str, data: str, tmp_path: Path, *extra: str):
    return api.prepare(load_recipe(None, _overrides(model, data, tmp_path, *extra)))


def _short(name: str) -> str:
    return re.sub(r"^base_model\.model\.", "", name)


def _mixed(model: str, data: str, tmp_path: Path, *extra: str) -> set[str]:
    return {_short(n) for n in mixout.mixed_modules(_prepared(model, data, tmp_path, *extra).model)}


def _block(i: int) -> set[str]:
    return {f"bert.encoder.layer.{i}.{m}" for m in BERT_LINEARS}


POOLER = {"bert.pooler.dense"}  # pretrained (the checkpoint has it), trained: mixed; the classifier is new


# --------------------------------------------------------------------------------------------------
# the paper's mixing


def test_a_mixed_weight_is_the_paper_s_formula_and_its_mean_is_w():
    torch.manual_seed(0)
    w, w0 = torch.randn(8, 16), torch.randn(8, 16)
    torch.manual_seed(5)
    mixed = mixout.mix(w, w0, P)
    torch.manual_seed(5)
    m = torch.empty_like(w).bernoulli_(1 - P)  # M ~ Bernoulli(1 − p): 1 keeps W
    torch.testing.assert_close(mixed, (m * w + (1 - m) * w0 - P * w0) / (1 - P))
    assert 0.4 < (mixed == w0).float().mean() < 0.8  # about p of the elements are W⁰
    n = 20000
    mean = sum(mixout.mix(w, w0, P) for _ in range(n)) / n
    # sd of the mean per element: |W − W⁰|·sqrt(p / (1 − p) / n) <= 0.05 here; 6 sd
    bound = 6 * (w - w0).abs().max() * math.sqrt(P / (1 - P) / n)
    assert (mean - w).abs().max() < bound
    assert torch.equal(mixout.mix(w, w0, 0.0), w)


def test_training_forward_mixes_and_evaluation_is_the_plain_forward(still_bert, sentiment_csv, tmp_path):
    prep = _prepared(still_bert, sentiment_csv, tmp_path, f"mixout.p={P}")
    model = prep.model
    layer = model.bert.encoder.layer[1].intermediate.dense
    w0 = layer.weight.detach().clone()
    with torch.no_grad():  # as after some steps: W moved away from W⁰
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    w = layer.weight.detach()
    x = torch.randn(3, 5, w.shape[1])
    model.train()
    torch.manual_seed(7)
    out = layer(x)
    torch.manual_seed(7)
    m = torch.empty_like(w).bernoulli_(1 - P)
    torch.testing.assert_close(out, F.linear(x, (m * w + (1 - m) * w0 - P * w0) / (1 - P), layer.bias))
    assert not torch.allclose(out, F.linear(x, w, layer.bias), atol=1e-3)
    (out**2).sum().backward()  # the gradient reaches W through the mask, scaled by 1 / (1 − p)
    assert layer.weight.grad is not None and (layer.weight.grad[m == 0] == 0).all()
    model.eval()
    assert torch.equal(layer(x), F.linear(x, w, layer.bias))
    model.train()
    layer.weight.requires_grad_(False)  # frozen (a stage that has not reached it): not mixed
    assert torch.equal(layer(x), F.linear(x, w, layer.bias))
    # the whole model: evaluation equals a plain model with the same weights
    plain = AutoModelForSequenceClassification.from_pretrained(still_bert, num_labels=2).eval()
    plain.load_state_dict(model.state_dict())
    batch = prep.tokenizer(["a fine film", "dull"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain(**batch).logits)


def test_gpt2_s_conv1d_layers_are_mixed_as_linear_maps(still_gpt2, sentiment_csv, tmp_path):
    prep = _prepared(still_gpt2, sentiment_csv, tmp_path, f"mixout.p={P}")
    names = set(mixout.mixed_modules(prep.model))
    assert names == {
        f"transformer.h.{i}.{m}"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    layer = prep.model.transformer.h[0].mlp.c_fc
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(0.1 * torch.randn_like(layer.weight))
    w = layer.weight.detach()
    x = torch.randn(2, 3, w.shape[0])  # Conv1D's weight is (in, out)
    prep.model.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    m = torch.empty_like(w).bernoulli_(1 - P)
    torch.testing.assert_close(out, x @ ((m * w + (1 - m) * w0 - P * w0) / (1 - P)) + layer.bias)


# --------------------------------------------------------------------------------------------------
# which layers: composition with the other parts


def test_full_fine_tuning_mixes_every_pretrained_linear_and_not_the_new_head(
    tiny_bert, sentiment_csv, tmp_path
):
    assert _mixed(tiny_bert, sentiment_csv, tmp_path, f"mixout.p={P}") == _block(0) | _block(1) | POOLER


def test_layer_decay_changes_nothing_of_what_is_mixed(tiny_bert, sentiment_csv, tmp_path):
    extra = (f"mixout.p={P}", "lr.layer_decay=0.8")
    assert _mixed(tiny_bert, sentiment_csv, tmp_path, *extra) == _block(0) | _block(1) | POOLER


def test_freeze_mixes_what_it_keeps(tiny_bert, sentiment_csv, tmp_path):
    extra = (f"mixout.p={P}", "freeze.trainable=[{top_k: 1}, head]")
    assert _mixed(tiny_bert, sentiment_csv, tmp_path, *extra) == _block(1) | POOLER


def test_a_stage_s_layers_are_mixed_from_when_it_unfreezes_them(tiny_bert, sentiment_csv, tmp_path):
    stages = "stages=[{steps: 2, train: [head]}, {train: [{top_k: 1}]}]"
    assert _mixed(tiny_bert, sentiment_csv, tmp_path, f"mixout.p={P}", stages) == _block(1) | POOLER


@pytest.mark.parametrize(
    "extra",
    [
        ["peft.method=lora", "freeze.trainable=[{top_k: 1}, head]"],
        ["adapters.method=pfeiffer", "freeze.trainable=[{top_k: 1}, head]"],
        ["soft_prompt.num_virtual_tokens=4", "freeze.trainable=[{top_k: 1}, head]"],
    ],
    ids=["lora", "adapters", "soft_prompt"],
)
def test_beside_added_weights_the_kept_base_layers_are_mixed(tiny_bert, sentiment_csv, tmp_path, extra):
    mixed = _mixed(tiny_bert, sentiment_csv, tmp_path, f"mixout.p={P}", *extra)
    # LoRA: peft's trained copies (modules_to_save) of the kept modules, never the frozen originals
    assert not any("original_module" in n or "lora" in n or "adapter" in n for n in mixed)
    assert {n.replace(".modules_to_save.default", "") for n in mixed} == _block(1) | POOLER


def test_lora_with_a_kept_block_trains_exactly_what_it_did_and_mixes_toward_the_original(
    tiny_bert, sentiment_csv, tmp_path
):
    extra = [f"mixout.p={P}", "peft.method=lora", "freeze.trainable=[{top_k: 1}, head]"]
    prep = _prepared(tiny_bert, sentiment_csv, tmp_path, *extra)
    modules = dict(prep.model.named_modules())
    for name in mixout.mixed_modules(prep.model):
        original = modules[name.replace("modules_to_save.default", "original_module")]
        assert torch.equal(modules[name].__dict__[mixout.ATTR].target, original.weight)
    trainable = {n for n, p in prep.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters()}
    from hybridtune.train.engine import make_trainer, training_arguments

    recipe = prep.recipe
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    args.save_strategy = args.eval_strategy = "no"
    args.load_best_model_at_end = False
    make_trainer(prep.model, prep.tokenizer, prep.datasets, recipe, args, tmp_path, None, prep.plan).train()
    changed = {n for n, p in prep.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable and any("lora_A" in n for n in changed)
    assert any("modules_to_save.default.attention.self.query" in n for n in changed)


@pytest.mark.parametrize(
    "extra",
    [
        ["peft.method=lora"],
        ["adapters.method=houlsby"],
        ["soft_prompt.num_virtual_tokens=4"],
        ["freeze.trainable=[{patterns: [classifier]}]"],
    ],
    ids=["lora", "adapters", "soft_prompt", "new-head-only"],
)
def test_nothing_pretrained_training_is_refused_before_the_run_dir(tiny_bert, sentiment_csv, tmp_path, extra):
    args = ["train", *_overrides(tiny_bert, sentiment_csv, tmp_path, f"mixout.p={P}", *extra)]
    refused(args, tmp_path / "runs", "mixout: found no Linear layer whose pretrained weight trains")


def test_bitfit_mixes_bert_s_pooler_and_a_token_classifier_with_no_pretrained_head_is_refused(
    tiny_bert, sentiment_csv, tmp_path
):
    """BitFit keeps [bias, head]: under a sequence classifier the head holds BERT's pooler, a
    pretrained Linear layer, which is mixed; a token classifier's head is its new classifier alone,
    so nothing would be mixed: refused on the model's facts before the run dir (a search reads the
    same facts from the config and never draws mixout there)."""
    assert (
        _mixed(tiny_bert, sentiment_csv, tmp_path, f"mixout.p={P}", "freeze.trainable=[bias, head]") == POOLER
    )
    conll = write_conll(tmp_path / "ner.conll", tagged_sentences(40))
    extra = ["task=token_classification", f"mixout.p={P}", "freeze.trainable=[bias, head]"]
    args = ["train", *_overrides(tiny_bert, str(conll), tmp_path, *extra)]
    refused(
        args,
        tmp_path / "runs",
        "mixout: found freeze.trainable ['bias', 'head'] on model",
        "no pretrained Linear",
    )


def test_the_state_dict_keys_are_plain_transformers(tiny_bert, sentiment_csv, tmp_path):
    with_part = _prepared(tiny_bert, sentiment_csv, tmp_path, f"mixout.p={P}").model
    plain = _prepared(tiny_bert, sentiment_csv, tmp_path).model
    assert list(with_part.state_dict()) == list(plain.state_dict())


def test_the_trunk_cache_caches_below_the_mixed_layers_and_ends_like_an_uncached_run(
    still_bert, sentiment_csv, tmp_path
):
    """Mixed layers train, cached blocks are frozen: a cached run draws the same masks and ends with
    the weights of an uncached one."""
    extra = [f"mixout.p={P}", "freeze.trainable=[head, {top_k: 1}]", "train.max_steps=8", "train.lr=0.02"]

    def run(cache: str) -> Path:
        args = _overrides(
            still_bert,
            sentiment_csv,
            tmp_path,
            *extra,
            f"train.trunk_cache={cache}",
            f"output.name=cache-{cache}",
        )
        return Path(api.train(load_recipe(None, args))["run_dir"])

    cached, plain = run("on"), run("off")
    report = json.loads((cached / "report.json").read_text())
    assert report["trunk_cache"]["used"] and report["trunk_cache"]["depth"] == 2
    a, b = (load_file(r / "final" / "model.safetensors") for r in (cached, plain))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_contrastive_s_stage_mixes_too(quick, tiny_bert):
    def stage(p: float) -> dict[str, torch.Tensor]:
        recipe = load_recipe(
            None,
            quick(
                tiny_bert,
                "data.shots=8",
                "pooling=mean",
                "contrastive.pairs=4",
                "contrastive.lr=0.01",
                f"mixout.p={p}",
            ),
        )
        prep = api.prepare(recipe)
        contrastive.run(prep, "fp32")
        return {n: p.detach().clone() for n, p in prep.model.named_parameters()}

    mixed, plain = stage(0.9), stage(0.0)
    name = "bert.encoder.layer.1.attention.self.query.weight"
    assert not torch.allclose(mixed[name], plain[name], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# bad settings, resume


@pytest.mark.parametrize(
    ("value", "words"), [("1", "less than 1"), ("1.5", "less than 1"), ("-0.1", "greater than or equal to 0")]
)
def test_p_outside_0_1_stops_before_the_run_dir(tiny_bert, sentiment_csv, tmp_path, value, words):
    args = ["train", *_overrides(tiny_bert, sentiment_csv, tmp_path, f"mixout.p={value}")]
    refused(args, tmp_path / "runs", "mixout.p", value, words)


def test_a_killed_and_resumed_run_draws_the_same_masks(tiny_bert, sentiment_csv, tmp_path):
    args = [
        *_overrides(tiny_bert, sentiment_csv, tmp_path, f"mixout.p={P}"),
        "train.max_steps=10",
        "train.eval_steps=4",
        "train.early_stopping.metric=loss",
    ]
    _cli_train([*args, "output.name=straight"])
    _cli_train([*args, "mixout.p=0", "output.name=unmixed"])
    _killed([*args, "output.name=killed"], "step:6")
    run, straight = tmp_path / "runs" / "killed", tmp_path / "runs" / "straight"
    _cli_train(["--resume", str(run)])
    last = f"checkpoints/checkpoint-{_steps(run)[-1]}"

    def diff(a: Path, b: Path, where: str) -> float:
        ours, theirs = load_file(a / where / "model.safetensors"), load_file(b / where / "model.safetensors")
        assert ours.keys() == theirs.keys()
        return max((ours[k] - theirs[k]).abs().max().item() for k in ours)

    assert diff(run, straight, "final") <= 1e-6 and diff(run, straight, last) <= 1e-6
    assert diff(straight, tmp_path / "runs" / "unmixed", last) > 1e-4  # the masks did change the run
    model, info = AutoModelForSequenceClassification.from_pretrained(run / "final", output_loading_info=True)
    assert not any(info.values()), info


def test_causal_lm_sft_mixes_gpt2_s_layers_and_trains(tiny_gpt2, tmp_path):
    from tests.test_causal_lm import colour_rows, write_jsonl

    data = write_jsonl(tmp_path / "pairs.jsonl", colour_rows(40))
    args = [
        "task=causal_lm",
        f"model={tiny_gpt2}",
        f"data.source={data}",
        "data.max_length=24",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.precision=fp32",
        "train.early_stopping.patience=null",
        f"output.dir={tmp_path / 'runs'}",
        f"mixout.p={P}",
        "l2sp.alpha=1",
    ]
    recipe = load_recipe(None, args)
    prep = api.prepare(recipe)
    assert len(mixout.mixed_modules(prep.model)) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert json.loads((Path(api.train(recipe)["run_dir"]) / "report.json").read_text())["steps"] == 2
