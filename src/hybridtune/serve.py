"""`hybridtune serve PATH`: an HTTP API (FastAPI) for a run dir, an export dir or a model dir.

    GET  /health                  open: status, task, model, device
    GET  /metrics                 Prometheus text: requests by path and status, latency, forward
                                  calls and their batch sizes, generated tokens
    GET  /v1/models               the one model (OpenAI's list format)
    POST /v1/classify             classification / token classification: {"texts": [...]} -> predictions
    POST /v1/generate             causal LMs: {"prompt": ...} -> text (SSE with "stream": true)
    POST /v1/completions          causal LMs, OpenAI-compatible (streaming too)
    POST /v1/chat/completions     causal LMs, OpenAI-compatible, chat template (streaming too)
    GET  /openapi.json, /docs     FastAPI's OpenAPI spec and its UI

A model serves the endpoints of its task only. With a token, every /v1 route and /metrics need
`Authorization: Bearer <token>` (401 otherwise). A request body over `max_body_bytes` or more
texts than `max_batch` is refused with 413, a prompt longer than the model's positions too;
malformed requests get FastAPI's 422 with the field that is wrong.

Concurrent requests share model calls (`batching.Batcher`: a few ms window, up to `max_batch`
texts; generation requests with equal sampling settings). Streams run in a thread each, as
transformers' `TextIteratorStreamer` needs; a client that goes away ends its generation.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Security
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from hybridtune import inference
from hybridtune.batching import Batcher
from hybridtune.errors import UserError
from hybridtune.generation import Completion, Sampling, Stream, chat_prompt, generate

TOKEN_ENV = "HYBRIDTUNE_TOKEN"


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB per request body
    max_batch: int = 32  # texts per request, and per forward call of the dynamic batcher
    max_wait_ms: float = 5.0  # how long the batcher waits for more requests after the first
    max_new_tokens: int = 512  # max_tokens a generation request may ask for


# --------------------------------------------------------------------------------------------------
# metrics, body size limit (plain ASGI middlewares: they see every response, streams included)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # one per app: several apps in one process stay apart
        r = self.registry
        self.requests = Counter("hybridtune_requests", "HTTP requests", ["path", "status"], registry=r)
        self.latency = Histogram("hybridtune_request_seconds", "request latency", ["path"], registry=r)
        self.forwards = Counter("hybridtune_forward_calls", "model calls of the dynamic batcher", registry=r)
        self.batch_size = Histogram(
            "hybridtune_batch_size", "items per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.tokens = Counter("hybridtune_generated_tokens", "tokens generated", registry=r)


class Observe:
    def __init__(self, app, metrics: Metrics, paths: set[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {}
        path = scope["path"] if scope["path"] in self.paths else "other"

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.requests.labels(path, str(status.get("code", 500))).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


class BodyLimit:
    """413 for a body over `limit` bytes, declared (Content-Length) or streamed (chunked)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > self.limit:
            return await too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.limit:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# --------------------------------------------------------------------------------------------------
# request bodies

Text = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[Text] = Field(min_length=1, description="texts to classify (or to tag), non-blank")
    text_pairs: list[Text] | None = Field(None, description="second texts, one per text (pair tasks)")


class SamplingFields(BaseModel):
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(None, description="end the text before any of these")
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
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(SamplingFields):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=1)


# --------------------------------------------------------------------------------------------------
# the app


def create_app(
    path: str | Path | None = None,
    token: str | None = None,
    limits: Limits = Limits(),
    loaded: inference.Loaded | None = None,
) -> FastAPI:
    """The app for the model at `path` (or an already `loaded` one). `token`: required bearer token
    (None: no auth). The model is loaded here, before a server starts, so a bad path fails early."""
    loaded = loaded or inference.load(path)
    causal = loaded.task_name == inference.CAUSAL
    metrics = Metrics()

    def observe(size: int) -> None:
        metrics.forwards.inc()
        metrics.batch_size.observe(size)

    run = _run_generate(loaded) if causal else _run_classify(loaded)
    batcher = Batcher(run, limits.max_batch, limits.max_wait_ms, observe)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.worker())
        yield
        worker.cancel()

    app = FastAPI(
        title="hybridtune serve",
        description=f"{loaded.task_name} model `{loaded.name}`",
        lifespan=lifespan,
    )
    bearer = HTTPBearer(auto_error=False, description="the token given to `hybridtune serve`")

    # a default, not Annotated[...]: string annotations cannot name this function's local `bearer`
    def authorized(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:  # noqa: B008
        if token is None:
            return
        if credentials is None or not secrets.compare_digest(
            credentials.credentials.encode(), token.encode()
        ):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=422)

    @app.get("/health")
    async def health() -> dict:
        param = next(loaded.model.parameters(), None)
        return {
            "status": "ok",
            "task": loaded.task_name,
            "model": loaded.name,
            "device": str(param.device) if param is not None else "cpu",
            "dtype": "int8" if inference.is_int8(loaded.model) else str(param.dtype).removeprefix("torch."),
        }

    api = APIRouter(dependencies=[Depends(authorized)])

    @api.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": loaded.name, "object": "model", "owned_by": "hybridtune"}]}

    if causal:
        _generation_routes(api, loaded, batcher, limits, metrics)
    else:
        _classify_route(api, loaded, batcher, limits)
    app.include_router(api)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    paths = {route.path for route in [*app.routes, *api.routes] if hasattr(route, "path")}
    app.add_middleware(Observe, metrics=metrics, paths=paths)
    return app


def _run_classify(loaded: inference.Loaded):
    def run(items: list, key: Any) -> list:
        texts = [text for text, _ in items]
        pairs = [pair for _, pair in items] if loaded.data_cfg.text_pair_column else None
        if loaded.predict is not None:  # a saved ensemble: its members, combined
            return loaded.predict(texts, pairs)
        return loaded.task.predict(
            loaded.model, loaded.tokenizer, loaded.labels, loaded.data_cfg, texts, pairs
        )

    return run


def _classify_route(api: APIRouter, loaded, batcher: Batcher, limits: Limits) -> None:
    takes_pairs = bool(loaded.data_cfg.text_pair_column)

    @api.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict:
        """Predictions for each text: label, score and class probabilities (or the entities found)."""
        n = len(body.texts)
        if n > limits.max_batch:
            raise HTTPException(413, f"{n} texts in one request; at most {limits.max_batch}")
        if takes_pairs != (body.text_pairs is not None) or (takes_pairs and len(body.text_pairs) != n):
            expected = f"text_pairs, one per text ({n})" if takes_pairs else "no text_pairs (single texts)"
            raise HTTPException(422, f"this model takes {expected}")
        items = list(zip(body.texts, body.text_pairs or [None] * n, strict=True))
        return {"model": loaded.name, "predictions": await batcher.submit(items)}


# --------------------------------------------------------------------------------------------------
# generation


def _run_generate(loaded: inference.Loaded):
    def run(prompts: list, sampling: Sampling) -> list[Completion]:
        return generate(loaded.model, loaded.tokenizer, prompts, sampling)

    return run


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _generation_routes(api: APIRouter, loaded, batcher: Batcher, limits: Limits, metrics: Metrics) -> None:
    config = loaded.model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)

    def check(prompts: list[str], max_new_tokens: int) -> None:
        if max_new_tokens > limits.max_new_tokens:
            raise HTTPException(422, f"max tokens {max_new_tokens}; at most {limits.max_new_tokens}")
        if len(prompts) > limits.max_batch:
            raise HTTPException(413, f"{len(prompts)} prompts in one request; at most {limits.max_batch}")
        for prompt in prompts:
            n = len(loaded.tokenizer(prompt)["input_ids"])
            if positions and n + max_new_tokens > positions:
                raise HTTPException(
                    413,
                    f"prompt of {n} tokens + {max_new_tokens} new ones; the model has {positions} positions",
                )

    def room(prompt: str) -> int:
        """OpenAI's default for chat: as many new tokens as fit (here: up to max_new_tokens)."""
        n = len(loaded.tokenizer(prompt)["input_ids"])
        return max(1, min(limits.max_new_tokens, positions - n if positions else limits.max_new_tokens))

    async def complete(prompts: list[str], sampling: Sampling) -> list[Completion]:
        check(prompts, sampling.max_new_tokens)
        results = await batcher.submit(prompts, sampling)
        metrics.tokens.inc(sum(r.completion_tokens for r in results))
        return results

    def stream(prompt: str, sampling: Sampling, chunk: Callable[[str | None, Completion | None], dict]):
        """SSE: a chunk per text piece, a last chunk with the finish reason, then [DONE]."""
        check([prompt], sampling.max_new_tokens)
        run = Stream(loaded.model, loaded.tokenizer, prompt, sampling)

        async def events() -> AsyncIterator[str]:
            pieces = iter(run)
            try:
                while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
                    yield _sse(chunk(piece, None))
                metrics.tokens.inc(run.result.completion_tokens)
                yield _sse(chunk(None, run.result))
                yield _sse("[DONE]")
            finally:  # also when the client went away: ends the generation
                run.cancel.set()
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
        """Continue a prompt (greedy unless temperature > 0)."""
        sampling = body.sampling(body.max_new_tokens)
        if body.stream:
            return stream(
                body.prompt,
                sampling,
                lambda piece, done: (
                    {"text": piece} if done is None else {"finish_reason": done.finish_reason}
                ),
            )
        (result,) = await complete([body.prompt], sampling)
        return {"model": loaded.name, "text": result.text, "finish_reason": result.finish_reason} | {
            "usage": usage([result])
        }

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest):
        """OpenAI-compatible text completion."""
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
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
        """OpenAI-compatible chat: the messages through the tokenizer's chat template."""
        prompt = chat_prompt(loaded.tokenizer, [m.plain() for m in body.messages])
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
