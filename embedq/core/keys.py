"""Every Redis key embedq touches, named in one place.

Key schema, for a base stream named ``S`` (default ``embedq:tasks``) and a job ``J``:

``S``                 the tasks stream; entries follow the contract in ``embedq.core.records``
``S:dlq``             the dead-letter stream: the original fields plus ``_dlq_*`` fields
``S:jobs``            sorted set of job ids, scored by start time (ms)
``S:docs:C``          hash: document -> the ids (a JSON list) ``enqueue --doc-field`` last
                      sent for it into collection ``C`` (``embedq.producer.sync``)
``S:job:J``           hash: the job's source, partitions, state, start/update/finish times,
                      and the workers' ``embedded`` / ``dead_lettered`` counters
``S:errors``          hash: entry id -> the last error a worker hit while holding that
                      entry; read when it is dead-lettered for ``max_deliveries``,
                      deleted when it is acked or dead-lettered
``S:migration:C``     hash: the migration toward collection ``C`` (``embedq migrate``,
                      ``embedq.ops.rollout``): alias, source collection and its group,
                      ``C``'s group, phase, rows copied, and where ``C``'s group started on
                      each (partition) stream (``start:<stream>``)
``S:epoch``           hash: collection ``C`` -> "<token> <created ms>", the deployment's
                      identity; ``C`` records the same token in its properties
                      (``embedq.sink.epoch``): a collection whose epoch Redis lacks outlived
                      Redis's data (``embedq.sink.epoch``)

With ``--partitions N`` (N > 1) there are N tasks streams instead of ``S``; partition ``i``
is ``P = S:{p<i>}``. Everything a partition needs atomically shares its hash tag, so it
lives on the partition's Redis Cluster slot:

``P``                 the partition's tasks stream
``P:dlq``             its dead-letter stream (the dead-letter script touches both)
``P:errors``          its last-error hash (dead-letter and retry scripts touch it)
``P:index:C``         hash: id -> "<version> <content hash> <vector digest>" of the row
                      collection ``C`` holds for it, the version being the partition's
                      entry id that said what the row must be ("-" as hash: deleted, no
                      digest); the digest is "<crc32 hex>@<collection tag>"
                      (``embedq.sink.digest``), absent where an older worker wrote; written
                      only after Milvus confirmed the write (``settle.lua``)
``P:leases:C``        hash: id -> "<expires ms> <version> <consumer>" while one worker
                      writes that id's row (``fence.lua``)
``P:owner:C``         string: the incarnation of collection ``C`` (its property
                      ``embedq.incarnation``) that ``P:index:C`` describes; an index of
                      another incarnation (a dropped collection's) is emptied once, before
                      the new one's first write (``index_owner.lua``)
``P:sent:J``          hash: the last source position job ``J`` sent to ``P`` and how many
                      entries it sent; written in the same script as the XADDs

The interactive lane (``embedq serve``, online requests ahead of the bulk backlog) is one
stream per deployment, ``L = S:online`` (``S:{online}`` when ``S`` has no hash tag, so that
its reply keys share its cluster slot):

``L``                 the lane stream: one entry per input of a request
                      (``embedq.queue.online_wire``)
``L:dlq``             its dead-letter stream
``L:reply:R``         list: request ``R``'s answers (raw float32 vectors), short TTL
``S:ratelimit:K``     hash: the token bucket of API key ``K`` (a digest, never the key)

With one partition ``P`` is ``S`` itself; on a cluster, give ``S`` a hash tag
(``embedq:{t}:tasks``) so that ``S:dlq`` and ``S:sent:J`` share its slot. The consumer
group (default ``embedq``, ``G``) lives on every partition stream. A migration's new
collection ``C`` is fed by a group of its own on the same streams, ``G:C``
(``collection_group``), created at the migration's start and destroyed with the collection
it feeds, so each physical collection receives every write whichever model's workers run.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

DLQ_SUFFIX = ":dlq"
CLUSTER_SLOTS = 16384

_PARTITION_SUFFIX = re.compile(r":\{p\d+\}$")
ERRORS_SUFFIX = ":errors"


@dataclass(frozen=True)
class Keys:
    """Keys of one tasks stream; ``stream`` may be a partition (``S:{p3}``) of ``base``."""

    stream: str
    # The interactive lane (``lane_stream``): entries answered on reply keys, never written
    # to Milvus. Said by whoever opens it, never guessed from the name (a tasks stream may
    # be called anything).
    online: bool = False

    @property
    def dlq(self) -> str:
        return self.stream + DLQ_SUFFIX

    @property
    def base(self) -> str:
        """The stream name the user gave: ``S`` for ``S`` and for each ``S:{p<i>}``."""
        return _PARTITION_SUFFIX.sub("", self.stream)

    @property
    def jobs(self) -> str:
        return f"{self.base}:jobs"

    def job(self, job_id: str) -> str:
        return f"{self.base}:job:{job_id}"

    def sent(self, job_id: str) -> str:
        """The producer's resume position for ``job_id`` on this (partition) stream."""
        return f"{self.stream}:sent:{job_id}"

    @property
    def errors(self) -> str:
        return self.stream + ERRORS_SUFFIX

    @property
    def epoch(self) -> str:
        """Collection -> the deployment's epoch (embedq.sink.epoch), one hash per base stream."""
        return f"{self.base}:epoch"

    def docs(self, collection: str) -> str:
        """Document -> ids, for ``enqueue --cleanup`` (embedq.producer.sync)."""
        return f"{self.base}:docs:{collection}"

    def migration(self, collection: str) -> str:
        """The record of the migration toward ``collection`` (``embedq.ops.migrate``)."""
        return f"{self.base}:migration:{collection}"

    def index(self, collection: str) -> str:
        """What ``collection`` holds for each id of this (partition) stream, by version."""
        return f"{self.stream}:index:{collection}"

    def leases(self, collection: str) -> str:
        return f"{self.stream}:leases:{collection}"

    def index_owner(self, collection: str) -> str:
        """Which incarnation of ``collection`` its index (``index``) describes."""
        return f"{self.stream}:owner:{collection}"

    def reply(self, request_id: str) -> str:
        """Request ``request_id``'s reply list, on the lane's cluster slot."""
        return f"{self.stream}:reply:{request_id}"

    def rate_limit(self, key_digest: str) -> str:
        return f"{self.base}:ratelimit:{key_digest}"


def collection_group(group: str, collection: str) -> str:
    """The consumer group that feeds physical collection ``collection`` (a migration's new
    model's collection), beside the deployment's group ``group``."""
    return f"{group}:{collection}"


def lane_stream(base: str) -> str:
    """The interactive lane of tasks stream ``base`` (one per deployment, whatever the
    partitions): ``base:online``, tagged ``{online}`` when ``base`` has no tag of its own."""
    return f"{base}:online" if hash_tag(base) != base else f"{base}:{{online}}"


def partition_streams(base: str, partitions: int) -> list[str]:
    """The tasks streams of ``base``: ``[base]`` for one partition, else ``base:{p<i>}``."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if partitions == 1:
        return [base]
    if "{" in base:
        # base's own tag would come first and put every partition on one cluster slot
        raise ValueError(f"stream {base!r} has a hash tag; partition streams bring their own")
    return [f"{base}:{{p{i}}}" for i in range(partitions)]


def partition_for(doc_id: str, partitions: int) -> int:
    """The partition of ``doc_id``: CRC32 of its UTF-8 bytes, stable across processes.

    Python's ``hash()`` is salted per process, so two producers would disagree; CRC32 is in
    the standard library, fast, and spreads ids evenly enough for a modulo.
    """
    if partitions == 1:
        return 0
    return zlib.crc32(doc_id.encode("utf-8")) % partitions


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XModem), the checksum Redis Cluster uses for key slots."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_tag(key: str) -> str:
    """The part of ``key`` Redis Cluster hashes: the first non-empty ``{...}``, else all."""
    start = key.find("{")
    if start != -1:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str) -> int:
    """The Redis Cluster slot of ``key`` (what ``CLUSTER KEYSLOT`` answers)."""
    return crc16(hash_tag(key).encode("utf-8")) % CLUSTER_SLOTS
