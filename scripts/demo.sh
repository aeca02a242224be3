#!/usr/bin/env bash
# The demo on embedded defaults: enqueue the shipped sample, drain it with one worker into a
# Milvus Lite file, print the throughput and a search result.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .demo
export EMBEDQ_STREAM="embedq:demo:$(date +%s)"
export EMBEDQ_MILVUS_URI="$PWD/.demo/embedq.db"
export EMBEDQ_COLLECTION="demo"
exec bash scripts/with-redis.sh bash -c '
  set -euo pipefail
  echo "== enqueue examples/sample.jsonl to $EMBEDQ_STREAM"
  embedq enqueue examples/sample.jsonl
  echo "== embed with one worker (--drain exits when the stream is done)"
  embedq worker --drain --block-ms 200 --log-level warning
  echo "== lag"
  embedq lag
  echo "== search: how do I read a file line by line"
  embedq search "how do I read a file line by line" -k 3
  redis-cli -u "$EMBEDQ_REDIS_URL" del "$EMBEDQ_STREAM" "$EMBEDQ_STREAM:dlq" >/dev/null || true
'
