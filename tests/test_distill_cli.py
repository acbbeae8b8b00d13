"""Knowledge distillation through the CLI: `hybridtune distill` trains and writes the comparison, bad
settings and bad teachers stop before anything is written, and a killed run resumes exactly from the
soft labels it began with. (tests/test_distill.py: the loss, the student, the other strategies.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hybridtune import api
from hybridtune.cli import app
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.strategy import distill

from .conftest import distill_overrides as _overrides
from .conftest import sentiment_rows, write_csv
from .refusal import refused
from .test_resume import _killed, _train

# --------------------------------------------------------------------------------------------------
# hybridtune distill


def test_the_distill_command_trains_and_compares(teacher_run, tmp_path):
    out = tmp_path / "runs"
    args = [
        "distill",
        str(teacher_run),
        "--blocks",
        "1",
        "train.max_steps=4",
        f"output.dir={out}",
        "--repeats",
        "1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output[-2000:], result.exception)
    assert "student vs teacher" in result.output and "texts / s" in result.output
    (run,) = out.iterdir()
    recipe = load_recipe(run / "recipe.yaml")
    assert recipe.distill.teacher == str(teacher_run) and recipe.distill.student_blocks == 1
    assert recipe.data == load_recipe(teacher_run / "recipe.yaml").data  # the teacher's data and labels
    report = json.loads((run / "report.json").read_text())
    comparison = report["distillation"]
    assert comparison == json.loads((run / "distill.json").read_text())
    t, s = comparison["teacher"], comparison["student"]
    assert (t["blocks"], s["blocks"]) == (2, 1)
    assert s["parameters"] < t["parameters"] and s["weights_mib"] < t["weights_mib"]
    assert t["texts_per_second"] > 0 and s["texts_per_second"] > 0
    assert comparison["test_lost"] == pytest.approx(t["test"]["accuracy"] - s["test"]["accuracy"])
    assert comparison["soft_labels"]["rows"] > 0 and comparison["soft_labels"]["teacher"] == str(
        teacher_run.resolve()
    )


def test_a_student_recipe_needs_no_teacher_of_its_own(teacher_run, tmp_path):
    """RECIPE's distill section gives the temperature and alpha; the teacher is the command's."""
    recipe = tmp_path / "student.yaml"
    recipe.write_text("distill:\n  temperature: 3.0\n  alpha: 0.7\ntrain:\n  max_steps: 2\n")
    out = tmp_path / "runs"
    args = ["distill", str(teacher_run), "--blocks", "1", str(recipe), f"output.dir={out}", "--repeats", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output[-2000:], result.exception)
    (run,) = out.iterdir()
    section = load_recipe(run / "recipe.yaml").distill
    assert (section.teacher, section.temperature, section.alpha) == (str(teacher_run), 3.0, 0.7)
    assert json.loads((run / "report.json").read_text())["steps"] == 2


# --------------------------------------------------------------------------------------------------
# bad input: exit 2, one line, nothing written


@pytest.fixture
def token_run(tmp_path_factory, tiny_bert) -> Path:
    conll = tmp_path_factory.mktemp("ner") / "ner.conll"
    words = {"ana": "B-person", "bob": "B-person", "met": "O", "in": "O", "paris": "B-loc"}
    conll.write_text("\n".join(f"{w}\t{words[w]}\nand\tO\n{i}\tO\n" for i, w in enumerate([*words] * 8)))
    out = tmp_path_factory.mktemp("token-run")
    args = [f"model={tiny_bert}", f"data.source={conll}", "task=token_classification", "train.max_steps=2"]
    return Path(api.train(load_recipe(None, [*args, "train.precision=fp32", f"output.dir={out}"]))["run_dir"])


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["distill.temperature=0"], ["distill.temperature", "greater than 0"]),
        (["distill.alpha=1.5"], ["distill.alpha"]),
        (["distill.alpha=-0.1"], ["distill.alpha"]),
        (["distill.student_blocks=0"], ["distill.student_blocks"]),
        (["distill.student_blocks=2"], ["distill.student_blocks", "2 for a model of 2 blocks", "1 to 1"]),
        (["task=token_classification"], ["distill", "task token_classification"]),
    ],
)
def test_bad_settings_exit_2_before_anything_is_written(
    extra, words, tiny_bert, sentiment_csv, teacher_run, tmp_path
):
    out = tmp_path / "runs"
    refused(["train", *_overrides(tiny_bert, sentiment_csv, out, teacher_run), *extra], out, *words)


def test_bad_teachers_exit_2_before_anything_is_written(
    tiny_bert, sentiment_csv, teacher_run, token_run, tmp_path
):
    out = tmp_path / "runs"

    def train(teacher: Path, data: str = sentiment_csv) -> list[str]:
        return ["train", *_overrides(tiny_bert, data, out, teacher)]

    refused(train(tmp_path / "nowhere"), out, "distill.teacher", "not a finished run")
    unfinished = tmp_path / "unfinished"  # killed before its end: checkpoints, no final/
    shutil.copytree(teacher_run, unfinished, ignore=shutil.ignore_patterns("final"))
    refused(train(unfinished), out, "distill.teacher", "not a finished run")
    failed = tmp_path / "failed"
    shutil.copytree(teacher_run, failed)
    (failed / "failed.json").write_text('{"step": "the test evaluation"}')
    refused(train(failed), out, "distill.teacher", "a failed run")
    ensemble = tmp_path / "ens"
    ensemble.mkdir()
    (ensemble / "ensemble.json").write_text("{}")
    refused(train(ensemble), out, "distill.teacher", "an ensemble dir")
    refused(train(token_run), out, "distill.teacher", "a token_classification run")
    other = str(write_csv(tmp_path / "other.csv", sentiment_rows(80, labels=("bad", "good"))))
    refused(train(teacher_run, other), out, "distill.teacher", "labels ['negative', 'positive']")
    refused(
        ["distill", str(teacher_run), "--blocks", "1", "--student", "x", f"output.dir={out}"],
        out,
        "--student",
    )
    refused(
        ["distill", str(tmp_path / "nowhere"), "--blocks", "1", f"output.dir={out}"], out, "no finished run"
    )
    refused(
        ["distill", str(teacher_run), "--blocks", "5", f"output.dir={out}"], out, "distill.student_blocks"
    )


def test_a_joint_ensemble_and_a_contrastive_stage_without_training_are_refused(tmp_path):
    with pytest.raises(UserError, match="distill: found it with ensemble.shared_trunk"):
        load_recipe(None, ["distill.teacher=x", "ensemble.shared_trunk=true", "freeze.trainable=[head]"])
    with pytest.raises(UserError, match="distill: found it with contrastive.then: none"):
        load_recipe(None, ["distill.teacher=x", "pooling=mean", "contrastive.then=none"])


def test_a_cut_student_is_not_exported_as_a_peft_adapter(tiny_bert6, sentiment_csv, teacher_run, tmp_path):
    extra = ("distill.student_blocks=3", "peft.method=lora", "train.max_steps=2")
    run = api.train(
        load_recipe(None, _overrides(tiny_bert6, sentiment_csv, tmp_path / "runs", teacher_run, *extra))
    )
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", run["run_dir"], "--format", "peft", "--out", str(out)])
    assert result.exit_code == 2 and "distill.student_blocks" in result.stderr, result.output
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# kill -9 and --resume


def test_a_killed_student_resumes_from_the_soft_labels_it_began_with(
    tiny_bert, sentiment_csv, teacher_run, tmp_path
):
    """Killed after step 6, resumed: the weights and the loss curve are the uninterrupted run's, and the
    soft labels were read back, not recomputed: the teacher's weights are changed before the resume,
    which would change recomputed soft labels (and so the weights)."""
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher)
    args = [
        *_overrides(tiny_bert, sentiment_csv, tmp_path / "runs", teacher),
        "train.max_steps=10",
        "train.eval_steps=4",
    ]
    _train([*args, "output.name=straight"])  # tests/test_resume.py: to the end, in this process
    _killed([*args, "output.name=killed"], "step:6")  # SIGKILLed after step 6, in a process of its own
    run, straight = tmp_path / "runs" / "killed", tmp_path / "runs" / "straight"
    written = (run / distill.FILE).read_bytes()
    soft, soft_straight = load_file(run / distill.FILE), load_file(straight / distill.FILE)
    assert all(torch.equal(soft[k], soft_straight[k]) for k in ("keys", "logits"))  # metadata: the time
    weights = teacher / "final" / "model.safetensors"
    save_file({k: v * 1.5 for k, v in load_file(weights).items()}, weights)
    result = CliRunner().invoke(app, ["train", "--resume", str(run)], env={"HYBRIDTUNE_TEST_KILL_AT": None})
    assert result.exit_code == 0, result.output[-2000:]
    assert (run / distill.FILE).read_bytes() == written
    ours, theirs = (
        load_file(run / "final" / "model.safetensors"),
        load_file(straight / "final" / "model.safetensors"),
    )
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6

    def losses(r: Path) -> list:
        rows = [json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()]
        return [(x["step"], x["loss_distill"], x["loss_task"]) for x in rows if "loss_distill" in x]

    assert losses(run) == losses(straight) and len(losses(run)) == 10
