"""``embedq serve``: the online gateway."""

from __future__ import annotations

from typing import Any

import click

from embedq.cli.options import build_settings, common, milvus_reading, run_guarded, setting


@click.command()
@common
@milvus_reading
@setting("model", help="The workers' model directory (names the model in answers).")
@setting("api_host", "--host", help="Address the gateway binds.")
@setting("api_port", "--port", help="Port the gateway listens on.")
@setting(
    "api_keys",
    show_default=False,
    help="Accepted API keys, comma-separated (Authorization: Bearer); empty: no auth.",
)
@setting(
    "api_rate_limit",
    "--rate-limit",
    type=click.FloatRange(min=0),
    help="Requests per second per API key, shared by all gateways (0: no limit).",
)
@setting("api_rate_burst", "--rate-burst", help="Requests a key may send at once (0: rate).")
@setting(
    "api_timeout_s",
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request waits for the fleet before 503 + Retry-After.",
)
@setting("api_max_inputs", "--max-inputs", help="Inputs per request (413 past it).")
@setting("api_max_input_bytes", "--max-input-bytes", help="UTF-8 bytes per input (413).")
@setting("api_max_body_bytes", "--max-body-bytes", help="Bytes per request body (413).")
@setting("api_max_in_flight", "--max-in-flight", help="Requests held at once (503 past it).")
def serve(**options: Any) -> None:
    """Serve OpenAI-compatible embeddings (POST /v1/embeddings) and search (POST /v1/search)
    through the fleet, ahead of the bulk backlog; /healthz, /readyz, /metrics.

    Needs workers (any number) on the same stream and group; it loads no model.
    """
    settings = build_settings(options)

    def body() -> int:
        from embedq.api.serve import serve as run

        return run(settings)

    run_guarded(body)
