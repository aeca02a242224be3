"""Settings: one frozen, typed object built once at the entry point.

The CLI fills it from flags, each of which also reads an ``EMBEDQ_<FIELD>`` environment
variable (click does the reading); no other module looks at the environment.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from embedq.core.errors import SettingsError
from embedq.core.keys import hash_tag

ENV_PREFIX = "EMBEDQ_"

Overlong = Literal["truncate", "reject"]

# SettingsError lives with the other errors (embedq.core.errors); it is imported from here too.
__all__ = [
    "ENV_PREFIX",
    "InvalidSetting",
    "Overlong",
    "Settings",
    "SettingsError",
    "default_consumer_name",
    "dsn_secrets",
    "redact_url",
]


class InvalidSetting(SettingsError):
    """A ``SettingsError`` about named settings (``Settings`` field names), so that the CLI
    can name each one as the user gave it: ``--chunk`` or ``EMBEDQ_ENQUEUE_CHUNK``, not
    ``enqueue_chunk`` (issue 18)."""

    def __init__(self, message: str, *settings: str) -> None:
        super().__init__(message)
        self.settings = settings


def default_consumer_name() -> str:
    # hostname-pid is unique per process on a node and readable in `embedq lag`.
    return f"{socket.gethostname()}-{os.getpid()}"


# Tests only (--fault-point): where a worker SIGKILLs itself, to prove a crash there loses
# and duplicates nothing.
FAULT_POINTS = ("", "after_read", "after_inference", "after_fence", "after_write")


@dataclass(frozen=True)
class Settings:
    """Every knob of embedq. Units are in the names."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False  # the URL names one node of a Redis Cluster
    stream: str = "embedq:tasks"
    group: str = "embedq"
    consumer: str = field(default_factory=default_consumer_name)
    milvus_uri: str = "./embedq.db"
    milvus_token: str = field(default="", repr=False)
    collection: str = "embedq"
    model: str = ""  # a local directory; empty means the packaged all-MiniLM-L6-v2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    # The forward pass: torch, or ONNX Runtime / OpenVINO on the CPU
    # (embedq.model.onnx_backend, openvino_backend), fp32 or int8; an accuracy gate checks
    # it against fp32 torch at load.
    backend: str = "torch"  # torch | onnx | openvino
    quantize: str = "none"  # none | int8 (needs backend onnx or openvino)
    model_cache: str = ""  # where exported models are kept; "": ~/.cache/embedq
    dimensions: int = 0  # Matryoshka: keep the first N dimensions, renormalised; 0 keeps all
    force_dimensions: bool = False  # truncate a model that does not declare Matryoshka training
    read_count: int = 512
    # A read takes at most this many seconds of work at the worker's measured rate, so a worker
    # that joins shares the backlog (embedq.worker.reader); 0: always read_count.
    read_hold_s: float = 5.0
    max_batch_tokens: int = 0  # 0: auto, per device (embedq.worker.packing.batch_limits)
    max_batch_rows: int = 0  # 0: auto, per device
    block_ms: int = 2000
    min_idle_s: float = 60.0
    reclaim_interval_s: float = 5.0
    max_deliveries: int = 5
    milvus_timeout_s: float = 10.0
    on_overlong: Overlong = "truncate"
    max_text_bytes: int = 1_000_000
    max_meta_bytes: int = 65_536
    store_text: bool = True
    grace_s: float = 30.0
    drain: bool = False
    log_level: str = "info"
    log_json: bool | None = None  # None: JSON when stderr is not a terminal
    # Tests only: SIGKILL the worker at this stage (after_read, after_inference, after_write).
    fault_point: str = ""
    # Producers and jobs: partitions, backpressure, trimming, SQL sources.
    partitions: int = 1  # tasks streams S:{p0}..S:{pN-1} (embedq.core.keys); 1 keeps S itself
    max_lag: int = 0  # enqueue pauses while the group's backlog exceeds this; 0: never
    enqueue_chunk: int = 1000  # entries per XADD script call
    trim_interval_s: float = 0.0  # a worker trims fully acknowledged entries this often; 0: off
    dsn: str = field(default="", repr=False)  # PostgreSQL DSN for `enqueue --sql`
    # -- fault handling (reclaim, dead letters) --
    # Consumers idle this long with nothing pending are removed from the group.
    consumer_idle_delete_s: float = 600.0
    # Fleet operations: /metrics, /healthz and /readyz on this port (0: no server).
    metrics_port: int = 0
    # The address it binds: all of them, since the kubelet and Prometheus connect from
    # outside the pod; 127.0.0.1 keeps the port on the machine.
    metrics_host: str = "0.0.0.0"  # noqa: S104 -- see above
    metrics_backlog: int = 64  # the listen backlog: scrapes and probes queued at once
    # Throughput work: model replicas per device, and one worker process per listed device.
    # 0: auto (embedq.worker.replicas.replicas_for: 2 on a multi-core CPU, else 1)
    replicas: int = 0
    devices: str = ""  # "" (use --device), "all", or a list such as "0,1" / "cuda:0,cuda:1"
    # Worker processes per device (each its own consumer, sharing the device): one Python
    # process cannot feed a fast GPU alone (docs/benchmarks.md, "Feeding a GPU").
    procs_per_device: int = 1
    # Start-up: how long a worker keeps trying its first connection to Redis and Milvus
    # before it exits with ExitCode.CONNECT; 0 waits forever.
    connect_timeout_s: float = 60.0
    # The index guarantee (embedq.queue.versions): fenced, ordered per-id writes. Off only to
    # measure what it costs (`embedq bench`); never in production.
    ordered_writes: bool = True
    # A stage busy on one batch this long is stuck: its entries are let go and liveness
    # fails (embedq.worker.watchdog). Above the longest forward pass and Milvus call you expect.
    stage_timeout_s: float = 300.0
    # Enqueue waits until this many replicas have each batch (WAIT), so a failover to one
    # of them loses nothing the producer saw succeed. 0: async replication, no wait.
    wait_replicas: int = 0
    # Vectors kept per worker process by text hash, so a repeated text skips the model.
    vector_cache_size: int = 10_000
    # Online requests (embedq serve, embedq.api): workers read the interactive lane before
    # the bulk stream; off leaves online requests to other workers.
    online: bool = True
    # The gateway's address: this machine only, by default. Another address (0.0.0.0 in a
    # container) needs API keys, or api_allow_anonymous said out loud (issue 28: it bound
    # every interface and, without keys, only warned).
    api_host: str = "127.0.0.1"
    api_allow_anonymous: bool = False
    api_port: int = 8000
    api_keys: str = field(default="", repr=False)  # comma-separated; empty: no auth
    # A JSON list of {key, name, rate_limit, rate_burst, filter} (a Secret): named, scoped keys
    api_keys_file: str = ""
    api_rate_limit: float = 0.0  # requests per second per key, shared by all gateways; 0: off
    api_rate_burst: int = 0  # requests a key may send at once; 0: one second's worth
    api_timeout_s: float = 10.0  # a request no worker answered by then gets 503
    api_max_inputs: int = 256  # inputs per request
    api_max_input_bytes: int = 65_536  # UTF-8 bytes per input
    api_max_body_bytes: int = 4 * 1024 * 1024  # bytes per request body
    api_max_in_flight: int = 256  # requests one gateway process holds at once; then 503
    # A request head (request line and headers) not complete this long after the connection
    # opened, or after its first byte on a kept-alive connection, is cut off (issue 27).
    api_header_timeout_s: float = 10.0
    # Proxies whose X-Forwarded-For/-Proto are trusted (comma-separated IPs/CIDRs, "*": any);
    # empty: none, the peer's address is the caller's (rate limits without keys use it).
    api_forwarded_allow_ips: str = ""
    # The names the gateway answers as (comma-separated; the first labels answers and
    # /v1/models; vLLM's --served-model-name); empty: the model's own name.
    api_served_model_name: str = ""
    # `embedq search` asks this running gateway (POST /v1/search) instead of loading the
    # model itself, with this API key; empty: search locally.
    gateway_url: str = ""
    gateway_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        check_redis_url(self.redis_url, cluster=self.redis_cluster)
        self._check_numbers()
        self._check_choices()

    def _check_numbers(self) -> None:
        positive = (
            "read_count",
            "max_deliveries",
            "max_text_bytes",
            "max_meta_bytes",
            "partitions",
            "enqueue_chunk",
            "stage_timeout_s",
            "procs_per_device",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise InvalidSetting(f"{name} must be > 0, got {getattr(self, name)}", name)
        for name in ("vector_cache_size", "wait_replicas", "dimensions", "read_hold_s"):
            if getattr(self, name) < 0:
                raise InvalidSetting(f"{name} must be >= 0, got {getattr(self, name)}", name)
        for name in ("max_batch_tokens", "max_batch_rows", "replicas"):
            if getattr(self, name) < 0:
                raise InvalidSetting(
                    f"{name} must be > 0 (or 0 for auto), got {getattr(self, name)}", name
                )
        if self.block_ms < 0:
            raise SettingsError(f"block_ms must be >= 0, got {self.block_ms}")
        if self.milvus_timeout_s <= 0 or self.milvus_timeout_s >= self.min_idle_s:
            # A write that can outlive the reclaim threshold lets another worker take the
            # entries while this one may still succeed: the timeout must stay below it.
            raise SettingsError(
                f"milvus_timeout_s ({self.milvus_timeout_s}) must be > 0 and shorter than "
                f"min_idle_s ({self.min_idle_s})"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"metrics_port must be 0 (off) to 65535, got {self.metrics_port}")
        self._check_api()
        if self.metrics_backlog <= 0:
            raise SettingsError(f"metrics_backlog must be > 0, got {self.metrics_backlog}")
        for name in ("max_lag", "trim_interval_s", "connect_timeout_s"):
            if getattr(self, name) < 0:
                raise InvalidSetting(f"{name} must be >= 0, got {getattr(self, name)}", name)

    def _check_api(self) -> None:
        api = ("api_timeout_s", "api_max_inputs", "api_max_input_bytes", "api_max_body_bytes")
        for name in (*api, "api_max_in_flight", "api_header_timeout_s"):
            if getattr(self, name) <= 0:
                raise InvalidSetting(f"{name} must be > 0, got {getattr(self, name)}", name)
        for name in ("api_rate_limit", "api_rate_burst"):
            if getattr(self, name) < 0:
                raise InvalidSetting(f"{name} must be >= 0, got {getattr(self, name)}", name)
        if not 0 < self.api_port <= 65535:
            raise InvalidSetting(f"api_port must be 1 to 65535, got {self.api_port}", "api_port")

    @property
    def api_key_list(self) -> tuple[str, ...]:
        """The accepted API keys (``api_keys`` split at commas, blanks dropped)."""
        return tuple(k.strip() for k in self.api_keys.split(",") if k.strip())

    def _check_choices(self) -> None:
        if self.on_overlong not in ("truncate", "reject"):
            raise SettingsError(f"on_overlong must be truncate or reject, got {self.on_overlong!r}")
        if self.dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise InvalidSetting(
                f"dtype must be auto, fp32, fp16 or bf16, got {self.dtype!r}", "dtype"
            )
        if self.backend not in ("torch", "onnx", "openvino"):
            raise InvalidSetting(
                f"backend must be torch, onnx or openvino, got {self.backend!r}", "backend"
            )
        if self.quantize not in ("none", "int8"):
            raise InvalidSetting(
                f"quantize must be none or int8, got {self.quantize!r}", "quantize"
            )
        if self.quantize != "none" and self.backend == "torch":
            raise InvalidSetting(
                f"quantize {self.quantize} needs backend onnx or openvino (got {self.backend})",
                "quantize",
            )
        if self.fault_point not in FAULT_POINTS:
            raise SettingsError(f"unknown fault_point {self.fault_point!r}")
        if self.consumer_idle_delete_s <= self.min_idle_s:
            # A consumer idle for less than the reclaim threshold may be a live worker in a
            # long batch; only one that nothing could still be waiting on is removed.
            raise SettingsError(
                f"consumer_idle_delete_s ({self.consumer_idle_delete_s}) must be longer than "
                f"min_idle_s ({self.min_idle_s})"
            )
        if not self.stream or not self.group or not self.consumer:
            empty = [n for n in ("stream", "group", "consumer") if not getattr(self, n)]
            raise InvalidSetting(f"{' and '.join(empty)} must not be empty", *empty)
        if self.redis_cluster and self.partitions == 1 and hash_tag(self.stream) == self.stream:
            # The stream, its dead-letter stream and its error hash are touched by one
            # script or MULTI; on a cluster they must share a slot, which only a tag gives.
            raise SettingsError(
                f"on a Redis Cluster, stream {self.stream!r} needs a hash tag (such as "
                "'embedq:{tasks}') or --partitions N, so that its dead-letter stream "
                "shares its slot"
            )
        if self.partitions > 1 and "{" in self.stream:
            # The stream's own hash tag would win over the partition tags and put every
            # partition on one Redis Cluster slot, which is what partitions are meant to avoid.
            raise SettingsError(
                f"stream {self.stream!r} has a hash tag; with --partitions the partition "
                "streams get their own tags, so give a stream name without braces"
            )

    @classmethod
    def from_options(cls, **options: Any) -> Settings:
        """Build from CLI options; ``None`` means "not given", anything unknown is an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SettingsError(f"unknown settings: {', '.join(unknown)}")
        return cls(**{k: v for k, v in options.items() if v is not None})

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never reach a log line or an error message."""
        found = [self.milvus_token] if self.milvus_token else []
        password = urlsplit(self.redis_url).password
        if password:
            found.append(password)
        if ":" in self.milvus_token:  # user:password tokens: the password alone too
            found.append(self.milvus_token.split(":", 1)[1])
        found += dsn_secrets(self.dsn)
        found += self.api_key_list
        found.append(self.gateway_key)
        return tuple(s for s in found if s)

    @property
    def redis_url_redacted(self) -> str:
        return redact_url(self.redis_url)

    @property
    def redis_address(self) -> str:
        """Where Redis is, for messages: ``host:port`` (or the socket path), no password."""
        parts = urlsplit(self.redis_url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"

    @property
    def milvus_address(self) -> str:
        """Where Milvus is, for messages: ``host:port``, or the Milvus Lite file."""
        if "://" not in self.milvus_uri:
            return self.milvus_uri
        parts = urlsplit(self.milvus_uri)
        return f"{parts.hostname or 'localhost'}:{parts.port or 19530}"


REDIS_SCHEMES = ("redis", "rediss", "unix")


def _shown_url(url: str) -> str:
    """``url`` for a message: any password replaced, even where ``urlsplit`` finds none."""
    if "://" in url:
        return redact_url(url)
    return "***@" + url.rsplit("@", 1)[1] if "@" in url else url


def check_redis_url(url: str, *, cluster: bool = False) -> None:
    """Raise ``InvalidSetting`` (naming ``redis_url``) unless redis-py can use ``url``.

    redis-py's own errors for these are a ValueError deep in a traceback (no scheme,
    ``http://``) or a reply at the first command (``/99``: DB index is out of range).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower() if "://" in url else ""
    if scheme not in REDIS_SCHEMES:
        rest = url.split("://", 1)[1] if "://" in url else url
        fixed = _shown_url("redis://" + rest + ("" if "/" in rest else "/0"))
        raise InvalidSetting(
            f"redis_url {_shown_url(url)!r} is not a Redis URL: write {fixed} (rediss:// for TLS)",
            "redis_url",
        )
    if scheme == "unix":
        return
    try:
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError:
        raise InvalidSetting(
            f"redis_url {_shown_url(url)!r} has a port that is not a number 0-65535",
            "redis_url",
        ) from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise InvalidSetting(
            f"redis_url {_shown_url(url)!r} ends with {parts.path!r}: the part after the "
            "port is a database number, as in redis://host:6379/0",
            "redis_url",
        )
    if cluster and db not in ("", "0"):
        raise InvalidSetting(
            f"redis_url {_shown_url(url)!r} names database {db}; a Redis Cluster has only "
            "database 0",
            "redis_url",
        )


def dsn_secrets(dsn: str) -> list[str]:
    """Passwords in a PostgreSQL DSN, URL form (``postgresql://u:pw@h/db``) or key=value."""
    if not dsn:
        return []
    if "://" in dsn:
        password = urlsplit(dsn).password
        return [password] if password else []
    return [m.group(1) for m in re.finditer(r"password\s*=\s*'?([^'\s]+)'?", dsn)]


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
