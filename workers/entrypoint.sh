#!/usr/bin/env sh
# Container entrypoint for a worker: all configuration comes from EMBEDQ_* variables
# (the image sets EMBEDQ_METRICS_PORT=9400 for the probes). exec, so SIGTERM reaches the
# worker, which finishes the batch in hand and exits 0.
set -eu
exec embedq worker "$@"
