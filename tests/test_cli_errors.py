"""Every command × each first-day mistake (issue 18), with flags and EMBEDQ_* variables.
Each asserts the exit code (``embedq.core.errors.ExitCode``), one ``embedq: ...`` line on stderr
that names what is wrong (the flag or the variable it came from, the host:port it tried)
and what to do, no traceback, and no password anywhere.

The table runs in-process through click's ``CliRunner`` (issue 24: one subprocess per row
took 274 s for 228 rows); ``test_a_real_process_*`` runs a few rows as a user runs them, a
subprocess, to prove the exit status and stderr of a real process."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import CompletedProcess
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from embedq.api.serve import check_exposure
from embedq.cli import main
from embedq.core.config import Settings
from embedq.core.errors import ConfigError, ExitCode

from .conftest import REDIS_URL, SAMPLE
from .support.cli import JSON_LOGS, process_globals_restored
from .support.cli import embedq as embedq_process

SECRET = "s3cret-pw-18"
REDIS = urlsplit(REDIS_URL)
REDIS_AT = f"{REDIS.hostname}:{REDIS.port or 6379}"


@dataclass(frozen=True)
class Command:
    args: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)


# Every command that talks to Redis, with the arguments it needs to get that far. The
# worker and reclaim wait for Redis (60 s by default): here 0.2 s (dozens of rows wait).
_WAIT = {"EMBEDQ_CONNECT_TIMEOUT_S": "0.2"}
_REDIS_COMMANDS = {
    "enqueue": Command(("enqueue", str(SAMPLE))),
    "delete": Command(("delete", "doc-1")),
    "jobs": Command(("jobs",)),
    "job": Command(("job", "nope")),
    "trim": Command(("trim",)),
    "init": Command(("init",)),
    "worker": Command(("worker", "--drain"), _WAIT),
    "reclaim": Command(("reclaim", "--once"), _WAIT),
    "lag": Command(("lag",)),
    "top": Command(("top", "--iterations", "1")),
    "usage": Command(("usage",)),
    "dlq list": Command(("dlq", "list")),
    "dlq show": Command(("dlq", "show", "1-0")),
    "dlq retry": Command(("dlq", "retry", "1-0")),
    "dlq purge": Command(("dlq", "purge", "--all")),
}
REDIS_COMMANDS = {k: c for k, c in _REDIS_COMMANDS.items() if c.args[0] in main.commands}
# Settings are checked before anything runs: the exporter too (it serves until stopped).
SETTINGS_COMMANDS = {
    **REDIS_COMMANDS,
    "exporter": Command(("exporter", "--metrics-port", "1")),
    **{k: c for k, c in {"verify": Command(("verify",))}.items() if k in main.commands},
}
MILVUS_COMMANDS = {
    "search": Command(("search", "anything")),
    **{k: c for k, c in {"verify": Command(("verify",))}.items() if k in main.commands},
    "init --with-collection": Command(("init", "--with-collection")),
    "worker": Command(("worker", "--drain")),
    "reclaim": Command(("reclaim", "--once")),
}


@dataclass(frozen=True)
class Mistake:
    flags: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    code: int = ExitCode.USAGE
    says: tuple[str, ...] = ()  # in the one line, in this order


def embedq(args: tuple[str, ...], env: dict[str, str]) -> CompletedProcess[str]:
    """``embedq ARGS`` in this process, as a fresh process would run it: no EMBEDQ_* but
    ``env``'s, the logging set-up of the command, then this process's put back."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("EMBEDQ_")}
    env = {"HF_HUB_OFFLINE": "1", "EMBEDQ_LOG_JSON": "1", **env}
    cwd = Path.cwd()
    os.chdir(tempfile.gettempdir())  # where a default ./embedq.db would land, not the checkout
    try:
        with process_globals_restored():
            ran = CliRunner().invoke(main, list(args), env={**clean, **env}, prog_name="embedq")
    finally:
        os.chdir(cwd)
    stderr = ran.stderr
    if ran.exception is not None and not isinstance(ran.exception, SystemExit):
        assert ran.exc_info is not None  # an uncaught exception: a process prints its traceback
        stderr += "".join(traceback.format_exception(*ran.exc_info))
    # A CompletedProcess, as embedq_process returns: check() reads either. (Named without
    # "subprocess." so that tests/support/layers.py keeps this helper in the fast layer.)
    return CompletedProcess(["embedq", *args], ran.exit_code, ran.stdout, stderr)


def check(run: CompletedProcess[str], mistake: Mistake, warnings: int = 0) -> str:
    """The run failed as ``mistake`` says, on one line (log events aside); returns it."""
    everything = run.stdout + run.stderr
    assert "Traceback" not in everything, run.stderr[-3000:]
    assert SECRET not in everything
    said = [line for line in run.stderr.splitlines() if not line.startswith("{")]
    assert run.returncode == mistake.code, run.stderr[-3000:]
    assert len(said) == 1 + warnings, said
    line = said[-1]
    assert line.startswith("embedq: ")
    at = 0
    for part in mistake.says:
        found = line.find(part, at)
        assert found >= 0, (part, line)
        at = found + len(part)
    return line


# -- settings: bad URLs and values, through flags and through variables ------------------

SETTINGS_MISTAKES = {
    "url without a scheme (flag)": Mistake(
        ("--redis-url", "127.0.0.1:6379"),
        says=("--redis-url", "is not a Redis URL", "write redis://127.0.0.1:6379/0"),
    ),
    "http url with a password (variable)": Mistake(
        env={"EMBEDQ_REDIS_URL": f"http://embedq:{SECRET}@127.0.0.1:6379/0"},
        says=("EMBEDQ_REDIS_URL", "is not a Redis URL", "redis://embedq:***@127.0.0.1:6379/0"),
    ),
    "database that is not a number (variable)": Mistake(
        env={"EMBEDQ_REDIS_URL": "redis://127.0.0.1:6379/tasks"},
        says=("EMBEDQ_REDIS_URL", "database number"),
    ),
    "not an integer (flag)": Mistake(
        ("--partitions", "abc"), says=("--partitions", "not a valid integer", "--help")
    ),
    "not an integer (variable)": Mistake(
        env={"EMBEDQ_PARTITIONS": "abc"}, says=("EMBEDQ_PARTITIONS", "not a valid integer")
    ),
    "out of range (variable)": Mistake(
        env={"EMBEDQ_PARTITIONS": "0"}, says=("EMBEDQ_PARTITIONS must be > 0",)
    ),
}


@pytest.mark.parametrize("mistake", SETTINGS_MISTAKES.values(), ids=SETTINGS_MISTAKES)
@pytest.mark.parametrize("command", SETTINGS_COMMANDS.values(), ids=SETTINGS_COMMANDS)
def test_a_bad_setting_is_one_line_naming_the_flag_or_variable(
    command: Command, mistake: Mistake
) -> None:
    check(embedq((*command.args, *mistake.flags), {**command.env, **mistake.env}), mistake)


# Settings of some commands only, each through its flag and through its variable.
OWN_SETTINGS = [
    ("lag", (), {"EMBEDQ_LOG_LEVEL": "verbose"}, ("EMBEDQ_LOG_LEVEL", "'verbose' is not one of")),
    ("top", ("--connect-timeout", "-1"), {}, ("--connect-timeout", "x>=0")),
    ("enqueue", ("--chunk", "0"), {}, ("--chunk must be > 0",)),
    ("enqueue", (), {"EMBEDQ_ENQUEUE_CHUNK": "0"}, ("EMBEDQ_ENQUEUE_CHUNK must be > 0",)),
    ("enqueue", (), {"EMBEDQ_MAX_LAG": "-1"}, ("EMBEDQ_MAX_LAG must be >= 0",)),
    ("worker", ("--trim-interval", "-1"), {}, ("--trim-interval must be >= 0",)),
    (
        "worker",
        ("--milvus-timeout", "120"),
        {},
        ("--milvus-timeout (120.0)", "shorter than --min-idle (60.0)"),
    ),
    (
        "reclaim",
        (),
        {"EMBEDQ_MIN_IDLE_S": "5"},
        ("--milvus-timeout (10.0)", "shorter than EMBEDQ_MIN_IDLE_S (5.0)"),
    ),
    ("worker", (), {"EMBEDQ_READ_COUNT": "0"}, ("EMBEDQ_READ_COUNT must be > 0",)),
    ("worker", ("--dtype", "fp8"), {}, ("--dtype", "'fp8' is not one of")),
    ("search", (), {"EMBEDQ_MILVUS_TIMEOUT_S": "0"}, ("EMBEDQ_MILVUS_TIMEOUT_S (0.0)",)),
    ("search", ("--top-k", "0"), {}, ("--top-k", "0 is not in the range")),
    ("bench", ("--corpus", str(SAMPLE), "--read-count", "0"), {}, ("--read-count must be > 0",)),
    ("bench", ("--corpus", str(SAMPLE)), {"EMBEDQ_MAX_BATCH_ROWS": "-1"}, ("EMBEDQ_MAX_",)),
]


@pytest.mark.parametrize(("name", "flags", "env", "says"), OWN_SETTINGS)
def test_a_commands_own_settings_are_named_as_given(
    name: str, flags: tuple[str, ...], env: dict[str, str], says: tuple[str, ...]
) -> None:
    command = {**SETTINGS_COMMANDS, **MILVUS_COMMANDS}.get(name, Command((name,)))
    check(embedq((*command.args, *flags), {**command.env, **env}), Mistake(says=says))


@pytest.mark.parametrize(
    "command",
    [*SETTINGS_COMMANDS.values(), Command(("search", "x", "--top-k", "0")), Command(("bench",))],
    ids=[*SETTINGS_COMMANDS, "search", "bench"],
)
def test_a_misspelled_variable_is_warned_about_with_the_name_it_meant(command: Command) -> None:
    env = {**command.env, "EMBEDQ_CHUNK": "5", "EMBEDQ_STRAEM": "x", "EMBEDQ_MIN_IDLE": "9"}
    flags = ("--redis-url", "127.0.0.1:6379") if command in SETTINGS_COMMANDS.values() else ()
    ran = embedq((*command.args, *flags), env)
    assert ran.returncode == ExitCode.USAGE and "Traceback" not in ran.stderr
    warnings = [line for line in ran.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "embedq: warning: EMBEDQ_CHUNK is not an embedq setting, ignored; "
        "did you mean EMBEDQ_ENQUEUE_CHUNK?",
        "embedq: warning: EMBEDQ_MIN_IDLE is not an embedq setting, ignored; "
        "did you mean EMBEDQ_MIN_IDLE_S?",
        "embedq: warning: EMBEDQ_STRAEM is not an embedq setting, ignored; "
        "did you mean EMBEDQ_STREAM?",
    ]


# -- Redis not where the URL says, or not Redis ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def not_redis() -> Iterator[dict[str, int]]:
    """Two ports where something else answers: one speaks HTTP (a protocol error to a Redis
    client), one hangs up at once (as PostgreSQL does at a Redis client's first bytes)."""
    ports: dict[str, int] = {}
    servers = []
    for name, reply in (("http", b"HTTP/1.1 400 Bad Request\r\n\r\n"), ("hangs up", b"")):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        ports[name] = int(server.getsockname()[1])
        servers.append(server)

        def serve(server: socket.socket = server, reply: bytes = reply) -> None:
            while True:
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    if reply:
                        conn.sendall(reply)

        threading.Thread(target=serve, daemon=True).start()
    yield ports
    for server in servers:
        server.close()


def server_mistakes(ports: dict[str, int]) -> dict[str, Mistake]:
    closed = _free_port()
    db99 = f"{REDIS.scheme}://{REDIS.netloc}/99"
    return {
        "database out of range (variable)": Mistake(
            env={"EMBEDQ_REDIS_URL": db99},
            says=("DB index is out of range", f"redis at {REDIS_AT}, set by EMBEDQ_REDIS_URL"),
        ),
        "wrong port (flag)": Mistake(
            ("--redis-url", f"redis://embedq:{SECRET}@127.0.0.1:{closed}/0"),
            code=ExitCode.CONNECT,
            says=("connection refused", f"redis at 127.0.0.1:{closed}, set by --redis-url"),
        ),
        "unknown host (variable)": Mistake(
            env={"EMBEDQ_REDIS_URL": "redis://nonexistent-host.invalid:6379/0"},
            code=ExitCode.CONNECT,
            says=("unknown host", "redis at nonexistent-host.invalid:6379, set by EMBEDQ_"),
        ),
        "an http port (flag)": Mistake(
            ("--redis-url", f"redis://127.0.0.1:{ports['http']}/0"),
            says=("does not speak the Redis protocol", f"redis at 127.0.0.1:{ports['http']}"),
        ),
        "a port that hangs up (variable)": Mistake(
            env={"EMBEDQ_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{ports['hangs up']}/0"},
            code=ExitCode.CONNECT,
            says=("closed the connection", f"redis at 127.0.0.1:{ports['hangs up']}"),
        ),
        "gave up after --connect-timeout (variable)": Mistake(
            ("--redis-url", f"redis://127.0.0.1:{closed}/0"),
            env={"EMBEDQ_CONNECT_TIMEOUT_S": "0.2"},
            code=ExitCode.CONNECT,
            says=("connection refused", "gave up after 0.2 s", f"redis at 127.0.0.1:{closed}"),
        ),
    }


SERVER_MISTAKES = server_mistakes({"http": 0, "hangs up": 0})  # names only, for the ids


@pytest.mark.parametrize(
    ("command", "mistake_name"),
    [
        pytest.param(
            command,
            mistake,
            id=f"{name}-{mistake}",
        )
        for name, command in REDIS_COMMANDS.items()
        for mistake in SERVER_MISTAKES
    ],
)
def test_redis_out_of_reach_is_one_line_naming_host_and_port(
    command: Command, mistake_name: str, not_redis: dict[str, int]
) -> None:
    mistake = server_mistakes(not_redis)[mistake_name]
    check(embedq((*command.args, *mistake.flags), {**command.env, **mistake.env}), mistake)


# -- Milvus: a Lite path in a folder that does not exist, a server that is not there ---------


@pytest.mark.parametrize("command", MILVUS_COMMANDS.values(), ids=MILVUS_COMMANDS)
def test_a_milvus_lite_path_in_a_missing_folder_says_so(
    command: Command, tmp_path: Path, stream_name: str
) -> None:
    path = tmp_path / "nonexistent-dir" / "x.db"
    mistake = Mistake(
        ("--milvus-uri", str(path)),
        env={"EMBEDQ_REDIS_URL": REDIS_URL, "EMBEDQ_STREAM": stream_name},
        says=("the folder of the Milvus Lite database", "does not exist", "mkdir -p"),
    )
    check(embedq((*command.args, *mistake.flags), {**command.env, **mistake.env}), mistake)
    assert not path.parent.exists()


def test_search_where_no_worker_wrote_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "embedq.db"
    mistake = Mistake(("--milvus-uri", str(path)), says=("no Milvus Lite database at",))
    check(embedq(("search", "anything", *mistake.flags), {}), mistake)
    assert not path.exists()  # it used to create an empty database there


def test_search_on_a_milvus_server_that_is_not_there_names_it() -> None:
    port = _free_port()
    mistake = Mistake(
        env={"EMBEDQ_MILVUS_URI": f"http://root:{SECRET}@127.0.0.1:{port}"},
        code=ExitCode.CONNECT,
        says=(f"milvus at 127.0.0.1:{port}, set by EMBEDQ_MILVUS_URI",),
    )
    check(embedq(("search", "x", "--milvus-timeout", "2"), mistake.env), mistake)


def test_a_worker_with_milvus_down_warns_once_then_fails_in_one_line(
    tiny_model: Path, stream_name: str
) -> None:
    """Issue 28: a worker waiting for Milvus printed a warning per retry before its final
    line. Now: one warning, the retries at debug, then the one line."""
    port = _free_port()
    env = {
        "EMBEDQ_REDIS_URL": REDIS_URL,
        "EMBEDQ_STREAM": stream_name,
        "EMBEDQ_MODEL": str(tiny_model),
        "EMBEDQ_MILVUS_URI": f"http://127.0.0.1:{port}",
        "EMBEDQ_LOG_LEVEL": "debug",  # the retries are there, one level down
    }
    ran = embedq(("worker", "--drain", "--milvus-timeout", "0.5", "--connect-timeout", "3"), env)
    check(ran, Mistake(code=ExitCode.CONNECT, says=(f"milvus at 127.0.0.1:{port}",)))
    events = [json.loads(line) for line in ran.stderr.splitlines() if line.startswith("{")]
    retries = [e for e in events if e["event"] == "infrastructure_error"]
    # (How many attempts fit in 3 s depends on the machine: tests/test_metrics.py counts.)
    assert [e["event"] for e in events if e["level"] == "warning"] == ["infrastructure_error"]
    assert {e["level"] for e in retries[1:]} <= {"debug"}
    assert events[-1]["level"] == "error"  # the final line, as an event too


def test_serve_refuses_another_address_than_loopback_without_keys_in_one_line() -> None:
    """Issue 28: `serve` bound 0.0.0.0 and, without keys, only warned. Now it binds
    127.0.0.1 by default and refuses any other address unless keys or --allow-anonymous."""
    assert Settings().api_host == "127.0.0.1"
    mistake = Mistake(says=("--host 0.0.0.0 serves other machines", "--allow-anonymous"))
    check(embedq(("serve", "--host", "0.0.0.0"), {"EMBEDQ_REDIS_URL": REDIS_URL}), mistake)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_exposure(Settings(api_host=host))
    for exposed in (
        Settings(api_host="0.0.0.0", api_keys="sk-1"),
        Settings(api_host="10.1.2.3", api_allow_anonymous=True),
        Settings.from_options(api_host="::", api_allow_anonymous=True),
    ):
        check_exposure(exposed)
    for host in ("::", "10.1.2.3", "gateway.internal", ""):
        with pytest.raises(ConfigError, match="no API key is set"):
            check_exposure(Settings(api_host=host))


# -- dead-letter ids ------------------------------------------------------------------------

_LOOK = "those look like 1718000000000-0"
DLQ_MISTAKES = [
    (("dlq", "show", "garbage"), ("'garbage' is not a dead-letter id", _LOOK, "dlq list")),
    (("dlq", "retry", "doc-7#0"), ("'doc-7#0' is not a dead-letter id", _LOOK)),
    (("dlq", "purge", "1-0", "doc-7#0"), ("'doc-7#0' is not a dead-letter id", _LOOK)),
    (("dlq", "show", "0/x-1"), ("'0/x-1' is not a dead-letter id", _LOOK)),
    (("dlq", "retry", "--reason", "empty_text"), ("--reason needs --all", "--help")),
    (("dlq", "retry"), ("give dead-letter ids or --all", "--help")),
    (("dlq", "purge"), ("give dead-letter ids or --all", "--help")),
]


@pytest.mark.parametrize(("args", "says"), DLQ_MISTAKES, ids=[" ".join(a) for a, _ in DLQ_MISTAKES])
def test_a_bad_dead_letter_id_is_one_line(args: tuple[str, ...], says: tuple[str, ...]) -> None:
    env = {"EMBEDQ_REDIS_URL": REDIS_URL, "EMBEDQ_STREAM": "embedq-test:no-such-stream"}
    check(embedq(args, env), Mistake(says=says))


# -- the rest of the first day ----------------------------------------------------------------


def test_on_a_terminal_a_failure_is_exactly_one_line() -> None:
    """Key=value logs (stderr a terminal) do not repeat the failure as an event."""
    ran = embedq(("lag", "--redis-url", f"redis://127.0.0.1:{_free_port()}/0"), {})
    assert len([x for x in ran.stderr.splitlines() if not x.startswith("{")]) == 1
    console = embedq(
        ("lag", "--redis-url", f"redis://127.0.0.1:{_free_port()}/0"), {"EMBEDQ_LOG_JSON": "0"}
    )
    assert console.returncode == ExitCode.CONNECT
    assert console.stderr.count("\n") == 1 and console.stderr.startswith("embedq: ")


def test_every_command_is_in_the_table_and_shows_its_variables() -> None:
    # serve and migrate check their own flags in tests/test_api_limits.py and test_migrate.py.
    tables = {*SETTINGS_COMMANDS, *MILVUS_COMMANDS, "search", "bench", "dlq", "serve", "migrate"}
    names = {c.split()[0] for c in tables}
    assert set(main.commands) <= names, "add the new command to the tables above"
    for name in ("lag", "enqueue", "worker", "search"):
        shown = embedq((name, "--help"), {}).stdout
        assert "env var: EMBEDQ_LOG_LEVEL" in " ".join(shown.split())
    enqueue = " ".join(embedq(("enqueue", "--help"), {}).stdout.split())
    assert "--chunk" in enqueue and "EMBEDQ_ENQUEUE_CHUNK" in enqueue
    search = embedq(("search", "--help"), {}).stdout
    assert "--store-text" not in search and "[debug|info|warning|error]" in search


# -- the same, as a user runs it: a real process --------------------------------------------


def process_rows() -> dict[str, tuple[Command, Mistake, int]]:
    """A row of each kind above: (command, mistake, warnings before the line)."""
    closed = server_mistakes({"http": 0, "hangs up": 0})["wrong port (flag)"]
    misspelled = {"EMBEDQ_CHUNK": "5", "EMBEDQ_STRAEM": "x", "EMBEDQ_MIN_IDLE": "9"}
    return {
        "a bad setting exits USAGE": (
            SETTINGS_COMMANDS["lag"],
            SETTINGS_MISTAKES["url without a scheme (flag)"],
            0,
        ),
        "redis out of reach exits CONNECT after the wait": (REDIS_COMMANDS["worker"], closed, 0),
        "misspelled variables warn first": (
            Command(("enqueue", str(SAMPLE)), misspelled),
            SETTINGS_MISTAKES["url without a scheme (flag)"],
            3,
        ),
        "a console log (stderr a terminal) is one line": (
            Command(("lag",), {"EMBEDQ_LOG_JSON": "0"}),
            closed,
            0,
        ),
    }


@pytest.mark.parametrize("row", list(process_rows()))
def test_a_real_process_exits_with_the_code_and_one_line_on_stderr(row: str) -> None:
    command, mistake, warnings = process_rows()[row]
    env = {**JSON_LOGS, **command.env, **mistake.env}
    ran = embedq_process(*command.args, *mistake.flags, env=env, fresh=True)
    check(ran, mistake, warnings)
    if command.env.get("EMBEDQ_LOG_JSON") == "0":  # no JSON events either: the line alone
        assert ran.stderr.count("\n") == 1, ran.stderr
