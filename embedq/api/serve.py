"""The gateway process: uvicorn serving ``embedq.api.app`` on ``--host``/``--port``.

One event loop per process (the gateway only waits on Redis: a loop holds thousands of
waiting requests); run more replicas, not more threads. SIGTERM stops accepting, lets the
requests in hand finish (at most ``--request-timeout``), then exits 0.
"""

from __future__ import annotations

import ipaddress
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


def check_exposure(settings: Settings) -> None:
    """Refuse (``ConfigError``, one line) to serve an address other machines reach without
    API keys, unless ``--allow-anonymous``: the gateway spends the fleet's GPUs and reads the
    collection for whoever calls it (issue 28: it bound 0.0.0.0 and only warned)."""
    keyed = bool(settings.api_key_list or settings.api_keys_file)
    if keyed or settings.api_allow_anonymous or is_loopback(settings.api_host):
        return
    raise ConfigError(
        f"--host {settings.api_host} serves other machines, and no API key is set: set "
        "EMBEDQ_API_KEYS (or --api-keys-file), or pass --allow-anonymous "
        "(EMBEDQ_API_ALLOW_ANONYMOUS=true) to serve anyone who reaches the port"
    )


def is_loopback(host: str) -> bool:
    """``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[] ")).is_loopback
    except ValueError:
        return False  # "", a name, "0.0.0.0"'s spellings: other machines may reach it


def serve(settings: Settings) -> int:
    import uvicorn

    check_exposure(settings)
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
