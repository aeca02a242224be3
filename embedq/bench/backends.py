"""CPU backends, model alone (issue 29): ``python -m embedq.bench.backends [--texts N]``.

Encodes the same texts, in the same token-budget batches, with embedq's torch fp32, ONNX fp32
and ONNX int8 forward passes and with sentence-transformers' fp32 ``encode``, alternating
the variants each round so load on a shared machine falls on all of them; prints medians,
ratios, retrieval overlap@10 between fp32 and int8 (ranx), the CPU's int8 instruction set
and the load average. The end-to-end run (Redis + Milvus + acks) is not part of it.
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
    out = np.zeros((len(texts), encoder.dimension), dtype=np.float32)
    batch: list[int] = []
    for i in [*order, -1]:
        if i >= 0 and (len(batch) + 1) * len(tokens[i]) <= max_tokens:
            batch.append(i)
            continue
        if batch:
            out[batch] = encoder.forward([tokens[j] for j in batch]).vectors
        batch = [i] if i >= 0 else []
    return out


def overlap_at_10(reference: np.ndarray, candidate: np.ndarray, queries: int) -> float:
    """Mean overlap of the top 10 (fp32 run as qrels, candidate as run), with ranx."""
    from ranx import Qrels, Run, evaluate

    picked = np.linspace(0, len(reference) - 1, queries).astype(int)
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for q in picked:
        want = reference @ reference[q]
        got = candidate @ candidate[q]
        top = np.argsort(-want)[:10]
        qrels[f"q{q}"] = {f"d{d}": 1 for d in top}
        best = np.argsort(-got)[:10]
        run[f"q{q}"] = {f"d{d}": float(got[d]) for d in best}
    return float(evaluate(Qrels(qrels), Run(run), "recall@10"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    cache = tempfile.mkdtemp(prefix="embedq-bench-backends-")
    torch_fp32 = Encoder(device="cpu")
    variants: dict[str, Encoder] = {
        "embedq torch fp32": torch_fp32,
        "embedq onnx fp32": Encoder(device="cpu", backend="onnx", model_cache=cache),
        "embedq onnx int8": Encoder(
            device="cpu", backend="onnx", quantize="int8", model_cache=cache
        ),
    }
    st = SentenceTransformer(str(torch_fp32.model_dir), device="cpu")
    print(f"cpu int8 ISA: {onnx_backend.cpu_isa()}; load average {os.getloadavg()}")
    corpora = [c for c in CORPORA if c.is_file()] or [FALLBACK]
    for corpus in corpora:
        texts = load(corpus, args.texts)
        runs: dict[str, Callable[[], np.ndarray]] = {
            name: functools.partial(batched, e, texts, args.max_batch_tokens)
            for name, e in variants.items()
        }
        runs["sentence-transformers fp32 encode"] = functools.partial(
            st.encode, texts, batch_size=32, normalize_embeddings=True
        )
        times: dict[str, list[float]] = {name: [] for name in runs}
        vectors: dict[str, np.ndarray] = {}
        for _ in range(args.rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                vectors[name] = run()
                times[name].append(time.perf_counter() - started)
        base = statistics.median(times["sentence-transformers fp32 encode"])
        print(f"\n{corpus} ({len(texts)} texts, {args.rounds} rounds)")
        for name, found in times.items():
            median = statistics.median(found)
            print(f"  {name:36s} {len(texts) / median:8.1f} texts/s  {base / median:5.2f}x")
        queries = min(100, len(texts))
        fp32 = vectors["embedq torch fp32"]
        print(
            f"  overlap@10 fp32 vs int8 (ranx recall@10, {queries} queries): "
            f"{overlap_at_10(fp32, vectors['embedq onnx int8'], queries):.3f}"
        )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
