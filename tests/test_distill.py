"""Knowledge distillation, the part (strategy/distill.py, hybridtune/distillation.py): the loss is Hinton
et al.'s on a batch, the soft labels are the teacher's own reading of the texts, a student cut to k
blocks is a plain k-block transformers model of any family, and the part composes with LoRA, the other
strategies and the frozen-trunk cache. (tests/test_distill_cli.py: `hybridtune distill`, bad input,
kill -9 and --resume.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hybridtune import api
from hybridtune.recipe import load_recipe
from hybridtune.strategy import distill
from hybridtune.train.engine import make_trainer, training_arguments

from .conftest import DISTILL_ALPHA as ALPHA
from .conftest import DISTILL_T as T
from .conftest import distill_overrides as _overrides


def _trainer(recipe, tmp_path):
    prep = api.prepare(recipe)
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    trainer = make_trainer(prep.model, prep.tokenizer, prep.datasets, recipe, args, tmp_path, None, prep.plan)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    return prep, trainer, batch


# --------------------------------------------------------------------------------------------------
# the loss


def test_the_loss_is_hintons_on_one_batch(still_bert, sentiment_csv, teacher_run, tmp_path):
    """alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T)) + (1 − alpha)·CE, computed by hand from
    the teacher's and the student's logits on the batch (a student without dropout: train mode
    computes what the hand computation does)."""
    recipe = load_recipe(None, _overrides(still_bert, sentiment_csv, tmp_path, teacher_run))
    prep, trainer, batch = _trainer(recipe, tmp_path)
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    # same tokenizer, texts shorter than both max_lengths; on the batch's device (Trainer's)
    teacher = api.load_run(str(teacher_run)).model.eval().to(batch["input_ids"].device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t = teacher(**inputs).logits
        s = model(**inputs).logits
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    ce = F.cross_entropy(s, batch["labels"])
    torch.testing.assert_close(loss.detach(), ALPHA * T**2 * kl + (1 - ALPHA) * ce)
    assert kl > 1e-4  # the soft term is not zero, so the check above is not only the cross-entropy's


def test_rows_without_a_hard_label_learn_the_soft_term_alone(
    still_bert, sentiment_csv, teacher_run, tmp_path
):
    """label -100 (an unlabelled text): the hard loss is the mean over the labelled rows, and 0, not
    NaN, for a batch without any; the training loss is then alpha · the soft term."""
    recipe = load_recipe(None, _overrides(still_bert, sentiment_csv, tmp_path, teacher_run))
    _, trainer, batch = _trainer(recipe, tmp_path)
    model = trainer.model.train()
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.detach()
    labels = batch["labels"].clone()
    labels[::2] = distill.IGNORE
    torch.testing.assert_close(distill.hard_loss(logits, labels), F.cross_entropy(logits[1::2], labels[1::2]))
    unlabelled = {**batch, "labels": torch.full_like(labels, distill.IGNORE)}
    loss = trainer.compute_loss(model, unlabelled)
    assert torch.isfinite(loss)
    soft = distill.soft_loss(
        logits,
        distill.soft_labels_of(model).lookup(batch["input_ids"], batch["attention_mask"]).to(logits.device),
        T,
    )
    torch.testing.assert_close(loss.detach(), ALPHA * soft)


def test_the_teacher_reads_the_texts_as_it_was_trained_to(tiny_bert, sentiment_csv, trained_run, tmp_path):
    """A teacher trained with max_length 8 scores the texts cut at 8 tokens, whatever the student's
    max_length: its soft labels are its own predictions (`hybridtune predict`) on the raw texts."""
    teacher = trained_run("teacher8", "data.max_length=8")
    recipe = load_recipe(None, _overrides(tiny_bert, sentiment_csv, tmp_path, teacher))
    prep, _, batch = _trainer(recipe, tmp_path)
    soft = distill.soft_labels_of(prep.model).lookup(batch["input_ids"], batch["attention_mask"])
    texts = [
        prep.tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
        for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]
    frame = prep.splits.train.set_index(prep.splits.train["text"].str.lower())
    originals = frame.loc[texts, "text"].tolist()  # the bundled tokenizer lower-cases
    probs = [list(row["probs"].values()) for row in api.predict(str(teacher), originals)]
    torch.testing.assert_close(torch.softmax(soft, -1), torch.tensor(probs), atol=1e-5, rtol=1e-4)
    assert (batch["attention_mask"].sum(1) > 8).all()  # the student reads more than the teacher did


# --------------------------------------------------------------------------------------------------
# the student: cut to k blocks, any strategy


def test_a_student_cut_to_k_blocks_is_a_plain_k_block_model(tiny_bert6, sentiment_csv, teacher_run, tmp_path):
    from transformers import AutoModel, AutoModelForSequenceClassification

    recipe = load_recipe(
        None, _overrides(tiny_bert6, sentiment_csv, tmp_path, teacher_run, "distill.student_blocks=3")
    )
    prep = api.prepare(recipe)
    base = AutoModel.from_pretrained(tiny_bert6)
    assert prep.anatomy.num_blocks == 3 and len(prep.model.bert.encoder.layer) == 3
    for i in range(3):  # the bottom blocks of the base, as they were
        for (name, p), (_, q) in zip(
            prep.model.bert.encoder.layer[i].named_parameters(),
            base.encoder.layer[i].named_parameters(),
            strict=True,
        ):
            assert torch.equal(p, q), name
    run = Path(api.train(recipe)["run_dir"])
    plain = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    assert plain.config.num_hidden_layers == 3 and len(plain.bert.encoder.layer) == 3
    ours = api.load_run(str(run)).model
    ids = prep.tokenizer(["a fine film", "a dull plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, ours(**ids).logits)
    full = sum(
        p.numel()
        for p in AutoModelForSequenceClassification.from_pretrained(tiny_bert6, num_labels=2).parameters()
    )
    assert sum(p.numel() for p in plain.parameters()) < full


def test_a_cut_student_with_lora_trains_its_lora_and_loads_back(
    tiny_bert6, sentiment_csv, teacher_run, tmp_path
):
    """LoRA on the 3-block student: the LoRA matrices and the head change, nothing else; the saved
    adapter is loaded back onto the base cut the same way (inference.load_run)."""
    extra = (
        "distill.student_blocks=3",
        "peft.method=lora",
        "train.lr=0.02",
        "train.early_stopping.patience=null",
    )
    recipe = load_recipe(None, _overrides(tiny_bert6, sentiment_csv, tmp_path, teacher_run, *extra))
    prep, trainer, _ = _trainer(recipe, tmp_path)
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters()}
    trainer.args.save_strategy = trainer.args.eval_strategy = "no"
    trainer.args.load_best_model_at_end = False
    trainer.train()
    changed = {n for n, p in prep.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n or ".modules_to_save." in n for n in changed), sorted(changed)[:5]
    assert {n.split(".layer.")[1].split(".")[0] for n in changed if "lora_" in n} == {"0", "1", "2"}
    run = Path(api.train(recipe)["run_dir"])
    loaded = api.load_run(str(run)).model
    assert len(loaded.get_base_model().bert.encoder.layer) == 3
    assert json.loads((run / "final" / "base_config.json").read_text())["num_hidden_layers"] == 3


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "mpnet", "gpt2", "llama"])
def test_every_family_cut_to_k_blocks_saves_as_a_k_block_model(family, tokenizer_dir, tmp_path):
    """The cut is the anatomy's block stack and the config's layer count (each config's own name for
    it): what save_pretrained writes loads with plain transformers as the same k-block model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hybridtune.model.anatomy import Anatomy

    from .test_matrix import _config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = _config(family, tokenizer.vocab_size, tokenizer.pad_token_id)
    config.num_labels, config.pad_token_id = 2, tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_config(config)
    cut = distill.reshape(model, distill.DistillConfig(teacher="unused", student_blocks=2)).eval()
    assert Anatomy.of(cut).num_blocks == 2
    cut.save_pretrained(tmp_path)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert plain.config.num_hidden_layers == 2 and Anatomy.of(plain).num_blocks == 2
    ids = tokenizer(["a fine film", "a dull and tedious plot"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(**ids).logits, cut(**ids).logits)


RECIPES = Path(__file__).parent.parent / "recipes"


@pytest.mark.parametrize(
    "name",
    ["head_only", "freeze_top2", "bitfit", "lora", "houlsby_adapters", "soft_prompt_lora", "llrd", "ulmfit"],
)
def test_distill_composes_with_the_other_strategies(name, tiny_bert6, sentiment_csv, teacher_run, tmp_path):
    """An example recipe plus `distill` on a 3-block student: exactly what its optimizer holds
    changes (freeze, peft, adapters, a soft prompt, layer-wise lrs, stages work on the cut model),
    and the soft term is in the training loss."""
    from .test_recipes import _run

    overrides = [
        f"model={tiny_bert6}",
        f"data.source={sentiment_csv}",
        "data.max_length=64",
        "train.max_steps=8",
        "train.batch_size=16",
        "train.precision=fp32",
        "train.lr=0.01",
        "train.early_stopping.patience=null",
        f"output.dir={tmp_path}",
        f"distill.teacher={teacher_run}",
        "distill.student_blocks=3",
    ]
    recipe = load_recipe(RECIPES / f"{name}.yaml", overrides)
    prep, changed, held = _run(recipe, tmp_path)
    assert prep.anatomy.num_blocks == 3
    assert changed and changed == {n for n in held if "original_module" not in n}, sorted(held - changed)[:5]
    assert distill.soft_labels_of(prep.model).logits is not None  # the loss looked the soft labels up


def test_a_head_only_student_uses_the_frozen_trunk_cache(tiny_bert, sentiment_csv, teacher_run, tmp_path):
    """The teacher's logits are precomputed, so distillation leaves the cache eligible: a head-only
    student runs on cached trunk states and learns the soft labels."""
    extra = ("freeze.trainable=[head]", "train.trunk_cache=on", "distill.alpha=1")
    summary = api.train(
        load_recipe(None, _overrides(tiny_bert, sentiment_csv, tmp_path, teacher_run, *extra))
    )
    assert summary["trunk_cache"]["used"] and summary["trunk_cache"]["depth"] == 2
    rows = [
        json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in rows if "loss_distill" in r]
    assert len(steps) == 6 and all(r["loss"] == pytest.approx(r["loss_distill"], abs=1e-3) for r in steps)
