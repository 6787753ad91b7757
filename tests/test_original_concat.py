"""Concat-conditioned original LDMs (CompVis ``DiffusionWrapper`` "concat" / "hybrid") against the
original ``LatentDiffusion`` and ``DDIMSampler`` of stable-diffusion-sdkit's ``ldm``.

The reference model is instantiated from the tiny YAML (original schema) by the original
class, its state dict saved as a ``.ckpt`` and loaded with ``ldm_jax.load_pipeline``; both
sample from the same initial latents with DDIM (eta 0). The concat channels are the
low-res image (super-resolution, bsr_sr schema: ``concat_mode`` default, ``torch.nn.Identity``
cond stage) or, for "hybrid", an image next to a CLIP context with classifier-free guidance.
"""
import os

import numpy as np
import pytest
import torch

import ldm_jax
from ldm_jax.convert.original_pipeline import load_original_pipeline
from original_ckpt import CONFIGS, clip_text_model, ddim_sample, latent_diffusion, one_torch_thread, save_ckpt
from tiny_sd import nchw, nhwc

LATENT_TOL = 1e-4  # issue 4: final latents, float32
IMAGE_TOL = 2e-3   # decoded images in [0, 1]
STEPS = 4


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def reference_images(model, z):
    """LatentDiffusion.decode_first_stage (1 / scale_factor, first-stage decode) -> [0, 1]."""
    with torch.no_grad(), one_torch_thread():
        return nhwc(torch.clamp((model.decode_first_stage(z) + 1.0) / 2.0, 0.0, 1.0).numpy())


def state_dict_of(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def sr(tmp_path_factory):
    yaml_file = os.path.join(CONFIGS, "tiny-ldm-sr-kl.yaml")
    model = latent_diffusion(yaml_file, seed=30)
    path = save_ckpt(str(tmp_path_factory.mktemp("sr") / "sr.ckpt"), state_dict_of(model))
    return dict(model=model, path=path, pipe=ldm_jax.load_pipeline(path, config=yaml_file))


def test_super_resolution_concat_matches_latent_diffusion(sr):
    model, pipe = sr["model"], sr["pipe"]
    assert model.model.conditioning_key == "concat"  # from concat_mode's default, no conditioning_key in the YAML
    assert (pipe.conditioning_key, pipe.cond_stage, pipe.concat_channels) == ("concat", "identity", 3)
    assert pipe.scaling_factor == 1.0  # LatentDiffusion's default (bsr_sr gives none)
    rng = np.random.default_rng(31)
    low_res = rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)  # the latent size: output 16x16
    x_T = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)

    # LatentDiffusion.apply_model wraps a tensor condition as {"c_concat": [c]} (concat key);
    # the Identity cond stage passes the [-1, 1] low-res image through.
    z_ref = ddim_sample(model, nchw(x_T), STEPS, cond=nchw(low_res * 2 - 1))
    kw = dict(num_inference_steps=STEPS, guidance_scale=1.0, sampler="ddim", latents=x_T, cond_image=low_res,
              return_intermediates=True)  # (images, latents after every step): one compilation for both
    images, steps = pipe([""] * 2, **kw)
    z = steps[-1]
    want = reference_images(model, z_ref)
    print(f"LDM super-resolution (concat): final latents max abs err {max_err(z, nhwc(z_ref)):.2e}, "
          f"images {max_err(images, want):.2e}")
    assert images.shape == (2, 16, 16, 3)
    assert max_err(z, nhwc(z_ref)) < LATENT_TOL
    assert max_err(images, want) < IMAGE_TOL
    # the condition really enters: another low-res image moves the result
    other = pipe([""] * 2, **{**kw, "cond_image": low_res[::-1]})[1][-1]
    assert max_err(other, z) > 1e-2
    # the same channels given directly
    raw = pipe([""] * 2, **{**kw, "cond_image": None, "image_conditioning": low_res * 2 - 1})[1][-1]
    assert max_err(raw, z) < 1e-6


def test_super_resolution_inferred_config_and_errors(sr):
    inferred = load_original_pipeline(sr["path"])  # no YAML: 6 = 3 + 3 input channels -> Identity concat
    assert (inferred.conditioning_key, inferred.cond_stage) == ("concat", "identity")
    assert inferred.unet.config == sr["pipe"].unet.config
    pipe = sr["pipe"]
    with pytest.raises(ValueError, match="3 channels concatenated to the latents.*cond_image="):
        pipe([""], num_inference_steps=2)
    with pytest.raises(ValueError, match=r"latent size 4x4"):
        pipe([""], num_inference_steps=2, height=8, width=8, cond_image=np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, h, w, 3\)"):
        pipe([""], num_inference_steps=2, image_conditioning=np.zeros((1, 8, 8, 4), np.float32))


def test_super_resolution_export_runs_in_diffusers(sr, tmp_path):
    """save_diffusers -> diffusers.LDMSuperResolutionPipeline (vqvae/ + unet/ + scheduler/): same images
    from the same noise and low-res image; other concat models are refused."""
    import dataclasses
    import json

    import diffusers

    from ldm_jax.convert.export import save_diffusers

    pipe = sr["pipe"]
    folder = save_diffusers(pipe, str(tmp_path / "sr"))
    with open(os.path.join(folder, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "LDMSuperResolutionPipeline"
    ref_pipe = diffusers.LDMSuperResolutionPipeline.from_pretrained(folder)
    ref_pipe.set_progress_bar_config(disable=True)
    low_res = np.random.default_rng(32).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    # its noise: randn_tensor((B, in_channels // 2, h, w), generator) = torch.randn on CPU
    latents = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), one_torch_thread():
        ref = ref_pipe(image=nchw(low_res * 2 - 1), generator=torch.Generator().manual_seed(3),
                       num_inference_steps=STEPS, output_type="np").images
    got, _ = pipe([""] * 2, num_inference_steps=STEPS, guidance_scale=1.0, sampler="ddim", latents=nhwc(latents),
                  cond_image=low_res, return_intermediates=True)  # the compilation of the parity test
    print(f"LDM super-resolution -> diffusers LDMSuperResolutionPipeline: max abs image error {max_err(got, ref):.2e}")
    assert max_err(got, ref) < IMAGE_TOL and got.std() > 1e-3
    back = ldm_jax.load_pipeline(folder)
    assert (back.conditioning_key, back.cond_stage, back.concat_channels) == ("concat", "identity", 3)
    # diffusers decodes without a scale factor, and has no pipeline for other concat conditioning
    scaled = dataclasses.replace(pipe, vae=pipe.vae.clone(config=dataclasses.replace(pipe.vae.config,
                                                                                     scaling_factor=0.5)))
    with pytest.raises(ValueError, match="scale_factor 0.5"):
        save_diffusers(scaled, str(tmp_path / "scaled"))
    with pytest.raises(ValueError, match="only for super-resolution"):
        save_diffusers(dataclasses.replace(pipe, cond_stage="first_stage"), str(tmp_path / "other"))
    assert not (tmp_path / "scaled").exists() and not (tmp_path / "other").exists()


def test_ldm_inpainting_first_stage_concat_matches_latent_diffusion(tmp_path):
    """cond stage __is_first_stage__ (CompVis scripts/inpaint.py): c_concat = [first-stage encoding of the
    masked image (get_learned_conditioning: the KL mode, unscaled), the mask at latent size]."""
    yaml_file = os.path.join(CONFIGS, "tiny-ldm-inpainting-kl.yaml")
    model = latent_diffusion(yaml_file, seed=50)
    sd = state_dict_of(model)
    assert any(k.startswith("cond_stage_model.") for k in sd)  # the first stage, stored twice
    path = save_ckpt(str(tmp_path / "inpaint.ckpt"), sd)
    pipe = ldm_jax.load_pipeline(path, config=yaml_file)
    assert (pipe.conditioning_key, pipe.cond_stage, pipe.concat_channels) == ("concat", "first_stage", 4)
    inferred = load_original_pipeline(path)
    assert (inferred.conditioning_key, inferred.cond_stage) == ("concat", "first_stage")

    rng = np.random.default_rng(51)
    image = rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    mask = np.zeros((2, 16, 16), np.float32)
    mask[:, 4:12, 2:10] = 1.0  # 1 = repaint; on the latent grid (f = 2) as well
    x_T = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    image_t, mask_t = nchw(image * 2 - 1), torch.from_numpy(mask[:, None])
    with torch.no_grad(), one_torch_thread():
        c = model.get_learned_conditioning((1 - mask_t) * image_t)
        cc = torch.nn.functional.interpolate(mask_t, size=c.shape[-2:])
    z_ref = ddim_sample(model, nchw(x_T), STEPS, cond=torch.cat((c, cc), dim=1))
    images, steps = pipe([""] * 2, num_inference_steps=STEPS, guidance_scale=1.0, sampler="ddim", latents=x_T,
                         init_image=image, mask=mask, strength=1.0, return_intermediates=True)
    want = reference_images(model, z_ref)
    print(f"LDM inpainting (first-stage concat): final latents max abs err {max_err(steps[-1], nhwc(z_ref)):.2e}, "
          f"images {max_err(images, want):.2e}")
    assert max_err(steps[-1], nhwc(z_ref)) < LATENT_TOL
    assert max_err(images, want) < IMAGE_TOL


def test_hybrid_text_and_concat_with_guidance_matches_latent_diffusion(tmp_path):
    yaml_file = os.path.join(CONFIGS, "tiny-hybrid-txt-concat.yaml")
    # FrozenCLIPEmbedder would download CLIP: the reference takes the context precomputed
    # (cond stage Identity) from a transformers CLIP stored under the original prefix.
    model = latent_diffusion(yaml_file, seed=40, cond_stage_config={"target": "torch.nn.Identity"})
    text = clip_text_model(41)
    sd = state_dict_of(model)
    sd.update({"cond_stage_model.transformer." + k: v.detach().numpy().copy() for k, v in text.state_dict().items()})
    path = save_ckpt(str(tmp_path / "hybrid.ckpt"), sd)
    pipe = ldm_jax.load_pipeline(path, config=yaml_file)
    assert model.model.conditioning_key == "hybrid"
    assert (pipe.conditioning_key, pipe.cond_stage, pipe.concat_channels) == ("hybrid", "clip", 3)

    prompts = ["a red apple on a table", "a blue car"]
    rng = np.random.default_rng(42)
    image = rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
    x_T = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad(), one_torch_thread():
        ctx = text(torch.from_numpy(pipe.tokenize(prompts)).long()).last_hidden_state
        uc = text(torch.from_numpy(pipe.tokenize(["", ""])).long()).last_hidden_state
    c_concat = [nchw(image * 2 - 1)]  # the unconditional branch keeps the image (as the SD inpainting scripts)
    z_ref = ddim_sample(model, nchw(x_T), STEPS, cond={"c_concat": c_concat, "c_crossattn": [ctx]},
                        uncond={"c_concat": c_concat, "c_crossattn": [uc]}, scale=5.0)
    images, steps = pipe(prompts, num_inference_steps=STEPS, guidance_scale=5.0, sampler="ddim", latents=x_T,
                         cond_image=image, return_intermediates=True)
    z = steps[-1]
    want = reference_images(model, z_ref)
    print(f"hybrid (CLIP context + concat image, CFG 5): final latents max abs err {max_err(z, nhwc(z_ref)):.2e}, "
          f"images {max_err(images, want):.2e}")
    assert max_err(z, nhwc(z_ref)) < LATENT_TOL
    assert max_err(images, want) < IMAGE_TOL and images.std() > 1e-3


def test_sample_cli_cond_img_without_prompt(sr, tmp_path, capsys):
    """sample.py --cond-img on a super-resolution checkpoint (no prompt: the model has no text encoder)."""
    from PIL import Image

    import sample as sample_cli

    low_res = tmp_path / "low_res.png"
    Image.fromarray((np.random.default_rng(33).uniform(0, 1, (8, 8, 3)) * 255).astype(np.uint8)).save(low_res)
    out = tmp_path / "out"
    argv = ["--checkpoint", sr["path"], "--config", os.path.join(CONFIGS, "tiny-ldm-sr-kl.yaml"), "--steps", "2",
            "--n_samples", "2", "--scale", "1", "--outdir", str(out)]
    code = sample_cli.main(argv + ["--cond-img", str(low_res)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    image = np.asarray(Image.open(out / "samples" / "00001.png"))
    assert image.shape == (16, 16, 3)  # the autoencoder factor (2 here) times the low-res size
    code = sample_cli.main(argv + ["--outdir", str(tmp_path / "bad")])  # no --cond-img for a concat model
    err = capsys.readouterr().err  # the error line can follow the progress bar's last redraw
    errors = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
    assert code == 2 and len(errors) == 1 and "cond_image=" in errors[0], err
