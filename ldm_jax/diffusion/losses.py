"""Denoising training objective: eps / v / x0 targets, min-SNR weighting, offset noise, and the
other terms of the original LatentDiffusion.p_losses (l_simple_weight, the lvlb term, a fixed logvar).

Names follow diffusers' ``prediction_type``: "epsilon" (Ho et al. 2020), "v_prediction"
(Salimans & Ho 2022, arXiv:2202.00512) and "sample" (x0). With x_t = alpha x0 + sigma eps,
alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t):
  eps target = eps,  v target = alpha eps - sigma x0,  sample target = x0.
The conversions below (model output -> predicted x0 and eps) are the ones diffusers'
schedulers use; the samplers import them.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.schedule import NoiseSchedule, add_noise, get_velocity, snr

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def predict_x0(model_output, x_t, alpha, sigma, prediction_type: str):
    """x0 implied by a model output at x_t = alpha x0 + sigma eps (alpha, sigma broadcastable).

    epsilon: x0 = (x_t - sigma eps) / alpha   (Ho et al. 2020 Eq. 15)
    v:       x0 = alpha x_t - sigma v          (Salimans & Ho 2022, Sec. 4)
    sample:  x0 = output
    """
    if prediction_type == "epsilon":
        return (x_t - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_t - sigma * model_output
    if prediction_type == "sample":
        return model_output
    check_prediction_type(prediction_type)


def predict_eps(model_output, x_t, alpha, sigma, prediction_type: str):
    """eps implied by a model output (v: eps = alpha v + sigma x_t; sample: (x_t - alpha x0) / sigma)."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha * model_output + sigma * x_t
    if prediction_type == "sample":
        return (x_t - alpha * model_output) / sigma
    check_prediction_type(prediction_type)


def predict_x0_and_eps(model_output, x_t, alpha, sigma, prediction_type: str):
    """(x0, eps) implied by a model output, as diffusers' DDIMScheduler.step computes them."""
    return (predict_x0(model_output, x_t, alpha, sigma, prediction_type),
            predict_eps(model_output, x_t, alpha, sigma, prediction_type))


def prediction_target(schedule: NoiseSchedule, x0, noise, t_b, prediction_type: str):
    """Regression target for ``prediction_type`` at integer timesteps t_b (B,)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return get_velocity(schedule, x0, noise, t_b)
    if prediction_type == "sample":
        return x0
    check_prediction_type(prediction_type)


def min_snr_weights(snr_b: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv:2303.09556, Eq. 12 / Sec. 3.4), as
    diffusers' train_text_to_image.py computes them: min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v_prediction, min(SNR, gamma) for sample.

    At SNR = 0 (the last step of a zero-terminal-SNR schedule) the epsilon weight uses its
    limit 1 instead of diffusers' 0/0 = NaN.
    """
    check_prediction_type(prediction_type)
    clipped = jnp.minimum(snr_b, gamma)
    if prediction_type == "epsilon":
        return jnp.where(snr_b > 0, clipped / jnp.where(snr_b > 0, snr_b, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr_b + 1.0)
    return clipped


LOSS_TYPES = ("l2", "l1")


def per_example_loss(model_output, target, loss_type: str = "l2") -> jax.Array:
    """(B,) float32 squared ("l2") or absolute ("l1") error, mean over the non-batch axes
    (CompVis ``get_loss(..., mean=False).mean([1, 2, 3])``)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    diff = model_output.astype(jnp.float32) - target.astype(jnp.float32)
    err = jnp.square(diff) if loss_type == "l2" else jnp.abs(diff)
    return jnp.mean(err, axis=tuple(range(1, err.ndim)))


def diffusion_loss(model_output, target, weights_b: Optional[jax.Array] = None, loss_type: str = "l2") -> jax.Array:
    """Mean squared error ("l2") or mean absolute error ("l1": CompVis ``loss_type: l1``, used by the
    semantic-synthesis and layout-to-image LDMs) in float32: mean over non-batch axes, times
    per-example weights, mean over batch."""
    per_example_b = per_example_loss(model_output, target, loss_type)
    if weights_b is not None:
        per_example_b = per_example_b * weights_b
    return jnp.mean(per_example_b)


def lvlb_weights(schedule: NoiseSchedule, prediction_type: str, v_posterior: float = 0.0) -> np.ndarray:
    """(T,) float32 weights of the CompVis ``loss_vlb`` term, as ``DDPM.register_schedule`` builds them
    (ldm/models/diffusion/ddpm.py; Ho et al. 2020 Eq. 12 for eps):

      epsilon:      beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)), sigma_t^2 the posterior variance
                    (1 - v) beta~_t + v beta_t, beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
      sample (x0):  0.5 sqrt(abar_t) / (2 - abar_t)   (the original's expression ``2. * 1 - abar``, kept)
      v_prediction: ones
    with weight[0] := weight[1] (the posterior variance is 0 at t = 0 when v_posterior = 0).
    As the original: float64 posterior variance, then the products in float32 on the float32 casts of
    its buffers (float32 1 - abar_t at small t differs ~1e-5 relative from the float64 value)."""
    check_prediction_type(prediction_type)
    f32 = np.float32
    betas = schedule.betas64
    ac = schedule.alphas_cumprod64
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        if prediction_type == "epsilon":
            post_var = (1.0 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
            b32, ac32 = betas.astype(f32), ac.astype(f32)
            w = b32 ** 2 / (f32(2) * post_var.astype(f32) * (1.0 - betas).astype(f32) * (f32(1) - ac32))
        elif prediction_type == "sample":
            ac32 = ac.astype(f32)
            w = f32(0.5) * np.sqrt(ac32) / (f32(2.0 * 1) - ac32)
        else:
            w = np.ones_like(betas)
    w = np.asarray(w, np.float32)
    w[0] = w[1]
    return w


def ldm_objective(per_example_b: jax.Array, t_b: jax.Array, weights_b: Optional[jax.Array] = None, *,
                  l_simple_weight: float = 1.0, logvar_init: float = 0.0, original_elbo_weight: float = 0.0,
                  lvlb_weights_t: Optional[jax.Array] = None) -> jax.Array:
    """The CompVis ``LatentDiffusion.p_losses`` reduction of per-example losses (B,):

      loss = l_simple_weight * mean(L_b / exp(logvar) + logvar) + original_elbo_weight * mean(lvlb[t_b] L_b)

    with a fixed logvar = ``logvar_init`` (the original's ``learn_logvar: false``) and ``weights_b``
    (min-SNR) on the simple term only. The defaults reduce it to mean(weights_b * L_b) exactly.
    ``lvlb_weights_t``: the (T,) table of ``lvlb_weights``, needed when original_elbo_weight != 0."""
    simple_b = per_example_b if weights_b is None else per_example_b * weights_b
    if logvar_init:
        logvar = jnp.float32(logvar_init)
        simple_b = simple_b / jnp.exp(logvar) + logvar
    loss = jnp.mean(simple_b)
    if l_simple_weight != 1.0:
        loss = jnp.float32(l_simple_weight) * loss
    if original_elbo_weight:
        if lvlb_weights_t is None:
            raise ValueError("original_elbo_weight != 0 needs the lvlb_weights table")
        vlb = jnp.mean(jnp.asarray(lvlb_weights_t, jnp.float32)[t_b] * per_example_b)
        loss = loss + jnp.float32(original_elbo_weight) * vlb
    return loss


def sample_training_inputs(rng, x0_bhwc, schedule: NoiseSchedule, offset_noise: float = 0.0):
    """(t_b, noise_bhwc): uniform integer timesteps in [0, T) and Gaussian noise.

    Offset noise (Guttenberg 2023, as diffusers' ``--noise_offset``): noise += offset * N(0, 1)
    of shape (B, 1, 1, C), a per-channel constant shift.
    """
    k_t, k_noise, k_offset = jax.random.split(rng, 3)
    b = x0_bhwc.shape[0]
    t_b = jax.random.randint(k_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0_bhwc.shape, jnp.float32)
    if offset_noise:
        shape = (b,) + (1,) * (x0_bhwc.ndim - 2) + (x0_bhwc.shape[-1],)
        noise = noise + offset_noise * jax.random.normal(k_offset, shape, jnp.float32)
    return t_b, noise


def training_loss(
    rng: jax.Array,
    apply_fn: Callable,
    x0_bhwc: jax.Array,
    cond,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    min_snr_gamma: Optional[float] = None,
    offset_noise: float = 0.0,
) -> jax.Array:
    """Denoising loss (Ho et al. 2020 Eq. 14 / Algorithm 1), a pure function of its inputs.

    apply_fn(x_t_bhwc, t_b, cond) -> model output (same shape as x0). Returns a scalar
    float32 loss; wrap params into ``apply_fn`` by closure and differentiate this.
    """
    check_prediction_type(prediction_type)
    t_b, noise = sample_training_inputs(rng, x0_bhwc, schedule, offset_noise)
    x0 = x0_bhwc.astype(jnp.float32)
    x_t = add_noise(schedule, x0, noise, t_b)
    target = prediction_target(schedule, x0, noise, t_b, prediction_type)
    out = apply_fn(x_t.astype(x0_bhwc.dtype), t_b, cond)
    weights = None
    if min_snr_gamma is not None:
        weights = min_snr_weights(snr(schedule, t_b), float(min_snr_gamma), prediction_type)
    return diffusion_loss(out, target, weights)
