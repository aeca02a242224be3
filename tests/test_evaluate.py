"""Retrieval quality of one model against another (issue 26's quality gate, issue 29's
fp32-against-int8 overlap): the figures agree with a hand-checked case and with ir-measures
itself, query files parse as documented, the JSON Lines have their documented shape, and
``migrate --promote`` refuses a model with its transformer layers removed and accepts the
same weights under another fingerprint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from click.testing import CliRunner, Result

from embedq.bench.feed import zero_layer_copy
from embedq.cli import main
from embedq.core.config import Settings
from embedq.core.errors import ConfigError, ExitCode, PromoteRefused
from embedq.model.encoder import Encoder, packaged_model_dir
from embedq.ops import migrate as migrate_ops
from embedq.ops.evaluate import (
    Query,
    compare,
    dense_run,
    json_lines,
    load_queries,
    overlap_at_k,
    queries_from_corpus,
    ranked,
    recorded_evaluation,
    table_lines,
)
from embedq.ops.quality_gate import Bar, Gate, shortfall
from embedq.producer.client import Producer
from embedq.queue.stream import Stream
from embedq.sink.milvus import open_sink
from embedq.sink.schema import model_collection, model_fingerprint
from embedq.worker.launch import assemble

from .conftest import corpus_rows

# -- the figures ----------------------------------------------------------------------------

# q1 is judged (a and b relevant); q2 is not. Reference "old" finds a, c, b; "new" c, d, a.
QUERIES = [Query("q1", "first", {"a": 1, "b": 1}), Query("q2", "second")]
OLD = {"q1": ranked(["a", "c", "b"]), "q2": ranked(["x", "y", "z"])}
NEW = {"q1": ranked(["c", "d", "a"]), "q2": ranked(["z", "w", "v"])}


def test_figures_of_a_hand_checkable_case_agree_with_ir_measures() -> None:
    import ir_measures
    from ir_measures import R, nDCG

    found = compare(QUERIES, OLD, NEW, k=3)
    q1, q2 = found.per_query
    # overlap@3: new's top 3 holds c and a of old's a, c, b; q2 shares z only.
    assert q1.overlap == pytest.approx(2 / 3) and q2.overlap == pytest.approx(1 / 3)
    assert found.overlap == pytest.approx(0.5)
    # recall@3: old finds both relevant ids, new one of two. nDCG@10 (binary gains):
    # old DCG 1/log2(2) + 1/log2(4) = 1.5, new 1/log2(4) = 0.5; ideal 1 + 1/log2(3).
    ideal = 1 + 1 / np.log2(3)
    assert q1.figures["old"].recall == 1.0 and q1.figures["new"].recall == 0.5
    assert q1.figures["old"].ndcg_10 == pytest.approx(1.5 / ideal)
    assert q1.figures["new"].ndcg_10 == pytest.approx(0.5 / ideal)
    assert q2.figures == {} and found.judged == 1
    # ...and the library's own aggregate over the same qrels and runs.
    qrels = {"q1": {"a": 1, "b": 1}}
    for side, run in (("old", OLD), ("new", NEW)):
        theirs = ir_measures.calc_aggregate([R @ 3, nDCG @ 10], qrels, {"q1": run["q1"]})
        assert found.figures[side].recall == pytest.approx(theirs[R @ 3])
        assert found.figures[side].ndcg_10 == pytest.approx(theirs[nDCG @ 10])


def test_graded_judgements_weigh_in_ndcg_as_trec_eval_does() -> None:
    import ir_measures
    from ir_measures import nDCG

    graded = [Query("q", "text", {"a": 1, "b": 3})]
    run = {"q": ranked(["a", "b"])}
    found = compare(graded, run, run, k=10)
    theirs = ir_measures.calc_aggregate([nDCG @ 10], {"q": {"a": 1, "b": 3}}, run)
    assert found.figures["new"].ndcg_10 == pytest.approx(theirs[nDCG @ 10])
    assert found.figures["new"].ndcg_10 < 1.0  # the better document ranked second
    assert found.overlap == 1.0


def test_overlap_of_identical_and_disjoint_rankings() -> None:
    same = {"q": ranked(["a", "b", "c"])}
    assert overlap_at_k(same, same, 3) == 1.0
    assert overlap_at_k(same, {"q": ranked(["d", "e", "f"])}, 3) == 0.0
    assert overlap_at_k(same, {"q": ranked(["c", "b", "a", "d"])}, 2) == 0.5  # top 2 only
    assert overlap_at_k({"q": {}}, {"q": {}}, 3) == 1.0  # nothing found on either side
    assert overlap_at_k({"q": {}}, same, 3) == 0.0


def test_dense_runs_over_held_out_queries(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"id": f"d{i}", "text": f"word{i} " * (i % 12 + 1)} for i in range(30)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    queries = queries_from_corpus(corpus, skip=20, n=5, words=3)
    assert [q.id for q in queries] == ["d20", "d21", "d22", "d23", "d24"]
    assert queries[3].text == "word23 word23 word23"  # the first 3 words only
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(20, 16)).astype(np.float32)
    asked = rng.normal(size=(5, 16)).astype(np.float32)
    ids, qids = [f"d{i}" for i in range(20)], [q.id for q in queries]
    reference = dense_run(asked, docs, qids, ids, 10)
    assert overlap_at_k(reference, dense_run(asked, docs, qids, ids, 10), 10) == 1.0
    noisy = docs + rng.normal(scale=2.0, size=docs.shape).astype(np.float32)
    assert overlap_at_k(reference, dense_run(asked, noisy, qids, ids, 10), 10) < 1.0


# -- query files and output ------------------------------------------------------------------


def test_query_files_jsonl_text_and_trec_qrels(tmp_path: Path) -> None:
    jsonl = tmp_path / "q.jsonl"
    jsonl.write_text(
        '{"query": "game of warfare", "relevant": ["deb-0ad", "deb-0ad-data"]}\n'
        "\n"
        '{"id": "ping", "query": "packet loss", "relevant": {"deb-2ping": 2, "x": 0}}\n'
        '{"query": "no judgement"}\n'
    )
    found = load_queries(jsonl)
    assert [(q.id, q.text) for q in found] == [
        ("1", "game of warfare"),
        ("ping", "packet loss"),
        ("3", "no judgement"),
    ]
    assert found[0].relevant == {"deb-0ad": 1, "deb-0ad-data": 1}
    assert found[1].relevant == {"deb-2ping": 2}  # a grade of 0 is not relevant

    text = tmp_path / "q.txt"
    text.write_text("strategy game\nt7\tpuzzle for text mode\n")
    qrels = tmp_path / "qrels"
    qrels.write_text("1 0 deb-0ad 1\n1 0 deb-2048 0\nt7 0 deb-2048 2\nzz 0 other 1\n")
    found = load_queries(text, qrels)
    assert [(q.id, q.text, q.relevant) for q in found] == [
        ("1", "strategy game", {"deb-0ad": 1}),
        ("t7", "puzzle for text mode", {"deb-2048": 2}),
    ]


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"query": "a"}\n{"text": "b"}\n', 'q.jsonl:2: a query line needs a non-empty "query"'),
        ('{"query": "a"}\n{not json\n', "q.jsonl:2: not a JSON object"),
        ('{"id": 1, "query": "a"}\n{"id": 1, "query": "b"}\n', "query ids given twice: 1"),
        ("\n\n", "no queries in the file"),
    ],
)
def test_a_bad_query_file_is_one_line_naming_the_line(
    tmp_path: Path, content: str, says: str
) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=says):
        load_queries(path)


def test_a_bad_qrels_line_names_its_place(tmp_path: Path) -> None:
    (tmp_path / "q.txt").write_text("query\n")
    (tmp_path / "qrels").write_text("1 0 doc 1\n1 doc\n")
    with pytest.raises(ConfigError, match=r"qrels:2: a qrels line is `qid iteration docid"):
        load_queries(tmp_path / "q.txt", tmp_path / "qrels")


def test_json_lines_one_object_per_query_then_the_total() -> None:
    lines = json_lines(compare(QUERIES, OLD, NEW, k=3))
    rows = [json.loads(line) for line in lines]
    assert [r["kind"] for r in rows] == ["query", "query", "total"]
    first = rows[0]
    assert set(first) == {"kind", "query_id", "query", "k", "overlap", "old", "new"}
    assert first["query_id"] == "q1" and first["k"] == 3
    assert set(first["old"]) == {"recall", "ndcg_10"} and first["new"]["recall"] == 0.5
    assert rows[1]["old"] is None and rows[1]["new"] is None  # not judged
    total = rows[-1]
    assert total == {
        "kind": "total",
        "k": 3,
        "queries": 2,
        "judged": 1,
        "overlap": 0.5,
        "old": {"recall": 1.0, "ndcg_10": pytest.approx(0.9197, abs=1e-4)},
        "new": {"recall": 0.5, "ndcg_10": pytest.approx(0.3066, abs=1e-4)},
    }
    table = table_lines(compare(QUERIES, OLD, NEW, k=3))
    assert table[0].split()[:6] == ["query_id", "overlap@3", "recall@3", "old", "ndcg@10", "old"]
    assert table[2].split()[:6] == ["q2", "0.333", "-", "-", "-", "-"]
    assert table[-1].startswith("total") and "(1 of 2 queries judged)" in table[-1]


def test_the_bar_names_each_figure_below_it() -> None:
    found = {"k": 10, "overlap": 0.42, "old": {"recall": 0.9}, "new": {"recall": 0.5}}
    assert shortfall(found, Bar(min_overlap=0.4, min_recall=0.5)) == ""
    both = shortfall(found, Bar(min_overlap=0.8, min_recall=0.6))
    assert both == "overlap@10 0.420 < 0.800; recall@10 0.500 < 0.600, old model 0.900"
    unjudged = {"k": 10, "overlap": 1.0, "old": None, "new": None}
    assert "no query was judged" in shortfall(unjudged, Bar(min_recall=0.1))


# -- the gate, on a real migration -------------------------------------------------------------

DOCS, ASKED = 200, 20


@pytest.fixture
def live_collection(
    settings: Settings,
    redis_client: redis.Redis,
    encoder: Encoder,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """The live collection: DOCS short texts, written by a worker of the packaged model."""
    monkeypatch.setattr(migrate_ops, "RECHECK_S", 0.0)  # --adopt waits for no running worker
    rows = [{**r, "meta": {}} for r in corpus_rows("short.jsonl", DOCS)]
    Producer(redis_client, settings.stream, group="g").enqueue(rows)
    sink = open_sink(settings)
    try:
        stream = Stream(redis_client, settings.stream, "g", "c1")
        assemble(settings, stream, encoder, sink).run()
    finally:
        sink.close()
    return settings


def _query_file(tmp_path: Path) -> Path:
    """ASKED queries: the first 4 words of every tenth stored text, each judged relevant to
    the text it opens."""
    path = tmp_path / "queries.jsonl"
    lines = []
    for row in corpus_rows("short.jsonl", DOCS)[:: DOCS // ASKED]:
        query = " ".join(row["text"].split()[:4])
        lines.append(json.dumps({"id": row["id"], "query": query, "relevant": [row["id"]]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _migrate(settings: Settings, *args: str) -> Result:
    where = [
        "--milvus-uri",
        settings.milvus_uri,
        "--collection",
        settings.collection,
        "--stream",
        settings.stream,
        "--group",
        settings.group,
        "--redis-url",
        settings.redis_url,
        "--device",
        "cpu",
    ]
    return CliRunner().invoke(main, ["migrate", *args, *where])


def _alias_target(settings: Settings) -> str:
    sink = open_sink(settings, create=False)
    try:
        return str(sink.client.describe_alias(settings.collection)["collection_name"])
    finally:
        sink.close()


def test_the_gate_refuses_a_promote_to_a_model_without_layers(
    live_collection: Settings, tmp_path: Path
) -> None:
    settings = live_collection
    source = packaged_model_dir()
    assert source is not None
    bad = zero_layer_copy(source, tmp_path / "no-layers")
    queries = _query_file(tmp_path)

    # A bar and no evaluation yet: refused, saying to evaluate first.
    started = _migrate(settings, "--model", str(bad), "--backfill", "--adopt")
    assert started.exit_code == 0, started.output
    live = _alias_target(settings)
    refused = _migrate(settings, "--model", str(bad), "--promote", "--min-overlap", "0.8")
    assert refused.exit_code == ExitCode.REFUSED, refused.output
    assert "no evaluation of" in refused.output and "--evaluate" in refused.output

    shown = _migrate(settings, "--model", str(bad), "--evaluate", str(queries), "--json")
    assert shown.exit_code == 0, shown.output
    rows = [json.loads(line) for line in shown.stdout.splitlines()]
    assert len(rows) == ASKED + 1 and rows[-1]["kind"] == "total"
    total = rows[-1]
    assert total["queries"] == ASKED and total["judged"] == ASKED and total["k"] == 10
    assert set(total["old"]) == set(total["new"]) == {"recall", "ndcg_10"}
    assert total["overlap"] < 0.8, total  # the layers are where the model's meaning is
    target = model_collection(settings.collection, model_fingerprint(Encoder(str(bad))))
    sink = open_sink(settings.replace(collection=target), create=False)
    try:
        recorded = recorded_evaluation(sink)
    finally:
        sink.close()
    assert recorded is not None
    assert recorded["overlap"] == total["overlap"] and recorded["against"] == live
    assert recorded["collection"] == target and recorded["query_file"] == "queries.jsonl"

    refused = _migrate(settings, "--model", str(bad), "--promote", "--min-overlap", "0.8")
    assert refused.exit_code == ExitCode.REFUSED, refused.output
    assert f"overlap@10 {total['overlap']:.3f} < 0.800" in refused.output
    assert _alias_target(settings) == live  # the alias did not move


def _same_weights(tmp_path: Path) -> Path:
    """The packaged model with its weights file written again under other metadata: every
    tensor equal, the file's bytes (and so the fingerprint) not."""
    from safetensors.torch import load_file, save_file

    source = packaged_model_dir()
    assert source is not None
    target = tmp_path / "same-weights"
    shutil.copytree(source, target)
    tensors = load_file(str(source / "model.safetensors"))
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt", "copy": "1"})
    return target


def test_the_gate_accepts_the_same_weights_under_another_fingerprint(
    live_collection: Settings, encoder: Encoder, tmp_path: Path
) -> None:
    settings = live_collection
    same = _same_weights(tmp_path)
    twin = Encoder(str(same), device="cpu")
    assert model_fingerprint(twin) != model_fingerprint(encoder)
    started = _migrate(settings, "--model", str(same), "--backfill", "--adopt")
    assert started.exit_code == 0, started.output

    sink = open_sink(settings, create=False)
    try:
        live = sink.sibling(_alias_target(settings))
        shadow = sink.sibling(model_collection(settings.collection, model_fingerprint(twin)))
        shown: list[Any] = []
        gate = Gate(
            Bar(min_overlap=0.95),
            _query_file(tmp_path),
            k=10,
            old_encoder=lambda: encoder,
            show=shown.append,
        )
        gate.check(live, shadow, twin, promoting=True)  # no PromoteRefused
        assert shown[0].overlap == 1.0  # the same vectors find the same rows
        assert shown[0].figures["old"] == shown[0].figures["new"]
        recorded = recorded_evaluation(shadow)
        assert recorded is not None and recorded["overlap"] == 1.0
        # The recorded evaluation alone passes the highest bar; another live collection's
        # evaluation would not count.
        Gate(Bar(min_overlap=1.0)).check(live, shadow, twin, promoting=True)
        elsewhere = sink.sibling(shadow.collection)
        with pytest.raises(PromoteRefused, match="no evaluation of"):
            Gate(Bar(min_overlap=0.5)).check(elsewhere, shadow, twin, promoting=True)
    finally:
        sink.close()
