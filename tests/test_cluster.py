"""embedq on a real three-node Redis Cluster (``--redis-cluster``): partitions spread over
the nodes, every command works, a worker reads partitions that live on different nodes, and
a plain client pointed at a cluster, or a cluster client at a plain server, gets one clear
line instead of a traceback.

The cluster is three ``redis-server --cluster-enabled yes`` processes joined with
``redis-cli --cluster create``; nothing is faked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from embedq.core.config import Settings, SettingsError
from embedq.core.keys import key_slot, partition_for, partition_streams
from embedq.sink.milvus import open_sink

from .conftest import REDIS_URL, corpus_rows
from .support.servers import RedisServer
from .test_cli import embedq
from .test_partition_ops import env_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.RedisCluster]:
    if shutil.which("redis-cli") is None:
        pytest.fail("the cluster tests need redis-cli on PATH (apt-get install redis-tools)")
    root = tmp_path_factory.mktemp("cluster")
    nodes = [RedisServer(root / f"node{i}", cluster=True).start() for i in range(3)]
    try:
        created = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        deadline = time.monotonic() + 30
        while not all(n.client().cluster("info")["cluster_state"] == "ok" for n in nodes):
            assert time.monotonic() < deadline, "the cluster did not reach cluster_state:ok"
            time.sleep(0.2)
        client = redis.RedisCluster(host="127.0.0.1", port=nodes[0].port)
        yield client
        client.close()
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def on_cluster(
    cluster: redis.RedisCluster, tmp_path: Path, stream_name: str
) -> Iterator[dict[str, str]]:
    """The environment of a partitioned deployment on the cluster; its keys removed after."""
    node = cluster.get_default_node()
    yield {
        **env_for(stream_name, tmp_path),
        "EMBEDQ_REDIS_URL": f"redis://127.0.0.1:{node.port}/0",
        "EMBEDQ_REDIS_CLUSTER": "1",
    }
    for key in cluster.scan_iter(
        match=f"{stream_name}*", target_nodes=redis.RedisCluster.PRIMARIES
    ):
        cluster.delete(key)


def test_a_partitioned_deployment_runs_on_a_three_node_cluster(
    cluster: redis.RedisCluster, on_cluster: dict[str, str], stream_name: str, tmp_path: Path
) -> None:
    streams = partition_streams(stream_name, 4)
    homes = {cluster.get_node_from_key(s).port for s in streams}
    assert len(homes) >= 2, "the partitions should not all live on one node"
    for s in streams:
        assert cluster.cluster_keyslot(s) == key_slot(s)

    assert embedq("init", env=on_cluster).returncode == 0
    rows = [
        {"id": f"c-{i}", "text": r["text"]} for i, r in enumerate(corpus_rows("short.jsonl", 120))
    ]
    source = tmp_path / "in.jsonl"
    source.write_text(
        "\n".join(json.dumps(r) for r in [*rows, {"id": "blank", "text": " "}]) + "\n"
    )
    sent = embedq("enqueue", str(source), "--job", "j1", "--dedup", env=on_cluster)
    assert sent.returncode == 0, sent.stderr
    assert sum(cluster.xlen(s) for s in streams) == 121

    worker = embedq("worker", "--drain", env=on_cluster)
    assert worker.returncode == 0, worker.stderr
    sink = open_sink(Settings(milvus_uri=on_cluster["EMBEDQ_MILVUS_URI"], collection="vectors"))
    try:
        assert sink.count() == 120  # every id once, read from partitions on several nodes
    finally:
        sink.close()

    lag = json.loads(embedq("lag", "--json", env=on_cluster).stdout)
    assert (lag["lag"], lag["pending"], lag["dlq_length"]) == (0, 0, 1)
    (letter,) = [
        json.loads(x) for x in embedq("dlq", "list", "--json", env=on_cluster).stdout.splitlines()
    ]
    assert letter["dlq_id"].startswith(f"{partition_for('blank', 4)}/")
    assert letter["reason"] == "empty_text"

    again = embedq("enqueue", str(source), "--job", "j2", "--dedup", env=on_cluster)
    # The index lives on each partition's slot: every written id holds its text; the
    # dead-lettered blank was never written, so it goes again.
    assert again.returncode == 0 and "enqueued 1 records" in again.stdout, again.stdout
    assert "120 unchanged" in again.stdout
    job = json.loads(embedq("job", "j1", "--json", env=on_cluster).stdout)
    assert (job["enqueued"], job["embedded"], job["dead_lettered"]) == (121, 120, 1)

    trimmed = [json.loads(t) for t in embedq("trim", "--json", env=on_cluster).stdout.splitlines()]
    assert sum(t["trimmed"] for t in trimmed) == 121  # all acked, all gone
    assert embedq("dlq", "purge", "--all", env=on_cluster).returncode == 0


def test_one_stream_on_a_cluster_needs_a_hash_tag(
    cluster: redis.RedisCluster, on_cluster: dict[str, str], stream_name: str
) -> None:
    with pytest.raises(SettingsError, match="hash tag"):
        Settings(redis_cluster=True, stream="embedq:tasks")
    tagged = f"{{{stream_name}}}:tasks"
    env = {**on_cluster, "EMBEDQ_PARTITIONS": "1", "EMBEDQ_STREAM": tagged}
    rows = corpus_rows("short.jsonl", 20)
    enqueue = embedq("enqueue", "-", env=env, stdin="\n".join(json.dumps(r) for r in rows))
    assert enqueue.returncode == 0, enqueue.stderr
    assert embedq("worker", "--drain", env=env).returncode == 0
    lag = json.loads(embedq("lag", "--json", env=env).stdout)
    assert (lag["length"], lag["lag"], lag["pending"]) == (20, 0, 0)
    for key in cluster.scan_iter(
        match=f"{{{stream_name}}}*", target_nodes=redis.RedisCluster.PRIMARIES
    ):
        cluster.delete(key)


def test_the_wrong_client_for_the_server_is_one_clear_line(
    on_cluster: dict[str, str],
) -> None:
    plain = embedq("lag", env={**on_cluster, "EMBEDQ_REDIS_CLUSTER": "0"})
    assert plain.returncode == 2
    assert "Redis Cluster node; pass --redis-cluster" in plain.stderr
    assert "Traceback" not in plain.stderr
    single = embedq("lag", env={**on_cluster, "EMBEDQ_REDIS_URL": REDIS_URL})
    assert single.returncode == 2
    assert "not in cluster mode" in single.stderr and "Traceback" not in single.stderr
