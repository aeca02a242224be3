"""Metering the bulk side: each enqueue job counts the tokens its texts were embedded from
(issue 27), shown by `embedq jobs` and `embedq job`."""

from __future__ import annotations

import json
from collections.abc import Callable

import redis
from click.testing import CliRunner

from embedq.cli import main
from embedq.core.config import Settings
from embedq.model.encoder import Encoder
from embedq.producer.client import Producer
from embedq.queue.jobs import JobLedger, get_job
from embedq.worker.loop import Worker

TEXTS = ["a short text", "another text, a little longer than the first one", "word " * 2000]


def test_a_job_counts_the_tokens_its_texts_were_embedded_from(
    settings: Settings,
    make_worker: Callable[..., Worker],
    encoder: Encoder,
    redis_client: redis.Redis,
) -> None:
    with Producer.connect(settings.redis_url, stream=settings.stream) as producer:
        producer.enqueue([{"id": f"t{i}", "text": t} for i, t in enumerate(TEXTS)], job="tok")
        producer.enqueue([{"id": "o", "text": "someone else's text"}], job="other")
    make_worker().run()
    # As the model took each text: special tokens counted, the long one truncated.
    expected = sum(len(t.ids) for t in encoder.tokenize(TEXTS))
    assert expected < len(TEXTS[2].split()), "the long text is counted as truncated"
    ledger = JobLedger(redis_client, settings.stream)
    job, other = get_job(ledger, "tok"), get_job(ledger, "other")
    assert job is not None and other is not None
    assert (job.embedded, job.tokens) == (3, expected)
    assert other.tokens == len(encoder.tokenize(["someone else's text"])[0].ids)

    where = ["--redis-url", settings.redis_url, "--stream", settings.stream]
    listed = CliRunner().invoke(main, ["jobs", *where, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {j["job"]: j for j in map(json.loads, listed.output.splitlines())}
    assert rows["tok"]["tokens"] == expected
    table = CliRunner().invoke(main, ["jobs", *where]).output.splitlines()
    header = table[0].split()
    line = next(row.split() for row in table[1:] if row.startswith("tok "))
    assert line[header.index("tokens")] == str(expected)
    shown = CliRunner().invoke(main, ["job", "tok", *where]).output
    assert f"tokens           {expected}" in shown
