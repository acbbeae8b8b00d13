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
`Authorization: Bearer <token>`: 401 before the body is read. The work is bounded
(`guard.Limits`): at most `max_pending` requests in the server (503 + Retry-After above it),
a body over `max_body_bytes` or more texts than `max_batch` is 413, a prompt longer than the
model's positions too, a request not answered within `timeout_s` is 503; malformed requests get
FastAPI's 422 with the field that is wrong (a body that is no JSON: 422 / 400, never 500).

Concurrent requests share model calls (`batching.Batcher`: a few ms window, up to `max_batch`
texts; generation requests with equal sampling settings); streams go through the same bounded
queue, one model call at a time. One input that makes the model fail fails only its own request.
SIGTERM: uvicorn stops accepting, the requests in flight are answered, the queue drains, exit 0.

The package: `guard` (auth, admission, body limit, metrics), `app` (the app, classification),
`generate` (the generation routes), and `run` below (uvicorn with the limits).
"""

from __future__ import annotations

from fastapi import FastAPI

from hybridtune.serve.app import ClassifyRequest, create_app
from hybridtune.serve.guard import MIN_TOKEN_CHARS, TOKEN_ENV, Limits, check_token, token_from

__all__ = [
    "MIN_TOKEN_CHARS",
    "TOKEN_ENV",
    "ClassifyRequest",
    "Limits",
    "check_token",
    "create_app",
    "run",
    "token_from",
]


def run(app: FastAPI, host: str, port: int, limits: Limits) -> None:
    """uvicorn with a bound on connections (its own 503 above it: idle keep-alive connections
    count, so the bound is well above `max_pending`) and a graceful shutdown that waits for the
    requests in flight at most `timeout_s` (+5 s)."""
    import uvicorn

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info",
        limit_concurrency=4 * limits.max_pending + 16,
        timeout_graceful_shutdown=int(limits.timeout_s) + 5,
    )
    uvicorn.Server(config).run()
