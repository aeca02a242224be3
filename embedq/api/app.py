"""The gateway's HTTP API (FastAPI): OpenAI's ``POST /v1/embeddings``, ``POST /v1/search``,
and ``/healthz``, ``/readyz``, ``/metrics``.

No model here: every text goes through the fleet (``embedq.api.fleet``), so a query is
embedded by the same workers, model and hardware as the bulk data. Each request passes, in
order: the API key (401), the rate limit (429), the body's size and shape (413, 400, 422),
the model name (404), this process's in-flight bound (503), then the fleet's deadline
(503); each refusal is an OpenAI-shaped JSON error and one log line.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog
from fastapi import FastAPI, Request, Response

from embedq.api.fleet import DeadlineExceeded, Fleet, connect_async
from embedq.api.limits import Keyring, RateLimiter
from embedq.api.requests import ApiError, Bounds, parse_embeddings, parse_search
from embedq.api.telemetry import ApiMetrics
from embedq.core.config import Settings
from embedq.core.errors import CollectionMissing, ConfigError, InfrastructureError, SinkRejected
from embedq.model.encoder import PACKAGED_MODEL_NAME, model_name, resolve_model_dir
from embedq.queue.online_wire import Answer
from embedq.sink.milvus import Sink, open_sink

log = structlog.get_logger("embedq.api")

RETRY_AFTER_S = 1  # what a 503 tells clients to wait; the deadline already waited
Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]


def served_model(settings: Settings) -> tuple[str, frozenset[str]]:
    """The model's name (as workers report it) and the names a request may give for it."""
    try:
        name = resolve_model_dir(settings.model)[1]
    except ConfigError:  # a gateway image without the model: its configured name
        name = model_name(Path(settings.model)) if settings.model else PACKAGED_MODEL_NAME
    return name, frozenset({name.lower(), name.rsplit("/", 1)[-1].lower()})


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status, headers, media_type="application/json")


class Gateway:
    """What the routes share: the fleet client, limits, metrics, the sink for search."""

    def __init__(self, settings: Settings, sink: Sink | None = None) -> None:
        self.settings = settings
        self.bounds = Bounds(settings.api_max_inputs, settings.api_max_input_bytes)
        self.keyring = Keyring(settings.api_key_list)
        self.metrics = ApiMetrics()
        self.model, self.model_names = served_model(settings)
        self.sink = sink
        self.in_flight = 0
        self.fleet: Fleet | None = None
        self.limiter: RateLimiter | None = None

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        client = connect_async(self.settings)  # bound to this event loop
        self.fleet = Fleet(client, self.settings)
        self.limiter = RateLimiter(
            client, self.settings.stream, self.settings.api_rate_limit, self.settings.api_rate_burst
        )
        await self.fleet.ensure_group()
        self._log_start()
        try:
            yield
        finally:
            await client.aclose()

    def _log_start(self) -> None:
        s = self.settings
        if not self.keyring.enabled:
            log.warning(
                "api_auth_disabled",
                why="EMBEDQ_API_KEYS is empty: anyone who reaches this port may call it",
            )
        log.info(
            "api_started",
            host=s.api_host,
            port=s.api_port,
            lane=self.fleet.keys.stream if self.fleet else None,
            model=self.model,
            api_keys=len(s.api_key_list),
            rate_limit=s.api_rate_limit,
            timeout_s=s.api_timeout_s,
        )

    # -- around every request ------------------------------------------------------

    async def serve(self, request: Request, handler: Handler) -> Response:
        """Run ``handler``; errors become their JSON answers, everything is counted."""
        started = time.perf_counter()
        try:
            caller = self.keyring.caller(
                request.headers.get("authorization"), request.client.host if request.client else ""
            )
            headers = await self._limiter().check(caller)
            response = await handler(request, headers)
        except ApiError as exc:
            response = self._refused(request, exc)
        except InfrastructureError as exc:
            log.warning("api_unavailable", path=request.url.path, error=str(exc)[:300])
            response = self._refused(request, _unavailable("the queue is unreachable", "redis"))
        except Exception as exc:
            log.error(
                "api_crashed", path=request.url.path, error=f"{type(exc).__name__}: {exc}"[:500]
            )
            response = json_response(
                ApiError(500, "internal error", type="server_error").body(), 500
            )
        self.metrics.observe(request.url.path, response.status_code, time.perf_counter() - started)
        return response

    def _refused(self, request: Request, exc: ApiError) -> Response:
        event = log.warning if exc.status >= 500 else log.info
        event(
            "api_refused",
            path=request.url.path,
            status=exc.status,
            code=exc.code,
            error=exc.message[:300],
        )
        return json_response(exc.body(), exc.status, exc.headers)

    def _limiter(self) -> RateLimiter:
        if self.limiter is None:
            raise ApiError(503, "starting", type="server_error", headers=_retry())
        return self.limiter

    async def _body(self, request: Request) -> bytes:
        """The body, refused with 413 past ``api_max_body_bytes`` (before reading it all)."""
        limit = self.settings.api_max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413, f"the body is {declared} bytes; the limit is {limit}", code="body_too_large"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"the body exceeds {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_model(self, model: str) -> None:
        if model and model.lower() not in self.model_names:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this deployment serves {self.model!r}",
                param="model",
                code="model_not_found",
            )

    async def _through_fleet(self, texts: list[str]) -> list[Answer]:
        """The fleet's answers, within this process's in-flight bound and the deadline."""
        if self.in_flight >= self.settings.api_max_in_flight:
            raise _unavailable("this gateway holds as many requests as it may", "overloaded")
        fleet = self.fleet
        if fleet is None:
            raise _unavailable("starting", "starting")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        started = time.perf_counter()
        try:
            answers = await fleet.embed(texts)
        except DeadlineExceeded as exc:
            raise _unavailable(
                f"no worker answered within {self.settings.api_timeout_s:g} s ({exc}): the "
                "fleet is down or saturated",
                "deadline_exceeded",
            ) from None
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
        self.metrics.queue_wait.observe(time.perf_counter() - started)
        refused = [a for a in answers if a.vector is None]
        if refused:
            raise ApiError(
                422,
                f"input[{refused[0].index}] could not be embedded: {refused[0].error}",
                param="input",
            )
        tokens = sum(a.tokens for a in answers)
        self.metrics.inputs.inc(len(answers))
        self.metrics.tokens.inc(tokens)
        return answers

    # -- endpoints -------------------------------------------------------------------

    async def embeddings(self, request: Request, headers: dict[str, str]) -> Response:
        asked = parse_embeddings(await self._body(request), self.bounds)
        self._check_model(asked.model)
        answers = await self._through_fleet(asked.inputs)
        data = [
            {
                "object": "embedding",
                "index": a.index,
                "embedding": _encoded(a, asked.encoding_format),
            }
            for a in answers
        ]
        tokens = sum(a.tokens for a in answers)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        body = {"object": "list", "data": data, "model": self.model, "usage": usage}
        return json_response(body, headers=headers)

    async def search(self, request: Request, headers: dict[str, str]) -> Response:
        asked = parse_search(await self._body(request), self.bounds)
        self._check_model(asked.model)
        answer = (await self._through_fleet([asked.query]))[0]
        assert answer.vector is not None  # refused answers raised above
        hits = await asyncio.to_thread(self._search, answer.vector, asked.k, asked.where)
        data = [{"id": h.id, "score": h.score, "text": h.text, "meta": h.meta} for h in hits]
        usage = {"prompt_tokens": answer.tokens, "total_tokens": answer.tokens}
        body = {"object": "list", "data": data, "model": self.model, "usage": usage}
        return json_response(body, headers=headers)

    def _search(self, vector: np.ndarray[Any, Any], k: int, where: str) -> list[Any]:
        try:
            if self.sink is None:
                self.sink = open_sink(self.settings, create=False)
            return self.sink.search(vector, k, where)
        except SinkRejected as exc:
            raise ApiError(
                422, f"search refused (check the filter): {exc}", param="filter"
            ) from None
        except CollectionMissing as exc:
            raise ApiError(404, str(exc), code="collection_not_found") from None
        except (InfrastructureError, ConfigError) as exc:
            log.warning("api_search_failed", error=str(exc)[:300])
            raise _unavailable(f"milvus cannot be searched now: {exc}", "milvus") from None

    async def ready(self) -> Response:
        try:
            if self.fleet is None:
                raise ApiError(503, "starting")
            await self.fleet.ping()
        except (InfrastructureError, ApiError) as exc:
            return json_response({"ready": False, "redis": str(exc)[:200]}, 503)
        return json_response({"ready": True, "redis": "ok", "auth": self.keyring.enabled})


def _retry() -> dict[str, str]:
    return {"retry-after": str(RETRY_AFTER_S)}


def _unavailable(message: str, code: str) -> ApiError:
    return ApiError(503, message, type="server_error", code=code, headers=_retry())


def _encoded(answer: Answer, encoding_format: str) -> Any:
    vector = answer.vector
    assert vector is not None
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector


def create_app(settings: Settings, *, sink: Sink | None = None) -> FastAPI:
    """The gateway as an ASGI app (``sink``: a Milvus client to search with, else opened on
    the first search from ``settings``)."""
    gateway = Gateway(settings, sink)
    app = FastAPI(
        title="embedq", lifespan=gateway.lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.gateway = gateway

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await gateway.serve(request, gateway.embeddings)

    @app.post("/v1/search")
    async def search(request: Request) -> Response:
        return await gateway.serve(request, gateway.search)

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"alive": True})

    @app.get("/readyz")
    async def readyz() -> Response:
        return await gateway.ready()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.exposition(), media_type="text/plain; version=0.0.4")

    return app
