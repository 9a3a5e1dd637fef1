"""`qk-jax parity qwen_image --checkpoint DIR`: our MMDiT vs diffusers' QwenImageTransformer2DModel.

DIR is a diffusers transformer folder (config.json + safetensors) or a Qwen-Image pipeline
folder (its `transformer/` is used); its config.json sets every size. Prints a per-block
error table (every double block's image and text stream, the output on the target
tokens) and a one-line verdict; exits non-zero when a row is above --tolerance.
Flags: `parity/dit_tool.py`.
"""

from qk_jax.parity.dit_tool import main_for

main = main_for("qwen_image")
