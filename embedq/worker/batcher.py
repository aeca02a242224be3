"""From a window of stream entries to batches for the model.

``Batcher.batches`` checks each entry against the contract (bad ones are dead-lettered with
their reason), tokenizes (truncating at the model's limit, or dead-lettering with
``--on-overlong reject``), lets the latest *valid* entry for an id supersede older ones in
the same window (so ``X: valid`` then ``X: overlong`` still writes the valid version), and
packs token-budget batches of similar length (``embedq.worker.packing``). Deletes need no model:
they travel with the window's first batch, after supersession, so a window's last word on
an id wins whether it is a write or a delete.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from embedq.core.errors import EncodeFailed, PoisonInput
from embedq.core.records import Limits, content_hash, decode
from embedq.model.encoder import Encoder, Tokenized
from embedq.queue.entries import Entry, entry_order
from embedq.queue.stream import Stream
from embedq.worker.lane import OnlineLane
from embedq.worker.metrics import WorkerMetrics
from embedq.worker.packing import plan_batches
from embedq.worker.pipeline import Batch, Item, Stats, supersede

DeadLetter = Callable[[Stream, Entry, str, str], None]
Reject = Callable[[Item, str, str], None]


@dataclass(frozen=True)
class BatchPolicy:
    """How a window becomes batches; limits already resolved for the device."""

    limits: Limits
    max_batch_tokens: int
    max_batch_rows: int
    reject_overlong: bool


class Batcher:
    def __init__(
        self,
        encoder: Encoder,
        policy: BatchPolicy,
        *,
        dead_letter: DeadLetter,
        reject: Reject,
        metrics: WorkerMetrics,
        stats: Stats,
        lane: OnlineLane | None = None,
    ) -> None:
        self.encoder = encoder
        self.policy = policy
        # Lane entries are screened by the lane first (expired ones acked, another model's
        # answered) and always truncated at the model's limit: a query gets a vector.
        self.lane = lane
        self.lane_policy = replace(policy, reject_overlong=False)
        self.dead_letter = dead_letter
        self.reject = reject
        self.metrics = metrics
        self.stats = stats
        self._seq = itertools.count()  # batches are numbered in read order, across windows

    def batches(self, stream: Stream, entries: Sequence[Entry]) -> list[Batch]:
        """Contract checks, tokenization and supersession; poison entries leave here."""
        policy = self.policy
        if stream.keys.online:
            policy = self.lane_policy
            entries = self.lane.live(entries) if self.lane is not None else list(entries)
        with self.stats.cpu("decode"):
            items = self._decode(stream, entries)
        writes = [i for i in items if not i.record.is_delete]
        with self.stats.cpu("tokenize"):
            tokenized = self._tokenize(writes)
        with self.stats.cpu("plan"):
            return self._plan(items, writes, tokenized, policy)

    def _plan(
        self,
        items: list[Item],
        writes: list[Item],
        tokenized: list[Tokenized | None],
        policy: BatchPolicy,
    ) -> list[Batch]:
        valid = [
            item
            for item, tok in zip(writes, tokenized, strict=True)
            if tok is not None and self._admit(item, tok, policy)
        ]
        latest = supersede(sorted([*valid, *(i for i in items if i.record.is_delete)], key=_order))
        kept = [i for i in latest if not i.record.is_delete]
        deletes = [i for i in latest if i.record.is_delete]
        plan = plan_batches(
            [len(i.ids) for i in kept], policy.max_batch_tokens, policy.max_batch_rows
        )
        batches = [Batch(seq=next(self._seq), items=[kept[i] for i in idx]) for idx in plan]
        if deletes:
            if not batches:
                batches.append(Batch(seq=next(self._seq), items=[]))
            batches[0].deletes = deletes
        return batches

    def _decode(self, stream: Stream, entries: Sequence[Entry]) -> list[Item]:
        items = []
        for entry in entries:
            try:
                record = decode(entry.fields, self.policy.limits)
            except PoisonInput as bad:
                self.dead_letter(stream, entry, bad.reason, bad.detail)
                continue
            text = entry.fields.get(b"text", b"")
            items.append(
                Item(
                    stream=stream,
                    entry=entry,
                    record=record,
                    content_hash=content_hash(text, entry.fields.get(b"meta", b"")),
                    text_hash=content_hash(text),
                )
            )
        return items

    def _admit(self, item: Item, tok: Tokenized, policy: BatchPolicy) -> bool:
        if tok.truncated:
            if policy.reject_overlong:
                self.reject(
                    item,
                    "overlong",
                    f"text exceeds the model's {self.encoder.max_seq_length} tokens",
                )
                return False
            self.stats.add(truncated=1)
            self.metrics.truncated.inc()
        item.ids = tok.ids
        return True

    def _tokenize(self, items: list[Item]) -> list[Tokenized | None]:
        try:
            return list(self.encoder.tokenize([i.record.text for i in items]))
        except EncodeFailed:
            pass
        # One text breaks the tokenizer: find it, keep the others.
        out: list[Tokenized | None] = []
        for item in items:
            try:
                out.append(self.encoder.tokenize([item.record.text])[0])
            except EncodeFailed as exc:
                self.reject(item, "encode_failed", str(exc))
                out.append(None)
        return out


def _order(item: Item) -> tuple[int, int]:
    return entry_order(item.entry.entry_id)
