"""Query-Kontext: the assembled model, read top to bottom.

    prompt + input images ──► VLM (Qwen2.5-VL) ──► final-norm hidden states
                              [prompt tokens ; K learnable kontext queries]
                                        │
                              packed: the prompt's own tokens (no padding, no shared
                                        │  chat-template prefix), then the K queries
                              Connector (MLP or transformer)
                                        │  condition tokens [text ; kontext]  (B, W + K, D_cond)
                                        ▼
    noisy target latents ─┐
    source / reference    ├─► MMDiT (image stream: target first, then condition segments)
    VAE latents (stage 3) ┘            │  velocity on the target tokens
                                       ▼
                                VAE decoder ──► image

`QueryKontext` is a plain Python object composed of Linen modules, each applied to its
own subtree of one parameter dict:

    params = {"vlm": ..., "queries": {"embedding": (K, D_vlm)}, "connector": ...,
              "head" | "dit": ...,            # stage 1's light head / the large DiT
              "vae": ...,                     # frozen (absent for the pixel autoencoder)
              "lora": {"vlm": ..., "dit": ...}}  # adapters, per stage

so a stage transition is a function on this dict (`surgery.py`) and each part can run
alone (the VLM + connector once per prompt when sampling, the DiT every step).
LoRA adapters (`params["lora"][<sub-model>]`) run unmerged, as the `lora` variable
collection of that sub-model; a tree whose adapters were merged (`lora.apply_lora`) simply
has none.

Host-side preparation of a batch (position ids, the vision plan, image-stream position
ids) lives in `qk_jax/data/model_inputs.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qk_jax import flow
from qk_jax.models import blur as blur_lib
from qk_jax.models.connector import Connector, ConnectorConfig
from qk_jax.models.layers import LORA_COLLECTION
from qk_jax.models.lora import lora_collection
from qk_jax.models.mmdit import MMDiT, MMDiTConfig
from qk_jax.models.mmdit import init_params as init_mmdit_params
from qk_jax.models.mmdit.positions import patchify, unpatchify
from qk_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
from qk_jax.models.qwen2_5_vl import init_params as init_vlm_params
from qk_jax.models.vae import build_vae
from qk_jax.models.vae.pixel import PixelSpaceAutoencoder, PixelSpaceConfig

Array = jax.Array
POSITION_SCHEMES = ("shifted_2d", "frame")
PREDICTIONS = ("velocity", "x0", "preconditioned")
LOSS_WEIGHTINGS = ("velocity", "x0")
GENERATOR_KEYS = ("head", "dit")
GENERATOR_INITS = ("default", "adaln_zero")
# adaLN-Zero (DiT, Peebles & Xie 2023): the parameters zeroed at initialisation, so that every block
# starts as the identity (shift, scale and gate 0) and the output as 0.
ADALN_ZERO_PARAMS = ("double_blocks/img_mod/", "double_blocks/txt_mod/", "single_blocks/mod/", "norm_out/", "proj_out/")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA on the Dense kernels whose path matches one of `targets` (regexes); rank 0 = off."""

    rank: int = 0
    alpha: float = 0.0
    targets: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


@dataclasses.dataclass(frozen=True)
class CondDropout:
    """Per-sample condition dropout during training, so the branches that classifier-free
    guidance evaluates at sampling time are trained.

    One uniform draw per sample picks an exclusive case:
      uncond     text, kontext and input images all dropped (the "neither" branch);
      no_text    text and kontext dropped, input images kept (dual guidance's image-only
                 branch; in stages 1-2, without the image path, the same as uncond);
      no_images  the input images' VAE latents zeroed (stage 3, InstructPix2Pix style);
    then text and kontext are each dropped independently with `text` / `kontext`.
    "Dropped" text / kontext tokens are masked out of the condition stream.
    """

    uncond: float = 0.1
    no_text: float = 0.05
    no_images: float = 0.05
    text: float = 0.0
    kontext: float = 0.0

    def __post_init__(self):
        if self.uncond + self.no_text + self.no_images > 1:
            raise ValueError("model.dropout: uncond + no_text + no_images must not exceed 1")


@dataclasses.dataclass(frozen=True)
class KontextConfig:
    vlm: Qwen25VLConfig
    generator: MMDiTConfig
    vae: Any  # VAEConfig | PixelSpaceConfig
    connector: ConnectorConfig
    num_queries: int = 128
    generator_key: str = "dit"  # "head" in stage 1
    # How a generator trained from scratch starts: "default" (every Dense kernel LeCun-normal, as the
    # published architectures are defined; their checkpoints replace it) or "adaln_zero" (the same,
    # with every block's modulation and the output layer zero: each block starts as the identity,
    # DiT's adaLN-Zero). A checkpoint or surgery that brings the generator's weights overrides both.
    generator_init: str = "default"
    low_level: bool = False  # stage 3: VAE latents of source / references join the image stream
    position_scheme: str = "shifted_2d"
    lora_vlm: LoraConfig = LoraConfig()
    lora_dit: LoraConfig = LoraConfig()
    timesteps: flow.TimestepConfig = flow.TimestepConfig()
    # Blurring diffusion (qk_jax/models/blur.py): the target picture blurred as the noise grows; off by default.
    # Needs prediction="x0": the generator predicts the sharp picture from the blurred, noisy one.
    blur: blur_lib.BlurConfig = blur_lib.BlurConfig()
    dropout: CondDropout = CondDropout()
    guidance_scale: float = 1.0  # FLUX guidance-distilled generators: the embedded guidance value
    # What the generator's output means: "velocity" (v = noise - x0, as Qwen-Image / FLUX) or
    # "x0" (the clean latents; v = (x_t - x0) / t). Loss and sampling always use the
    # velocity. x0-prediction is for high-dimensional tokens such as the demo's pixel-space
    # patches (192 features): there a network must otherwise reproduce the noise of every
    # feature, which leaves the samples noisy (JiT, "Back to Basics", Li & He 2025).
    #
    # "preconditioned": the clean latents as x0 = c_skip(t) x_t + c_out(t) F, with EDM's
    # (Karras et al. 2022) skip and output scales for the rectified-flow path x_t = a x0 + t eps
    # (a = 1 - t, data std `sigma_data`): c_skip = a s^2 / (a^2 s^2 + t^2), c_out = t s /
    # sqrt(a^2 s^2 + t^2). The skip carries what x_t already shows (a plain x0 network must
    # learn that identity, which a small one does not in minutes: its completions come out as
    # blocks of one colour per token), and the velocity loss then weights every t by
    # s^2 / (a^2 s^2 + t^2), between s^2 and 1, instead of x0-prediction's 1 / t^2.
    prediction: str = "velocity"
    min_t: float = 0.05  # x0-prediction: t is clipped below at this value in (x_t - x0) / t
    sigma_data: float = 0.5  # "preconditioned": the standard deviation of the clean latents
    # Per-sample weight of the velocity loss: "velocity" (1; for an x0 generator that is its
    # clean-latent error times 1 / t^2, which puts the weight on the nearly clean samples) or
    # "x0" (t^2, t clipped at `min_t`: the plain clean-latent error, every noise level alike).
    loss_weighting: str = "velocity"
    # Per-token weight of the loss inside each sample: 1 + foreground_weight x the share of the
    # token's pixels that differ from the target's background (`foreground_token_weights`),
    # normalised to a weighted mean. 0 = every token alike. A text prompt says nothing of a plain
    # background's colour and little of where an object goes, so read against the whole image
    # it explains ~1% of the error even from pure noise; the weight moves the loss to the
    # objects, which the prompt does describe.
    foreground_weight: float = 0.0
    # The foreground weight applies to samples drawn at t <= foreground_max_t only (1 = all). Where
    # the noise hides the objects, a weight that depends on the target biases the optimum towards
    # object colours wherever an object might be (the weighted mean, not the mean), and a sampler
    # starting from noise draws those colours everywhere; below it the objects show through x_t.
    foreground_max_t: float = 1.0
    # Weight of the error's spatial mean (per token feature, over the target's tokens) against the
    # rest of the error (1 = the plain squared error). The spatial mean is mostly the background's
    # tone; below 1 the loss pays relatively more for where and what the objects are. Unlike a
    # weight that depends on the target, any positive value keeps the optimum at the conditional
    # mean (the loss stays a fixed positive-definite quadratic form of the error).
    mean_error_weight: float = 1.0
    dtype: str = "float32"  # VLM compute dtype (the other parts carry theirs in their configs)
    param_dtype: str = "float32"

    def __post_init__(self):
        if self.num_queries < 1:
            raise ValueError(f"model.num_queries={self.num_queries}: need at least one kontext query")
        if self.generator_key not in GENERATOR_KEYS:
            raise ValueError(f"model.generator.key={self.generator_key!r}; expected one of {GENERATOR_KEYS}")
        if self.generator_init not in GENERATOR_INITS:
            raise ValueError(f"model.generator.init={self.generator_init!r}; expected one of {GENERATOR_INITS}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"model.prediction={self.prediction!r}; expected one of {PREDICTIONS}")
        if self.blur.enabled and self.prediction != "x0":
            raise ValueError(
                f"model.blur.max_sigma={self.blur.max_sigma} needs model.prediction='x0' (got {self.prediction!r}): "
                "the blurred process's sampler steps from the clean-picture prediction"
            )
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"model.loss_weighting={self.loss_weighting!r}; expected one of {LOSS_WEIGHTINGS}")
        if not self.foreground_weight >= 0:
            raise ValueError(f"model.foreground_weight={self.foreground_weight} must be 0 (off) or positive")
        if not 0 < self.foreground_max_t <= 1:
            raise ValueError(f"model.foreground_max_t={self.foreground_max_t} must be in (0, 1]")
        if not self.mean_error_weight > 0:
            raise ValueError(f"model.mean_error_weight={self.mean_error_weight} must be positive (1 = plain error)")
        if self.sigma_data <= 0:
            raise ValueError(f"model.sigma_data={self.sigma_data} must be positive")
        if self.position_scheme not in POSITION_SCHEMES:
            raise ValueError(f"model.position_scheme={self.position_scheme!r}; expected one of {POSITION_SCHEMES}")
        g = self.generator
        latent_c = self.latent_channels
        if g.in_channels != latent_c * g.patch_size**2:
            raise ValueError(
                f"model.generator in_channels={g.in_channels} must equal the autoencoder's {latent_c} latent "
                f"channels x patch {g.patch_size}^2 = {latent_c * g.patch_size**2}"
            )
        if g.out_features != g.in_channels:
            raise ValueError(
                f"model.generator: out features {g.out_features} != in_channels {g.in_channels}; "
                "the velocity must have the latent tokens' width"
            )
        if self.connector.in_dim != self.vlm.text.hidden_size:
            raise ValueError(
                f"model.connector.in_dim={self.connector.in_dim} != VLM hidden size {self.vlm.text.hidden_size}"
            )
        if self.connector.out_dim != g.joint_attention_dim:
            raise ValueError(
                f"model.connector.out_dim={self.connector.out_dim} != generator joint_attention_dim "
                f"{g.joint_attention_dim}"
            )

    @property
    def latent_channels(self) -> int:
        v = self.vae
        return v.latent_channels if hasattr(v, "latent_channels") else v.z_dim

    @property
    def downsample(self) -> int:
        """Pixels per image token side: autoencoder factor x DiT patch."""
        return self.vae.downsample_factor * self.generator.patch_size

    @property
    def lora_scales(self) -> dict[str, float]:
        return {"vlm": self.lora_vlm.scale, self.generator_key: self.lora_dit.scale}

    def replace(self, **changes) -> KontextConfig:
        return dataclasses.replace(self, **changes)


class QueryKontext:
    """The model's forward pieces over a parameter dict (see the module docstring).

    Batch fields used (all arrays; built by `model_inputs.prepare_batch`):
      input_ids (B, T), attention_mask (B, T), position_ids (3, B, T + K) (prompt + queries),
      cond_index (B, W + K) (the packed condition stream's positions in [prompt ; queries], -1 = none),
      pixel_values (B * n, P, D) + vision_plan of one image (the batched vision layout;
      flat (N, D) + a plan of all images when a batch mixes grids; absent without input images),
      target (B, H, W, 3) in [-1, 1], cond_images (B, n, H, W, 3) (stage 3),
      img_ids (B, N_target + n * N_cond, 3), task_id (B,), valid (B,).
    """

    def __init__(self, config: KontextConfig):
        self.config = config
        self.vlm = Qwen25VL(config.vlm, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))
        self.connector = Connector(config.connector)
        self.generator = MMDiT(config.generator)
        self.vae = (
            PixelSpaceAutoencoder(config.vae) if isinstance(config.vae, PixelSpaceConfig) else build_vae(config.vae)
        )

    # ------------------------------------------------------------------ parameters

    def init(self, rng: Array) -> dict[str, Any]:
        """Boxed parameters (logical axes on every leaf) of the whole model, LoRA included."""
        c = self.config
        k_vlm, k_q, k_conn, k_gen, k_vae, k_lora = jax.random.split(rng, 6)
        params = {"vlm": init_vlm_params(self.vlm, k_vlm)}
        params["queries"] = {
            "embedding": nn.LogicallyPartitioned(
                0.02 * jax.random.normal(k_q, (c.num_queries, c.vlm.text.hidden_size), jnp.float32),
                ("queries", "embed"),
            )
        }
        params["connector"] = self.connector.init(
            k_conn, jnp.zeros((1, 2, c.connector.in_dim)), jnp.ones((1, 2), bool)
        )["params"]
        params[c.generator_key] = init_mmdit_params(c.generator, k_gen)
        if c.generator_init == "adaln_zero":
            params[c.generator_key] = adaln_zero(params[c.generator_key])
        if not isinstance(c.vae, PixelSpaceConfig):
            size = max(16, c.vae.downsample_factor)
            params["vae"] = self.vae.init(k_vae, jnp.zeros((1, size, size, 3)))["params"]
        lora = {}
        if c.lora_vlm.enabled:
            lora["vlm"] = boxed_lora(k_lora, params["vlm"], c.lora_vlm, "vlm")
        if c.lora_dit.enabled:
            lora[c.generator_key] = boxed_lora(
                jax.random.fold_in(k_lora, 1), params[c.generator_key], c.lora_dit, c.generator_key
            )
        if lora:
            params["lora"] = lora
        return params

    def variables(self, params: Mapping[str, Any], key: str) -> dict[str, Any]:
        """Flax variables of one sub-model: its params and, when present, its LoRA factors."""
        variables = {"params": params[key]}
        adapters = params.get("lora", {}).get(key)
        if adapters:
            variables[LORA_COLLECTION] = lora_collection(adapters, self.config.lora_scales[key])
        return variables

    # ------------------------------------------------------------------ conditioning

    def condition(self, params: Mapping[str, Any], batch: Mapping[str, Array]) -> tuple[Array, Array, Array]:
        """The VLM + connector: (cond tokens (B, W+K, D_cond), cond mask (B, W+K) bool, kontext (B, K, D_vlm)).

        The K kontext queries are appended after the (left-padded) prompt; with causal
        attention they read the whole prompt, images included. The prompt's hidden states
        form the text stream and the queries' the kontext tokens; `cond_index` packs them
        (each row's prompt tokens after the shared template prefix, then its queries, then
        padding) and both go through the connector.
        """
        c = self.config
        ids = batch["input_ids"]
        b, t = ids.shape
        vlm_vars = self.variables(params, "vlm")
        pixel_values = batch.get("pixel_values")
        # Batched layout: row b's image tokens are those of its own n images (prepare_batch checks it).
        rows_own = pixel_values is not None and pixel_values.ndim == 3
        embeds = self.vlm.apply(vlm_vars, ids, pixel_values, batch.get("vision_plan"), rows_own, method=Qwen25VL.embed)
        queries = jnp.broadcast_to(
            params["queries"]["embedding"].astype(embeds.dtype)[None], (b, c.num_queries, embeds.shape[-1])
        )
        mask = jnp.concatenate([batch["attention_mask"].astype(bool), jnp.ones((b, c.num_queries), bool)], axis=1)
        hidden = self.vlm.apply(
            vlm_vars,
            jnp.concatenate([embeds, queries], axis=1),
            batch["position_ids"],
            mask.astype(jnp.int32),
            method=Qwen25VL.decode,
        )
        index = batch["cond_index"]
        stream = jnp.take_along_axis(hidden, jnp.maximum(index, 0)[..., None], axis=1)
        cond_mask = index >= 0
        cond = self.connector.apply({"params": params["connector"]}, stream, cond_mask)
        return cond, cond_mask, hidden[:, t:]

    @staticmethod
    def drop_conditions(rng: Array, cond_mask: Array, is_text: Array, dropout: CondDropout) -> tuple[Array, Array]:
        """Per-sample condition dropout (see `CondDropout`): (new cond mask, drop_images (B,)).
        `is_text` (B, W+K): which condition tokens are the prompt's (the others: kontext)."""
        k_case, k_t, k_k = jax.random.split(rng, 3)
        b = cond_mask.shape[0]
        u = jax.random.uniform(k_case, (b,))
        uncond = u < dropout.uncond
        no_text = (u >= dropout.uncond) & (u < dropout.uncond + dropout.no_text)
        no_images = (u >= dropout.uncond + dropout.no_text) & (u < dropout.uncond + dropout.no_text + dropout.no_images)
        drop_t = uncond | no_text | jax.random.bernoulli(k_t, dropout.text, (b,))
        drop_k = uncond | no_text | jax.random.bernoulli(k_k, dropout.kontext, (b,))
        keep = jnp.where(is_text, ~drop_t[:, None], ~drop_k[:, None])
        return cond_mask & keep, uncond | no_images

    # ------------------------------------------------------------------ latents

    def encode(self, params: Mapping[str, Any], images: Array, rng: Array | None = None) -> Array:
        """(B, H, W, 3) in [-1, 1] -> DiT tokens (B, H*W / downsample^2, C_in), normalised latents."""
        variables = {"params": params["vae"]} if "vae" in params else {}
        latents = self.vae.apply(variables, images, rng is not None, rng, method="encode")
        return patchify(latents, self.config.generator.patch_size)

    def decode(self, params: Mapping[str, Any], tokens: Array, height: int, width: int) -> Array:
        """DiT tokens (B, N, C_in) of an (height, width) image -> images (B, H, W, 3) in [-1, 1]."""
        f = self.config.vae.downsample_factor
        latents = unpatchify(tokens, height // f, width // f, self.config.generator.patch_size)
        variables = {"params": params["vae"]} if "vae" in params else {}
        return self.vae.apply(variables, latents, method="decode")

    def degrade(self, params: Mapping[str, Any], tokens: Array, t: Array, height: int, width: int) -> Array:
        """B_t of the blurring process (qk_jax/models/blur.py) on DiT tokens (B, N, C) of (height, width)
        pictures, t (B,): the picture itself blurred for the pixel autoencoder (a linear, lossless
        code), else each latent channel on the latent grid. The identity when blur is off."""
        c = self.config
        if not c.blur.enabled:
            return tokens
        if isinstance(c.vae, PixelSpaceConfig):
            images = self.decode(params, tokens, height, width)
            return self.encode(params, blur_lib.blur_grid(images, t, c.blur))
        f = c.vae.downsample_factor
        latents = unpatchify(tokens, height // f, width // f, c.generator.patch_size)
        return patchify(blur_lib.blur_grid(latents, t, c.blur, pixel=f), c.generator.patch_size)

    def degrader(self, params: Mapping[str, Any], height: int, width: int):
        """`degrade(tokens, s)` at a scalar noise level s for the samplers (`flow_solvers.euler_sample`),
        or None when blur is off (the plain Euler step)."""
        if not self.config.blur.enabled:
            return None
        return lambda tokens, s: self.degrade(params, tokens, jnp.full((tokens.shape[0],), s), height, width)

    def noised(self, params: Mapping[str, Any], x0: Array, noise: Array, t: Array, height: int, width: int) -> Array:
        """x_t = (1 - t) B_t x0 + t eps for target tokens x0 (B, N, C), t (B,)."""
        return flow.noise_latents(self.degrade(params, x0, t, height, width), noise, t)

    # ------------------------------------------------------------------ denoising

    def velocity(
        self,
        params: Mapping[str, Any],
        x_target: Array,
        cond_tokens: Array | None,
        img_ids: Array,
        cond: Array,
        cond_mask: Array,
        t: Array,
    ) -> Array:
        """The DiT on [noisy target ; condition segments]: velocity on the target tokens (B, N_t, C)
        (converted from the clean-latent prediction when `prediction="x0"`)."""
        c = self.config
        img = x_target if cond_tokens is None else jnp.concatenate([x_target, cond_tokens], axis=1)
        b = x_target.shape[0]
        kwargs = {}
        if c.generator.guidance_embeds:
            kwargs["guidance"] = jnp.full((b,), c.guidance_scale, jnp.float32)
        if c.generator.pooled_projection_dim:
            kwargs["pooled"] = pooled_condition(cond, cond_mask, c.generator.pooled_projection_dim)
        out = self.generator.apply(
            self.variables(params, c.generator_key),
            img,
            img_ids,
            cond,
            cond_mask,
            t,
            num_target_tokens=x_target.shape[1],
            **kwargs,
        )
        if c.prediction == "x0":
            t_b = jnp.maximum(t.astype(jnp.float32), c.min_t)[:, None, None]
            return (x_target.astype(jnp.float32) - out.astype(jnp.float32)) / t_b
        if c.prediction == "preconditioned":
            return preconditioned_velocity(x_target, out, t, c.sigma_data)
        return out

    # ------------------------------------------------------------------ training loss

    def loss(
        self, params: Mapping[str, Any], batch: Mapping[str, Array], rng: Array, train: bool = True
    ) -> tuple[Array, dict[str, Array]]:
        """Rectified-flow loss on the target tokens.

        Returns (scalar loss over valid samples, aux) where aux holds the per-sample loss
        (B,) and the drawn timesteps (B,), for per-task logging.
        """
        c = self.config
        k_drop, k_time, k_noise = jax.random.split(rng, 3)
        cond, cond_mask, _ = self.condition(params, batch)
        drop_img = None
        if train:
            is_text = batch["cond_index"] < batch["input_ids"].shape[1]
            cond_mask, drop_img = self.drop_conditions(k_drop, cond_mask, is_text, c.dropout)
        return self.denoising_loss(params, batch, cond, cond_mask, drop_img, k_time, k_noise)

    def denoising_loss(
        self,
        params: Mapping[str, Any],
        batch: Mapping[str, Array],
        cond: Array,
        cond_mask: Array,
        drop_img: Array | None,
        k_time: Array,
        k_noise: Array,
    ) -> tuple[Array, dict[str, Array]]:
        """`loss` from the condition tokens on: cond (B, T, D_cond) and cond_mask (B, T) (after
        dropout), drop_img (B,) bool or None (input images' latents zeroed), the timestep and noise
        keys. Batch fields used: target, img_ids, cond_images (stage 3), valid."""
        c = self.config
        x0 = self.encode(params, batch["target"])
        cond_tokens = None
        if c.low_level and "cond_images" in batch and batch["cond_images"].shape[1]:
            cond_tokens = self.encode_conditions(params, batch["cond_images"])
            if drop_img is not None:
                cond_tokens = jnp.where(drop_img[:, None, None], 0.0, cond_tokens)
        t = flow.sample_timesteps(k_time, x0.shape[0], c.timesteps, image_seq_len=x0.shape[1])
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        xt = self.noised(params, x0, noise, t, *batch["target"].shape[1:3])
        v = self.velocity(params, xt, cond_tokens, batch["img_ids"], cond, cond_mask, t)
        if c.blur.enabled:  # (x_t - x0) / t: the error is the clean-picture error / t, as unblurred
            target = (xt.astype(jnp.float32) - x0.astype(jnp.float32)) / jnp.maximum(t, c.min_t)[:, None, None]
        else:
            target = flow.velocity_target(x0, noise)
        error = v.astype(jnp.float32) - target
        if c.mean_error_weight != 1.0:
            error = reweight_mean_error(error, c.mean_error_weight)
        per_token = jnp.mean(jnp.square(error), axis=2)
        if c.foreground_weight:
            w = foreground_token_weights(batch["target"], c.downsample, c.foreground_weight)
            w = jnp.where(t[:, None] <= c.foreground_max_t, w, 1.0)
            per_sample = jnp.sum(per_token * w, axis=1) / jnp.sum(w, axis=1)
        else:
            per_sample = jnp.mean(per_token, axis=1)
        if c.loss_weighting == "x0":
            per_sample = per_sample * jnp.square(jnp.maximum(t, c.min_t))
        valid = batch["valid"].astype(jnp.float32) if "valid" in batch else jnp.ones_like(per_sample)
        loss = jnp.sum(per_sample * valid) / jnp.maximum(jnp.sum(valid), 1.0)
        return loss, {"per_sample": per_sample, "t": t}

    def encode_conditions(self, params: Mapping[str, Any], images: Array) -> Array:
        """(B, n, H, W, 3) input images -> (B, n * N, C) tokens, segment after segment."""
        b, n = images.shape[:2]
        tokens = self.encode(params, images.reshape((b * n,) + images.shape[2:]))
        return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2])


def adaln_zero(boxed_params: Any) -> Any:
    """Generator parameters (boxed) with the `ADALN_ZERO_PARAMS` zeroed, their boxes kept."""

    def zero(path, leaf):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if not any(name.startswith(p) for p in ADALN_ZERO_PARAMS):
            return leaf
        return leaf.replace_boxed(jnp.zeros_like(leaf.unbox())) if isinstance(leaf, nn.meta.AxisMetadata) else 0 * leaf

    return jax.tree_util.tree_map_with_path(zero, boxed_params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def reweight_mean_error(error: Array, weight: float) -> Array:
    """(B, N, C) errors -> the same with their mean over the N tokens (per sample and channel)
    scaled by sqrt(weight): the mean of the squares then weights that mean's square by `weight`
    and leaves the deviations from it as they were (the cross term sums to 0 over the tokens)."""
    mean = jnp.mean(error, axis=1, keepdims=True)
    return error + (jnp.sqrt(weight) - 1.0) * mean


def foreground_token_weights(images: Array, block: int, weight: float, threshold: float = 0.1) -> Array:
    """(B, H, W, 3) targets in [-1, 1] -> (B, H/block * W/block) loss weights of their tokens
    (row-major, as `patchify`): 1 + weight x the share of the token's block x block pixels that
    differ from the image's background colour (its per-channel median: the colour of most pixels
    of a plain background) by more than `threshold` in some channel."""
    b, h, w, _ = images.shape
    images = images.astype(jnp.float32)
    background = jnp.median(images.reshape(b, h * w, -1), axis=1)
    foreground = jnp.max(jnp.abs(images - background[:, None, None]), axis=-1) > threshold
    share = foreground.reshape(b, h // block, block, w // block, block).mean(axis=(2, 4), dtype=jnp.float32)
    return 1.0 + weight * share.reshape(b, -1)


def preconditioning(t: Array, sigma_data: float) -> tuple[Array, Array]:
    """(c_skip, c_out), each shaped like t: EDM's scales for x_t = (1 - t) x0 + t eps."""
    t = t.astype(jnp.float32)
    a, s2 = 1.0 - t, sigma_data**2
    denom = a * a * s2 + t * t
    return a * s2 / denom, t * sigma_data / jnp.sqrt(denom)


def preconditioned_velocity(x_t: Array, out: Array, t: Array, sigma_data: float) -> Array:
    """The velocity (x_t - x0) / t of x0 = c_skip x_t + c_out F (see `preconditioning`).

    With a = 1 - t and d = a^2 s^2 + t^2: (1 - c_skip) / t = (t - a s^2) / d and
    c_out / t = s / sqrt(d), so v = ((t - a s^2) / d) x_t - (s / sqrt(d)) F is finite at t = 0
    (no clipping of t is needed). Shapes: x_t, out (B, N, C); t (B,).
    """
    t = t.astype(jnp.float32)[:, None, None]
    a, s2 = 1.0 - t, sigma_data**2
    denom = a * a * s2 + t * t
    return (t - a * s2) / denom * x_t.astype(jnp.float32) - sigma_data / jnp.sqrt(denom) * out.astype(jnp.float32)


def pooled_condition(cond: Array, cond_mask: Array, dim: int) -> Array:
    """A pooled vector for generators that take one (FLUX): the masked mean of the condition
    tokens, truncated or zero-padded to `dim`. (FLUX's CLIP vector has no counterpart in
    Query-Kontext; the mean of the condition stream is the closest stand-in.)"""
    m = cond_mask.astype(cond.dtype)[..., None]
    mean = jnp.sum(cond * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    d = mean.shape[-1]
    return mean[:, :dim] if d >= dim else jnp.pad(mean, ((0, 0), (0, dim - d)))


def boxed_lora(rng: Array, boxed_params: Any, cfg: LoraConfig, top_key: str) -> dict[str, Any]:
    """LoRA adapters for `boxed_params` (a boxed sub-model tree), boxed with logical axes
    derived from each base kernel: a (..., in, r) keeps the kernel's input axis, b
    (..., r, out) its output axis, so adapters shard like the weights they adapt; the rank
    axis is `lora_rank`, which takes `fsdp` where the kept axis does not (a pure-FSDP mesh
    would otherwise replicate every factor whose weight is FSDP-sharded on the other axis)."""
    from qk_jax.models.lora import init_lora
    from qk_jax.tree import flatten_tree, unflatten_tree

    unboxed = nn.meta.unbox(boxed_params)
    names = {p: (v.names if isinstance(v, nn.Partitioned) else None) for p, v in flatten_tree(boxed_params).items()}
    plain = init_lora(rng, unboxed, cfg.targets, cfg.rank)
    out = {}
    for path, value in flatten_tree(plain).items():
        kernel_path, which = path.rsplit("/", 1)
        base = names.get(kernel_path)
        if base is None:
            out[path] = value
            continue
        axes = tuple(base[:-1]) + ("lora_rank",) if which == "a" else tuple(base[:-2]) + ("lora_rank", base[-1])
        out[path] = nn.LogicallyPartitioned(value, axes)
    return unflatten_tree(out)
