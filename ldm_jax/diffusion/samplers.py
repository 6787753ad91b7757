"""Samplers as pure functions: one update rule per sampler, run by ``jax.lax.scan``.

    plan = make_plan("ddim", schedule, 50, spacing="leading", steps_offset=1)   # host, numpy
    x_T = scale_initial_noise(plan, noise)                                      # diffusers' init_noise_sigma
    x_0 = run_sampler("ddim", model_fn, x_T, plan, rng)                        # jit-able as a whole

``model_fn(x_bhwc, t_b) -> model_output`` is the denoiser (UNet + classifier-free guidance,
built by the caller); t_b is (B,) float32. Every sampler has the signature of ``sample``; one
step is ``(carry, i) -> (carry, x_i)`` and multistep memory (PLMS's eps history, DPM-Solver's
previous x0) lives in the carry. Plan arrays are traced values, so a jitted chain is compiled
once per (sampler, prediction_type, clip_sample, number of steps, shapes[, Python start_index])
and not per number (guidance scale, eta, spacing, schedule values; img2img strength too when
start_index is passed as an array). Per-step noise is ``step_noise(rng, i, ...)`` =
``normal(fold_in(rng, i))`` with i the global step index (so an img2img run from step k sees
the same per-step noise as the full run); feed the same arrays to diffusers
(``variance_noise`` / ``generator``) to compare runs exactly.

Each update reproduces the matching diffusers scheduler's ``step`` (see timesteps.py for the
plans): ddpm = DDPMScheduler (variance_type fixed_small), ddim = DDIMScheduler, plms =
PNDMScheduler(skip_prk_steps=True) (or the CompVis PLMSSampler with spacing="compvis"),
dpmpp_2m = DPMSolverMultistepScheduler(dpmsolver++, order 2, midpoint, lower_order_final),
euler = EulerDiscreteScheduler, euler_a = EulerAncestralDiscreteScheduler.

PLMS, diffusers vs CompVis: both call the model N+1 times. diffusers' PNDM runs N+1 steps over
[t_{N-1}, t_{N-2}, t_{N-2}, ..., t_0]: an eps-only step to t_{N-2}, then a restart from the
first sample with (eps_0 + eps_1)/2; CompVis' PLMSSampler does the same inside its first step
("pseudo improved Euler", the model called at t and t_next) and returns N samples. We run the
diffusers layout for both (CompVis' samples are ours from the second on). With "leading" spacing,
steps_offset 1 and N dividing T the two coincide; CompVis' "uniform" timesteps differ when N does
not divide T, and diffusers' previous timestep is always t - T // N (CompVis: the next listed one).
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.losses import predict_x0, predict_x0_and_eps
from ldm_jax.diffusion.timesteps import (  # noqa: F401  (re-exported entry points)
    COMPVIS, SAMPLER_NAMES, SPACINGS, SamplerPlan, make_plan, make_plan_from_options,
    start_index_for_strength,
)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class Inpaint(NamedTuple):
    """Inpainting with a standard (4-channel) UNet, as StableDiffusionInpaintPipeline: after each
    step x = (1 - mask) * add_noise(image_latents, noise, t_next) + mask * x (no noise after the
    last step)."""
    mask_bhw1: jax.Array       # 1 = generate, 0 = keep the image (diffusers' latent-size mask)
    image_latents: jax.Array   # (B, h, w, C) clean latents of the init image
    noise: jax.Array           # (B, h, w, C) noise used for add_noise (the initial noise)


# ---------------------------------------------------------------------------------------
# helpers shared with the pipeline
# ---------------------------------------------------------------------------------------
def step_noise(rng: jax.Array, i, shape, dtype=jnp.float32) -> jax.Array:
    """Noise drawn at global step i (DDPM variance, DDIM eta > 0, Euler ancestral)."""
    return jax.random.normal(jax.random.fold_in(rng, i), shape, dtype)


def init_noise_sigma(plan: SamplerPlan) -> jax.Array:
    """diffusers' ``scheduler.init_noise_sigma``: 1, or Euler's sigma_max (sqrt(sigma_max^2+1) for
    'leading' spacing)."""
    return plan.init_noise_sigma


def scale_initial_noise(plan: SamplerPlan, noise: jax.Array) -> jax.Array:
    """txt2img start: latents = noise * init_noise_sigma (as pipelines scale ``latents=``)."""
    return noise * plan.init_noise_sigma.astype(noise.dtype)


def add_noise_at(plan: SamplerPlan, x0: jax.Array, noise: jax.Array, i) -> jax.Array:
    """``scheduler.add_noise(x0, noise, timesteps[i])``: alpha_i x0 + sigma_i noise (VP samplers),
    x0 + sigma_i noise (Euler), alpha_t(sigma_i) x0 + sigma_t(sigma_i) noise (DPM-Solver)."""
    return plan.noise_alpha[i] * x0 + plan.noise_sigma[i] * noise


def noise_to_start(plan: SamplerPlan, x0: jax.Array, noise: jax.Array, start_index) -> jax.Array:
    """img2img start latents, as StableDiffusionImg2ImgPipeline.prepare_latents:
    add_noise(x0, noise, timesteps[start_index]) (no init_noise_sigma scaling)."""
    if isinstance(start_index, (int, np.integer)) and not 0 <= start_index < plan.num_steps:
        raise ValueError(f"start_index {start_index} outside [0, {plan.num_steps})")
    return add_noise_at(plan, x0, noise, start_index)


def _threshold(plan, x0):
    """Dynamic thresholding (Saharia et al. 2022, Imagen, Sec. 2.3), as diffusers'
    ``_threshold_sample``: per sample, s = the ``dynamic_thresholding_ratio`` quantile of |x0|
    (linear interpolation, as torch.quantile), clamped to [1, sample_max_value]; x0 =
    clip(x0, -s, s) / s."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.quantile(flat, plan.threshold_ratio, axis=1, method="linear")
    s = jnp.clip(s, 1.0, plan.sample_max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s


def _clip(plan, x0):
    # DDPMScheduler / DDIMScheduler.step: thresholding takes precedence over clip_sample.
    if plan.thresholding:
        return _threshold(plan, x0)
    if plan.clip_sample:
        r = plan.clip_sample_range
        return jnp.clip(x0, -r, r)
    return x0


def _t_b(plan, i, x):
    return jnp.full((x.shape[0],), plan.timesteps[i], jnp.float32)


def _coefs(plan, i) -> Dict[str, jax.Array]:
    return {k: v[i] for k, v in plan.coefs.items()}


# ---------------------------------------------------------------------------------------
# update rules: step(model_fn, plan, carry, i, c, rng) -> (carry, x_next); c = i - start_index
# ---------------------------------------------------------------------------------------
def _ddpm_step(model_fn, plan, carry, i, c, rng):
    x = carry["x"]
    k = _coefs(plan, i)
    out = model_fn(x, _t_b(plan, i, x)).astype(jnp.float32)
    x0 = _clip(plan, predict_x0(out, x, k["alpha"], k["sigma"], plan.prediction_type))
    # Ho et al. 2020 Algorithm 2: x_{t-1} = mu~_t(x_t, x0) + sigma_t z, with the posterior mean of
    # Eq. 7 written through the predicted x0 (equal to Eq. 11 for an eps model), generalised to a
    # strided schedule (alpha_t = abar_t / abar_prev), and sigma_t^2 = beta~_t ("fixed_small"):
    # mu~ = sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t.
    # As diffusers, no noise is added only when t = 0 (leading + steps_offset 1 ends at t = 1).
    prev = k["c_x0"] * x0 + k["c_xt"] * x
    prev = prev + k["std"] * step_noise(rng, i, x.shape)
    return carry, prev


def _ddim_step(model_fn, plan, carry, i, c, rng):
    x = carry["x"]
    k = _coefs(plan, i)
    out = model_fn(x, _t_b(plan, i, x)).astype(jnp.float32)
    x0, eps = predict_x0_and_eps(out, x, k["alpha"], k["sigma"], plan.prediction_type)
    x0 = _clip(plan, x0)
    # Song et al. 2021 (DDIM) Eq. 12: x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z.
    prev = k["c_x0"] * x0 + k["c_dir"] * eps
    prev = prev + k["std"] * step_noise(rng, i, x.shape)
    return carry, prev


def _plms_init(x):
    return {"x": x, "ets": jnp.zeros((3,) + x.shape, x.dtype), "x_start": x}


def _plms_step(model_fn, plan, carry, i, c, rng):
    x, ets, x_start = carry["x"], carry["ets"], carry["x_start"]
    k = _coefs(plan, i)
    out = model_fn(x, _t_b(plan, i, x)).astype(jnp.float32)
    e1, e2, e3 = ets[0], ets[1], ets[2]  # most recent first
    # Liu et al. 2022 (PNDM) Eq. 12, the pseudo linear multistep update, with diffusers'
    # warm-up: counter 0 steps with eps_t alone; counter 1 restarts from the counter-0 sample
    # with (eps_t + eps_prev)/2 (the second-order "pseudo improved Euler" step of CompVis'
    # PLMSSampler); then Adams-Bashforth of order 2, 3, 4.
    branches = (
        lambda: out,
        lambda: (out + e1) / 2,
        lambda: (3 * out - e1) / 2,
        lambda: (23 * out - 16 * e1 + 5 * e2) / 12,
        lambda: (1 / 24) * (55 * out - 59 * e1 + 37 * e2 - 9 * e3),
    )
    eps = jax.lax.switch(jnp.minimum(c, 4), branches)
    second = c == 1
    sel = lambda a, b: jnp.where(second, k[b], k[a])  # noqa: E731
    x_used = jnp.where(second, x_start, x)
    if plan.prediction_type == "v_prediction":
        eps = sel("alpha", "alpha2") * eps + sel("sigma", "sigma2") * x_used
    prev = sel("c_x", "c_x2") * x_used - sel("c_eps", "c_eps2") * eps
    new_ets = jnp.where(second, ets, jnp.concatenate([out[None], ets[:2]], axis=0))
    new_start = jnp.where(c == 0, x, x_start)
    return {"x": x, "ets": new_ets, "x_start": new_start}, prev


def _dpm_init(x):
    return {"x": x, "m_prev": jnp.zeros_like(x)}


def _dpmpp_2m_step(model_fn, plan, carry, i, c, rng):
    x, m_prev = carry["x"], carry["m_prev"]
    k = _coefs(plan, i)
    out = model_fn(x, _t_b(plan, i, x)).astype(jnp.float32)
    x0 = predict_x0(out, x, k["alpha"], k["sigma"], plan.prediction_type)
    if plan.thresholding:  # DPMSolverMultistepScheduler.convert_model_output (dpmsolver++)
        x0 = _threshold(plan, x0)
    # Lu et al. 2022 (DPM-Solver++) Algorithm 2 (multistep, 2nd order), midpoint form:
    # x_t = (sigma_t/sigma_s) x - alpha_t (e^{-h} - 1) D0 - 0.5 alpha_t (e^{-h} - 1) D1,
    # D0 = x0_s, D1 = (h / h_prev) (x0_s - x0_prev). First order (DPM-Solver++ 1 = DDIM) on the
    # first step and where the plan says so: the last step when the final sigma is 0, or by
    # diffusers' lower_order_final / euler_at_final (DPMSolverMultistepScheduler.step).
    first_order = (c == 0) | (k["first_order"] > 0)
    d1 = k["inv_r0"] * (x0 - m_prev)
    prev1 = k["c_x"] * x - k["c_d"] * x0
    prev2 = prev1 - k["half_c_d"] * d1
    prev = jnp.where(first_order, prev1, prev2)
    return {"x": x, "m_prev": x0}, prev


def _euler_x0(plan, k, model_fn, x, i):
    # scale_model_input: x / sqrt(sigma^2 + 1) (the VP input of a VE sample).
    out = model_fn(x / k["in_scale"], _t_b(plan, i, x)).astype(jnp.float32)
    if plan.prediction_type == "epsilon":
        return x - k["sigma"] * out
    if plan.prediction_type == "v_prediction":
        return out * k["c_v_out"] + x / k["v_skip_div"]
    return out


def _euler_step(model_fn, plan, carry, i, c, rng):
    x = carry["x"]
    k = _coefs(plan, i)
    x0 = _euler_x0(plan, k, model_fn, x, i)
    # Karras et al. 2022 Algorithm 2 with s_churn = 0 (no Heun correction): an Euler step of
    # dx/dsigma = (x - D(x; sigma)) / sigma from sigma_i to sigma_{i+1}.
    d = (x - x0) / k["sigma"]
    return carry, x + d * k["dt"]


def _euler_a_step(model_fn, plan, carry, i, c, rng):
    x = carry["x"]
    k = _coefs(plan, i)
    x0 = _euler_x0(plan, k, model_fn, x, i)
    # Ancestral Euler (k-diffusion `sample_euler_ancestral`): Euler step to sigma_down, then
    # fresh noise of std sigma_up.
    d = (x - x0) / k["sigma"]
    prev = x + d * k["dt"]
    return carry, prev + step_noise(rng, i, x.shape) * k["sigma_up"]


class Sampler(NamedTuple):
    init_carry: Callable
    step: Callable


def _x_only(x):
    return {"x": x}


SAMPLERS: Dict[str, Sampler] = {
    "ddpm": Sampler(_x_only, _ddpm_step),
    "ddim": Sampler(_x_only, _ddim_step),
    "plms": Sampler(_plms_init, _plms_step),
    "dpmpp_2m": Sampler(_dpm_init, _dpmpp_2m_step),
    "euler": Sampler(_x_only, _euler_step),
    "euler_a": Sampler(_x_only, _euler_a_step),
}
assert tuple(SAMPLERS) == SAMPLER_NAMES


# ---------------------------------------------------------------------------------------
# the chain
# ---------------------------------------------------------------------------------------
def sample(
    model_fn: ModelFn,
    latents: jax.Array,
    plan: SamplerPlan,
    rng: jax.Array,
    *,
    start_index=0,
    end_index: Optional[int] = None,
    inpaint: Optional[Inpaint] = None,
    return_intermediates: bool = False,
):
    """Run plan.sampler over steps [start_index, end_index) (end defaults to the plan's length S).

    latents: (B, h, w, C), already scaled (``scale_initial_noise`` or ``noise_to_start``).
    start_index: a Python int (the scan covers only the steps run; each value compiles its own
      program), or an int32 array/tracer (the scan covers all steps up to end_index and skips
      those before start_index with ``lax.cond``, so img2img strengths share one compiled
      program). Must lie in [0, end_index].
    Returns the final latents (float32), and with ``return_intermediates`` also the latents
    after every scanned step, (end_index - start_index, B, h, w, C) for a Python start_index,
    (end_index, B, h, w, C) for a traced one (entries before start_index = the input latents).
    """
    if plan.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {plan.sampler!r}; expected one of {SAMPLER_NAMES}")
    spec = SAMPLERS[plan.sampler]
    n = plan.num_steps
    end_index = n if end_index is None else end_index
    if not isinstance(end_index, int) or not 0 <= end_index <= n:
        raise ValueError(f"end_index must be a Python int in [0, {n}], got {end_index!r}")
    static_start = isinstance(start_index, (int, np.integer))
    if static_start:
        start_index = int(start_index)
        if not 0 <= start_index <= end_index:
            raise ValueError(f"start_index must lie in [0, {end_index}], got {start_index}")
    else:
        start_index = jnp.asarray(start_index, jnp.int32)
        if start_index.shape != ():
            raise ValueError(f"start_index must be a scalar, got shape {start_index.shape}")
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, h, w, C), got shape {latents.shape}")
    x = latents.astype(jnp.float32)
    if inpaint is not None:
        mask = inpaint.mask_bhw1.astype(jnp.float32)
        image = inpaint.image_latents.astype(jnp.float32)
        inpaint_noise = inpaint.noise.astype(jnp.float32)
        if image.shape != x.shape or inpaint_noise.shape != x.shape:
            raise ValueError(f"inpaint image_latents {image.shape} and noise {inpaint_noise.shape} "
                             f"must match latents {x.shape}")
        jnp.broadcast_shapes(mask.shape, x.shape)

    def run_step(carry, i):
        carry, x_next = spec.step(model_fn, plan, carry, i, i - start_index, rng)
        if inpaint is not None:
            j = jnp.minimum(i + 1, n - 1)
            proper = jnp.where(i < n - 1, add_noise_at(plan, image, inpaint_noise, j), image)
            x_next = (1 - mask) * proper + mask * x_next
        return dict(carry, x=x_next), x_next

    def body(carry, i):
        if static_start:
            carry, x_next = run_step(carry, i)
        else:
            carry, x_next = jax.lax.cond(i >= start_index, run_step, lambda c, _: (c, c["x"]), carry, i)
        return carry, (x_next if return_intermediates else None)

    first = start_index if static_start else 0
    carry, xs = jax.lax.scan(body, spec.init_carry(x), jnp.arange(first, end_index, dtype=jnp.int32))
    if return_intermediates:
        return carry["x"], xs
    return carry["x"]


def run_sampler(name: str, model_fn: ModelFn, latents: jax.Array, plan: SamplerPlan, rng: jax.Array,
                **kwargs):
    """``sample`` after checking that ``plan`` was made for sampler ``name``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {SAMPLER_NAMES}")
    if plan.sampler != name:
        raise ValueError(f"plan was made for sampler {plan.sampler!r}, not {name!r}")
    return sample(model_fn, latents, plan, rng, **kwargs)
