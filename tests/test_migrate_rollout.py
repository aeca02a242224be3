"""Issue 26's scripted rollout, as an operator would run it and an adversary would time it.

``ROWS`` rows with random ids on a Milvus Lite server, real worker processes of two models
(the suite's tiny BERT, "old", and a twin with other weights, "new"), and two producers
that keep sending upserts and deletes of the same ids throughout: backfill (with the
adoption) while they write, start the new model's workers, promote, replace the old
workers one by one (one SIGKILLed while it holds a batch), keep writing, roll back, roll
forward, drop the old collection. After each phase's drain the collection the alias names
holds exactly the last version of every id (its text, and a vector of that collection's
model: cosine >= 0.9999 against one computed here), no deleted id, and ``embedq verify``
is clean, without any ``verify --repair``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import redis

from embedq.core.errors import SinkUnavailable
from embedq.model.encoder import Encoder
from embedq.producer.client import Producer
from embedq.sink.milvus import Sink
from embedq.sink.schema import model_collection, model_fingerprint

from .support.fault_fixtures import WorkerProcess
from .support.rollout_gateway import Call, Clients, Gateway, check_calls, tally
from .support.servers import MilvusLiteServer, MilvusStandalone, wait_for, wait_until
from .support.tiny_models import tiny_bert
from .test_cli import embedq

# The issue asks for 20,000 (EMBEDQ_ROLLOUT_ROWS=20000, the timeout grows with it): passed on
# Milvus Lite in 564 s and on the 2.3.5 server (see docs/migration.md). The suite runs 1,000
# on Lite and 500 on 2.3.5: on a quiet 2-core machine the phases' fixed costs (processes,
# the servers' collection and alias operations, the waits for ACTIVE_S) are most of their
# ~2 minutes each, the rows a small part (2,000 Lite rows took 113 s, 500 on 2.3.5 118 s).
ROWS = int(os.environ.get("EMBEDQ_ROLLOUT_ROWS", "1000"))
SERVER_ROWS = int(os.environ.get("EMBEDQ_ROLLOUT_ROWS", "500"))
GROUP = "g"
BATCH_OPS = 8  # ids one producer touches per send
PAUSE_S = 0.2  # between sends: ~2 x 40 entries/s, which both models' workers keep up with


@pytest.fixture(scope="session")
def new_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert-rollout-new"), seed=1)


@pytest.fixture
def models(tiny_model: Path, new_model: Path) -> dict[str, Path]:
    """The suite's tiny BERT, "old", and a twin with other weights, "new"."""
    return {"old": tiny_model, "new": new_model}


class Traffic:
    """Two producers sending upserts and deletes of the same ids, and what each id must
    hold at the end: the last entry sent for it (sends are serialised by a lock, so the
    stream's order is the order recorded here)."""

    def __init__(self, client: redis.Redis, stream: str, ids: list[str]) -> None:
        self.producers = [Producer(client, stream), Producer(client, stream)]
        self.ids = ids
        self.expected: dict[str, str | None] = {}
        self.lock = threading.Lock()
        self.flowing = threading.Event()
        self.stopped = threading.Event()
        self.sent = 0
        self.threads = [
            threading.Thread(target=self._run, args=(p, random.Random(n)), daemon=True)
            for n, p in enumerate(self.producers)
        ]

    def load(self) -> None:
        rows = [{"id": i, "text": f"{i} first text of the corpus"} for i in self.ids]
        self.producers[0].enqueue(rows)
        self.expected.update({r["id"]: r["text"] for r in rows})

    def start(self) -> None:
        self.flowing.set()
        for t in self.threads:
            t.start()

    def pause(self) -> None:
        """Stop sending; a send in progress finishes first."""
        self.flowing.clear()
        with self.lock:
            pass

    def resume(self) -> None:
        self.flowing.set()

    def stop(self) -> None:
        self.stopped.set()
        self.flowing.set()
        for t in self.threads:
            if t.is_alive():  # not started when the test failed before the traffic began
                t.join(10)

    def _run(self, producer: Producer, rng: random.Random) -> None:
        while not self.stopped.is_set():
            self.flowing.wait()
            if self.stopped.is_set():
                return
            chosen = rng.sample(self.ids, BATCH_OPS)
            cut = BATCH_OPS * 3 // 4
            with self.lock:
                if not self.flowing.is_set():
                    continue
                self.sent += 1
                rows = [
                    {"id": i, "text": f"{i} version {self.sent} {rng.random()}"}
                    for i in chosen[:cut]
                ]
                producer.enqueue(rows)
                producer.delete(chosen[cut:])
                self.expected.update({r["id"]: r["text"] for r in rows})
                self.expected.update(dict.fromkeys(chosen[cut:]))
            time.sleep(PAUSE_S)


class Fleet:
    """Worker processes of either model, and the commands an operator runs."""

    def __init__(
        self, tmp: Path, stream: str, uri: str, name: str, models: dict[str, Path]
    ) -> None:
        self.tmp, self.stream, self.uri, self.models = tmp, stream, uri, models
        self.name = name  # the collection (an alias once the backfill adopted it)
        self.started = 0
        self.workers: list[WorkerProcess] = []

    def where(self) -> list[str]:
        return [
            "--stream",
            self.stream,
            "--group",
            GROUP,
            "--milvus-uri",
            self.uri,
            "--collection",
            self.name,
        ]

    def worker(self, model: str) -> WorkerProcess:
        self.started += 1
        args = ["worker", "--model", str(self.models[model]), *self.where()]
        args += ["--min-idle", "20", "--milvus-timeout", "10", "--reclaim-interval", "1"]
        args += [
            "--block-ms",
            "200",
            "--metrics-port",
            "0",
            "--consumer",
            f"{model}-{self.started}",
        ]
        proc = WorkerProcess(args, self.tmp / f"{model}-{self.started}.log", env={})
        self.workers.append(proc)
        return proc

    def migrate(self, *args: str) -> str:
        done = embedq("migrate", *args, *self.where(), timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    def verify(self) -> None:
        done = embedq("verify", *self.where(), timeout=600)
        assert done.returncode == 0, done.stdout + done.stderr

    def stop_all(self) -> None:
        for proc in self.workers:
            proc.stop()


def _drained(client: redis.Redis, stream: str, *groups: str) -> None:
    """Until every entry sent was delivered to each of ``groups`` and acknowledged."""

    def done() -> bool:
        info = {g["name"].decode(): g for g in client.xinfo_groups(stream)}
        last = client.xinfo_stream(stream)["last-generated-id"]
        for name in groups:
            g = info.get(name)
            if g is None or g["pending"] or g["last-delivered-id"] != last:
                return False
        return True

    wait_for(done, 300, f"groups {groups} drained")


class Reference:
    """Vectors computed here, per model and text, to compare with the stored ones."""

    def __init__(self, models: dict[str, Path]) -> None:
        self.encoders = {m: Encoder(str(p), device="cpu") for m, p in models.items()}
        self.cache: dict[tuple[str, str], npt.NDArray[np.float32]] = {}

    def vectors(self, model: str, texts: list[str]) -> npt.NDArray[np.float32]:
        todo = sorted({t for t in texts if (model, t) not in self.cache})
        for start in range(0, len(todo), 512):
            part = todo[start : start + 512]
            for text, vector in zip(part, self.encoders[model].encode(part), strict=True):
                self.cache[(model, text)] = vector
        return np.stack([self.cache[(model, t)] for t in texts])


def _check(uri: str, traffic: Traffic, reference: Reference, model: str, fleet: Fleet) -> None:
    """The alias's collection holds exactly the last version of every id, with ``model``'s
    vectors; ``embedq verify`` finds it clean."""
    live = {i: t for i, t in traffic.expected.items() if t is not None}
    sink = Sink(uri, "", fleet.name, timeout_s=30, create=False)
    try:
        # The Milvus Lite server, one Python process serving every worker, can be too busy
        # to accept one more connection on this loaded machine: asked again for a while.
        wait_until(
            lambda: sink.ensure_collection(None, "", create=False) is False,
            120,
            "a connection to the Milvus Lite server",
            every_s=1.0,
            ignore=(SinkUnavailable,),
        )
        listed: list[str] = []

        def complete() -> bool:
            # A Milvus Lite server may show another connection's last acknowledged write a
            # moment late (seen once: one row absent, there when verify listed it after).
            listed[:] = sorted(str(r["id"]) for r in sink.rows())
            return listed == sorted(live)

        with contextlib.suppress(TimeoutError):
            wait_until(complete, 20, "the alias's collection to hold every live id")
        extra, lacking = sorted(set(listed) - set(live)), sorted(set(live) - set(listed))
        if extra or lacking:
            done = embedq("verify", *fleet.where(), timeout=600)
            held = {r["id"]: r for r in sink.get(extra[:5] + lacking[:5])}
            raise AssertionError(
                f"{len(extra)} ids not deleted, {len(lacking)} missing: "
                f"{[(i, traffic.expected.get(i, '?'), held.get(i)) for i in extra[:5]]} "
                f"{[(i, live[i]) for i in lacking[:5]]}; verify: {done.stdout[-1500:]}"
            )
        ids, texts, stored = [], [], []
        for start in range(0, len(listed), 1000):
            for row in sink.get(listed[start : start + 1000]):
                ids.append(str(row["id"]))
                texts.append(str(row["text"]))
                stored.append(row["vector"])
    finally:
        sink.close()
    wrong = [i for i, t in zip(ids, texts, strict=True) if live[i] != t]
    assert not wrong, f"{len(wrong)} ids hold an older text, e.g. {wrong[:3]}"
    got = np.asarray(stored, dtype=np.float32)
    want = reference.vectors(model, texts)
    cosine = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() >= 0.9999, f"{int((cosine < 0.9999).sum())} vectors not of model {model}"
    fleet.verify()


def _aliased(uri: str, name: str) -> bool:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri, timeout=10)
    try:
        return name in client.list_aliases().get("aliases", [])
    finally:
        client.close()


def _holding(client: redis.Redis, stream: str, consumer: str) -> Callable[[], bool]:
    def holds() -> bool:
        found = client.xinfo_consumers(stream, GROUP)
        return any(c["name"].decode() == consumer and c["pending"] > 0 for c in found)

    return holds


def _phase(what: str) -> None:
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{time.strftime('%H:%M:%S')} rollout: {what} (load {load})", flush=True)  # with -s


@pytest.mark.timeout(900 + ROWS // 5)
def test_a_rollout_on_milvus_lite_loses_no_write_and_mixes_no_model(
    stream_name: str,
    redis_client: redis.Redis,
    milvus_lite_server: MilvusLiteServer,
    models: dict[str, Path],
) -> None:
    fleet = Fleet(
        milvus_lite_server.dir.parent,
        stream_name,
        milvus_lite_server.uri,
        "docs",
        models,
    )
    try:
        _rollout(fleet, redis_client, ROWS)
    finally:
        server = milvus_lite_server.proc
        if server is not None and server.poll() is not None:  # seen here: it vanished mid-run
            print(f"rollout: milvus-lite server exited with {server.returncode}", flush=True)


@pytest.mark.timeout(900 + SERVER_ROWS // 5)
def test_a_rollout_on_milvus_2_3_5_loses_no_write_and_mixes_no_model(
    stream_name: str,
    redis_client: redis.Redis,
    milvus_standalone: MilvusStandalone,
    models: dict[str, Path],
    tmp_path: Path,
) -> None:
    # The server is the session's: a collection of this test's own.
    name = f"docs_{uuid.uuid4().hex[:8]}"
    _rollout(
        Fleet(tmp_path, stream_name, milvus_standalone.uri, name, models), redis_client, SERVER_ROWS
    )


def _rollout(fleet: Fleet, redis_client: redis.Redis, rows: int) -> None:
    """The scripted rollout on ``fleet``'s server, ``rows`` ids, with a gateway of each model
    answering throughout (tests/support/rollout_gateway.py)."""
    uri, stream_name, new_model = fleet.uri, fleet.stream, fleet.models["new"]
    reference = Reference(fleet.models)
    new_collection = model_collection(fleet.name, model_fingerprint(reference.encoders["new"]))
    new_group = f"{GROUP}:{new_collection}"
    ids = [uuid.uuid4().hex[:16] for _ in range(rows)]
    traffic = Traffic(redis_client, stream_name, ids)
    # One gateway per model, as clients of each keep theirs through a rollout: the product
    # routes by model (a gateway returns only its own model's answers; its search refuses
    # a collection of the other model), so one gateway cannot serve both.
    gateways = [
        Gateway(m, p, fleet.where(), fleet.tmp / f"serve-{m}.log") for m, p in fleet.models.items()
    ]
    clients = Clients(gateways)
    try:
        _phase(f"Before: {rows} random ids")
        # Before: the old model's fleet has written the corpus.
        traffic.load()
        old1, old2 = fleet.worker("old"), fleet.worker("old")
        for gateway in gateways:
            gateway.wait_ready()
        _drained(redis_client, stream_name, GROUP)
        clients.start()

        _phase("1. Backfil")
        # 1. Backfill (adopting the collection) while both producers write, then the new
        # model's workers join. After a drain both collections are complete.
        # The adoption renames the collection, and Milvus Lite loses a write acknowledged
        # while its rename runs (seen here: a delete and two upserts, all acked): it runs
        # between drains, and the backfill after it under the producers' writes.
        backfilling = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "embedq.cli",
                "migrate",
                "--model",
                str(new_model),
                "--backfill",
                "--adopt",
                *fleet.where(),
                # A Milvus Lite server renames a collection of 20,000 rows in more than the
                # default 10 s (seen: DEADLINE_EXCEEDED, exit 3): the operator's knob (it
                # must stay under --min-idle, 60 s).
                "--milvus-timeout",
                "55",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        wait_for(
            lambda: backfilling.poll() is not None or _aliased(uri, fleet.name), 300, "the adoption"
        )
        if backfilling.poll() is not None:  # it failed before the alias: say why
            said, _ = backfilling.communicate()
            assert backfilling.returncode == 0 and _aliased(uri, fleet.name), said
        time.sleep(2.5)  # running workers re-check their collection within a second
        traffic.start()
        said, _ = backfilling.communicate(timeout=600)
        assert backfilling.returncode == 0, said
        assert "backfill: " in said and f"group {new_group}" in said
        new1, new2 = fleet.worker("new"), fleet.worker("new")
        time.sleep(3)
        traffic.pause()
        _drained(redis_client, stream_name, new_group)
        # Asked at once: on Redis < 7.2 a consumer's idle time counts from its last delivery,
        # not its last read, so a running worker with nothing to do looks stopped after
        # ACTIVE_S (seen at 20,000 rows, where the check below outlasts it, and at 2,000 on
        # a loaded machine, where the old group's drain did).
        status = fleet.migrate("--status")
        assert "backfilled" in status and "next: --evaluate" in status
        _drained(redis_client, stream_name, GROUP, new_group)
        _check(uri, traffic, reference, "old", fleet)  # readers still on the old model
        # The quality gate's figures, recorded with the migration (the twins are unrelated
        # models: no bar is set, tests/test_evaluate.py proves the bar).
        queries = fleet.tmp / "queries.txt"
        queries.write_text("".join(f"{traffic.expected[i] or i}\n" for i in ids[:20]))
        evaluated = fleet.migrate(
            "--model",
            str(new_model),
            "--old-model",
            str(fleet.models["old"]),
            "--evaluate",
            str(queries),
        )
        assert "overlap" in evaluated, evaluated
        assert "evaluation none recorded" not in fleet.migrate("--status")

        _phase("2. Promote")
        # 2. Promote while writes arrive, then replace the old workers one by one: one is
        # SIGKILLed holding entries, the other stops on SIGTERM. Writes go on.
        traffic.resume()
        promoted = fleet.migrate("--promote", "--model", str(new_model))
        assert f"now points at {new_collection}" in promoted
        # While old-model workers still run, the old gateway's searches meet the alias naming
        # the new model's collection: waited for, so that the gateway check at the end has
        # such an answer to check (at 20,000 rows on a fast machine, once, none landed).
        wait_for(
            lambda: clients.answered("old", "/v1/search", "503 model_mismatch"),
            60,
            "the old gateway's search refused for the new model's collection",
        )
        wait_for(_holding(redis_client, stream_name, "old-1"), 60, "old-1 holding a batch")
        old1.signal(signal.SIGKILL)
        fleet.worker("new")
        old2.signal(signal.SIGTERM)
        old2.wait(60)
        time.sleep(3)
        traffic.pause()
        _drained(redis_client, stream_name, new_group)
        _check(uri, traffic, reference, "new", fleet)

        _phase("3. Roll ba")
        # 3. Roll back: the old collection kept every write in its group; an old-model
        # worker writes them (reclaiming what the killed one held).
        traffic.resume()
        back = fleet.migrate("--rollback")
        assert "now points at" in back and "entries to catch up" in back
        old3 = fleet.worker("old")
        time.sleep(3)
        traffic.pause()
        _drained(redis_client, stream_name, GROUP, new_group)
        _check(uri, traffic, reference, "old", fleet)

        _phase("4. Roll fo")
        # 4. Roll forward again, stop the old model's fleet, drop the old collection.
        traffic.resume()
        fleet.migrate("--promote", "--model", str(new_model))
        time.sleep(2)
        old3.signal(signal.SIGTERM)
        old3.wait(60)
        traffic.pause()
        _drained(redis_client, stream_name, new_group)
        time.sleep(11)  # the old group's consumers are seen as stopped (ACTIVE_S)
        dropped = fleet.migrate("--drop-old")
        assert f"destroyed group {GROUP}" in dropped
        _check(uri, traffic, reference, "new", fleet)
        groups = [g["name"].decode() for g in redis_client.xinfo_groups(stream_name)]
        assert groups == [new_group]
        assert "old dropped" in fleet.migrate("--status")
        assert new1.proc.poll() is None and new2.proc.poll() is None  # never disturbed
        clients.stop()
        _phase("gateways")
        _check_gateways(clients.calls, reference)
        _phase("done")
    finally:
        clients.stop()
        traffic.stop()
        fleet.stop_all()
        for gateway in gateways:
            gateway.stop()


def _check_gateways(calls: list[Call], reference: Reference) -> None:
    """No answer mixed models or searched the other model's collection; each gateway
    answered embeddings and searches, and each saw the alias name the other model's
    collection (a 503 ``model_mismatch``): the checks had something to check."""
    counts = tally(calls)
    print(f"rollout: gateway answers {counts}", flush=True)
    wrong = check_calls(calls, reference.vectors, ["old", "new"])
    assert not wrong, f"{len(wrong)} wrong answers of {len(calls)}: {wrong[:10]}"
    for model in ("old", "new"):
        for path in ("/v1/embeddings", "/v1/search"):
            assert counts.get(f"{model} {path} 200", 0) > 0, (model, path, counts)
        assert counts.get(f"{model} /v1/search 503 model_mismatch", 0) > 0, (model, counts)
