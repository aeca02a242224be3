"""Say what is happening while a command loads (issue 28).

A worker printed nothing for 15-45 s on a loaded machine: importing torch, reading the
model's weights, connecting. ``loading`` logs a first line at once, before anything heavy
is imported, and then a line every ``every_s`` seconds with the time so far, until the
caller says the model is loaded (``done``) or leaves the block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog

from embedq.core.config import Settings

log = structlog.get_logger("embedq.cli")

STILL_LOADING_EVERY_S = 10.0


def model_named(settings: Settings) -> str:
    return settings.model or "all-MiniLM-L6-v2 (packaged)"


@contextmanager
def loading(
    settings: Settings, *, every_s: float = STILL_LOADING_EVERY_S
) -> Iterator[Callable[[], None]]:
    """``with loading(settings) as done:`` ... ``done()`` once the model is in memory."""
    loaded = threading.Event()
    started = time.monotonic()
    log.info("loading_model", model=model_named(settings), device=settings.device)

    def tick() -> None:
        while not loaded.wait(every_s):
            log.info(
                "still_loading",
                model=model_named(settings),
                elapsed_s=round(time.monotonic() - started, 1),
            )

    def done() -> None:
        if not loaded.is_set():
            loaded.set()
            log.info("model_loaded", load_s=round(time.monotonic() - started, 1))

    ticker = threading.Thread(target=tick, name="still-loading", daemon=True)
    ticker.start()
    try:
        yield done
    finally:
        loaded.set()
