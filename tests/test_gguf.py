"""A GGUF file as `model:` (model/gguf.py): de-quantized once into a plain, content-keyed cache entry
with its tokenizer and chat template, trained and used like any model dir; a file transformers cannot
read is refused before anything is written (exit 2, one line)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from hybridtune.model import gguf

from .conftest import sentiment_rows, write_csv
from .refusal import refused
from .tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HYBRIDTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Counts the real conversions (each one loads the GGUF with transformers)."""
    calls: list[Path] = []
    real = gguf._convert

    def counted(file: Path, out: Path, where: str) -> None:
        calls.append(file)
        real(file, out, where)

    monkeypatch.setattr(gguf, "_convert", counted)
    return calls


def _train(model: str, data: str, out: Path, name: str) -> dict:
    from hybridtune import api
    from hybridtune.recipe import load_recipe

    overrides = [
        f"data.source={data}",
        "train.max_steps=2",
        "train.batch_size=8",
        "train.precision=fp32",
        "data.max_length=32",
        f"output.dir={out}",
        f"output.name={name}",
    ]
    return api.train(load_recipe(None, [f"model={model}", *overrides]))


def test_a_gguf_file_trains_predicts_and_is_converted_once(tmp_path, cache, conversions):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hybridtune import api

    file = write_tiny_gguf(tmp_path / "models" / "tiny.gguf")
    data = str(write_csv(tmp_path / "d.csv", sentiment_rows(48)))
    first = _train(str(file), data, tmp_path / "runs", "a")
    assert first["steps"] == 2
    rows = api.predict(first["run_dir"], ["a wonderful film", "a dull film"])
    assert [set(r["probs"]) for r in rows] == [{"negative", "positive"}] * 2
    # ... and serves, with no code of the user's: the run dir behind `hybridtune serve`
    import httpx

    from hybridtune.serve import create_app

    from .test_serve import serving

    token = "t" * 16
    with serving(create_app(first["run_dir"], token=token)) as url:
        answer = httpx.post(
            f"{url}/v1/classify",
            json={"texts": ["a wonderful film"]},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert answer.status_code == 200
    (served,) = answer.json()["predictions"]
    assert served["label"] == rows[0]["label"]
    entries = [p for p in cache.iterdir() if p.is_dir()]
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    assert [p.name for p in entries] == [f"tiny-{sha[:16]}"]
    assert json.loads((tmp_path / "runs" / "a" / "run.json").read_text())["base_model"] == str(entries[0])

    # the other spelling, a second run: the cached entry is used as it is
    second = _train(f"{{name: {file.parent}, gguf_file: tiny.gguf}}", data, tmp_path / "runs", "b")
    assert second["steps"] == 2
    assert conversions == [file], "the second run must not convert again"

    # the entry is a plain transformers dir: no GGUF quantizer left, the tokenizer with its chat template
    model = AutoModelForCausalLM.from_pretrained(entries[0])
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 261
    tokenizer = AutoTokenizer.from_pretrained(entries[0])
    assert tokenizer.chat_template == CHAT_TEMPLATE
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n"
    assert tokenizer("hello")["input_ids"][:2] == [259, 260]  # the file's merges: "he", "ll"


def test_the_hash_is_remembered_by_path_size_and_mtime(tmp_path, cache, monkeypatch):
    file = write_tiny_gguf(tmp_path / "tiny.gguf")
    hashed = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda f, name: hashed.append(1) or real(f, name))
    digest = gguf.content_hash(file)
    assert digest == hashlib.sha256(file.read_bytes()).hexdigest()
    assert gguf.content_hash(file) == digest and len(hashed) == 1
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again
    assert gguf.content_hash(file) == digest and len(hashed) == 2
    copy = tmp_path / "elsewhere.gguf"
    copy.write_bytes(file.read_bytes())
    assert gguf.content_hash(copy) == digest and len(hashed) == 3


def test_a_changed_file_gets_its_own_entry(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(gguf, "_convert", lambda file, out, where: (out / "config.json").write_text("{}"))
    file = write_tiny_gguf(tmp_path / "tiny.gguf", seed=0)
    first = gguf.plain_dir(file)
    assert gguf.plain_dir(file) == first
    write_tiny_gguf(file, seed=1)
    second = gguf.plain_dir(file)
    assert second != first and second.parent == first.parent
    assert json.loads((second / gguf.SOURCE).read_text())["sha256"].startswith(second.name.rsplit("-", 1)[1])


def _truncated(tmp_path: Path) -> Path:
    whole = write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:300])
    return tmp_path / "cut.gguf"


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda t: t / "missing.gguf", ["model.name", "missing.gguf", "no such file"]),
        (
            lambda t: (t / "weights.gguf").write_bytes(b"PK\x03\x04 a zip") and t / "weights.gguf",
            ["model.name", "not a GGUF file", "b'PK\\x03\\x04'"],
        ),
        (_truncated, ["model.name", "cut.gguf", "unreadable GGUF"]),
        (
            lambda t: write_tiny_gguf(t / "rwkv.gguf", arch="rwkv6"),
            ["model.name", "architecture 'rwkv6'", "cannot read", "llama"],
        ),
    ],
    ids=["missing", "not gguf", "truncated", "unsupported architecture"],
)
def test_a_file_transformers_cannot_read_is_refused(make, words, tmp_path, cache, sentiment_csv):
    file = make(tmp_path)
    out = tmp_path / "runs"
    args = ["train", f"model.name={file}", f"data.source={sentiment_csv}", "train.max_steps=2"]
    refused([*args, f"output.dir={out}"], out, *words)
    assert not cache.exists() or not [p for p in cache.iterdir() if p.is_dir()], "no cache entry"


def test_gguf_file_key_must_name_a_gguf_file(tmp_path, sentiment_csv):
    out = tmp_path / "runs"
    args = ["train", f"model={{name: {tmp_path}, gguf_file: model.bin}}", f"data.source={sentiment_csv}"]
    refused(
        [*args, "train.max_steps=2", f"output.dir={out}"],
        out,
        "model.gguf_file",
        "'model.bin'",
        ".gguf",
    )
