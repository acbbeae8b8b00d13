"""serve: the real server (uvicorn on 127.0.0.1, a free port) with a real HTTP client (httpx) and the
official `openai` client; tiny models: a classifier trained for a few steps, a random GPT-2 LM with a
chat template, and a causal_lm run dir holding a peft adapter."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from hybridtune import api, inference
from hybridtune.cli import app as cli
from hybridtune.generation import chat_prompt
from hybridtune.serve import Limits, create_app

TOKEN = "s3cret-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app):
    """uvicorn serving `app` in a thread; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=_free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _forward_calls(url: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=AUTH).text
    return next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("hybridtune_forward_calls_total")
    )


async def _concurrently(url: str, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as client:
        return await asyncio.gather(*(client.post(path, json=body) for body in bodies))


# --------------------------------------------------------------------------------------------------
# classification


@pytest.fixture(scope="module")
def classifier_run(trained_run) -> Path:
    """Full fine-tuning of the tiny BERT, 12 steps (test_export reads the same run)."""
    return trained_run("full")


@pytest.fixture(scope="module")
def classifier_url(classifier_run):
    limits = Limits(max_body_bytes=4096, max_batch=8, max_wait_ms=50)
    with serving(create_app(classifier_run, token=TOKEN, limits=limits)) as url:
        yield url


def test_concurrent_classify_requests_share_forward_calls_and_answer_as_predict(
    classifier_run, classifier_url
):
    texts = [f"the {w} film number {i}" for i, w in enumerate(["great", "dull", "charming", "awful"] * 4)]
    expected = api.predict(str(classifier_run), texts)
    before = _forward_calls(classifier_url)
    responses = asyncio.run(_concurrently(classifier_url, "/v1/classify", [{"texts": [t]} for t in texts]))
    assert [r.status_code for r in responses] == [200] * len(texts)
    for response, want in zip(responses, expected, strict=True):
        (got,) = response.json()["predictions"]
        assert got["text"] == want["text"] and got["label"] == want["label"]
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-5)
    calls = _forward_calls(classifier_url) - before
    assert 1 <= calls < len(texts), calls  # dynamic batching: fewer forwards than requests
    # one request with several texts is one batch of its own
    response = httpx.post(f"{classifier_url}/v1/classify", json={"texts": texts[:3]}, headers=AUTH)
    assert [p["label"] for p in response.json()["predictions"]] == [p["label"] for p in expected[:3]]


def test_auth_limits_and_validation(classifier_url):
    url = f"{classifier_url}/v1/classify"
    ok = {"texts": ["a great film"]}
    assert httpx.get(f"{classifier_url}/health").json()["task"] == "classification"  # open
    assert httpx.post(url, json=ok).status_code == 401
    assert httpx.post(url, json=ok, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{classifier_url}/metrics").status_code == 401
    assert httpx.post(url, json=ok, headers=AUTH).status_code == 200
    # limits: texts per request, body size (declared or chunked)
    too_many = httpx.post(url, json={"texts": ["a film"] * 9}, headers=AUTH)
    assert too_many.status_code == 413 and "at most 8" in too_many.json()["detail"]
    assert httpx.post(url, json={"texts": ["a" * 5000]}, headers=AUTH).status_code == 413
    chunks = (part for part in [b'{"texts": ["', b"a" * 5000, b'"]}'])
    assert (
        httpx.post(url, content=chunks, headers=AUTH | {"Content-Type": "application/json"}).status_code
        == 413
    )
    # validation
    for body in ({}, {"texts": []}, {"texts": ["  "]}, {"texts": "one text"}, {"texts": ["x"], "extra": 1}):
        assert httpx.post(url, json=body, headers=AUTH).status_code == 422, body
    assert httpx.post(url, json={"texts": ["x"], "text_pairs": ["y"]}, headers=AUTH).status_code == 422
    # a classifier serves no generation routes; the OpenAPI spec says what it serves and how to authenticate
    assert httpx.post(f"{classifier_url}/v1/chat/completions", json={}, headers=AUTH).status_code == 404
    spec = httpx.get(f"{classifier_url}/openapi.json").json()
    assert "/v1/classify" in spec["paths"] and "/v1/chat/completions" not in spec["paths"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    metrics = httpx.get(f"{classifier_url}/metrics", headers=AUTH).text
    assert 'hybridtune_requests_total{path="/v1/classify",status="413"}' in metrics


def test_a_saved_ensemble_is_served_like_a_run(classifier_run, tmp_path):
    from hybridtune import ensemble

    ensemble.build([str(classifier_run), str(classifier_run)], str(tmp_path / "ens"))
    texts = ["the film was great and charming", "a dull and tedious story"]
    expected = ensemble.Ensemble(tmp_path / "ens").predict(texts)
    with serving(create_app(tmp_path / "ens", token=TOKEN)) as url:
        response = httpx.post(f"{url}/v1/classify", json={"texts": texts}, headers=AUTH)
    for got, want, single in zip(
        response.json()["predictions"], expected, api.predict(str(classifier_run), texts), strict=True
    ):
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-6)
        assert got["probs"] == pytest.approx(single["probs"], abs=1e-5)  # two identical members


# --------------------------------------------------------------------------------------------------
# generation


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random GPT-2 LM (with its LM head) and a tokenizer with a chat template."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = TEMPLATE
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128)
    config.pad_token_id = tokenizer.pad_token_id
    out = tmp_path_factory.mktemp("tiny-gpt2-lm")
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _greedy(model, tokenizer, prompt: str, n: int) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def causal_url(causal_dir):
    with serving(
        create_app(causal_dir, token=TOKEN, limits=Limits(max_wait_ms=50, max_new_tokens=64))
    ) as url:
        yield url


def test_openai_client_chat_streaming_and_completions(causal_dir, causal_url):
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(causal_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    client = OpenAI(base_url=f"{causal_url}/v1", api_key=TOKEN, max_retries=0)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a film about a plot"}]
    prompt = chat_prompt(tokenizer, messages)
    assert prompt.startswith("<system> be brief\n<user>") and prompt.endswith("<assistant>")
    expected = _greedy(model, tokenizer, prompt, 8)

    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == expected and expected.strip()
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 8
    assert chat.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])

    chunks = list(
        client.chat.completions.create(
            messages=messages, model="tiny", max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"

    completion = client.completions.create(model="tiny", prompt="the movie was", max_tokens=6, temperature=0)
    assert completion.choices[0].text == _greedy(model, tokenizer, "the movie was", 6)
    streamed = client.completions.create(
        model="tiny", prompt="the movie was", max_tokens=6, temperature=0, stream=True
    )
    pieces = [c.choices[0].text for c in streamed]
    assert "".join(pieces) == completion.choices[0].text
    assert len([p for p in pieces if p]) > 1  # sent word by word as decoded, not all at the end

    # a stop string ends the text before it, streamed or not
    words = expected.split()
    stop = words[len(words) // 2]
    cut = expected[: expected.find(stop)]
    stopped = client.chat.completions.create(
        messages=messages, model="t", max_tokens=8, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].message.content == cut and stopped.choices[0].finish_reason == "stop"
    pieces = client.chat.completions.create(
        messages=messages, model="t", max_tokens=8, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in pieces) == cut

    # sampling runs; auth is enforced for the openai client too
    sampled = client.completions.create(
        model="t", prompt="the movie was", max_tokens=5, temperature=0.8, top_p=0.9
    )
    assert sampled.choices[0].finish_reason == "length"
    import openai

    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{causal_url}/v1", api_key="wrong", max_retries=0).completions.create(
            model="t", prompt="x", max_tokens=2
        )


def test_generate_endpoint_batches_concurrent_prompts_and_checks_its_limits(causal_dir, causal_url):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(causal_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    prompts = [f"the {w} plot" for w in ("great", "dull", "funny", "messy", "fresh", "bland")]
    before = _forward_calls(causal_url)
    responses = asyncio.run(
        _concurrently(causal_url, "/v1/generate", [{"prompt": p, "max_new_tokens": 5} for p in prompts])
    )
    assert _forward_calls(causal_url) - before < len(prompts)
    for prompt, response in zip(prompts, responses, strict=True):
        assert response.json()["text"] == _greedy(model, tokenizer, prompt, 5)
    # SSE stream of /v1/generate
    with httpx.stream(
        "POST",
        f"{causal_url}/v1/generate",
        json={"prompt": prompts[0], "max_new_tokens": 5, "stream": True},
        headers=AUTH,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2]) == {"finish_reason": "length"}
    assert "".join(json.loads(e)["text"] for e in events[:-2]) == responses[0].json()["text"]
    url = f"{causal_url}/v1/completions"
    too_long = httpx.post(url, json={"prompt": "film " * 120, "max_tokens": 20}, headers=AUTH)
    assert too_long.status_code == 413 and "128 positions" in too_long.json()["detail"]
    assert httpx.post(url, json={"prompt": "x", "max_tokens": 65}, headers=AUTH).status_code == 422
    assert httpx.post(url, json={"prompt": "x", "n": 2}, headers=AUTH).status_code == 422
    assert httpx.post(url, json={"prompt": "x"}).status_code == 401
    assert httpx.post(f"{causal_url}/v1/classify", json={"texts": ["x"]}, headers=AUTH).status_code == 404


def test_a_causal_lm_run_dir_with_a_peft_adapter_is_served_with_its_adapter(causal_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(causal_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    torch.manual_seed(1)
    lora = LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], r=4, init_lora_weights=False)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(causal_dir), lora).eval()
    run = tmp_path / "sft-run"
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    (run / "run.json").write_text(
        json.dumps({"task": "causal_lm", "base_model": str(causal_dir), "format": "peft"})
    )
    prompt = "the plot was"
    expected = _greedy(model, tokenizer, prompt, 6)
    assert expected != _greedy(base, tokenizer, prompt, 6)  # the adapter matters
    loaded = inference.load(run)
    assert loaded.task_name == "causal_lm" and hasattr(loaded.model, "peft_config")
    with serving(create_app(loaded=loaded)) as url:  # no token: auth off
        response = httpx.post(f"{url}/v1/generate", json={"prompt": prompt, "max_new_tokens": 6})
    assert response.status_code == 200 and response.json()["text"] == expected
    # its merged export is a plain causal LM that generates the same
    from hybridtune.export import export

    export(str(run), "merged", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name in merged.state_dict())
    assert _greedy(merged, AutoTokenizer.from_pretrained(tmp_path / "merged"), prompt, 6) == expected


def test_cli_serve_refuses_to_start_without_a_token_or_a_model(tmp_path, monkeypatch, classifier_run):
    monkeypatch.delenv("HYBRIDTUNE_TOKEN", raising=False)
    runner = CliRunner()
    for args, says in [
        (["serve", str(classifier_run)], "no token"),
        (["serve", str(tmp_path), "--no-auth"], "neither run.json"),
        (["serve", str(classifier_run), "--token-file", str(tmp_path / "missing")], "no such file"),
    ]:
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert says in result.output and "Traceback" not in result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_serve_runs_in_bf16_and_predicts_as_the_cpu(classifier_run):
    loaded = inference.load(classifier_run)
    param = next(loaded.model.parameters())
    assert param.device.type == "cuda" and param.dtype == torch.bfloat16  # precision auto on CUDA
    texts = ["the film was great and charming", "a dull and tedious story"]
    with serving(create_app(loaded=loaded, token=TOKEN)) as url:
        health = httpx.get(f"{url}/health").json()
        response = httpx.post(f"{url}/v1/classify", json={"texts": texts}, headers=AUTH)
    assert health["device"].startswith("cuda") and health["dtype"] == "bfloat16"
    for got, want in zip(
        response.json()["predictions"], api.predict(str(classifier_run), texts), strict=True
    ):
        assert got["probs"] == pytest.approx(want["probs"], abs=2e-2)  # bf16 vs the fp32 run on the CPU
