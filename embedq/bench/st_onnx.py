"""Variant ``st-onnx-int8`` of ``embedq bench``: sentence-transformers' own best CPU backend,
``backend="onnx"`` with its dynamically quantized int8 model, timing ``encode`` alone.

sentence-transformers' ONNX backend needs optimum, which needs transformers < 4.58; embedq
runs on transformers 5, so this runs as a script under another interpreter
(``embedq bench --st-python /path/to/venv/bin/python``; docs/benchmarks.md says how that
venv is made). It imports nothing of embedq: a JSON request on stdin (model_dir, texts,
work_dir, quantization), one JSON line of results on stdout.

The int8 model is sentence-transformers' own recipe: the fp32 export (optimum, done by
``SentenceTransformer(..., backend="onnx")``) quantized with
``export_dynamic_quantized_onnx_model`` for this CPU's instruction set, once per work_dir.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

BATCH_SIZE = 32  # SentenceTransformer.encode's default, as variant st


def int8_model(model_dir: Path, work_dir: Path, config: str) -> tuple[Any, str]:
    """sentence-transformers' int8 ONNX model of ``model_dir`` (exported once into
    ``work_dir``) and the file it loaded."""
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    target = work_dir / "st-onnx-model"
    # qint8 or quint8, by the config (avx2 quantizes activations as uint8).
    found = sorted(target.glob(f"onnx/model_q*int8_{config}.onnx"))
    if not found:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(model_dir, target)
        fp32 = SentenceTransformer(str(target), backend="onnx", device="cpu")
        fp32.save_pretrained(str(target))  # onnx/model.onnx beside the weights
        export_dynamic_quantized_onnx_model(fp32, config, str(target))
        found = sorted(target.glob(f"onnx/model_q*int8_{config}.onnx"))
    file_name = str(found[0].relative_to(target))
    model = SentenceTransformer(
        str(target), backend="onnx", device="cpu", model_kwargs={"file_name": file_name}
    )
    return model, file_name


def lowest_cosine(model_dir: Path, model: Any, texts: list[str]) -> float:
    """The lowest cosine between this int8 model's vectors and fp32 torch's on ``texts``
    (the figure embedq's accuracy gate judges)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(model_dir), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    got = model.encode(texts, normalize_embeddings=True)
    return float(np.min(np.sum(reference * got, axis=1)))


def main() -> None:
    request = json.loads(sys.stdin.read())
    model_dir, work_dir = Path(request["model_dir"]), Path(request["work_dir"])
    texts: list[str] = request["texts"]
    loaded = time.perf_counter()
    model, file_name = int8_model(model_dir, work_dir, request["quantization"])
    encoded = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)
    tokens = sum(len(ids) for ids in encoded["input_ids"])
    model.encode(texts[:2], batch_size=BATCH_SIZE)
    started = time.perf_counter()
    model.encode(texts, batch_size=BATCH_SIZE, show_progress_bar=False)
    elapsed = time.perf_counter() - started
    found = {
        "texts": len(texts),
        "tokens": tokens,
        "elapsed_s": elapsed,
        "setup_s": started - loaded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "file": file_name,
    }
    if request.get("check_texts"):
        found["lowest_cosine_vs_fp32"] = lowest_cosine(model_dir, model, request["check_texts"])
    print(json.dumps(found))


if __name__ == "__main__":
    main()
