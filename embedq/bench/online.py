"""The online gateway's benchmark: requests/s and p50/p95/p99 latency of ``POST
/v1/embeddings`` (one sentence per request) at a few concurrencies, with a bounded load
generator on loopback, for

* ``gateway``: ``embedq serve`` in front of one ``embedq worker`` (idle fleet);
* ``gateway+backlog``: the same while the worker drains a bulk backlog of long texts;
* ``gateway+slow``: the idle gateway while ``--slow-clients`` connections (200) stay open
  trickling bytes, half of them a request head and half a body, one byte a second each
  (slowloris and slow POST), opened at once before the timed requests start;
* ``in-process``: the same model served directly by a FastAPI app (no queue, no Redis, one
  forward pass per request under a lock), as a service that loads the model a second time
  would; measured idle and beside the draining worker (it shares the machine).

The variants of each phase interleave within every repetition (in-process, gateway,
gateway+slow; then gateway+backlog, in-process+backlog), so a neighbour's load hits them
alike. Every process is real (a private redis-server, subprocesses for worker, gateway and
baseline), the load generator is this process (asyncio + httpx).

    python -m embedq.bench.online --runs 3 --requests 60 --backlog-requests 20

``--drain-check`` measures something else: the bulk drain's throughput with the lane idle,
``embedq worker --drain`` over the same backlog with the interactive lane (its own model
thread, idle; on a CPU the checkpoints its seat replica passes) and with ``--no-online``,
interleaved ``--runs`` times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request  # at the top: FastAPI resolves annotations here

from embedq.bench.run import load_sample, loadavg, machine_facts
from embedq.bench.servers import RedisServer, free_port

_SERIAL = itertools.count()
CORPUS = Path(__file__).resolve().parents[2].parent / "shared" / "corpus"


@dataclass
class Level:
    variant: str
    concurrency: int
    requests: int
    wall_s: float
    latencies: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- the in-process baseline ------------------------------------------------------------


def baseline_app(model: str) -> FastAPI:
    """The model served directly: one Encoder, one forward pass per request (a lock: torch
    already uses every core for one pass), OpenAI's response shape."""
    from embedq.model.encoder import Encoder

    encoder = Encoder(model, "cpu")
    lock = threading.Lock()
    app = FastAPI()

    def encode(texts: list[str]) -> list[list[float]]:
        with lock:
            return encoder.encode(texts).tolist()  # type: ignore[no-any-return]

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = await asyncio.to_thread(encode, texts)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": encoder.name}

    @app.get("/readyz")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


# -- processes --------------------------------------------------------------------------


@contextmanager
def process(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "EMBEDQ_LOG_JSON": "true", **(env or {})},
        )
        try:
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready")


def stage_totals(metrics_url: str) -> dict[str, tuple[float, float]]:
    """The worker's (seconds, count) per stage so far (its /metrics)."""
    text = httpx.get(metrics_url, timeout=5).text
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line.startswith("embedq_stage_duration_seconds_") or 'stage="' not in line:
            continue
        name = line.split("{", 1)[0].removeprefix("embedq_stage_duration_seconds_")
        stage = line.split('stage="', 1)[1].split('"', 1)[0]
        if name in ("sum", "count"):
            found.setdefault(stage, [0.0, 0.0])[name == "count"] = float(line.rsplit(" ", 1)[1])
    return {stage: (v[0], v[1]) for stage, v in found.items()}


def per_batch_s(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], stage: str
) -> float:
    """Mean seconds of one ``stage`` unit between two samples."""
    (s0, n0), (s1, n1) = before.get(stage, (0.0, 0.0)), after.get(stage, (0.0, 0.0))
    return (s1 - s0) / (n1 - n0) if n1 > n0 else float("nan")


# -- load -------------------------------------------------------------------------------


async def load(
    url: str, texts: list[str], concurrency: int, requests: int
) -> tuple[float, list[float]]:
    """``requests`` single-sentence requests, ``concurrency`` at a time; (wall, latencies)."""
    latencies: list[float] = []
    todo = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def user() -> None:
            for i in todo:
                # Never the same text twice: a worker's vector cache would answer it.
                text = f"{texts[i % len(texts)]} (request {next(_SERIAL)})"
                body = {"input": text, "model": "all-MiniLM-L6-v2"}
                started = time.perf_counter()
                response = await client.post("/v1/embeddings", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(user() for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def measure(
    variant: str, url: str, texts: list[str], levels: list[int], requests: int, *, slow: int = 0
) -> list[Level]:
    """Each level's requests, with ``slow`` slow connections held open meanwhile."""
    return asyncio.run(_measure(variant, url, texts, levels, requests, slow=slow))


async def _measure(
    variant: str, url: str, texts: list[str], levels: list[int], requests: int, *, slow: int
) -> list[Level]:
    found = []
    async with slow_clients(url, slow) as held:
        for concurrency in levels:
            wall, latencies = await load(url, texts, concurrency, requests)
            found.append(Level(variant, concurrency, requests, wall, latencies))
            print(
                f"{variant:>18} c={concurrency:<3} {found[-1].rps:7.1f} req/s  p50 "
                f"{found[-1].pct(50) * 1000:7.1f} ms  p95 {found[-1].pct(95) * 1000:7.1f} ms",
                file=sys.stderr,
            )
    if slow:
        print(f"{variant:>18} slow connections at the end: {held}", file=sys.stderr)
        SLOW_STATES.append(held)
    return found


SLOW_STATES: list[dict[str, int]] = []  # per gateway+slow measurement: open/answered/closed
SLOW_HEAD = b"POST /v1/embeddings HTTP/1.1\r\nHost: gateway\r\nX-Slow: "
SLOW_BODY = (
    b"POST /v1/embeddings HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100000\r\n\r\n"
)


@contextlib.asynccontextmanager
async def slow_clients(url: str, count: int) -> AsyncIterator[dict[str, int]]:
    """``count`` connections opened at once, half sending a request head and half a body
    one byte a second, until the block ends; then how many were still open, answered (the
    gateway wrote a response: a 408, a 503) or closed by the gateway."""
    states = {"open": 0, "answered": 0, "closed": 0}
    if not count:
        yield states
        return
    host, port = url.removeprefix("http://").split(":")
    streams = await asyncio.gather(
        *(asyncio.open_connection(host, int(port)) for _ in range(count))
    )
    stop = asyncio.Event()

    async def trickle(i: int, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(SLOW_BODY if i % 2 else SLOW_HEAD)
            while not stop.is_set():
                writer.write(b" " if i % 2 else b"a")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)

    tasks = [asyncio.create_task(trickle(i, w)) for i, (_r, w) in enumerate(streams)]
    try:
        yield states
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for reader, writer in streams:
            states[await _state(reader)] += 1
            writer.close()


async def _state(reader: asyncio.StreamReader) -> str:
    try:
        data = await asyncio.wait_for(reader.read(1024), 0.05)
    except TimeoutError:
        return "open"
    except ConnectionError:
        return "closed"
    return "answered" if data else "closed"


# -- the run ----------------------------------------------------------------------------


def enqueue_backlog(redis_url: str, stream: str, n: int) -> None:
    from embedq.producer.client import Producer

    rows = load_sample(CORPUS / "long.jsonl", n)
    with Producer.connect(redis_url, stream=stream) as producer:
        producer.enqueue(rows)


def commands(
    redis_url: str, stream: str, tmp: Path, gw_port: int, base_port: int
) -> tuple[list[str], list[str], list[str]]:
    """The worker's, the gateway's and the baseline's command lines (after python)."""
    common = ["--redis-url", redis_url, "--stream", stream]
    worker = ["-m", "embedq.cli", "worker", *common, "--milvus-uri", str(tmp / "w.db")]
    worker += ["--device", "cpu"]
    serve = ["-m", "embedq.cli", "serve", *common, "--port", str(gw_port)]
    serve += ["--host", "127.0.0.1", "--request-timeout", "120"]
    return worker, serve, ["-m", "embedq.bench.online", "--serve-baseline", str(base_port)]


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    levels = [int(c) for c in args.levels.split(",")]
    texts = [r["text"] for r in load_sample(CORPUS / "short.jsonl", 500)]
    redis = RedisServer(tmp / "redis").start()
    stream = "bench:online"
    gw_port, base_port, metrics_port = free_port(), free_port(), free_port()
    gateway, baseline = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{base_port}"
    worker_args, serve_args, base_args = commands(redis.url, stream, tmp, gw_port, base_port)
    worker_args += ["--metrics-port", str(metrics_port)]
    results: list[Level] = []
    batch_s: list[float] = []
    write_s: list[float] = []
    try:
        with (
            process(worker_args, tmp / "worker.log"),
            process(serve_args, tmp / "gw.log"),
            process(base_args, tmp / "base.log"),
        ):
            for url in (gateway, baseline):
                wait_ready(url)
                measure("warm-up", url, texts, [4], 20)
            for _ in range(args.runs):
                results += measure("in-process", baseline, texts, levels, args.requests)
                results += measure("gateway", gateway, texts, levels, args.requests)
                if args.slow_clients:
                    results += measure(
                        "gateway+slow",
                        gateway,
                        texts,
                        levels,
                        args.requests,
                        slow=args.slow_clients,
                    )
            enqueue_backlog(redis.url, stream, args.backlog)
            time.sleep(5)  # the worker is into the backlog
            metrics = f"http://127.0.0.1:{metrics_port}/metrics"
            for _ in range(args.runs):
                before = stage_totals(metrics)
                results += measure("gateway+backlog", gateway, texts, levels, args.backlog_requests)
                after = stage_totals(metrics)
                batch_s.append(per_batch_s(before, after, "inference"))
                write_s.append(per_batch_s(before, after, "write"))
                results += measure(
                    "in-process+backlog", baseline, texts, levels, args.backlog_requests
                )
    finally:
        redis.stop()
    return {
        "machine": machine_facts(),
        "loadavg_end": loadavg(),
        "levels": levels,
        "runs": args.runs,
        "forward_pass_s_under_backlog": statistics.median(batch_s),
        "write_s_under_backlog": statistics.median(write_s),
        "slow_connections_at_end": SLOW_STATES,
        "results": summarise(results),
    }


def drain_check(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Bulk texts/s of ``embedq worker --drain`` over ``--drain-texts`` long texts, with the
    interactive lane idle and with ``--no-online``, interleaved ``--runs`` times (each run
    a fresh stream and Milvus Lite file; the worker's own texts/s, model load excluded)."""
    redis = RedisServer(tmp / "redis").start()
    rates: dict[str, list[float]] = {"lane idle": [], "no lane": []}
    try:
        for run in range(args.runs):
            for variant, flags in (("lane idle", ["--online"]), ("no lane", ["--no-online"])):
                stream = f"bench:drain:{run}:{flags[0]}"
                enqueue_backlog(redis.url, stream, args.drain_texts)
                command = ["-m", "embedq.cli", "worker", "--redis-url", redis.url]
                command += ["--stream", stream, "--milvus-uri", str(tmp / f"{run}{flags[0]}.db")]
                command += ["--device", "cpu", "--drain", *flags]
                done = subprocess.run(
                    [sys.executable, *command], capture_output=True, text=True, check=True
                )
                line = next(x for x in done.stdout.splitlines() if x.startswith("embedded "))
                rates[variant].append(float(line.split("working, ", 1)[1].split(" ", 1)[0]))
                print(f"drain {variant:>9}: {line}", file=sys.stderr)
    finally:
        redis.stop()
    lane, alone = (statistics.median(rates[v]) for v in ("lane idle", "no lane"))
    return {
        "machine": machine_facts(),
        "loadavg_end": loadavg(),
        "texts": args.drain_texts,
        "texts_per_s": rates,
        "median_lane_idle": lane,
        "median_no_lane": alone,
        "ratio": lane / alone,
    }


def summarise(results: list[Level]) -> list[dict[str, Any]]:
    """Medians over runs, per variant and concurrency."""
    rows = []
    for key in sorted({(r.variant, r.concurrency) for r in results if r.variant != "warm-up"}):
        runs = [r for r in results if (r.variant, r.concurrency) == key]
        rows.append(
            {
                "variant": key[0],
                "concurrency": key[1],
                "requests": runs[0].requests,
                "rps": statistics.median(r.rps for r in runs),
                **{
                    f"p{q}_ms": statistics.median(r.pct(q) for r in runs) * 1000
                    for q in (50, 95, 99)
                },
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| variant | concurrency | requests/run | req/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['variant']} | {r['concurrency']} | {r['requests']} | {r['rps']:.1f} | "
            f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedq.bench.online")
    parser.add_argument("--levels", default="1,4,16", help="concurrencies")
    parser.add_argument("--requests", type=int, default=60, help="requests per level, idle")
    parser.add_argument("--backlog-requests", type=int, default=20, help="per level, backlog")
    parser.add_argument("--backlog", type=int, default=6000, help="long texts enqueued")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slow-clients", type=int, default=200, help="gateway+slow's; 0: off")
    parser.add_argument("--drain-check", action="store_true", help="bulk drain, lane idle")
    parser.add_argument("--drain-texts", type=int, default=1500, help="long texts per drain")
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--serve-baseline", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_baseline:
        import uvicorn

        uvicorn.run(
            baseline_app(""), host="127.0.0.1", port=args.serve_baseline, log_level="warning"
        )
        return 0
    with tempfile.TemporaryDirectory(prefix="embedq-bench-online-") as tmp:
        if args.drain_check:
            print(json.dumps(drain_check(args, Path(tmp)), indent=2))
            return 0
        report = run(args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "results"}))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
