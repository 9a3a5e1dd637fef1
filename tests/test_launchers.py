"""`launch/tpu_pod.sh` against a `gcloud` that plays two TPU VM workers on this machine (no
cloud is reachable from CI): what each worker runs, with which flags, from which source.

The fake `gcloud` implements the two calls the script makes, as gcloud does them: `compute tpus
tpu-vm scp [--recurse] --zone Z --worker=all SRC TPU:DST` copies SRC to DST under each worker's
home (into DST when DST is a folder, as scp does), and `compute tpus tpu-vm ssh TPU --zone Z
--worker=all --command CMD` runs CMD with bash in each worker's home. Each worker's
`.venv/bin/qk-jax` is a stand-in that records its arguments, environment and the source it finds
beside it (the tool itself runs as several processes in tests/test_multihost_train.py, through
launch/local.py)."""

from __future__ import annotations

import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_GCLOUD = r"""#!/usr/bin/env bash
set -euo pipefail
[[ "$1 $2 $3" == "compute tpus tpu-vm" ]] || { echo "fake gcloud: unexpected $*" >&2; exit 2; }
verb="$4"; shift 4
args=(); command=""; recurse=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --zone) shift 2 ;;
    --worker=all) shift ;;
    --recurse) recurse=(-r); shift ;;
    --command) command="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
for home in "$FAKE_WORKERS"/*; do
  if [[ "$verb" == scp ]]; then
    dst="${args[1]#*:}"
    cp "${recurse[@]}" "${args[0]}" "$home/${dst#\~/}"  # scp's semantics: into DST when it is a folder
  else
    (cd "$home" && HOME="$home" bash -c "$command")
  fi
done
"""

FAKE_QK_JAX = r"""#!/usr/bin/env python3
import json, os, sys
print(json.dumps({
    "args": sys.argv[1:],
    "distributed": os.environ.get("QK_DISTRIBUTED"),
    "cwd": os.getcwd(),
    "source": sorted(os.listdir(".")),
}))
"""


def _workers(tmp_path, n=2):
    bin_dir, workers = tmp_path / "bin", tmp_path / "workers"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    homes = []
    for i in range(n):
        venv = workers / f"worker{i}" / "qk_jax" / ".venv" / "bin"
        venv.mkdir(parents=True)
        (venv / "qk-jax").write_text(FAKE_QK_JAX)
        (venv / "qk-jax").chmod(0o755)
        (workers / f"worker{i}" / "qk_jax" / "stale_module.py").write_text("# left by an earlier launch\n")
        homes.append(workers / f"worker{i}")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_WORKERS=str(workers))
    return homes, env


def test_tpu_pod_runs_the_tool_on_every_worker_with_this_source_and_its_flags_word_for_word(tmp_path):
    homes, env = _workers(tmp_path)
    flags = [
        "train",
        "--config",
        "configs/stage2.py:paper",
        "--config.sharding.rules.dit=[['embed', None], ['mlp', 'fsdp']]",  # quotes and spaces
        "--workdir",
        "gs://bucket/run 1",
    ]
    for launch in (1, 2):  # a second launch finds the first one's folder: same result
        run = subprocess.run(
            ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "my-tpu", "us-central2-b", "--", *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        reports = [json.loads(line) for line in run.stdout.splitlines()]
        assert len(reports) == len(homes), run.stdout
        for report, home in zip(reports, homes):
            assert report["args"] == flags, (launch, report["args"])
            assert report["distributed"] == "1"
            assert report["cwd"] == str(home / "qk_jax")  # the source is not nested a level down
            source = set(report["source"])
            assert {"qk_jax", "configs", "launch", "README.md", ".venv"} <= source, source
            assert "stale_module.py" not in source and ".git" not in source  # replaced; nothing ignored
            assert not (home / "qk_jax_src.tar.gz").exists()
            # the worker's own environment is kept (it holds the stand-in tool that just ran)
            assert (home / "qk_jax" / ".venv" / "bin" / "qk-jax").is_file()
    usage = subprocess.run(
        ["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "my-tpu", "train"], env=env, capture_output=True, text=True
    )
    assert usage.returncode == 2 and "usage:" in usage.stderr
