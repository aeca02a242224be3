"""What a model migration costs (issue 26): the backfill's rows/s, and the live drain's
throughput while both consumer groups run (the old model's workers beside the new one's)
against the same drain alone.

Real processes: a private ``redis-server``, ``milvus-lite server``, ``embedq worker
--drain`` and ``embedq migrate --backfill``. The old model is ``--model`` (default: the
packaged one); the new one is the same weights cut to ``--new-dimensions`` (another
fingerprint, the same forward pass), so the figures are the migration's, not a model's.
Each run sends ``--rows`` updates of the corpus's ids and times the old model's drain alone
(then lets the new group catch up, untimed), then sends as many again and times both
drains running at once. Rates are the workers' own (``worker_stopped``'s ``texts`` over
``working_s``: model loading excluded).

    python -m embedq.bench.migration --rows 2000 --runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from embedq.bench.servers import RedisServer, Server, find_binary, milvus_answers
from embedq.producer.client import Producer

STREAM, GROUP, NAME = "bench:migration", "embedq", "docs"


class MilvusLite(Server):
    """``milvus-lite server`` on a free port (several processes share one database)."""

    name = "milvus-lite"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MilvusLite:
        binary = find_binary("milvus-lite", "pip install milvus-lite")
        args = ["server", "--data-dir", str(self.dir), "--host", "127.0.0.1"]
        self._launch([binary, *args, "--port", str(self.port)])
        self._wait_ready(lambda: milvus_answers(self.uri), 60, 0.2)
        return self


def _embedq(*args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = log.open("wb") if log else subprocess.DEVNULL
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDQ_LOG_JSON": "true"}
    return subprocess.Popen(
        [sys.executable, "-m", "embedq.cli", *args], stdout=out, stderr=out, env=env
    )


def _rate(log: Path) -> float:
    """texts/s of a drained worker, from its ``worker_stopped`` line."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if '"worker_stopped"' in line:
            found = json.loads(line)
            return float(found["texts"]) / max(float(found["working_s"]), 1e-9)
    raise RuntimeError(f"no worker_stopped line in {log}")


class Bench:
    def __init__(self, args: argparse.Namespace, redis_url: str, milvus_uri: str, tmp: Path):
        self.args, self.tmp = args, tmp
        self.where = ["--redis-url", redis_url, "--stream", STREAM, "--group", GROUP]
        self.where += ["--milvus-uri", milvus_uri, "--collection", NAME]
        self.old = ["--model", args.model] if args.model else []
        self.new = [*self.old, "--dimensions", str(args.new_dimensions), "--force-dimensions"]
        self.logs = 0

    def drain(self, *models: list[str]) -> list[float]:
        """Drain with one worker per model, at once; each one's texts/s."""
        procs = []
        for model in models:
            self.logs += 1
            log = self.tmp / f"worker-{self.logs}.log"
            args = ["worker", "--drain", "--no-online", "--metrics-port", "0", *model]
            procs.append((_embedq(*args, *self.where, log=log), log))
        for proc, log in procs:
            if proc.wait(1800) != 0:
                raise RuntimeError(f"worker failed: {log.read_text(errors='replace')[-2000:]}")
        return [_rate(log) for _, log in procs]

    def backfill(self) -> tuple[int, float]:
        """(rows copied, seconds) of ``migrate --backfill``."""
        log = self.tmp / "migrate.log"
        proc = _embedq("migrate", "--backfill", "--adopt", *self.new, *self.where, log=log)
        if proc.wait(3600) != 0:
            raise RuntimeError(f"migrate failed: {log.read_text(errors='replace')[-2000:]}")
        for line in log.read_text(errors="replace").splitlines():
            if '"backfill_done"' in line:
                found = json.loads(line)
                return int(found["total"]), float(found["elapsed_s"])
        raise RuntimeError("no backfill_done line")


def _rows(corpus: Path, n: int, tag: str) -> list[dict[str, Any]]:
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]
    return [{"id": f"d{i}", "text": f"{texts[i % len(texts)]} ({tag} {i})"} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path("examples/sample.jsonl"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--model", default="", help="the old model (default: packaged)")
    parser.add_argument("--new-dimensions", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        with RedisServer(tmp / "redis") as redis_server, MilvusLite(tmp / "milvus") as milvus:
            producer = Producer(redis_server.client(), STREAM)
            bench = Bench(args, redis_server.url, milvus.uri, tmp)
            producer.enqueue(_rows(args.corpus, args.rows, "first"))
            first = bench.drain(bench.old)[0]
            total, seconds = bench.backfill()
            alone, beside, new_rates = [], [], []
            for run in range(args.runs):
                producer.enqueue(_rows(args.corpus, args.rows, f"alone {run}"))
                alone += bench.drain(bench.old)
                bench.drain(bench.new)  # the new group catches up, untimed
                producer.enqueue(_rows(args.corpus, args.rows, f"both {run}"))
                old_rate, new_rate = bench.drain(bench.old, bench.new)
                beside.append(old_rate)
                new_rates.append(new_rate)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "rows": args.rows,
        "runs": args.runs,
        "first_drain_texts_per_s": round(first, 1),
        "backfill_rows": total,
        "backfill_s": seconds,
        "backfill_rows_per_s": round(total / seconds, 1) if seconds else None,
        "old_drain_alone_texts_per_s": round(statistics.median(alone), 1),
        "old_drain_beside_new_texts_per_s": round(statistics.median(beside), 1),
        "new_drain_beside_old_texts_per_s": round(statistics.median(new_rates), 1),
        "old_drain_ratio_beside_over_alone": round(
            statistics.median(beside) / statistics.median(alone), 3
        ),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
