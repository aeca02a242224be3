#!/usr/bin/env bash
# The demo on embedded defaults: enqueue the shipped sample, drain it with one worker into a
# Milvus Lite file, print the throughput and a search result.
# README's "Using it" (and docs/getting-started.md) goes on from here with the same settings (.demo/embedq.db, collection
# demo, stream embedq:demo): keep the three in step with it (tests/test_readme.py runs both).
#
# It ends consistent (issue 25): the rows stay in .demo/embedq.db and their record stays in
# Redis (the index, the collection's epoch, the document ledger), so `embedq verify` is
# clean and `embedq enqueue examples/sample.jsonl --dedup` sends nothing; only the work
# keys go (the stream and its group, dead letters, jobs). It starts from nothing: both
# sides of what any earlier run left (Redis keys and the Milvus Lite file) are dropped.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .demo
export EMBEDQ_STREAM="${EMBEDQ_STREAM:-embedq:demo}"
export EMBEDQ_MILVUS_URI="$PWD/.demo/embedq.db"
export EMBEDQ_COLLECTION="demo"
exec bash scripts/with-redis.sh bash -c '
  set -euo pipefail
  forget() {  # $1: all, or work (keep the index, the epoch and the document ledger)
    redis-cli -u "$EMBEDQ_REDIS_URL" --scan --pattern "$EMBEDQ_STREAM:*" | while read -r key; do
      case "$1:$key" in
        work:*:index:* | work:*:epoch | work:*:docs:*) continue ;;
      esac
      redis-cli -u "$EMBEDQ_REDIS_URL" del "$key" >/dev/null
    done
    redis-cli -u "$EMBEDQ_REDIS_URL" del "$EMBEDQ_STREAM" >/dev/null
  }
  forget all  # what an earlier or interrupted run left, on both sides
  rm -rf "$EMBEDQ_MILVUS_URI"
  echo "== enqueue examples/sample.jsonl to $EMBEDQ_STREAM"
  embedq enqueue examples/sample.jsonl
  echo "== embed with one worker (--drain exits when the stream is done)"
  embedq worker --drain --block-ms 200 --log-level warning
  echo "== lag"
  embedq lag
  echo "== search: how do I read a file line by line"
  embedq search "how do I read a file line by line" -k 3
  forget work
  echo "== done: the vectors are in .demo/embedq.db, collection demo, and Redis keeps their"
  echo "   index ($EMBEDQ_STREAM:index:demo): embedq verify is clean (README.md: Using it)"
'
