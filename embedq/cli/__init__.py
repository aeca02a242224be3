"""The ``embedq`` command: a thin click group over the library.

Every option is a flag that also reads ``EMBEDQ_<NAME>`` (e.g. ``--redis-url`` and
``EMBEDQ_REDIS_URL``); defaults come from ``embedq.core.config.Settings``.

The shared option machinery lives in ``options``; the commands, grouped by what they are
for, in ``produce`` (enqueue, jobs, job, trim), ``work`` (init, worker, reclaim), ``ops``
(lag, top, exporter, search), ``dlq`` (the dlq group), ``migrate`` and ``bench``. Command modules
import nothing heavy at the top (torch, pymilvus, numpy load inside command bodies), so
the CLI starts fast and ``init``/``enqueue`` run in the small producer image.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

from embedq.cli import bench, dlq, migrate, ops, produce, serve, verify, work
from embedq.cli.feedback import one_line, unknown_variables
from embedq.core.errors import ExitCode


class Embedq(click.Group):
    """The group, with click's own errors (a bad flag, a bad value in a flag or an
    ``EMBEDQ_*`` variable) on one line like embedq's (``embedq: ...``), not usage + hint +
    error on three, and Ctrl-C as ``ExitCode.INTERRUPTED``."""

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # `embedq` alone: the help, as click shows it
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"embedq: {one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("embedq: interrupted", err=True)
            sys.exit(int(ExitCode.INTERRUPTED))
        sys.exit(code if isinstance(code, int) else 0)


@click.group(
    cls=Embedq,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="embedq")
@click.pass_context
def main(ctx: click.Context) -> None:
    """embedq: a queue-driven embedding fleet (Redis Streams → transformer → Milvus).

    Every setting is a flag and an EMBEDQ_* variable (shown in each command's --help);
    flags win.
    """
    # A misspelled variable would otherwise be ignored without a word (issue 18).
    for warning in unknown_variables(os.environ, ctx.command):
        click.echo(warning, err=True)


# Registered here, not with @main.command() in each module, so that no command module
# imports this package back (no import cycle). --help lists them sorted by name.
for command in (
    produce.enqueue,
    produce.delete,
    verify.verify,
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
    migrate.migrate,
    serve.serve,
    serve.usage,
    dlq.dlq,
    bench.bench,
):
    main.add_command(command)

__all__ = ["main"]
