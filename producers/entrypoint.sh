#!/usr/bin/env sh
# Container entrypoint for producers: any embedq command (enqueue, init, lag, top,
# exporter), configured by EMBEDQ_* variables. Runs `python producers/<job>.py` when the
# first argument names one of the example jobs.
set -eu
case "${1:-}" in
  *.py) job="$1"; shift; exec python "/opt/embedq/producers/$job" "$@" ;;
esac
exec embedq "$@"
