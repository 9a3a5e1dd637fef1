"""The judge on the generator's own renders, degraded renders, blank and noise images.

    PYTHONPATH=. python benchmarks/judge.py [--per_task 50] [--size 64] [--split test]

Prints one row per image variant: the mean score per task and overall (1.0 = the judge
accepts every sample). Clean and degraded renders should read ~1, blank / noise ~0.
"""

from __future__ import annotations

import argparse
import time
import zlib

import jax.numpy as jnp
import numpy as np

from qk_jax.data import records, vocab
from qk_jax.eval import degrade, score
from qk_jax.models.vae.pixel import PixelSpaceAutoencoder, PixelSpaceConfig


def variants():
    out = {
        "clean": lambda a, s: a,
        "blank (grey)": lambda a, s: np.full_like(a, 128),
        "random noise": lambda a, s: np.random.default_rng(s).integers(0, 256, a.shape, dtype=np.uint8),
    }
    for name, fn in degrade.DEGRADATIONS.items():
        out[name] = (lambda f: lambda a, s: f(a, seed=s))(fn)
    out["jpeg q75 4:2:0"] = lambda a, s: degrade.jpeg(a, 75, subsampling=2)
    out["combined"] = lambda a, s: degrade.combined(a, seed=s)
    for keep in (4, 3):  # the pixel autoencoder's DCT code (`model.vae.keep`) round trip
        out[f"DCT 8/{keep} code"] = (lambda k: lambda a, s: dct_round_trip(a, 8, k))(keep)
    return out


def dct_round_trip(img: np.ndarray, factor: int, keep: int) -> np.ndarray:
    """(H, W, 3) uint8 through the pixel autoencoder keeping `keep` x `keep` DCT frequencies per
    `factor` x `factor` block: what a generator on that code can draw at best."""
    model = PixelSpaceAutoencoder(PixelSpaceConfig(factor=factor, keep=keep))
    x = jnp.asarray(img, jnp.float32)[None] / 127.5 - 1.0
    out = model.apply({}, model.apply({}, x, method=model.encode), method=model.decode)[0]
    return np.clip(np.round((np.asarray(out) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per_task", type=int, default=50)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    recs = [
        records.generate_record(t, i, args.split, 0, args.size, args.width)
        for t in vocab.TASKS
        for i in range(args.per_task)
    ]
    short = {"reconstruction": "recon", "transformation": "transf", "customization": "custom", "multi_subject": "multi"}
    cols = [short.get(t, t) for t in vocab.TASKS]
    print(
        f"judge scores, {len(recs)} {args.split} records ({args.per_task} per task), "
        f"{args.size}x{args.width or args.size}"
    )
    print(f"{'variant':16s} " + " ".join(f"{c:>7s}" for c in cols) + f" {'overall':>8s} {'ms/img':>7s}")
    for name, fn in variants().items():
        start = time.perf_counter()
        rep = score.score_records(recs, lambda r: fn(records.decode_image(r["target"]), zlib.crc32(r["id"].encode())))
        ms = (time.perf_counter() - start) / len(recs) * 1000
        print(
            f"{name:16s} "
            + " ".join(f"{rep['per_task'][t]:7.3f}" for t in vocab.TASKS)
            + f" {rep['overall']:8.3f} {ms:7.0f}"
        )


if __name__ == "__main__":
    main()
