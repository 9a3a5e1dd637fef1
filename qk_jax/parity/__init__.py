"""`qk-jax parity <model> --checkpoint DIR`: ours against the PyTorch reference.

Each model registers a module in `TOOLS` that defines absl flags and `main(argv)`;
`report.py` holds the table and verdict every tool prints; `cli.py` dispatches.
"""

TOOLS = {
    # model name -> module defining absl flags and `main(argv)`.
    "qwen2_5_vl": "qk_jax.parity.qwen2_5_vl",
    "qwen_image": "qk_jax.parity.qwen_image",
    "flux": "qk_jax.parity.flux",
    "vae": "qk_jax.parity.vae",
    "qwen_image_vae": "qk_jax.parity.qwen_image_vae",
}
