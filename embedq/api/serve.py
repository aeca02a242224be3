"""The gateway process: uvicorn serving ``embedq.api.app`` on ``--host``/``--port``.

One event loop per process (the gateway only waits on Redis: a loop holds thousands of
waiting requests); run more replicas, not more threads. SIGTERM stops accepting, lets the
requests in hand finish (at most ``--request-timeout``), then exits 0.
"""

from __future__ import annotations

import structlog

from embedq.api.app import create_app
from embedq.core.config import Settings
from embedq.core.errors import ConfigError, ExitCode

log = structlog.get_logger("embedq.api")


def serve(settings: Settings) -> int:
    import uvicorn

    config = uvicorn.Config(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # embedq's logging (structlog, secrets scrubbed) is already set up
        access_log=False,  # one line per refusal instead (embedq.api.app); counts in /metrics
        timeout_graceful_shutdown=int(settings.api_timeout_s) + 1,
        server_header=False,
    )
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        # uvicorn logged why (a port in use, Redis refusing the lane's group).
        raise ConfigError(
            f"the gateway could not start on {settings.api_host}:{settings.api_port} "
            "(see the log line above)"
        )
    log.info("api_stopped")
    return int(ExitCode.OK)
