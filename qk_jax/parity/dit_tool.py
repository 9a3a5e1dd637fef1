"""absl flags and `main` shared by `qk-jax parity qwen_image` and `qk-jax parity flux`.

Imported only through `parity/cli.py` (one tool per process; `TOOLS` in `parity/__init__.py`),
so these flag names never clash with another tool's. Logic: `parity/dit_parity.py`.
"""

from absl import flags

from qk_jax.parity import dit_parity

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "diffusers transformer folder or pipeline folder.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size (sample b gets b * --pad padded text tokens).")
_HEIGHT = flags.DEFINE_integer("height", 6, "Target segment height in tokens (latent rows / patch size).")
_WIDTH = flags.DEFINE_integer("width", 8, "Target segment width in tokens.")
_TXT_LEN = flags.DEFINE_integer("txt_len", 12, "Text tokens per sample (padded length).")
_PAD = flags.DEFINE_integer("pad", 4, "Padded text tokens added per sample index.")
_SEGMENTS = flags.DEFINE_integer("condition_segments", 1, "Extra condition image segments after the target.")
_SEED = flags.DEFINE_integer("seed", 0, "Random input seed.")
_TOL = flags.DEFINE_float("tolerance", 1e-4, "Max error relative to each tensor's max |value|.")


def main_for(family: str):
    """The `main(argv) -> exit code` of the parity tool for `family` ("qwen_image" | "flux")."""

    def main(argv) -> int:
        del argv
        if not _CHECKPOINT.value:
            raise SystemExit("--checkpoint is required")
        report = dit_parity.mmdit_parity(
            _CHECKPOINT.value,
            family,
            batch=_BATCH.value,
            height=_HEIGHT.value,
            width=_WIDTH.value,
            txt_len=_TXT_LEN.value,
            pad=_PAD.value,
            condition_segments=_SEGMENTS.value,
            seed=_SEED.value,
            tolerance=_TOL.value,
        )
        return report.print()

    return main
