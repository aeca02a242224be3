"""What the gateway accepts: request bodies checked against OpenAI's embeddings API (and
embedq's search), each refusal an ``ApiError`` with its HTTP status and a clear message.

Statuses: 400 a body that is not JSON (or not an object), 413 too many inputs or too many
bytes (a filter longer than ``MAX_FILTER_BYTES`` included), 422 a value of the wrong kind
(an empty input, an item that is not a string, a lone surrogate that is no Unicode text,
an unknown ``encoding_format``), 404 a ``model`` this deployment does not serve.
"""

from __future__ import annotations

import json
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

ENCODING_FORMATS = ("float", "base64")
MAX_K = 1000
MAX_FILTER_BYTES = 16_384  # a search filter's UTF-8 bytes: an id list this long is not a query


@dataclass
class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    status: int
    message: str
    _: KW_ONLY
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class Bounds:
    max_inputs: int
    max_input_bytes: int


@dataclass(frozen=True)
class EmbeddingsRequest:
    inputs: list[str]
    model: str
    encoding_format: str
    dimensions: int = 0  # 0: the model's own size


@dataclass(frozen=True)
class SearchRequest:
    query: str
    model: str
    k: int
    where: str


def _object(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return parsed


def _text(value: Any, param: str, bounds: Bounds) -> str:
    if not isinstance(value, str):
        kind = "a list of token ids" if isinstance(value, int) else type(value).__name__
        raise ApiError(
            422,
            f"{param} must be a string, got {kind} (token arrays are not accepted)",
            param=param,
        )
    if not value.strip():
        raise ApiError(422, f"{param} is empty: send text to embed", param=param)
    _unicode(value, param)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > bounds.max_input_bytes:
        raise ApiError(
            413,
            f"{param} is {size} bytes; the limit is {bounds.max_input_bytes} per input",
            param=param,
            code="input_too_large",
        )
    return value


def _unicode(value: str, param: str) -> None:
    """Refuse a lone surrogate (JSON allows ``"\\ud800"``; UTF-8 cannot carry it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(
            422,
            f"{param} holds a lone surrogate (U+{ord(value[exc.start]):04X}) at character "
            f"{exc.start}: not valid Unicode text",
            param=param,
            code="invalid_unicode",
        ) from None


def _inputs(value: Any, bounds: Bounds) -> list[str]:
    if value is None:
        raise ApiError(422, "input is required: a string or a list of strings", param="input")
    if isinstance(value, str):
        return [_text(value, "input", bounds)]
    if not isinstance(value, list):
        raise ApiError(422, "input must be a string or a list of strings", param="input")
    if not value:
        raise ApiError(422, "input is an empty list: send at least one text", param="input")
    if len(value) > bounds.max_inputs:
        raise ApiError(
            413,
            f"input has {len(value)} items; the limit is {bounds.max_inputs} per request",
            param="input",
            code="too_many_inputs",
        )
    return [_text(v, f"input[{i}]", bounds) for i, v in enumerate(value)]


def _model(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(422, "model must be a string", param="model")
    return value


def parse_embeddings(body: bytes, bounds: Bounds) -> EmbeddingsRequest:
    """``POST /v1/embeddings``: ``input``, ``model``, ``encoding_format``, ``dimensions``
    (checked against the model's vectors by the gateway; ``user`` and other fields OpenAI
    defines are accepted and ignored)."""
    data = _object(body)
    encoding = data.get("encoding_format") or "float"
    if encoding not in ENCODING_FORMATS:
        raise ApiError(
            422,
            f"encoding_format must be float or base64, got {encoding!r}",
            param="encoding_format",
        )
    dimensions = data.get("dimensions")
    if dimensions is not None and (
        isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1
    ):
        raise ApiError(422, "dimensions must be a positive integer", param="dimensions")
    return EmbeddingsRequest(
        _inputs(data.get("input"), bounds), _model(data.get("model")), encoding, dimensions or 0
    )


def parse_search(body: bytes, bounds: Bounds) -> SearchRequest:
    """``POST /v1/search``: ``query``, ``k`` (default 5), ``filter`` (a Milvus boolean
    expression over ``id``, ``text`` and ``meta``, e.g. ``meta["lang"] == "en"``)."""
    data = _object(body)
    k = data.get("k", 5)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ApiError(422, f"k must be an integer from 1 to {MAX_K}", param="k")
    where = data.get("filter") or ""
    if not isinstance(where, str):
        raise ApiError(422, "filter must be a string (a Milvus expression)", param="filter")
    _unicode(where, "filter")
    if len(where.encode("utf-8")) > MAX_FILTER_BYTES:
        raise ApiError(
            413,
            f"filter is {len(where.encode('utf-8'))} bytes; the limit is {MAX_FILTER_BYTES}",
            param="filter",
            code="filter_too_large",
        )
    query = _text(data.get("query"), "query", bounds)
    return SearchRequest(query, _model(data.get("model")), k, where)
