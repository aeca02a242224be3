"""CPU backends, model alone (issue 29): ``python -m embedq.bench.backends [--texts N]``.

Encodes the same texts, in the same token-budget batches, with embedq's torch fp32, ONNX and
OpenVINO (fp32 and int8) forward passes and with sentence-transformers' fp32 ``encode``,
alternating the variants each round so load on a shared machine falls on all of them;
prints medians, ratios, retrieval overlap@10 of each against fp32 torch (held-out queries
from the corpus, ``embedq.ops.evaluate``: ir-measures), the CPU's int8 instruction set and
the load average. The end-to-end run (Redis + Milvus + acks) is not part of it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedq.model import onnx_backend
from embedq.model.encoder import Encoder

CORPORA = (Path("../shared/corpus/short.jsonl"), Path("../shared/corpus/long.jsonl"))
FALLBACK = Path("examples/sample.jsonl")
REFERENCE = "embedq torch fp32"
ST = "sentence-transformers fp32 encode"
QUERIES = 100  # held-out queries for overlap@10


def load(path: Path, n: int) -> list[str]:
    texts = []
    with path.open() as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            if len(texts) == n:
                break
    return texts


def batched(encoder: Encoder, texts: list[str], max_tokens: int) -> np.ndarray:
    """Sorted by length and cut at a padded-token budget, as the worker's batcher does."""
    tokens = [t.ids for t in encoder.tokenize(texts)]
    order = sorted(range(len(tokens)), key=lambda i: len(tokens[i]))
    out = np.zeros((len(texts), encoder.width), dtype=np.float32)
    batch: list[int] = []
    for i in [*order, -1]:
        if i >= 0 and (len(batch) + 1) * len(tokens[i]) <= max_tokens:
            batch.append(i)
            continue
        if batch:
            out[batch] = encoder.forward([tokens[j] for j in batch]).vectors
        batch = [i] if i >= 0 else []
    return out


def overlap_at_10(
    corpus: Path, skip: int, documents: dict[str, np.ndarray], encoders: dict[str, Encoder]
) -> dict[str, float]:
    """overlap@10 of each variant's neighbours against fp32 torch's: held-out queries from
    ``corpus`` (the rows after the ``skip`` encoded ones), each embedded by the variant's own
    encoder and searched over its own vectors of the texts (``embedq.ops.evaluate``)."""
    from embedq.ops.evaluate import dense_run, overlap_at_k, queries_from_corpus

    queries = queries_from_corpus(corpus, skip=skip, n=QUERIES)
    query_ids = [q.id for q in queries]
    doc_ids = [f"d{i}" for i in range(len(documents[REFERENCE]))]

    def run(name: str) -> dict[str, dict[str, float]]:
        vectors = encoders[name].encode([q.text for q in queries])
        return dense_run(vectors, documents[name], query_ids, doc_ids, 10)

    reference = run(REFERENCE)
    return {name: overlap_at_k(reference, run(name), 10) for name in encoders if name != REFERENCE}


def encoders(cache: str) -> dict[str, Encoder]:
    """fp32 torch, the reference, and every exported backend behind its accuracy gate."""
    found = {REFERENCE: Encoder(device="cpu")}
    for backend in ("onnx", "openvino"):
        for quantize in ("none", "int8"):
            name = f"embedq {backend} {'fp32' if quantize == 'none' else quantize}"
            found[name] = Encoder(
                device="cpu", backend=backend, quantize=quantize, model_cache=cache
            )
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    variants = encoders(tempfile.mkdtemp(prefix="embedq-bench-backends-"))
    st = SentenceTransformer(str(variants[REFERENCE].model_dir), device="cpu")
    print(f"cpu int8 ISA: {onnx_backend.cpu_isa()}; load average {os.getloadavg()}")
    corpora = [c for c in CORPORA if c.is_file()] or [FALLBACK]
    for corpus in corpora:
        texts = load(corpus, args.texts)
        runs: dict[str, Callable[[], np.ndarray]] = {
            name: functools.partial(batched, e, texts, args.max_batch_tokens)
            for name, e in variants.items()
        }
        runs[ST] = functools.partial(st.encode, texts, batch_size=32, normalize_embeddings=True)
        times: dict[str, list[float]] = {name: [] for name in runs}
        vectors: dict[str, np.ndarray] = {}
        for _ in range(args.rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                vectors[name] = run()
                times[name].append(time.perf_counter() - started)
        base = statistics.median(times[ST])
        print(f"\n{corpus} ({len(texts)} texts, {args.rounds} rounds)")
        for name, found in times.items():
            median = statistics.median(found)
            print(f"  {name:36s} {len(texts) / median:8.1f} texts/s  {base / median:5.2f}x")
        overlaps = overlap_at_10(corpus, len(texts), vectors, variants)
        for name, overlap in overlaps.items():
            print(f"  overlap@10 vs fp32 torch ({QUERIES} held-out queries) {name}: {overlap:.3f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
