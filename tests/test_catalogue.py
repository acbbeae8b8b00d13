"""The bad-input catalogue: one row = an input, the exit code it must give and the words its one-line
message must hold. Every row runs through the CLI (typer's runner, in process) in a fresh tmp dir,
and nothing under that dir may change when the input is refused (exit 2 writes nothing).

The rows are the inputs a skeptical user found that escaped as a traceback, or were silently
accepted, at an earlier commit (docs/reliability.md counts them by kind)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hybridtune.cli import app

from .conftest import sentiment_rows, write_csv
from .refusal import assert_refused, failed_in_one_line, snapshot

BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


@dataclass
class Row:
    id: str
    args: Callable[[Path, dict], list[str]]  # (tmp dir, context) -> CLI arguments
    code: int
    words: tuple[str, ...]
    setup: Callable[[Path, dict], None] | None = None


def _file(name: str, text: str) -> Callable[[Path, dict], None]:
    return lambda tmp, ctx: (tmp / name).write_text(text, encoding="utf-8")


def _train(*overrides: str) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, ctx: ["train", f"model={ctx['model']}", f"output.dir={tmp / 'runs'}", *overrides]


def _recipe(name: str) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, ctx: ["train", str(tmp / name), f"output.dir={tmp / 'runs'}"]


def _data(name: str, *more: str) -> Callable[[Path, dict], list[str]]:
    return lambda tmp, ctx: [*_train(f"data.source={tmp / name}", "train.max_steps=2", *more)(tmp, ctx)]


def _skeleton(meta: str, text: str) -> Callable[[Path, dict], None]:
    """A run / export / ensemble / checkpoint dir whose metadata file `meta` holds `text`."""

    def make(tmp: Path, ctx: dict) -> None:
        d = tmp / "d"
        (d / "final").mkdir(parents=True)
        (d / "recipe.yaml").write_text("name: x\n")
        if meta == "trainer_state.json":
            (d / "run.json").write_text('{"task": "classification"}')
            checkpoint = d / "checkpoints" / "checkpoint-2"
            checkpoint.mkdir(parents=True)
            (checkpoint / meta).write_text(text, encoding="utf-8")
            # weights and optimizer state that read: the state file is what is wrong
            import torch
            from safetensors.torch import save_file

            save_file({"w": torch.zeros(1)}, str(checkpoint / "model.safetensors"))
            torch.save({}, checkpoint / "optimizer.pt")
        else:
            (d / meta).write_text(text, encoding="utf-8")

    return make


def _copy_run(tmp: Path, ctx: dict, name: str = "run") -> Path:
    target = tmp / name
    shutil.copytree(ctx["run"], target)
    return target


def _export_marked_not(tmp: Path, ctx: dict) -> None:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "export.json").write_text("{}")
    (tmp / "mine" / "thesis.tex").write_text("years of work")


def _compare_out_not_ours(tmp: Path, ctx: dict) -> None:
    (tmp / "work" / "cache").mkdir(parents=True)
    (tmp / "work" / "cache" / "keep.txt").write_text("not a trunk cache")
    (tmp / "work" / "notes.txt").write_text("mine")


SUITE_RECIPE = "name: s\ntrain: {max_steps: 2}\n"

ROWS = [
    # --- recipes: YAML -------------------------------------------------------------------------
    Row("yaml-alias-bomb", _recipe("r.yaml"), 2, ("r.yaml:1", "invalid YAML", "aliases"), _file("r.yaml", BOMB)),
    Row(
        "yaml-alias-bomb-unknown-key",
        _recipe("r.yaml"),
        2,
        ("invalid YAML", "aliases"),
        _file("r.yaml", BOMB.replace("i: &i", "zzz: &i")),
    ),
    Row(
        "yaml-duplicate-key",
        _recipe("r.yaml"),
        2,
        ("r.yaml:3", "'lr' twice"),
        _file("r.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n"),
    ),
    Row(
        "yaml-huge-value-in-message",
        _recipe("r.yaml"),
        2,
        ("r.yaml: name", "xxx...xxx"),
        _file("r.yaml", "name: '" + "x" * 200_000 + "'\n"),
    ),
    Row("yaml-nested-too-deep", _recipe("r.yaml"), 2, ("nesting deeper",), _file("r.yaml", "a: " + "[" * 200)),
    # --- recipes: numbers ------------------------------------------------------------------------
    Row("epochs-inf", _train("train.epochs=.inf"), 2, ("train.epochs", "finite")),
    Row("epochs-nan", _train("train.epochs=.nan"), 2, ("train.epochs", "finite")),
    Row("epochs-zero", _train("train.epochs=0"), 2, ("train.epochs", "greater than 0")),
    Row("epochs-huge", _train("train.epochs=1.0e+300"), 2, ("train.epochs", "10000")),
    Row("seed-negative", _train("train.seed=-1"), 2, ("train.seed", "greater than or equal to 0")),
    Row("seed-2**40", _train("train.seed=1099511627776"), 2, ("train.seed", "4294967295")),
    Row("split-seed-negative", _train("data.split.seed=-5"), 2, ("data.split.seed",)),
    Row("weight-decay-inf", _train("train.weight_decay=.inf"), 2, ("train.weight_decay", "finite")),
    Row("max-grad-norm-inf", _train("train.max_grad_norm=.inf"), 2, ("train.max_grad_norm", "finite")),
    Row("lr-nan-string", _train('train.lr="nan"'), 2, ("train.lr", "finite")),
    Row("schedule-ratio-inf", _train("schedule.ratio=.inf"), 2, ("schedule.ratio", "finite")),
    Row("ensemble-weights-nan", _train("ensemble.weights=[.nan,1]"), 2, ("ensemble.weights[0]", "finite")),
    Row("max-steps-huge", _train("train.max_steps=100000000000000"), 2, ("train.max_steps",)),
    # --- paths a user names ----------------------------------------------------------------------
    Row("output-name-dotdot", _train("output.name=../x"), 2, ("output.name", "'../x'")),
    Row("output-name-absolute", _train("output.name=/tmp/hybridtune-x"), 2, ("output.name",)),
    Row("output-name-nested", _train("output.name=a/b/c"), 2, ("output.name",)),
    Row(
        "suite-strategy-name-dotdot",
        lambda tmp, ctx: ["compare", str(tmp / "s.yaml"), "--out", str(tmp / "cmp")],
        2,
        ("strategies.0.name", "'../../x'"),
        lambda tmp, ctx: (
            (tmp / "r.yaml").write_text(SUITE_RECIPE),
            (tmp / "s.yaml").write_text("strategies: [{recipe: r.yaml, name: ../../x}]\n"),
        ),
    ),
    Row(
        "suite-strategy-name-absolute",
        lambda tmp, ctx: ["compare", str(tmp / "s.yaml"), "--out", str(tmp / "cmp")],
        2,
        ("strategies.0.name",),
        lambda tmp, ctx: (
            (tmp / "r.yaml").write_text(SUITE_RECIPE),
            (tmp / "s.yaml").write_text(f"strategies: [{{recipe: r.yaml, name: {tmp}}}]\n"),
        ),
    ),
    Row(
        "suite-name-dotdot",
        lambda tmp, ctx: ["compare", str(tmp / "s.yaml")],
        2,
        ("name", "'../up'"),
        lambda tmp, ctx: (
            (tmp / "r.yaml").write_text(SUITE_RECIPE),
            (tmp / "s.yaml").write_text("name: ../up\nstrategies: [r.yaml]\n"),
        ),
    ),
    Row(
        "suite-duplicate-key",
        lambda tmp, ctx: ["compare", str(tmp / "s.yaml"), "--out", str(tmp / "cmp")],
        2,
        ("s.yaml:2", "twice"),
        _file("s.yaml", "strategies: [a.yaml]\nstrategies: [b.yaml]\n"),
    ),
    Row(
        "compare-out-not-a-compare-dir",
        lambda tmp, ctx: ["compare", str(tmp / "s.yaml"), "--out", str(tmp / "work")],
        2,
        ("--out", "not a compare dir"),
        lambda tmp, ctx: (
            (tmp / "r.yaml").write_text(f"name: s\nmodel: {ctx['model']}\ntrain: {{max_steps: 2}}\n"),
            (tmp / "s.yaml").write_text("strategies: [r.yaml]\n"),
            _compare_out_not_ours(tmp, ctx),
        ),
    ),
    Row(
        "export-out-holds-export-json-not-ours",
        lambda tmp, ctx: ["export", str(ctx["run"]), "--format", "merged", "--out", str(tmp / "mine")],
        2,
        ("--out", "not an export", ".hybridtune-export"),
        _export_marked_not,
    ),
    Row(
        "export-out-dot",
        lambda tmp, ctx: ["export", str(ctx["run"]), "--format", "merged", "--out", "."],
        2,
        ("--out", "'.'", "not an export"),
        lambda tmp, ctx: (tmp / "notes.txt").write_text("mine"),
    ),
    Row(
        "export-out-symlink",
        lambda tmp, ctx: ["export", str(ctx["run"]), "--format", "merged", "--out", str(tmp / "link")],
        2,
        ("--out", "symbolic link"),
        lambda tmp, ctx: ((tmp / "real").mkdir(), (tmp / "link").symlink_to(tmp / "real")),
    ),
    Row(
        "export-out-is-the-run",
        lambda tmp, ctx: ["export", str(tmp / "run"), "--format", "merged", "--out", str(tmp)],
        2,
        ("--out",),
        _copy_run,
    ),
    # --- data --------------------------------------------------------------------------------------
    Row(
        "csv-two-rows",
        _data("d.csv"),
        2,
        ("data.split", "2 distinct example(s)", "at least 3"),
        _file("d.csv", "text,label\na good film,1\na bad film,0\n"),
    ),
    Row(
        "csv-duplicate-header",
        _data("d.csv"),
        2,
        ("d.csv:row 1", "['text']", "twice"),
        lambda tmp, ctx: write_csv(tmp / "d.csv", [(t, t, y) for t, y in sentiment_rows(20)], ("text", "text", "label")),
    ),
    Row(
        "jsonl-list-labels",
        _data("d.jsonl"),
        2,
        ("d.jsonl:line 1", "label [0] (list)"),
        _file("d.jsonl", "".join(json.dumps({"text": f"film {i}", "label": [i % 2]}) + "\n" for i in range(20))),
    ),
    # --- run-dir metadata given to eval / predict / export / serve / resume -------------------------
    Row("run-json-not-json", lambda t, c: ["eval", str(t / "d")], 2, ("run.json:line 1", "invalid JSON"), _skeleton("run.json", "{task:")),
    Row("run-json-a-list", lambda t, c: ["predict", str(t / "d"), "a film"], 2, ("run.json", "a JSON list"), _skeleton("run.json", "[1]")),
    Row("run-json-no-task", lambda t, c: ["predict", str(t / "d"), "x"], 2, ("run.json", "no 'task'"), _skeleton("run.json", "{}")),
    Row("run-json-unknown-task", lambda t, c: ["predict", str(t / "d"), "x"], 2, ("run.json", "task 'zzz'"), _skeleton("run.json", '{"task": "zzz"}')),
    Row("run-json-no-labels", lambda t, c: ["eval", str(t / "d")], 2, ("run.json", "'format'"), _skeleton("run.json", '{"task": "classification"}')),
    Row("run-json-for-export", lambda t, c: ["export", str(t / "d"), "--format", "merged", "--out", str(t / "o")], 2, ("run.json", "not UTF-8"), lambda t, c: (_skeleton("run.json", "")(t, c), (t / "d" / "run.json").write_bytes(b"\xff\xfe{"))),
    Row("export-json-truncated", lambda t, c: ["serve", str(t / "d"), "--no-auth"], 2, ("export.json:line 1", "invalid JSON"), _skeleton("export.json", '{"task": "classif')),
    Row("export-json-no-format", lambda t, c: ["serve", str(t / "d"), "--no-auth"], 2, ("export.json", "no 'format'"), _skeleton("export.json", '{"task": "classification"}')),
    Row("export-json-bad-labels", lambda t, c: ["serve", str(t / "d"), "--no-auth"], 2, ("export.json", "labels"), _skeleton("export.json", '{"task": "classification", "format": "merged", "labels": 3}')),
    Row("ensemble-json-truncated", lambda t, c: ["eval", str(t / "d")], 2, ("ensemble.json", "invalid JSON"), _skeleton("ensemble.json", '{"members": [')),
    Row("ensemble-json-member-outside", lambda t, c: ["predict", str(t / "d"), "x"], 2, ("ensemble.json", "outside the ensemble dir"), _skeleton("ensemble.json", '{"task": "classification", "combine": "vote", "members": ["../../a", "b"]}')),
    Row("ensemble-json-nan-weights", lambda t, c: ["eval", str(t / "d")], 2, ("ensemble.json", "finite"), _skeleton("ensemble.json", '{"task": "classification", "combine": "weighted", "members": ["a", "b"], "weights": [NaN, 1]}')),
    Row("trainer-state-not-json", lambda t, c: ["train", "--resume", str(t / "d")], 2, ("trainer_state.json", "not JSON"), _skeleton("trainer_state.json", "{")),
    Row("trainer-state-no-epoch", lambda t, c: ["train", "--resume", str(t / "d")], 2, ("trainer_state.json", "no 'epoch'"), _skeleton("trainer_state.json", '{"global_step": 2}')),
    # --- ensembles, serve --------------------------------------------------------------------------
    Row(
        "ensemble-weights-nan-cli",
        lambda tmp, ctx: ["ensemble", str(ctx["run"]), str(ctx["run"]), "--combine", "weighted", "--weights", "nan,1", "--out", str(tmp / "e")],
        2,
        ("--weights", "finite"),
    ),
    Row(
        "ensemble-different-text-columns",
        lambda tmp, ctx: ["ensemble", str(ctx["run"]), str(ctx["run_review"]), "--out", str(tmp / "e")],
        2,
        ("columns", "'review'", "must read the same data"),
    ),
    Row("serve-port-99999", lambda tmp, ctx: ["serve", str(ctx["run"]), "--no-auth", "--port", "99999"], 2, ("--port", "99999", "1 to 65535")),
    Row(
        "serve-empty-token-file",
        lambda tmp, ctx: ["serve", str(ctx["run"]), "--token-file", str(tmp / "t")],
        2,
        ("--token-file", "an empty token"),
        _file("t", "\n"),
    ),
    Row(
        "serve-short-token",
        lambda tmp, ctx: ["serve", str(ctx["run"]), "--token-file", str(tmp / "t")],
        2,
        ("--token-file", "a token of 1 characters", "at least 16"),
        _file("t", "x\n"),
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def context(trained_run, tmp_path_factory, tiny_bert) -> dict:
    data = tmp_path_factory.mktemp("review")
    review = write_csv(data / "review.csv", sentiment_rows(60), ("review", "label"))
    return {
        "model": tiny_bert,
        "run": trained_run("full"),
        "run_review": trained_run("review", f"data.source={review}", "data.text_column=review"),
    }


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_catalogue(row: Row, context, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYBRIDTUNE_TOKEN", raising=False)
    if row.setup is not None:
        row.setup(tmp_path, context)
    before = snapshot(tmp_path)
    run_before = snapshot(context["run"])
    result = CliRunner().invoke(app, row.args(tmp_path, context))
    if row.code == 2:
        assert_refused(result, tmp_path, *row.words, before=before)
    else:
        failed_in_one_line(result, row.code, *row.words)
    assert snapshot(context["run"]) == run_before


def test_the_catalogue_covers_every_kind():
    kinds = {row.id.split("-")[0] for row in ROWS}
    assert len(ROWS) >= 50 and {"yaml", "epochs", "seed", "output", "suite", "compare", "export"} <= kinds


def test_out_of_memory_while_loading_is_not_bad_input(context, monkeypatch, tmp_path):
    """load_tokenizer / load_model turn only missing or malformed files into exit 2: a MemoryError
    (or any other surprise) is exit 3, one line, the run dir untouched."""
    import transformers

    def no_memory(*args, **kwargs):
        raise MemoryError("cannot allocate 9 GB")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_memory)
    before = snapshot(context["run"])
    result = CliRunner().invoke(app, ["predict", str(context["run"]), "a film"])
    failed_in_one_line(result, 3, "MemoryError")
    assert snapshot(context["run"]) == before
