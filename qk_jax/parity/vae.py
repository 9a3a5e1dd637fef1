"""`qk-jax parity vae --checkpoint DIR`: our AutoencoderKL vs diffusers' (FLUX / SD3 VAE).

DIR is a diffusers VAE folder or a pipeline folder (its `vae/` is used); its config.json
sets every size. Prints per-stage errors (encoder blocks, posterior, normalised latents,
decoder blocks, image, round trip) and a one-line verdict; exits non-zero above
--tolerance. Flags: `parity/vae_tool.py`.
"""

from qk_jax.parity.vae_tool import main_for

main = main_for("kl")
