"""`qk-jax parity qwen_image_vae --checkpoint DIR`: our AutoencoderKLQwenImage vs diffusers'.

DIR is a diffusers VAE folder or a Qwen-Image pipeline folder (its `vae/` is used); its
config.json sets every size. Single frames. Prints per-stage errors and a one-line
verdict; exits non-zero above --tolerance. Flags: `parity/vae_tool.py`.
"""

from qk_jax.parity.vae_tool import main_for

main = main_for("qwen_image")
