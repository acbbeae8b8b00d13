"""Distillation on unlabelled texts (`distill:` + `data.unlabeled`, strategy/distill.py `train_rows`):
the texts join the Trainer's training set with the label -100 and the teacher's soft labels, the steps
grow with them, a batch of them only learns alpha·T²·KL, the trunk cache, chunks and the few-shot
`train_rest` work with them, a killed run resumes exactly, and bad input stops before anything is
written. (tests/test_distill.py has the part itself, tests/test_distill_cli.py the command.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from hybridtune import api
from hybridtune.cli import app
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.strategy import distill
from hybridtune.train.engine import make_trainer, training_arguments

from .conftest import DISTILL_ALPHA as ALPHA
from .conftest import DISTILL_T as T
from .conftest import distill_overrides as _overrides
from .conftest import sentiment_rows, write_csv
from .refusal import refused
from .test_resume import _killed, _train

N_UNLABELLED = 40


@pytest.fixture(scope="module")
def unlabelled_txt(tmp_path_factory) -> Path:
    """40 texts none of the labelled splits has (one per line, as a .txt file is read)."""
    path = tmp_path_factory.mktemp("unlabelled") / "u.txt"
    path.write_text("\n".join(f"{text} unseen" for text, _ in sentiment_rows(N_UNLABELLED, seed=7)))
    return path


def _epoch(*extra: str) -> tuple[str, ...]:
    return ("train.max_steps=null", "train.epochs=1", *extra)


def _collate(prep, rows) -> dict:
    features = [{k: v for k, v in row.items() if k not in ("labels", "doc")} for row in rows]
    return prep.task.collator(prep.tokenizer)(features)


# --------------------------------------------------------------------------------------------------
# the training set, the soft labels, the steps


def test_unlabelled_texts_join_training_with_the_teachers_soft_labels(
    still_bert, sentiment_csv, teacher_run, unlabelled_txt, tmp_path
):
    """The Trainer's training set is the labelled rows (as without data.unlabeled), then one row per
    unlabelled text with the label -100; their soft labels are the teacher's own predictions of the
    texts; the planned and the trained steps count them; report.json says what was added."""
    plain = api.prepare(
        load_recipe(None, _overrides(still_bert, sentiment_csv, tmp_path, teacher_run, *_epoch()))
    )
    recipe = load_recipe(
        None,
        _overrides(
            still_bert, sentiment_csv, tmp_path, teacher_run, *_epoch(f"data.unlabeled={unlabelled_txt}")
        ),
    )
    prep = api.prepare(recipe)
    n = len(plain.datasets["train"])
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    trainer = make_trainer(prep.model, prep.tokenizer, prep.datasets, recipe, args, tmp_path, None, prep.plan)
    train = trainer.train_dataset
    assert len(train) == n + N_UNLABELLED and len(prep.splits.train) == n  # splits.train: the labelled
    assert train["labels"][:n] == plain.datasets["train"]["labels"]
    assert train["input_ids"][:n] == plain.datasets["train"]["input_ids"]
    assert train["labels"][n:] == [distill.IGNORE] * N_UNLABELLED
    texts = unlabelled_txt.read_text().splitlines()
    assert prep.tokenizer.batch_decode(train["input_ids"][n:], skip_special_tokens=True) == [
        t.lower() for t in texts
    ]
    # the soft labels of the unlabelled rows: what `hybridtune predict` says of the texts
    batch = _collate(prep, train.select(range(n, n + N_UNLABELLED)))
    soft = distill.soft_labels_of(prep.model).lookup(batch["input_ids"], batch["attention_mask"])
    probs = torch.tensor([list(row["probs"].values()) for row in api.predict(str(teacher_run), texts)])
    torch.testing.assert_close(torch.softmax(soft, -1), probs, atol=1e-5, rtol=1e-4)
    # the steps: one epoch of batches of 16 over the labelled rows and the unlabelled ones
    assert plain.plan.total_steps == math.ceil(n / 16)
    assert prep.plan.total_steps == math.ceil((n + N_UNLABELLED) / 16) > plain.plan.total_steps
    summary = api.train(recipe)
    assert summary["steps"] == prep.plan.total_steps
    added = summary["added_train_rows"]["distill"]
    assert (added["texts"], added["rows"]) == (N_UNLABELLED, N_UNLABELLED)
    assert added["unlabeled"]["source"] == str(unlabelled_txt) and added["unlabeled"]["read"] == N_UNLABELLED
    soft_file = load_file(Path(summary["run_dir"]) / distill.FILE)
    assert soft_file["logits"].shape[0] == n + N_UNLABELLED  # every training row scored once


def test_a_batch_of_unlabelled_rows_learns_alpha_t2_kl(
    still_bert, sentiment_csv, teacher_run, unlabelled_txt, tmp_path
):
    """A batch of only unlabelled rows (taken from the training set): the training loss is finite and
    is alpha·T²·KL(teacher ‖ student), computed by hand from the teacher's and the student's logits."""
    recipe = load_recipe(
        None, _overrides(still_bert, sentiment_csv, tmp_path, teacher_run, f"data.unlabeled={unlabelled_txt}")
    )
    prep = api.prepare(recipe)
    args = training_arguments(recipe.train, recipe.output, tmp_path / "ck")
    trainer = make_trainer(prep.model, prep.tokenizer, prep.datasets, recipe, args, tmp_path, None, prep.plan)
    train = prep.datasets["train"]
    rows = train.select(range(len(train) - 8, len(train)))
    batch = trainer._prepare_inputs({**_collate(prep, rows), "labels": torch.tensor(rows["labels"])})
    assert (batch["labels"] == distill.IGNORE).all()
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    teacher = api.load_run(str(teacher_run)).model.eval().to(batch["input_ids"].device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t, s = teacher(**inputs).logits, model(**inputs).logits
    p_t = torch.softmax(t / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s / T, -1))).sum(-1).mean()
    assert torch.isfinite(loss) and kl > 1e-4
    torch.testing.assert_close(loss.detach(), ALPHA * T**2 * kl)


def test_chunked_unlabelled_texts_learn_their_documents_soft_labels(
    still_bert, sentiment_csv, teacher_run, tmp_path
):
    """data.long_texts: chunks: an unlabelled text longer than max_length is several windows, each
    with the label -100 and the teacher's soft label of its whole text (the `doc` column offset
    past the labelled texts)."""
    long = tmp_path / "long.txt"
    texts = [" ".join(f"{text} unseen" for text, _ in sentiment_rows(4, seed=s)) for s in (11, 12, 13)]
    long.write_text("\n".join(texts))
    extra = ("data.long_texts=chunks", "data.max_length=24", "data.stride=4", f"data.unlabeled={long}")
    prep = api.prepare(
        load_recipe(None, _overrides(still_bert, sentiment_csv, tmp_path, teacher_run, *extra))
    )
    train, n_texts = prep.datasets["train"], len(prep.splits.train)
    docs = train["doc"]
    added = [i for i, d in enumerate(docs) if d >= n_texts]
    assert sorted({docs[i] for i in added}) == [n_texts, n_texts + 1, n_texts + 2]
    assert len(added) > 3 and all(train[i]["labels"] == distill.IGNORE for i in added)
    assert all(train[i]["labels"] != distill.IGNORE for i in range(len(train)) if i not in added)
    soft = distill.soft_labels_of(prep.model)
    batch = _collate(prep, train.select(added))
    got = soft.lookup(batch["input_ids"], batch["attention_mask"])
    probs = {
        text: list(row["probs"].values())
        for text, row in zip(texts, api.predict(str(teacher_run), texts), strict=True)
    }
    want = torch.tensor([probs[texts[docs[i] - n_texts]] for i in added])
    torch.testing.assert_close(torch.softmax(got, -1), want, atol=1e-5, rtol=1e-4)


def test_a_head_only_student_caches_the_trunk_of_the_unlabelled_rows_too(
    tiny_bert, sentiment_csv, teacher_run, unlabelled_txt, tmp_path
):
    """The trunk cache numbers the rows after they were added: a head-only student runs every
    training row, unlabelled ones included, on cached states (a row without any would fail its
    lookup), with group_by_length's lengths over all of them; with alpha 1 the loss is the soft term."""
    extra = (
        "freeze.trainable=[head]",
        "train.trunk_cache=on",
        "train.group_by_length=true",
        "distill.alpha=1",
        f"data.unlabeled={unlabelled_txt}",
        *_epoch(),
    )
    recipe = load_recipe(None, _overrides(tiny_bert, sentiment_csv, tmp_path, teacher_run, *extra))
    summary = api.train(recipe)
    assert summary["trunk_cache"]["used"] and summary["trunk_cache"]["depth"] == 2
    n = len(api.prepare(recipe).splits.train)
    assert summary["steps"] == math.ceil((n + N_UNLABELLED) / 16)
    rows = [
        json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in rows if "loss_distill" in r]
    assert len(steps) == summary["steps"]
    assert all(r["loss"] == pytest.approx(r["loss_distill"], abs=1e-3) for r in steps)


# --------------------------------------------------------------------------------------------------
# hybridtune distill with the rest of a few-shot draw


def test_the_distill_command_learns_the_rest_of_a_few_shot_draw(trained_run, tmp_path):
    """A teacher trained on 8 labels per class; its student learns the soft labels of those 16 rows
    and of the train rows the draw left out (`data.unlabeled=train_rest`, a key=value override)."""
    teacher = trained_run("teacher-8shot", "data.shots=8")
    out = tmp_path / "runs"
    args = ["distill", str(teacher), "--blocks", "1", "data.unlabeled=train_rest", "train.max_steps=3"]
    result = CliRunner().invoke(app, [*args, f"output.dir={out}", "--repeats", "1"])
    assert result.exit_code == 0, (result.output[-2000:], result.exception)
    (run,) = out.iterdir()
    report = json.loads((run / "report.json").read_text())
    rest = report["added_train_rows"]["distill"]
    assert report["few_shot"]["train_rows"] == 16  # the labelled draw
    assert rest["unlabeled"]["source"] == "train_rest" and rest["texts"] > 100
    assert report["distillation"]["soft_labels"]["rows"] == 16 + rest["rows"]


# --------------------------------------------------------------------------------------------------
# kill -9 and --resume


def test_a_killed_student_with_unlabelled_rows_resumes_exactly(
    tiny_bert, sentiment_csv, teacher_run, unlabelled_txt, tmp_path
):
    args = [
        *_overrides(
            tiny_bert, sentiment_csv, tmp_path / "runs", teacher_run, f"data.unlabeled={unlabelled_txt}"
        ),
        "train.max_steps=10",
        "train.eval_steps=4",
    ]
    _train([*args, "output.name=straight"])  # tests/test_resume.py: to the end, in this process
    _killed([*args, "output.name=killed"], "step:6")  # SIGKILLed after step 6, in a process of its own
    run, straight = tmp_path / "runs" / "killed", tmp_path / "runs" / "straight"
    result = CliRunner().invoke(app, ["train", "--resume", str(run)], env={"HYBRIDTUNE_TEST_KILL_AT": None})
    assert result.exit_code == 0, result.output[-2000:]
    soft, soft_straight = load_file(run / distill.FILE), load_file(straight / distill.FILE)
    assert all(torch.equal(soft[k], soft_straight[k]) for k in ("keys", "logits"))
    ours = load_file(run / "final" / "model.safetensors")
    theirs = load_file(straight / "final" / "model.safetensors")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    report = json.loads((run / "report.json").read_text())
    assert report["added_train_rows"]["distill"]["texts"] == N_UNLABELLED


# --------------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written


def test_data_unlabeled_without_a_reader_is_still_refused():
    with pytest.raises(UserError, match="expected self_training or distill"):
        load_recipe(None, ["data.unlabeled=train_rest", "data.shots=8"])


def test_bad_unlabelled_input_exits_2_before_anything_is_written(
    tiny_bert, sentiment_csv, teacher_run, unlabelled_txt, tmp_path
):
    out = tmp_path / "runs"

    def train(*extra: str) -> list[str]:
        return ["train", *_overrides(tiny_bert, sentiment_csv, out, teacher_run), *extra]

    refused(train("data.unlabeled=train_rest"), out, "data.unlabeled", "train_rest without data.shots")
    refused(train(f"data.unlabeled={tmp_path / 'missing.csv'}"), out, "data.unlabeled", "no such file")
    bad = write_csv(tmp_path / "u.csv", [("a new text", "negative"), ("another one", "neutral")])
    refused(train(f"data.unlabeled={bad}"), out, "u.csv:row 3", "label 'neutral'")
    refused(
        train(f"data.unlabeled={unlabelled_txt}", "distill.alpha=0"), out, "distill.alpha", "data.unlabeled"
    )
    refused(
        train(f"data.unlabeled={unlabelled_txt}", "data.text_pair_column=label"),
        out,
        "distill",
        "data.text_pair_column",
    )
