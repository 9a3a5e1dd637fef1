"""Which JAX platform a `qk-jax` tool starts on, decided before jax is imported.

With libtpu installed (the `tpu` / `test` extras, needed for `qk-jax aot`), every JAX
program on a machine without TPU chips lets libtpu probe for a TPU at its first device
query, and libtpu prints its failures to stderr ("Failed to find host bounds for
accelerator type", "INVALID_ARGUMENT: unexpected worker hostname ..."). The entry points
(`qk_jax.cli`, `python -m qk_jax.aot`) call `configure` first; library modules never touch
the environment.

`configure(environ, tool)` never overrides a variable that is already set. For `aot`, which
compiles for a named topology and never runs on the TPU of its machine, it sets
`JAX_PLATFORMS=cpu` and the placeholders below on any machine. For every other tool it
changes nothing when the user set `JAX_PLATFORMS` (even empty) or the machine has TPU
chips (on the PCI bus, as TPU device files, or TPU_* variables of a TPU VM / GKE pod);
otherwise it sets:

- `JAX_PLATFORMS=cpu` when no NVIDIA / AMD GPU is visible (a GPU machine keeps jax's
  own choice: its GPU);
- libtpu's placeholders `TPU_ACCELERATOR_TYPE` / `TPU_WORKER_HOSTNAMES`, so that its probe
  (and the compile-only topologies of `qk-jax aot`) run without an error, and
  `ALLOW_MULTIPLE_LIBTPU_LOAD=1`: without a TPU libtpu is a compiler only, and several
  compiling processes may load it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import MutableMapping

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, 7x and one without a public name)
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}
# set on TPU VMs and in GKE TPU pods
_TPU_HOST_VARIABLES = ("TPU_NAME", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID", "TPU_PROCESS_BOUNDS")
_PLACEHOLDERS = {
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def has_tpu(environ: MutableMapping[str, str] = os.environ) -> bool:
    """True on a machine that has (or is set up as a host of) TPU chips.

    Errs towards True: wrongly assuming a TPU only leaves libtpu's messages in the output,
    wrongly assuming none would hide the TPU.
    """
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        if _read(vendor) == _GOOGLE_PCI_VENDOR:
            device = _read(os.path.join(os.path.dirname(vendor), "device"))
            if device in _TPU_PCI_DEVICES:
                return True
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    return any(environ.get(k) for k in _TPU_HOST_VARIABLES)


def has_gpu() -> bool:
    """True when an NVIDIA (or WSL) or AMD GPU device is visible, the files jax itself checks."""
    nvidia = any(os.path.exists(p) for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"))
    return nvidia or os.path.exists("/dev/kfd")


def configure(environ: MutableMapping[str, str] = os.environ, tool: str = "") -> dict[str, str]:
    """Sets the platform variables for the `qk-jax` tool `tool` (see the module docstring);
    call it before jax is imported. Variables already set are kept. Returns those it set."""
    if tool == "aot":  # compiles for the topology named on its command line, on any machine
        wanted = {"JAX_PLATFORMS": "cpu", **_PLACEHOLDERS}
    elif "JAX_PLATFORMS" in environ or has_tpu(environ):  # the user's choice (empty: jax's), or a TPU host
        return {}
    else:
        wanted = ({} if has_gpu() else {"JAX_PLATFORMS": "cpu"}) | _PLACEHOLDERS
    chosen = {k: v for k, v in wanted.items() if k not in environ}
    environ.update(chosen)
    return chosen
