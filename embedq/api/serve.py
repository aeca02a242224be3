"""The gateway process: uvicorn serving ``embedq.api.app`` on ``--host``/``--port``.

One event loop per process (the gateway only waits on Redis: a loop holds thousands of
waiting requests); run more replicas, not more threads. SIGTERM stops accepting, lets the
requests in hand finish (at most ``--request-timeout``), then exits 0.
"""

from __future__ import annotations

from typing import Any

import structlog

from embedq.api.app import create_app
from embedq.core.config import Settings
from embedq.core.errors import ConfigError, ExitCode

log = structlog.get_logger("embedq.api")


PROBE_HEADROOM = 32  # connections past --max-in-flight kept for probes and /metrics
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this
MAX_HEADER_BYTES = 16 * 1024  # h11's bound on an incomplete request head


def server_config(settings: Settings, app: Any) -> Any:
    """uvicorn's settings for the gateway: connections bounded (``--max-in-flight`` plus
    room for probes; past it uvicorn answers 503 at once), idle keep-alive closed, request
    heads bounded, and forwarded headers trusted only from ``--forwarded-allow-ips``
    (none by default: uvicorn's own default trusts 127.0.0.1)."""
    import uvicorn

    trusted = settings.api_forwarded_allow_ips.strip()
    return uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # embedq's logging (structlog, secrets scrubbed) is already set up
        access_log=False,  # one line per refusal instead (embedq.api.app); counts in /metrics
        timeout_graceful_shutdown=int(settings.api_timeout_s) + 1,
        server_header=False,
        limit_concurrency=settings.api_max_in_flight + PROBE_HEADROOM,
        timeout_keep_alive=KEEP_ALIVE_S,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or None,
    )


def serve(settings: Settings) -> int:
    import uvicorn

    server = uvicorn.Server(server_config(settings, create_app(settings)))
    server.run()
    if not server.started:
        # uvicorn logged why (a port in use, Redis refusing the lane's group).
        raise ConfigError(
            f"the gateway could not start on {settings.api_host}:{settings.api_port} "
            "(see the log line above)"
        )
    log.info("api_stopped")
    return int(ExitCode.OK)
