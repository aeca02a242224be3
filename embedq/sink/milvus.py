"""The vector store: Milvus (Lite file, standalone or distributed), written with upsert.

Upsert keyed by the producer's id makes every write idempotent: a redelivered entry
overwrites its own row instead of adding a second one (a plain insert would not). Every
call carries a timeout shorter than the reclaim threshold, because pymilvus otherwise
retries for minutes while the entries it holds look abandoned.

What the model makes decides the fields: ``vector`` (dense), ``sparse``
(SPARSE_FLOAT_VECTOR, inverted index, inner product), or both. The collection records the
model's name and fingerprint (``embedq.fingerprint``) in its properties, and a writer with
another model is refused. ``--collection`` may name an alias (``embedq migrate``): a writer
writes its own model's collection behind it (``NAME__<fingerprint>``) when there is one,
else the collection the name reaches at start, and keeps writing there when the alias
moves; the collection names the consumer group that feeds it (``embedq.group``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import structlog

from embedq.core.config import Settings
from embedq.core.errors import (
    CollectionMissing,
    ConfigError,
    ModelMismatch,
    SinkRejected,
    SinkUnavailable,
)
from embedq.sink.columns import TEXT_MAX_BYTES, Columns, meta_json, send
from embedq.sink.error_codes import translated
from embedq.sink.listing import pages
from embedq.sink.schema import (
    check_fields,
    check_model,
    collection_args,
    model_collection,
    model_properties,
)

if TYPE_CHECKING:
    from embedq.model.encoder import Encoder

log = structlog.get_logger("embedq.sink.milvus")

ID_MAX_BYTES = 512
VERSION_FIELDS = ("content_hash", "version")  # what `embedq verify` compares with the index
REQUEST_BUDGET_BYTES = 16 * 1024 * 1024  # one request may carry 64 MB; stay well under
# A listing's page (``Sink.rows``): rows per query, under the 16,384 a query may return.
# Large, because a query on Milvus Lite's unsealed rows scans them all, however few match;
# with vectors smaller, as pymilvus gives each one as a list of Python floats.
PAGE_ROWS = 10_000
# How stale a writer's view of its collection may be (``Sink.check_target``): ``embedq
# migrate --adopt`` waits longer than this before it goes on.
RECHECK_S = 1.0
INDEX_PROPERTY = "embedq.index"  # see Sink.index_name
# The consumer group that feeds a collection, when not the deployment's ``--group``: set by
# ``embedq migrate`` on the new model's collection (see Sink.group).
GROUP_PROPERTY = "embedq.group"
# A token made when the collection is created: which incarnation of a name its Redis index
# describes (``Versions.own``), so a dropped-and-recreated collection gets a fresh index.
INCARNATION_PROPERTY = "embedq.incarnation"
VECTOR_PAGE_ROWS = 1_000


@dataclass(frozen=True)
class Row:
    id: str
    vector: npt.NDArray[np.float32]
    text: str
    meta: dict[str, Any] | None
    content_hash: str = ""  # embedq.core.records.content_hash of what the producer sent
    version: str = ""  # the stream entry id this row is the effect of (embedq.queue.versions)
    sparse: dict[int, float] | None = None  # token id -> weight (SPLADE, BGE-M3)


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    text: str | None
    meta: dict[str, Any] | None


def is_lite(uri: str) -> bool:
    return "://" not in uri


def check_lite_path(uri: str, *, create: bool = True) -> None:
    """Raise ``ConfigError`` for a Milvus Lite path that cannot be opened as asked.

    Milvus Lite reports a missing folder as "Open local milvus failed", the same words as
    for a file another process holds, and a reader that opens a path that is not there
    creates an empty database (issue 18); both are told apart here, before it opens.
    """
    if not is_lite(uri):
        return
    path = Path(uri)
    if not path.parent.is_dir():
        raise ConfigError(
            f"the folder of the Milvus Lite database {uri} does not exist: create it "
            f"(mkdir -p {path.parent}) or point --milvus-uri elsewhere"
        )
    if not create and not path.exists():
        raise ConfigError(
            f"no Milvus Lite database at {uri}: no worker has written there (check "
            "--milvus-uri; `make demo` writes .demo/embedq.db, collection demo)"
        )


class Sink:
    """One Milvus collection written by upsert."""

    def __init__(
        self,
        uri: str,
        token: str,
        collection: str,
        *,
        timeout_s: float,
        store_text: bool = True,
        create: bool = True,
    ) -> None:
        self.uri = uri
        self.create = create  # False: a reader; a Milvus Lite file that is not there is an error
        self.collection = collection
        self.timeout_s = timeout_s
        self.store_text = store_text
        self.versioned = True  # rows carry content_hash and version (False: an older collection)
        self._token = token
        self._client: Any = None
        self._connect_lock = threading.Lock()
        self.dimension: int | None = None
        self.sparse = False  # the collection has a ``sparse`` field
        self.target = collection  # where writes go: the physical collection (alias resolved)
        # Whose Redis index (``Keys.index``) describes ``target``: its own name, or the name
        # it had before ``embedq migrate --adopt`` renamed it (property ``embedq.index``).
        self.index_name = collection
        # The consumer group whose entries ``target`` receives ("": the deployment's
        # ``--group``); a migration's new collection has one of its own (``GROUP_PROPERTY``).
        self.group = ""
        self.incarnation = ""  # INCARNATION_PROPERTY; "" for a collection made before it
        self.fingerprint = ""  # the writing model's; "" (a reader): writes are not re-checked
        self._checked_until = 0.0  # monotonic time until which ``target`` needs no re-check
        # Called with each request's row count when pymilvus has no gRPC stub for the columnar
        # upsert (columns.send) and rows go as dicts; the worker counts it in a metric.
        self.on_row_fallback: Callable[[int], object] = lambda _rows: None

    @property
    def client(self) -> Any:
        # Locked: a readiness probe pings from another thread, and two clients opened at
        # once on a Milvus Lite file collide ("already open in another process").
        with self._connect_lock:
            if self._client is None:
                from pymilvus import MilvusClient

                check_lite_path(self.uri, create=self.create)
                with translated("connect"):
                    self._client = MilvusClient(
                        uri=self.uri, token=self._token, timeout=self.timeout_s
                    )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None

    def sibling(self, collection: str, *, create: bool = False) -> Sink:
        """Another collection of the same Milvus, on this sink's connection and credentials
        (Milvus Lite allows one connection per file): ``embedq migrate``'s shadow."""
        other = Sink(
            self.uri,
            self._token,
            collection,
            timeout_s=self.timeout_s,
            store_text=self.store_text,
            create=create,
        )
        other._client = self.client
        return other

    # -- schema ----------------------------------------------------------------------

    def ensure_collection(
        self,
        dimension: int | None,
        model_name: str,
        *,
        create: bool = True,
        sparse: bool = False,
        fingerprint: str = "",
        properties: dict[str, str] | None = None,
    ) -> bool:
        """Create the collection if missing (True when created); refuse one whose fields or
        fingerprint are not the model's. ``create=False`` (readers: ``embedq search``): a
        missing collection is a ``ConfigError``. ``dimension``: 0 for no dense vector, None
        (``embedq verify``, no model) opens an existing collection without checking it.
        ``properties``: more for a collection created now (``embedq migrate``'s group)."""
        client = self.client
        info = self._existing(self._own_collection(fingerprint) if dimension is not None else "")
        if info is not None:
            if dimension is not None:
                check_model(info, self.collection, sparse=sparse, fingerprint=fingerprint)
                check_fields(info, self.collection, dimension, model_name)
            self._open_existing(info, dimension, fingerprint)
            return False
        if not create or dimension is None:
            raise ConfigError(
                f"collection {self.collection} does not exist at {self.uri} "
                "(no worker has written to it yet; check --collection)"
            )
        schema = self._schema(dimension, model_name, sparse)
        index = self._index(dense=dimension > 0, sparse=sparse)
        made = model_properties(model_name, fingerprint) | (properties or {})
        made[INCARNATION_PROPERTY] = uuid.uuid4().hex
        try:
            with translated("create collection"):
                client.create_collection(
                    self.collection,
                    schema=schema,
                    index_params=index,
                    properties=made,
                    timeout=self.timeout_s,
                )
        except SinkRejected:
            # Workers started together (a scale-up from zero) race to create it; the loser
            # checks the winner's collection like any existing one.
            if not self._appears():
                raise
            return self.ensure_collection(
                dimension, model_name, sparse=sparse, fingerprint=fingerprint, properties=properties
            )
        self._open_created(dimension, sparse, model_name, fingerprint, made)
        return True

    def _open_created(
        self,
        dimension: int,
        sparse: bool,
        model_name: str,
        fingerprint: str,
        properties: dict[str, str],
    ) -> None:
        """Take the collection this sink has just created with ``properties``."""
        self.dimension, self.sparse, self.target = dimension, sparse, self.collection
        self.index_name, self.fingerprint = self.collection, fingerprint
        self.group = properties.get(GROUP_PROPERTY, "")
        self.incarnation = properties[INCARNATION_PROPERTY]
        log.info(
            "collection_created",
            collection=self.collection,
            dimension=dimension,
            sparse=sparse,
            model=model_name,
            fingerprint=fingerprint,
            index="FLAT" if is_lite(self.uri) else "HNSW",
        )

    def _existing(self, name: str = "") -> dict[str, Any] | None:
        """The description of collection ``name`` (default: ``collection``); None if none."""
        name = name or self.collection
        with translated("describe collection"):
            if not self.client.has_collection(name, timeout=self.timeout_s):
                return None
            return dict(self.client.describe_collection(name, timeout=self.timeout_s))

    def _own_collection(self, fingerprint: str) -> str:
        """Where a writer of the model of ``fingerprint`` writes: that model's collection
        behind the name (``model_collection``) when there is one, else the name itself.
        During a migration the alias names one model's collection while workers of both
        models run: each writes its own, fed by its own consumer group, so neither misses a
        write whichever the alias names (issue 26)."""
        own = model_collection(self.collection, fingerprint) if fingerprint else ""
        if own:
            with translated("describe collection"):
                if self.client.has_collection(own, timeout=self.timeout_s):
                    return own
        return self.collection

    def _appears(self) -> bool:  # Lite fails a racing create ("File exists") before listing it
        for _ in range(50):
            with translated("describe collection"):
                if self.client.has_collection(self.collection, timeout=self.timeout_s):
                    return True
            time.sleep(0.1)
        return False

    def ensure_for(
        self, encoder: Encoder, *, create: bool = True, properties: dict[str, str] | None = None
    ) -> bool:
        """``ensure_collection`` for what ``encoder``'s model makes and records."""
        return self.ensure_collection(
            **collection_args(encoder), create=create, properties=properties
        )

    def _open_existing(
        self, info: dict[str, Any], dimension: int | None, fingerprint: str = ""
    ) -> None:
        """Take an existing collection's fields as they are, and load it; ``fingerprint``:
        the checked model's (writes re-check it), "" when nothing was checked."""
        self.fingerprint = fingerprint if dimension is not None else ""
        self.target = str(info.get("collection_name") or self.collection)
        properties = info.get("properties") or {}
        self.index_name = str(properties.get(INDEX_PROPERTY) or self.target)
        self.group = str(properties.get(GROUP_PROPERTY) or "")
        self.incarnation = str(properties.get(INCARNATION_PROPERTY) or "")
        names = {f["name"] for f in info["fields"]}
        self.sparse = "sparse" in names
        self.store_text = self.store_text and "text" in names
        self.versioned = set(VERSION_FIELDS) <= names
        if not self.versioned:
            log.warning(
                "collection_unversioned",
                collection=self.collection,
                why="created before rows carried content_hash and version: writes work, "
                "embedq verify cannot compare contents",
            )
        self.dimension = dimension if "vector" in names else 0
        with translated("load collection"):
            self.client.load_collection(self.target, timeout=self.timeout_s)

    def check_target(self) -> None:
        """Before a write (at most every ``RECHECK_S``): ``target`` is still a collection of
        this model. A name that became an alias (``embedq migrate --adopt`` renamed the
        collection under a running worker) is followed to the renamed collection when it
        keeps the same index; a collection of another model raises ``ModelMismatch``, and
        the worker stops with its entries pending for a worker of the right model (issue 26
        item 5: an old-model worker wrote into the new model's collection after a promote)."""
        now = time.monotonic()
        if not self.fingerprint or now < self._checked_until:
            return
        info = self._describe_target()
        check_model(info, self.target, sparse=self.sparse, fingerprint=self.fingerprint)
        physical = str(info.get("collection_name") or self.target)
        if physical != self.target:
            index_name = str((info.get("properties") or {}).get(INDEX_PROPERTY) or physical)
            if index_name != self.index_name:
                raise ModelMismatch(
                    f"collection {self.target} is now an alias of {physical}, whose index is "
                    f"not the one this worker keeps ({self.index_name}): restart the worker"
                )
            log.warning("collection_renamed", was=self.target, now=physical, alias=self.target)
            self.target = physical
        self._checked_until = now + RECHECK_S

    def _describe_target(self) -> dict[str, Any]:
        """``target``'s description; the name is missing for the moment between ``migrate
        --adopt``'s rename and its alias, so a missing one is asked again for a while."""
        for _ in range(50):
            try:
                with translated("describe collection"):
                    return dict(
                        self.client.describe_collection(self.target, timeout=self.timeout_s)
                    )
            except CollectionMissing:
                time.sleep(0.1)
        with translated("describe collection"):
            return dict(self.client.describe_collection(self.target, timeout=self.timeout_s))

    def _schema(self, dimension: int, model_name: str, sparse: bool = False) -> Any:
        """id (primary key), vector (unless the model makes none), sparse (if it makes one),
        text (unless not stored) and meta; nothing dynamic."""
        from pymilvus import DataType

        schema = self.client.create_schema(
            auto_id=False,
            enable_dynamic_field=False,
            description=f"embedq model={model_name} dim={dimension}",
        )
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
        if dimension:
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
        if sparse:
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        if self.store_text:
            schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX_BYTES)
        schema.add_field("meta", DataType.JSON)
        for name in VERSION_FIELDS:
            schema.add_field(name, DataType.VARCHAR, max_length=64)
        return schema

    def _index(self, *, dense: bool = True, sparse: bool = False) -> Any:
        """Cosine over the vector: FLAT on Milvus Lite, which searches exactly, else HNSW;
        inner product over the sparse vector (an inverted index, exact)."""
        index = self.client.prepare_index_params()
        if sparse:
            index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        if dense and is_lite(self.uri):
            index.add_index("vector", index_type="FLAT", metric_type="COSINE")
        elif dense:
            index.add_index(
                "vector",
                index_type="HNSW",
                metric_type="COSINE",
                params={"M": 16, "efConstruction": 200},
            )
        return index

    # -- writes ----------------------------------------------------------------------

    @property
    def fields(self) -> list[str]:
        """The fields a row carries, in the collection's schema order."""
        return (
            ["id"]
            + (["vector"] if self.dimension != 0 else [])
            + (["sparse"] if self.sparse else [])
            + (["text"] if self.store_text else [])
            + ["meta"]
            + (list(VERSION_FIELDS) if self.versioned else [])
        )

    def upsert(self, rows: Sequence[Row]) -> int:
        """Write rows (``upsert_columns`` for a batch already held as columns)."""
        if not rows:
            return 0
        return self.upsert_columns(
            Columns(
                ids=[r.id for r in rows],
                vectors=np.stack([r.vector for r in rows]).astype(np.float32, copy=False),
                texts=[r.text for r in rows],
                metas=[meta_json(r.meta) for r in rows],
                content_hashes=[r.content_hash for r in rows],
                versions=[r.version for r in rows],
                sparse=[r.sparse for r in rows],
            )
        )

    def upsert_columns(self, columns: Columns) -> int:
        self.check_target()
        """Write rows; returns how many Milvus confirmed. Raises before confirming anything
        partial: the caller acks only after this returns."""
        written = 0
        for chunk in columns.chunks(REQUEST_BUDGET_BYTES):
            with translated("upsert"):
                sent = send(self.client, self.target, chunk, self.fields, self.timeout_s)
                if sent is None:
                    self.on_row_fallback(len(chunk))
                    result = self.client.upsert(
                        self.target, chunk.rows(self.fields), timeout=self.timeout_s
                    )
                    sent = int(result.get("upsert_count", len(chunk)))
            written += sent
        return written

    def delete(self, ids: Sequence[str]) -> None:
        """Remove these ids' rows (absent ids are fine); raises before confirming."""
        if ids:
            self.check_target()
            with translated("delete"):
                self.client.delete(self.target, ids=list(ids), timeout=self.timeout_s)

    # -- reads -----------------------------------------------------------------------

    def search(self, vector: npt.NDArray[np.float32], k: int, where: str = "") -> list[Hit]:
        """The ``k`` nearest rows, among those matching the Milvus expression ``where``."""
        fields = ["meta"] + (["text"] if self.store_text else [])
        with translated("search"):
            result = self.client.search(
                self.collection,
                [vector.tolist()],
                limit=k,
                filter=where,
                output_fields=fields,
                timeout=self.timeout_s,
            )
        hits = []
        for hit in result[0]:
            entity = hit.get("entity", {})
            hits.append(
                Hit(
                    id=str(hit["id"]),
                    score=float(hit["distance"]),
                    text=entity.get("text"),
                    meta=entity.get("meta"),
                )
            )
        return hits

    def count(self) -> int:
        with translated("count"):
            rows = self.client.query(
                self.collection,
                filter="",
                output_fields=["count(*)"],
                consistency_level="Strong",
                timeout=self.timeout_s,
            )
        return int(rows[0]["count(*)"])

    def get(self, ids: Sequence[str], *, with_vectors: bool = True) -> list[dict[str, Any]]:
        fields = (
            ["id", "meta"]
            + (["vector"] if with_vectors and self.dimension != 0 else [])
            + (["text"] if self.store_text else [])
            + (list(VERSION_FIELDS) if self.versioned else [])
        )
        with translated("get"):
            return list(
                self.client.query(
                    self.collection,
                    ids=list(ids),
                    output_fields=fields,
                    consistency_level="Strong",
                    timeout=self.timeout_s,
                )
            )

    def rows(
        self, batch_size: int | None = None, *, vectors: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Every row once, in id order, in pages of up to ``batch_size`` rows (default
        ``PAGE_ROWS``, or ``VECTOR_PAGE_ROWS`` with ``vectors``): its id, content hash and
        version, and with ``vectors`` its ``vector`` and ``sparse`` fields where the
        collection has them.

        Pages come from ``embedq.sink.listing.pages``, which proves each one complete whatever
        order the backend answers in. Then the ids listed must number ``count(*)``: if not,
        rows were written or deleted meanwhile, and ``SinkUnavailable`` is raised instead of
        a short list. pymilvus's query iterator is no help: it finds nothing on a 2.3.5
        server (no MVCC timestamp there), and offsets stop at 16,384 rows."""
        if batch_size is None:
            batch_size = VECTOR_PAGE_ROWS if vectors else PAGE_ROWS
        if batch_size < 2:
            raise ValueError(f"batch_size must be 2 or more, not {batch_size}")
        fields = ["id", *VERSION_FIELDS] if self.versioned else ["id"]
        if vectors:
            fields += (["vector"] if self.dimension != 0 else []) + (
                ["sparse"] if self.sparse else []
            )
        listed = 0
        for page in pages(self._query, self._count, fields, batch_size, self.collection):
            listed += len(page)
            yield from page
        total = self.count()
        if listed != total:
            raise SinkUnavailable(
                f"listing collection {self.collection} found {listed} ids where count(*) "
                f"says {total}: rows were written or deleted while it ran; list it again "
                "once the workers are drained"
            )

    def _query(self, where: str, fields: list[str], limit: int) -> list[dict[str, Any]]:
        with translated("query rows"):
            return list(
                self.client.query(
                    self.collection,
                    filter=where,
                    output_fields=fields,
                    limit=limit,
                    consistency_level="Strong",
                    timeout=self.timeout_s,
                )
            )

    def _count(self, where: str) -> int:
        with translated("count rows"):
            found = self.client.query(
                self.collection,
                filter=where,
                output_fields=["count(*)"],
                consistency_level="Strong",
                timeout=self.timeout_s,
            )
        return int(found[0]["count(*)"])

    def ping(self) -> None:
        with translated("ping"):
            self.client.has_collection(self.collection, timeout=self.timeout_s)


def open_sink(settings: Settings, *, create: bool = True) -> Sink:
    """The collection ``settings`` name; ``create=False`` for readers (``embedq search``),
    which must not leave an empty Milvus Lite database behind where there was none."""
    return Sink(
        settings.milvus_uri,
        settings.milvus_token,
        settings.collection,
        timeout_s=settings.milvus_timeout_s,
        store_text=settings.store_text,
        create=create,
    )
