"""absl flags and `main` shared by `qk-jax parity vae` and `qk-jax parity qwen_image_vae`.

Imported only through `parity/cli.py` (one tool per process; `TOOLS` in `parity/__init__.py`).
Logic: `parity/vae_parity.py`.
"""

from absl import flags

from qk_jax.parity import vae_parity

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "diffusers VAE folder or pipeline folder (uses vae/).")
_BATCH = flags.DEFINE_integer("batch", 1, "Number of random images.")
_HEIGHT = flags.DEFINE_integer("height", 64, "Image height in pixels (a multiple of the VAE's downsampling).")
_WIDTH = flags.DEFINE_integer("width", 64, "Image width in pixels.")
_SEED = flags.DEFINE_integer("seed", 0, "Random input seed.")
_TOL = flags.DEFINE_float("tolerance", 1e-4, "Max error relative to each tensor's max |value|.")


def main_for(kind: str):
    """The `main(argv) -> exit code` of the VAE parity tool for `kind` ("kl" | "qwen_image")."""

    def main(argv) -> int:
        del argv
        if not _CHECKPOINT.value:
            raise SystemExit("--checkpoint is required")
        report = vae_parity.vae_parity(
            _CHECKPOINT.value,
            kind,
            batch=_BATCH.value,
            height=_HEIGHT.value,
            width=_WIDTH.value,
            seed=_SEED.value,
            tolerance=_TOL.value,
        )
        return report.print()

    return main
