"""Asking a running gateway instead of loading the model: ``embedq search --gateway URL``
sends ``POST /v1/search`` and prints the hits, in the time of one request (the local path
imports torch and loads the model first: docs/operations.md, "Searching").

The standard library's HTTP client: a command that exists to answer fast does not import
an HTTP stack for one request.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from embedq.core.config import redact_url
from embedq.core.errors import ConfigError, GatewayUnavailable
from embedq.sink.milvus import Hit

SEARCH_PATH = "/v1/search"


def search(url: str, key: str, query: str, k: int, *, timeout_s: float) -> list[Hit]:
    """The ``k`` nearest stored entries to ``query``, as the gateway at ``url`` finds them
    (with its workers' model). A refusal the caller must fix (a wrong key, a bad request)
    is a ``ConfigError``; no answer, or a 5xx, is ``GatewayUnavailable``."""
    shown = redact_url(url)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--gateway {shown}: give the gateway's http:// or https:// URL")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    # The scheme is checked above: no file:// or custom scheme reaches urllib.
    request = urllib.request.Request(  # noqa: S310
        url.rstrip("/") + SEARCH_PATH,
        data=json.dumps({"query": query, "k": k}).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            answer: Any = json.load(response)
    except urllib.error.HTTPError as exc:
        said = f"the gateway at {shown} answered {exc.code}: {_message(exc)}"
        if exc.code >= 500:
            raise GatewayUnavailable(said) from None
        raise ConfigError(said) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GatewayUnavailable(
            f"gateway unavailable at {shown}: {reason} (is `embedq serve` running there?)"
        ) from None
    return [_hit(row) for row in answer.get("data", [])]


def _hit(row: dict[str, Any]) -> Hit:
    return Hit(
        id=str(row["id"]), score=float(row["score"]), text=row.get("text"), meta=row.get("meta")
    )


def _message(exc: urllib.error.HTTPError) -> str:
    """The ``error.message`` of an OpenAI-shaped error body, else the status's reason."""
    try:
        body = json.loads(exc.read() or b"{}")
        return str(body["error"]["message"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(exc.reason)
