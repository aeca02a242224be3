"""``embedq serve``: the online gateway."""

from __future__ import annotations

from typing import Any

import click

from embedq.cli.options import build_settings, common, milvus_reading, run_guarded, setting


@click.command()
@common
@milvus_reading
@setting("model", help="The workers' model directory (names the model in answers).")
@setting(
    "backend",
    type=click.Choice(["torch", "onnx", "openvino"]),
    help="The workers' --backend: with --quantize, which collections this gateway searches "
    "(an int8 index is another model's).",
)
@setting(
    "quantize",
    type=click.Choice(["none", "int8"]),
    help="The workers' --quantize (needs --backend onnx or openvino).",
)
@setting(
    "dimensions",
    type=click.IntRange(min=0),
    help="The workers' --dimensions (0: all): part of the model's identity.",
)
@setting(
    "api_host",
    "--host",
    help="Address the gateway binds; another than loopback (0.0.0.0 in a container) needs API "
    "keys or --allow-anonymous.",
)
@setting(
    "api_allow_anonymous",
    "--allow-anonymous",
    is_flag=True,
    show_default=False,
    help="Serve a non-loopback --host without API keys: anyone who reaches the port may call it.",
)
@setting("api_port", "--port", help="Port the gateway listens on.")
@setting(
    "api_keys",
    show_default=False,
    help="Accepted API keys, comma-separated (Authorization: Bearer); empty: no auth.",
)
@setting(
    "api_keys_file",
    show_default=False,
    help="JSON list of keys with a name, own rate limit and a filter their searches are "
    "confined to (a Secret).",
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
@setting(
    "api_max_in_flight",
    "--max-in-flight",
    help="Requests held at once, body reads included (503 past it; also bounds connections).",
)
@setting(
    "api_header_timeout_s",
    "--header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds a client has to send a request's head (line and headers); then the "
    "connection is closed.",
)
@setting(
    "api_served_model_name",
    "--served-model-name",
    show_default=False,
    help="Names the gateway answers as, comma-separated (the first labels answers); "
    "empty: the model's name.",
)
@setting(
    "api_forwarded_allow_ips",
    "--forwarded-allow-ips",
    show_default=False,
    help="Proxy addresses trusted for X-Forwarded-For (comma-separated, '*': any); empty: none.",
)
def serve(**options: Any) -> None:
    """Serve OpenAI-compatible embeddings (POST /v1/embeddings), GET /v1/models and search
    (POST /v1/search) through the fleet, ahead of the bulk backlog; /healthz, /readyz,
    /metrics.

    Needs workers (any number) on the same stream and group; it loads no model.
    """
    settings = build_settings(options)

    def body() -> int:
        from embedq.api.serve import serve as run

        return run(settings)

    run_guarded(body)


@click.command()
@common
@click.option("--json", "as_json", is_flag=True, help="One JSON object: {key name: totals}.")
def usage(as_json: bool, **options: Any) -> None:
    """What each API key embedded through the gateways of this stream: requests, inputs and
    tokens by key name (EMBEDQ_API_KEYS_FILE's names; never the key)."""
    settings = build_settings(options)

    def body() -> int:
        import json

        from embedq.api.telemetry import USAGE_FIELDS, usage_key, usage_table
        from embedq.core.keys import Keys
        from embedq.queue.connection import connect, translated

        client = connect(settings.redis_url, cluster=settings.redis_cluster)
        with translated("HGETALL usage"):
            raw: Any = client.hgetall(usage_key(Keys(settings.stream).base))
        table = usage_table(raw)
        if as_json:
            click.echo(json.dumps(table, sort_keys=True))
            return 0
        click.echo(f"{'KEY':<24} " + " ".join(f"{f.upper():>12}" for f in USAGE_FIELDS))
        for name in sorted(table):
            click.echo(f"{name:<24} " + " ".join(f"{table[name][f]:>12}" for f in USAGE_FIELDS))
        if not table:
            click.echo("(nothing metered yet: no request reached a worker through a gateway)")
        return 0

    run_guarded(body)
