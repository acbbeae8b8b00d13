"""What stands between a client and the model: auth, limits, admission, metrics.

One plain ASGI middleware (`Guard`) sees every request before FastAPI does, in this order:

1. **auth** — a protected path (`/v1/...`, `/metrics`) without the bearer token is answered 401
   before a byte of its body is read (an unauthenticated client cannot make the server hold bodies);
2. **admission** — at most `max_pending` protected requests are in the server at once; one more
   is answered 503 with `Retry-After` (bodies held in memory: at most max_pending x max_body_bytes);
3. **body limit** — a body over `max_body_bytes`, declared (Content-Length) or streamed (chunked),
   is answered 413 while it is being read.

`Observe` counts every response for /metrics (Prometheus). The token: `token_from`, `check_token`.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.responses import JSONResponse

from hybridtune.errors import UserError, one_line

TOKEN_ENV = "HYBRIDTUNE_TOKEN"
MIN_TOKEN_CHARS = 16  # 16 hex characters are 64 bits: `secrets.token_hex(16)` gives 32


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB per request body
    max_batch: int = 32  # texts per request, and per forward call of the dynamic batcher
    max_wait_ms: float = 5.0  # how long the batcher waits for more requests after the first
    max_new_tokens: int = 512  # max_tokens a generation request may ask for
    max_pending: int = 64  # requests in the server at once (queued or running); more get 503
    timeout_s: float = 30.0  # a request not answered by then gets 503 (and its work is dropped)


def check_token(token: str | None, where: str) -> str:
    """The bearer token, or a UserError: empty, or too short to resist guessing."""
    if token is None or not token.strip():
        raise UserError(where, "an empty token", f"a token of at least {MIN_TOKEN_CHARS} characters")
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise UserError(
            where,
            f"a token of {len(token)} characters",
            f"at least {MIN_TOKEN_CHARS} (e.g. python -c 'import secrets; print(secrets.token_hex(16))')",
        )
    return token


def token_from(token_file: Path | None, no_auth: bool) -> str | None:
    """`serve`'s token: from --token-file, else $HYBRIDTUNE_TOKEN; None only with --no-auth."""
    token = None
    if token_file is not None:
        where = f"--token-file {token_file}"
        if not token_file.is_file():
            raise UserError(where, "no such file", "a file holding the token")
        try:
            text = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(
                where, f"a file that cannot be read as text ({one_line(e)})", "a token file"
            ) from None
        token = check_token(text, where)  # an empty file is an error, not a fall-back to the variable
    elif not no_auth and os.environ.get(TOKEN_ENV) is not None:
        token = check_token(os.environ[TOKEN_ENV], f"${TOKEN_ENV}")
    if token is None and not no_auth:
        raise UserError("serve", "no token", f"--token-file FILE or ${TOKEN_ENV} (or --no-auth)")
    return None if no_auth else token


def authorized(headers: list[tuple[bytes, bytes]], token: str) -> bool:
    given = next((v for k, v in headers if k == b"authorization"), b"")
    scheme, _, credentials = given.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(credentials.strip(), token.encode())


def protected(path: str) -> bool:
    return path.startswith("/v1/") or path == "/metrics"


class Guard:
    """Auth, then admission, then the body limit (see the module docstring)."""

    def __init__(self, app, token: str | None, limits: Limits):
        self.app, self.token, self.limits = app, token, limits
        self.pending = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not protected(scope["path"]):
            return await self.app(scope, receive, send)
        if self.token is not None and not authorized(scope["headers"], self.token):
            response = JSONResponse(
                {"detail": "missing or wrong bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send)
        if scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        if self.pending >= self.limits.max_pending:
            return await busy(f"{self.pending} requests in progress")(scope, receive, send)
        self.pending += 1
        try:
            await self._limit_body(scope, receive, send)
        finally:
            self.pending -= 1

    async def _limit_body(self, scope, receive, send):
        limit = self.limits.max_body_bytes
        too_large = JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            return await too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await too_large(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def busy(why: str, retry_after: int = 1) -> JSONResponse:
    """503 with Retry-After: the server is at its bound; the client should come back."""
    return JSONResponse(
        {"detail": f"server busy ({why}); retry after {retry_after} s"},
        status_code=503,
        headers={"Retry-After": str(retry_after)},
    )


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
