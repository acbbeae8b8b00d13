"""export: merged / peft / int8 exports of tiny runs load with plain transformers / peft / torch and
predict what the run predicts; what cannot be exported is refused by name, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
from typer.testing import CliRunner

from hybridtune import api, inference
from hybridtune.cli import app
from hybridtune.errors import UserError
from hybridtune.export import export
from hybridtune.recipe import load_recipe

from .conftest import TEXTS

FEW = ["train.max_steps=2"]  # runs that only need to exist


def _probs(model, tokenizer, texts=TEXTS) -> torch.Tensor:
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return torch.softmax(model.eval()(**batch).logits, -1)


def _run_probs(run: Path, texts=TEXTS) -> torch.Tensor:
    return torch.tensor([list(r["probs"].values()) for r in api.predict(str(run), texts)])


def test_merged_lora_loads_with_plain_transformers_and_predicts_as_the_unmerged_run(trained_run, tmp_path):
    run = trained_run("lora", "peft.method=lora")
    meta = export(str(run), "merged", str(tmp_path / "merged"))
    out = tmp_path / "merged"
    assert meta["format"] == "merged" and json.loads((out / "export.json").read_text()) == meta
    assert not list(tmp_path.glob(".*tmp")) and not (out / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert not any("lora" in name for name in model.state_dict())  # W + BA: no adapter left
    unmerged = _run_probs(run)
    assert not torch.allclose(unmerged[:, 0], unmerged[:, 1])  # something trained
    torch.testing.assert_close(_probs(model, tokenizer), unmerged, atol=1e-5, rtol=1e-4)
    # the transformers pipeline reads the labels from the config
    clf = pipeline("text-classification", model=str(out), device="cpu")
    assert [r["label"] for r in clf(TEXTS)] == [r["label"] for r in api.predict(str(run), TEXTS)]
    # serve / hybridtune load the export dir the same way
    loaded = inference.load(out)
    rows = loaded.task.predict(loaded.model, loaded.tokenizer, loaded.labels, loaded.data_cfg, TEXTS)
    torch.testing.assert_close(torch.tensor([list(r["probs"].values()) for r in rows]), unmerged)


def test_peft_export_loads_with_plain_peft(trained_run, tmp_path, tiny_bert):
    from peft import AutoPeftModelForSequenceClassification, PeftModel

    run = trained_run("lora", "peft.method=lora")
    out = tmp_path / "adapter"
    export(str(run), "peft", str(out))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == json.loads((run / "run.json").read_text())["base_model"]
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    expected = _run_probs(run)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    torch.testing.assert_close(
        _probs(PeftModel.from_pretrained(base, out), tokenizer), expected, atol=1e-5, rtol=1e-4
    )
    auto = AutoPeftModelForSequenceClassification.from_pretrained(out)
    torch.testing.assert_close(_probs(auto, tokenizer), expected, atol=1e-5, rtol=1e-4)
    loaded = inference.load(out)  # what serve loads
    assert hasattr(loaded.model, "peft_config")
    rows = loaded.task.predict(loaded.model, loaded.tokenizer, loaded.labels, loaded.data_cfg, TEXTS)
    torch.testing.assert_close(torch.tensor([list(r["probs"].values()) for r in rows]), expected)


def test_int8_export_measures_the_delta_and_reloads_to_the_same_model(trained_run, tmp_path):
    run = trained_run("lora", "peft.method=lora")
    out = tmp_path / "int8"
    meta = export(str(run), "int8", str(out))
    measured = meta["int8"]
    eval_json = json.loads((run / "eval.json").read_text())
    assert measured["metric"] == "accuracy" and measured["n"] == eval_json["n"]
    # fp32 on the test split = the run's own test evaluation
    assert measured["fp32"]["accuracy"] == pytest.approx(eval_json["accuracy"])
    assert measured["delta"] == pytest.approx(measured["int8"]["accuracy"] - measured["fp32"]["accuracy"])
    assert measured["speedup"] > 0
    assert measured["quantized_linear_layers"] == 2 * 6 + 2  # 6 per block, the pooler, the head
    assert measured["size_mb"]["int8"] < measured["size_mb"]["fp32"]
    assert not (out / "model.safetensors").exists()
    # reload as export.json says, with torch + transformers only
    from transformers import AutoConfig

    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(out))
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    model.load_state_dict(torch.load(out / "model_int8.pt", weights_only=True))
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert isinstance(model.classifier, torch.ao.nn.quantized.dynamic.Linear)
    int8_probs = _probs(model, tokenizer)
    torch.testing.assert_close(_probs(inference.load_int8(out), tokenizer), int8_probs, atol=0, rtol=0)
    # the reloaded model is the one that was measured: same test-split accuracy
    run_loaded = api.load_run(str(run))
    data_cfg, task, labels = run_loaded.recipe.data, run_loaded.task, run_loaded.labels
    test = task.encode(task.eval_frame(None, data_cfg, labels), tokenizer, labels, data_cfg)
    assert task.report(model, tokenizer, test, labels)["accuracy"] == measured["int8"]["accuracy"]
    loaded = inference.load(out)  # what serve loads: the int8 model, on the CPU
    assert inference.is_int8(loaded.model) and loaded.labels.names == ["negative", "positive"]
    rows = loaded.task.predict(loaded.model, loaded.tokenizer, loaded.labels, loaded.data_cfg, TEXTS)
    torch.testing.assert_close(torch.tensor([list(r["probs"].values()) for r in rows]), int8_probs)
    # quantization moves the probabilities a little, not the predictions of this easy task
    torch.testing.assert_close(int8_probs, _run_probs(run), atol=0.05, rtol=0)


def test_a_full_finetuning_run_merges_as_it_is_and_has_no_adapter(trained_run, tmp_path):
    run = trained_run("full")
    export(str(run), "merged", str(tmp_path / "m"))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(
        _probs(model, AutoTokenizer.from_pretrained(tmp_path / "m")), _run_probs(run), atol=1e-6, rtol=1e-5
    )
    with pytest.raises(UserError, match="without peft"):
        export(str(run), "peft", str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "name, extra, fmt, says",
    [
        ("houlsby", ["adapters.method=houlsby", *FEW], "merged", "bottleneck adapters"),
        ("houlsby", ["adapters.method=houlsby", *FEW], "peft", "bottleneck adapters"),
        ("prompt", ["soft_prompt.num_virtual_tokens=4", *FEW], "int8", "a soft prompt"),
        (
            "prefix",
            ["peft.method=prefix_tuning", "peft.num_virtual_tokens=4", *FEW],
            "merged",
            "prefix_tuning",
        ),
    ],
)
def test_what_cannot_be_merged_is_refused_by_name(trained_run, tmp_path, name, extra, fmt, says):
    run = trained_run(name, *extra)
    with pytest.raises(UserError, match=says):
        export(str(run), fmt, str(tmp_path / "out"))
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_cli_export_prints_the_int8_figures_and_bad_input_is_one_line(trained_run, tmp_path):
    run = trained_run("lora", "peft.method=lora")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run), "--format", "int8", "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert "int8" in result.output and "speed-up" in result.output and "accuracy" in result.output
    for args, says in [
        (["export", str(tmp_path), "--format", "merged", "--out", str(tmp_path / "x")], "no finished run"),
        (["export", str(run), "--format", "onnx", "--out", str(tmp_path / "x")], "--format"),
        (["export", str(run), "--format", "merged", "--out", str(run)], "not an export"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert says in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_token_classification_exports_merged_and_int8(tmp_path_factory, tmp_path, tiny_bert):
    from transformers import AutoModelForTokenClassification

    from tests.test_token_classification import tagged_sentences, write_conll

    data = write_conll(tmp_path_factory.mktemp("ner") / "train.conll", tagged_sentences(200))
    overrides = [
        "task=token_classification",
        f"model.name={tiny_bert}",
        f"data.source={data}",
        "peft.method=lora",
        "train.max_steps=12",
        "train.batch_size=16",
        "train.lr=0.005",
        "train.precision=fp32",
        f"output.dir={tmp_path / 'runs'}",
        "output.name=ner",
    ]
    run = Path(api.train(load_recipe(None, overrides))["run_dir"])
    texts = ["today alice went to new york", "bob was nice in paris"]
    export(str(run), "merged", str(tmp_path / "merged"))
    model = AutoModelForTokenClassification.from_pretrained(tmp_path / "merged")
    assert set(model.config.id2label.values()) == {"O", "B-person", "I-person", "B-loc", "I-loc"}
    loaded = inference.load(tmp_path / "merged")
    rows = loaded.task.predict(loaded.model, loaded.tokenizer, loaded.labels, loaded.data_cfg, texts)
    assert [r["tags"] for r in rows] == [r["tags"] for r in api.predict(str(run), texts)]
    measured = export(str(run), "int8", str(tmp_path / "int8"))["int8"]
    assert measured["metric"] == "f1"
    assert measured["fp32"]["f1"] == pytest.approx(json.loads((run / "eval.json").read_text())["f1"])
