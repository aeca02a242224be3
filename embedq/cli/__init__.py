"""The ``embedq`` command: a thin click group over the library.

Every option is a flag that also reads ``EMBEDQ_<NAME>`` (e.g. ``--redis-url`` and
``EMBEDQ_REDIS_URL``); defaults come from ``embedq.config.Settings``.

The shared option machinery lives in ``options``; the commands, grouped by what they are
for, in ``produce`` (enqueue, jobs, job, trim), ``work`` (init, worker, reclaim), ``ops``
(lag, top, exporter, search), ``dlq`` (the dlq group) and ``bench``. Command modules
import nothing heavy at the top (torch, pymilvus, numpy load inside command bodies), so
the CLI starts fast and ``init``/``enqueue`` run in the small producer image.
"""

from __future__ import annotations

import click

from embedq.cli import bench, dlq, ops, produce, work


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="embedq")
def main() -> None:
    """embedq: a queue-driven embedding fleet (Redis Streams → transformer → Milvus)."""


# Registered here, not with @main.command() in each module, so that no command module
# imports this package back (no import cycle). --help lists them sorted by name.
for command in (
    produce.enqueue,
    produce.jobs,
    produce.job,
    produce.trim,
    work.init,
    work.worker,
    work.reclaim,
    ops.lag,
    ops.top,
    ops.exporter,
    ops.search,
    dlq.dlq,
    bench.bench,
):
    main.add_command(command)

__all__ = ["main"]
