"""The stream contract's checks, entry by entry (no Redis needed)."""

from __future__ import annotations

import pytest

from embedq.core.errors import PoisonInput
from embedq.core.records import MAX_ID_BYTES, Limits, Record, decode

LIMITS = Limits(max_text_bytes=1000, max_meta_bytes=100)


def test_good_entry_decodes_with_meta_and_job() -> None:
    record = decode(
        {b"id": b"doc-1", b"text": "héllo".encode(), b"meta": b'{"a": 1}', b"job": b"j1"}, LIMITS
    )
    assert record == Record(id="doc-1", text="héllo", meta={"a": 1}, job="j1")


def test_record_round_trips_through_fields() -> None:
    record = Record(id="x", text="t", meta={"k": ["v"]}, job="j")
    fields = {k.encode(): v.encode() for k, v in record.to_fields().items()}
    assert decode(fields, LIMITS) == record


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, "payload_deleted"),
        ({b"text": b"t"}, "missing_id"),
        ({b"id": b"", b"text": b"t"}, "missing_id"),
        ({b"id": b"x" * (MAX_ID_BYTES + 1), b"text": b"t"}, "id_too_long"),
        ({b"id": b"\xff\xfe", b"text": b"t"}, "invalid_utf8"),
        ({b"id": b"a"}, "missing_text"),
        ({b"id": b"a", b"text": b"caf\xe9"}, "invalid_utf8"),
        ({b"id": b"a", b"text": b""}, "empty_text"),
        ({b"id": b"a", b"text": b" \n\t "}, "empty_text"),
        # Unicode whitespace only (ideographic, no-break, em space, NEL): blank as well.
        ({b"id": b"a", b"text": "\u3000\u00a0\u2003\x85\x0b".encode()}, "empty_text"),
        ({b"id": b"a", b"text": b"x" * 1001}, "text_too_large"),
        ({b"id": b"a", b"text": b"t", b"meta": b"[1, 2]"}, "meta_not_object"),
        ({b"id": b"a", b"text": b"t", b"meta": b"{nope"}, "meta_not_object"),
        ({b"id": b"a", b"text": b"t", b"meta": b'"s"'}, "meta_not_object"),
        ({b"id": b"a", b"text": b"t", b"meta": b'{"k": "' + b"v" * 200 + b'"}'}, "meta_too_large"),
    ],
)
def test_bad_entries_raise_poison_with_a_distinct_reason(
    fields: dict[bytes, bytes], reason: str
) -> None:
    with pytest.raises(PoisonInput) as caught:
        decode(fields, LIMITS)
    assert caught.value.reason == reason
