"""A trained run's VLM, generator or VAE back to a HF / diffusers folder.

    qk-jax convert --from-run runs/stage3 --subtree generator --to-hf out/transformer [--step N] [--no-ema]

The run's weights are read as `qk-jax sample` reads them (`qk_jax.run_params.restore`: the
EMA of the trainable parameters where the run keeps one), every LoRA adapter the run's
config attached is merged into its kernel (`W + alpha/rank * a @ b`), and the sub-model's
subtree is written by the registry's exporter for its family: `qwen2_5_vl` for the VLM
(with the run's tokenizer / processor files beside it, so `AutoProcessor` loads the folder
too), `qwen_image` / `flux` for the generator (the stage-1 head or the DiT), `vae` /
`qwen_image_vae` for the autoencoder. The folder loads with the PyTorch class's
`from_pretrained` and with `qk-jax parity`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qk_jax import logs
from qk_jax.models.vae.pixel import PixelSpaceConfig

SUBTREES = ("vlm", "generator", "vae")


class ExportError(ValueError):
    """A subtree the run cannot export (the message names the run and the config field)."""


def subtree_model(kcfg, subtree: str, where: str = "the run") -> tuple[str, str, Any]:
    """`(params key, registry model name, model config)` of `subtree` in a run's model."""
    if subtree == "vlm":
        return "vlm", "qwen2_5_vl", kcfg.vlm
    if subtree == "generator":
        return kcfg.generator_key, ("flux" if kcfg.generator.family == "flux" else "qwen_image"), kcfg.generator
    if subtree == "vae":
        if isinstance(kcfg.vae, PixelSpaceConfig):
            raise ExportError(
                f"{where} uses the pixel-space autoencoder (config field model.vae.kind='pixel'), "
                "which has no weights and no diffusers class"
            )
        name = "qwen_image_vae" if type(kcfg.vae).__name__ == "QwenImageVAEConfig" else "vae"
        return "vae", name, kcfg.vae
    raise ExportError(f"--subtree={subtree!r}: choose one of {', '.join(SUBTREES)}")


def run_to_hf(
    run: str,
    subtree: str,
    out: str,
    *,
    step: int | None = None,
    use_ema: bool = True,
    dtype: Any = None,
    mesh_cfg: Mapping[str, int] | None = None,
    log=logs.info,
) -> list[str]:
    """Writes `subtree` of `run` (a workdir or checkpoint root) as a HF / diffusers folder `out`.

    Returns the files written. The weights are restored sharded on `mesh_cfg` (default: the
    run's mesh) and fetched to the host one tensor at a time by the exporter.
    """
    from qk_jax import run_params
    from qk_jax.convert.registry import get_model
    from qk_jax.data import vlm_inputs
    from qk_jax.models.lora import apply_lora

    if subtree not in SUBTREES:
        raise ExportError(f"--subtree={subtree!r}: choose one of {', '.join(SUBTREES)}")
    weights = run_params.restore(run, use_ema=use_ema, mesh_spec=mesh_cfg, step=step)
    key, model, cfg = subtree_model(weights.kcfg, subtree, f"{run} step {weights.step}")
    adapters = weights.params.get("lora", {})
    params = apply_lora(
        {key: weights.params[key], **({"lora": {key: adapters[key]}} if key in adapters else {})},
        weights.kcfg.lora_scales,
    )[key]
    log(
        f"{run} step {weights.step}: {subtree} ({key}, {model}) from the "
        f"{'EMA' if weights.used_ema and _trained(weights.config, key) else 'stored'} weights"
        + (", LoRA merged" if key in adapters else "")
    )
    files = get_model(model).export(out, cfg, params, dtype=dtype)
    if model == "qwen2_5_vl" and weights.processor_dir:
        files += vlm_inputs.copy_processor(weights.processor_dir, out, f"{run}/processor")
    log(f"{model}: wrote {out} ({', '.join(files)})")
    return files


def _trained(config, key: str) -> bool:
    """Whether the run trained anything under `key` (its EMA then differs from the stored weights)."""
    return any(t == key or t.startswith(key + "/") or t == f"lora/{key}" for t in config.train.trainable)
