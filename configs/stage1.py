"""Stage 1 of Query-Kontext. Sizes: tiny (tests), demo (CPU), paper, qwen_image.

qk-jax train --config configs/stage1.py:tiny --workdir runs/stage1
"""

from qk_jax.config import load_sibling

base = load_sibling(__file__, "base")


def get_config(size: str = "tiny"):
    return base.stage_config(1, size)
