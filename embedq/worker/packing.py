"""Token-budget batching: pack texts of similar length so padding is small.

A window of entries is sorted by token length and cut into batches whose *padded* size
(rows × longest row) stays within ``max_tokens``, with at most ``max_rows`` rows. Sorting
keeps 10-token and 500-token texts out of the same batch whenever the window allows.
"""

from __future__ import annotations

from collections.abc import Sequence

# Defaults per device, used when a limit is 0 ("auto"). On CUDA, TEI's 16384 tokens keep the
# GPU busy. On CPU, large batches are slower per text, not faster: attention scores grow
# with rows × length² and fall out of cache (measured with `embedq bench`, see
# docs/benchmarks.md#cpu-batch-limits-how-the-defaults-were-chosen).
CUDA_MAX_BATCH_TOKENS = 16384
CUDA_MAX_BATCH_ROWS = 256
CPU_MAX_BATCH_TOKENS = 4096
CPU_MAX_BATCH_ROWS = 64


def batch_limits(device: str, max_tokens: int = 0, max_rows: int = 0) -> tuple[int, int]:
    """``(max_tokens, max_rows)`` for a resolved device; a 0 takes the device's default."""
    on_cuda = device.startswith("cuda")
    tokens = max_tokens or (CUDA_MAX_BATCH_TOKENS if on_cuda else CPU_MAX_BATCH_TOKENS)
    rows = max_rows or (CUDA_MAX_BATCH_ROWS if on_cuda else CPU_MAX_BATCH_ROWS)
    return tokens, rows


def plan_batches(lengths: Sequence[int], max_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices into ``lengths`` grouped into batches, shortest texts first.

    A single text longer than ``max_tokens`` still gets a batch of its own. Limits of 0
    ("auto") must be resolved first with ``batch_limits``.
    """
    if max_tokens <= 0 or max_rows <= 0:
        raise ValueError(
            f"batch limits must be > 0 (got {max_tokens} tokens, {max_rows} rows): resolve "
            "'auto' (0) with embedq.worker.packing.batch_limits(device, ...) first"
        )
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so the row being added is the longest: padded cost is
        # (rows + 1) × its length.
        if current and ((len(current) + 1) * lengths[i] > max_tokens or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
