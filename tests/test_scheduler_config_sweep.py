"""Saved diffusers scheduler configs beyond the ones tests/test_samplers.py covers.

The pipeline's path is exercised end to end: ``resolve_scheduler_options(sampler, saved)`` ->
``NoiseSchedule.from_diffusers_config`` -> ``make_plan_from_options`` -> the jitted chain, against
``<diffusers class>.from_config(saved)`` (PNDM with skip_prk_steps, as the "plms" sampler) and
the StableDiffusion*Pipeline loop. Same fake model and tolerance as test_samplers.py (1e-5 per
step on the variance-preserving scale); the chain runs on diffusers' float32 abar table (our own
float64 one is checked against it to 2e-6 separately). Noise for DDPM / DDIM eta > 0 is shared
as in test_samplers.py.

Every __init__ argument of the six diffusers schedulers must reach make_plan_from_options (a key
dropped by resolve_scheduler_options is silently ignored): it is honoured, or raises a
ValueError naming the key.
"""
import inspect

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete

from ldm_jax.diffusion import samplers as S
from ldm_jax.diffusion.schedule import NoiseSchedule
from ldm_jax.diffusion.scheduler_config import SAMPLER_DEFAULTS, resolve_scheduler_options
from test_samplers import fake_model_jax, fake_model_torch, ieee_float32_sqrt

B, H, W, C = 2, 4, 4, 4
TOL = 1e-5
KEY = jax.random.key(3, impl="rbg")
_r = np.random.default_rng(1)
NOISE = _r.standard_normal((B, H, W, C)).astype(np.float32)
IMAGE = (0.8 * _r.standard_normal((B, H, W, C))).astype(np.float32)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
CLASSES = {
    "ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler, "plms": diffusers.PNDMScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
}


# the fake model of test_samplers (a denoiser-like linear map plus a t-dependent wiggle)
_model_jax, _model_torch = fake_model_jax, fake_model_torch


@jax.jit
def _chain(latents, plan, ac_t, key, start):
    model_fn = lambda x, t: _model_jax(x, t, ac_t, plan.prediction_type)  # noqa: E731
    return S.sample(model_fn, latents, plan, key, start_index=start, return_intermediates=True)[1]


def _nchw(a):
    return torch.from_numpy(np.array(a, np.float32)).permute(0, 3, 1, 2)


def _diffusers(name, saved, n):
    """The scheduler after set_timesteps, its tables and sigmas built with IEEE float32 sqrt (MKL's
    differs in the last bit for inputs that depend on the CPU: test_samplers.ieee_float32_sqrt)."""
    with ieee_float32_sqrt():
        sched = CLASSES[name].from_config(dict(saved), **({"skip_prk_steps": True} if name == "plms" else {}))
        sched.set_timesteps(n)
    return sched


def _ours(name, saved, n, eta=0.0, ref_ac=None):
    """The pipeline's plan; with ref_ac, on that abar table instead of our float64 one."""
    options = resolve_scheduler_options(name, saved)
    schedule = NoiseSchedule.from_diffusers_config(options)
    if ref_ac is not None:
        schedule = NoiseSchedule.from_alphas_cumprod(ref_ac, zero_terminal_snr=schedule.zero_terminal_snr,
                                                     beta_schedule=schedule.beta_schedule)
    return S.make_plan_from_options(name, schedule, n, options, eta=eta)


def compare(name, saved, n, eta=0.0, strength=None):
    """Per-step parity of the pipeline's chain with diffusers' loop; returns our final sample."""
    sched = _diffusers(name, saved, n)
    ref_ac = sched.alphas_cumprod.double().numpy()
    own = NoiseSchedule.from_diffusers_config(resolve_scheduler_options(name, saved)).alphas_cumprod64
    assert np.abs(own - ref_ac).max() < 2e-6
    plan = _ours(name, saved, n, eta, ref_ac)
    np.testing.assert_allclose(np.asarray(plan.timesteps), sched.timesteps.numpy().astype(np.float32),
                               atol=1e-3, rtol=0)  # fractional timesteps inherit an ulp of sigma
    with ieee_float32_sqrt():
        assert float(plan.init_noise_sigma) == pytest.approx(float(sched.init_noise_sigma), rel=1.2e-7)
    noises = [np.asarray(S.step_noise(KEY, i, NOISE.shape)) for i in range(plan.num_steps)]
    if strength is None:
        start, timesteps = 0, sched.timesteps
        x = S.scale_initial_noise(plan, jnp.asarray(NOISE))
        ref_x = _nchw(NOISE) * sched.init_noise_sigma
    else:  # StableDiffusionImg2ImgPipeline.get_timesteps + prepare_latents
        init = min(int(n * strength), n)
        begin = max(n - init, 0) * sched.order
        timesteps = sched.timesteps[begin:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
        start = S.start_index_for_strength(n, strength, plan.order)
        assert start == begin
        x = S.noise_to_start(plan, jnp.asarray(IMAGE), jnp.asarray(NOISE), start)
        ref_x = sched.add_noise(_nchw(IMAGE), _nchw(NOISE), timesteps[:1].repeat(B))
    mine = np.asarray(_chain(x, plan, jnp.asarray(ref_ac, jnp.float32), KEY, jnp.int32(start)))[start:]
    ref, latents = [], ref_x
    mods = (scheduling_ddpm, scheduling_euler_ancestral_discrete)  # share our step noise
    saved_randn = [m.randn_tensor for m in mods]
    try:
        for i, t in enumerate(timesteps):
            z = _nchw(noises[start + i])
            for m in mods:
                m.randn_tensor = lambda shape, _z=z, **kw: _z.reshape(shape)
            out = _model_torch(sched.scale_model_input(latents, t), t, ref_ac.astype(np.float32), plan.prediction_type)
            kw = dict(eta=eta, variance_noise=z if eta > 0 else None) if name == "ddim" else {}
            latents = sched.step(out, t, latents, **kw).prev_sample
            ref.append(latents.permute(0, 2, 3, 1).numpy())
    finally:
        for m, f in zip(mods, saved_randn):
            m.randn_tensor = f
    ref = np.stack(ref)
    scale = np.ones(len(ref))
    if name in ("euler", "euler_a"):  # VP scale sqrt(sigma_next^2 + 1) of each step's output
        scale = np.sqrt(sched.sigmas.double().numpy()[start + 1: start + 1 + len(ref)] ** 2 + 1)
    err = np.abs(mine - ref).reshape(len(ref), -1).max(axis=1) / scale
    assert np.all(err <= TOL), f"{name} {saved}: per-step errors {err}"
    return mine[-1]


# ---------------------------------------------------------------------------------------
# no saved key is dropped on the way to the plan
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CLASSES))
def test_every_diffusers_argument_reaches_the_plan(name):
    cls_name, _ = SAMPLER_DEFAULTS[name]
    assert cls_name == CLASSES[name].__name__
    params = set(inspect.signature(CLASSES[name].__init__).parameters) - {"self"}
    resolved = resolve_scheduler_options(name, {})
    assert params <= set(resolved), f"{name}: dropped keys {sorted(params - set(resolved))}"
    # and the defaults are diffusers' own (so a missing key means the same on both sides)
    for key in params:
        default = inspect.signature(CLASSES[name].__init__).parameters[key].default
        if name == "plms" and key == "skip_prk_steps":
            continue  # forced on by design
        assert resolved[key] == default or (default != default and resolved[key] != resolved[key]), key


@pytest.mark.parametrize("name,key,value", [
    ("dpmpp_2m", "use_exponential_sigmas", True), ("dpmpp_2m", "use_beta_sigmas", True),
    ("dpmpp_2m", "use_lu_lambdas", True), ("dpmpp_2m", "use_flow_sigmas", True),
    ("dpmpp_2m", "variance_type", "learned_range"), ("dpmpp_2m", "use_dynamic_shifting", True),
    ("euler", "use_exponential_sigmas", True), ("euler", "use_beta_sigmas", True),
    ("euler", "timestep_type", "continuous"), ("ddpm", "variance_type", "fixed_large"),
])
def test_unsupported_saved_keys_raise(name, key, value):
    """Keys that change diffusers' result and are not implemented raise, naming the key and file."""
    saved = dict(SD, prediction_type="v_prediction", **{key: value})
    with pytest.raises(ValueError, match=f"'{key}'.*scheduler_config.json"):
        _ours(name, saved, 10)


@pytest.mark.parametrize("key,value", [("solver_order", 3), ("solver_order", 1),
                                       ("algorithm_type", "sde-dpmsolver++"), ("algorithm_type", "deis")])
def test_dpmpp_2m_is_forced_to_order_2_dpmsolver_pp(key, value):
    """sampler="dpmpp_2m" is DPM-Solver++(2M) (the design contract: DPMSolverMultistepScheduler with
    dpmsolver++, order 2) also for a folder saved with another order or algorithm; the saved
    schedule options still apply."""
    saved = dict(SD, prediction_type="v_prediction", timestep_spacing="trailing", **{key: value})
    assert resolve_scheduler_options("dpmpp_2m", saved)[key] == {"solver_order": 2,
                                                                 "algorithm_type": "dpmsolver++"}[key]
    plain = dict(SD, prediction_type="v_prediction", timestep_spacing="trailing")
    assert _plans_equal(_ours("dpmpp_2m", saved, 10), _ours("dpmpp_2m", plain, 10))
    assert not _plans_equal(_ours("dpmpp_2m", plain, 10), _ours("dpmpp_2m", SD, 10))  # those options count
    compare("dpmpp_2m", plain, 10)  # = diffusers' DPM-Solver++(2M) with the saved schedule options


def _plans_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ---------------------------------------------------------------------------------------
# honoured keys: parity with diffusers, and the key does change the result
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", 0.0)])
def test_dynamic_thresholding(name, eta):
    """diffusers' `thresholding` (Imagen dynamic thresholding of x0) instead of clip_sample."""
    saved = dict(SD, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)
    a = compare(name, saved, 7, eta=eta)
    b = compare(name, dict(SD, clip_sample=False), 7, eta=eta)
    assert np.abs(a - b).max() > 1e-2


@pytest.mark.parametrize("n", [7, 20])
@pytest.mark.parametrize("lower_order_final,euler_at_final", [(True, False), (False, False), (False, True)])
def test_dpmpp_final_sigma_min(lower_order_final, euler_at_final, n):
    """final_sigmas_type="sigma_min" ends at sqrt((1 - abar_0) / abar_0); the last step is then
    second order unless lower_order_final (N < 15) or euler_at_final."""
    saved = dict(SD, final_sigmas_type="sigma_min", lower_order_final=lower_order_final,
                 euler_at_final=euler_at_final)
    a = compare("dpmpp_2m", saved, n)
    assert np.abs(a - compare("dpmpp_2m", SD, n)).max() > 1e-3


def test_euler_continuous_timesteps_only_matter_for_v_prediction():
    """EulerDiscreteScheduler's timestep_type "continuous" changes the model's timesteps only with
    v_prediction (which raises above); with epsilon diffusers' result is unchanged."""
    compare("euler", dict(SD, timestep_type="continuous"), 7)


def test_dpmpp_euler_at_final_and_solver_aliases_with_zero_final_sigma():
    """With final sigma 0 the last step is first order anyway: euler_at_final / lower_order_final
    change nothing; UniPC / DEIS solver types map to midpoint as in diffusers."""
    for extra in (dict(euler_at_final=True), dict(lower_order_final=False), dict(solver_type="bh2")):
        compare("dpmpp_2m", dict(SD, **extra), 7)


@pytest.mark.parametrize("lmc", [-5.1, -2.0])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpmpp_lambda_min_clipped(spacing, lmc):
    """lambda_min_clipped drops the training steps of log-SNR/2 below it (matters for cosine)."""
    saved = dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=lmc, timestep_spacing=spacing,
                 steps_offset=1, prediction_type="v_prediction")  # (epsilon: |x| ~ 20 after step 1)
    compare("dpmpp_2m", saved, 10)
    free = _ours("dpmpp_2m", dict(saved, lambda_min_clipped=float("-inf")), 10)
    clipped = _ours("dpmpp_2m", saved, 10)
    if (spacing, lmc) != ("leading", -5.1):  # 997 // 11 == 1000 // 11: same leading grid
        assert not np.array_equal(np.asarray(free.timesteps), np.asarray(clipped.timesteps))


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler"])
@pytest.mark.parametrize("extra", [dict(sigma_min=0.1, sigma_max=10.0), dict(sigma_max=5.0)])
def test_karras_sigma_range_from_config(name, extra):
    """A saved sigma_min / sigma_max sets the Karras range (_convert_to_karras)."""
    saved = dict(SD, use_karras_sigmas=True, **extra)
    compare(name, saved, 10)
    compare(name, dict(SD, **extra), 10)  # without Karras sigmas they are irrelevant


@pytest.mark.parametrize("extra", [dict(final_sigmas_type="sigma_min"), dict(interpolation_type="log_linear"),
                                   dict(interpolation_type="log_linear", use_karras_sigmas=True),
                                   dict(final_sigmas_type="sigma_min", use_karras_sigmas=True,
                                        timestep_spacing="leading", steps_offset=1)])
@pytest.mark.parametrize("n", [2, 10])
def test_euler_final_sigma_and_interpolation(extra, n):
    compare("euler", dict(SD, **extra), n)


# ---------------------------------------------------------------------------------------
# a sample of the swept schedule / spacing / step-count space (these passed before the fixes;
# kept as coverage of num_train_timesteps != 1000, other betas, steps not dividing T)
# ---------------------------------------------------------------------------------------
SWEEP = [
    ("ddpm", dict(beta_schedule="linear", beta_start=0.0005, beta_end=0.03, num_train_timesteps=500,
                  prediction_type="sample", timestep_spacing="trailing", clip_sample=True, clip_sample_range=0.5), 7),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500, prediction_type="v_prediction",
                  timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False), 7),
    ("ddim", dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                  clip_sample=False), 3),
    ("plms", dict(beta_schedule="linear", beta_start=0.0005, beta_end=0.03, num_train_timesteps=500,
                  timestep_spacing="linspace", set_alpha_to_one=True), 7),
    ("plms", dict(SD, num_train_timesteps=500, prediction_type="v_prediction", timestep_spacing="leading",
                  steps_offset=1), 1),
    ("dpmpp_2m", dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=500, prediction_type="sample",
                      timestep_spacing="leading", steps_offset=1), 7),
    ("dpmpp_2m", dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", use_karras_sigmas=True), 2),
    ("euler", dict(beta_schedule="linear", beta_start=0.0005, beta_end=0.02, num_train_timesteps=500,
                   prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1), 7),
    ("euler_a", dict(SD, num_train_timesteps=500, timestep_spacing="trailing"), 7),
]


@pytest.mark.parametrize("name,saved,n", SWEEP, ids=[f"{s[0]}-{i}" for i, s in enumerate(SWEEP)])
def test_swept_configs(name, saved, n):
    compare(name, saved, n)


@pytest.mark.parametrize("name", list(CLASSES))
def test_img2img_trailing_seven_steps(name):
    """img2img start (get_timesteps: t_start = N - int(N * strength)) with trailing spacing and N
    not dividing T."""
    saved = dict(SD, timestep_spacing="trailing", **({"clip_sample": False} if name in ("ddpm", "ddim") else {}))
    compare(name, saved, 7, strength=0.45)


@pytest.mark.parametrize("name", ["dpmpp_2m", "euler", "euler_a", "ddim"])
def test_trailing_spacing_with_a_minus_one_timestep(name):
    """diffusers' trailing arange(T, 0, -T / N) keeps a last entry ~1e-13 for some N (T=300, N=7):
    N+1 timesteps ending at -1. The sigma samplers clamp it (np.interp) as diffusers does; the
    alpha-based ones would read abar[-1] (the noisiest) in diffusers: we raise instead."""
    saved = dict(trained_betas=np.linspace(1e-4, 0.03, 300).tolist(), num_train_timesteps=300,
                 timestep_spacing="trailing", clip_sample=False)
    if name == "ddim":
        with pytest.raises(ValueError, match="trailing"):
            _ours(name, saved, 7)
        return
    for extra in ([{}, dict(interpolation_type="log_linear")] if name == "euler" else [{}]):
        compare(name, dict(saved, **extra), 7)
