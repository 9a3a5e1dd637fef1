"""The README's "From the published weights" section, command for command, on tiny folders laid
out as the hub publishes Qwen2.5-VL-7B-Instruct and Qwen-Image (tests/published_layout.py).

The commands are read from README.md itself (its shell variables set to the tiny folders and
`SIZE=qwen_image_tiny`) and run as a user runs them, as `qk-jax` subprocesses: stage 1 from the
VLM and VAE folders, surgery 1 -> 2 grafting the transformer folder, stages 2 and 3 (two steps
each), sampling with the folder's published schedule, export of the trained VLM, DiT and VAE
back to transformers / diffusers folders, and `qk-jax parity` on each exported folder; the
`--dit-layers every_other` variant runs on a Qwen-Image folder twice as deep as the DiT.

Not shown at this size: the tiny VLM folder carries the offline toy tokenizer (its special-token
ids are not those of its config.json; a run takes them from its tokenizer), and nothing here
measures memory or speed of the 7B / 20B models.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import string
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cli_env import ROOT, tpu_init_errors, user_env
from published_layout import diffusers_pipeline_folder, published_config, qwen_vl_folder
from qk_jax.config import load_config
from qk_jax.convert import sources
from qk_jax.convert.from_run import ExportError, subtree_model
from qk_jax.model_config import build_kontext_config
from qk_jax.tree import flatten_tree

pytestmark = pytest.mark.slow  # every command of a README section, each a subprocess: minutes

SECTION = "## From the published weights"
VARIABLES = {"VLM", "QWEN_IMAGE", "DATA", "SIZE", "RUNS"}


def readme_blocks() -> list[tuple[dict[str, str], list[str]]]:
    """The bash blocks of the README section: ({variable: value}, [command line]) each, with
    line continuations joined and comments dropped."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end > 0 else None]
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", section, re.S):
        variables, commands = {}, []
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip() if not line.lstrip().startswith("qk-jax") else line.strip()
            if not line:
                continue
            assignment = re.fullmatch(r"([A-Z_]+)=(\S+)(\s+#.*)?", line)
            if assignment:
                variables[assignment.group(1)] = assignment.group(2)
            else:
                commands.append(line)
        blocks.append((variables, commands))
    return blocks


def argv(command: str, values: dict[str, str]) -> list[str]:
    """A README command with the variables set, as the argv of a `qk-jax` subprocess."""
    words = shlex.split(string.Template(command).substitute(values))
    assert words[0] == "qk-jax", command
    return [sys.executable, "-m", "qk_jax.cli", *words[1:]]


def run(args: list[str]) -> str:
    proc = subprocess.run(args, cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{shlex.join(args[2:])}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert tpu_init_errors(proc.stderr) == [], proc.stderr[-2000:]
    return proc.stderr + proc.stdout  # its log (diagnostics), then its results


def test_the_section_is_the_published_workflow():
    """Two blocks: the stages from the published folders, then the dit_10b surgery."""
    (variables, commands), (variant_vars, variant) = readme_blocks()
    assert set(variables) == VARIABLES and variant_vars == {}
    assert variables["VLM"] == "Qwen2.5-VL-7B-Instruct" and variables["SIZE"] == "qwen_image"
    tools = [shlex.split(c)[1] for c in commands]
    assert tools == ["train", "surgery", "train", "surgery", "train", "sample"] + ["convert"] * 3 + ["parity"] * 3
    assert "--config.model.vlm.checkpoint=$VLM" in commands[0] and "--dit $QWEN_IMAGE" in commands[1]
    assert len(variant) == 1 and "--dit-layers every_other" in variant[0]


def test_export_refuses_what_has_no_published_class():
    kcfg = build_kontext_config(load_config("configs/stage1.py:tiny"))
    with pytest.raises(ExportError, match=r"model.vae.kind='pixel'"):
        subtree_model(kcfg, "vae")
    with pytest.raises(ExportError, match=r"--subtree='text'"):
        subtree_model(kcfg, "text")
    assert subtree_model(kcfg, "generator")[:2] == ("head", "qwen_image")


@pytest.fixture(scope="module")
def workflow(tmp_path_factory, shapes_dir):
    """Runs every command of the section; returns the variables and each command's output."""
    from qk_jax.data.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("published_workflow")
    vlm = root / "Qwen2.5-VL-7B-Instruct"
    qwen_vl_folder(vlm, "legacy", seed=1)
    build_tokenizer(str(vlm))  # a download holds its tokenizer beside the weights
    diffusers_pipeline_folder(root / "Qwen-Image", "Qwen-Image", seed=2)
    diffusers_pipeline_folder(root / "Qwen-Image-deep", "Qwen-Image", seed=3, tiny={"transformer": {"num_layers": 4}})
    values = {
        "VLM": str(vlm),
        "QWEN_IMAGE": str(root / "Qwen-Image"),
        "DATA": shapes_dir,
        "SIZE": "qwen_image_tiny",
        "RUNS": str(root / "runs"),
    }
    (_, commands), (_, variant) = readme_blocks()
    out = [run(argv(c, values)) for c in commands]
    deep = dict(values, QWEN_IMAGE=str(root / "Qwen-Image-deep"), RUNS=str(root / "runs_10b"))
    os.makedirs(deep["RUNS"])
    os.symlink(os.path.join(values["RUNS"], "s1"), os.path.join(deep["RUNS"], "s1"))
    out.append(run(argv(variant[0], deep)))
    return values, out, deep


@pytest.mark.slow
def test_stage1_reads_the_published_folders(workflow):
    values, out, _ = workflow
    assert f"vlm: pretrained weights from {values['VLM']}" in out[0]
    assert f"vae: pretrained weights from {values['QWEN_IMAGE']}" in out[0]
    processor = os.listdir(os.path.join(values["RUNS"], "s1", "processor"))
    assert "tokenizer_config.json" in processor and not [n for n in processor if "safetensors" in n]


def report_statuses(report: dict) -> dict[str, str]:
    """{path: status} of a surgery report (its `paths` entries)."""
    return {e["path"]: e["status"] for e in report["paths"]}


@pytest.mark.slow
def test_surgery_grafts_the_published_transformer(workflow):
    values, out, deep = workflow
    with open(os.path.join(values["RUNS"], "s2_init", "surgery_report.json")) as f:
        report = json.load(f)
    assert report["bit_identical"]["ok"]
    grafted = [p for p, s in report_statuses(report).items() if s == "added (from --dit)"]
    assert grafted and all(p.startswith("dit/") for p in grafted)
    with open(os.path.join(deep["RUNS"], "s2_init", "surgery_report.json")) as f:
        assert json.load(f)["dit_blocks"] == [{"block": 0, "source_block": 0}, {"block": 1, "source_block": 2}]


@pytest.mark.slow
def test_sampling_writes_the_image(workflow):
    values, out, _ = workflow
    with Image.open(os.path.join(values["RUNS"], "t2i.png")) as im:
        assert im.size == (32, 32)
    assert "EMA weights" in out[5]


@pytest.mark.slow
@pytest.mark.parametrize(
    "subtree,model,key",
    [("generator", "qwen_image", "dit"), ("vae", "qwen_image_vae", "vae"), ("vlm", "qwen2_5_vl", "vlm")],
)
def test_export_is_the_run_merged_and_passes_parity(workflow, subtree, model, key):
    """The exported folder holds the stage-3 run's EMA weights with the LoRA merged, bit for bit,
    and its PyTorch class matches our model on it (`qk-jax parity`)."""
    from qk_jax import run_params
    from qk_jax.models.lora import apply_lora

    values, out, _ = workflow
    folder = os.path.join(values["RUNS"], "export", "transformer" if subtree == "generator" else subtree)
    weights = run_params.restore(os.path.join(values["RUNS"], "s3"))
    assert weights.used_ema
    want = flatten_tree(apply_lora(weights.params, weights.kcfg.lora_scales)[key])
    _, got = sources.load(model, folder)
    got = flatten_tree(got)
    assert sorted(got) == sorted(want)
    for path, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(value), err_msg=path)
    published = {
        "generator": ("Qwen-Image", "transformer"),
        "vae": ("Qwen-Image", "vae"),
        "vlm": ("Qwen2.5-VL-7B-Instruct",),
    }[subtree]
    with open(os.path.join(folder, "config.json")) as f:
        exported = json.load(f)
    version_keys = {"_diffusers_version", "transformers_version"}  # written by the libraries' save_pretrained
    assert set(exported) == set(published_config(*published, "config.json")) - version_keys
    if key == "vlm":
        assert set(exported["vision_config"]) == set(published_config(*published, "config.json")["vision_config"])
        assert "tokenizer_config.json" in os.listdir(folder)
    if key == "dit":  # trained in stage 2, adapted (LoRA merged) in stage 3: not the grafted weights
        _, grafted = sources.load(model, values["QWEN_IMAGE"])
        assert any(not np.array_equal(np.asarray(v), np.asarray(flatten_tree(grafted)[p])) for p, v in want.items())
    parity = out[9 + ["generator", "vae", "vlm"].index(subtree)]
    assert parity.strip().splitlines()[-1].startswith("PARITY OK"), parity[-2000:]
