"""Stage 2 of Query-Kontext. Sizes: tiny (tests), demo (CPU), paper, qwen_image.

qk-jax train --config configs/stage2.py:tiny --workdir runs/stage2
"""

from qk_jax.config import load_sibling

base = load_sibling(__file__, "base")


def get_config(size: str = "tiny"):
    return base.stage_config(2, size)
