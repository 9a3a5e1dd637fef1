#!/usr/bin/env bash
# Run a qk-jax tool on this machine, on all its local devices (CPU, one or more GPUs, or a
# single TPU VM host).
#
#   launch/single_host.sh train --config configs/stage1.py:tiny --workdir runs/stage1
#
# On a CPU, set QK_CPU_DEVICES=8 to simulate 8 devices (sharding experiments).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${QK_CPU_DEVICES:-}" ]]; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=${QK_CPU_DEVICES}"
fi
exec "${QK_PYTHON:-.venv/bin/python}" -m qk_jax.cli "$@"
