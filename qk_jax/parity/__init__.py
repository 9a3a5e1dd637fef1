"""`qk-jax parity <model> --checkpoint DIR`: ours against the PyTorch reference.

Each model registers a module in `TOOLS` that defines absl flags and `main(argv)`;
`report.py` holds the table and verdict every tool prints.
"""

TOOLS = {
    # model name -> module defining absl flags and `main(argv)`.
    "qwen2_5_vl": "qk_jax.parity.qwen2_5_vl",
}
