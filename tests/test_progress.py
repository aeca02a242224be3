"""Say what is happening (issue 28): `embedq worker` said nothing for 15-45 s while torch
was imported and the model loaded. Its first line now comes before anything heavy is
imported, and a line follows every 10 s until the model is in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import structlog

from embedq.cli.progress import loading
from embedq.core.config import Settings

from .conftest import REDIS_URL

# Announces on stderr the moment torch starts to be imported.
WATCH_TORCH = """
import sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.stderr.write("TORCH IMPORT STARTS\\n")
            sys.stderr.flush()
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Watch())
from embedq.cli import main
main(sys.argv[1:], prog_name="embedq")
"""


def test_the_workers_first_line_comes_before_torch_is_imported(
    tmp_path: Path, tiny_model: Path, stream_name: str
) -> None:
    script = tmp_path / "watch.py"
    script.write_text(WATCH_TORCH)
    args = [
        *("worker", "--drain", "--redis-url", REDIS_URL, "--stream", stream_name),
        *("--milvus-uri", str(tmp_path / "milvus.db"), "--collection", "progress"),
        *("--model", str(tiny_model), "--device", "cpu", "--block-ms", "100", "--no-online"),
    ]
    ran = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDQ_LOG_JSON": "true"},
        timeout=240,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    lines = ran.stderr.splitlines()
    first = json.loads(lines[0])
    assert first["event"] == "loading_model" and first["model"] == str(tiny_model)
    assert "TORCH IMPORT STARTS" in lines[1:]
    events = [json.loads(line).get("event") for line in lines if line.startswith("{")]
    assert events.index("model_loaded") < events.index("worker_stopped")


def test_a_long_load_says_it_is_still_loading_until_the_model_is_in() -> None:
    big = Settings(model="/models/big")
    with structlog.testing.capture_logs() as logged, loading(big, every_s=0.01) as loaded:
        ticked = threading.Event()
        while not ticked.wait(0.01):
            if sum(e["event"] == "still_loading" for e in logged) >= 2:
                ticked.set()
        loaded()
        loaded()  # once is enough
    events = [e["event"] for e in logged]
    assert events[0] == "loading_model" and events[-1] == "model_loaded"
    assert events.count("model_loaded") == 1
    ticks = [e for e in logged if e["event"] == "still_loading"]
    assert all(t["model"] == "/models/big" for t in ticks)
    assert [t["elapsed_s"] for t in ticks] == sorted(t["elapsed_s"] for t in ticks)
