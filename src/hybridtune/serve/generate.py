"""The generation routes of causal LMs: /v1/generate and OpenAI's /v1/completions and
/v1/chat/completions, batched or streamed (server-sent events).

Prompts are formatted and tokenized by hybridtune/generation.py, the path `hybridtune generate` and
causal_lm's evaluation take too: a run's prompts as its training formatted them (run.json's
`prompt_format`): /v1/generate's prompt is a user turn, /v1/chat's messages the turns, /v1/completions'
prompt a text continued as it stands; a model without that record gets its text as given.

A stream needs the model to itself (transformers' `TextIteratorStreamer` follows one `generate`
call): its generation is a `batching.Job` in the same bounded queue as every other model call, so
N streaming clients are N queued jobs, not N concurrent generations. Waiting for each piece is
bounded by `Limits.timeout_s`; a stream that times out ends with an error event; a client that
goes away ends its generation at the next token.
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Literal

from fastapi import APIRouter, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from hybridtune import inference
from hybridtune.batching import Batcher, Job
from hybridtune.errors import one_line
from hybridtune.generation import (
    Completion,
    Prompt,
    Sampling,
    Stream,
    chat_input,
    generate,
    prompt_input,
    text_input,
)
from hybridtune.serve.guard import Limits, Metrics
from hybridtune.serve.work import Text, Utf8, answer, log


class SamplingFields(BaseModel):
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Utf8 | list[Utf8] | None = Field(None, description="end the text before any of these")
    stream: bool = Field(False, description="server-sent events")

    def sampling(self, max_new_tokens: int) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return Sampling(max_new_tokens, self.temperature, self.top_p, tuple(s for s in stop if s))


class GenerateRequest(SamplingFields):
    model_config = ConfigDict(extra="forbid")
    prompt: Text
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy")


class CompletionRequest(SamplingFields):
    model: str | None = None  # one model is served; the name is not checked
    prompt: Text | list[Text]
    max_tokens: int | None = Field(16, ge=1)
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")


class TextPart(BaseModel):
    type: Literal["text"]
    text: Utf8


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Utf8 | list[TextPart]

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)


def run_generate(loaded: inference.Loaded):
    def run(prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        return generate(loaded.model, loaded.tokenizer, prompts, sampling, loaded.prompt_format)

    return run


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def generation_routes(api: APIRouter, loaded, batcher: Batcher, limits: Limits, metrics: Metrics) -> None:
    config, tokenizer, fmt = loaded.model.config, loaded.tokenizer, loaded.prompt_format
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def check(prompts: list[Prompt], max_new_tokens: int) -> None:
        if max_new_tokens > limits.max_new_tokens:
            raise HTTPException(422, f"max tokens {max_new_tokens}; at most {limits.max_new_tokens}")
        if len(prompts) > limits.max_batch:
            raise HTTPException(413, f"{len(prompts)} prompts in one request; at most {limits.max_batch}")
        for prompt in prompts:
            n = len(prompt["input_ids"])
            if positions and n + max_new_tokens > positions:
                raise HTTPException(
                    413,
                    f"prompt of {n} tokens + {max_new_tokens} new ones; the model has {positions} positions",
                )

    def room(prompt: Prompt) -> int:
        """OpenAI's default for chat: as many new tokens as fit (here: up to max_new_tokens)."""
        n = len(prompt["input_ids"])
        return max(1, min(limits.max_new_tokens, positions - n if positions else limits.max_new_tokens))

    async def complete(prompts: list[Prompt], sampling: Sampling) -> list[Completion]:
        check(prompts, sampling.max_new_tokens)
        results = await answer(batcher, prompts, sampling)
        metrics.tokens.inc(sum(r.completion_tokens for r in results))
        return results

    def stream(prompt: Prompt, sampling: Sampling, chunk: Callable[[str | None, Completion | None], dict]):
        """SSE: a chunk per text piece, a last chunk with the finish reason, then [DONE]."""
        check([prompt], sampling.max_new_tokens)
        run = Stream(loaded.model, tokenizer, prompt, sampling, fmt, timeout=limits.timeout_s)
        job = batcher.enqueue([prompt], Job(run.work))  # full: Overloaded (503) before the response starts

        async def events() -> AsyncIterator[str]:
            pieces = run.pieces()
            try:
                while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                    yield _sse(chunk(piece, None))
                metrics.tokens.inc(run.result.completion_tokens)
                yield _sse(chunk(None, run.result))
                yield _sse("[DONE]")
            except queue.Empty:  # no piece within timeout_s: queued too long, or stalled
                yield _sse({"error": {"message": f"no answer within {limits.timeout_s:g} s", "code": 503}})
            except Exception as e:  # the generation failed: the stream says so and ends
                log.error("a streamed generation failed: %s", one_line(e))
                yield _sse({"error": {"message": f"the model failed: {one_line(e)}", "code": 500}})
            finally:  # also when the client went away: ends the generation (or skips it, still queued)
                run.cancel.set()
                if not job.done():
                    job.cancel()
                try:
                    await asyncio.to_thread(pieces.close)
                except ValueError:  # still inside next() in its thread; it ends at the next token
                    pass

        return StreamingResponse(events(), media_type="text/event-stream")

    def usage(results: list[Completion]) -> dict:
        prompt, completion = sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @api.post("/v1/generate")
    async def generate_text(body: GenerateRequest):
        """Answer a prompt (greedy unless temperature > 0): a user turn in the run's prompt format."""
        sampling = body.sampling(body.max_new_tokens)
        prompt = prompt_input(tokenizer, fmt, body.prompt)
        if body.stream:
            return stream(
                prompt,
                sampling,
                lambda piece, done: (
                    {"text": piece} if done is None else {"finish_reason": done.finish_reason}
                ),
            )
        (result,) = await complete([prompt], sampling)
        return {"model": loaded.name, "text": result.text, "finish_reason": result.finish_reason} | {
            "usage": usage([result])
        }

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest):
        """OpenAI-compatible text completion: each prompt continued as it stands."""
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompts = [text_input(tokenizer, fmt, text) for text in texts]
        sampling = body.sampling(body.max_tokens or 16)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time())}
        head["model"] = loaded.name
        if body.stream:
            if len(prompts) != 1:
                raise HTTPException(422, "stream: one prompt per request")

            def chunk(piece, done):
                text, reason = (piece, None) if done is None else ("", done.finish_reason)
                return head | {
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]
                }

            return stream(prompts[0], sampling, chunk)
        results = await complete(prompts, sampling)
        choices = [
            {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
        return head | {"choices": choices, "usage": usage(results)}

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        """OpenAI-compatible chat: the messages in the run's prompt format (else the chat template)."""
        prompt = chat_input(tokenizer, fmt, [m.plain() for m in body.messages])
        sampling = body.sampling(body.max_completion_tokens or body.max_tokens or room(prompt))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": loaded.name}
        if body.stream:
            first = [True]

            def chunk(piece, done):
                delta = {"content": piece} if done is None else {}
                if first[0]:
                    delta, first[0] = {"role": "assistant", **delta}, False
                reason = None if done is None else done.finish_reason
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
                return head | {"object": "chat.completion.chunk", "choices": [choice]}

            return stream(prompt, sampling, chunk)
        (result,) = await complete([prompt], sampling)
        message = {"role": "assistant", "content": result.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}
        return head | {"object": "chat.completion", "choices": [choice], "usage": usage([result])}
