#!/usr/bin/env bash
# Run a command with a Redis >= 7 reachable at $EMBEDQ_TEST_REDIS_URL.
# Uses EMBEDQ_TEST_REDIS_URL (or EMBEDQ_REDIS_URL) when set, else 127.0.0.1:6379 when it
# answers, else starts a private redis-server on a free port for the command's lifetime.
set -euo pipefail
url="${EMBEDQ_TEST_REDIS_URL:-${EMBEDQ_REDIS_URL:-}}"
if [ -z "$url" ]; then
  if python3 - <<'PY' 2>/dev/null
import socket; socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
PY
  then
    url="redis://127.0.0.1:6379/0"
  elif command -v redis-server >/dev/null; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    dir=$(mktemp -d)
    redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" --daemonize yes \
      --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    trap 'kill "$(cat "$dir/redis.pid")" 2>/dev/null || true; rm -rf "$dir"' EXIT
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    url="redis://127.0.0.1:$port/0"
    echo "started a private redis-server at $url" >&2
  else
    echo "embedq needs Redis >= 7: set EMBEDQ_REDIS_URL, or install redis-server (apt-get install redis-server)" >&2
    exit 2
  fi
fi
export EMBEDQ_TEST_REDIS_URL="$url"
export EMBEDQ_REDIS_URL="$url"
"$@"
