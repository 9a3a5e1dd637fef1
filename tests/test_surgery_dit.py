"""`qk-jax surgery --from 1 --to 2 --dit DIR` grafts a pretrained DiT given as a diffusers folder
(a pipeline folder as downloaded) or as the Orbax checkpoint `qk-jax convert --to-orbax` wrote
from it: the same weights either way; a DiT of another architecture is refused by name."""

import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

import kontext_util as ku
from qk_jax import checkpoint as ckpt_lib
from qk_jax import sharding, surgery
from qk_jax.convert import cli as convert_cli
from qk_jax.convert import qwen_image as dit_convert
from qk_jax.models.kontext import QueryKontext
from qk_jax.tree import flatten_tree


def _init(kcfg, seed: int):
    mesh = sharding.make_mesh((1, 1, 1))
    with jax.set_mesh(mesh):
        params, _, _ = sharding.init_sharded(QueryKontext(kcfg).init, mesh, jax.random.key(seed))
    return jax.device_get(params)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, shapes_dir):
    """A stage-1 checkpoint written directly (random parameters, the tiny stage-1 config and its
    processor), the stage-2 generator as a downloaded pipeline folder (Qwen-Image/transformer/),
    and that folder converted to Orbax."""
    proc = ku.processor_dir(tmp_path_factory)
    root = tmp_path_factory.mktemp("surgery_dit")
    config1 = ku.stage_config(1, shapes_dir)
    with ckpt_lib.Checkpointer(root / "stage1", async_save=False) as ck:
        ck.save(0, params=_init(ku.model_config(config1, proc), 0), config=config1.to_dict(), force=True)
    shutil.copytree(proc, root / "stage1" / "processor")
    kcfg2 = ku.model_config(ku.stage_config(2, shapes_dir), proc)
    dit = _init(kcfg2, 7)["dit"]
    dit_convert.save(str(root / "Qwen-Image" / "transformer"), kcfg2.generator, dit)
    convert_cli.hf_to_orbax("qwen_image", str(root / "Qwen-Image"), str(root / "dit_orbax"), log=lambda *_: None)
    return root, flatten_tree(dit)


def _restored_dit(dst: str) -> dict:
    config = ml_collections.ConfigDict(ckpt_lib.read_json_item(dst, 0, "config"))
    model = QueryKontext(ku.model_config(config, os.path.join(dst, "processor")))
    mesh = sharding.make_mesh((1, 1, 1))
    with jax.set_mesh(mesh):
        abstract, specs = sharding.abstract_init(model.init, jax.random.key(0))
        target = sharding.abstract_with_shardings(abstract, sharding.tree_shardings(abstract, specs, mesh))
        params = ckpt_lib.Checkpointer(dst, create=False).restore(params=target, json_items=())["params"]
    return jax.device_get(flatten_tree(params["dit"]))


@pytest.mark.slow
@pytest.mark.parametrize("source", ["Qwen-Image", "dit_orbax"])
def test_dit_from_a_pipeline_folder_or_its_converted_checkpoint(folders, source, devices):
    root, dit = folders
    dst = str(root / f"stage2_from_{source}")
    report = surgery.run(1, 2, str(root / "stage1"), dst, dit=str(root / source))
    statuses = {r["path"]: r["status"] for r in report["paths"]}
    assert {s for p, s in statuses.items() if p.startswith("dit/")} == {"added (from --dit)"}
    assert report["bit_identical"]["ok"]
    got = _restored_dit(dst)
    assert sorted(got) == sorted(dit)
    for path, value in dit.items():
        np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_a_dit_of_another_depth_is_refused_by_name(folders, tmp_path):
    root, _ = folders
    other = tmp_path / "transformer"
    shutil.copytree(root / "Qwen-Image" / "transformer", other)
    raw = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(raw, num_layers=raw["num_layers"] + 1)))
    with pytest.raises(surgery.SurgeryError, match=r"--dit .*num_layers=4 but the stage config.s generator has 3"):
        surgery.run(1, 2, str(root / "stage1"), str(tmp_path / "dst"), dit=str(other))


@pytest.mark.parametrize("field", ["patch_bottleneck", "cell_conv_width"])
def test_a_dit_without_the_configs_extra_layers_is_refused_by_name(folders, tmp_path, field):
    """A stage config whose generator has `patch_bottleneck` or `cell_conv_width` cannot take a
    published DiT (none has either): refused by the field's name before any weight is read."""
    root, _ = folders
    stage2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "stage2.py")
    spec = tmp_path / "stage2_extra.py"
    spec.write_text(
        "from qk_jax.config import load_config\n\n\n"
        "def get_config(size='tiny'):\n"
        f"    return load_config({stage2!r} + ':' + size, ['model.generator.overrides.{field}=8'])\n"
    )
    with pytest.raises(surgery.SurgeryError, match=rf"--dit .*{field}=None but the stage config.s generator has 8"):
        surgery.run(
            1, 2, str(root / "stage1"), str(tmp_path / "dst"), dit=str(root / "Qwen-Image"), config_spec=f"{spec}:tiny"
        )


def test_block_indices():
    from qk_jax.dit_seeding import block_indices

    assert block_indices("every_other", 60, 30) == tuple(range(0, 60, 2))
    assert block_indices("first", 60, 3) == (0, 1, 2)
    assert block_indices("5, 1", 6, 2) == (5, 1)
    assert block_indices("all", 4, 4) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="--dit-layers='every_other' selects 3 of the source's 5 blocks"):
        block_indices("every_other", 5, 2)
    with pytest.raises(ValueError, match="distinct and within 0..3"):
        block_indices("1,4", 4, 2)


@pytest.mark.slow
def test_a_shallower_dit_is_seeded_from_every_other_block(folders, tmp_path, devices):
    """The stage-2 generator (n blocks) from a 2n-block pretrained DiT of the same width (as dit_10b
    from Qwen-Image): block i is source block 2i bit for bit, everything else as in the source."""
    root, _ = folders
    deep = tmp_path / "deep"
    kcfg2 = ku.model_config(ku.stage_config(2, str(tmp_path)), os.path.join(root, "stage1", "processor"))
    n = kcfg2.generator.num_layers
    deep_cfg = kcfg2.generator.replace(num_layers=2 * n)
    deep_params = dit_convert.load(_save_random_dit(deep, deep_cfg))[1]
    dst = str(tmp_path / "stage2")
    report = surgery.run(1, 2, str(root / "stage1"), dst, dit=str(deep), dit_layers="every_other")
    assert report["dit_blocks"] == [{"block": i, "source_block": 2 * i} for i in range(n)]
    assert report["bit_identical"]["ok"] and report["bit_identical"]["checked"] >= len(flatten_tree(deep_params))
    assert "| 1 | 2 |" in open(os.path.join(dst, "surgery_report.md")).read()
    got = _restored_dit(dst)
    for path, value in flatten_tree(jax.device_get(deep_params)).items():
        want = value[np.arange(0, 2 * n, 2)] if path.startswith("double_blocks/") else value
        np.testing.assert_array_equal(got[path], want, err_msg=path)


def _save_random_dit(folder, cfg) -> str:
    import flax.linen as nn

    from qk_jax.models.mmdit import init_params

    params = jax.device_get(nn.meta.unbox(init_params(cfg, jax.random.key(3))))
    dit_convert.save(str(folder), cfg, params)
    return str(folder)
