"""The interactive lane's wire format, shared by the gateway (``embedq.api``) and the
workers (``embedq.worker.lane``).

An online request becomes one lane entry per input (``embedq.core.keys.lane_stream``), so the
worker's batcher packs queries by tokens like any text. Its fields:

``id``           ``<request id>:<index>`` (unique: nothing to supersede, nothing in Milvus)
``text``         the input
``reply``        the request's reply list (``Keys.reply``), where the answer goes
``index``        the input's position in the request
``deadline_ms``  Unix time (ms) after which nobody waits for the answer: a worker acks the
                 entry without encoding it

An answer is one list element: a 9-byte header (kind, index, tokens; little-endian) and
then the vector as raw float32 bytes (kind ``OK``), or a UTF-8 message (kind ``FAILED``:
the model refused that text). Raw bytes, not JSON floats: a 384-dimension vector is
1.5 KiB instead of ~8 KiB of text, and decoding it is a copy (as ArcticInference does).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_HEADER = struct.Struct("<BII")
OK, FAILED = 0, 1


@dataclass(frozen=True)
class Answer:
    """One input's answer as the gateway reads it."""

    index: int
    tokens: int
    vector: npt.NDArray[np.float32] | None  # None when the model refused the text
    error: str = ""


def entry_fields(
    request_id: str, index: int, text: str, reply: str, deadline_ms: int
) -> dict[str, str]:
    """The lane entry for input ``index`` of a request."""
    return {
        "id": f"{request_id}:{index}",
        "text": text,
        "reply": reply,
        "index": str(index),
        "deadline_ms": str(deadline_ms),
    }


def now_ms() -> int:
    return int(time.time() * 1000)


def expired(fields: Mapping[bytes, bytes], at_ms: int | None = None) -> bool:
    """True when the entry's request is past its deadline (or the entry has none that can
    be read: nobody can be waiting for it)."""
    try:
        deadline = int(fields.get(b"deadline_ms", b""))
    except ValueError:
        return True
    return deadline <= (now_ms() if at_ms is None else at_ms)


def reply_key(fields: Mapping[bytes, bytes]) -> str:
    return fields.get(b"reply", b"").decode("utf-8", "replace")


def index_of(fields: Mapping[bytes, bytes]) -> int:
    try:
        return int(fields.get(b"index", b"0"))
    except ValueError:
        return 0


def pack_reply(index: int, tokens: int, vector: npt.NDArray[np.float32]) -> bytes:
    return _HEADER.pack(OK, index, tokens) + np.ascontiguousarray(vector, dtype="<f4").tobytes()


def pack_failure(index: int, error: str) -> bytes:
    return _HEADER.pack(FAILED, index, 0) + error.encode("utf-8", "replace")[:1000]


def unpack_reply(raw: bytes) -> Answer:
    kind, index, tokens = _HEADER.unpack_from(raw)
    body = raw[_HEADER.size :]
    if kind == OK:
        return Answer(index, tokens, np.frombuffer(body, dtype="<f4").astype(np.float32))
    return Answer(index, tokens, None, body.decode("utf-8", "replace"))
