"""`qk-jax smoke`: a machine check — mesh, sharded init, train steps, checkpoint round trip.

qk-jax smoke --config configs/smoke.py:tiny --workdir /tmp/smoke
"""

import ml_collections

SIZES = {
    # vocab, width, heads, mlp, layers
    "tiny": (256, 64, 4, 128, 2),
    "small": (4096, 512, 8, 2048, 8),
}


def get_config(size: str = "tiny") -> ml_collections.ConfigDict:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    vocab, width, heads, mlp, depth = SIZES[size]
    config = ml_collections.ConfigDict()
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.model = dict(vocab_size=vocab, embed_dim=width, num_heads=heads, mlp_dim=mlp, num_layers=depth, remat=False)
    config.train = dict(steps=20, batch_size=8, seq_len=64, learning_rate=3e-3, seed=0)
    config.checkpoint = dict(max_to_keep=2)
    return config
