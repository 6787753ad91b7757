"""Pipeline.__call__ arguments beyond tests/test_pipeline.py: a single init image / mask broadcast
to several prompts (compared with diffusers from shared noise), uint8 / PIL images, no-CFG and
non-square txt2img, and the clear errors for malformed arguments."""
import jax
import numpy as np
import pytest
import torch
from PIL import Image

import ldm_jax
from test_pipeline import H, TOL, W, _diffusers, _patch_randn, _step_noises, ours, sd_folder  # noqa: F401
from tiny_sd import NoiseQueue, nchw, tiny_sd_pipeline

SHAPE1 = (1, H // 2, W // 2, 4)


def _image(seed, n=1):
    return np.random.default_rng(seed).uniform(size=(n, H, W, 3)).astype(np.float32)


def _posterior(seed, stream, n):
    return np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), stream), (n,) + SHAPE1[1:]))


def test_txt2img_three_prompts_no_cfg_non_square(sd_folder, ours, monkeypatch):
    """B = 3, guidance_scale 1.0 (diffusers: no CFG at <= 1, the negative prompt unused), 16 x 24."""
    seed, shape = 2, (3, H // 2, 24 // 2, 4)
    latents = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    _patch_randn(monkeypatch, NoiseQueue(_step_noises(seed, 3, shape)))
    prompts = ["an apple", "", "a very long prompt " * 20]  # empty and > 77 tokens (truncated)
    with torch.no_grad():
        ref = _diffusers(sd_folder, "euler_a")(prompts, num_inference_steps=2, guidance_scale=1.0, height=H,
                                               width=24, latents=nchw(latents), output_type="np").images
    got = ours(prompts, negative_prompt="ignored", num_inference_steps=2, guidance_scale=1.0, height=H, width=24,
               seed=seed, sampler="euler_a", latents=latents)
    assert got.shape == (3, H, 24, 3) and got.dtype == np.float32
    assert np.abs(got - ref).max() < TOL


def test_img2img_single_image_for_two_prompts_matches_diffusers(sd_folder, ours, monkeypatch):
    """One init image for B = 2 prompts: diffusers encodes it once (one posterior sample) and
    repeats the latents; the pipeline used to repeat the pixels and draw B posterior samples."""
    import diffusers

    seed, shape = 7, (2,) + SHAPE1[1:]
    image = _image(1)
    added = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    # strength 0.5 of 4 steps: the stochastic DDPM steps 2 and 3 run.
    _patch_randn(monkeypatch, NoiseQueue([_posterior(seed, 2, 1), added] + _step_noises(seed, 4, shape)[2:]))
    ref_pipe = diffusers.StableDiffusionImg2ImgPipeline(**_diffusers(sd_folder, "ddpm").components)
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(["a red apple", "a blue car"], image=nchw(image) * 2 - 1, strength=0.5, num_inference_steps=4,
                       guidance_scale=6.0, output_type="np").images
    got = ours(["a red apple", "a blue car"], init_image=image[0], strength=0.5, num_inference_steps=4,
               guidance_scale=6.0, seed=seed, sampler="ddpm", latents=added)
    assert np.abs(got - ref).max() < TOL


def test_inpaint_one_image_two_masks_matches_diffusers(tmp_path, monkeypatch):
    """9-channel inpainting, one image and two masks for two prompts: the image latents come from
    the one image, the masked-image latents from the two masked images (diffusers prepare_latents /
    prepare_mask_latents)."""
    import diffusers

    folder = str(tmp_path / "sd9")
    tiny_sd_pipeline(folder, unet_in_channels=9)
    pipe = ldm_jax.load_pipeline(folder)
    seed, shape = 11, (2,) + SHAPE1[1:]
    image = _image(2)
    masks = np.zeros((2, H, W, 1), np.float32)
    masks[0, 4:12, 2:10] = 1.0
    masks[1] = np.random.default_rng(3).uniform(size=(H, W, 1))  # soft: binarised at 0.5
    # The pipeline draws the noise from the seed (with latents= diffusers would not noise the image into
    # the start); diffusers is handed the same draw.
    noise = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 0), shape))
    _patch_randn(monkeypatch, NoiseQueue([_posterior(seed, 2, 1), noise, _posterior(seed, 3, 2)]))
    ref_pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None,
                                                                       requires_safety_checker=False)
    ref_pipe.scheduler = diffusers.DDIMScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(["a", "b"], image=nchw(image) * 2 - 1, mask_image=nchw(masks), strength=0.75,
                       num_inference_steps=4, guidance_scale=7.5, height=H, width=W, output_type="np").images
    got = pipe(["a", "b"], init_image=image, mask=masks[..., 0], strength=0.75, num_inference_steps=4,
               guidance_scale=7.5, seed=seed, sampler="ddim")
    assert np.abs(got - ref).max() < TOL


def test_uint8_and_pil_images_read_as_pixels(ours):
    pixels = (_image(4)[0] * 255).round().astype(np.uint8)
    kw = dict(num_inference_steps=2, strength=0.5, sampler="euler", seed=1)
    as_float = ours("x", init_image=pixels.astype(np.float32) / 255, **kw)
    np.testing.assert_array_equal(ours("x", init_image=pixels, **kw), as_float)
    np.testing.assert_array_equal(ours("x", init_image=Image.fromarray(pixels), **kw), as_float)


def test_single_image_broadcast_sharded_equals_single_device(ours):
    assert jax.device_count() == 8, "conftest sets 8 virtual CPU devices"
    prompts = [f"prompt {i}" for i in range(8)]
    kw = dict(init_image=_image(5)[0], mask=np.ones((H, W)), strength=0.5, num_inference_steps=2, seed=3,
              sampler="ddim")
    sharded = ours(prompts, **kw)
    ours.mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    try:
        single = ours(prompts, **kw)
    finally:
        ours.mesh = None
    np.testing.assert_allclose(sharded, single, atol=1e-5, rtol=0)


_IMG = np.random.default_rng(0).uniform(size=(H, W, 3)).astype(np.float32)
_STEPS1 = dict(num_inference_steps=1, height=H, width=W)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompt=5, **_STEPS1), TypeError, "prompt must be a string or a list of strings"),
    (dict(prompt=["a", None], **_STEPS1), TypeError, "prompt must be a string or a list of strings"),
    (dict(prompt="a", negative_prompt=3, **_STEPS1), TypeError, "negative_prompt must be a string or a list"),
    (dict(prompt=["a", "b"], negative_prompt=["n"], **_STEPS1), ValueError, "negative_prompt has 1 entries for 2"),
    (dict(prompt="a", num_inference_steps=1, height=-16, width=W), ValueError, "height must be a positive integer"),
    (dict(prompt="a", seed=None, **_STEPS1), TypeError, "seed must be an int"),
    (dict(prompt="a", guidance_scale=float("nan"), **_STEPS1), ValueError, "guidance_scale must be a finite number"),
    (dict(prompt="a", init_image=_IMG, mask=np.ones((H, W, 3)), num_inference_steps=2), ValueError,
     "mask must have one channel"),
    (dict(prompt="a", init_image=_IMG, strength=0.8, num_inference_steps=1), ValueError,
     "leaves no denoising steps.*num_inference_steps=1"),
], ids=["prompt-int", "prompt-none-item", "negative-int", "negative-length", "height-negative",
        "seed-none", "guidance-nan", "mask-rgb", "strength-no-steps"])
def test_malformed_arguments_are_clear_errors(ours, kwargs, error, match):
    with pytest.raises(error, match=match):
        ours(**kwargs)


def test_uint8_masks_repaint_where_nonzero():
    """Masks are binarised at 0.5 and not rescaled: uint8 {0, 1} and {0, 255} masks (and the float
    {0, 1} mask) all mean "repaint where nonzero"; uint8 images are 0..255 pixels."""
    from ldm_jax.image_io import prepare_image, prepare_mask

    ones = np.random.default_rng(0).uniform(size=(H, W)) > 0.5
    want = prepare_mask(ones.astype(np.float32), 1, H, W)
    for mask in (ones.astype(np.uint8), ones.astype(np.uint8) * 255, Image.fromarray(ones.astype(np.uint8) * 255)):
        np.testing.assert_array_equal(prepare_mask(mask, 1, H, W), want)
    assert want.sum() > 0
    pixels = (_image(1)[0] * 255).round().astype(np.uint8)
    np.testing.assert_allclose(prepare_image(pixels, 1, H, W), pixels[None] / 255.0, rtol=0, atol=1e-7)


def test_latent_sides_the_unet_does_not_halve_evenly(ours):
    """18 px = 9 latents, which the tiny U-Net halves to 5: its upsampler goes back to 9, as
    diffusers' U-Net does (upsample_size; the U-Net's parity at such sizes is in
    test_unet_config_sweep; diffusers' pipeline itself only takes multiples of 8)."""
    images = ours("a", num_inference_steps=2, height=18, width=W, seed=1)
    assert images.shape == (1, 18, W, 3) and np.isfinite(images).all() and images.std() > 1e-3
