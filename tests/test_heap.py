"""The worker's heap (embedq.worker.heap): a batch's tensors reuse pages instead of faulting fresh
ones in, and RSS is still given back once it has grown.

Each check runs in a child process: ``settle_heap`` changes the whole process's allocator
and GC, which must not leak into the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from embedq.worker.heap import TRIM_GROWTH_BYTES

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only"
)


def _child(code: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_a_settled_worker_reuses_a_batch_s_pages_instead_of_faulting_them_in_again() -> None:
    """Four ~6 MB arrays alive at once, then freed, ten times: a 256-row batch's tensors.
    Untuned glibc maps or trims them every time (thousands of page faults, each a zeroed
    page); once settled, the second pass faults nothing."""
    found = _child(
        """
        import json, resource
        import numpy as np
        from embedq.worker.heap import settle_heap

        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        def batches():
            before = faults()
            for _ in range(10):
                held = [np.ones(6 * 2**20 // 8) for _ in range(4)]
                del held
            return faults() - before

        batches()
        untuned = batches()
        settle_heap()
        batches()  # the heap grows to hold them once
        print(json.dumps({"untuned": untuned, "settled": batches()}))
        """
    )
    array_pages = 6 * 2**20 // 4096
    assert found["untuned"] > 5 * array_pages, found  # the cost this module removes
    assert found["settled"] < 100, found


def test_freed_memory_goes_back_to_the_os_once_rss_grew_past_the_margin_and_not_before() -> None:
    """A window that grew the heap by ~300 MB and freed it: the next window's call trims
    (RSS falls back); a growth under the margin leaves the heap alone (no trim, no faults
    for the next batch)."""
    found = _child(
        """
        import json
        from embedq.worker.heap import release_free_heap, rss_bytes, settle_heap

        settle_heap()
        settled = rss_bytes()
        blobs = [bytes(2048) for _ in range(150_000)]
        grown = rss_bytes()
        del blobs
        kept = rss_bytes()
        trimmed = release_free_heap()
        after = rss_bytes()
        small = [bytes(2048) for _ in range(10_000)]  # ~20 MB: under the margin
        del small
        print(json.dumps({"settled": settled, "grown": grown, "kept": kept,
                          "trimmed": trimmed, "after": after,
                          "small_trimmed": release_free_heap()}))
        """
    )
    mb = 2**20
    assert found["grown"] - found["settled"] > 250 * mb, found
    assert found["kept"] - found["settled"] > TRIM_GROWTH_BYTES, found  # glibc kept it
    assert found["trimmed"] is True, found
    assert found["after"] < found["settled"] + 50 * mb, found
    assert found["small_trimmed"] is False, found


def test_a_worker_process_freezes_its_start_up_heap_and_still_collects_cycles() -> None:
    found = _child(
        """
        import gc, json
        from embedq.worker.heap import GC_YOUNG_THRESHOLD, settle_heap

        settle_heap()
        frozen, threshold = gc.get_freeze_count(), gc.get_threshold()

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle only the cyclic GC frees
        del a, b
        print(json.dumps({"frozen": frozen, "young": threshold[0],
                          "wanted": GC_YOUNG_THRESHOLD, "collected": gc.collect()}))
        """
    )
    assert found["frozen"] > 10_000  # the imports' objects, never walked again
    assert found["young"] == found["wanted"] > 700
    assert found["collected"] >= 2  # the two nodes of the cycle
