"""MkDocs hook (mkdocs.yml ``hooks``): the CLI and configuration references, generated.

``docs/reference/cli.md`` and ``docs/reference/configuration.md`` hold a marker
(``<!-- embedq:cli -->``, ``<!-- embedq:settings -->``) that this hook replaces, at build
time, with what the code says: every click command's help and options, and every field of
``embedq.core.config.Settings`` with its variable, default and flags. A renamed option or a
new setting therefore reaches the site without anyone editing it (issue 28).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click

CLI_MARKER = "<!-- embedq:cli -->"
SETTINGS_MARKER = "<!-- embedq:settings -->"


def _commands(group: click.Group, path: str) -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    ctx = click.Context(group, info_name=path)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        full = f"{path} {name}"
        found.append((full, command))
        if isinstance(command, click.Group):
            found.extend(_commands(command, full))
    return found


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def cli_reference() -> str:
    """Each command (``embedq`` group first) as a section: its help, then its ``--help``."""
    from embedq.cli import main

    parts: list[str] = []
    for path, command in [("embedq", main), *_commands(main, "embedq")]:
        ctx = click.Context(command, info_name=path, terminal_width=100, max_content_width=100)
        parts.append(f"## `{path}`\n")
        summary = (command.help or "").strip().split("\n\n", 1)[0]
        if summary:
            parts.append(_cell(summary) + "\n")
        parts.append("```text\n" + command.get_help(ctx).rstrip() + "\n```\n")
    return "\n".join(parts)


def _flags_by_variable() -> dict[str, list[tuple[str, str]]]:
    """``EMBEDQ_*`` -> [(flag spelling, help)] over every command."""
    from embedq.cli import main

    found: dict[str, list[tuple[str, str]]] = {}
    for _path, command in [("embedq", main), *_commands(main, "embedq")]:
        for param in command.params:
            if not isinstance(param, click.Option) or not isinstance(param.envvar, str):
                continue
            known = found.setdefault(param.envvar, [])
            for flag in param.opts + param.secondary_opts:
                if flag not in {f for f, _ in known}:
                    known.append((flag, param.help or ""))
    return found


def _default(field: dataclasses.Field[Any]) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
        return "empty" if value == "" else ("unset" if value is None else f"`{value}`")
    return "computed"  # a default_factory (the consumer name: <hostname>-<pid>)


def settings_reference() -> str:
    """One row per Settings field: variable, flags, default, what the option's help says."""
    from embedq.core.config import ENV_PREFIX, Settings

    flags = _flags_by_variable()
    rows = [
        "| setting | variable | flags | default | meaning |",
        "|---------|----------|-------|---------|---------|",
    ]
    for field in dataclasses.fields(Settings):
        variable = f"{ENV_PREFIX}{field.name.upper()}"
        options = flags.get(variable, [])
        shown = ", ".join(f"`{f}`" for f, _ in options) or "(none: tests or Python only)"
        meaning = next((h for _, h in options if h), "")
        rows.append(
            f"| `{field.name}` | `{variable}` | {shown} | {_cell(_default(field))} "
            f"| {_cell(meaning)} |"
        )
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, **_: Any) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, settings_reference())
    return markdown
