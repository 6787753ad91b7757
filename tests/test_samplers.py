"""Samplers against diffusers' schedulers and the CompVis DDIM/PLMS samplers, step by step.

Both sides are driven by the same fake "model": a deterministic function of (x, t) that
behaves like a denoiser for unit-variance data (eps ~ sigma_t x, v ~ small, x0 ~ alpha_t x),
plus a t-dependent wiggle sin(t / 37 + phase) so that an off-by-one timestep shows up at
1e-2. Our chain runs jitted under lax.scan (the real code path); the diffusers chain is the
StableDiffusion*Pipeline denoising loop. Noise: our chain draws step_noise(key, i); the same
arrays are fed to diffusers (`variance_noise` for DDIM, a patched `randn_tensor` for DDPM and
Euler ancestral, a patched `noise_like` for CompVis DDIM).

Tolerance: every intermediate sample within 1e-5, measured on the variance-preserving scale
(x / sqrt(sigma^2 + 1) for the Euler samplers, whose samples grow to sigma_max ~ 15 or 4096
with zero terminal SNR; x itself for the others). The parity runs give our plan the same
abar_t table diffusers uses (its float32 cumprod); test_float64_schedule_end_to_end covers our
own float64 schedule, which differs from diffusers' float32 one by ~1e-6 relative.
"""
import contextlib
import functools
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from ldm_jax.diffusion import samplers as S
from ldm_jax.diffusion.schedule import NoiseSchedule

B, H, W, C = 2, 8, 8, 4
N = 10
TOL = 1e-5
# rbg keys compile much faster than threefry on CPU; the samplers take any key
# (test_eta_change_does_not_recompile uses a threefry PRNGKey).
KEY = jax.random.key(1, impl="rbg")

_r = np.random.default_rng(0)
MIX = (np.eye(C) * 0.9 + 0.1 * _r.standard_normal((C, C))).astype(np.float32)
PHASE = _r.uniform(0, 2 * np.pi, C).astype(np.float32)
NOISE = _r.standard_normal((B, H, W, C)).astype(np.float32)
IMAGE = (0.8 * _r.standard_normal((B, H, W, C))).astype(np.float32)
MASK = (_r.uniform(size=(B, H, W, 1)) > 0.5).astype(np.float32)

SCHEDULES = {
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}
CLASSES = {
    "ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler, "plms": diffusers.PNDMScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
}
FIXED = {"plms": dict(skip_prk_steps=True),
         "dpmpp_2m": dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                          lower_order_final=True)}
OBSERVED = {}  # sampler -> max normalised error seen (printed at the end with -s)


# ---------------------------------------------------------------------------------------
# the fake model, in JAX and in torch
# ---------------------------------------------------------------------------------------
def fake_model_jax(x_bhwc, t_b, ac_t, prediction_type):
    abar = jnp.interp(t_b, jnp.arange(ac_t.shape[0], dtype=jnp.float32), ac_t)[:, None, None, None]
    lin = jnp.einsum("bhwc,cd->bhwd", x_bhwc, MIX)
    wiggle = jnp.sin(t_b[:, None, None, None] / 37.0 + PHASE)
    if prediction_type == "epsilon":
        return jnp.sqrt(1 - abar) * lin + 0.05 * wiggle
    if prediction_type == "v_prediction":
        return 0.2 * lin + 0.1 * wiggle
    return jnp.sqrt(abar) * lin + 0.05 * wiggle


def fake_model_torch(x_bchw, t, ac_np, prediction_type):
    t = float(t.reshape(-1)[0]) if torch.is_tensor(t) else float(t)
    abar = np.float32(np.interp(t, np.arange(len(ac_np)), ac_np))
    lin = torch.einsum("bchw,cd->bdhw", x_bchw, torch.from_numpy(MIX))
    wiggle = torch.sin(torch.tensor(t, dtype=torch.float32) / 37.0
                       + torch.from_numpy(PHASE)[None, :, None, None])
    if prediction_type == "epsilon":
        return float(np.sqrt(np.float32(1) - abar)) * lin + 0.05 * wiggle
    if prediction_type == "v_prediction":
        return 0.2 * lin + 0.1 * wiggle
    return float(np.sqrt(abar)) * lin + 0.05 * wiggle


@functools.partial(jax.jit, static_argnames=("start_index",))
def run_chain(latents, plan, ac_t, key, start_index=0, inpaint=None):
    """Jitted chain with a Python start_index (one program per value)."""
    model_fn = lambda x, t: fake_model_jax(x, t, ac_t, plan.prediction_type)  # noqa: E731
    return S.sample(model_fn, latents, plan, key, start_index=start_index, inpaint=inpaint,
                    return_intermediates=True)


@jax.jit
def run_chain_traced_start(latents, plan, ac_t, key, start, inpaint=None):
    """Jitted chain with a traced start index: all img2img strengths share one program."""
    model_fn = lambda x, t: fake_model_jax(x, t, ac_t, plan.prediction_type)  # noqa: E731
    return S.sample(model_fn, latents, plan, key, start_index=start, inpaint=inpaint,
                    return_intermediates=True)


def to_nchw(a):
    return torch.from_numpy(np.array(a, np.float32)).permute(0, 3, 1, 2)


def to_nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@contextlib.contextmanager
def injected_noise():
    """Make diffusers' DDPM / Euler-ancestral `randn_tensor` return slot["noise"]."""
    slot = {}
    mods = (scheduling_ddpm, scheduling_euler_ancestral_discrete)
    saved = [m.randn_tensor for m in mods]
    for m in mods:
        m.randn_tensor = lambda shape, **kw: slot["noise"].reshape(shape)
    try:
        yield slot
    finally:
        for m, f in zip(mods, saved):
            m.randn_tensor = f


def diffusers_loop(sched, latents, timesteps, ac_np, pt, noises, begin, eta=0.0, inpaint=None):
    """The StableDiffusion(Img2Img|Inpaint)Pipeline denoising loop (4-channel UNet branch of the
    inpaint pipeline when `inpaint` is given), returning the latents after every step."""
    out = []
    with injected_noise() as slot:
        for i, t in enumerate(timesteps):
            slot["noise"] = to_nchw(noises[begin + i])
            model_in = sched.scale_model_input(latents, t)
            model_out = fake_model_torch(model_in, t, ac_np, pt)
            kw = dict(eta=eta, variance_noise=slot["noise"] if eta > 0 else None) \
                if isinstance(sched, diffusers.DDIMScheduler) else {}
            latents = sched.step(model_out, t, latents, **kw).prev_sample
            if inpaint is not None:  # pipeline_stable_diffusion_inpaint.py, num_channels_unet == 4
                mask, image_latents, noise = inpaint
                proper = image_latents
                if i < len(timesteps) - 1:
                    proper = sched.add_noise(image_latents, noise, torch.tensor([timesteps[i + 1]]))
                latents = (1 - mask) * proper + mask * latents
            out.append(to_nhwc(latents))
    return np.stack(out)


@contextlib.contextmanager
def ieee_float32_sqrt():
    """torch's float32 ``x ** 0.5`` / ``x.sqrt()`` on CPU is MKL's vector sqrt, whose last bit depends on the
    code path MKL picks for the CPU: against IEEE sqrt, 6 of SD's 1000 train sigmas are an ulp off on an
    Intel Xeon (MKL's AVX-512 path), 0 with its AVX2 path and 187 with its SSE4.2 path (the one an AMD EPYC
    gets: MKL_ENABLE_INSTRUCTIONS=SSE4_2 reproduces it). Inside this context both are the correctly
    rounded sqrt (numpy's), so diffusers' scheduler arithmetic is IEEE float32 on every machine, as ours is."""
    pow_, sqrt_ = torch.Tensor.__pow__, torch.Tensor.sqrt

    def ieee(x):
        return torch.from_numpy(np.asarray(np.sqrt(x.detach().numpy())))

    def pow_ieee(self, exponent):
        if isinstance(exponent, float) and exponent == 0.5 and self.dtype == torch.float32:
            return ieee(self)
        return pow_(self, exponent)

    def sqrt_ieee(self):
        return ieee(self) if self.dtype == torch.float32 else sqrt_(self)

    torch.Tensor.__pow__, torch.Tensor.sqrt = pow_ieee, sqrt_ieee
    try:
        yield
    finally:
        torch.Tensor.__pow__, torch.Tensor.sqrt = pow_, sqrt_


def make_pair(name, sched_name="scaled_linear", n=N, spacing="leading", steps_offset=1,
              prediction_type="epsilon", zero_snr=False, **opts):
    """(diffusers scheduler after set_timesteps, our plan with the same abar table, abar table).
    The scheduler's tables and sigmas are built with IEEE float32 sqrt (ieee_float32_sqrt), the same
    on every machine; its step arithmetic later is torch's own."""
    base = dict(SCHEDULES[sched_name], num_train_timesteps=1000)
    if zero_snr:
        base["rescale_betas_zero_snr"] = True
    cfg = dict(base, timestep_spacing=spacing, steps_offset=steps_offset,
               prediction_type=prediction_type, **FIXED.get(name, {}))
    d_opts = {k: v for k, v in opts.items() if k not in ("eta",)}
    with ieee_float32_sqrt():
        ref_ac = diffusers.DDPMScheduler(**base).alphas_cumprod.double().numpy()
        sched = CLASSES[name](**cfg, **d_opts)
        sched.set_timesteps(n)
    schedule = NoiseSchedule.from_alphas_cumprod(ref_ac, zero_terminal_snr=zero_snr,
                                                 beta_schedule=base["beta_schedule"])
    plan = S.make_plan(name, schedule, n, spacing=spacing, steps_offset=steps_offset,
                       prediction_type=prediction_type, **opts)
    return sched, plan, ref_ac


def vp_scale(plan, start=0):
    """Per-step scale of the sample after step i: sqrt(sigma_{i+1}^2 + 1) for Euler, else 1."""
    if plan.sampler in ("euler", "euler_a"):
        s = np.asarray(plan.coefs["sigma"], np.float64)
        nxt = np.concatenate([s[1:], [0.0]])[start:]
        return np.sqrt(nxt ** 2 + 1)
    return np.ones(plan.num_steps - start)


def check_close(name, mine, ref, scale):
    assert mine.shape == ref.shape, (mine.shape, ref.shape)
    err = np.abs(mine.astype(np.float64) - ref).reshape(len(ref), -1).max(axis=1) / scale
    OBSERVED[name] = max(OBSERVED.get(name, 0.0), float(err.max()))
    assert np.all(err <= TOL), f"{name}: per-step normalised errors {err}"
    return err.max()


def compare_chain(name, sched, plan, ref_ac, eta=0.0):
    ac_t = jnp.asarray(ref_ac, jnp.float32)
    ref_ts = sched.timesteps.numpy().astype(np.float32)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), ref_ts)  # (Euler's Karras ones fractional)
    with ieee_float32_sqrt():
        np.testing.assert_array_equal(np.asarray(plan.init_noise_sigma), np.float32(sched.init_noise_sigma))
    x_t = S.scale_initial_noise(plan, jnp.asarray(NOISE))
    _, xs = run_chain(x_t, plan, ac_t, KEY)
    noises = [np.asarray(S.step_noise(KEY, i, NOISE.shape)) for i in range(plan.num_steps)]
    ref = diffusers_loop(sched, to_nchw(NOISE) * sched.init_noise_sigma, sched.timesteps,
                         ref_ac.astype(np.float32), plan.prediction_type, noises, 0, eta=eta)
    return check_close(name, np.asarray(xs), ref, vp_scale(plan))


# ---------------------------------------------------------------------------------------
# per-step parity with diffusers
# ---------------------------------------------------------------------------------------
SPACING_CASES = [("leading", 1), ("leading", 0), ("trailing", 0), ("linspace", 0)]


@pytest.mark.parametrize("sched_name", ["scaled_linear", "linear"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,offset", SPACING_CASES)
@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_matches_diffusers(name, spacing, offset, prediction_type, sched_name):
    opts = {"clip_sample": False} if name in ("ddpm", "ddim") else {}
    sched, plan, ac = make_pair(name, sched_name, spacing=spacing, steps_offset=offset,
                                prediction_type=prediction_type, **opts)
    compare_chain(name, sched, plan, ac)


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m", "euler", "euler_a"])
def test_matches_diffusers_zero_terminal_snr(name, spacing):
    if name in ("euler", "euler_a") and spacing == "trailing":
        pytest.skip("sigma_max = 4096: see test_euler_zero_terminal_snr_per_step")
    opts = {"clip_sample": False} if name in ("ddpm", "ddim") else {}
    sched, plan, ac = make_pair(name, spacing=spacing, steps_offset=0 if spacing == "trailing" else 1,
                                prediction_type="v_prediction", zero_snr=True, **opts)
    assert ac[-1] == 0.0
    compare_chain(name, sched, plan, ac)


@functools.partial(jax.jit, static_argnames=("name",))
def _one_step(name, x, plan, ac_t, i):
    """One update of the scan body (the same step function), from a given sample at step i."""
    spec = S.SAMPLERS[name]
    model_fn = lambda x, t: fake_model_jax(x, t, ac_t, plan.prediction_type)  # noqa: E731
    return spec.step(model_fn, plan, spec.init_carry(x), i, i, KEY)[1]


@pytest.mark.parametrize("name", ["euler", "euler_a"])
def test_euler_zero_terminal_snr_per_step(name):
    """Zero terminal SNR + trailing spacing starts Euler at sigma_max = 4096: the first step
    x + (x - x0)/sigma * dt cancels |x| ~ 1.2e4 down to ~50, so float32 rounding alone (one ulp
    of x is 1e-3) decides the fourth digit, and XLA rewrites `a / b` by a scalar into
    `a * (1/b)` and reassociates `(a/b)*c`, i.e. rounds differently from torch. So each step is
    checked on its own, from diffusers' sample at that step (teacher forcing), against 1e-5 of
    its input scale sqrt(sigma_i^2 + 1); the whole chain's output is then bounded at the
    project's 1e-4 and reported."""
    sched, plan, ac = make_pair(name, spacing="trailing", steps_offset=0,
                                prediction_type="v_prediction", zero_snr=True)
    assert float(plan.coefs["sigma"][0]) == pytest.approx(4096.0, rel=1e-6)
    ac_t = jnp.asarray(ac, jnp.float32)
    noises = [np.asarray(S.step_noise(KEY, i, NOISE.shape)) for i in range(plan.num_steps)]
    x_init = NOISE * np.float32(sched.init_noise_sigma)
    ref = diffusers_loop(sched, to_nchw(NOISE) * sched.init_noise_sigma, sched.timesteps,
                         ac.astype(np.float32), "v_prediction", noises, 0)
    inputs = np.concatenate([x_init[None], ref[:-1]])
    mine = np.stack([np.asarray(_one_step(name, jnp.asarray(inputs[i]), plan, ac_t, i))
                     for i in range(plan.num_steps)])
    in_scale = np.sqrt(np.asarray(plan.coefs["sigma"], np.float64) ** 2 + 1)
    check_close(name + "(zero-snr, per step)", mine, ref, in_scale)
    _, xs = run_chain(S.scale_initial_noise(plan, jnp.asarray(NOISE)), plan, ac_t, KEY)
    chain_err = float(np.abs(np.asarray(xs[-1]) - ref[-1]).max())
    print(f"{name} zero-SNR trailing chain: final max abs error {chain_err:.2e}")
    assert chain_err < 1e-4


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "euler"])
def test_matches_diffusers_karras(name, spacing):
    sched, plan, ac = make_pair(name, spacing=spacing, steps_offset=1 if spacing == "leading" else 0,
                                use_karras_sigmas=True)
    compare_chain(name, sched, plan, ac)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_eta_and_final_alpha(eta, set_alpha_to_one):
    sched, plan, ac = make_pair("ddim", "linear", clip_sample=False, eta=eta,
                                set_alpha_to_one=set_alpha_to_one)
    compare_chain("ddim", sched, plan, ac, eta=eta)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_clip_sample(name):
    """clip_sample is active (the result differs from the unclipped run) and matches diffusers."""
    sched, plan, ac = make_pair(name, "linear", clip_sample=True, clip_sample_range=0.5)
    compare_chain(name, sched, plan, ac)
    _, plan_free, _ = make_pair(name, "linear", clip_sample=False)
    x_t = jnp.asarray(NOISE)
    a = run_chain(x_t, plan, jnp.asarray(ac, jnp.float32), KEY)[0]
    b = run_chain(x_t, plan_free, jnp.asarray(ac, jnp.float32), KEY)[0]
    assert float(jnp.abs(a - b).max()) > 1e-2


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp_2m", "euler"])
def test_sample_prediction(name):
    opts = {"clip_sample": False} if name in ("ddpm", "ddim") else {}
    sched, plan, ac = make_pair(name, "cosine", prediction_type="sample", **opts)
    compare_chain(name, sched, plan, ac)


@pytest.mark.parametrize("name,n", [("plms", 1), ("plms", 2), ("plms", 7), ("dpmpp_2m", 1),
                                    ("dpmpp_2m", 3), ("ddim", 7), ("euler", 50)])
def test_step_counts(name, n):
    """Odd step counts (PLMS with N=1, 2; DPM-Solver's final first-order step; N not dividing T)."""
    opts = {"clip_sample": False} if name == "ddim" else {}
    sched, plan, ac = make_pair(name, n=n, spacing="linspace", steps_offset=0, **opts)
    compare_chain(name, sched, plan, ac)


def test_float64_schedule_end_to_end():
    """Our own float64 schedule (from the config, the pipeline's path) against diffusers'
    float32 one: diffusers' cumprod rounding (~1e-6 relative in abar) is the only difference;
    bound it at the project's 1e-4 parity threshold and report the observed values."""
    cfg = dict(SCHEDULES["scaled_linear"], num_train_timesteps=1000, timestep_spacing="leading",
               steps_offset=1)
    schedule = NoiseSchedule.from_diffusers_config(cfg)
    worst = {}
    for name in S.SAMPLERS:
        sched = CLASSES[name](**cfg, **FIXED.get(name, {}), **({"clip_sample": False}
                                                                if name in ("ddpm", "ddim") else {}))
        sched.set_timesteps(N)
        plan = S.make_plan(name, schedule, N, spacing="leading", steps_offset=1)
        ac32 = sched.alphas_cumprod.double().numpy()
        _, xs = run_chain(S.scale_initial_noise(plan, jnp.asarray(NOISE)), plan,
                          jnp.asarray(ac32, jnp.float32), KEY)
        noises = [np.asarray(S.step_noise(KEY, i, NOISE.shape)) for i in range(plan.num_steps)]
        ref = diffusers_loop(sched, to_nchw(NOISE) * sched.init_noise_sigma, sched.timesteps,
                             ac32.astype(np.float32), "epsilon", noises, 0)
        err = np.abs(np.asarray(xs) - ref).reshape(len(ref), -1).max(axis=1) / vp_scale(plan)
        worst[name] = float(err.max())
    print("float64-schedule end-to-end max normalised errors:", worst)
    assert max(worst.values()) < 1e-4, worst


# ---------------------------------------------------------------------------------------
# img2img and inpainting
# ---------------------------------------------------------------------------------------
def _pipeline_timesteps(pipeline_cls, sched, n, strength):
    """diffusers' own get_timesteps (sets the scheduler's begin index)."""
    return pipeline_cls.get_timesteps(types.SimpleNamespace(scheduler=sched), n, strength, "cpu")


def _img2img_case(name, strength, inpaint, traced=True):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    opts = {"clip_sample": False} if name in ("ddpm", "ddim") else {}
    sched, plan, ac = make_pair(name, **opts)
    pipe = StableDiffusionInpaintPipeline if inpaint else StableDiffusionImg2ImgPipeline
    timesteps, _ = _pipeline_timesteps(pipe, sched, N, strength)
    start = S.start_index_for_strength(N, strength, plan.order)
    assert plan.num_steps - start == len(timesteps)
    np.testing.assert_array_equal(np.asarray(plan.timesteps)[start:], timesteps.numpy().astype(np.float32))
    if inpaint and strength == 1.0:  # inpaint prepare_latents, is_strength_max: noise * init_noise_sigma
        ref_x = to_nchw(NOISE) * sched.init_noise_sigma
        x = S.scale_initial_noise(plan, jnp.asarray(NOISE))
    else:  # prepare_latents: scheduler.add_noise(init_latents, noise, timesteps[:1])
        ref_x = sched.add_noise(to_nchw(IMAGE), to_nchw(NOISE), timesteps[:1].repeat(B))
        x = S.noise_to_start(plan, jnp.asarray(IMAGE), jnp.asarray(NOISE), jnp.int32(start) if traced else start)
        scale = float(plan.noise_alpha[start] + plan.noise_sigma[start])
        np.testing.assert_allclose(np.asarray(x), to_nhwc(ref_x), atol=TOL * scale, rtol=0)
    ac_t = jnp.asarray(ac, jnp.float32)
    blend = S.Inpaint(jnp.asarray(MASK), jnp.asarray(IMAGE), jnp.asarray(NOISE)) if inpaint else None
    if traced:
        _, xs = run_chain_traced_start(x, plan, ac_t, KEY, jnp.int32(start), inpaint=blend)
        np.testing.assert_array_equal(np.asarray(xs[:start]), np.broadcast_to(np.asarray(x), xs[:start].shape))
        xs = xs[start:]
    else:
        _, xs = run_chain(x, plan, ac_t, KEY, start_index=start, inpaint=blend)
    noises = [np.asarray(S.step_noise(KEY, i, NOISE.shape)) for i in range(plan.num_steps)]
    ref = diffusers_loop(sched, ref_x, timesteps, ac.astype(np.float32), "epsilon", noises, start,
                         inpaint=(to_nchw(MASK), to_nchw(IMAGE), to_nchw(NOISE)) if inpaint else None)
    check_close(name, np.asarray(xs), ref, vp_scale(plan, start))
    return np.asarray(xs)


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_img2img_matches_diffusers(name):
    """StableDiffusionImg2ImgPipeline: get_timesteps (start index, scheduler begin index),
    prepare_latents (add_noise at the first timestep), then the loop. Strength 0.9 gives start
    index 1, which for PLMS lands on its repeated timestep."""
    for strength in (0.6, 0.9):
        _img2img_case(name, strength, inpaint=False)


def test_img2img_static_start_index():
    """Same through a Python start_index (a shorter scan)."""
    _img2img_case("plms", 0.6, inpaint=False, traced=False)
    _img2img_case("dpmpp_2m", 0.6, inpaint=False, traced=False)


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_inpaint_matches_diffusers(name):
    """StableDiffusionInpaintPipeline with a 4-channel UNet: after each step
    x = (1 - mask) * add_noise(image, noise, t_next) + mask * x, no noise after the last step."""
    for strength in (1.0, 0.7):
        xs = _img2img_case(name, strength, inpaint=True)
        keep = np.broadcast_to(MASK == 0, xs.shape[1:])  # the kept region ends on the clean image
        np.testing.assert_array_equal(xs[-1][keep], IMAGE[keep])


# ---------------------------------------------------------------------------------------
# the original CompVis samplers
# ---------------------------------------------------------------------------------------
class CompVisStub:
    """What ldm's DDIMSampler / PLMSSampler read from a LatentDiffusion model."""

    def __init__(self, schedule, prediction_type, ac_for_model):
        ac, f = schedule.alphas_cumprod64, (lambda a: torch.tensor(a, dtype=torch.float32))
        self.num_timesteps, self.device = len(ac), "cpu"
        self.betas, self.alphas_cumprod = f(schedule.betas64), f(ac)
        self.alphas_cumprod_prev = f(np.append(1.0, ac[:-1]))
        self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod = f(np.sqrt(ac)), f(np.sqrt(1 - ac))
        self.parameterization = "v" if prediction_type == "v_prediction" else "eps"
        self._pt, self._ac = prediction_type, ac_for_model

    def apply_model(self, x, t, c):
        return fake_model_torch(x, t, self._ac, self._pt)

    def _at(self, a, t):
        return a[t].reshape(-1, 1, 1, 1)

    def predict_eps_from_z_and_v(self, x, t, v):
        return self._at(self.sqrt_alphas_cumprod, t) * v + self._at(self.sqrt_one_minus_alphas_cumprod, t) * x

    def predict_start_from_z_and_v(self, x, t, v):
        return self._at(self.sqrt_alphas_cumprod, t) * x - self._at(self.sqrt_one_minus_alphas_cumprod, t) * v


def compvis_chain(kind, schedule, n, prediction_type, eta, noises, monkeypatch):
    import ldm.models.diffusion.ddim as cv_ddim
    import ldm.models.diffusion.plms as cv_plms

    ac = schedule.alphas_cumprod64.astype(np.float32)
    stub = CompVisStub(schedule, prediction_type, ac)
    sampler = (cv_ddim.DDIMSampler if kind == "ddim" else cv_plms.PLMSSampler)(stub)
    calls = iter(range(10 ** 6))
    monkeypatch.setattr(cv_ddim, "noise_like", lambda shape, device, repeat=False: to_nchw(noises[next(calls)]))
    _, inter = sampler.sample(S=n, batch_size=B, shape=(C, H, W), conditioning=None, x_T=to_nchw(NOISE),
                              eta=eta, verbose=False, log_every_t=1)
    return np.stack([to_nhwc(x) for x in inter["x_inter"][1:]]), sampler.ddim_timesteps


@pytest.mark.parametrize("prediction_type,eta,n", [
    ("epsilon", 0.0, 10), ("epsilon", 0.7, 10), ("v_prediction", 0.0, 10), ("v_prediction", 1.0, 7),
    ("epsilon", 0.0, 7),
])
def test_ddim_matches_compvis(prediction_type, eta, n, monkeypatch):
    schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    plan = S.make_plan("ddim", schedule, n, spacing="compvis", prediction_type=prediction_type, eta=eta)
    ac_t = jnp.asarray(schedule.alphas_cumprod64, jnp.float32)
    _, xs = run_chain(jnp.asarray(NOISE), plan, ac_t, KEY)
    noises = [np.asarray(S.step_noise(KEY, i, NOISE.shape)) for i in range(plan.num_steps)]
    ref, cv_ts = compvis_chain("ddim", schedule, n, prediction_type, eta, noises, monkeypatch)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), cv_ts[::-1].astype(np.float32))
    check_close("ddim(compvis)", np.asarray(xs), ref, np.ones(len(ref)))


@pytest.mark.parametrize("n", [10, 7, 2])
def test_plms_matches_compvis(n, monkeypatch):
    """CompVis' PLMSSampler makes N steps, the first of which calls the model twice (at t and at
    t_next, "pseudo improved Euler"); we run it as N+1 steps like diffusers' PNDM, so CompVis'
    intermediates are ours from the second on."""
    schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    plan = S.make_plan("plms", schedule, n, spacing="compvis")
    _, xs = run_chain(jnp.asarray(NOISE), plan, jnp.asarray(schedule.alphas_cumprod64, jnp.float32), KEY)
    ref, cv_ts = compvis_chain("plms", schedule, n, "epsilon", 0.0, [], monkeypatch)
    check_close("plms(compvis)", np.asarray(xs)[1:], ref, np.ones(len(ref)))


def test_plms_compvis_vs_diffusers_pndm():
    """Where the timesteps coincide (leading spacing, offset 1, N dividing T, set_alpha_to_one
    False) CompVis' PLMS and diffusers' PNDM(skip_prk_steps) are the same algorithm: same N+1
    model calls at the same (x, t), same warm-up; the update formulas are algebraically equal
    (DDIM form vs PNDM Eq. 9). They differ in timesteps when N does not divide T (CompVis then
    takes ceil(T / (T // N)) steps)."""
    schedule = NoiseSchedule.create("scaled_linear", 1000, 0.00085, 0.012)
    ac_t = jnp.asarray(schedule.alphas_cumprod64, jnp.float32)
    a = S.make_plan("plms", schedule, 10, spacing="compvis")
    b = S.make_plan("plms", schedule, 10, spacing="leading", steps_offset=1)
    np.testing.assert_array_equal(np.asarray(a.timesteps), np.asarray(b.timesteps))
    xa = run_chain(jnp.asarray(NOISE), a, ac_t, KEY)[0]
    xb = run_chain(jnp.asarray(NOISE), b, ac_t, KEY)[0]
    np.testing.assert_allclose(np.asarray(xa), np.asarray(xb), atol=1e-6, rtol=0)
    assert S.make_plan("plms", schedule, 7, spacing="compvis").num_steps == 9
    assert S.make_plan("plms", schedule, 7, spacing="leading", steps_offset=1).num_steps == 8


# ---------------------------------------------------------------------------------------
# timesteps / init_noise_sigma for many step counts (host only, cheap)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_timesteps_and_init_sigma_match_diffusers(name):
    """Timesteps, sigma grids (with dpmpp_2m's VP alpha_t / sigma_t) and init_noise_sigma bit for bit,
    diffusers' float32 sqrt made IEEE (ieee_float32_sqrt). With torch's own, MKL's, the sigmas are 1-2
    ulps off in places that depend on the CPU (2 ulps: through sigma_max^2 + 1 or the Karras grid's end
    points), and Euler's fractional Karras timesteps 6e-5 through log-sigma interpolation."""
    for spacing in ("leading", "trailing", "linspace"):
        for offset in (0, 1):
            for n in (1, 3, 7, 25, 50, 999):
                for karras in ((False, True) if name in ("dpmpp_2m", "euler") else (False,)):
                    extra = {"use_karras_sigmas": True} if karras else {}
                    if name == "ddim" and spacing == "leading" and offset == 1 and n == 999:
                        continue  # t = 999 + 1: diffusers' DDIM.step would index out of range (we raise)
                    where = str((spacing, offset, n, karras))
                    sched, plan, _ = make_pair(name, n=n, spacing=spacing, steps_offset=offset, **extra)
                    with ieee_float32_sqrt():  # (make_pair builds in it; these two are computed on access)
                        init_noise_sigma = np.float32(sched.init_noise_sigma)
                        if name == "dpmpp_2m":  # its VP (alpha_t, sigma_t) of each step's sigma
                            vp = [a.numpy() for a in sched._sigma_to_alpha_sigma_t(sched.sigmas[:-1])]
                    ref = sched.timesteps.numpy().astype(np.float32)
                    np.testing.assert_array_equal(np.asarray(plan.timesteps), ref, err_msg=where)
                    np.testing.assert_array_equal(np.asarray(plan.init_noise_sigma), init_noise_sigma, err_msg=where)
                    if name in ("euler", "euler_a"):
                        np.testing.assert_array_equal(np.asarray(plan.coefs["sigma"]), sched.sigmas.numpy()[:-1],
                                                      err_msg=where)
                    if name == "dpmpp_2m":
                        np.testing.assert_array_equal(np.asarray(plan.coefs["alpha"]), vp[0], err_msg=where)
                        np.testing.assert_array_equal(np.asarray(plan.coefs["sigma"]), vp[1], err_msg=where)


@pytest.mark.parametrize("n,strength", [(50, 0.8), (10, 0.75), (10, 1.0), (10, 0.05), (7, 0.3)])
def test_start_index_matches_pipeline(n, strength):
    from diffusers import StableDiffusionImg2ImgPipeline as Pipe

    for name in S.SAMPLERS:
        sched = CLASSES[name](**SCHEDULES["scaled_linear"], **FIXED.get(name, {}))
        sched.set_timesteps(n)
        ts, _ = _pipeline_timesteps(Pipe, sched, n, strength)
        plan = S.make_plan(name, NoiseSchedule.create(), n)
        start = S.start_index_for_strength(n, strength, plan.order)
        assert len(sched.timesteps) - len(ts) == start


# ---------------------------------------------------------------------------------------
# jit behaviour
# ---------------------------------------------------------------------------------------
def test_guidance_scale_is_traced_and_compiles_once():
    """Classifier-free guidance closure with a traced scale: two scales, one trace, one compile."""
    schedule = NoiseSchedule.create()
    plan = S.make_plan("dpmpp_2m", schedule, 6, spacing="leading", steps_offset=1)
    ac_t = jnp.asarray(schedule.alphas_cumprod64, jnp.float32)
    traces = []

    @jax.jit
    def txt2img(latents, plan, guidance_scale, key):
        traces.append(1)

        def model_fn(x, t):  # CFG by batch concatenation (uncond = a shifted model)
            out = fake_model_jax(jnp.concatenate([x, x]), jnp.concatenate([t, t]), ac_t, "epsilon")
            uncond, cond = jnp.split(out.at[: x.shape[0]].add(0.1), 2)
            return uncond + guidance_scale * (cond - uncond)

        return S.sample(model_fn, S.scale_initial_noise(plan, latents), plan, key)

    a = txt2img(jnp.asarray(NOISE), plan, 7.5, KEY)
    b = txt2img(jnp.asarray(NOISE), plan, 3.0, KEY)
    # other numbers in the plan (eta, spacing, schedule) do not recompile either
    plan2 = S.make_plan("dpmpp_2m", NoiseSchedule.create("linear", 1000, 1e-4, 0.02), 6, spacing="trailing")
    txt2img(jnp.asarray(NOISE), plan2, 5.0, KEY)
    assert len(traces) == 1 and txt2img._cache_size() == 1
    assert float(jnp.abs(a - b).max()) > 1e-3  # the scale does reach the model


def test_eta_change_does_not_recompile():
    schedule = NoiseSchedule.create()
    ac_t = jnp.asarray(schedule.alphas_cumprod64, jnp.float32)
    key = jax.random.PRNGKey(0)  # a classic threefry key
    before = run_chain._cache_size()
    outs = [run_chain(jnp.asarray(NOISE), S.make_plan("ddim", schedule, 9, eta=eta), ac_t, key)[0]
            for eta in (0.0, 0.3, 1.0)]
    assert run_chain._cache_size() == before + 1
    assert float(jnp.abs(outs[0] - outs[2]).max()) > 1e-3


# ---------------------------------------------------------------------------------------
# bf16 model output and bad input
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dpmpp_2m"])
def test_bf16_model_output(name):
    """A bf16 denoiser (the UNet under dtype=bfloat16): the update math stays float32, so the
    result tracks the float32 run to bf16 precision of the model output (~2^-8 relative per
    call, accumulated over 10 steps): tolerance 3e-2 of the output scale."""
    schedule = NoiseSchedule.create()
    plan = S.make_plan(name, schedule, N, spacing="leading", steps_offset=1)
    ac_t = jnp.asarray(schedule.alphas_cumprod64, jnp.float32)
    x_t = S.scale_initial_noise(plan, jnp.asarray(NOISE))
    f32 = S.sample(lambda x, t: fake_model_jax(x, t, ac_t, "epsilon"), x_t, plan, KEY)
    bf16 = S.sample(lambda x, t: fake_model_jax(x.astype(jnp.bfloat16), t, ac_t, "epsilon")
                    .astype(jnp.bfloat16), x_t, plan, KEY)
    assert bf16.dtype == jnp.float32
    err = float(jnp.abs(bf16 - f32).max() / jnp.abs(f32).max())
    assert err < 3e-2, err


def test_bad_input_errors():
    schedule = NoiseSchedule.create()
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*ddim"):
        S.make_plan("heun", schedule, 10)
    plan = S.make_plan("ddim", schedule, 10)
    model = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        S.run_sampler("lms", model, jnp.asarray(NOISE), plan, KEY)
    with pytest.raises(ValueError, match="plan was made for sampler 'ddim'"):
        S.run_sampler("euler", model, jnp.asarray(NOISE), plan, KEY)
    with pytest.raises(ValueError, match="unknown timestep spacing 'uniform'"):
        S.make_plan("ddim", schedule, 10, spacing="uniform")
    with pytest.raises(ValueError, match="compvis"):
        S.make_plan("euler", schedule, 10, spacing="compvis")
    with pytest.raises(ValueError, match="prediction_type"):
        S.make_plan("ddim", schedule, 10, prediction_type="eps")
    with pytest.raises(ValueError, match="cannot exceed"):
        S.make_plan("ddim", schedule, 1001)
    with pytest.raises(ValueError, match="outside"):
        S.make_plan("ddim", schedule, 1000, steps_offset=1)
    with pytest.raises(ValueError, match="start_index"):
        S.sample(model, jnp.asarray(NOISE), plan, KEY, start_index=11)
    zsnr = NoiseSchedule.create(rescale_betas_zero_snr=True)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        S.make_plan("plms", zsnr, 10, spacing="trailing")
    with pytest.raises(ValueError, match="zero terminal SNR"):
        S.make_plan("ddim", zsnr, 10, spacing="trailing", prediction_type="epsilon")
    S.make_plan("ddim", zsnr, 10, spacing="trailing", prediction_type="v_prediction")  # fine
    S.make_plan("ddim", zsnr, 10, spacing="leading", prediction_type="epsilon")  # never visits t = 999
    with pytest.raises(ValueError, match="'variance_type'"):
        S.make_plan_from_options("ddpm", schedule, 10, {"variance_type": "learned_range"})


def test_make_plan_from_resolved_options():
    """The option dict of scheduler_config.resolve_scheduler_options drives make_plan."""
    from ldm_jax.diffusion.scheduler_config import resolve_scheduler_options

    saved = dict(SCHEDULES["scaled_linear"], _class_name="PNDMScheduler", clip_sample=False,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, num_train_timesteps=1000)
    schedule = NoiseSchedule.from_diffusers_config(saved)
    for name in S.SAMPLERS:
        options = resolve_scheduler_options(name, saved)
        plan = S.make_plan_from_options(name, schedule, 20, options)
        sched = CLASSES[name].from_config(saved, **FIXED.get(name, {}))
        sched.set_timesteps(20)
        np.testing.assert_array_equal(np.asarray(plan.timesteps), sched.timesteps.numpy().astype(np.float32))


def test_report_observed_errors():
    """Runs last (file order): prints the worst normalised error per sampler seen above."""
    print("\nmax per-step normalised error vs references:",
          {k: f"{v:.2e}" for k, v in sorted(OBSERVED.items())})
