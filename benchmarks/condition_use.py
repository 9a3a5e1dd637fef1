"""How much a trained generator reads its condition: attention and prediction measurements.

    PYTHONPATH=. python benchmarks/condition_use.py --checkpoint RUN [--step N] [--data_dir DIR]
        [--task t2i] [--records 8] [--timesteps 0.9,0.5]

On validation records whose condition fixes the content (`qk_jax.eval.signal.validation_records`),
noised to each timestep t, with the run's EMA weights, it prints:

- per DiT block, the share of the target tokens' attention that goes to the prompt tokens,
  to the kontext tokens and to the image stream (softmax mass, averaged over heads, tokens
  and records);
- the mean absolute change of the clean-latent prediction x0_hat when the condition is
  replaced by another record's (the batch rolled by one) and when it is masked out, beside
  the prediction's own error. A generator that reads what its condition says moves with the
  first; one that only tells "conditioned" from "unconditional" moves with the second only;
- the mean pairwise cosine similarity of the condition tokens: the kontext tokens across
  records, and the prompt tokens within a record (a stream whose tokens all point one way
  gives attention nothing to select).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from qk_jax import sharding
from qk_jax.eval import signal
from qk_jax.models import layers
from qk_jax.models.mmdit import blocks
from qk_jax.sample import Sampler


def mean_pairwise_cos(x: np.ndarray) -> float:
    """(N, D) -> the mean cosine similarity over distinct pairs."""
    x = x / np.linalg.norm(x, axis=-1, keepdims=True)
    n = len(x)
    return float(((x @ x.T).sum() - n) / (n * n - n))


def recorded_attention(masses: list[np.ndarray]):
    """The MMDiT's joint attention, also recording its softmax (B, H, S, S) through a host callback
    (the blocks run inside a scan, so the probabilities cannot be returned directly)."""
    plain = blocks.attention

    def attention(cfg, q, k, v, mask):
        logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * q.shape[-1] ** -0.5
        if mask is not None:
            dense = mask.dense(q.shape[1]) if isinstance(mask, layers.SegmentMask) else mask
            logits = jnp.where(dense, logits, -jnp.inf)
        jax.debug.callback(lambda p: masses.append(np.asarray(p)), jax.nn.softmax(logits, axis=-1))
        return plain(cfg, q, k, v, mask)

    return plain, attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run workdir or checkpoint folder")
    parser.add_argument("--step", type=int, default=None)
    parser.add_argument("--data_dir", default=None, help="default: the run's data.data_dir")
    parser.add_argument("--task", default="t2i")
    parser.add_argument("--records", type=int, default=8)
    parser.add_argument("--timesteps", default="0.9,0.5")
    args = parser.parse_args()

    sampler = Sampler.from_checkpoint(args.checkpoint, step=args.step)
    model, params, config = sampler.model, sampler.params, sampler.config
    recs = signal.validation_records(
        args.data_dir or config.data.data_dir, config.data.dataset, args.task, args.records
    )
    batch = sampler.model_batch(recs)
    k = model.config.num_queries
    masses: list[np.ndarray] = []
    plain, recording = recorded_attention(masses)

    with jax.set_mesh(sampler.mesh), sharding.activation_rules_context():
        cond, mask, _ = jax.jit(model.condition)(params, batch)
        x0 = model.encode(params, batch["target"])
        noise = jax.random.normal(jax.random.key(0), x0.shape, x0.dtype)
        t_len = cond.shape[1]
        # The packed stream: each row's prompt tokens, then its K queries, then padding (`cond_index` -1).
        index = np.asarray(batch["cond_index"])
        is_kontext = index >= batch["input_ids"].shape[1]
        is_prompt = (index >= 0) & ~is_kontext

        def x0_hat(xt, t, c, m):
            tb = jnp.full((xt.shape[0],), t, jnp.float32)
            return xt - t * model.velocity(params, xt, None, batch["img_ids"], c, m, tb)

        print(f"{args.checkpoint} (step {sampler.step}), {len(recs)} validation {args.task} records, K = {k}")
        print(f"{'t':>4} {'block':>5} {'-> prompt':>10} {'-> kontext':>11} {'-> image':>9}")
        changes = []
        for t in (float(v) for v in args.timesteps.split(",")):
            xt = model.noised(params, x0, noise, jnp.full((x0.shape[0],), t, jnp.float32), *batch["target"].shape[1:3])
            masses.clear()
            blocks.attention = recording
            try:
                own = x0_hat(xt, t, cond, mask)  # eagerly traced once: the callback fires per block
                jax.block_until_ready(own)
            finally:
                blocks.attention = plain
            for i, p in enumerate(masses):
                rows = p[:, :, t_len:, :]  # the image stream's queries
                prompt = (rows[..., :t_len] * is_prompt[:, None, None]).sum(-1).mean()
                kontext = (rows[..., :t_len] * is_kontext[:, None, None]).sum(-1).mean()
                print(f"{t:>4} {i:>5} {prompt:>10.3f} {kontext:>11.3f} {rows[..., t_len:].sum(-1).mean():>9.3f}")
            swapped = x0_hat(xt, t, jnp.roll(cond, 1, 0), jnp.roll(mask, 1, 0))
            uncond = x0_hat(xt, t, cond, jnp.zeros_like(mask))
            changes.append(
                (t, *(float(jnp.mean(jnp.abs(a - b))) for a, b in ((own, swapped), (own, uncond), (own, x0))))
            )
    print(f"\n{'t':>4} {'|own - other record|':>21} {'|own - unconditional|':>22} {'|own - x0| (error)':>19}")
    for t, sw, un, err in changes:
        print(f"{t:>4} {sw:>21.4f} {un:>22.4f} {err:>19.4f}")
    cond, mask = np.asarray(cond), np.asarray(mask)
    kontext = cond[is_kontext].reshape(len(recs), k, -1)
    kontext_cos = np.mean([mean_pairwise_cos(kontext[:, i]) for i in range(k)])
    within = np.mean([mean_pairwise_cos(cond[b][is_prompt[b]]) for b in range(len(recs))])
    print(
        f"\ncondition tokens: kontext across records cos {kontext_cos:.3f}; prompt tokens within a record cos "
        f"{within:.3f}"
    )


if __name__ == "__main__":
    main()
