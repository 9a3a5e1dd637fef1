"""Weight conversion between HF / diffusers safetensors folders and qk_jax parameter trees.

`mapping.py` holds the declarative machinery (rules, transforms, coverage checks) and
`safetensors_io.py` the streaming readers/writers; each model's mapping lives next to
the other mappings in this package (`qwen2_5_vl.py`, `qwen_image.py`, `flux.py`,
`vae_kl.py`, `vae_qwen_image.py`). `diffusers_configs.py` translates diffusers
config.json dicts to and from the config dataclasses of `qk_jax.models`.
"""
