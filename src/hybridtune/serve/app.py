"""The FastAPI app: request bodies, the routes every model has, classification, errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from hybridtune import inference
from hybridtune.batching import Batcher, Overloaded
from hybridtune.errors import UserError
from hybridtune.serve.guard import Guard, Limits, Metrics, Observe, busy
from hybridtune.serve.work import ModelFailed, Text, Utf8, answer, log  # noqa: F401  (generate.py too)


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[Text] = Field(min_length=1, description="texts to classify (or to tag), non-blank")
    text_pairs: list[Text] | None = Field(None, description="second texts, one per text (pair tasks)")


def create_app(
    path: str | Path | None = None,
    token: str | None = None,
    limits: Limits | None = None,
    loaded: inference.Loaded | None = None,
) -> FastAPI:
    """The app for the model at `path` (or an already `loaded` one). `token`: required bearer token
    (None: no auth). The model is loaded here, before a server starts, so a bad path fails early."""
    from hybridtune.serve.generate import generation_routes, run_generate

    limits = limits or Limits()
    if loaded is None:
        from hybridtune import ensemble

        loaded = ensemble.load(path) if ensemble.is_ensemble(path) else inference.load(path)
    causal = loaded.task_name == inference.CAUSAL
    metrics = Metrics()

    def observe(size: int) -> None:
        metrics.forwards.inc()
        metrics.batch_size.observe(size)

    run = run_generate(loaded) if causal else _run_classify(loaded)
    batcher = Batcher(
        run, limits.max_batch, limits.max_wait_ms, observe, limits.max_pending, limits.timeout_s
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker = asyncio.create_task(batcher.worker())
        yield
        # uvicorn has stopped accepting and waited for open requests (SIGTERM); what is still
        # queued or running finishes, then the worker stops, without a CancelledError traceback
        await batcher.drain(worker, limits.timeout_s)

    app = FastAPI(
        title="hybridtune serve", description=f"{loaded.task_name} model `{loaded.name}`", lifespan=lifespan
    )
    bearer = HTTPBearer(auto_error=False, description="the token given to `hybridtune serve`")

    # checked by Guard before the body is read; declared here too so that the OpenAPI spec says so
    def authorized(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:  # noqa: B008
        return None

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        # FastAPI's own handler echoes each bad input back: a lone surrogate in it cannot be encoded
        # (a 500), and a 1 MiB value would come back whole. The field and the reason are enough.
        errors = [
            {"type": err.get("type"), "loc": err.get("loc"), "msg": err.get("msg")} for err in e.errors()
        ]
        content = json.dumps({"detail": errors}, ensure_ascii=True, default=str)  # \ud800 stays escaped
        return Response(content, status_code=422, media_type="application/json")

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=422)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, e: Overloaded) -> JSONResponse:
        return busy(str(e))

    @app.exception_handler(TimeoutError)
    async def timed_out(request: Request, e: TimeoutError) -> JSONResponse:
        return busy(f"no answer within {limits.timeout_s:g} s")

    @app.exception_handler(ModelFailed)
    async def model_failed(request: Request, e: ModelFailed) -> JSONResponse:
        log.error("%s", e)  # one line; the other requests of its batch were answered
        return JSONResponse({"detail": str(e)}, status_code=500)

    @app.get("/health")
    async def health() -> dict:
        param = next(loaded.model.parameters(), None)
        return {
            "status": "ok",
            "task": loaded.task_name,
            "model": loaded.name,
            "device": str(param.device) if param is not None else "cpu",
            "dtype": "int8"
            if inference.is_int8(loaded.model)
            else (str(param.dtype).removeprefix("torch.") if param is not None else None),
        }

    api = APIRouter(dependencies=[Depends(authorized)])

    @api.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": loaded.name, "object": "model", "owned_by": "hybridtune"}]}

    if causal:
        generation_routes(api, loaded, batcher, limits, metrics)
    else:
        _classify_route(api, loaded, batcher, limits)
    app.include_router(api)
    app.add_middleware(Guard, token=token, limits=limits)
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
        return {"model": loaded.name, "predictions": await answer(batcher, items)}
