"""``embedq bench``: the model, sentence-transformers, a per-message worker and embedq
side by side on one corpus."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from embedq.cli.options import LOG_LEVEL, build_settings, model, run_guarded, setting


@click.command()
@click.option(
    "--corpus",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSONL file of {id, text} rows (the first -n are used).",
)
@click.option(
    "-n", "n", default=2000, show_default=True, type=click.IntRange(1), help="Texts per variant."
)
@click.option(
    "--n-classic",
    default=300,
    show_default=True,
    type=click.IntRange(1),
    help="Texts for the slow per-message worker (c); its texts/s still compare.",
)
@click.option(
    "--runs",
    default=3,
    show_default=True,
    type=click.IntRange(1),
    help="Repeat the comparison this often; medians are reported.",
)
@click.option(
    "--variants",
    default=",".join(("raw", "st", "classic", "embedq")),
    show_default=True,
    help="Which of raw, st, classic, embedq to run; also unordered (embedq with ordered "
    "per-id writes off: what the index guarantee costs), embedq on a CPU backend (onnx, "
    "onnx-int8, openvino, openvino-int8) and st-onnx-int8 (sentence-transformers' int8 ONNX "
    "encode, needs --st-python).",
)
@click.option(
    "--st-python",
    default="",
    help="A Python with sentence-transformers and optimum[onnxruntime], for variant "
    "st-onnx-int8 (optimum cannot live beside transformers 5).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the results into this markdown file (e.g. docs/benchmarks.md).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option(
    "--feed",
    is_flag=True,
    help="The feed benchmark instead: embedq with a zero-layer copy of the model against "
    "the bare sink, tokenizer and Redis, on a private Milvus 2.3.5 server (--variants unused).",
)
@click.option(
    "--sparse",
    is_flag=True,
    help="What sparse output costs instead: a dense model, the same with a BGE-M3 sparse head, "
    "and a SPLADE model of the same size, encoded and upserted (-n texts, --runs).",
)
@click.option(
    "--procs",
    default="1,2",
    show_default=True,
    help="With --feed: worker process counts to run (each a variant).",
)
@model
@setting("read_count", help="Entries per read window, for (a) and (d).")
@setting("max_batch_tokens", help="Padded tokens per batch, for (a) and (d) (0: auto).")
@setting("max_batch_rows", help="Rows per batch, for (a) and (d) (0: auto).")
@setting("block_ms", help="XREADGROUP BLOCK for (c) and (d).", show_default="100")
@LOG_LEVEL
def bench(corpus: Path, n: int, variants: str, output: Path | None, **options: Any) -> None:
    """Side by side: raw model, sentence-transformers, a per-message worker, and embedq."""
    from embedq.bench.report import markdown, update_markdown
    from embedq.bench.run import run_bench
    from embedq.bench.variants import EXTRA_VARIANTS, VARIANTS

    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS) - set(EXTRA_VARIANTS))
    if unknown or not chosen:
        raise click.UsageError(f"--variants: unknown {', '.join(unknown) or '(none)'}")
    if options.get("block_ms") is None:
        # A drained worker waits one BLOCK before it notices the stream is empty; keep
        # that wait out of the measurement.
        options["block_ms"] = 100
    if options.pop("sparse"):
        from embedq.bench.sparse import sparse_markdown

        def sparse_body() -> int:
            click.echo(sparse_markdown(corpus, n, options["runs"]))
            return 0

        run_guarded(sparse_body)
        return
    if options.pop("feed"):
        procs = _counts(options.pop("procs"))
        _feed(corpus, n, options["runs"], procs, options.get("model") or "", output=output)
        return
    options.pop("procs")
    n_classic: int = options.pop("n_classic")
    runs: int = options.pop("runs")
    as_json: bool = options.pop("as_json")
    st_python: str = options.pop("st_python")
    settings = build_settings(options)

    def body() -> int:
        report = run_bench(
            corpus,
            settings,
            n=n,
            n_classic=n_classic,
            runs=runs,
            variants=chosen,
            command="embedq " + " ".join(sys.argv[1:]),
            progress=lambda line: click.echo(line, err=True),
            st_python=st_python,
        )
        if output is not None:
            update_markdown(output, report)
        if as_json:
            click.echo(json.dumps(report.as_dict(), default=str))
        else:
            click.echo(markdown(report))
        return 0

    run_guarded(body)


def _counts(spec: str) -> list[int]:
    try:
        counts = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.UsageError(f"--procs {spec}: give process counts such as 1,2")
    return counts


def _feed(
    corpus: Path, n: int, runs: int, procs: list[int], model: str, *, output: Path | None
) -> None:
    from embedq.bench.feed_run import feed_markdown, run_feed_bench
    from embedq.model.encoder import resolve_model_dir

    def body() -> int:
        report = run_feed_bench(
            corpus,
            resolve_model_dir(model)[0],
            n=n,
            runs=runs,
            procs=procs,
            command="embedq " + " ".join(sys.argv[1:]),
            progress=lambda line: click.echo(line, err=True),
        )
        text = feed_markdown(report)
        if output is not None:
            with output.open("a", encoding="utf-8") as handle:
                handle.write("\n" + text)
        click.echo(text)
        return 0

    run_guarded(body)
