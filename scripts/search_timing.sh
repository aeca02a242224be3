#!/usr/bin/env bash
# Wall time of `embedq search`, local (loads the model) against `--gateway` (a running
# `embedq serve` asks the workers), alternating, on the demo's data: docs/operations.md,
# "Searching". Needs Redis on 127.0.0.1:6379 and the dev venv; leaves nothing behind.
#   bash scripts/search_timing.sh [RUNS]
set -u
cd "$(dirname "$0")/.."
RUNS=${1:-3}
DIR=$(mktemp -d)
MILVUS_PORT=19577
GATEWAY_PORT=18577
export EMBEDQ_STREAM=embedq:search-timing EMBEDQ_COLLECTION=demo EMBEDQ_LOG_JSON=true
export EMBEDQ_MILVUS_URI=http://127.0.0.1:$MILVUS_PORT
BIN=.venv/bin
$BIN/milvus-lite server --data-dir "$DIR/milvus" --host 127.0.0.1 --port $MILVUS_PORT \
  >"$DIR/milvus.log" 2>&1 &
MILVUS=$!
cleanup() {
  kill "${GATEWAY:-}" "${WORKER:-}" 2>/dev/null
  wait "${GATEWAY:-}" "${WORKER:-}" 2>/dev/null
  kill "$MILVUS" 2>/dev/null
  wait "$MILVUS" 2>/dev/null
  $BIN/python -c 'import redis; r = redis.Redis(); [r.delete(k) for k in r.scan_iter("embedq:search-timing*")]'
  rm -rf "$DIR"
}
trap cleanup EXIT
sleep 5
$BIN/embedq enqueue examples/sample.jsonl >/dev/null 2>&1
$BIN/embedq worker >"$DIR/worker.log" 2>&1 &
WORKER=$!
# The backlog drained (the worker is then free for the gateway's requests).
until $BIN/embedq lag --json 2>/dev/null | $BIN/python -c \
  'import json, sys; d = json.load(sys.stdin); sys.exit(not (d["lag"] == 0 and d["pending"] == 0))'; do
  sleep 2
done
$BIN/embedq serve --port $GATEWAY_PORT >"$DIR/serve.log" 2>&1 &
GATEWAY=$!
sleep 5
QUERY="a tool for editing text files"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq 1 "$RUNS"); do
  /usr/bin/time -f "local   %e s" $BIN/embedq search "$QUERY" -k 3 >"$DIR/local" 2>"$DIR/err"
  tail -1 "$DIR/err"
  /usr/bin/time -f "gateway %e s" $BIN/embedq search "$QUERY" -k 3 \
    --gateway http://127.0.0.1:$GATEWAY_PORT >"$DIR/gateway" 2>"$DIR/err"
  tail -1 "$DIR/err"
  cmp -s "$DIR/local" "$DIR/gateway" && echo "same hits" || echo "hits differ"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
