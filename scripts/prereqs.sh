#!/usr/bin/env bash
# What `make demo` and `make venv` need before they install anything (issue 28): one line
# per missing prerequisite on stderr, exit 2, instead of failing minutes into the install.
#   $PYTHON (default python3): Python >= 3.11
#   with the argument `redis`: a Redis answering at $EMBEDQ_REDIS_URL or 127.0.0.1:6379
#   ($EMBEDQ_PREREQ_REDIS_PORT), or redis-server on PATH (scripts/with-redis.sh starts one)
set -uo pipefail
python="${PYTHON:-python3}"
missing=0
if ! command -v "$python" >/dev/null 2>&1; then
  echo "embedq needs Python >= 3.11: $python is not on PATH (make demo PYTHON=/path/to/python3.11)" >&2
  missing=1
elif ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  found=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "?")
  echo "embedq needs Python >= 3.11: $python is $found (make demo PYTHON=/path/to/python3.11)" >&2
  missing=1
elif ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "embedq needs Python's venv module: $python has none (apt-get install python3-venv)" >&2
  missing=1
fi
if [ "${1:-}" = redis ] && [ -z "${EMBEDQ_REDIS_URL:-}" ] && [ -z "${EMBEDQ_TEST_REDIS_URL:-}" ]; then
  port="${EMBEDQ_PREREQ_REDIS_PORT:-6379}"
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && ! command -v redis-server >/dev/null; then
    echo "embedq needs Redis >= 7: nothing answers at 127.0.0.1:$port and redis-server is not on PATH (apt-get install redis-server, brew install redis, or set EMBEDQ_REDIS_URL)" >&2
    missing=1
  fi
fi
exit $((missing * 2))
