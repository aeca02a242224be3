"""Pure functions: batching, backoff, settings, URL redaction, log scrubbing."""

from __future__ import annotations

import random

import pytest
from structlog.testing import capture_logs

from embedq.core.backoff import compute_backoff
from embedq.core.config import Settings, SettingsError, redact_url
from embedq.core.logs import SecretScrubber
from embedq.worker.packing import plan_batches


def test_batches_respect_the_padded_token_budget_and_row_cap() -> None:
    rng = random.Random(7)
    lengths = [rng.choice([10, 12, 15, 300, 480]) for _ in range(500)]
    batches = plan_batches(lengths, max_tokens=2048, max_rows=64)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= 64
        assert len(batch) == 1 or len(batch) * longest <= 2048


def test_batches_do_not_mix_short_and_long_texts() -> None:
    lengths = [10] * 100 + [500] * 4
    batches = plan_batches(lengths, max_tokens=4096, max_rows=256)
    for batch in batches:
        assert len({lengths[i] for i in batch}) == 1


def test_a_text_over_the_budget_gets_its_own_batch() -> None:
    assert plan_batches([5000, 10], max_tokens=100, max_rows=8) == [[1], [0]]


def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    waits = [compute_backoff(a, base_s=1, cap_s=8, rng=rng) for a in range(1, 8)]
    assert 0.5 <= waits[0] <= 1
    assert all(4 <= w <= 8 for w in waits[4:])
    with pytest.raises(ValueError):
        compute_backoff(0)


def test_settings_reject_unknown_keys_and_unsafe_timeouts() -> None:
    with pytest.raises(SettingsError, match="unknown settings: nope"):
        Settings.from_options(nope=1)
    with pytest.raises(SettingsError, match="shorter than min_idle_s"):
        Settings(milvus_timeout_s=90, min_idle_s=60)
    assert Settings.from_options(stream=None, group="g").group == "g"


def test_secrets_are_collected_and_redacted() -> None:
    s = Settings(redis_url="redis://app:s3cr3t@redis:6379/0", milvus_token="root:Milvus")
    assert set(s.secrets) >= {"s3cr3t", "root:Milvus", "Milvus"}
    assert redact_url(s.redis_url) == "redis://app:***@redis:6379/0"
    assert "s3cr3t" not in repr(s.redis_url_redacted)
    assert "root:Milvus" not in repr(s)


def test_scrubber_removes_secrets_from_every_value() -> None:
    scrub = SecretScrubber(["s3cr3t"])
    with capture_logs() as logs:
        event = scrub(
            None,
            "error",
            {"event": "x", "url": "redis://:s3cr3t@h", "nested": {"e": ValueError("bad s3cr3t")}},
        )
    assert "s3cr3t" not in repr(event)
    assert logs == []
