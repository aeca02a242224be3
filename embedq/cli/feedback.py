"""What the ``embedq`` command says when something is wrong (issue 18): one line on stderr,
naming each setting as the user gave it (``--chunk`` on the command line,
``EMBEDQ_ENQUEUE_CHUNK`` from the environment, never the internal ``enqueue_chunk``), and
a warning for an ``EMBEDQ_*`` variable no command reads, with the name it was probably
meant to be."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import click
from click.core import ParameterSource

from embedq.core.config import ENV_PREFIX, Settings

# Read by something other than an option: compose.yaml's .env holds the Redis password it
# puts into EMBEDQ_REDIS_URL, and the test suite has its own (EMBEDQ_TEST_REDIS_URL, ...).
_NOT_OPTIONS = ("EMBEDQ_REDIS_PASSWORD",)
_NOT_OPTIONS_PREFIX = "EMBEDQ_TEST_"

# Field names with an underscore cannot be ordinary words in a message, so they are named
# for the user wherever they appear; one-word fields only where the error says so
# (``InvalidSetting.settings``).
_MULTI_WORD_FIELDS = tuple(f.name for f in dataclasses.fields(Settings) if "_" in f.name)


def _option(ctx: click.Context, name: str) -> click.Option | None:
    for param in ctx.command.params:
        if isinstance(param, click.Option) and param.name == name:
            return param
    return None


def flag_of(param: click.Option) -> str:
    """The flag the docs and ``--help`` lead with: the shortest long one (``--chunk``
    rather than ``--enqueue-chunk``)."""
    long = [o for o in param.opts if o.startswith("--")] or list(param.opts)
    return min(long, key=len)


def given_as(ctx: click.Context, name: str) -> str:
    """How the user set ``Settings.<name>`` for this command: its variable when it came
    from the environment, else its flag; the field name when the command has no option."""
    param = _option(ctx, name)
    if param is None:
        return name
    if ctx.get_parameter_source(name) is ParameterSource.ENVIRONMENT and isinstance(
        param.envvar, str
    ):
        return param.envvar
    return flag_of(param)


def set_by(ctx: click.Context, name: str) -> str:
    """Where the value of ``Settings.<name>`` came from, for a message: ``set by --x``,
    ``set by EMBEDQ_X``, or ``the default of --x (EMBEDQ_X)``."""
    param = _option(ctx, name)
    if param is None:
        return f"setting {name}"
    source = ctx.get_parameter_source(name)
    if source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT):
        return f"set by {given_as(ctx, name)}"
    return f"the default of {flag_of(param)} ({param.envvar})"


def for_the_user(ctx: click.Context, message: str, named: Iterable[str] = ()) -> str:
    """``message`` with setting names replaced by ``given_as``."""
    names = set(named) | set(_MULTI_WORD_FIELDS)
    for name in sorted(names, key=len, reverse=True):
        pattern = rf"(?<![\w-]){re.escape(name)}(?![\w-])"
        # A function, not a template: a name is never read as a backreference.
        message = re.sub(pattern, _constant(given_as(ctx, name)), message)
    return message


def _constant(text: str) -> Callable[[re.Match[str]], str]:
    return lambda _: text


def one_line(exc: click.ClickException) -> str:
    """A click error (bad flag, bad value, missing argument) as one line that names the
    variable when the bad value came from one, and says where help is."""
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.BadParameter) and ctx is not None:
        param = exc.param
        if isinstance(param, click.Option) and param.name:
            from_env = ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT
            # click names the flag (and, with show_envvar, the variable too) either way.
            exc.param_hint = given_as(ctx, param.name) if from_env else flag_of(param)
    message = " ".join(exc.format_message().split())
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += f" (see: {ctx.command_path} --help)"
    return message


def _walk(command: click.Command) -> Iterator[click.Option]:
    for param in command.params:
        if isinstance(param, click.Option):
            yield param
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            yield from _walk(sub)


def unknown_variables(environ: Mapping[str, str], root: click.Command) -> list[str]:
    """A warning for each ``EMBEDQ_*`` variable that no command of ``root`` reads, with the
    one it most likely meant: the variable of the flag it spells (``EMBEDQ_CHUNK`` for
    ``--chunk`` is ``EMBEDQ_ENQUEUE_CHUNK``), else the closest name."""
    known: set[str] = set(_NOT_OPTIONS)
    by_flag: dict[str, str] = {}
    for param in _walk(root):
        if not isinstance(param.envvar, str):
            continue
        known.add(param.envvar)
        for flag in param.opts:
            if flag.startswith("--"):
                by_flag[ENV_PREFIX + flag[2:].upper().replace("-", "_")] = param.envvar
    warnings = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        if name.startswith(_NOT_OPTIONS_PREFIX):
            continue
        guess = by_flag.get(name) or _closest(name, known)
        hint = f"did you mean {guess}?" if guess else "see embedq COMMAND --help for the names"
        warnings.append(f"embedq: warning: {name} is not an embedq setting, ignored; {hint}")
    return warnings


def _closest(name: str, known: Iterable[str]) -> str | None:
    """The known variable closest to ``name``, compared without the common prefix (which
    would make every pair look alike)."""
    tails = {k.removeprefix(ENV_PREFIX): k for k in known}
    found = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), list(tails), n=1, cutoff=0.6)
    return tails[found[0]] if found else None
