"""The worker's decisions, against in-memory stand-ins (tests/support/stubs.py) and a tiny real
model: what is written, acked, split and dead-lettered, in milliseconds. The same paths
run for real against Redis and Milvus in test_pipeline, test_faults and test_dead_letters.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from embedq.core.backoff import Retrier
from embedq.core.records import Limits
from embedq.model.encoder import Encoder
from embedq.model.vector_cache import VectorCache
from embedq.worker.batcher import Batcher, BatchPolicy
from embedq.worker.heartbeat import InFlight
from embedq.worker.metrics import WorkerMetrics
from embedq.worker.model_stage import Encoding
from embedq.worker.pipeline import Stats
from embedq.worker.settler import Settler, isolate
from embedq.worker.write_order import Ordering

from .support.stubs import StubLedger, StubSink, StubStream

RAISES = "the velocity xⁿ grows"  # a token past the tiny model's embedding table


class Rig:
    """A batcher and a settler wired as ``embedq.worker.launch.assemble`` wires them."""

    def __init__(self, encoder: Encoder, sink: StubSink, cache: int = 0, **policy: Any) -> None:
        self.stream = StubStream()
        self.sink = sink
        self.ledger = StubLedger()
        self.stats = Stats()
        self.in_flight = InFlight()
        self.waits: list[float] = []
        metrics = WorkerMetrics()
        self.encoder = encoder
        retrying = Retrier(sleep=self.waits.append)
        self.settler = Settler(
            sink,  # type: ignore[arg-type]
            self.ledger,  # type: ignore[arg-type]
            # Ordering off here: the fenced write is Lua on a real Redis (test_ordering.py).
            ordering=Ordering(None, 60_000, retrying),
            retrying=retrying,
            in_flight=self.in_flight,
            metrics=metrics,
            stats=self.stats,
        )
        defaults: dict[str, Any] = {
            "limits": Limits(),
            "max_batch_tokens": 4096,
            "max_batch_rows": 64,
            "reject_overlong": False,
        }
        self.batcher = Batcher(
            encoder,
            BatchPolicy(**{**defaults, **policy}),
            dead_letter=self.settler.dead_letter,
            reject=self.settler.reject,
            metrics=metrics,
            stats=self.stats,
        )
        self.encoding = Encoding(VectorCache(cache), self.settler.reject, metrics, self.stats)
        self.metrics = metrics

    def run(self, *rows: dict[str, str]) -> list[str]:
        """Deliver ``rows`` as entries, then batch, encode (split on failure) and settle them,
        as the worker's stages do; returns the entry ids."""
        raw = ({k.encode(): v.encode() for k, v in r.items()} for r in rows)
        entries = self.stream.deliver(*raw)
        self.in_flight.add((self.stream.keys.stream, e.entry_id) for e in entries)
        for batch in self.batcher.batches(self.stream, entries):  # type: ignore[arg-type]
            self.encoding.encode(batch, self.encoder)
            self.settler.settle(batch)
        return [e.entry_id for e in entries]

    def reasons(self) -> dict[str, str]:
        return {eid: reason for eid, reason, _ in self.stream.dlq.moved}


def rows(n: int, prefix: str = "doc") -> list[dict[str, str]]:
    return [{"id": f"{prefix}-{i}", "text": f"text number {i} about sheep"} for i in range(n)]


def test_rows_are_written_before_their_entries_are_acked(tiny_encoder: Encoder) -> None:
    events: list[Any] = []
    rig = Rig(tiny_encoder, StubSink(events=events))
    rig.stream.events = events
    ids = rig.run(*rows(10))
    assert sorted(rig.stream.acked) == sorted(ids) and not rig.stream.pending
    assert set(rig.sink.rows) == {f"doc-{i}" for i in range(10)}
    first_ack = next(i for i, e in enumerate(events) if e[0] == "ack")
    assert all(e[0] == "write" for e in events[:first_ack]) and len(events[:first_ack]) == 10
    assert rig.ledger.embedded and rig.stats.texts == 10 and not rig.stream.dlq.moved


def test_an_outage_is_retried_and_nothing_is_acked_or_dead_lettered_meanwhile(
    tiny_encoder: Encoder,
) -> None:
    sink = StubSink()
    sink.outages = 3
    rig = Rig(tiny_encoder, sink)
    ids = rig.run(*rows(5))
    assert len(rig.waits) == 3  # three backoffs, then the write went through
    assert all(0 < w <= 30 for w in rig.waits)
    assert sorted(rig.stream.acked) == sorted(ids) and not rig.stream.dlq.moved
    # Why they were late is recorded for a reclaimer that may dead-letter them later.
    assert set(rig.stream.errors) == set(ids)


def test_a_row_milvus_refuses_is_isolated_and_only_it_is_dead_lettered(
    tiny_encoder: Encoder,
) -> None:
    rig = Rig(tiny_encoder, StubSink(reject=lambda row: row.id == "doc-13"))
    ids = rig.run(*rows(40))
    assert set(rig.sink.rows) == {f"doc-{i}" for i in range(40)} - {"doc-13"}
    assert list(rig.reasons().values()) == ["sink_rejected"]
    assert len(rig.stream.acked) == 39 and not rig.stream.pending
    assert rig.ledger.dead_lettered == [ids[13]] and rig.stats.dead_lettered == 1


def test_a_text_the_model_raises_on_is_isolated_and_the_rest_is_written(
    tiny_encoder: Encoder,
) -> None:
    rig = Rig(tiny_encoder, StubSink())
    batch = rows(12)
    batch[5] = {"id": "bad", "text": RAISES}
    ids = rig.run(*batch)
    assert rig.reasons() == {ids[5]: "encode_failed"}
    assert "bad" not in rig.sink.rows and len(rig.sink.rows) == 11
    assert not rig.stream.pending


def test_poison_entries_are_dead_lettered_with_their_reason_and_never_reach_the_sink(
    tiny_encoder: Encoder,
) -> None:
    rig = Rig(tiny_encoder, StubSink(), limits=Limits(max_text_bytes=100, max_meta_bytes=20))
    ids = rig.run(
        {"id": "ok", "text": "fine"},
        {"text": "no id"},
        {"id": "empty", "text": "   "},
        {"id": "meta", "text": "x", "meta": "[1, 2]"},
        {"id": "bigmeta", "text": "x", "meta": json.dumps({"k": "v" * 40})},
        {"id": "big", "text": "y" * 101},
    )
    assert rig.reasons() == {
        ids[1]: "missing_id",
        ids[2]: "empty_text",
        ids[3]: "meta_not_object",
        ids[4]: "meta_too_large",
        ids[5]: "text_too_large",
    }
    assert list(rig.sink.rows) == ["ok"] and not rig.stream.pending


def test_the_latest_entry_for_an_id_in_a_window_wins_and_the_older_is_acked_with_it(
    tiny_encoder: Encoder,
) -> None:
    rig = Rig(tiny_encoder, StubSink())
    ids = rig.run(
        {"id": "x", "text": "first version"},
        {"id": "y", "text": "other"},
        {"id": "x", "text": "second version"},
    )
    assert rig.sink.rows["x"].text == "second version"
    assert sorted(rig.stream.acked) == sorted(ids)


def test_overlong_texts_are_truncated_or_rejected_as_the_policy_says(
    tiny_encoder: Encoder,
) -> None:
    long_text = " ".join(["sheep"] * (tiny_encoder.max_seq_length + 10))
    kept = Rig(tiny_encoder, StubSink())
    kept.run({"id": "long", "text": long_text})
    assert "long" in kept.sink.rows and kept.stats.truncated == 1
    rejected = Rig(tiny_encoder, StubSink(), reject_overlong=True)
    ids = rejected.run({"id": "long", "text": long_text})
    assert rejected.reasons() == {ids[0]: "overlong"} and not rejected.sink.rows


@pytest.mark.parametrize("size", [1, 2, 7, 64])
def test_isolate_finds_every_culprit_and_keeps_the_order(size: int) -> None:
    from embedq.core.errors import SinkRejected

    bad = {0, size - 1, size // 2}

    def attempt(group: list[int]) -> int:
        if bad & set(group):
            raise SinkRejected("no")
        return len(group)

    out = list(isolate(list(range(size)), attempt, SinkRejected))  # type: ignore[arg-type]
    flat = [i for group, _ in out for i in group]
    assert flat == list(range(size))
    assert {g[0] for g, r in out if isinstance(r, SinkRejected)} == bad
    assert all(len(g) == 1 for g, r in out if isinstance(r, SinkRejected))


def test_vectors_reach_the_sink_unchanged(tiny_encoder: Encoder) -> None:
    rig = Rig(tiny_encoder, StubSink())
    rig.run({"id": "a", "text": "sheep in a field"})
    expected = tiny_encoder.encode(["sheep in a field"])[0]
    np.testing.assert_allclose(rig.sink.rows["a"].vector, expected, rtol=1e-5, atol=1e-6)


def test_a_valid_version_is_written_when_a_later_one_in_the_window_is_poison(
    tiny_encoder: Encoder,
) -> None:
    rig = Rig(tiny_encoder, StubSink(), reject_overlong=True)
    overlong = " ".join(["sheep"] * (tiny_encoder.max_seq_length + 10))
    ids = rig.run(
        {"id": "x", "text": "the valid version"},
        {"id": "x", "text": overlong},
        {"id": "x", "meta": "[not an object]", "text": "bad meta"},
    )
    assert rig.sink.rows["x"].text == "the valid version"
    assert rig.reasons() == {ids[1]: "overlong", ids[2]: "meta_not_object"}
    assert not rig.stream.pending


def test_hostile_meta_is_dead_lettered_and_the_window_still_lands(tiny_encoder: Encoder) -> None:
    rig = Rig(tiny_encoder, StubSink(), limits=Limits(max_meta_bytes=1_000_000))
    ids = rig.run(
        {"id": "deep", "text": "x", "meta": "[" * 60_000 + "]" * 60_000},
        {"id": "digits", "text": "x", "meta": '{"n": ' + "9" * 5000 + "}"},
        {"id": "good", "text": "a good text"},
    )
    assert rig.reasons() == {ids[0]: "meta_not_object", ids[1]: "meta_not_object"}
    assert list(rig.sink.rows) == ["good"] and not rig.stream.pending


def test_a_delete_travels_in_order_with_the_writes_of_its_window(tiny_encoder: Encoder) -> None:
    rig = Rig(tiny_encoder, StubSink())
    rig.run({"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"})
    rig.sink.deleted = []
    ids = rig.run(
        {"id": "a", "op": "delete"},
        {"id": "b", "op": "delete"},
        {"id": "b", "text": "beta again"},  # written after its delete: b stays
        {"id": "c", "op": "delete"},  # an absent id is fine
    )
    assert set(rig.sink.rows) == {"b"} and rig.sink.rows["b"].text == "beta again"
    assert sorted(rig.sink.deleted) == ["a", "c"]
    assert sorted(rig.stream.acked[-4:]) == sorted(ids) and not rig.stream.pending
    assert rig.stats.deleted == 2


def test_a_text_shared_by_thirty_ids_goes_through_the_model_once(tiny_encoder: Encoder) -> None:
    rig = Rig(tiny_encoder, StubSink(), cache=100)
    rig.run(*({"id": f"id-{i}", "text": "the same boilerplate footer"} for i in range(30)))
    assert len(rig.sink.rows) == 30
    assert rig.metrics.encoded_texts._value.get() == 1
    # Across windows too: the vector cache knows it.
    rig.run({"id": "id-30", "text": "the same boilerplate footer"})
    assert rig.metrics.encoded_texts._value.get() == 1 and len(rig.sink.rows) == 31
    first, last = rig.sink.rows["id-0"].vector, rig.sink.rows["id-30"].vector
    np.testing.assert_array_equal(first, last)


class StandIn:
    """The tiny model, failing as a GPU does on demand (a CPU cannot be made to hit a
    sticky CUDA error or a CUDA OOM): ``fail(rows)`` returns the exception a forward pass
    of that many rows raises, or None to run it. Errors go through the encoder's own
    classification (``model_error``), as torch's would."""

    def __init__(self, encoder: Encoder, fail: Any) -> None:
        self._encoder = encoder
        self._fail = fail
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def forward(self, batch: Any) -> Any:
        from embedq.model.encoder import model_error

        self.calls += 1
        exc = self._fail(len(batch))
        if exc is not None:
            raise model_error(exc)
        return self._encoder.forward(batch)


def test_a_cuda_oom_shrinks_the_batch_and_dead_letters_nothing(tiny_encoder: Encoder) -> None:
    import torch

    oom = StandIn(
        tiny_encoder,
        lambda rows: (
            torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
            if rows > 4
            else None
        ),
    )
    rig = Rig(oom, StubSink())  # type: ignore[arg-type]
    rig.run(*rows(24))
    assert len(rig.sink.rows) == 24 and not rig.stream.dlq.moved and not rig.stream.pending


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        MemoryError(),  # even one text does not fit
    ],
    ids=["sticky-cuda-error", "memory-for-one-text"],
)
def test_a_broken_device_stops_the_worker_and_dead_letters_nothing(
    tiny_encoder: Encoder, error: Exception
) -> None:
    from embedq.core.errors import DeviceFailed

    rig = Rig(StandIn(tiny_encoder, lambda _rows: error), StubSink())  # type: ignore[arg-type]
    with pytest.raises(DeviceFailed):
        rig.run(*rows(16))
    assert not rig.stream.dlq.moved and not rig.sink.rows
    assert len(rig.stream.pending) == 16  # left for a healthy worker


def test_an_error_that_hits_every_text_is_the_model_not_the_input(tiny_encoder: Encoder) -> None:
    """A model that fails on any input with an error that names no device (a corrupted
    checkpoint, a bug) must not empty the stream into the dead-letter stream."""
    from embedq.core.errors import DeviceFailed

    broken = StandIn(tiny_encoder, lambda _rows: ValueError("weights are NaN"))
    rig = Rig(broken, StubSink())  # type: ignore[arg-type]
    with pytest.raises(DeviceFailed, match="fails on any input"):
        rig.run(*rows(16))
    assert not rig.stream.dlq.moved and len(rig.stream.pending) == 16


def test_the_reported_rate_leaves_out_the_time_spent_waiting_for_work() -> None:
    import time

    stats = Stats()
    time.sleep(0.3)  # idle: nothing in the stream yet
    stats.read_some()
    time.sleep(0.1)
    stats.add(texts=10)
    summary = stats.as_dict()
    assert summary["elapsed_s"] >= 0.4
    assert 0.1 <= summary["working_s"] < 0.3
    assert summary["texts_per_s"] > 10 / 0.3  # not diluted by the idle 0.3 s


def test_a_read_window_shrinks_when_entries_are_large_and_grows_back() -> None:
    from embedq.queue.entries import Entry
    from embedq.worker.reader import ReadWindow

    window = ReadWindow(512, max_bytes=10_000_000)
    assert window.count() == 512
    huge = [Entry(f"1-{i}", {b"id": b"x", b"text": b"y" * 1_000_000}) for i in range(3)]
    window.saw(huge)
    assert window.count() == 9  # 10 MB / ~1 MB entries: the next read stays under the bound
    small = [Entry(f"2-{i}", {b"id": b"x", b"text": b"short"}) for i in range(100)]
    for _ in range(60):
        window.saw(small)
    assert window.count() == 512
    window.saw([Entry("3-0", {b"text": b"z" * 50_000_000})])
    assert window.count() == 1  # never zero
