#!/usr/bin/env bash
# Run a qk-jax tool on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE -- train --config configs/stage2.py:paper --workdir gs://BUCKET/run1
#
# Copies the repository to each worker (rsync over gcloud ssh), installs it with the
# `tpu` extra once, then starts the tool on all workers at the same time. JAX finds
# the other workers itself (QK_DISTRIBUTED=1 makes each tool call
# jax.distributed.initialize()). Workdirs should be on GCS so every worker sees them.
set -euo pipefail
if [[ $# -lt 4 || "$3" != "--" ]]; then
  echo "usage: $0 TPU_NAME ZONE -- <qk-jax tool> [flags]" >&2; exit 2
fi
TPU="$1"; ZONE="$2"; shift 3
REPO="$(cd "$(dirname "$0")/.." && pwd)"
REMOTE_DIR="${QK_REMOTE_DIR:-~/qk_jax}"
gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all "$REPO" "$TPU:$REMOTE_DIR" >/dev/null
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e; cd $REMOTE_DIR
  [ -d .venv ] || (python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]')
  QK_DISTRIBUTED=1 .venv/bin/qk-jax $*
"
