"""Enqueue throughput: `embedq enqueue` of N JSONL records into a local Redis.

    python scripts/bench_enqueue.py [--records 100000] [--runs 5] [--partitions 1]

Builds a JSONL file of N records (texts cycled from the shared corpus, ids unique), runs
`embedq enqueue FILE` as a user would, RUNS times, each into a fresh stream that is deleted
afterwards, and prints the median records/s two ways: the producer's own rate (from its
`enqueued` log line: reading, parsing, sending) and the whole command's wall time
(interpreter start and the line count for the progress total included).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import click
import redis

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "short.jsonl"
SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sample.jsonl"


def build_file(path: Path, records: int) -> None:
    source = CORPUS if CORPUS.is_file() else SAMPLE
    texts = [json.loads(line)["text"] for line in source.read_text(encoding="utf-8").splitlines()]
    with path.open("w", encoding="utf-8") as out:
        for i in range(records):
            out.write(json.dumps({"id": f"doc-{i}", "text": texts[i % len(texts)]}) + "\n")


@click.command()
@click.option("--records", default=100_000, show_default=True)
@click.option("--runs", default=5, show_default=True)
@click.option("--partitions", default=1, show_default=True)
@click.option("--redis-url", envvar="EMBEDQ_REDIS_URL", default="redis://127.0.0.1:6379/0")
def main(records: int, runs: int, partitions: int, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        build_file(path, records)
        producer_rates, wall_rates = [], []
        for _ in range(runs):
            stream = f"embedq-bench:{uuid.uuid4().hex[:8]}"
            command = ["enqueue", str(path), "--stream", stream, "--partitions", str(partitions)]
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "embedq.cli", *command],
                env={**os.environ, "EMBEDQ_REDIS_URL": redis_url, "EMBEDQ_LOG_JSON": "true"},
                capture_output=True,
                text=True,
                check=True,
            )
            wall_s = time.perf_counter() - started
            summary = next(
                json.loads(line)
                for line in done.stderr.splitlines()
                if line.startswith("{") and json.loads(line)["event"] == "enqueued"
            )
            assert summary["sent"] == records, summary
            keys = list(client.scan_iter(match=f"{stream}*"))
            client.delete(*keys)
            producer_rates.append(summary["records_per_s"])
            wall_rates.append(records / wall_s)
            click.echo(
                f"run: producer {summary['records_per_s']:,.0f}/s "
                f"({summary['elapsed_s']} s), command {records / wall_s:,.0f}/s ({wall_s:.2f} s)"
            )
    load = os.getloadavg()
    click.echo(
        f"median of {runs}: producer {statistics.median(producer_rates):,.0f} records/s, "
        f"whole command {statistics.median(wall_rates):,.0f} records/s "
        f"({records:,} records, {partitions} partition(s), load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
