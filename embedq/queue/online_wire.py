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
``model``        the fingerprint of the model the gateway serves ("" when it does not know
                 it: then ``model_name`` decides); a worker of another model answers
                 ``MISMATCH`` without encoding, and the gateway sends the input again
``model_name``   the served model's name

An answer is one list element: a 19-byte header (kind, index, tokens, the answering
model's fingerprint as 8 raw bytes, its name's length; little-endian), the model's name
(UTF-8), then the vector as raw float32 bytes (kind ``OK``), or a UTF-8 message (kind
``FAILED``: the model refused that text; ``MISMATCH``: not this worker's model). Every
answer names the model that made it, so the gateway never returns (or labels) another
model's vector. Raw bytes, not JSON floats: a 384-dimension vector is 1.5 KiB instead of
~8 KiB of text, and decoding it is a copy (as ArcticInference does).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_HEADER = struct.Struct("<BII8sH")
OK, FAILED, MISMATCH = 0, 1, 2


@dataclass(frozen=True)
class Answer:
    """One input's answer as the gateway reads it."""

    index: int
    tokens: int
    vector: npt.NDArray[np.float32] | None  # None when the model refused the text
    error: str = ""
    fingerprint: str = ""  # the answering model's (16 hex digits; "" when it has none)
    model: str = ""  # the answering model's name
    mismatch: bool = False  # the worker serves another model and did not encode it


@dataclass(frozen=True)
class Stamp:
    """The model identity a worker stamps on its answers."""

    name: str
    fingerprint: str

    def header(self, kind: int, index: int, tokens: int) -> bytes:
        name = self.name.encode("utf-8", "replace")[:1000]
        return _HEADER.pack(kind, index, tokens, _fp_bytes(self.fingerprint), len(name)) + name

    def serves(self, fields: Mapping[bytes, bytes]) -> bool:
        """True unless the entry asks for another model (by fingerprint, else by name)."""
        wanted = fields.get(b"model", b"").decode("ascii", "replace")
        if wanted:
            return wanted == self.fingerprint
        name = fields.get(b"model_name", b"").decode("utf-8", "replace")
        return not name or name == self.name


def _fp_bytes(fingerprint: str) -> bytes:
    try:
        return bytes.fromhex(fingerprint)[:8].ljust(8, b"\0")
    except ValueError:
        return b"\0" * 8


def entry_fields(
    request_id: str,
    index: int,
    text: str,
    reply: str,
    deadline_ms: int,
    *,
    model: tuple[str, str] = ("", ""),
) -> dict[str, str]:
    """The lane entry for input ``index`` of a request, for ``model`` (name, fingerprint)."""
    return {
        "id": f"{request_id}:{index}",
        "text": text,
        "reply": reply,
        "index": str(index),
        "deadline_ms": str(deadline_ms),
        "model": model[1],
        "model_name": model[0],
    }


def workers_key(lane: str) -> str:
    """The sorted set of the workers serving ``lane`` (the lane's hash slot): a member per
    worker, ``<fingerprint>|<consumer>|<model name>``, scored by the Unix time (ms) its
    record lapses; each worker renews its own at every heartbeat."""
    return f"{lane}:workers"


def worker_member(stamp: Stamp, consumer: str) -> str:
    return f"{stamp.fingerprint}|{consumer}|{stamp.name}"


def parse_member(member: str) -> tuple[str, str, str]:
    """(fingerprint, consumer, name) of a ``workers_key`` member."""
    fingerprint, _, rest = member.partition("|")
    consumer, _, name = rest.partition("|")
    return fingerprint, consumer, name


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


def pack_reply(stamp: Stamp, index: int, tokens: int, vector: npt.NDArray[np.float32]) -> bytes:
    return stamp.header(OK, index, tokens) + np.ascontiguousarray(vector, dtype="<f4").tobytes()


def pack_failure(stamp: Stamp, index: int, error: str) -> bytes:
    return stamp.header(FAILED, index, 0) + error.encode("utf-8", "replace")[:1000]


def pack_mismatch(stamp: Stamp, index: int) -> bytes:
    return stamp.header(MISMATCH, index, 0) + b"not this worker's model"


def unpack_reply(raw: bytes) -> Answer:
    kind, index, tokens, fp, name_len = _HEADER.unpack_from(raw)
    start = _HEADER.size + name_len
    name = raw[_HEADER.size : start].decode("utf-8", "replace")
    fingerprint = fp.hex() if fp != b"\0" * 8 else ""
    body = raw[start:]
    if kind == OK:
        vector = np.frombuffer(body, dtype="<f4").astype(np.float32)
        return Answer(index, tokens, vector, fingerprint=fingerprint, model=name)
    error = body.decode("utf-8", "replace")
    return Answer(index, tokens, None, error, fingerprint, name, mismatch=kind == MISMATCH)
