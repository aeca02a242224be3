"""The GPU run kit's measurements (issue 30): ``scripts/gpu_kit.py`` runs them on a GPU
machine, or on the CPU with tiny sizes for its dry run, as
``python -m embedq.bench.gpu_kit throughput|feed ...``.

``throughput``: for each model (the packaged all-MiniLM-L6-v2; ``bert-base``, BERT-base's
shape built from a config with random weights, whose speed is the shape's and not the
weights'; ``tiny`` for the dry run) and each text length (~50 and ~512 tokens), texts are
cut from the sample corpus (real English; each distinct, so no vector-cache hit skips the
model), then measured as

- ``raw``: ``Encoder.forward`` in a child process over the batches a worker makes of the
  same texts (read windows of ``--read-count``, packed by ``plan_batches`` with the GPU
  shapes of ``embedq.bench.feed.GPU_SHAPES``), tokenized beforehand, passes repeated for at
  least ``--min-s``: the ceiling with no queue and no database;
- ``embedq``: ``embedq worker --drain`` as 1, 2, 4 processes on the one device
  (``embedq.bench.feed.run_feed``: the rate read from the consumer group between 10 % and
  90 % acknowledged; CPU µs per text by stage from each worker's ``worker_stopped`` line),
  into the kit's ``milvus-lite server``; the rows written are counted.

The device's utilisation (the share of time a kernel ran) is sampled every 100 ms through
NVML (``pynvml``, from nvidia-ml-py), else ``nvidia-smi -lms``, and averaged over the same
window (the raw ceiling: its timed loop). Each measurement is one JSON line, written when it
is done, so a step stopped at its time limit keeps what it finished.

``feed``: ``embedq bench --feed`` (``embedq.bench.feed_run``) on the kit's own Redis and
Milvus server, on texts of ~50 tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

from embedq.bench.feed import GPU_SHAPES, run_feed
from embedq.bench.run import load_sample

_SHAPES = dict(zip(GPU_SHAPES[::2], GPU_SHAPES[1::2], strict=True))
READ_COUNT = int(_SHAPES["--read-count"])
MAX_BATCH_TOKENS = int(_SHAPES["--max-batch-tokens"])
MAX_BATCH_ROWS = int(_SHAPES["--max-batch-rows"])
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
MODELS = ("packaged", "bert-base", "tiny")

# -- the device's utilisation ---------------------------------------------------------------


class UtilisationSampler:
    """The GPU's utilisation in % (NVML: the share of the last period in which a kernel
    ran), every ``every_s``, each sample with its ``perf_counter`` time. NVML when
    ``pynvml`` imports, else ``nvidia-smi -lms``, else nothing (``source`` says which)."""

    def __init__(self, every_s: float = 0.1, index: int = 0) -> None:
        self.every_s = every_s
        self.index = index
        self.samples: list[tuple[float, float]] = []
        self.source = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._smi: subprocess.Popen[str] | None = None

    def start(self) -> Self:
        read = self._nvml()
        if read is not None:
            self.source = "nvml"
            self._thread = threading.Thread(target=self._poll, args=(read,), daemon=True)
        elif shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            self._smi = subprocess.Popen(
                [
                    "nvidia-smi",
                    f"--id={self.index}",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    f"-lms={int(self.every_s * 1000)}",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        if self._thread is not None:
            self._thread.start()
        return self

    def _nvml(self) -> Callable[[], float] | None:
        try:
            nvml: Any = importlib.import_module("pynvml")
            nvml.nvmlInit()
            handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
            nvml.nvmlDeviceGetUtilizationRates(handle)
        except Exception:  # no nvidia-ml-py, no driver, no device: the next source
            return None
        return lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def _poll(self, read: Callable[[], float]) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(Exception):  # one failed read is one missing sample
                self.samples.append((time.perf_counter(), read()))

    def _read_smi(self) -> None:
        assert self._smi is not None and self._smi.stdout is not None
        for line in self._smi.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append((time.perf_counter(), float(line.strip())))

    def stop(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait(5)
        if self._thread is not None:
            self._thread.join(5)

    def summary(self, start: float = 0.0, end: float = float("inf")) -> dict[str, Any]:
        """Mean, median and max utilisation of the samples taken between ``start`` and
        ``end``; ``None`` figures when there are none (a CPU run)."""
        window = [u for t, u in self.samples if start <= t <= end]
        if not window:
            return {"source": self.source, "samples": 0, "mean_pct": None, "p50_pct": None}
        return {
            "source": self.source,
            "samples": len(window),
            "mean_pct": round(statistics.fmean(window), 1),
            "p50_pct": round(statistics.median(window), 1),
            "max_pct": round(max(window), 1),
        }


@contextlib.contextmanager
def sampling(every_s: float = 0.1) -> Iterator[UtilisationSampler]:
    sampler = UtilisationSampler(every_s).start()
    try:
        yield sampler
    finally:
        sampler.stop()


# -- texts and models ---------------------------------------------------------------------


def make_texts(corpus: Path, tokenizer_json: Path, n: int, tokens: int) -> list[str]:
    """``n`` distinct texts of ``tokens`` tokens, give or take one (special tokens
    included), cut at a token boundary from the words of ``corpus`` taken in order, each
    numbered so that every text differs."""
    from tokenizers import Tokenizer

    words = " ".join(r["text"] for r in load_sample(corpus, 1_000_000)).split()
    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.no_truncation()  # a saved tokenizer.json may truncate and pad (the packaged
    tokenizer.no_padding()  # one: to 128)
    body = max(1, tokens - 4)  # [CLS], [SEP] and the number (~2 tokens) make up the rest
    # Every word is at least one token: ``body`` words hold ``body`` tokens or more.
    ring = words + words[:body]
    starts = ((i * 7) % len(words) for i in range(n))
    drafts = [" ".join(ring[start : start + body]) for start in starts]
    texts = []
    for i, (draft, encoded) in enumerate(zip(drafts, tokenizer.encode_batch(drafts), strict=True)):
        spans = [
            span
            for span, word in zip(encoded.offsets, encoded.word_ids, strict=True)
            if word is not None
        ]
        cut = spans[min(body, len(spans)) - 1][1]
        texts.append(f"{draft[:cut]} {i}")
    return texts


def reference_texts(corpus: Path) -> list[str]:
    """What the GPU tests embed and compare with fp32: 48 short texts as they are in the
    sample corpus, 48 of its paragraphs joined three at a time (past the packaged model's
    256-token limit, so truncation is in the comparison too) and 32 in between."""
    rows = [r["text"] for r in load_sample(corpus, 1_000_000)]
    short = [t for t in rows if len(t) < 200][:48]
    long = [t for t in rows if len(t) >= 200]
    joined = [" ".join(long[i : i + 3]) for i in range(0, 3 * 48, 3)]
    middle = [t[:400] for t in long[-32:]]
    return short + joined + middle


def build_model(kind: str, into: Path) -> Path:
    """The model directory for ``kind`` (see ``MODELS``): the packaged one as installed,
    else a BERT with random weights (fixed seed) and the packaged tokenizer, saved once."""
    from embedq.model.encoder import resolve_model_dir

    packaged = resolve_model_dir("")[0]
    if kind == "packaged":
        return packaged
    target = into / kind
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import BertConfig, BertModel

    if kind == "bert-base":
        config = BertConfig()  # its defaults are BERT-base's: 12 × 768, 512 positions
    elif kind == "tiny":
        config = BertConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
        )
    else:
        raise ValueError(f"unknown model {kind!r}: one of {', '.join(MODELS)}")
    torch.manual_seed(0)
    model: Any = BertModel(config)
    if kind == "bert-base":  # half the bytes to write; a CUDA worker runs it in fp16 anyway
        model = model.half()
    model.save_pretrained(str(target))
    for name in TOKENIZER_FILES:
        shutil.copy(packaged / name, target / name)
    return target


# -- (raw) the forward ceiling, in a child process ------------------------------------------


@dataclass(frozen=True)
class RawJob:
    model: str
    texts: list[str]
    min_s: float
    device: str = "auto"


def raw_ceiling(job: RawJob) -> dict[str, Any]:
    """The model alone on the worker's batches: texts/s and tokens/s of ``forward``
    (upload, model, pool, vectors back to the host) with tokenizing done beforehand."""
    import torch

    from embedq.model.encoder import Encoder
    from embedq.worker.packing import plan_batches

    torch.set_grad_enabled(False)
    encoder = Encoder(job.model, job.device)
    started = time.perf_counter()
    tokenized = encoder.tokenize(job.texts)
    tokenize_s = time.perf_counter() - started
    batches: list[list[list[int]]] = []
    for begin in range(0, len(tokenized), READ_COUNT):
        window = tokenized[begin : begin + READ_COUNT]
        for rows in plan_batches([len(t.ids) for t in window], MAX_BATCH_TOKENS, MAX_BATCH_ROWS):
            batches.append([window[i].ids for i in rows])
    for batch in batches[:3]:  # first calls of a shape (kernels, allocator) are not throughput
        encoder.forward(batch)
    texts = tokens = passes = 0
    with sampling() as sampler:
        began = time.perf_counter()
        while passes == 0 or time.perf_counter() - began < job.min_s:
            for batch in batches:
                tokens += encoder.forward(batch).tokens
                texts += len(batch)
            passes += 1
        elapsed = time.perf_counter() - began
    return {
        "device": encoder.device,
        "dtype": str(encoder.dtype).removeprefix("torch."),
        "texts": texts,
        "tokens": tokens,
        "passes": passes,
        "batches": len(batches),
        "elapsed_s": round(elapsed, 3),
        "texts_per_s": round(texts / elapsed, 1),
        "tokens_per_s": round(tokens / elapsed, 1),
        "tokenize_texts_per_s": round(len(job.texts) / tokenize_s, 1),
        "gpu_util": sampler.summary(),
    }


def run_raw(job: RawJob) -> dict[str, Any]:
    """``raw_ceiling`` in a fresh spawned process: its own CUDA context, freed after."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(raw_ceiling, job).result()


# -- (embedq) real workers --------------------------------------------------------------------


def run_embedq(
    rows: list[dict[str, str]],
    *,
    procs: int,
    model: Path,
    redis_url: str,
    milvus_uri: str,
    name: str,
) -> dict[str, Any]:
    """``procs`` worker processes drain ``rows``; the rate, the device's utilisation over
    the same 10-90 % window, CPU per stage, and the rows Milvus holds afterwards."""
    with sampling() as sampler:
        result = run_feed(
            rows,
            procs=procs,
            model=model,
            redis_url=redis_url,
            milvus_uri=milvus_uri,
            name=name,
            run=1,
        )
    stored = _count_and_drop(milvus_uri, name)
    return {
        "procs": procs,
        "texts": len(rows),
        "rows_in_milvus": stored,
        "texts_per_s": round(result.texts_per_s, 1),
        "gpu_util": sampler.summary(*result.window_s),
        "cpu_us_per_text": result.cpu_us_per_text,
        "process_cpu_us_per_text": result.process_cpu_us_per_text,
        "peak_rss_mb": round(result.peak_rss_mb, 1),
    }


def _count_and_drop(milvus_uri: str, collection: str) -> int:
    """Rows in the variant's collection (all of them, or the run lost some), then drop it
    so the server carries no earlier variant's rows."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=milvus_uri)
    try:
        found = client.query(
            collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
        )
        client.drop_collection(collection)
        return int(found[0]["count(*)"])
    finally:
        client.close()


# -- the two commands -------------------------------------------------------------------------


def throughput(args: argparse.Namespace) -> None:
    out = Path(args.out)
    work = Path(args.work_dir)
    for kind in _list(args.models):
        model = build_model(kind, work)
        for tokens in (int(t) for t in _list(args.tokens)):
            # As many texts as --max-tokens allows (24,000 of 50 tokens, 5,859 of 512), so
            # long texts do not spend the step's time on making and tokenizing them.
            count = min(args.max_texts, args.max_tokens // tokens)
            texts = make_texts(Path(args.corpus), model / "tokenizer.json", count, tokens)
            raw = run_raw(RawJob(str(model), texts, args.min_s))
            mean_tokens = raw["tokens"] / raw["texts"]
            about = {"model": kind, "tokens_target": tokens, "mean_tokens": round(mean_tokens, 1)}
            _emit(out, {"kind": "raw", **about, **raw})
            # Enough texts for about --target-s at the ceiling's rate (the workers' own
            # rate is read between 10 % and 90 % acknowledged, so start-up is left out).
            n = max(args.min_texts, min(len(texts), int(raw["texts_per_s"] * args.target_s)))
            rows = [{"id": f"t{i}", "text": t} for i, t in enumerate(texts[:n])]
            for procs in (int(p) for p in _list(args.procs)):
                name = f"tp_{kind.replace('-', '_')}_{tokens}_{procs}"
                got = run_embedq(
                    rows,
                    procs=procs,
                    model=model,
                    redis_url=args.redis_url,
                    milvus_uri=args.milvus_uri,
                    name=name,
                )
                got["tokens_per_s"] = round(got["texts_per_s"] * mean_tokens, 1)
                got["ratio_to_raw"] = round(got["texts_per_s"] / raw["texts_per_s"], 3)
                _emit(out, {"kind": "embedq", **about, **got})


def feed(args: argparse.Namespace) -> None:
    from embedq.bench.feed_run import feed_markdown, run_feed_bench
    from embedq.model.encoder import resolve_model_dir

    model = resolve_model_dir("")[0]
    texts = make_texts(Path(args.corpus), model / "tokenizer.json", args.n, args.tokens)
    corpus = Path(args.work_dir) / "feed.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    corpus.write_text(
        "".join(json.dumps({"id": f"f{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    report = run_feed_bench(
        corpus,
        model,
        n=args.n,
        runs=1,
        procs=[int(p) for p in _list(args.procs)],
        command="python -m embedq.bench.gpu_kit " + " ".join(sys.argv[1:]),
        progress=lambda line: print(line, file=sys.stderr, flush=True),
        servers=(args.redis_url, args.milvus_uri),
    )
    from embedq.bench.feed import feed_ratios

    document = {
        "n": report.n,
        "tokens_target": args.tokens,
        "procs": report.procs,
        "results": [asdict(r) for r in report.results],
        "ratio_to_slowest_component": feed_ratios(report.results),
        "markdown": feed_markdown(report),
    }
    Path(args.out).write_text(json.dumps(document, indent=1))


def _emit(out: Path, record: dict[str, Any]) -> None:
    with out.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), file=sys.stderr, flush=True)


def _list(spec: str) -> list[str]:
    return [part.strip() for part in spec.split(",") if part.strip()]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m embedq.bench.gpu_kit")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("throughput", "feed"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--out", required=True)
        cmd.add_argument("--corpus", default="examples/sample.jsonl")
        cmd.add_argument("--redis-url", required=True)
        cmd.add_argument("--milvus-uri", required=True)
        cmd.add_argument("--work-dir", required=True)
        cmd.add_argument("--procs", default="1,2,4")
    tp = sub.choices["throughput"]
    tp.add_argument("--models", default="bert-base,packaged")
    tp.add_argument("--tokens", default="50,512")
    tp.add_argument("--max-texts", type=int, default=24000)
    tp.add_argument("--max-tokens", type=int, default=3_000_000, help="texts × tokens, at most")
    tp.add_argument("--min-texts", type=int, default=2000)
    tp.add_argument("--min-s", type=float, default=2.0, help="the raw ceiling's timed loop")
    tp.add_argument("--target-s", type=float, default=3.0, help="a worker run at raw speed")
    fd = sub.choices["feed"]
    fd.add_argument("-n", dest="n", type=int, default=20000)
    fd.add_argument("--tokens", type=int, default=50)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    {"throughput": throughput, "feed": feed}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
