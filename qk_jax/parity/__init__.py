"""`qk-jax parity <model> --checkpoint DIR`: ours against the PyTorch reference.

`TOOLS` registers every model in one table: the module that defines its absl flags, the
kind its `main_for(kind)` builds the tool for (None: the module's own `main(argv)`), and
the help text; the two DiT families share `dit_tool.py`, the two VAEs `vae_tool.py`.
`report.py` holds the table and verdict every tool prints; `cli.py` dispatches.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tool:
    module: str  # defines the absl flags and `main_for(kind)` (or `main`)
    kind: str | None  # argument of `main_for`; None: the module's `main`
    doc: str | None = None  # `qk-jax parity <model> --help` (None: the module's docstring)


TOOLS: dict[str, Tool] = {
    "qwen2_5_vl": Tool("qk_jax.parity.qwen2_5_vl", None),
    "qwen_image": Tool(
        "qk_jax.parity.dit_tool",
        "qwen_image",
        """\
`qk-jax parity qwen_image --checkpoint DIR`: our MMDiT vs diffusers' QwenImageTransformer2DModel.

DIR is a diffusers transformer folder (config.json + safetensors) or a Qwen-Image pipeline
folder (its `transformer/` is used); its config.json sets every size. Prints a per-block
error table (every double block's image and text stream, the output on the target
tokens) and a one-line verdict; exits non-zero when a row is above --tolerance.""",
    ),
    "flux": Tool(
        "qk_jax.parity.dit_tool",
        "flux",
        """\
`qk-jax parity flux --checkpoint DIR`: our MMDiT vs diffusers' FluxTransformer2DModel.

DIR is a diffusers transformer folder (config.json + safetensors) or a FLUX pipeline
folder (its `transformer/` is used); its config.json sets every size. Prints a per-block
error table (double blocks' image and text streams, single blocks' joint stream, the
output on the target tokens) and a one-line verdict; exits non-zero when a row is above
--tolerance.""",
    ),
    "vae": Tool(
        "qk_jax.parity.vae_tool",
        "kl",
        """\
`qk-jax parity vae --checkpoint DIR`: our AutoencoderKL vs diffusers' (FLUX / SD3 VAE).

DIR is a diffusers VAE folder or a pipeline folder (its `vae/` is used); its config.json
sets every size. Prints per-stage errors (encoder blocks, posterior, normalised latents,
decoder blocks, image, round trip) and a one-line verdict; exits non-zero above
--tolerance.""",
    ),
    "qwen_image_vae": Tool(
        "qk_jax.parity.vae_tool",
        "qwen_image",
        """\
`qk-jax parity qwen_image_vae --checkpoint DIR`: our AutoencoderKLQwenImage vs diffusers'.

DIR is a diffusers VAE folder or a Qwen-Image pipeline folder (its `vae/` is used); its
config.json sets every size. Single frames. Prints per-stage errors and a one-line
verdict; exits non-zero above --tolerance.""",
    ),
}
