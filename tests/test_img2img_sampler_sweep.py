"""img2img and inpainting x every sampler x strength x saved scheduler config, against diffusers.

Two levels:
- the chain (cheap): our ``samplers.sample`` (traced start index, 4-channel ``Inpaint`` blend) on
  the fake model of test_samplers.py, against diffusers' schedulers driven by the pipelines' own
  ``get_timesteps`` (t_start = N - min(int(N * strength), N), ``set_begin_index``) and their loops
  (img2img ``prepare_latents``: add_noise at timesteps[t_start]; inpaint: noise * init_noise_sigma
  when strength == 1, and after each step ``(1 - m) add_noise(image, noise, timesteps[i + 1]) + m x``);
  strengths where int(N * strength) is 0, 1, mid and N, with PNDM's N + 1 timesteps, DPM-Solver's
  first- and lower-order-final steps, Karras sigmas and trailing / linspace / leading spacing;
- the pipeline (a few compiles): ``ldm_jax.load_pipeline(folder)(..., init_image=, strength=, mask=)``
  against ``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInpaintPipeline`` (4- and 9-channel
  U-Nets) from the same noise, with the folder's scheduler config swapped per case.

Known conditioning (not compared): Euler from sigma_max = 4096 (zero terminal SNR + trailing) at
strength 1 cancels x ~ 4096 down to ~1, so one ulp of the fake model's output shows at ~5e-4
(test_samplers' test_euler_zero_terminal_snr_per_step covers that start).
"""
import importlib
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_euler_ancestral_discrete

import ldm_jax
from ldm_jax.diffusion import samplers as S
from ldm_jax.diffusion.schedule import NoiseSchedule
from ldm_jax.diffusion.scheduler_config import resolve_scheduler_options
from test_pipeline import _RANDN_MODULES  # where diffusers draws noise (replaced by the shared noise)
from test_samplers import fake_model_jax, fake_model_torch
from tiny_sd import SD_SCHEDULER, NoiseQueue, nchw, tiny_sd_pipeline

CLASSES = {
    "ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler, "plms": diffusers.PNDMScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
}
B, h, w, C = 2, 4, 4, 4
KEY = jax.random.key(3, impl="rbg")
_r = np.random.default_rng(1)
NOISE = _r.standard_normal((B, h, w, C)).astype(np.float32)
IMAGE = (0.8 * _r.standard_normal((B, h, w, C))).astype(np.float32)
MASK = (_r.uniform(size=(B, h, w, 1)) > 0.5).astype(np.float32)
CHAIN_TOL = 1e-5  # relative to max(1, |x|), as test_scheduler_config_sweep

SAVED = dict(SD_SCHEDULER, clip_sample=False)  # the tiny folders' (SD 1.x) scheduler config
CONFIGS = {
    "leading1": {}, "trailing": dict(timestep_spacing="trailing"),
    "linspace": dict(timestep_spacing="linspace"),
    # epsilon + zero terminal SNR: abar(999) = 0; only strength < 1 (start below 999) is finite
    "zsnr_trailing": dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "v_zsnr_trailing": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing"),
    "karras": dict(use_karras_sigmas=True),
}
# (N, strength): int(N * strength) = 0 (no step; PNDM keeps one), 1, mid, N (strength 1 and just below)
STEPS_STRENGTHS = [(1, 1.0), (1, 0.5), (4, 0.2), (4, 0.3), (4, 0.6), (4, 0.99), (4, 1.0)]


def _nchw(a):
    return torch.from_numpy(np.array(a, np.float32)).permute(0, 3, 1, 2)


@jax.jit
def _chain(latents, plan, ac_t, key, start, inpaint):
    model_fn = lambda x, t: fake_model_jax(x, t, ac_t, plan.prediction_type)  # noqa: E731
    return S.sample(model_fn, latents, plan, key, start_index=start, inpaint=inpaint)


def _ours_chain(name, saved, n, strength, inpaint, eta, ref_ac):
    """pipeline.py's img2img / inpaint start on the chain level; None where the pipeline raises."""
    options = resolve_scheduler_options(name, saved)
    schedule = NoiseSchedule.from_diffusers_config(options)
    schedule = NoiseSchedule.from_alphas_cumprod(ref_ac, zero_terminal_snr=schedule.zero_terminal_snr,
                                                 beta_schedule=schedule.beta_schedule)
    start = S.start_index_for_strength(n, strength, 1)
    try:
        plan = S.make_plan_from_options(name, schedule, n, options, eta=eta, first_step=start)
    except ValueError as e:
        assert "zero terminal SNR" in str(e)
        return None
    if start >= (plan.num_inference_steps if inpaint else plan.num_steps):
        return None
    x0, noise = jnp.asarray(IMAGE), jnp.asarray(NOISE)
    x = S.noise_to_start(plan, x0, noise, start) if (not inpaint or start > 0) else S.scale_initial_noise(plan, noise)
    blend = S.Inpaint(jnp.asarray(MASK), x0, noise) if inpaint else None
    return np.asarray(_chain(x, plan, jnp.asarray(ref_ac, jnp.float32), KEY, jnp.int32(start), blend))


def _diffusers_chain(name, saved, n, strength, inpaint, eta):
    """The pipelines' loops on diffusers' scheduler; None where diffusers raises or is not finite."""
    sched = CLASSES[name].from_config(dict(saved))
    sched.set_timesteps(n)
    ac = sched.alphas_cumprod.double().numpy()
    pipe_cls = diffusers.StableDiffusionInpaintPipeline if inpaint else diffusers.StableDiffusionImg2ImgPipeline
    timesteps, n_run = pipe_cls.get_timesteps(types.SimpleNamespace(scheduler=sched), n, strength, "cpu")
    if (inpaint and n_run < 1) or len(timesteps) == 0:  # inpaint raises; img2img fails on empty timesteps
        return None, ac
    image, noise, mask = _nchw(IMAGE), _nchw(NOISE), _nchw(MASK)
    if inpaint and strength == 1.0:
        latents = noise * sched.init_noise_sigma
    else:
        latents = sched.add_noise(image, noise, timesteps[:1].repeat(B))
    start = len(sched.timesteps) - len(timesteps)
    mods = (scheduling_ddpm, scheduling_ddim, scheduling_euler_ancestral_discrete)
    saved_randn = [m.randn_tensor for m in mods]
    pt = saved.get("prediction_type", "epsilon")
    try:
        for i, t in enumerate(timesteps):
            z = _nchw(S.step_noise(KEY, start + i, NOISE.shape))
            for m in mods:
                m.randn_tensor = lambda shape, _z=z, **kw: _z.reshape(shape)
            out = fake_model_torch(sched.scale_model_input(latents, t), t, ac.astype(np.float32), pt)
            latents = sched.step(out, t, latents, **({"eta": eta} if name == "ddim" else {})).prev_sample
            if inpaint:
                proper = image
                if i < len(timesteps) - 1:
                    proper = sched.add_noise(image, noise, torch.tensor([timesteps[i + 1]]))
                latents = (1 - mask) * proper + mask * latents
    finally:
        for m, f in zip(mods, saved_randn):
            m.randn_tensor = f
    out = latents.permute(0, 2, 3, 1).numpy()
    return (out if np.isfinite(out).all() else None), ac


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint4"])
@pytest.mark.parametrize("name", list(CLASSES))
def test_chain_matches_diffusers(name, inpaint):
    """Every saved config x (N, strength): the same final latents, or both refuse (diffusers raises,
    returns nothing or is not finite; ours raises a ValueError)."""
    compared = refused = 0
    for cname, extra in CONFIGS.items():
        if cname == "karras" and name not in ("dpmpp_2m", "euler"):
            continue
        saved = dict(SAVED, **extra)
        for n, strength in STEPS_STRENGTHS:
            if name.startswith("euler") and cname == "v_zsnr_trailing" and strength == 1.0:
                continue  # sigma_max = 4096: see the module docstring
            eta = 0.6 if name == "ddim" and n == 4 else 0.0
            ref, ac = _diffusers_chain(name, saved, n, strength, inpaint, eta)
            got = _ours_chain(name, saved, n, strength, inpaint, eta, ac)
            where = f"{name} {cname} N={n} strength={strength}"
            assert (got is None) == (ref is None), f"{where}: ours {'refuses' if got is None else 'runs'}"
            if got is None:
                refused += 1
                continue
            err = np.abs(got - ref).max() / max(1.0, np.abs(ref).max())
            assert err <= CHAIN_TOL, f"{where}: {err:.2e}"
            compared += 1
    assert compared >= 20 and refused >= 1


def test_plan_zero_snr_check_looks_at_the_steps_run_only():
    """Trailing spacing with zero terminal SNR starts at t = T - 1 (abar 0): an epsilon model cannot
    step from there (x0 = (x - eps) / 0), but an img2img run from a later step never visits it;
    likewise PNDM's restart step reads abar of t + T // N."""
    schedule = NoiseSchedule.create(rescale_betas_zero_snr=True)
    for name in ("ddim", "ddpm", "plms"):
        with pytest.raises(ValueError, match="zero terminal SNR"):
            S.make_plan(name, schedule, 4, spacing="trailing")
        S.make_plan(name, schedule, 4, spacing="trailing", first_step=2)
    S.make_plan("ddim", schedule, 4, spacing="trailing", first_step=1)
    # PNDM's timesteps [999, 749, 749, 499, 249]: from step 1 its restart (step 2) reads abar(749 + 250)
    with pytest.raises(ValueError, match="zero terminal SNR"):
        S.make_plan("plms", schedule, 4, spacing="trailing", first_step=1)
    with pytest.raises(ValueError, match="first_step"):
        S.make_plan("ddim", schedule, 4, first_step=-1)


# ---------------------------------------------------------------------------------------
# the pipeline against StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline
# ---------------------------------------------------------------------------------------
H = W = 16  # latents 8 x 8 with the tiny factor-2 VAE
PIPE_TOL = 1e-3  # on latents (return_latents), |z| ~ 1-3


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for ch in (4, 9):
        folder = str(tmp_path_factory.mktemp(f"sd{ch}"))
        tiny_sd_pipeline(folder, unet_in_channels=ch)
        out[ch] = (folder, ldm_jax.load_pipeline(folder), {})
    return out


def _posterior(seed, stream, n):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), stream)
    return np.asarray(jax.random.normal(key, (n, H // 2, W // 2, 4)))


def _run_both(folders, monkeypatch, ch, mode, sampler, extra, n, strength, prompts, negative=None, gs=7.5,
              eta=0.0, seed=5, give_latents=True):
    """(ours, diffusers) latents from the same noise, or the exception each raised. ``give_latents``:
    the noise goes to ours as ``latents=`` and, for inpainting, to diffusers' ``latents=`` as well (its
    img2img pipeline has none: there it is diffusers' own draw); else ours draws it from the seed and
    diffusers is handed that draw."""
    folder, pipe, refs = folders[ch]
    batch, shape = len(prompts), (len(prompts), H // 2, W // 2, 4)
    image = np.random.default_rng(seed + 1).uniform(size=(1, H, W, 3)).astype(np.float32)
    mask = np.zeros((1, H, W, 1), np.float32)
    mask[:, 4:12, 2:10] = 1.0
    if give_latents:
        noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    else:  # the pipeline's initial-noise stream
        noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 0), shape))
    ref_latents = give_latents and mode == "inpaint"
    init_timestep = min(int(n * strength), n)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # the pipeline's per-step stream
    steps = [np.asarray(S.step_noise(rng, i, shape)) for i in range(n - init_timestep, n + 1)]
    # diffusers' draws: the image posterior (inpaint: only for a 4-channel U-Net or to noise the image
    # below strength 1), the noise (unless given as latents=), the masked image's posterior (inpaint),
    # then the stochastic steps.
    image_encoded = mode == "img2img" or ch == 4 or (not ref_latents and strength < 1.0)
    draws = [_posterior(seed, 2, 1)] if image_encoded else []
    draws += ([] if ref_latents else [noise]) + ([_posterior(seed, 3, 1)] if mode == "inpaint" else []) + steps
    queue = NoiseQueue(draws)
    for name in _RANDN_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "randn_tensor", queue)
    cls = diffusers.StableDiffusionInpaintPipeline if mode == "inpaint" else diffusers.StableDiffusionImg2ImgPipeline
    if mode not in refs:
        ref_pipe = cls.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
        ref_pipe.set_progress_bar_config(disable=True)
        refs[mode] = ref_pipe, dict(ref_pipe.scheduler.config)  # the folder's config, before any case's extra
    (ref_pipe, ref_config), saved = refs[mode], dict(pipe.scheduler_config)
    config = dict(ref_config, **extra)
    ref_pipe.scheduler = CLASSES[sampler].from_config(config, **({"skip_prk_steps": True} if sampler == "plms" else {}))
    kw = dict(eta=eta) if sampler == "ddim" else {}
    if mode == "inpaint":
        kw.update(mask_image=nchw(mask), height=H, width=W)
    if ref_latents:
        kw.update(latents=nchw(noise))
    results = []
    try:
        with torch.no_grad():
            results.append(ref_pipe(prompts, image=nchw(image) * 2 - 1, strength=strength, num_inference_steps=n,
                                    guidance_scale=gs, negative_prompt=None if negative is None else [negative] * batch,
                                    output_type="latent", **kw).images.permute(0, 2, 3, 1).numpy())
    except Exception as e:  # noqa: BLE001 - compared with ours below
        results.append(e)
    pipe.scheduler_config = dict(saved, **extra)
    try:
        results.insert(0, pipe(prompts, negative_prompt=negative, init_image=image[0],
                               mask=None if mode == "img2img" else mask[0], strength=strength, num_inference_steps=n,
                               guidance_scale=gs, seed=seed, sampler=sampler, eta=eta,
                               latents=noise if give_latents else None, return_latents=True))
    except ValueError as e:
        results.insert(0, e)
    finally:
        pipe.scheduler_config = saved
    return results


def _assert_close(got, ref):
    assert not isinstance(got, Exception), got
    assert not isinstance(ref, Exception), ref
    assert got.shape == ref.shape and np.isfinite(ref).all()
    assert np.abs(got - ref).max() < PIPE_TOL


ZSNR_TRAILING = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")


def test_zero_snr_trailing_img2img_below_strength_one(folders, monkeypatch):
    """Zero terminal SNR + trailing spacing, epsilon model, strength 0.5 of 4 steps: the run starts at
    t = 499 and diffusers is finite; the pipeline used to refuse it because the plan's first timestep
    (999, abar 0, never visited) failed the epsilon zero-SNR check."""
    got, ref = _run_both(folders, monkeypatch, 4, "img2img", "ddim", ZSNR_TRAILING, 4, 0.5, ["a cat"], gs=6.0)
    _assert_close(got, ref)


def test_no_step_left(folders, monkeypatch):
    """int(N * strength) = 0: diffusers' inpaint pipeline raises; its img2img with PNDM (N + 1
    timesteps) still runs the last one (the other schedulers' img2img returns an empty batch or fails
    on the empty timestep tensor: refused here). The pipeline used to run the plms inpaint case. The
    plms img2img run is zero-SNR trailing: its one step (t = 249) is finite, t = 999 is not visited
    (the pipeline used to refuse it, as the test above)."""
    got, ref = _run_both(folders, monkeypatch, 4, "inpaint", "plms", {}, 6, 0.1, ["a cat"])
    assert isinstance(ref, ValueError) and "< 1" in str(ref)
    assert isinstance(got, ValueError) and "leaves no denoising steps" in str(got)
    got, ref = _run_both(folders, monkeypatch, 4, "img2img", "plms", ZSNR_TRAILING, 4, 0.1, ["a cat"], gs=1.0)
    _assert_close(got, ref)
    for ch, mode in ((4, "img2img"), (9, "inpaint")):
        got, ref = _run_both(folders, monkeypatch, ch, mode, "ddim", {}, 4, 0.2, ["a cat"])
        assert isinstance(got, ValueError) and "leaves no denoising steps" in str(got)
        assert isinstance(ref, Exception) or ref.shape[0] == 0


# a sample of the swept pipeline space: (U-Net channels, mode, sampler, saved config, N, strength, B,
# guidance scale, negative prompt, eta)
PIPELINE_CASES = [
    (9, "inpaint", "dpmpp_2m", dict(use_karras_sigmas=True), 4, 0.75, 2, 5.0, "bad", 0.0),
    (4, "inpaint", "euler_a", {}, 3, 1.0, 2, 7.5, "ugly", 0.0),  # leading: init_noise_sigma sqrt(s^2 + 1)
]
SLOW_CASES = [
    (4, "img2img", "ddpm", dict(steps_offset=0), 4, 0.6, 2, 6.0, "ugly", 0.0),
    (4, "img2img", "ddim", dict(timestep_spacing="trailing"), 4, 0.6, 2, 6.0, None, 0.7),
    (4, "img2img", "euler", dict(use_karras_sigmas=True), 5, 1.0, 1, 6.0, None, 0.0),
    (4, "img2img", "dpmpp_2m", dict(prediction_type="v_prediction", **ZSNR_TRAILING), 6, 0.55, 2, 6.0, "x", 0.0),
    (4, "inpaint", "plms", dict(timestep_spacing="linspace"), 5, 0.45, 2, 1.0, None, 0.0),
    (4, "inpaint", "ddim", dict(prediction_type="v_prediction", **ZSNR_TRAILING), 3, 1.0, 1, 7.5, None, 0.5),
    (4, "inpaint", "dpmpp_2m", {}, 5, 0.45, 2, 1.0, None, 0.0),
    (9, "inpaint", "euler", dict(timestep_spacing="trailing"), 2, 1.0, 1, 1.0, None, 0.0),
    (9, "inpaint", "plms", {}, 4, 0.75, 2, 5.0, "bad", 0.0),
    (9, "inpaint", "ddpm", dict(timestep_spacing="linspace"), 4, 0.75, 2, 5.0, None, 0.0),
]


@pytest.mark.parametrize(
    "case", PIPELINE_CASES + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW_CASES],
    ids=[f"{c[0]}ch-{c[1]}-{c[2]}-{i}" for i, c in enumerate(PIPELINE_CASES + SLOW_CASES)])
def test_pipeline_matches_diffusers(folders, monkeypatch, case):
    ch, mode, sampler, extra, n, strength, batch, gs, negative, eta = case
    prompts = ["a red apple", "a blue car"][:batch]
    got, ref = _run_both(folders, monkeypatch, ch, mode, sampler, extra, n, strength, prompts, negative, gs, eta)
    _assert_close(got, ref)


@pytest.mark.parametrize("ch", [4, 9])
@pytest.mark.parametrize("give_latents", [True, False], ids=["latents", "seed"])
def test_inpaint_below_strength_one_starts_as_diffusers(folders, monkeypatch, ch, give_latents):
    """Below strength 1 StableDiffusionInpaintPipeline starts from its ``latents=`` argument times
    init_noise_sigma (the image is not noised into the start), and from the image noised to the first
    step only when it draws the noise itself. The pipeline used to add ``latents=`` to the image (off by
    ~1 here). Euler: init_noise_sigma sqrt(sigma_max^2 + 1), not 1."""
    got, ref = _run_both(folders, monkeypatch, ch, "inpaint", "euler", {}, 4, 0.5, ["a cat"], gs=6.0,
                         give_latents=give_latents)
    _assert_close(got, ref)
