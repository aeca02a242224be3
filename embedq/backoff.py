"""Backoff as a pure function: exponential, capped, with full jitter."""

from __future__ import annotations

import random


def compute_backoff(
    attempt: int, *, base_s: float = 0.5, cap_s: float = 30.0, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    Full jitter (uniform in [cap/2, cap] of the exponential step) keeps a fleet of workers
    that lost Milvus at the same moment from hammering it in lockstep when it returns.
    """
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    step = min(cap_s, base_s * 2 ** (attempt - 1))
    draw: float = (rng or random).uniform(0.5, 1.0)
    return float(step * draw)
