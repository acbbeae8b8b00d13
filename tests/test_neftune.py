"""neftune (strategy/neftune.py): uniform noise of magnitude alpha / sqrt(L * d) on the word embeddings,
in training only; exactly the intended parameters train, with every part it composes with (peft's
prompt tuning on an encoder included, where Trainer's own NEFTune fails); bad settings stop before the
run dir; a killed run resumes to the uninterrupted run's weights (the noise comes from the RNG state
the checkpoint restores)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridtune import api
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from tests.test_causal_lm import colour_rows, write_jsonl

from .refusal import refused
from .test_adversarial import COMPOSED as ADVERSARIAL_COMPOSED
from .test_recipes import _run
from .test_resume import _killed, _metrics, _steps
from .test_resume import _train as _train_cli

ALPHA = 5.0


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


def _batch(prep, n: int = 8) -> dict:
    rows = prep.datasets["train"].select(range(n))
    from transformers import DataCollatorWithPadding

    cols = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in rows.column_names]
    return DataCollatorWithPadding(prep.tokenizer)([{c: r[c] for c in cols} for r in rows])


def _seen(model) -> list[torch.Tensor]:
    """What the layers after the input embeddings see (a hook after every other on the layer)."""
    seen: list[torch.Tensor] = []
    model.get_input_embeddings().register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    return seen


def test_the_noise_is_uniform_of_magnitude_alpha_over_sqrt_l_d_in_training_only(
    still_bert, sentiment_csv, tmp_path
):
    prep = api.prepare(
        load_recipe(None, _overrides(still_bert, sentiment_csv, tmp_path, f"neftune.alpha={ALPHA}"))
    )
    model, batch = prep.model, _batch(prep)
    seen = _seen(model)
    table = model.get_input_embeddings().weight.detach()
    clean = table[batch["input_ids"]]
    length, width = clean.shape[1], clean.shape[2]
    bound = ALPHA / math.sqrt(length * width)
    model.train()
    model(**batch)
    model(**batch)
    noise = seen[0] - clean
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().max() > 0.99 * bound  # U(-m, m) over thousands of draws reaches near m
    assert abs(noise.mean()) < 0.05 * bound and abs(noise.std() - bound / math.sqrt(3)) < 0.05 * bound
    assert not torch.equal(seen[0], seen[1])  # fresh noise in every forward
    model.eval()
    model(**batch)
    assert torch.equal(seen[2], clean)  # evaluation: no noise


def test_eval_outputs_equal_a_model_without_it_and_training_outputs_do_not(
    still_bert, sentiment_csv, tmp_path
):
    base = _overrides(still_bert, sentiment_csv, tmp_path)
    plain = api.prepare(load_recipe(None, base)).model  # the same seed: the same new head
    noisy_prep = api.prepare(load_recipe(None, [*base, f"neftune.alpha={ALPHA}"]))
    noisy, batch = noisy_prep.model, _batch(noisy_prep)
    with torch.no_grad():
        plain.eval(), noisy.eval()
        assert torch.equal(plain(**batch).logits, noisy(**batch).logits)
        plain.train(), noisy.train()  # no dropout in this model: only the noise can differ
        assert not torch.allclose(plain(**batch).logits, noisy(**batch).logits)
        assert torch.equal(plain(**batch).logits, plain(**batch).logits)


def test_with_a_soft_prompt_only_the_word_embeddings_get_noise(still_bert, sentiment_csv, tmp_path):
    n = 4
    extra = (f"neftune.alpha={ALPHA}", f"soft_prompt.num_virtual_tokens={n}")
    prep = api.prepare(load_recipe(None, _overrides(still_bert, sentiment_csv, tmp_path, *extra)))
    model, batch = prep.model, _batch(prep)
    seen = _seen(model)  # after the soft prompt's hook
    model.train()
    model(**batch)
    prompt = model.soft_prompt.weight.detach()
    torch.testing.assert_close(seen[0][:, :n], prompt.expand(seen[0].shape[0], -1, -1), rtol=0, atol=0)
    clean = model.get_input_embeddings().weight.detach()[batch["input_ids"]]
    bound = ALPHA / math.sqrt((batch["input_ids"].shape[1] + n) * clean.shape[2])  # L counts the prompt
    noise = seen[0][:, n:] - clean
    assert 0.99 * bound < noise.abs().max() <= bound * (1 + 1e-5)


# exactly which parameters change, with each part it composes with (regex on names without peft's prefix)
# the same combinations and expectations as adversarial's (peft's prompt tuning on an encoder
# classifier included: Trainer's own NEFTune raises AttributeError there), and adversarial itself
COMPOSED = {**ADVERSARIAL_COMPOSED, "adversarial": (["adversarial.method=fgm"], r".")}


def _assert_exactly(prep, changed, held, pattern) -> None:
    names = [n for n, _ in prep.model.named_parameters()]
    intended = {
        n
        for n in names
        if re.search(pattern, n.removeprefix("base_model.model.")) and "original_module" not in n
    }
    assert changed == held == intended, (sorted(intended ^ changed)[:4], sorted(held ^ changed)[:4])


@pytest.mark.parametrize("part", COMPOSED, ids=list(COMPOSED))
def test_exactly_the_intended_parameters_train(part, tiny_bert, sentiment_csv, tmp_path):
    overrides, pattern = COMPOSED[part]
    extra = ("train.max_steps=4", f"neftune.alpha={ALPHA}", *overrides)
    recipe = load_recipe(None, _overrides(tiny_bert, sentiment_csv, tmp_path, *extra))
    _assert_exactly(*_run(recipe, tmp_path), pattern)


def test_causal_lm_sft_with_lora(tiny_gpt2, tmp_path):
    """The paper's setting: instruction SFT (the loss on the answers), here with LoRA."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", colour_rows(40))
    extra = (
        "task=causal_lm",
        "data.max_length=24",
        "train.max_steps=2",
        "peft.method=lora",
        f"neftune.alpha={ALPHA}",
    )
    recipe = load_recipe(None, _overrides(tiny_gpt2, pairs, tmp_path, *extra))
    _assert_exactly(*_run(recipe, tmp_path), r"\.lora_[AB]\.")


def test_the_trunk_cache_and_a_shared_trunk_are_refused_by_name():
    with pytest.raises(UserError, match=r"train\.trunk_cache: found on, with neftune"):
        load_recipe(None, ["neftune.alpha=5", "freeze.trainable=[head]", "train.trunk_cache=on"])
    with pytest.raises(UserError, match=r"neftune: found it with ensemble\.shared_trunk"):
        load_recipe(None, ["neftune.alpha=5", "freeze.trainable=[head]", "ensemble.shared_trunk=true"])


@pytest.mark.parametrize(
    "setting, words",
    [
        ("neftune.alpha=0", ["neftune.alpha", "greater than 0"]),
        ("neftune.alpha=-5", ["neftune.alpha", "greater than 0"]),
        ("neftune.noise_alpha=5", ["unknown key 'noise_alpha'", "alpha"]),
    ],
)
def test_bad_settings_stop_before_the_run_dir(setting, words, tiny_bert, sentiment_csv, tmp_path):
    args = ["train", f"model={tiny_bert}", f"data.source={sentiment_csv}", f"output.dir={tmp_path / 'runs'}"]
    refused([*args, setting], tmp_path / "runs", *words)


def test_killed_and_resumed_ends_like_an_uninterrupted_run(still_bert, sentiment_csv, tmp_path):
    """A model without dropout: the noise is the run's only randomness, and it changes the weights
    (a run without it ends elsewhere), so a resumed run that drew other noise would too."""
    args = [
        f"model={still_bert}",
        f"data.source={sentiment_csv}",
        "data.max_length=32",
        "train.max_steps=10",
        "train.eval_steps=4",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        "train.early_stopping.metric=loss",
        f"output.dir={tmp_path / 'runs'}",
    ]
    noisy = [*args, "neftune.alpha=15"]
    _train_cli([*noisy, "output.name=straight"])
    _train_cli([*args, "output.name=plain"])
    _killed([*noisy, "output.name=killed"], "step:6")
    run, straight, plain = (tmp_path / "runs" / name for name in ("killed", "straight", "plain"))
    assert _steps(run) == [4]
    _train_cli(["--resume", str(run)])

    def diff(a: Path, b: Path, where: str) -> float:
        ours, theirs = load_file(a / where / "model.safetensors"), load_file(b / where / "model.safetensors")
        return max((ours[k] - theirs[k]).abs().max().item() for k in ours)

    for where in ("final", f"checkpoints/checkpoint-{_steps(run)[-1]}"):
        assert diff(run, straight, where) <= 1e-6, where
    assert diff(straight, plain, "final") > 1e-4  # the noise mattered
    assert _metrics(run) == _metrics(straight)
