"""The README's "Using it" commands, run in order after `make demo` as the README says
(issue 18: its steps did not chain). The demo runs in a scratch directory that looks like
the repository (examples/, scripts/), so .demo/ is the test's own; the demo's stream name
`embedq:demo` is replaced by the test's, so that it shares no keys with anyone."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from .conftest import REDIS_URL

ROOT = Path(__file__).resolve().parents[1]
DEMO_STREAM = "embedq:demo"


def using_it() -> list[list[str]]:
    """The first ``sh`` block under "## Using it", one command (as words) per line."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Using it\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [words for line in block.splitlines() if (words := shlex.split(line, comments=True))]


def run(
    command: list[str], env: dict[str, str], cwd: Path, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.timeout(600)
def test_the_readme_commands_run_in_order_on_the_demos_data(
    tmp_path: Path, stream_name: str, redis_client: redis.Redis
) -> None:
    for name in ("examples", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "EMBEDQ_REDIS_URL": REDIS_URL,
        "EMBEDQ_STREAM": stream_name,
        "EMBEDQ_LOG_JSON": "1",
    }
    demo = run(["bash", "scripts/demo.sh"], env, tmp_path, timeout=400)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    assert "embedded 500 texts" in demo.stdout
    assert (tmp_path / ".demo" / "embedq.db").is_dir()
    # It keeps the rows' record (the index, the collection's epoch), not its work keys, so
    # that what it wrote can be checked and is not sent again (issue 25).
    left = {k.decode() for k in redis_client.scan_iter(match=f"{stream_name}*")}
    assert f"{stream_name}:index:demo" in left
    assert {k for k in left if not k.endswith((":index:demo", ":epoch"))} == set(), left
    demo_env = {**env, "EMBEDQ_MILVUS_URI": ".demo/embedq.db", "EMBEDQ_COLLECTION": "demo"}
    verified = run([sys.executable, "-m", "embedq.cli", "verify"], demo_env, tmp_path)
    assert verified.returncode == 0, verified.stdout[-2000:] + verified.stderr[-2000:]
    again = ["enqueue", "examples/sample.jsonl", "--dedup"]
    resent = run([sys.executable, "-m", "embedq.cli", *again], demo_env, tmp_path)
    assert resent.returncode == 0 and "enqueued 0 records" in resent.stdout, resent.stdout
    assert "500 unchanged" in resent.stdout

    outputs: list[str] = []
    for line in using_it():
        words = [w.replace(DEMO_STREAM, stream_name) for w in line]
        if words[0] == "export":
            env.update(dict(w.split("=", 1) for w in words[1:]))
            continue
        assert words[0] == "embedq", f"the README runs {words[0]}: teach this test"
        ran = run([sys.executable, "-m", "embedq.cli", *words[1:]], env, tmp_path)
        assert ran.returncode == 0, (words, ran.stdout[-2000:], ran.stderr[-3000:])
        outputs.append(ran.stdout)

    first_search, enqueued, waiting, worked, drained, last_search = outputs
    assert len(first_search.splitlines()) == 3 and "pydoc-" in first_search
    assert "enqueued 500 records" in enqueued
    assert "length 500" in waiting and "no worker has started" in waiting
    assert "embedded 500 texts" in worked
    assert "lag          0" in drained and "pending      0" in drained
    assert last_search == first_search
