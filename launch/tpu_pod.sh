#!/usr/bin/env bash
# Run a qk-jax tool on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE -- train --config configs/stage2.py:paper --workdir gs://BUCKET/run1
#
# Packs the repository's source (the files git tracks or would track: not .git, .venv, runs/
# or caches, since a local virtual environment would not run on the workers), copies it to
# each worker and unpacks it into QK_REMOTE_DIR (default qk_jax; a relative path is under the
# worker's home), replacing the source an earlier launch left there, so every launch runs the
# code as it is here; the workers' own .venv is kept. It installs the package with the `tpu`
# extra once (QK_REINSTALL=1 installs again, after a dependency changed), then starts the tool
# on all workers at the same time, its flags passed through word for word. JAX finds the other
# workers itself (QK_DISTRIBUTED=1 makes each tool call jax.distributed.initialize()).
# Workdirs should be on GCS so every worker sees them.
set -euo pipefail
if [[ $# -lt 4 || "$3" != "--" ]]; then
  echo "usage: $0 TPU_NAME ZONE -- <qk-jax tool> [flags]" >&2; exit 2
fi
TPU="$1"; ZONE="$2"; shift 3
REPO="$(cd "$(dirname "$0")/.." && pwd)"
REMOTE_DIR="${QK_REMOTE_DIR:-qk_jax}"  # relative: under the worker's home
printf -v TOOL_ARGS '%q ' "$@"         # each flag one word on the worker, quotes and spaces kept
printf -v REMOTE_DIR_Q '%q' "$REMOTE_DIR"

ARCHIVE="$(mktemp -d)/qk_jax_src.tar.gz"
trap 'rm -rf "$(dirname "$ARCHIVE")"' EXIT
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # the files git tracks and the new ones it does not ignore: the source as it is here
  git -C "$REPO" ls-files -z --cached --others --exclude-standard |
    (cd "$REPO" && xargs -0 sh -c 'for f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done' sh) |
    tar -C "$REPO" -czf "$ARCHIVE" --null -T -
else
  tar -C "$REPO" -czf "$ARCHIVE" \
    --exclude=./.git --exclude=./.venv --exclude=./runs --exclude='__pycache__' --exclude='*.egg-info' .
fi
gcloud compute tpus tpu-vm scp --zone "$ZONE" --worker=all "$ARCHIVE" "$TPU:qk_jax_src.tar.gz" >/dev/null
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  mkdir -p $REMOTE_DIR_Q && cd $REMOTE_DIR_Q
  find . -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
  tar -xzf ~/qk_jax_src.tar.gz && rm ~/qk_jax_src.tar.gz
  if [ ! -x .venv/bin/qk-jax ] || [ '${QK_REINSTALL:-0}' = 1 ]; then
    python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]'
  fi
  QK_DISTRIBUTED=1 .venv/bin/qk-jax $TOOL_ARGS
"
