#!/usr/bin/env bash
# The demo on embedded defaults: enqueue the shipped sample, drain it with one worker into a
# Milvus Lite file, print the throughput and a search result, and remove its Redis keys.
# README's "Using it" goes on from here with the same settings (.demo/embedq.db, collection
# demo, stream embedq:demo): keep the three in step with it (tests/test_readme.py runs both).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .demo
export EMBEDQ_STREAM="${EMBEDQ_STREAM:-embedq:demo}"
export EMBEDQ_MILVUS_URI="$PWD/.demo/embedq.db"
export EMBEDQ_COLLECTION="demo"
exec bash scripts/with-redis.sh bash -c '
  set -euo pipefail
  forget() {  # every key of the demo stream: the stream, its dead letters, jobs, ...
    redis-cli -u "$EMBEDQ_REDIS_URL" --scan --pattern "$EMBEDQ_STREAM:*" | while read -r key; do
      redis-cli -u "$EMBEDQ_REDIS_URL" del "$key" >/dev/null
    done
    redis-cli -u "$EMBEDQ_REDIS_URL" del "$EMBEDQ_STREAM" >/dev/null
  }
  forget  # what an interrupted run left
  echo "== enqueue examples/sample.jsonl to $EMBEDQ_STREAM"
  embedq enqueue examples/sample.jsonl
  echo "== embed with one worker (--drain exits when the stream is done)"
  embedq worker --drain --block-ms 200 --log-level warning
  echo "== lag"
  embedq lag
  echo "== search: how do I read a file line by line"
  embedq search "how do I read a file line by line" -k 3
  forget
  echo "== done: the vectors are in .demo/embedq.db, collection demo (README: Using it)"
'
