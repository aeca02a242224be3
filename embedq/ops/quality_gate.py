"""The quality gate of ``embedq migrate --promote`` (issue 26): ``--min-overlap X`` /
``--min-recall X`` refuse to move the alias to a new model whose evaluation
(``embedq.ops.evaluate``) is below the bar, with the figures, and exit ``REFUSED``.

The evaluation is the one given now (``--evaluate QUERIES`` with ``--promote``: run after
the last catch-up, recorded, then checked) or the one recorded on the new collection by an
earlier ``migrate --evaluate``, if it was measured against the collection the alias still
names; with a bar and neither, the promote is refused and says to evaluate first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from embedq.core.errors import ConfigError, ModelMismatch, PromoteRefused
from embedq.ops.evaluate import (
    Evaluation,
    collection_run,
    compare,
    load_queries,
    record,
    recorded_evaluation,
)
from embedq.sink.schema import model_collection, model_fingerprint

if TYPE_CHECKING:
    from embedq.core.config import Settings
    from embedq.model.encoder import Encoder
    from embedq.ops.migrate import Migration
    from embedq.sink.milvus import Sink

log = structlog.get_logger("embedq.ops.quality_gate")


@dataclass(frozen=True)
class Bar:
    """``--min-overlap`` / ``--min-recall``: the least a promote accepts; None: no bar."""

    min_overlap: float | None = None
    min_recall: float | None = None  # the new model's recall@k, over the judged queries

    @property
    def given(self) -> bool:
        return self.min_overlap is not None or self.min_recall is not None


def shortfall(found: dict[str, Any], bar: Bar) -> str:
    """What in the recorded evaluation ``found`` is below ``bar`` ("" when nothing)."""
    k = found.get("k", "k")
    short = []
    if bar.min_overlap is not None and float(found["overlap"]) < bar.min_overlap:
        short.append(f"overlap@{k} {float(found['overlap']):.3f} < {bar.min_overlap:.3f}")
    new: dict[str, float] = found.get("new") or {}
    old: dict[str, float] = found.get("old") or {}
    if bar.min_recall is not None and not new:
        short.append(
            f"--min-recall {bar.min_recall:.3f}: the evaluation has no recall (no query was "
            "judged: give relevant ids in the query file or --qrels)"
        )
    elif bar.min_recall is not None and float(new["recall"]) < bar.min_recall:
        was = f", old model {float(old['recall']):.3f}" if old else ""
        short.append(f"recall@{k} {float(new['recall']):.3f} < {bar.min_recall:.3f}{was}")
    return "; ".join(short)


@dataclass
class Gate:
    """What ``migrate --promote`` checks before it moves the alias: the bar, and the query
    set to evaluate first (``--evaluate``) or None to use the recorded evaluation."""

    bar: Bar
    queries: Path | None = None
    qrels: Path | None = None
    k: int = 10
    old_encoder: Callable[[], Encoder] | None = None  # the live collection's model, loaded late
    show: Callable[[Evaluation], None] = lambda _evaluation: None  # the table or JSON Lines
    say: Callable[[str], None] = lambda _line: None  # one line for a person (stderr)

    def evaluate(self, live: Sink, shadow: Sink, new: Encoder) -> dict[str, Any]:
        """Run the query set against the live (old model) and shadow (new model) collections,
        show and record it on the shadow; the record."""
        if self.queries is None or self.old_encoder is None:
            raise ConfigError("an evaluation needs --evaluate QUERIES")
        queries = load_queries(self.queries, self.qrels)
        old = self.old_encoder()
        reference = _searchable(live, old, "--old-model")
        candidate = _searchable(shadow, new, "--model")
        evaluation = compare(
            queries,
            collection_run(reference, old, queries, self.k),
            collection_run(candidate, new, queries, self.k),
            k=self.k,
        )
        self.show(evaluation)
        return record(shadow, evaluation, against=live, source=self.queries.name)

    def check(self, live: Sink, shadow: Sink, new: Encoder, *, promoting: bool) -> None:
        """After the backfill: evaluate ``shadow`` against ``live`` when a query set is
        given; then, ``promoting`` with a bar, raise ``PromoteRefused`` (nothing moved) when
        that evaluation, or the one recorded, is below the bar or missing."""
        found = self.evaluate(live, shadow, new) if self.queries is not None else None
        if not (promoting and self.bar.given):
            return
        found = found or recorded_evaluation(shadow)
        if found is None or found.get("against") != live.collection:
            log.warning("promote_refused", collection=shadow.collection, why="no evaluation")
            raise PromoteRefused(
                f"promote refused: no evaluation of {shadow.collection} against "
                f"{live.collection} is recorded; run `embedq migrate --model NEW --evaluate "
                "QUERIES` first, or give --evaluate QUERIES with --promote"
            )
        short = shortfall(found, self.bar)
        if short:
            log.warning("promote_refused", collection=shadow.collection, why=short)
            raise PromoteRefused(
                f"promote refused: {short} ({found.get('queries')} queries, evaluated "
                f"{found.get('at')}); the alias was not moved"
            )
        log.info("promote_gate_passed", collection=shadow.collection, overlap=found["overlap"])
        self.say(f"quality gate passed: {_figures(found)}")

    def evaluate_now(self, migration: Migration, new: Encoder) -> None:
        """``migrate --model NEW --evaluate QUERIES``: the new model's collection (made by
        ``--backfill``) against the live one, shown and recorded; nothing else changes."""
        live = migration.live()
        target = model_collection(migration.name, model_fingerprint(new))
        if live == target:
            raise ConfigError(f"{migration.name} already serves this model ({live})")
        if not migration.exists(target):
            raise ConfigError(
                f"no collection {target} for this --model yet: run --backfill first, then "
                "--evaluate"
            )
        found = self.evaluate(migration.open(live), migration.open(target), new)
        self.say(f"evaluation of {target} against {live} recorded: {_figures(found)}")


def _figures(found: dict[str, Any]) -> str:
    k = found.get("k")
    shown = f"overlap@{k} {float(found['overlap']):.3f}"
    for side in ("old", "new"):
        if found.get(side):
            shown += f", {side} recall@{k} {float(found[side]['recall']):.3f}"
            shown += f" nDCG@10 {float(found[side]['ndcg_10']):.3f}"
    return f"{shown} ({found.get('queries')} queries, {found.get('judged')} judged)"


def old_encoder(settings: Settings, old_model: str) -> Callable[[], Encoder]:
    """The live collection's model (``--old-model``; "" the packaged one) as fp32 torch with
    all its dimensions, loaded when first asked for: only an evaluation needs it."""

    def load() -> Encoder:
        from embedq.model.encoder import encoder_for, resolve_model_dir

        resolve_model_dir(old_model)  # a clear line for a path that is not a model
        plain = settings.replace(
            model=old_model, backend="torch", quantize="none", dimensions=0, force_dimensions=False
        )
        return encoder_for(plain)

    return load


def _searchable(sink: Sink, encoder: Encoder, option: str) -> Sink:
    """``sink``'s collection opened for searching with ``encoder`` (a sibling, so the
    caller's sink keeps its state), refused when it records another model's fingerprint."""
    opened = sink.sibling(sink.collection)
    try:
        opened.ensure_for(encoder, create=False)
    except ModelMismatch as exc:
        raise ConfigError(f"{exc}: give {option} the model that wrote it") from exc
    if not opened.count():
        raise ConfigError(f"collection {sink.collection} is empty: nothing to evaluate")
    return opened
