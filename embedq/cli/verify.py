"""``embedq verify``: compare the index with Milvus, and repair the drift."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from embedq.cli.options import build_settings, common, log, milvus, model, run_guarded
from embedq.core.deletes import DEFAULT as MAX_DELETE_DEFAULT
from embedq.core.deletes import MaxDelete
from embedq.core.errors import ConfigError, DeletesRefused, ExitCode

if TYPE_CHECKING:
    from collections.abc import Sequence

    from embedq.core.config import Settings
    from embedq.ops.verify import Adopted, Drift, Index
    from embedq.queue.stream import Stream
    from embedq.sink.epoch import Standing
    from embedq.sink.milvus import Sink


@click.command()
@common
@milvus
@click.option("--repair", is_flag=True, help="Send drifted ids again; delete unknown rows.")
@click.option(
    "--max-delete",
    default=MAX_DELETE_DEFAULT,
    show_default=True,
    callback=lambda _ctx, _param, value: _max_delete(value),
    help="With --repair: delete at most N rows, P% of the collection's rows, or all. Past "
    "it, or when the index holds none of the collection's rows, the repair sends nothing "
    "(no deletes, no resends) and exits 4.",
)
@click.option(
    "--adopt",
    is_flag=True,
    help="After Redis lost its data: rebuild the index from the rows the collection holds "
    "(no re-embedding; entries newer than a row are kept), then record Redis's epoch in "
    "the collection. Then dedup and ordering work again.",
)
@click.option(
    "--accept-redis-loss",
    is_flag=True,
    help="With --repair: delete rows unknown to the index although Redis lost its data "
    "since the collection's epoch (refused otherwise, whatever --max-delete says: run "
    "--adopt instead). Only after re-sending everything from the source; --max-delete "
    "still applies, and the collection then records Redis's epoch.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option(
    "--sample",
    type=click.IntRange(min=0),
    default=0,
    help="Embed N random rows again with --model and compare with their stored vectors "
    "(cosine >= 0.999); a row below is drift (sample_mismatch).",
)
@model
def verify(repair: bool, as_json: bool, sample: int, **options: Any) -> None:
    """Does the collection hold exactly what the index says? Run it after a drain.

    Reports ids whose row is missing, rows whose content hash or version differs from the
    index, and rows the index does not know (or knows as deleted). Rows whose vectors are
    not those the worker wrote (their digest in the index) count as changed; --sample N
    embeds N rows again with the model and counts one whose vector differs as changed.
    Exits 1 when it found drift (and did not repair it), 0 when clean, 4 when --repair was
    refused and sent nothing (an index that is not this collection's, Redis data loss,
    past --max-delete: the line says why).
    """
    loss = _loss_options(options, repair)
    settings = build_settings(options)

    def body() -> int:
        from embedq.ops import verify as check
        from embedq.queue.stream import open_streams
        from embedq.sink.milvus import open_sink

        streams = open_streams(settings.replace(block_ms=0))
        sink = open_sink(settings, create=False)
        sink.ensure_collection(None, "", create=False)
        standing, adopted = _epoch(streams, sink, loss)
        drift, index = check.verify(streams, sink)
        if sample:
            _sample(drift, index, sink, settings, sample)
        report = drift.as_dict() | _loss_report(standing, drift, adopted)
        refused = _refusal(drift, index, streams, standing, loss) if repair else None
        fixed = None
        if repair and not drift.clean and refused is None:
            fixed = check.repair(drift, index, streams)
            _accepted(streams, sink, standing, loss)
            report["repair"] = {
                "resent": fixed.resent,
                "deleted": fixed.deleted,
                "unrepairable": fixed.unrepairable,
            }
        log.info("verified", **{k: v for k, v in report.items() if not isinstance(v, list)})
        if as_json:
            click.echo(json.dumps(report))
        else:
            _print(report)
        if refused is not None:
            raise refused
        if drift.clean or (fixed is not None and not fixed.unrepairable):
            return ExitCode.OK
        return ExitCode.CRASHED

    run_guarded(body)


def repair_line(r: dict[str, Any]) -> str:
    """What ``--repair`` did; the ids it could not repair follow their count, if any."""
    lost = r["unrepairable"]
    trimmed = f"{len(lost)} trimmed from the stream"
    if lost:  # the ids to re-send, not a colon with nothing after it
        more = f" (and {len(lost) - 20} more: verify --json)" if len(lost) > 20 else ""
        trimmed += " (re-send them): " + " ".join(lost[:20]) + more
    return f"repair: sent {r['resent']} again, {r['deleted']} deletes; {trimmed}"


def _print(report: dict[str, Any]) -> None:
    click.echo(f"rows {report['rows']}, indexed ids {report['indexed']}")
    _print_loss(report)
    for kind in ("missing", "changed", "unknown"):
        ids = report[kind]
        shown = " ".join(ids[:20]) + (" …" if len(ids) > 20 else "")
        click.echo(f"{kind:<8} {len(ids)}" + (f"  {shown}" if ids else ""))
    _print_vectors(report)
    if report["unversioned"]:
        click.echo("(the collection predates versioned rows: contents not compared)")
    if "repair" in report:
        r = report["repair"]
        click.echo(repair_line(r))
    elif report["clean"]:
        click.echo("clean")


def _print_vectors(report: dict[str, Any]) -> None:
    """Why rows are changed, where their vectors are the reason (issue 25)."""
    ids = report.get("vector_changed") or []
    if ids:
        click.echo(f"  of which vectors not as written: {len(ids)}  " + " ".join(ids[:20]))
    if "sampled" in report:
        worst = report["sample_min_cosine"]
        click.echo(
            f"sampled  {report['sampled']} embedded again"
            + (f", lowest cosine {worst:.6f}" if worst is not None else "")
            + f"; mismatched {len(report['sample_mismatch'])}  "
            + " ".join(report["sample_mismatch"][:20])
        )
        if report["unsampleable"]:
            click.echo(
                f"  not sampleable (no stored text, entry trimmed) {len(report['unsampleable'])}"
            )


def _sample(drift: Drift, index: Index, sink: Sink, settings: Settings, n: int) -> None:
    """``--sample``: the model loads (and must be the collection's, as for ``search``)."""
    from embedq.model.encoder import encoder_for, resolve_model_dir
    from embedq.ops import verify as check
    from embedq.ops.sampling import sample

    resolve_model_dir(settings.model)  # the cheap check first, then the model loads
    encoder = encoder_for(settings)
    sink.ensure_for(encoder, create=False)  # refuses another model's collection
    check.with_sample(drift, sample(index, set(drift.missing), sink, encoder, n))


# -- Redis data loss, --adopt and the guards on --repair (issue 25) -------------------------


@dataclass(frozen=True)
class _Loss:
    max_delete: MaxDelete
    adopt: bool
    accept: bool  # --accept-redis-loss


def _max_delete(value: str) -> MaxDelete:
    try:
        return MaxDelete.parse(value)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _loss_options(options: dict[str, Any], repair: bool) -> _Loss:
    loss = _Loss(options.pop("max_delete"), options.pop("adopt"), options.pop("accept_redis_loss"))
    if loss.adopt and repair:
        raise click.UsageError("--adopt rebuilds the index: run it alone, then --repair if needed")
    if loss.accept and not repair:
        raise click.UsageError("--accept-redis-loss goes with --repair")
    return loss


def _epoch(streams: Sequence[Stream], sink: Sink, loss: _Loss) -> tuple[Standing, Adopted | None]:
    """Where the deployment's epoch stands (``embedq.sink.epoch``), after ``--adopt`` if asked."""
    from embedq.ops import verify as check
    from embedq.sink import epoch

    adopted = check.adopt(streams, sink) if loss.adopt else None
    return epoch.check(streams, sink), adopted


def _loss_report(standing: Standing, drift: Drift, adopted: Adopted | None) -> dict[str, Any]:
    found: dict[str, Any] = {
        "redis_data_lost": standing.lost,
        "redis_data_lost_message": standing.line(len(drift.unknown)) or None,
    }
    if adopted is not None:
        found["adopt"] = dataclasses.asdict(adopted)
    return found


def _refusal(
    drift: Drift, index: Index, streams: Sequence[Stream], standing: Standing, loss: _Loss
) -> DeletesRefused | None:
    """Why the repair must not go (``embedq.ops.verify.refuse_unproven``); None: it may."""
    from embedq.ops import verify as check

    lost = "" if loss.accept else standing.line(len(drift.unknown))
    try:
        check.refuse_unproven(drift, index, streams, loss.max_delete, lost=lost)
    except DeletesRefused as exc:
        return exc
    return None


def _accepted(streams: Sequence[Stream], sink: Sink, standing: Standing, loss: _Loss) -> None:
    """A repair with --accept-redis-loss went through: the collection takes Redis's epoch."""
    from embedq.sink import epoch

    if loss.accept and standing.lost:
        epoch.accept(streams, sink)


def _print_loss(report: dict[str, Any]) -> None:
    if "adopt" in report:
        adopted = report["adopt"]
        click.echo(
            f"adopted  {adopted['rows']} rows into the index ({adopted['written']} entries "
            f"written, {adopted['kept']} kept: as new or newer; {adopted['foreign']} without "
            "a version, not embedq's: left unknown)"
        )
    if report.get("redis_data_lost_message"):
        click.echo(report["redis_data_lost_message"])
