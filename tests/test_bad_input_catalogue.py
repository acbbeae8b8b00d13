"""The catalogue: one bad input each (recipe, depth selectors, data, NER data, model, output dir), all
through the CLI. Each must exit with code 2 and one line naming the key path or file:row, what was found
and what was expected; no traceback; no run dir; an earlier run in the same output dir left byte for
byte as it was. Then a full disk while saving, and what must be read, not refused.
(tests/test_bad_input.py: single cases.)"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from .conftest import cli as _cli
from .conftest import sentiment_rows, write_csv
from .refusal import refused, snapshot

ROWS = sentiment_rows(20)
CSV = "text,label\n" + "".join(f"{t},{label}\n" for t, label in ROWS)
JSONL = "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in ROWS)
CONLL = "a\tO\nb\tB-per\n\nc\tO\n" * 10  # 10 good sentences pairs, 40 lines
NER_JSONL = "".join(json.dumps({"tokens": ["a", "b"], "tags": ["O", "B-per"]}) + "\n" for _ in range(10))


def _file(tmp_path: Path, name: str, content: str | bytes, encoding: str = "utf-8") -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding=encoding, newline="")
    return str(path)


def _src(tmp_path: Path, name: str, content: str | bytes, encoding: str = "utf-8") -> str:
    return "data.source=" + _file(tmp_path, name, content, encoding)


def _recipe_file(tmp_path: Path, content: str | bytes, encoding: str = "utf-8") -> list[str]:
    return [_file(tmp_path, "r.yaml", content, encoding), _src(tmp_path, "ok.csv", CSV)]


def _model_copy(tmp_path: Path, tiny_bert: str, change) -> str:
    out = tmp_path / "model"
    shutil.copytree(tiny_bert, out)
    change(out)
    return f"model.name={out}"


def _half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# id -> (args after `train`, built from tmp_path and the tiny model; words the message must hold)
CATALOGUE = {
    # recipe
    "recipe: missing file": (lambda t, m: [str(t / "none.yaml")], ["none.yaml", "no such file"]),
    "recipe: truncated YAML": (
        lambda t, m: _recipe_file(t, "train: {epochs: 1\n"),
        ["r.yaml:2", "invalid YAML"],
    ),
    "recipe: latin-1 bytes": (
        lambda t, m: _recipe_file(t, "name: café\n", "latin-1"),
        ["r.yaml", "not UTF-8"],
    ),
    "recipe: UTF-16 with BOM": (lambda t, m: _recipe_file(t, "name: x\n", "utf-16"), ["r.yaml", "not UTF-8"]),
    "recipe: a list": (lambda t, m: _recipe_file(t, "- train\n- epochs\n"), ["r.yaml", "a YAML list"]),
    "recipe: typo in a nested key": (
        lambda t, m: _recipe_file(t, "schedule: {nmae: cosine}\n"),
        ["schedule.nmae", "unknown key", "did you mean 'name'"],
    ),
    "recipe: a section given a number": (lambda t, m: ["schedule=5"], ["schedule", "5 (int)"]),
    "recipe: wrong type": (lambda t, m: ["train.epochs=[1, 2]"], ["train.epochs", "[1, 2]"]),
    "recipe: lr out of range": (lambda t, m: ["train.lr=2"], ["train.lr", "2 (int)", "less than 1"]),
    "recipe: split out of range": (lambda t, m: ["data.split.test=0.7"], ["data.split.test", "0.7"]),
    "recipe: value typo": (lambda t, m: ["train.precision=bf61"], ["train.precision", "did you mean 'bf16'"]),
    "recipe: on_nan typo": (lambda t, m: ["train.on_nan=ignore"], ["train.on_nan", "'ignore'", "'skip'"]),
    "recipe: freeze and stages": (
        lambda t, m: ["freeze.trainable=[head]", "stages=[{train: [all]}]"],
        ["stages", "`freeze` and `stages` together"],
    ),
    "recipe: source and train files": (
        lambda t, m: ["data.train=" + _file(t, "ok.csv", CSV), "data.source=other.csv"],
        ["data.train", "either `source`"],
    ),
    "recipe: a metric of another task": (
        lambda t, m: ["train.early_stopping.metric=precision"],
        ["train.early_stopping.metric", "'precision'", "accuracy"],
    ),
    "recipe: override without =": (
        lambda t, m: ["train.epochs"],
        ["override 'train.epochs'", "key.path=value"],
    ),
    "recipe: a name with a path": (lambda t, m: ["name=../evil"], ["name", "'../evil'"]),
    # depth selectors (the tiny model has 2 blocks)
    "depth: an unknown selector": (
        lambda t, m: ["freeze.trainable=[head, {top_fraction: 0.5}]"],
        [
            "freeze.trainable[1].top_fraction",
            "found 0.5",
            "top_frac, bottom_frac, level",
            "did you mean 'top_frac'",
        ],
    ),
    "depth: a fraction above 1": (
        lambda t, m: ["freeze.trainable=[{top_frac: 1.5}]"],
        ["freeze.trainable[0].top_frac", "found 1.5", "(0, 1]"],
    ),
    "depth: a fraction of 0 in a stage": (
        lambda t, m: ["stages=[{steps: 1, train: [head]}, {train: [{bottom_frac: 0}]}]"],
        ["stages.plan[1].train[0].bottom_frac", "found 0", "(0, 1]"],
    ),
    "depth: a level not below levels": (
        lambda t, m: ["freeze.frozen=[{level: 2, levels: 2}]"],
        ["freeze.frozen[0].level", "found 2", "0..1"],
    ),
    "depth: levels < 1": (
        lambda t, m: ["freeze.trainable=[{level: 0, levels: 0}]"],
        ["freeze.trainable[0].levels", "found 0", ">= 1"],
    ),
    "depth: more levels than blocks": (
        lambda t, m: ["freeze.trainable=[{level: 0, levels: 3}]"],
        ["freeze.trainable[0].levels", "found 3", "at most 2 levels", "has 2 blocks"],
    ),
    "depth: a level without levels": (
        lambda t, m: ["freeze.trainable=[{level: 0}]"],
        ["freeze.trainable[0]", "{'level': 0}", "{level: K, levels: L}"],
    ),
    "depth: lr levels beyond the model": (
        lambda t, m: ["lr.levels=3"],
        ["lr.levels", "found 3", "at most 2 levels", "has 2 blocks"],
    ),
    "depth: an lr group's fraction out of range": (
        lambda t, m: ["lr.groups=[{top_frac: 1.2, lr: 0.001}]"],
        ["lr.groups[0].top_frac", "1.2", "less than or equal to 1"],
    ),
    "depth: an lr group's level not below levels": (
        lambda t, m: ["lr.groups=[{level: 2, levels: 2, lr: 0.001}]"],
        ["lr.groups[0].level", "found 2", "0..1"],
    ),
    "depth: decay_per typo": (
        lambda t, m: ["lr.layer_decay=0.5", "lr.levels=2", "lr.decay_per=levels"],
        ["lr.decay_per", "'levels'", "did you mean 'level'"],
    ),
    # data
    "data: truncated CSV (open quote)": (
        lambda t, m: [_src(t, "d.csv", CSV + '"a review cut sho')],
        ["d.csv:row 22", "malformed CSV"],
    ),
    "data: latin-1 CSV": (
        lambda t, m: [_src(t, "d.csv", CSV + "café crème,positive\n", "latin-1")],
        ["d.csv", "not UTF-8"],
    ),
    "data: UTF-16 CSV with BOM": (
        lambda t, m: [_src(t, "d.csv", CSV, "utf-16")],
        ["d.csv", "not UTF-8 at byte 0"],
    ),
    "data: CRLF CSV with a short row": (
        lambda t, m: [_src(t, "d.csv", (CSV + "lonely\n").replace(chr(10), chr(13) + chr(10)))],
        ["d.csv:row 22", "1 fields", "2 fields"],
    ),
    "data: truncated JSON Lines": (
        lambda t, m: [_src(t, "d.jsonl", JSONL + '{"text": "cut')],
        ["d.jsonl:line 21", "invalid JSON"],
    ),
    "data: renamed label column": (
        lambda t, m: [_src(t, "d.csv", CSV.replace("label", "labels", 1))],
        ["no column 'label'", "did you mean 'labels'"],
    ),
    "data: a missing label": (
        lambda t, m: [_src(t, "d.csv", CSV + "a fine film,\n")],
        ["d.csv:row 22", "no label"],
    ),
    "data: a fractional label": (
        lambda t, m: [_src(t, "d.jsonl", JSONL + json.dumps({"text": "ok", "label": 1.5}))],
        ["d.jsonl:line 21", "label 1.5"],
    ),
    "data: a number as text": (
        lambda t, m: [_src(t, "d.jsonl", JSONL + json.dumps({"text": 5, "label": "positive"}))],
        ["d.jsonl:line 21", "5 (int)", "a text"],
    ),
    "data: a JSON array with a non-object": (
        lambda t, m: [_src(t, "d.json", json.dumps([{"text": "a", "label": 1}, 3]))],
        ["d.json:item 2", "a JSON object"],
    ),
    "data: corrupt parquet": (
        lambda t, m: [_src(t, "d.parquet", b"PAR1 not really")],
        ["d.parquet", "unreadable parquet"],
    ),
    "data: an unknown file type": (
        lambda t, m: [_src(t, "d.xlsx", b"PK")],
        ["data.source", "'d.xlsx'", ".csv"],
    ),
    "ner: I- without B-": (
        lambda t, m: ["task=token_classification", _src(t, "n.conll", CONLL + "x\tO\ny\tI-per\n")],
        ["n.conll:line 42", "'I-per' after 'O'", "B-per before the first I-per"],
    ),
    "ner: an invalid tag": (
        lambda t, m: ["task=token_classification", _src(t, "n.conll", CONLL + "x\tX-per\n")],
        ["n.conll:line 41", "tag 'X-per'", "BIO"],
    ),
    "ner: a token without its tag": (
        lambda t, m: ["task=token_classification", _src(t, "n.conll", CONLL + "lonely\n")],
        ["n.conll:line 41", "'lonely'", "token<TAB>tag"],
    ),
    "ner: token and tag counts differ": (
        lambda t, m: [
            "task=token_classification",
            _src(t, "n.jsonl", NER_JSONL + json.dumps({"tokens": ["a", "b", "c"], "tags": ["O", "O"]})),
        ],
        ["n.jsonl:line 11", "3 tokens and 2 tags", "one tag per token"],
    ),
    "ner: tags as one string": (
        lambda t, m: [
            "task=token_classification",
            _src(t, "n.jsonl", NER_JSONL + json.dumps({"tokens": ["a", "b"], "tags": "O O"})),
        ],
        ["n.jsonl:line 11", "'O O' (str)", "a list of tags"],
    ),
    # model
    "model: corrupt safetensors": (
        lambda t, m: [_model_copy(t, m, lambda d: _half(d / "model.safetensors"))],
        ["model.name", "could not be loaded", "SafetensorError"],
    ),
    "model: config.json that is not JSON": (
        lambda t, m: [_model_copy(t, m, lambda d: (d / "config.json").write_text("{not json"))],
        ["model.name", "not a valid JSON"],
    ),
    "model: config.json and no weights": (
        lambda t, m: [
            _model_copy(t, m, lambda d: [f.unlink() for f in d.iterdir() if f.name.startswith("model.")])
        ],
        ["model.name", "could not be loaded", "model.safetensors"],
    ),
    # output
    "output: a dir that cannot be written": (
        lambda t, m: ["output.dir=" + _file(t, "a-file", "x") + "/runs"],
        ["output.dir", "cannot be written", "Not a directory"],
    ),
    "output: the name of an earlier run": (
        lambda t, m: ["output.name=earlier"],
        ["output.name", "already exists"],
    ),
}


@pytest.fixture
def earlier(tmp_path) -> Path:
    """An earlier finished run in the output dir, which no failure may touch."""
    run = tmp_path / "runs" / "earlier"
    (run / "final").mkdir(parents=True)
    (run / "report.json").write_text('{"accuracy": 0.9}\n')
    (run / "final" / "model.safetensors").write_bytes(b"earlier weights")
    return tmp_path / "runs"


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_catalogue(case, tmp_path, tiny_bert, earlier):
    build, words = CATALOGUE[case]
    args = build(tmp_path, tiny_bert)
    recipe = [a for a in args if a.endswith(".yaml")]
    rest = [a for a in args if not a.endswith(".yaml")]
    args = ["train", *recipe, f"model={tiny_bert}", "train.max_steps=2", f"output.dir={earlier}", *rest]
    refused(args, earlier, *words)  # no run dir beside the earlier one, which is untouched


def test_the_catalogue_has_at_least_25_cases():
    assert len(CATALOGUE) >= 25


@pytest.mark.parametrize("where", ["checkpoint", "final"])
def test_disk_full_while_saving_leaves_nothing_half_written(
    where, monkeypatch, tmp_path, tiny_bert, sentiment_csv, earlier
):
    """A full disk (simulated: the weights file is cut short, then ENOSPC) while writing a checkpoint
    or final/: exit code 2, one line, no partial dir kept, the earlier run untouched; after final/
    failed, the run resumes from its complete checkpoint and finishes."""
    import transformers.modeling_utils as modeling

    real = modeling.safe_save_file

    def full(tensors, filename, metadata=None):
        if (where == "final") == Path(filename).parent.name.startswith(".final."):  # .final.PID-RANDOM.tmp
            Path(filename).write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(modeling, "safe_save_file", full)
    before = snapshot(earlier / "earlier")
    args = [f"model={tiny_bert}", f"data.source={sentiment_csv}", "train.max_steps=2", "train.precision=fp32"]
    result = _cli(["train", *args, f"output.dir={earlier}", "output.name=r"])
    assert result.exit_code == 2, (result.exit_code, result.stderr[-2000:], result.exception)
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]  # above it: the progress bar
    assert "output.dir" in message and "No space left on device" in message, message
    assert "found" in message and "expected" in message
    run = earlier / "r"
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")], "a temp file or dir was kept"
    assert not (run / "final").exists() and not (run / "report.json").exists()
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ([] if where == "checkpoint" else ["checkpoint-2"])
    assert snapshot(earlier / "earlier") == before
    if where == "final":
        monkeypatch.setattr(modeling, "safe_save_file", real)
        resumed = _cli(["train", "--resume", str(run)])
        assert resumed.exit_code == 0, resumed.stderr[-2000:]
        assert (run / "report.json").is_file() and (run / "final" / "model.safetensors").is_file()


# what must be read, not refused


def test_a_bom_and_windows_line_ends_are_read_as_plain_csv(tmp_path):
    from hybridtune.data.sources import read_table

    path = tmp_path / "d.csv"
    path.write_bytes(("\ufeff" + CSV).replace("\n", "\r\n").encode("utf-8"))
    frame = read_table(str(path), "data.source")
    assert list(frame.columns) == ["text", "label", "_where"]
    assert list(zip(frame["text"], frame["label"], strict=True)) == ROWS
    assert frame["_where"].iloc[0] == f"{path}:row 2"


def test_a_one_megabyte_text_is_truncated_not_refused(tmp_path, tiny_bert):
    from hybridtune.model.loading import load_tokenizer
    from hybridtune.recipe import load_recipe
    from hybridtune.tasks import classification

    huge = ("a very long review " * 60000)[: 2**20]
    path = write_csv(tmp_path / "d.csv", [(huge, "positive"), *ROWS])
    cfg = load_recipe(None, [f"data.source={path}", "data.max_length=32"]).data
    splits = classification.load_splits(cfg)
    labels = classification.label_space(splits, cfg)
    tokenizer = load_tokenizer(tiny_bert)
    lengths = [
        len(ids)
        for name in ("train", "validation", "test")
        for ids in classification.encode(splits[name], tokenizer, labels, cfg)["input_ids"]
    ]
    assert sum(len(splits[n]) for n in ("train", "validation", "test")) == len(ROWS) + 1
    assert max(lengths) == 32
