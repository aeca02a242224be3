"""Example ETL job: chunk documents from a JSONL file and enqueue the chunks.

    python producers/jsonl_job.py docs.jsonl --chunk-chars 1200

Each input line is {"id": ..., "text": ...}; each chunk gets the id "<doc id>#<n>" so a
re-run overwrites the same rows instead of adding new ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import click

from embedq.producer.client import Producer


def chunks(text: str, size: int) -> Iterator[str]:
    paragraph = ""
    for part in text.split("\n\n"):
        if paragraph and len(paragraph) + len(part) > size:
            yield paragraph
            paragraph = ""
        paragraph = f"{paragraph}\n\n{part}" if paragraph else part
    if paragraph.strip():
        yield paragraph


@click.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--chunk-chars", default=1200, show_default=True)
@click.option("--redis-url", envvar="EMBEDQ_REDIS_URL", default="redis://127.0.0.1:6379/0")
@click.option("--stream", envvar="EMBEDQ_STREAM", default="embedq:tasks")
def main(source: Path, chunk_chars: int, redis_url: str, stream: str) -> None:
    def records() -> Iterator[dict[str, object]]:
        with source.open(encoding="utf-8") as handle:
            for line in handle:
                doc = json.loads(line)
                for n, chunk in enumerate(chunks(doc["text"], chunk_chars)):
                    yield {"id": f"{doc['id']}#{n}", "text": chunk, "meta": {"doc": doc["id"]}}

    with Producer.connect(redis_url, stream) as producer:
        click.echo(f"enqueued {producer.enqueue(records())} chunks")


if __name__ == "__main__":
    main()
