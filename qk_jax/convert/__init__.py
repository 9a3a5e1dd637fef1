"""Weight conversion between HF / diffusers safetensors folders and qk_jax parameter trees.

`mapping.py` holds the declarative machinery (rules, transforms, coverage checks) and
`safetensors_io.py` the streaming readers/writers; each model's mapping lives next to
the other mappings in this package (`qwen2_5_vl.py`, `mmdit.py`, `vae.py`, ...).
"""
