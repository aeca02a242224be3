"""Peak RSS of one worker draining N texts, with Milvus in another process.

    milvus-lite server --data-dir /tmp/m --host 127.0.0.1 --port 19531 &
    python scripts/bench_memory.py 300 http://127.0.0.1:19531
    python scripts/bench_memory.py 3000 http://127.0.0.1:19531

Uses the Redis at 127.0.0.1:6379 (a fresh stream, deleted afterwards) and the first N texts
of ../shared/corpus/long.jsonl. Compare the peaks: the worker's own state is bounded.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import uuid
from pathlib import Path

from embedq.core import logs
from embedq.core.config import Settings
from embedq.producer.client import Producer
from embedq.queue.connection import connect
from embedq.worker.heap import settle_heap
from embedq.worker.launch import build_worker

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "long.jsonl"


def main() -> None:
    n, uri = int(sys.argv[1]), sys.argv[2]
    with CORPUS.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line, _ in zip(handle, range(n), strict=False)]
    stream = f"embedq-bench-memory:{uuid.uuid4().hex[:8]}"
    client = connect("redis://127.0.0.1:6379/0")
    Producer(client, stream).enqueue(rows)
    settings = Settings(
        stream=stream,
        group="g",
        consumer="c",
        milvus_uri=uri,
        collection="mem_" + uuid.uuid4().hex[:6],
        drain=True,
        block_ms=100,
        log_level="warning",
    )
    logs.configure("warning")
    worker = build_worker(settings)
    settle_heap()  # as `embedq worker` does once the model is loaded
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    started = time.monotonic()
    worker.run()
    wall = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"texts={n} rss_after_model_load={loaded}MB peak_rss={peak}MB wall={wall:.1f}s")
    client.delete(stream)


if __name__ == "__main__":
    main()
