"""`qk-jax parity flux --checkpoint DIR`: our MMDiT vs diffusers' FluxTransformer2DModel.

DIR is a diffusers transformer folder (config.json + safetensors) or a FLUX pipeline
folder (its `transformer/` is used); its config.json sets every size. Prints a per-block
error table (double blocks' image and text streams, single blocks' joint stream, the
output on the target tokens) and a one-line verdict; exits non-zero when a row is above
--tolerance. Flags: `parity/dit_tool.py`.
"""

from qk_jax.parity.dit_tool import main_for

main = main_for("flux")
