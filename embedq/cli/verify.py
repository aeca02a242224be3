"""``embedq verify``: compare the index with Milvus, and repair the drift."""

from __future__ import annotations

import json
from typing import Any

import click

from embedq.cli.options import build_settings, common, log, milvus, run_guarded
from embedq.errors import ExitCode


@click.command()
@common
@milvus
@click.option("--repair", is_flag=True, help="Send drifted ids again; delete unknown rows.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def verify(repair: bool, as_json: bool, **options: Any) -> None:
    """Does the collection hold exactly what the index says? Run it after a drain.

    Reports ids whose row is missing, rows whose content hash or version differs from the
    index, and rows the index does not know (or knows as deleted). Exits 1 when it found
    drift (and did not repair it), 0 when clean.
    """
    settings = build_settings(options)

    def body() -> int:
        from embedq import verify as check
        from embedq.sink import open_sink
        from embedq.stream import open_streams

        streams = open_streams(settings.replace(block_ms=0))
        sink = open_sink(settings, create=False)
        sink.ensure_collection(None, "", create=False)
        drift, index = check.verify(streams, sink)
        report = drift.as_dict()
        fixed = None
        if repair and not drift.clean:
            fixed = check.repair(drift, index, streams)
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
        if drift.clean or (fixed is not None and not fixed.unrepairable):
            return ExitCode.OK
        return ExitCode.CRASHED

    run_guarded(body)


def _print(report: dict[str, Any]) -> None:
    click.echo(f"rows {report['rows']}, indexed ids {report['indexed']}")
    for kind in ("missing", "changed", "unknown"):
        ids = report[kind]
        shown = " ".join(ids[:20]) + (" …" if len(ids) > 20 else "")
        click.echo(f"{kind:<8} {len(ids)}" + (f"  {shown}" if ids else ""))
    if report["unversioned"]:
        click.echo("(the collection predates versioned rows: contents not compared)")
    if "repair" in report:
        r = report["repair"]
        click.echo(
            f"repair: sent {r['resent']} again, {r['deleted']} deletes; "
            f"{len(r['unrepairable'])} trimmed from the stream (re-send them): "
            + " ".join(r["unrepairable"][:20])
        )
    elif report["clean"]:
        click.echo("clean")
