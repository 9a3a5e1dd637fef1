#!/usr/bin/env python3
"""Run a qk-jax tool as several processes on this machine, joined by jax.distributed.

    python launch/local.py --num-processes 2 --devices-per-process 4 -- \\
        smoke --config configs/smoke.py:tiny --workdir /tmp/mp

Each process sees `--devices-per-process` simulated CPU devices (or its share of the
local accelerators), so a 2 x 4 run exercises exactly the multi-host code paths of a
pod: process-local batches, cross-process collectives, multi-process Orbax saves.
Exits non-zero if any process fails; output lines are prefixed with the process id.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--cpu", action="store_true", default=True, help="simulate CPU devices (default)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("tool", nargs=argparse.REMAINDER, help="-- <qk-jax tool> [flags]")
    args = parser.parse_args()
    tool = args.tool[1:] if args.tool[:1] == ["--"] else args.tool
    if not tool:
        parser.error("give the qk-jax tool to run after --")
    coordinator = f"localhost:{free_port()}"
    procs = []
    for pid in range(args.num_processes):
        env = dict(os.environ)
        env.update(
            QK_COORDINATOR=coordinator,
            QK_NUM_PROCESSES=str(args.num_processes),
            QK_PROCESS_ID=str(pid),
            PYTHONUNBUFFERED="1",
        )
        if args.cpu:
            env["JAX_PLATFORMS"] = "cpu"
            # other XLA flags of the caller stay (e.g. --xla_backend_optimization_level=0 in the tests)
            kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
            env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={args.devices_per_process}"])
        cmd = [sys.executable, "-m", "qk_jax.cli", *tool]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    def pump(pid, proc):
        for line in proc.stdout:
            if "[Gloo]" not in line:
                sys.stdout.write(f"[{pid}] {line}")
                sys.stdout.flush()

    threads = [threading.Thread(target=pump, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=args.timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            codes.append(124)
    for t in threads:
        t.join(timeout=5)
    bad = [i for i, c in enumerate(codes) if c != 0]
    if bad:
        print(f"processes {bad} failed with exit codes {[codes[i] for i in bad]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
