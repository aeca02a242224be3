"""A collection's Redis index belongs to one incarnation of it (issue 26).

Workers started together on a collection that does not exist yet race to create it; the
loser opens the winner's collection and may write (and record in the index) before the
winner reaches the step that empties an index a dropped collection of the same name left.
That step used to be a plain DEL: it erased the loser's records, and ``embedq verify``
then reported those rows "unknown" (the scripted rollout's 543 of 1,864 rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from embedq.core.keys import Keys
from embedq.model.encoder import Encoder
from embedq.ops.verify import verify
from embedq.queue.stream import Stream
from embedq.queue.versions import Versions, Written
from embedq.sink.milvus import Sink, open_sink
from embedq.worker.launch import assemble

from .conftest import corpus_rows
from .test_hostile import local


def test_a_worker_that_starts_beside_the_creator_keeps_what_it_recorded(
    redis_client: redis.Redis,
    stream_name: str,
    tmp_path: Path,
    encoder: Encoder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = corpus_rows("short.jsonl", 10)
    for row in rows:
        redis_client.xadd(stream_name, {"id": row["id"], "text": row["text"]})
    settings = local(stream_name, tmp_path, collection="raced")
    creator = open_sink(settings)
    beside = creator.sibling(settings.collection)  # one connection per Milvus Lite file
    create = creator.ensure_for

    def created_then_the_other_worker_writes(*args: Any, **kwargs: Any) -> bool:
        # The creator's prepare, paused right after the collection appeared: the worker
        # that lost the race opens it and drains the stream meanwhile.
        created = create(*args, **kwargs)
        other = Stream(redis_client, stream_name, "g", "c2")
        assert assemble(settings, other, encoder, beside).run().texts == len(rows)
        return created

    monkeypatch.setattr(creator, "ensure_for", created_then_the_other_worker_writes)
    try:
        assemble(settings, Stream(redis_client, stream_name, "g", "c1"), encoder, creator).run()
        assert creator.incarnation  # it did create the collection
        drift, _ = verify([Stream(redis_client, stream_name, "g", "v")], creator)
    finally:
        creator.close()
    assert (drift.rows, drift.indexed) == (len(rows), len(rows))
    assert drift.clean, drift.as_dict()


def _recorded(client: redis.Redis, keys: Keys, collection: str, doc_id: str) -> Versions:
    versions = Versions(client, keys, collection)
    versions.acquire("w", 60_000, [(doc_id, "1-0")])
    versions.settle("", "w", [Written(doc_id, "1-0", "hash")], [])
    return versions


def test_an_index_is_emptied_once_per_incarnation_and_only_for_a_new_one(
    redis_client: redis.Redis, stream_name: str
) -> None:
    keys = Keys(stream_name)  # stream_name's fixture deletes every key under it
    # An index from before incarnations, on a collection that exists: kept.
    versions = _recorded(redis_client, keys, "c", "a")
    assert versions.own("first", created=False) is False
    assert versions.held(["a"])[0] is not None
    # The creator of the same incarnation, later: kept.
    assert versions.own("first", created=True) is False
    assert versions.held(["a"])[0] is not None
    # A collection dropped and made again: emptied, by whichever worker comes first,
    # and only once.
    assert versions.own("second", created=False) is True
    assert versions.held(["a"]) == [None]
    _recorded(redis_client, keys, "c", "b")
    assert versions.own("second", created=True) is False
    assert versions.held(["b"])[0] is not None
    # No index recorded for a collection made just now: whatever is there is stale.
    fresh = _recorded(redis_client, keys, "d", "x")
    assert fresh.own("third", created=True) is True
    assert fresh.held(["x"]) == [None]


def test_a_sink_that_opens_a_collection_sees_the_incarnation_its_creator_made(
    tmp_path: Path, encoder: Encoder
) -> None:
    first = Sink(str(tmp_path / "m.db"), "", "inc", timeout_s=30)
    try:
        assert first.ensure_for(encoder) is True
        again = first.sibling("inc")
        assert again.ensure_for(encoder) is False
        assert again.incarnation == first.incarnation != ""
    finally:
        first.close()
