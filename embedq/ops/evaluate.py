"""Retrieval quality of one model against another: ``embedq migrate --evaluate`` (issue 26)
and the fp32-against-int8 check of ``python -m embedq.bench.backends`` (issue 29).

A query set is run against two sides (the live collection and the new model's, each query
embedded by its own collection's model; or one corpus under two encoders), and for each
query and in total this reports:

* **overlap@k**: the share of the reference side's top k that the other side also returns
  (``R@k`` with the reference's top k as the relevant set: with k results on both sides
  it is ``|A ∩ B| / k``);
* when the query set says which ids are relevant (``"relevant"`` in the JSONL, or a
  TREC-style qrels file), **recall@k** and **nDCG@10** of each side.

Every figure is computed by ir-measures (trec_eval's code, through pytrec_eval), not here
(FIELD-NOTES: don't hand-write IR metrics). ranx was the first choice and computes the same
figures, but its numba kernels compile on first use: 30 s to over 3 min per process on
this 2-core machine, with a ``NumbaTypeSafetyWarning`` on ``recall``; ir-measures answers
in under a second.

The evaluation of a migration is recorded on the new collection (property
``embedq.evaluation``: the totals, the collection and fingerprint it was measured against)
so that ``migrate --promote --min-overlap X`` / ``--min-recall X`` can refuse a switch
below the bar later, and ``migrate --status`` can show it (``recorded_evaluation``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from embedq.core.errors import ConfigError
from embedq.sink.error_codes import translated

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from embedq.model.encoder import Encoder
    from embedq.sink.milvus import Sink

log = structlog.get_logger("embedq.ops.evaluate")

PROPERTY = "embedq.evaluation"  # collection property: the last evaluation's totals (JSON)
NDCG_AT = 10  # nDCG is reported at 10 whatever k is: the depth IR results are compared at
Run = dict[str, dict[str, float]]  # query id -> doc id -> score: trec_eval's run
Qrels = dict[str, dict[str, int]]  # query id -> doc id -> relevance grade (> 0)


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    relevant: dict[str, int] = field(default_factory=dict)  # doc id -> grade; empty: unjudged


@dataclass(frozen=True)
class Figures:
    """One side's relevance figures for a query, or their means over the judged queries."""

    recall: float
    ndcg_10: float


@dataclass(frozen=True)
class QueryResult:
    query: Query
    overlap: float
    figures: dict[str, Figures]  # by side name; empty for an unjudged query


@dataclass(frozen=True)
class Evaluation:
    k: int
    names: tuple[str, str]  # (reference, candidate): ("old", "new") for a migration
    per_query: list[QueryResult]
    overlap: float  # mean over every query
    figures: dict[str, Figures]  # means over the judged queries; empty when none is judged

    @property
    def judged(self) -> int:
        return sum(1 for r in self.per_query if r.figures)

    def total(self) -> dict[str, Any]:
        """The totals as one JSON-able object (what ``--json`` prints last and what a
        migration records)."""
        return {
            "kind": "total",
            "k": self.k,
            "queries": len(self.per_query),
            "judged": self.judged,
            "overlap": round(self.overlap, 6),
            **{name: _rounded(self.figures.get(name)) for name in self.names},
        }


def _rounded(figures: Figures | None) -> dict[str, float] | None:
    return None if figures is None else {k: round(v, 6) for k, v in asdict(figures).items()}


# -- query sets ---------------------------------------------------------------------------


def load_queries(path: Path, qrels: Path | None = None) -> list[Query]:
    """The queries of ``path`` with their relevant ids: JSONL (``{"query": ..., "relevant":
    [ids] or {id: grade}, "id": optional}``) or plain text (one query a line, ``QID<TAB>query``
    to name it); a query's id is otherwise its 1-based position. ``qrels``: a TREC-style file
    (``qid iteration docid relevance``) whose judgements are added to the queries they name."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--evaluate {path}: cannot read the query file ({exc})") from exc
    numbered = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    is_json = bool(numbered) and numbered[0][1].startswith("{")
    queries = [
        (_json_query if is_json else _text_query)(path, n, line, position)
        for position, (n, line) in enumerate(numbered, 1)
    ]
    if not queries:
        raise ConfigError(f"--evaluate {path}: no queries in the file")
    ids = [q.id for q in queries]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})
        raise ConfigError(f"--evaluate {path}: query ids given twice: {', '.join(twice[:5])}")
    if qrels is None:
        return queries
    judged = read_qrels(qrels)
    return [Query(q.id, q.text, {**q.relevant, **judged.get(q.id, {})}) for q in queries]


def _json_query(path: Path, n: int, line: str, position: int) -> Query:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{n}: not a JSON object ({exc.msg})") from exc
    text = row.get("query") if isinstance(row, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f'{path}:{n}: a query line needs a non-empty "query" string')
    relevant = row.get("relevant") or {}
    if isinstance(relevant, list):
        relevant = {str(i): 1 for i in relevant}
    if not isinstance(relevant, dict):
        raise ConfigError(f'{path}:{n}: "relevant" must be a list of ids or an {{id: grade}}')
    qid = row.get("id", row.get("qid", position))
    return Query(str(qid), text, {str(d): int(g) for d, g in relevant.items() if int(g) > 0})


def _text_query(path: Path, n: int, line: str, position: int) -> Query:
    qid, tab, text = line.partition("\t")
    return Query(qid.strip(), text.strip()) if tab and text.strip() else Query(str(position), line)


def read_qrels(path: Path) -> Qrels:
    """A TREC qrels file: ``qid iteration docid relevance`` a line; grades of 0 (judged not
    relevant) are dropped, as they count for nothing in recall or nDCG."""
    judged: Qrels = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--qrels {path}: cannot read the file ({exc})") from exc
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4 or not parts[3].lstrip("-").isdigit():
            raise ConfigError(f"{path}:{n}: a qrels line is `qid iteration docid relevance`")
        if int(parts[3]) > 0:
            judged.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    return judged


def queries_from_corpus(path: Path, *, skip: int, n: int, words: int = 8) -> list[Query]:
    """``n`` queries made of the first ``words`` words of the corpus rows after the first
    ``skip`` (rows the searched corpus does not hold: held out, so no query finds its own
    text), unjudged. The query set of issue 29's fp32-against-int8 overlap."""
    queries: list[Query] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if number < skip or not line.strip():
                continue
            row = json.loads(line)
            text = " ".join(str(row["text"]).split()[:words])
            if text:
                queries.append(Query(str(row.get("id", number)), text))
            if len(queries) == n:
                break
    return queries


# -- runs ---------------------------------------------------------------------------------


def ranked(ids: Sequence[str]) -> dict[str, float]:
    """A ranking as a run entry: scores from the rank, so trec_eval keeps the search's order
    exactly (scores from Milvus may tie, and cosine and IP are not on one scale)."""
    return {doc: 1.0 / (rank + 1) for rank, doc in enumerate(ids)}


def collection_run(sink: Sink, encoder: Encoder, queries: Sequence[Query], k: int) -> Run:
    """Each query embedded by ``encoder`` and searched in ``sink``'s collection (dense,
    sparse or hybrid, by what it holds: ``embedq search``'s ``auto``)."""
    from embedq.sink import retrieval

    return {
        q.id: ranked([hit.id for hit in retrieval.search(sink, encoder, q.text, k)])
        for q in queries
    }


def dense_run(
    queries: npt.NDArray[np.float32],
    documents: npt.NDArray[np.float32],
    query_ids: Sequence[str],
    doc_ids: Sequence[str],
    k: int,
) -> Run:
    """The top ``k`` documents of each query by inner product (cosine on normalised
    vectors), searched exactly in memory: the benchmark's corpus without a database."""
    import numpy as np

    scores = queries @ documents.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return {qid: ranked([doc_ids[d] for d in row]) for qid, row in zip(query_ids, top, strict=True)}


# -- figures (ir-measures) -----------------------------------------------------------------


def _per_query(qrels: Qrels, run: Run, measures: list[str]) -> dict[str, dict[str, float]]:
    """ir-measures' score of each measure (``R@10``, ``nDCG@10``) for each query of
    ``qrels``: measure -> query id -> score (a query the run lacks scores 0, as in
    trec_eval's ``-c``)."""
    try:
        import ir_measures
    except ImportError as exc:  # an extra, not a runtime dependency of the workers
        raise ConfigError(
            "an evaluation needs ir-measures: pip install 'embedq[evaluate]'"
        ) from exc
    parsed = [ir_measures.parse_measure(m) for m in measures]
    scores: dict[str, dict[str, float]] = {m: dict.fromkeys(qrels, 0.0) for m in measures}
    for found in ir_measures.iter_calc(parsed, qrels, {q: run.get(q, {}) for q in qrels}):
        scores[str(found.measure)][str(found.query_id)] = float(found.value)
    return scores


def overlaps(reference: Run, candidate: Run, k: int) -> dict[str, float]:
    """Per query: the share of ``reference``'s top ``k`` that ``candidate``'s top ``k``
    holds too. A query the reference found nothing for counts 1.0 when the candidate found
    nothing either, else 0.0 (there is no relevant set to score it against)."""
    top = {q: sorted(docs, key=lambda d: -docs[d])[:k] for q, docs in reference.items()}
    qrels = {q: dict.fromkeys(docs, 1) for q, docs in top.items() if docs}
    found = _per_query(qrels, candidate, [f"R@{k}"])[f"R@{k}"] if qrels else {}
    return {q: found[q] if q in qrels else float(not candidate.get(q)) for q in reference}


def overlap_at_k(reference: Run, candidate: Run, k: int) -> float:
    """Mean overlap@k of ``candidate`` against ``reference`` over the reference's queries
    (issue 29's fp32-against-int8 target: >= 0.9 at k=10)."""
    found = overlaps(reference, candidate, k)
    return statistics.fmean(found.values()) if found else 0.0


def relevance(qrels: Qrels, run: Run, k: int) -> dict[str, Figures]:
    """recall@k and nDCG@10 of ``run`` for each judged query (ir-measures)."""
    if not qrels:
        return {}
    scores = _per_query(qrels, run, [f"R@{k}", f"nDCG@{NDCG_AT}"])
    return {q: Figures(scores[f"R@{k}"][q], scores[f"nDCG@{NDCG_AT}"][q]) for q in qrels}


def compare(
    queries: Sequence[Query],
    reference: Run,
    candidate: Run,
    *,
    k: int,
    names: tuple[str, str] = ("old", "new"),
) -> Evaluation:
    """Per query and in total: overlap@k, and each side's recall@k and nDCG@10 where the
    query is judged."""
    overlap = overlaps(reference, candidate, k)
    qrels = {q.id: q.relevant for q in queries if q.relevant}
    sides = {
        n: relevance(qrels, run, k) for n, run in zip(names, (reference, candidate), strict=True)
    }
    per_query = [
        QueryResult(q, overlap.get(q.id, 0.0), {n: sides[n][q.id] for n in names if q.relevant})
        for q in queries
    ]
    means = {
        n: Figures(
            statistics.fmean(f.recall for f in sides[n].values()),
            statistics.fmean(f.ndcg_10 for f in sides[n].values()),
        )
        for n in names
        if sides[n]
    }
    total = statistics.fmean(r.overlap for r in per_query) if per_query else 0.0
    return Evaluation(k, names, per_query, total, means)


# -- output -------------------------------------------------------------------------------


def table_lines(evaluation: Evaluation) -> list[str]:
    """Aligned columns with a header: a row per query, then the totals."""
    k, names = evaluation.k, evaluation.names
    width = min(max([8, *(len(r.query.id) for r in evaluation.per_query)]), 32)
    header = f"{'query_id':<{width}} {'overlap@' + str(k):>11}"
    for n in names:
        header += f" {f'recall@{k} {n}':>14} {f'ndcg@{NDCG_AT} {n}':>12}"
    lines = [header + "  query"]
    for r in evaluation.per_query:
        row = _row(r.query.id, r.overlap, r.figures, names, width)
        lines.append(f"{row}  {r.query.text[:60]}")
    total = _row("total", evaluation.overlap, evaluation.figures, names, width)
    judged = f"{evaluation.judged} of {len(evaluation.per_query)} queries judged"
    return [*lines, f"{total}  ({judged})"]


def _row(
    label: str, overlap: float, figures: dict[str, Figures], names: Sequence[str], width: int
) -> str:
    out = f"{label[:width]:<{width}} {overlap:>11.3f}"
    for n in names:
        found = figures.get(n)
        recall, ndcg = (f"{found.recall:.3f}", f"{found.ndcg_10:.3f}") if found else ("-", "-")
        out += f" {recall:>14} {ndcg:>12}"
    return out


def json_lines(evaluation: Evaluation) -> list[str]:
    """JSON Lines (docs/reference/cli.md): one object per query, then one for the totals
    (``"kind": "total"``)."""
    out = []
    for r in evaluation.per_query:
        row: dict[str, Any] = {
            "kind": "query",
            "query_id": r.query.id,
            "query": r.query.text,
            "k": evaluation.k,
            "overlap": round(r.overlap, 6),
        }
        row.update({n: _rounded(r.figures.get(n)) for n in evaluation.names})
        out.append(json.dumps(row, ensure_ascii=False))
    return [*out, json.dumps(evaluation.total())]


# -- a migration's evaluation and its gate -------------------------------------------------


def record(shadow: Sink, evaluation: Evaluation, *, against: Sink, source: str) -> dict[str, Any]:
    """Record ``evaluation`` (the new collection ``shadow`` against the live collection
    ``against``) on ``shadow``; what was recorded."""
    found = {
        **evaluation.total(),
        "collection": shadow.collection,
        "fingerprint": _fingerprint(shadow),
        "against": against.collection,
        "against_fingerprint": _fingerprint(against),
        "query_file": source,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    del found["kind"]
    with translated("alter collection"):
        shadow.client.alter_collection_properties(
            shadow.collection, properties={PROPERTY: json.dumps(found)}, timeout=shadow.timeout_s
        )
    log.info("evaluation_recorded", **{k: v for k, v in found.items() if k != "query_file"})
    return found


def recorded_evaluation(sink: Sink) -> dict[str, Any] | None:
    """The evaluation recorded on ``sink``'s collection (the totals of ``Evaluation.total``,
    ``collection``, ``against`` and their fingerprints, ``query_file``, ``at``), or None."""
    raw = _properties(sink).get(PROPERTY)
    if not raw:
        return None
    try:
        found = json.loads(raw)
    except json.JSONDecodeError:
        log.warning("evaluation_unreadable", collection=sink.collection, property=PROPERTY)
        return None
    return found if isinstance(found, dict) else None


def _properties(sink: Sink) -> dict[str, str]:
    with translated("describe collection"):
        info = sink.client.describe_collection(sink.collection, timeout=sink.timeout_s)
    return {str(k): str(v) for k, v in (info.get("properties") or {}).items()}


def _fingerprint(sink: Sink) -> str:
    return _properties(sink).get("embedq.fingerprint") or "v0"
