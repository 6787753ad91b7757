"""End to end: a tiny random-weight diffusers StableDiffusionPipeline, saved with
save_pretrained, run by diffusers and by ``ldm_jax.load_pipeline`` from the same
initial latents (and, for stochastic steps, the same per-step noise)."""
import os

import jax
import numpy as np
import pytest
import torch

import ldm_jax
from ldm_jax.diffusion import samplers
from tiny_sd import NoiseQueue, nchw, tiny_sd_pipeline

PROMPTS = ["a red apple on a table", "a blue car"]
NEGATIVE = "blurry, low quality"
STEPS = 4
H = W = 16  # latent 8x8 with the factor-2 tiny VAE
TOL = 2e-3  # issue 3: final images within 2e-3 max abs

DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "plms": "PNDMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
}
_RANDN_MODULES = [
    "diffusers.schedulers.scheduling_ddpm", "diffusers.schedulers.scheduling_ddim",
    "diffusers.schedulers.scheduling_euler_ancestral_discrete", "diffusers.models.autoencoders.vae",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
]


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd")
    tiny_sd_pipeline(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def ours(sd_folder):
    return ldm_jax.load_pipeline(sd_folder)


def _diffusers(folder, sampler, cls_name="StableDiffusionPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    if sampler != "plms":
        pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _step_noises(seed, n, shape):
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # the pipeline's per-step stream
    return [np.asarray(samplers.step_noise(rng, i, shape)) for i in range(n)]


def _patch_randn(monkeypatch, queue):
    import importlib

    for name in _RANDN_MODULES:
        monkeypatch.setattr(importlib.import_module(name), "randn_tensor", queue)


@pytest.mark.parametrize("sampler", list(DIFFUSERS_SCHEDULERS))
def test_txt2img_matches_diffusers(sd_folder, ours, sampler, monkeypatch):
    seed, shape = 3, (len(PROMPTS), H // 2, W // 2, 4)
    latents = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    eta = 0.0
    _patch_randn(monkeypatch, NoiseQueue(_step_noises(seed, STEPS + 1, shape)))
    ref_pipe = _diffusers(sd_folder, sampler)
    kwargs = {"eta": eta} if sampler == "ddim" else {}
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS), num_inference_steps=STEPS, guidance_scale=7.5,
                       height=H, width=W, latents=nchw(latents), output_type="np", **kwargs).images
    got = ours(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
               height=H, width=W, seed=seed, sampler=sampler, eta=eta, latents=latents)
    assert got.shape == ref.shape == (len(PROMPTS), H, W, 3)
    err = np.abs(got - ref).max()
    print(f"{sampler}: max abs image error {err:.2e}")
    assert err < TOL
    assert got.std() > 1e-3  # not a constant image


def test_ddim_eta_matches_diffusers(sd_folder, ours, monkeypatch):
    seed, shape = 5, (1, H // 2, W // 2, 4)
    latents = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    _patch_randn(monkeypatch, NoiseQueue(_step_noises(seed, STEPS, shape)))
    ref_pipe = _diffusers(sd_folder, "ddim")
    with torch.no_grad():
        ref = ref_pipe(PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=5.0, height=H, width=W,
                       latents=nchw(latents), eta=0.7, output_type="np").images
    got = ours(PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=5.0, height=H, width=W, seed=seed,
               sampler="ddim", eta=0.7, latents=latents)
    assert np.abs(got - ref).max() < TOL


def test_img2img_matches_diffusers(sd_folder, ours, monkeypatch):
    import diffusers

    seed, shape = 7, (1, H // 2, W // 2, 4)
    image = np.random.default_rng(1).uniform(size=(1, H, W, 3)).astype(np.float32)
    key = jax.random.PRNGKey(seed)
    posterior_noise = np.asarray(jax.random.normal(jax.random.fold_in(key, 2), shape))
    added_noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    _patch_randn(monkeypatch, NoiseQueue([posterior_noise, added_noise]))
    base = _diffusers(sd_folder, "ddim")
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline(**base.components)
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS[:1], image=nchw(image) * 2 - 1, strength=0.6, num_inference_steps=5,
                       guidance_scale=6.0, negative_prompt=[NEGATIVE], output_type="np").images
    got = ours(PROMPTS[:1], negative_prompt=NEGATIVE, init_image=image, strength=0.6, num_inference_steps=5,
               guidance_scale=6.0, seed=seed, sampler="ddim", latents=added_noise)
    assert np.abs(got - ref).max() < TOL


@pytest.mark.parametrize("unet_channels", [4, 9])
def test_inpaint_matches_diffusers(tmp_path, unet_channels, monkeypatch):
    seed, shape = 11, (1, H // 2, W // 2, 4)
    folder = str(tmp_path / "sd")
    tiny_sd_pipeline(folder, unet_in_channels=unet_channels)
    pipe = ldm_jax.load_pipeline(folder)
    image = np.random.default_rng(2).uniform(size=(1, H, W, 3)).astype(np.float32)
    mask = np.zeros((1, H, W, 1), np.float32)
    mask[:, 4:12, 2:10] = 1.0
    key = jax.random.PRNGKey(seed)
    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    image_posterior = np.asarray(jax.random.normal(jax.random.fold_in(key, 2), shape))
    masked_posterior = np.asarray(jax.random.normal(jax.random.fold_in(key, 3), shape))
    # The noise goes in as diffusers' latents= (the start is noise * init_noise_sigma at every
    # strength); diffusers' draws: image latents (for the 4-channel blend only), masked-image latents
    # (encoded for 4-channel U-Nets too, and then unused).
    _patch_randn(monkeypatch, NoiseQueue(([image_posterior] if unet_channels == 4 else []) + [masked_posterior]))
    import diffusers

    ref_pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None,
                                                                       requires_safety_checker=False)
    ref_pipe.scheduler = diffusers.DDIMScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS[:1], image=nchw(image) * 2 - 1, mask_image=nchw(mask), strength=0.75,
                       num_inference_steps=4, guidance_scale=7.5, height=H, width=W, latents=nchw(noise),
                       output_type="np").images
    got = pipe(PROMPTS[:1], init_image=image, mask=mask, strength=0.75, num_inference_steps=4,
               guidance_scale=7.5, seed=seed, sampler="ddim", latents=noise)
    assert np.abs(got - ref).max() < TOL


def test_guidance_scale_is_traced(ours):
    ours(PROMPTS[:1], num_inference_steps=2, guidance_scale=3.0, height=H, width=W, sampler="euler")
    fns = [fn for key, fn in ours._jit_cache.items() if key[0] == "generate"]
    sizes = [fn._cache_size() for fn in fns]
    ours(PROMPTS[:1], num_inference_steps=2, guidance_scale=9.0, height=H, width=W, sampler="euler")
    assert [fn._cache_size() for fn in fns] == sizes  # no new compilation


def test_same_seed_is_bit_identical(ours):
    a = ours(PROMPTS[:1], num_inference_steps=2, height=H, width=W, seed=4, sampler="euler_a")
    b = ours(PROMPTS[:1], num_inference_steps=2, height=H, width=W, seed=4, sampler="euler_a")
    c = ours(PROMPTS[:1], num_inference_steps=2, height=H, width=W, seed=5, sampler="euler_a")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0


def test_sharded_batch_equals_single_device(ours):
    assert jax.device_count() == 8, "conftest sets 8 virtual CPU devices"
    prompts = [f"an emoji number {i}" for i in range(8)]
    sharded = ours(prompts, num_inference_steps=3, height=H, width=W, seed=1, sampler="dpmpp_2m")
    ours.mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    try:
        single = ours(prompts, num_inference_steps=3, height=H, width=W, seed=1, sampler="dpmpp_2m")
    finally:
        ours.mesh = None
    np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)


def test_bad_inputs_are_clear_errors(ours):
    with pytest.raises(ValueError, match="unknown sampler"):
        ours("x", sampler="heun", height=H, width=W)
    with pytest.raises(ValueError, match="multiples of the autoencoder factor 2"):
        ours("x", height=15, width=16)
    with pytest.raises(ValueError, match="latents must have shape"):
        ours("x", height=H, width=W, latents=np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="mask needs init_image"):
        ours("x", height=H, width=W, mask=np.ones((H, W)))


@pytest.mark.parametrize("cls_name", ["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"])
def test_outdated_scheduler_config_runs_as_the_pipeline_class_runs_it(sd_folder, tmp_path, monkeypatch, cls_name):
    """StableDiffusion*Pipeline.__init__ rewrites steps_offset 0 -> 1 and clip_sample True -> False (a
    deprecation warning, then the rewritten config is what samples): load_pipeline reads the folder the same way."""
    import json
    import shutil

    folder = str(tmp_path / "outdated")
    shutil.copytree(sd_folder, folder)
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    saved = json.load(open(path))
    saved.update(_class_name="DDIMScheduler", steps_offset=0, clip_sample=True)
    saved.pop("skip_prk_steps", None)
    json.dump(saved, open(path, "w"))
    index_path = os.path.join(folder, "model_index.json")
    index = json.load(open(index_path))
    index["_class_name"] = cls_name
    index["scheduler"] = ["diffusers", "DDIMScheduler"]  # (diffusers builds the class model_index.json names)
    json.dump(index, open(index_path, "w"))
    import diffusers

    ref_pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None,
                                                            requires_safety_checker=False)
    assert type(ref_pipe.scheduler).__name__ == "DDIMScheduler"
    assert ref_pipe.scheduler.config.steps_offset == 1 and ref_pipe.scheduler.config.clip_sample is False
    ref_pipe.set_progress_bar_config(disable=True)
    seed, shape = 2, (1, H // 2, W // 2, 4)
    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    kwargs = {}
    if cls_name == "StableDiffusionImg2ImgPipeline":
        image = np.random.default_rng(1).uniform(size=(1, H, W, 3)).astype(np.float32)
        # diffusers draws the img2img noise with randn_tensor; the posterior sample too: queue both
        post = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 2), shape))
        _patch_randn(monkeypatch, NoiseQueue([post, noise]))
        kwargs = dict(image=torch.from_numpy(image * 2 - 1).permute(0, 3, 1, 2), strength=0.75)
    else:
        kwargs = dict(latents=nchw(noise), height=H, width=W)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=5.0, output_type="np",
                       **kwargs).images
    ours_pipe = ldm_jax.load_pipeline(folder)
    assert ours_pipe.scheduler_config["steps_offset"] == 1 and ours_pipe.scheduler_config["clip_sample"] is False
    if cls_name == "StableDiffusionImg2ImgPipeline":
        got = ours_pipe(PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=5.0, seed=seed, sampler="ddim",
                        init_image=image, strength=0.75, latents=noise)
    else:
        got = ours_pipe(PROMPTS[:1], num_inference_steps=STEPS, guidance_scale=5.0, height=H, width=W, seed=seed,
                        sampler="ddim", latents=noise)
    err = np.abs(got - ref).max()
    print(f"{cls_name}, outdated DDIM config: max abs image error {err:.2e}")
    assert err < TOL
