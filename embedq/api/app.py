"""The gateway's HTTP API (FastAPI): OpenAI's ``POST /v1/embeddings``, ``POST /v1/search``,
and ``/healthz``, ``/readyz``, ``/metrics``.

No model here: every text goes through the fleet (``embedq.api.fleet``), so a query is
embedded by the same workers, model and hardware as the bulk data. Each request passes, in
order: the API key (401), the rate limit (429), this process's in-flight bound (503; the
body's read counts), the body's arrival (408 past ``--request-timeout``), size and shape
(413, 400, 422), the model name (404), then the fleet's deadline (503); each refusal is an
OpenAI-shaped JSON error and one log line, unknown routes and methods included. A client
that leaves before its body arrived is one ``api_client_left`` line, counted as 499.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from embedq.api.answers import encoded, served_model, truncated, within
from embedq.api.fleet import DeadlineExceeded, Fleet, connect_async
from embedq.api.limits import Keyring, RateLimiter, Tenant, load_keys_file
from embedq.api.requests import ApiError, Bounds, parse_embeddings, parse_search
from embedq.api.telemetry import USAGE_FIELDS, ApiMetrics, usage_key
from embedq.core.config import Settings
from embedq.core.errors import CollectionMissing, ConfigError, InfrastructureError, SinkRejected
from embedq.core.keys import Keys
from embedq.queue.connection import translated
from embedq.queue.online_wire import Answer
from embedq.sink import error_codes as milvus_errors
from embedq.sink.milvus import Sink, open_sink

log = structlog.get_logger("embedq.api")

CLIENT_CLOSED = 499  # nginx's status for a client that left before its answer
RETRY_AFTER_S = 1  # what a 503 tells clients to wait; the deadline already waited
COLLECTION_MODEL_TTL_S = 5.0  # how long the collection's recorded model is trusted
# Pauses before reading a missing collection's name again: `migrate --adopt` renames the
# collection and then creates the alias under its old name, so for a moment the name is
# nowhere (seen by a gateway answering through a rollout on Milvus 2.3.5: a 500 then).
NAME_MISSING_PAUSES_S = (0.0, 0.25, 1.0)
Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(content, status, headers, media_type="application/json")


class Gateway:
    """What the routes share: the fleet client, limits, metrics, the sink for search."""

    def __init__(self, settings: Settings, sink: Sink | None = None) -> None:
        self.settings = settings
        self.bounds = Bounds(settings.api_max_inputs, settings.api_max_input_bytes)
        tenants = load_keys_file(settings.api_keys_file) if settings.api_keys_file else None
        self.keyring = Keyring(settings.api_key_list, tenants)
        self.metrics = ApiMetrics()
        self.identity, names = served_model(settings)
        self.model = names[0]  # what answers and /v1/models say
        self.model_names = frozenset(n.lower() for n in names)
        self.sink = sink
        self.in_flight = 0
        self._collection_model: tuple[float, str, str, int, str] = (0.0, "", "", 0, "")
        self.fleet: Fleet | None = None
        self.limiter: RateLimiter | None = None

    @asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        client = connect_async(self.settings)  # bound to this event loop
        self.fleet = Fleet(client, self.settings, self.identity)
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
            fingerprint=self.identity.fingerprint or None,
            api_keys=len(s.api_key_list),
            rate_limit=s.api_rate_limit,
            timeout_s=s.api_timeout_s,
        )

    # -- around every request ------------------------------------------------------

    async def serve(self, request: Request, handler: Handler) -> Response:
        """Run ``handler``; errors become their JSON answers, everything is counted."""
        started = time.perf_counter()
        held = False
        try:
            caller = self.keyring.caller(
                request.headers.get("authorization"), request.client.host if request.client else ""
            )
            tenant = self.keyring.tenant(caller)
            request.state.tenant = tenant
            headers = await self._limiter().check(caller, tenant)
            held = self._hold()  # before the body is read: a slow body holds a slot too
            response = await handler(request, headers)
            await self._meter(request, tenant)
        except ClientDisconnect:
            log.info(
                "api_client_left",
                path=request.url.path,
                status=CLIENT_CLOSED,
                why="the client closed the connection before its request was read",
            )
            body = ApiError(CLIENT_CLOSED, "client closed request", code="client_closed").body()
            response = json_response(body, CLIENT_CLOSED)  # nobody reads it; counted as 499
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
        finally:
            if held:
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)
        self.metrics.observe(request.url.path, response.status_code, time.perf_counter() - started)
        return response

    async def _meter(self, request: Request, tenant: Tenant | None) -> None:
        """Count what the request embedded by key name (never the key): Prometheus here,
        and a hash in Redis all gateways share (``embedq usage``)."""
        used: tuple[int, int] | None = getattr(request.state, "usage", None)
        if used is None or self.fleet is None:
            return
        name = tenant.name if tenant else "anonymous"
        self.metrics.meter(name, *used)
        key = usage_key(Keys(self.settings.stream).base)
        pipe = self.fleet.client.pipeline(transaction=False)
        for field, value in zip(USAGE_FIELDS, (1, *used), strict=True):
            pipe.hincrby(key, f"{name}\t{field}", value)
        try:
            with translated("HINCRBY usage"):
                await pipe.execute()
        except InfrastructureError as exc:  # the answer is made; the meter lags
            log.warning("api_usage_unrecorded", key=name, error=str(exc)[:200])

    def _hold(self) -> bool:
        """Take one of ``--max-in-flight`` slots (503 when none is left)."""
        if self.in_flight >= self.settings.api_max_in_flight:
            raise _unavailable("this gateway holds as many requests as it may", "overloaded")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        return True

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

    def routing_error(self, request: Request, status: int, headers: dict[str, str]) -> Response:
        """404, 405 and the like (no route, another method) in OpenAI's error shape."""
        method, path = request.method, request.url.path
        if status == 404:
            error = ApiError(404, f"no route {path}: see /v1/embeddings", code="not_found")
        elif status == 405:
            allowed = headers.get("allow", "")
            error = ApiError(
                405,
                f"{method} is not allowed on {path}" + (f"; use {allowed}" if allowed else ""),
                code="method_not_allowed",
            )
        else:
            error = ApiError(status, f"{method} {path} cannot be answered", code="invalid_request")
        error.headers = {"allow": headers["allow"]} if "allow" in headers else {}
        self.metrics.observe(path, status, 0.0)
        return self._refused(request, error)

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
        wait_s = self.settings.api_timeout_s
        try:
            async with asyncio.timeout(wait_s):  # a client trickling its body is cut off
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(
                            413, f"the body exceeds {limit} bytes", code="body_too_large"
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(
                408, f"the body did not arrive within {wait_s:g} s", code="body_timeout"
            ) from None
        return b"".join(chunks)

    def _check_model(self, model: str) -> None:
        if model and model.lower() not in self.model_names:
            raise ApiError(
                404,
                f"model {model!r} is not served here; this deployment serves {self.model!r}",
                param="model",
                code="model_not_found",
            )

    async def _through_fleet(
        self, texts: list[str], request: Request | None = None
    ) -> list[Answer]:
        """The fleet's answers, within the deadline (the request holds its in-flight slot)."""
        fleet = self.fleet
        if fleet is None:
            raise _unavailable("starting", "starting")
        started = time.perf_counter()
        try:
            answers = await fleet.embed(texts)
        except DeadlineExceeded as exc:
            raise _unavailable(
                f"no worker answered within {self.settings.api_timeout_s:g} s ({exc}): the "
                "fleet is down or saturated",
                "deadline_exceeded",
            ) from None
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
        if request is not None:
            request.state.usage = (len(answers), tokens)
        return answers

    def _shortened(self, answers: list[Answer], dimensions: int) -> list[Answer]:
        """``dimensions`` honoured: the model's own size as it is; a smaller one truncated
        and renormalised (as ``--dimensions``) where the model declares Matryoshka
        training; anything else a 422."""
        width = len(answers[0].vector) if answers and answers[0].vector is not None else 0
        if not dimensions or dimensions == width:
            return answers
        if dimensions > width:
            raise ApiError(
                422,
                f"dimensions {dimensions}: {self.model} makes {width}-dimensional vectors",
                param="dimensions",
            )
        if not self.identity.matryoshka:
            raise ApiError(
                422,
                f"dimensions {dimensions}: {self.model} is not trained for shortened vectors "
                f"(no Matryoshka tag in its model card); it makes {width} dimensions",
                param="dimensions",
            )
        return [dataclasses.replace(a, vector=truncated(a.vector, dimensions)) for a in answers]

    # -- endpoints -------------------------------------------------------------------

    async def embeddings(self, request: Request, headers: dict[str, str]) -> Response:
        asked = parse_embeddings(await self._body(request), self.bounds)
        self._check_model(asked.model)
        answers = self._shortened(
            await self._through_fleet(asked.inputs, request), asked.dimensions
        )
        data = [
            {
                "object": "embedding",
                "index": a.index,
                "embedding": encoded(a, asked.encoding_format),
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
        answer = (await self._through_fleet([asked.query], request))[0]
        assert answer.vector is not None  # refused answers raised above
        tenant: Tenant | None = getattr(request.state, "tenant", None)
        scope = tenant.filter if tenant else ""
        hits = await asyncio.to_thread(self._search, answer.vector, asked.k, asked.where, scope)
        data = [{"id": h.id, "score": h.score, "text": h.text, "meta": h.meta} for h in hits]
        usage = {"prompt_tokens": answer.tokens, "total_tokens": answer.tokens}
        body = {"object": "list", "data": data, "model": self.model, "usage": usage}
        return json_response(body, headers=headers)

    def _search(
        self, vector: np.ndarray[Any, Any], k: int, where: str, scope: str = ""
    ) -> list[Any]:
        """The hits for ``where`` within the key's ``scope``: ANDed around the client's
        filter (parenthesised), then every hit checked against ``scope`` alone, so no
        client filter (unbalanced parentheses included) can reach another tenant's row."""
        try:
            if self.sink is None:
                self.sink = open_sink(self.settings, create=False)
            for pause_s in NAME_MISSING_PAUSES_S:
                try:
                    return self._search_checked(self.sink, vector, k, where, scope)
                except CollectionMissing:
                    # The collection the alias named at the last check was dropped since
                    # (--drop-old), or the name is between a rename and its alias
                    # (``migrate --adopt``): the name is read again, after a pause.
                    self._collection_model = (0.0, "", "", 0, "")
                    time.sleep(pause_s)
            return self._search_checked(self.sink, vector, k, where, scope)
        except SinkRejected as exc:
            if not where:  # nothing of the client's to blame
                log.warning("api_search_refused", error=str(exc)[:300])
                raise _unavailable(
                    "the collection refused this model's query vector", "model_mismatch"
                ) from None
            log.info("api_filter_refused", error=str(exc)[:500])  # the details stay here
            raise ApiError(
                422,
                "the filter is not a valid expression over id, text and meta "
                '(e.g. meta["lang"] == "en" and id in ["a", "b"])',
                param="filter",
                code="invalid_filter",
            ) from None
        except CollectionMissing as exc:
            raise ApiError(404, str(exc), code="collection_not_found") from None
        except (InfrastructureError, ConfigError) as exc:
            log.warning("api_search_failed", error=str(exc)[:300])
            raise _unavailable(f"milvus cannot be searched now: {exc}", "milvus") from None

    def _search_checked(
        self, sink: Sink, vector: np.ndarray[Any, Any], k: int, where: str, scope: str
    ) -> list[Any]:
        """``_search`` on the collection the alias named at the check, never through the
        alias: within the check's TTL the alias may move to the other model's collection."""
        collection = self._check_collection_model(sink, len(vector))
        searched = sink if collection in ("", sink.collection) else sink.sibling(collection)
        if not scope:
            return searched.search(vector, k, where)
        confined = f"({scope}) and ({where})" if where else f"({scope})"
        return within(searched, searched.search(vector, k, confined), scope)

    def _check_collection_model(self, sink: Sink, dimension: int) -> str:
        """Refuse (503, never the client's fault) to search a collection that holds another
        model's vectors (or another backend variant's: ``--backend``/``--quantize``):
        during a rollout the alias may name the other model's collection. The collection's
        recorded model is read at most every ``COLLECTION_MODEL_TTL_S``; the collection the
        name stands for (an alias's) is returned, to be searched by name."""
        now = time.monotonic()
        if now >= self._collection_model[0]:
            with milvus_errors.translated("describe collection"):
                info = sink.client.describe_collection(sink.collection, timeout=sink.timeout_s)
            properties = info.get("properties") or {}
            fields = {f.get("name"): f for f in info.get("fields", [])}
            width = (fields.get("vector") or {}).get("params", {}).get("dim", 0)
            self._collection_model = (
                now + COLLECTION_MODEL_TTL_S,
                str(properties.get("embedq.fingerprint", "")),
                str(properties.get("embedq.model", "")),
                int(width or 0),
                str(info.get("collection_name") or ""),
            )
        _, recorded, name, width, physical = self._collection_model
        # Workers record their index fingerprint (backend variant included), so that one
        # is compared: an fp32 gateway never searches an int8 index with its queries.
        mine = self.identity.index_fingerprint
        if (recorded and mine and recorded != mine) or (width and width != dimension):
            raise _unavailable(
                f"collection {sink.collection} holds vectors of model {name or '?'} "
                f"({recorded or f'{width} dimensions'}); this gateway serves {self.model} "
                f"({mine or f'{dimension} dimensions'}): point a gateway of that model at it",
                "model_mismatch",
            )
        return physical

    async def models(self, _request: Request, headers: dict[str, str]) -> Response:
        """``GET /v1/models`` in OpenAI's shape: the model this gateway serves."""
        data = [{"id": self.model, "object": "model", "created": 0, "owned_by": "embedq"}]
        return json_response({"object": "list", "data": data}, headers=headers)

    async def ready(self) -> Response:
        """Ready is about this gateway (its Redis); the body also says how many workers
        serve its model on the lane now (0: requests wait for one, then 503)."""
        try:
            if self.fleet is None:
                raise ApiError(503, "starting")
            await self.fleet.ping()
            workers, others = await self.fleet.workers()
        except (InfrastructureError, ApiError) as exc:
            return json_response({"ready": False, "redis": str(exc)[:200]}, 503)
        body = {"ready": True, "redis": "ok", "auth": self.keyring.enabled, "model": self.model}
        body |= {"workers": workers, "other_model_workers": others}
        return json_response(body)


def _retry() -> dict[str, str]:
    return {"retry-after": str(RETRY_AFTER_S)}


def _unavailable(message: str, code: str) -> ApiError:
    return ApiError(503, message, type="server_error", code=code, headers=_retry())


def create_app(settings: Settings, *, sink: Sink | None = None) -> FastAPI:
    """The gateway as an ASGI app (``sink``: a Milvus client to search with, else opened on
    the first search from ``settings``)."""
    gateway = Gateway(settings, sink)
    app = FastAPI(
        title="embedq", lifespan=gateway.lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.gateway = gateway

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
        return gateway.routing_error(request, exc.status_code, headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, _exc: RequestValidationError) -> Response:
        return gateway.routing_error(request, 422, {})

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        return await gateway.serve(request, gateway.embeddings)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await gateway.serve(request, gateway.models)

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
