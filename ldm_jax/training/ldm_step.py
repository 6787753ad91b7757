"""The latent-diffusion train step (Rombach et al. 2022, arXiv:2112.10752, Eq. 2):

    L_LDM = E_{E(x), y, eps ~ N(0,1), t} || eps - eps_theta(z_t, t, tau(y)) ||^2

with z = E(x) * scale_factor from the frozen first stage (a posterior sample for KL
autoencoders, the pre-quantisation latents for VQ ones, as CompVis
``get_first_stage_encoding``), tau the text encoder (or a class-label table in the
U-Net), and eps / v / x0 targets, min-SNR weights and offset noise from
``ldm_jax.diffusion.losses``. tau is frozen (Stable Diffusion) or, with
``LDMStepConfig.train_text_encoder``, optimised jointly with the U-Net as in the
paper's conditional LDMs (Sec. 3.3, Eq. 3: "both tau_theta and eps_theta are jointly
optimized"); the trained parameters are then ``{"unet": ..., "text_encoder": ...}``.
With ``LDMStepConfig.concat`` the U-Net sees ``[z_t, c]``, c concatenated on the channel axis
(super-resolution: the low-res image; inpainting: the mask and the masked image's latents;
semantic synthesis: a trained SpatialRescaler of the one-hot label map, its parameters then
``params["cond_stage"]`` next to ``params["unet"]``; see ``concat_conditioning.py``), in Eq. 2's
eps_theta(z_t, t, ...) next to tau(y). ``LDMStepConfig.loss_type`` "l1" replaces the squared error
by the absolute error (CompVis ``loss_type: l1`` of the semantic-synthesis and layout models);
``l_simple_weight`` / ``original_elbo_weight`` / ``logvar_init`` / ``v_posterior`` add the other terms of
CompVis ``LatentDiffusion.p_losses`` (``losses.ldm_objective``), ``input_perturbation`` diffusers' option.
Layout-to-image is text conditioning to the step: its ``"input_ids"`` are the layout's token ids
(``ldm_jax.data.layout_tokens``) into a trained LDMBert.

``make_train_step(...)`` returns a pure function ``train_step(state, batch, frozen) ->
(state, metrics)``:

* ``batch``: ``"image"`` uint8 (B, H, W, 3) or float in [-1, 1]; or ``"latents"``
  (B, h, w, c) precomputed, *unscaled* first-stage latents (scaled here), with
  ``"latents_std"`` when they are a KL posterior's mean and std (a sample is drawn here
  with the eps the image path would draw). Text models
  also take ``"input_ids"`` (B, L) int32, class-conditional ones ``"label"`` (B,) int32.
  Concat-conditioned models (``LDMStepConfig.concat``, ``concat_conditioning.py``): super-
  resolution builds its ``"low_res"`` (B, h, w, 3) from ``"image"`` unless the batch carries it
  (precomputed latents, or degraded low-res images); inpainting needs ``"image"`` and draws a
  mask per example unless the batch carries ``"inpaint_mask"`` (B, H, W, 1) of 0/1; semantic
  synthesis needs ``"segmentation"`` int32 (B, H, W) class indices at the image size (-1: ignored).
* ``frozen``: ``{"vae": params | None, "text_encoder": params | None,
  "scale_factor": () float32, "empty_ids": (1, L) int32 | None}``.

All randomness is drawn for the whole global batch from ``fold_in(state.rng, state.step)``
before the batch is split into micro-batches, so the result does not depend on the
sharding nor (with U-Net dropout 0) on ``grad_accum_steps``.

``jit_train_step`` wraps it with explicit in/out shardings and ``donate_argnums=(0,)``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from ldm_jax.diffusion.losses import (
    LOSS_TYPES, check_prediction_type, ldm_objective, lvlb_weights, min_snr_weights, per_example_loss,
    prediction_target, sample_training_inputs,
)
from ldm_jax.diffusion.schedule import NoiseSchedule, add_noise, snr
from ldm_jax.training import concat_conditioning as concat_lib
from ldm_jax.training.image_range import images_to_float
from ldm_jax.training import optim
from ldm_jax.training import sharding as shd
from ldm_jax.training.state import TrainState

CONDITIONINGS = ("text", "class", "none")
# Streams folded into the step key.
(_POSTERIOR, _COND_DROP, _NOISE, _DROPOUT, _MASK, _MASKED_POSTERIOR, _NOISE_LEVEL, _LOW_RES_NOISE,
 _INPUT_PERTURBATION) = range(9)


@dataclasses.dataclass(frozen=True)
class LDMStepConfig:
    """What the step computes (the optimizer lives in ``OptimizerConfig``)."""

    prediction_type: str = "epsilon"       # "epsilon", "v_prediction" or "sample"
    min_snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting (Hang et al. 2023); None = off
    offset_noise: float = 0.0              # offset-noise strength (diffusers --noise_offset); 0 = off
    conditioning: str = "text"             # "text" (cross-attention on tau(y)), "class" or "none"
    cond_drop_prob: float = 0.1            # P(condition -> empty prompt / null class), for CFG
    null_class: Optional[int] = None       # class id of "no label"; None = num_class_embeds - 1
    sample_posterior: bool = True          # KL first stage: z ~ q(z|x) (CompVis) rather than its mean
    train_text_encoder: bool = False       # optimise tau jointly (params {"unet", "text_encoder"})
    concat: str = "none"                   # channels next to z_t: "none", "low_res" (SR),
                                           # "noise_augmented_low_res" (SD 2 x4 upscaler), "inpainting"
    masks: concat_lib.MaskConfig = concat_lib.MaskConfig()  # inpainting masks drawn per example
    # concat="noise_augmented_low_res": the low-res image's schedule (diffusers scheduler-config items,
    # a tuple to keep the config hashable) and the levels' bound (levels uniform in [0, max_noise_level)).
    low_res_schedule: tuple = tuple(sorted(concat_lib.LOW_RES_SCHEDULE.items()))
    max_noise_level: int = concat_lib.MAX_NOISE_LEVEL
    loss_type: str = "l2"                  # "l2" (squared error) or "l1" (CompVis loss_type: l1)
    # diffusers --input_perturbation (Ning et al. 2023, arXiv:2301.11706): z_t is built from
    # noise + input_perturbation * N(0, 1) while the target keeps the noise; 0 = off.
    input_perturbation: float = 0.0
    # CompVis LatentDiffusion.p_losses terms (ldm_objective): loss = l_simple_weight * mean(L / exp(logvar)
    # + logvar) + original_elbo_weight * mean(lvlb_weights[t] * L), logvar fixed at logvar_init; v_posterior
    # enters the eps lvlb weights through the posterior variance. Defaults: the plain mean (the zoo's).
    l_simple_weight: float = 1.0
    original_elbo_weight: float = 0.0
    logvar_init: float = 0.0
    v_posterior: float = 0.0

    def __post_init__(self):
        check_prediction_type(self.prediction_type)
        for name in ("input_perturbation", "l_simple_weight", "original_elbo_weight", "logvar_init", "v_posterior"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"LDMStepConfig.{name} must be a finite number, got {value!r}")
        if self.input_perturbation < 0 or self.original_elbo_weight < 0:
            raise ValueError("LDMStepConfig.input_perturbation and original_elbo_weight must be >= 0, got "
                             f"{self.input_perturbation} and {self.original_elbo_weight}")
        if not 0.0 <= self.v_posterior <= 1.0:
            raise ValueError(f"LDMStepConfig.v_posterior must be in [0, 1] (CompVis: sigma^2 = (1 - v) beta~ + v beta), "
                             f"got {self.v_posterior}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"LDMStepConfig.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        concat_lib.num_concat_channels(self.concat, 0)  # validates the name
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"LDMStepConfig.conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        if self.train_text_encoder and self.conditioning != "text":
            raise ValueError("LDMStepConfig.train_text_encoder needs conditioning='text', "
                             f"got {self.conditioning!r}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"LDMStepConfig.cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if self.concat == concat_lib.NOISE_AUGMENTED:
            if self.conditioning == "class":
                raise ValueError(f"concat={self.concat!r} gives the noise level as the U-Net's class label; "
                                 "conditioning='class' cannot use it too")
            steps = int(dict(self.low_res_schedule)["num_train_timesteps"])
            if not 1 <= int(self.max_noise_level) <= steps:
                raise ValueError(f"max_noise_level must be in [1, {steps}] (the low-res schedule's steps), got "
                                 f"{self.max_noise_level}")


def first_stage_latents(vae: nn.Module, vae_params, image_bhwc: jax.Array, eps_bhwc: Optional[jax.Array]):
    """Unscaled first-stage latents z of images: mean + std * eps (KL; eps None: the mean),
    or the pre-quantisation latents (VQ: the LDM works before the quantiser,
    which is absorbed into the decoder). Gradient-free."""
    enc = vae.apply({"params": vae_params}, images_to_float(image_bhwc), method="encode")
    if hasattr(enc, "logvar"):  # DiagonalGaussianDistribution
        z = enc.mean if eps_bhwc is None else enc.mean + enc.std * eps_bhwc.astype(enc.mean.dtype)
    else:  # VQEncoding
        z = enc.pre_quant
    return jax.lax.stop_gradient(z.astype(jnp.float32))


def trains_cond_stage(cfg: "LDMStepConfig") -> bool:
    """Whether the trained parameters include a cond stage (``params["cond_stage"]``: segmentation)."""
    return cfg.concat == "segmentation"


def split_trained_params(params, train_text_encoder: bool, train_cond_stage: bool = False):
    """(U-Net params, text-encoder params or None) of the trained parameter tree: the U-Net's alone,
    or ``{"unet"[, "text_encoder"][, "cond_stage"]}`` when more than the U-Net is trained."""
    if train_text_encoder or train_cond_stage:
        return params["unet"], params.get("text_encoder")
    return params, None


def posterior_sample(mean: jax.Array, std: jax.Array, key: jax.Array) -> jax.Array:
    """z = mean + std * eps, eps = normal(key): a KL posterior sample from precomputed (mean, std)."""
    return mean.astype(jnp.float32) + std.astype(jnp.float32) * jax.random.normal(key, mean.shape, jnp.float32)


def latent_shape(vae: Optional[nn.Module], batch) -> tuple:
    """(B, h, w, c) of the latents of ``batch`` (from "latents", or "image" and the VAE config)."""
    if "latents" in batch:
        return tuple(batch["latents"].shape)
    if vae is None:
        raise ValueError("batch has no 'latents' and no first-stage model was given to encode 'image'")
    b, h, w, _ = batch["image"].shape
    f = vae.config.downsample_factor
    if h % f or w % f:
        raise ValueError(f"image size {h}x{w} is not divisible by the first-stage factor {f}")
    return (b, h // f, w // f, vae.config.embed_dim)


def make_train_step(
    unet: nn.Module,
    schedule: NoiseSchedule,
    tx: optax.GradientTransformation,
    step_cfg: LDMStepConfig,
    opt_cfg: optim.OptimizerConfig,
    *,
    vae: Optional[nn.Module] = None,
    text_encoder: Optional[nn.Module] = None,
    mesh: Optional[Mesh] = None,
    cond_stage: Optional[nn.Module] = None,
) -> Callable[[TrainState, Any, Any], tuple]:
    """The pure LDM step for these (static) modules and settings; see the module docstring.
    ``cond_stage``: the SpatialRescaler of ``concat="segmentation"`` (its parameters are trained)."""
    cfg = step_cfg
    k_accum = opt_cfg.grad_accum_steps
    lr_fn = optim.learning_rate_schedule(opt_cfg)
    use_text = cfg.conditioning == "text"
    use_class = cfg.conditioning == "class"
    if use_text and text_encoder is None:
        raise ValueError("conditioning='text' needs a text encoder")
    if use_class:
        n_cls = unet.config.num_class_embeds
        if n_cls is None:
            raise ValueError("conditioning='class' needs a U-Net with num_class_embeds")
        null_class = n_cls - 1 if cfg.null_class is None else int(cfg.null_class)
    noise_augmented = cfg.concat == concat_lib.NOISE_AUGMENTED
    if noise_augmented:
        n_cls = unet.config.num_class_embeds
        if n_cls is None or n_cls < cfg.max_noise_level:
            raise ValueError(f"concat={cfg.concat!r}: the noise level (0 .. {cfg.max_noise_level - 1}) is the U-Net's "
                             f"class label, so model.unet.num_class_embeds must be >= max_noise_level="
                             f"{cfg.max_noise_level}, got {n_cls}")
        low_res_schedule = NoiseSchedule.from_diffusers_config(dict(cfg.low_res_schedule))
    vlb_table = None
    if cfg.original_elbo_weight:
        vlb_table = lvlb_weights(schedule, cfg.prediction_type, cfg.v_posterior)
        if not np.all(np.isfinite(vlb_table)):
            bad = np.flatnonzero(~np.isfinite(vlb_table)).tolist()
            raise ValueError(f"original_elbo_weight={cfg.original_elbo_weight}: the {cfg.prediction_type} lvlb weights "
                             f"are not finite at timesteps {bad[:5]} of this schedule (e.g. abar_t = 0 of a zero-"
                             "terminal-SNR schedule); set original_elbo_weight=0 or change the schedule")
        vlb_table = jnp.asarray(vlb_table)
    train_cond_stage = trains_cond_stage(cfg)
    if train_cond_stage and cond_stage is None:
        raise ValueError("concat='segmentation' needs the cond stage module (a SpatialRescaler)")

    def concat_condition(mb, frozen, cs_params):
        """The channels concatenated to z_t (LDM Sec. 3.3; SR Sec. 4.4, inpainting Sec. 4.5), or None.
        The same for CFG-dropped examples: only the text / class condition is dropped."""
        if cfg.concat in concat_lib.LOW_RES_CONCATS:
            if "low_res" in mb:
                low_res = images_to_float(mb["low_res"])
            else:
                low_res = concat_lib.low_res_condition(mb["image"], vae.config.downsample_factor)
            if noise_augmented:  # Ho et al. 2021 Sec. 4.1: noised at the example's level
                low_res = concat_lib.noise_augment(low_res, mb["low_res_noise"], mb["noise_level"], low_res_schedule)
            return low_res
        if cfg.concat == "segmentation":  # trained: gradients flow into the rescaler's channel mapper
            return concat_lib.segmentation_condition(cond_stage, cs_params, mb["segmentation"])
        if cfg.concat == "inpainting":
            return concat_lib.inpainting_condition(vae, frozen["vae"], mb["image"], mb["inpaint_mask"],
                                                   mb.get("masked_eps"), frozen["scale_factor"])
        return None

    def loss_fn(params, mb, index, frozen, dropout_key):
        unet_params, te_params = split_trained_params(params, cfg.train_text_encoder, train_cond_stage)
        # Frozen first stage (Sec. 3.1): z = E(x) * scale_factor.
        if "latents" in mb:
            z = mb["latents"].astype(jnp.float32)
        else:
            z = first_stage_latents(vae, frozen["vae"], mb["image"], mb.get("eps"))
        x0 = z * frozen["scale_factor"]

        context = labels = None
        if use_text:
            # Classifier-free guidance training (Ho & Salimans 2022, Sec. 3.2): dropped
            # examples see the empty prompt's ids.
            ids = jnp.where(mb["drop"][:, None], frozen["empty_ids"], mb["input_ids"])
            if te_params is not None:
                context = text_encoder.apply({"params": te_params}, ids.astype(jnp.int32))
            else:
                context = jax.lax.stop_gradient(
                    text_encoder.apply({"params": frozen["text_encoder"]}, ids.astype(jnp.int32)))
        elif use_class:
            labels = jnp.where(mb["drop"], null_class, mb["label"]).astype(jnp.int32)
        if noise_augmented:  # the level is the label (hybrid-adm), also for CFG-dropped examples
            labels = mb["noise_level"].astype(jnp.int32)

        # Forward process q(z_t | z_0) (Ho et al. 2020 Eq. 4) and the regression target.
        # (input perturbation: z_t from the perturbed noise, the target from the noise, as diffusers)
        x_t = add_noise(schedule, x0, mb["input_noise"] if "input_noise" in mb else mb["noise"], mb["t"])
        target = prediction_target(schedule, x0, mb["noise"], mb["t"], cfg.prediction_type)
        cond = concat_condition(mb, frozen, params["cond_stage"] if train_cond_stage else None)
        if cond is not None:  # U-Net input [z_t, c] on the channel axis (CompVis DiffusionWrapper "concat")
            x_t = jnp.concatenate([x_t, cond.astype(x_t.dtype)], axis=-1)
        out = unet.apply({"params": unet_params}, x_t.astype(unet.dtype), mb["t"], context, labels, train=True,
                         rngs={"dropout": jax.random.fold_in(dropout_key, index)})
        weights = None
        if cfg.min_snr_gamma is not None:
            weights = min_snr_weights(snr(schedule, mb["t"]), float(cfg.min_snr_gamma), cfg.prediction_type)
        loss = ldm_objective(per_example_loss(out, target, cfg.loss_type), mb["t"], weights,
                             l_simple_weight=cfg.l_simple_weight, logvar_init=cfg.logvar_init,
                             original_elbo_weight=cfg.original_elbo_weight, lvlb_weights_t=vlb_table)
        return loss, {"latent_std": jnp.std(x0)}

    def check_concat_inputs(batch, shape):
        """Trace-time checks of the batch against the U-Net's input channels and ``cfg.concat``."""
        latent_channels = shape[-1]
        concat_lib.check_unet_in_channels(unet.config.in_channels, latent_channels, cfg.concat,
                                          cond_stage.features if cond_stage is not None else None)
        if cfg.concat == "inpainting":
            if "image" not in batch or vae is None:
                raise ValueError("concat='inpainting' needs the batch's 'image' and the first stage: the masked image "
                                 "is encoded every step (precomputed latents cannot be used)")
        elif (cfg.concat in concat_lib.LOW_RES_CONCATS and "low_res" not in batch
              and ("image" not in batch or vae is None)):
            raise ValueError(f"concat={cfg.concat!r} needs 'image' (and the first stage, for its factor) or a "
                             "'low_res' (B, h, w, 3) entry in the batch")
        if cfg.concat == "segmentation":
            seg = batch.get("segmentation")
            if seg is None or seg.ndim != 3 or not jnp.issubdtype(seg.dtype, jnp.integer):
                raise ValueError("concat='segmentation' needs a 'segmentation' entry in the batch: integer class "
                                 f"indices (B, H, W) at the image size, got {None if seg is None else seg.shape}")
            out_hw = cond_stage.output_size(*seg.shape[1:3])
            if tuple(out_hw) != tuple(shape[1:3]):
                raise ValueError(f"the {seg.shape[1]}x{seg.shape[2]} label maps become {out_hw[0]}x{out_hw[1]} through "
                                 f"the SpatialRescaler ({cond_stage.n_stages} x {cond_stage.multiplier}), but the "
                                 f"latents are {shape[1]}x{shape[2]}: set model.cond_stage.n_stages to match the "
                                 "first stage's factor")
        if "low_res" in batch and tuple(batch["low_res"].shape) != tuple(shape[:3]) + (3,):
            raise ValueError(f"batch 'low_res' must be (B, h, w, 3) at the latent size {tuple(shape[:3])}, got "
                             f"{tuple(batch['low_res'].shape)}")

    def train_step(state: TrainState, batch, frozen):
        batch = dict(batch)
        key = jax.random.fold_in(state.rng, state.step)
        shape = latent_shape(vae, batch)
        b = shape[0]
        shd.check_batch_size(b, mesh, k_accum)
        check_concat_inputs(batch, shape)

        # Per-example randomness for the whole global batch.
        extra = {}
        t_b, noise = sample_training_inputs(jax.random.fold_in(key, _NOISE), jnp.zeros(shape, jnp.float32),
                                            schedule, cfg.offset_noise)
        extra["t"], extra["noise"] = t_b, noise
        if cfg.input_perturbation:
            extra["input_noise"] = noise + cfg.input_perturbation * jax.random.normal(
                jax.random.fold_in(key, _INPUT_PERTURBATION), shape, jnp.float32)
        if "latents_std" in batch:  # cached KL posterior: the sample the image path would draw
            std = batch.pop("latents_std")
            batch["latents"] = posterior_sample(batch["latents"], std, jax.random.fold_in(key, _POSTERIOR))
        elif "latents" not in batch and cfg.sample_posterior:
            extra["eps"] = jax.random.normal(jax.random.fold_in(key, _POSTERIOR), shape, jnp.float32)
        if use_text or use_class:
            extra["drop"] = jax.random.bernoulli(jax.random.fold_in(key, _COND_DROP), cfg.cond_drop_prob, (b,))
        if cfg.concat == "inpainting":
            if "inpaint_mask" not in batch:
                h, w = batch["image"].shape[1:3]
                extra["inpaint_mask"] = concat_lib.random_masks(jax.random.fold_in(key, _MASK), b, h, w, cfg.masks)
            # The masked image's posterior sample (KL; VQ quantises deterministically).
            extra["masked_eps"] = jax.random.normal(jax.random.fold_in(key, _MASKED_POSTERIOR), shape, jnp.float32)
        if noise_augmented:  # per-example levels and the low-res image's noise, from their own streams
            extra["noise_level"] = jax.random.randint(jax.random.fold_in(key, _NOISE_LEVEL), (b,), 0,
                                                      cfg.max_noise_level)
            extra["low_res_noise"] = jax.random.normal(jax.random.fold_in(key, _LOW_RES_NOISE),
                                                       tuple(shape[:3]) + (3,), jnp.float32)
        if mesh is not None:
            extra = jax.lax.with_sharding_constraint(extra, shd.batch_sharding(mesh))
        batch.update(extra)
        batch = {k: v for k, v in batch.items() if k in _STEP_KEYS}

        def micro_loss(params, mb, index):
            return loss_fn(params, mb, index, frozen, jax.random.fold_in(key, _DROPOUT))

        loss, grads, aux = optim.accumulate_gradients(micro_loss, state.params, batch, k_accum, mesh)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step = state.step + 1
        ema = state.ema_params
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_fn(state.step),
                   "latent_std": aux["latent_std"]}
        if ema is not None:
            decay = optim.ema_decay_at(step, opt_cfg.ema_decay, opt_cfg.ema_warmup)
            ema = optim.update_ema(ema, params, decay)
            metrics["ema_decay"] = decay
        new_state = state.replace(step=step, params=params, opt_state=opt_state, ema_params=ema)
        return new_state, metrics

    return train_step


_STEP_KEYS = ("image", "latents", "input_ids", "label", "t", "noise", "input_noise", "eps", "drop", "low_res",
              "inpaint_mask", "masked_eps", "noise_level", "low_res_noise", "segmentation")


def jit_train_step(train_step: Callable, mesh: Mesh, state_shardings, frozen_shardings):
    """``jax.jit`` with explicit shardings: state in/out in ``state_shardings`` (donated),
    every batch leaf on ``P(("data", "fsdp"))``, metrics replicated."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, shd.batch_sharding(mesh), frozen_shardings),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_latent_std_fn(vae: nn.Module, mesh: Mesh, sample_posterior: bool = True):
    """A jitted ``(vae_params, images, rng) -> std`` of the unscaled latents over the global
    batch: LDM Sec. 4.3 / CompVis ``scale_by_std`` uses scale_factor = 1 / std of the
    first batch's latents (torch's unbiased std)."""
    def fn(vae_params, image_bhwc, rng):
        shape = latent_shape(vae, {"image": image_bhwc})
        eps = jax.random.normal(rng, shape, jnp.float32) if sample_posterior else None
        z = first_stage_latents(vae, vae_params, image_bhwc, eps)
        return jnp.std(z, ddof=1)

    return jax.jit(fn, out_shardings=shd.replicated(mesh))
