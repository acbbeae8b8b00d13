"""One generation path: serve feeds a causal_lm run the token ids training built for a prompt's context,
and `hybridtune generate`, the test report's generations (eval) and serve's /v1/generate answer a
prompt with the same text; with a chat template (tiny_chat_gpt2) and without one (tiny_gpt2, the
plain format)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from hybridtune import api, generation, inference
from hybridtune.cli import app as cli
from hybridtune.errors import UserError
from hybridtune.recipe import load_recipe
from hybridtune.serve import create_app
from hybridtune.tasks import causal_lm

from .test_causal_lm import pairs_jsonl, tiny_chat_gpt2  # noqa: F401  (fixtures)

MAX_NEW = 5


@pytest.fixture(scope="module", autouse=True)
def _say_it_again_elsewhere():
    """causal_lm warns once per process about a tokenizer without a chat template; the modules after
    this one (test_causal_lm) expect to hear it."""
    told = set(causal_lm._told)
    yield
    causal_lm._told.intersection_update(told)


def _recipe(model: str, data: str, out: Path, name: str):
    # a few small steps: the model stays close to random, so its answers depend on every prompt token
    return load_recipe(
        None,
        [
            "task=causal_lm",
            f"model={model}",
            f"data.source={data}",
            "data.max_length=32",
            "train.max_steps=3",
            "train.batch_size=8",
            "train.lr=0.001",
            "train.precision=fp32",
            f"generation.max_new_tokens={MAX_NEW}",
            f"output.dir={out}",
            f"output.name={name}",
        ],
    )


@pytest.fixture(scope="module", params=["chat_template", "plain"])
def trained(request, tmp_path_factory, pairs_jsonl, tiny_gpt2):  # noqa: F811
    """(recipe, run dir) of a tiny SFT run, with and without a chat template."""
    model = request.getfixturevalue("tiny_chat_gpt2") if request.param == "chat_template" else tiny_gpt2
    recipe = _recipe(model, pairs_jsonl, tmp_path_factory.mktemp("runs"), request.param)
    run = Path(api.train(recipe)["run_dir"])
    assert json.loads((run / "run.json").read_text())["prompt_format"] == request.param
    return recipe, run


def _recording(loaded: inference.Loaded) -> list[list[int]]:
    """The unpadded input ids of every sequence the model is asked to continue."""
    seen: list[list[int]] = []
    original = loaded.model.generate

    def generate(input_ids, attention_mask, **kwargs):
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            seen.append([t for t, m in zip(ids, mask, strict=True) if m])
        return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    loaded.model.generate = generate
    return seen


def _training_contexts(recipe, n: int = 4) -> list[tuple[str, list[int]]]:
    """(question, the ids training built for its context: the labels -100 part) of test examples."""
    prep = api.prepare(recipe)
    rows = []
    for row in prep.datasets["test"].select(range(n)):
        context = row["input_ids"][: row["prompt_length"]]
        assert row["labels"][: row["prompt_length"]] == [-100] * row["prompt_length"]
        assert row["labels"][row["prompt_length"]] != -100  # the response starts right after
        rows.append((row["query"], context))
    return rows


def test_serve_feeds_the_model_the_ids_training_built(trained):
    recipe, run = trained
    contexts = _training_contexts(recipe)
    loaded = inference.load(run)
    assert loaded.prompt_format == json.loads((run / "run.json").read_text())["prompt_format"]
    seen = _recording(loaded)
    body = {"max_new_tokens": 2}
    with TestClient(create_app(loaded=loaded)) as client:
        for question, context in contexts:
            seen.clear()
            assert client.post("/v1/generate", json={"prompt": question, **body}).status_code == 200
            assert seen == [context], question
            seen.clear()  # a chat of one user turn is the same context
            chat = {"messages": [{"role": "user", "content": question}], "max_tokens": 2}
            assert client.post("/v1/chat/completions", json=chat).status_code == 200
            assert seen == [context]
            seen.clear()  # streamed: the same
            with client.stream(
                "POST", "/v1/generate", json={"prompt": question, "stream": True, **body}
            ) as r:
                assert r.status_code == 200 and list(r.iter_lines())
            assert seen == [context]
        # a completion continues its text as it stands, with training's special-token rule: no
        # [CLS] / [SEP] (the tiny tokenizer's own specials; [SEP] is this run's EOS)
        seen.clear()
        assert (
            client.post("/v1/completions", json={"prompt": "the sky is", "max_tokens": 2}).status_code == 200
        )
        plain = loaded.tokenizer("the sky is", add_special_tokens=False)["input_ids"]
        assert seen == [plain] and loaded.tokenizer.eos_token_id not in seen[0]


def test_cli_eval_and_serve_answer_a_prompt_with_the_same_text(trained):
    recipe, run = trained
    samples = json.loads((run / "eval.json").read_text())["samples"]
    assert len(samples) >= 3 and json.loads((run / "eval.json").read_text())["max_new_tokens"] == MAX_NEW
    contexts = dict(_training_contexts(recipe, len(samples)))
    loaded = inference.load(run)
    with TestClient(create_app(loaded=loaded)) as client:
        for sample in samples:
            prompt, evaluated = sample["prompt"], sample["generated"]
            # the example was not cut by max_length: eval generated from the whole context
            assert generation.prompt_input(loaded.tokenizer, loaded.prompt_format, prompt) == {
                "input_ids": contexts[prompt]
            }
            result = CliRunner().invoke(cli, ["generate", str(run), prompt, "--max-new-tokens", str(MAX_NEW)])
            assert result.exit_code == 0, result.output
            assert result.output == evaluated + "\n"
            served = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": MAX_NEW}).json()
            assert served["text"] == evaluated, (prompt, served, evaluated)
            with client.stream(
                "POST", "/v1/generate", json={"prompt": prompt, "max_new_tokens": MAX_NEW, "stream": True}
            ) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert "".join(json.loads(e).get("text", "") for e in events[:-1]) == evaluated
        # the text depends on the format: the prompt as raw text (serve's old way) answers otherwise
        raw = generation.generate(
            loaded.model,
            loaded.tokenizer,
            [generation.prompt_input(loaded.tokenizer, None, s["prompt"]) for s in samples],
            generation.Sampling(MAX_NEW),
        )
        assert [c.text for c in raw] != [s["generated"] for s in samples]


def test_an_export_keeps_the_prompt_format(trained, tmp_path):
    from hybridtune.export import export

    recipe, run = trained
    export(str(run), "merged", str(tmp_path / "merged"))
    loaded = inference.load(tmp_path / "merged")
    assert loaded.prompt_format == json.loads((run / "run.json").read_text())["prompt_format"]
    question, context = _training_contexts(recipe, 1)[0]
    seen = _recording(loaded)
    with TestClient(create_app(loaded=loaded)) as client:
        assert client.post("/v1/generate", json={"prompt": question, "max_new_tokens": 2}).status_code == 200
    assert seen == [context]


def test_a_prompt_format_that_is_not_one_is_refused_naming_run_json(trained, tmp_path):
    import shutil

    _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps(info | {"prompt_format": "jinja"}))
    for load in (inference.load, api.load_run):
        with pytest.raises(
            UserError, match=r"run.json: found prompt_format 'jinja'; expected chat_template or plain"
        ):
            load(str(copy))
