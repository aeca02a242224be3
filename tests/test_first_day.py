"""A first day without surprises (issue 18): the pieces behind the CLI's one-line errors,
monitoring from the first minute, and the small ones (an enqueue without SOURCE, an empty
source, blank lines, empty ids, job times)."""

from __future__ import annotations

import json
import os
import pty
from pathlib import Path
from subprocess import CompletedProcess

import click
import pytest
import redis
from structlog.testing import capture_logs

from embedq.cli import main
from embedq.cli.feedback import unknown_variables
from embedq.core.config import InvalidSetting, Settings, SettingsError
from embedq.core.errors import ConfigError
from embedq.core.progress import format_time_ms
from embedq.ops.top import Window
from embedq.producer.client import Producer
from embedq.producer.sources import Fields, Rejected, Source, first_or_none, to_item
from embedq.queue.dlq import check_refs
from embedq.queue.lag import ConsumerInfo, LagInfo, merge_partitions, partitions_found

from .conftest import REDIS_URL
from .support.cli import embedq as run_cli

# -- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("127.0.0.1:6379", "write redis://127.0.0.1:6379/0"),
        ("localhost:6379", "write redis://localhost:6379/0"),
        ("http://127.0.0.1:6379/0", "write redis://127.0.0.1:6379/0"),
        ("user:pw-1@host:6379", "'***@host:6379'"),
        ("redis://host:port/0", "port that is not a number"),
        ("redis://host:6379/tasks", "database number"),
    ],
)
def test_a_redis_url_redis_py_cannot_use_is_a_setting_error(url: str, says: str) -> None:
    with pytest.raises(InvalidSetting, match="redis_url") as caught:
        Settings(redis_url=url)
    assert says in str(caught.value) and "pw-1" not in str(caught.value)
    assert caught.value.settings == ("redis_url",)


def test_good_urls_pass_and_name_their_address() -> None:
    assert Settings(redis_url="rediss://u:p@h:6380/3").redis_address == "h:6380"
    assert Settings(redis_url="redis://h").redis_address == "h:6379"
    assert Settings(redis_url="unix:///tmp/r.sock").redis_address == "/tmp/r.sock"
    assert Settings(milvus_uri="http://root:x@m:19531").milvus_address == "m:19531"
    assert Settings(milvus_uri="./e.db").milvus_address == "./e.db"
    with pytest.raises(SettingsError, match="only database 0"):
        Settings(redis_url="redis://h:7000/2", redis_cluster=True, stream="s:{t}")


def test_a_setting_error_names_every_setting_it_is_about() -> None:
    for changes, named in [
        ({"partitions": 0}, ("partitions",)),
        ({"max_lag": -1}, ("max_lag",)),
        ({"connect_timeout_s": -1.0}, ("connect_timeout_s",)),
        ({"stream": "", "group": ""}, ("stream", "group")),
    ]:
        with pytest.raises(InvalidSetting) as caught:
            Settings(**changes)  # type: ignore[arg-type]
        assert caught.value.settings == named


def test_unknown_variables_are_warned_about_with_the_name_they_meant() -> None:
    environ = {
        "EMBEDQ_CHUNK": "1",  # the flag's spelling (--chunk)
        "EMBEDQ_GRACE": "1",  # --grace
        "EMBEDQ_STRAEM": "x",  # a typo
        "EMBEDQ_NOTHING_LIKE_IT": "1",
        "EMBEDQ_STREAM": "fine",
        "EMBEDQ_TEST_REDIS_URL": "the test suite's own",
        "EMBEDQ_REDIS_PASSWORD": "compose's .env",
        "PATH": "/bin",
    }
    warned = {w.split()[2]: w for w in unknown_variables(environ, main)}
    assert set(warned) == {
        "EMBEDQ_CHUNK",
        "EMBEDQ_GRACE",
        "EMBEDQ_STRAEM",
        "EMBEDQ_NOTHING_LIKE_IT",
    }
    assert warned["EMBEDQ_CHUNK"].endswith("did you mean EMBEDQ_ENQUEUE_CHUNK?")
    assert warned["EMBEDQ_GRACE"].endswith("did you mean EMBEDQ_GRACE_S?")
    assert warned["EMBEDQ_STRAEM"].endswith("did you mean EMBEDQ_STREAM?")
    assert "--help" in warned["EMBEDQ_NOTHING_LIKE_IT"]


def test_every_setting_option_shows_its_variable_in_help() -> None:
    def options(command: click.Command) -> list[click.Option]:
        found = [p for p in command.params if isinstance(p, click.Option) and p.envvar]
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                found += options(sub)
        return found

    hidden = [p.name for p in options(main) if not p.show_envvar and not p.hidden]
    assert hidden == []


def test_dead_letter_names_are_checked_before_redis_sees_them() -> None:
    check_refs(["1718000000000-0", "1718000000000", "3/1718000000000-12"])
    for bad in ("garbage", "doc-7#0", "3/doc", "1-2-3", ""):
        with pytest.raises(ConfigError, match="not a dead-letter id"):
            check_refs([bad])


# -- monitoring from the first minute ------------------------------------------------------


def info(*, exists: bool, length: int, lag: int | None, pending: int, read: int | None) -> LagInfo:
    return LagInfo("s", "g", length, lag, pending, None, read, [], 0, group_exists=exists)


def test_top_started_before_the_group_shows_throughput_at_its_second_sample() -> None:
    window = Window(window_s=60)
    window.add(info(exists=False, length=1000, lag=None, pending=0, read=None), at_s=0)
    rates = window.add(info(exists=True, length=1000, lag=880, pending=20, read=120), at_s=2)
    assert rates.done_per_s == pytest.approx(50.0)  # 100 acked in 2 s, not "unknown"
    assert rates.backlog == 900 and rates.backlog_change_per_s == pytest.approx(-50.0)


def test_a_partition_without_a_group_does_not_make_the_read_count_unknown() -> None:
    parts = [
        info(exists=True, length=10, lag=2, pending=1, read=8),
        info(exists=False, length=5, lag=None, pending=0, read=None),
    ]
    merged = merge_partitions("s", "g", parts)
    assert (merged.entries_read, merged.group_exists, merged.lag) == (8, False, None)
    none = merge_partitions("s", "g", [parts[1], parts[1]])
    assert none.entries_read is None
    consumers = [ConsumerInfo("w", 1, 5)]
    assert merge_partitions("s", "g", [parts[0]]).consumers == [] != consumers


def embedq(
    *args: str, env: dict[str, str], stdin: int | str | None = None
) -> CompletedProcess[str]:
    """The CLI against the suite's Redis (a first day's commands name none), ``env`` over it."""
    return run_cli(*args, env={"EMBEDQ_REDIS_URL": REDIS_URL, **env}, stdin=stdin)


def test_lag_without_partitions_says_where_the_partition_streams_are(
    redis_client: redis.Redis, stream_name: str
) -> None:
    for i in (0, 2):
        redis_client.xadd(f"{stream_name}:{{p{i}}}", {"id": str(i), "text": "t"})
    assert partitions_found(redis_client, stream_name) == 3
    assert partitions_found(redis_client, stream_name + ":other") == 0
    shown = embedq("lag", env={"EMBEDQ_STREAM": stream_name})
    assert shown.returncode == 0
    assert "add --partitions 3 (or EMBEDQ_PARTITIONS=3)" in shown.stdout
    as_json = embedq("lag", "--json", env={"EMBEDQ_STREAM": stream_name})
    assert json.loads(as_json.stdout)["length"] == 0
    assert "add --partitions 3" in as_json.stderr


def test_max_lag_without_a_group_says_no_worker_has_started(
    redis_client: redis.Redis, stream_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Paused(Exception):
        pass

    def paused(_s: float) -> None:
        raise Paused

    def why_it_waits() -> str:
        producer = Producer(redis_client, stream_name, group="g")
        with capture_logs() as events, pytest.raises(Paused):
            producer._wait_for_room(0, 0.01)
        return str(next(e for e in events if e["event"] == "backpressure_wait")["why"])

    redis_client.xadd(stream_name, {"id": "1", "text": "t"})
    monkeypatch.setattr("embedq.producer.client.time.sleep", paused)
    assert why_it_waits().startswith("no worker has started: consumer group g does not exist")
    redis_client.xgroup_create(stream_name, "g", id="0")
    assert "behind" in why_it_waits()


# -- the small ones ------------------------------------------------------------------------


def test_an_empty_id_is_not_called_a_missing_field() -> None:
    fields = Fields(id="doc_id")
    assert to_item({"doc_id": "", "text": "x"}, "f.csv:2", fields) == Rejected(
        "f.csv:2", "empty 'doc_id'"
    )
    assert to_item({"text": "x"}, "f.csv:3", fields) == Rejected("f.csv:3", "no 'doc_id' field")


def test_first_or_none_keeps_every_item() -> None:
    assert first_or_none(Source("empty", iter([]))) is None
    items = [Rejected("a", "r"), Rejected("b", "r")]
    assert list(first_or_none(Source("two", iter(items))) or []) == items


def test_an_empty_source_starts_no_job_and_a_job_shows_dates(stream_name: str) -> None:
    env = {"EMBEDQ_STREAM": stream_name}
    empty = embedq("enqueue", "-", env=env, stdin="")
    assert empty.returncode == 0 and "nothing to enqueue: standard input" in empty.stdout
    assert "no jobs" in embedq("jobs", env=env).stdout
    sent = embedq("enqueue", "--job", "first-day", env=env, stdin='{"id": "1", "text": "t"}\n')
    assert sent.returncode == 0, sent.stderr
    shown = embedq("job", "first-day", env=env).stdout
    assert "started          20" in shown and " UTC" in shown
    assert format_time_ms(0) == "1970-01-01 00:00:00 UTC"


def test_enqueue_without_source_on_a_terminal_says_what_it_needs(stream_name: str) -> None:
    leader, follower = pty.openpty()
    try:
        ran = embedq("enqueue", env={"EMBEDQ_STREAM": stream_name}, stdin=follower)
    finally:
        os.close(leader)
        os.close(follower)
    assert ran.returncode == 2
    assert ran.stderr.startswith("embedq: give a SOURCE: a file, a directory, or - ")
    assert "Traceback" not in ran.stderr


def test_a_text_files_blank_lines_are_counted(tmp_path: Path, stream_name: str) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("one\n\ntwo\n", encoding="utf-8")
    ran = embedq("enqueue", str(notes), env={"EMBEDQ_STREAM": stream_name})
    assert "enqueued 2 records" in ran.stdout and "(1 rejected)" in ran.stdout
