"""Where a run's tokenizer / processor comes from: `data.processor`, else the HF folder of
`model.vlm.checkpoint`, else `train.init_from`'s (a run workdir or a checkpoint root), else the
offline tokenizer, which a published-size VLM refuses by naming the field to set. Only tokenizer
and processor files are copied into the run, never weights."""

import os
import shutil

import pytest

from qk_jax import checkpoint as ckpt_lib
from qk_jax.config import ConfigError, load_config
from qk_jax.data.tokenizer import build_tokenizer
from qk_jax.train import ensure_processor, processor_source


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A HF checkpoint folder as downloaded: tokenizer + processor files beside config and weights."""
    folder = tmp_path_factory.mktemp("Qwen2.5-VL-7B-Instruct")
    build_tokenizer(str(folder))
    for name in ("preprocessor_config.json", "generation_config.json", "config.json"):
        shutil.copy(
            os.path.join(os.path.dirname(__file__), "fixtures", "published", "Qwen2.5-VL-7B-Instruct", name),
            folder / name,
        )
    for shard in (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ):
        (folder / shard).write_bytes(b"\0" * 4096)
    return folder


def _config(**fields):
    config = load_config("configs/stage1.py:tiny")
    for dotted, value in fields.items():
        node = config
        *parents, name = dotted.split("__")
        for p in parents:
            node = node[p]
        node[name] = value
    return config


def test_processor_comes_from_the_vlm_folder_and_only_its_tokenizer_files(hf_folder, tmp_path):
    config = _config(model__vlm__checkpoint=str(hf_folder))
    assert processor_source(config) == (str(hf_folder), "model.vlm.checkpoint")
    dst = ensure_processor(config, str(tmp_path / "run"))
    copied = sorted(os.listdir(dst))
    assert "tokenizer_config.json" in copied and "preprocessor_config.json" in copied
    assert not [n for n in copied if "safetensors" in n or n in ("config.json", "generation_config.json")], copied
    # data.processor wins over the VLM folder
    other = tmp_path / "tok"
    build_tokenizer(str(other))
    config = _config(model__vlm__checkpoint=str(hf_folder), data__processor=str(other))
    assert processor_source(config) == (str(other), "data.processor")


def test_a_published_size_vlm_without_a_tokenizer_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"data.processor is empty and model.vlm.size='7b'"):
        processor_source(_config(model__vlm__size="7b"))
    orbax_vlm = tmp_path / "vlm_orbax"  # e.g. a converted checkpoint: weights only
    orbax_vlm.mkdir()
    with pytest.raises(ConfigError, match=r"model.vlm.checkpoint=.*holds no tokenizer.*set data.processor"):
        processor_source(_config(model__vlm__checkpoint=str(orbax_vlm)))
    with pytest.raises(FileNotFoundError, match=r"config field data.processor: .* holds no tokenizer"):
        ensure_processor(_config(data__processor=str(orbax_vlm)), str(tmp_path / "run"))
    assert processor_source(_config()) is None  # the tiny VLM: the offline tokenizer


def test_init_from_takes_a_run_workdir_or_a_checkpoint_root(tmp_path):
    run = tmp_path / "run"
    build_tokenizer(str(run / "processor"))
    (run / "checkpoints").mkdir()
    for path in (run, run / "checkpoints"):
        assert ckpt_lib.resolve_run(str(path)) == (str(run / "checkpoints"), str(run / "processor"))
        assert processor_source(_config(train__init_from=str(path))) == (str(run / "processor"), "train.init_from")


def test_every_process_writes_its_own_processor_copy(hf_folder, tmp_path, monkeypatch):
    # a host other than process 0, with no shared filesystem: nobody else writes its workdir and
    # it waits for nobody (a barrier or a read of process 0's copy would fail here)
    import jax

    from qk_jax import distributed, train

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "barrier", lambda name: pytest.fail(f"waited at barrier {name}"))
    run = tmp_path / "host1"
    dst = ensure_processor(_config(model__vlm__checkpoint=str(hf_folder)), str(run))
    assert os.path.isfile(os.path.join(dst, "tokenizer_config.json"))
    assert sorted(os.listdir(run)) == ["processor"]  # no temporary folder left
    # a shared workdir where another process placed its (identical) copy first: that one stays
    theirs = tmp_path / "shared" / "processor"
    shutil.copytree(dst, theirs)
    (theirs / "marker").write_text("first")
    mine = tmp_path / "shared" / "processor.tmp.1.123"
    shutil.copytree(dst, mine)
    train.publish_folder(str(mine), str(theirs))
    assert (theirs / "marker").read_text() == "first" and not mine.exists()
