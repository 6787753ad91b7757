"""Concat-conditioned original LDMs (CompVis ``DiffusionWrapper`` "concat" / "hybrid") against the
original ``LatentDiffusion`` and ``DDIMSampler`` of stable-diffusion-sdkit's ``ldm``.

The reference model is instantiated from the tiny YAML (original schema) by the original
class, its state dict saved as a ``.ckpt`` and loaded with ``ldm_jax.load_pipeline``; both
sample from the same initial latents with DDIM (eta 0). The concat channels are the
low-res image (super-resolution, bsr_sr schema: ``concat_mode`` default, ``torch.nn.Identity``
cond stage), a segmentation map through a ``SpatialRescaler`` (semantic synthesis) or, for
"hybrid", an image next to a CLIP context with classifier-free guidance.
"""
import dataclasses
import os

import jax
import numpy as np
import pytest
import torch

import ldm_jax
from ldm_jax.convert.original_pipeline import load_original_pipeline
from original_ckpt import (
    CONFIGS, SpatialRescalerReference, clip_text_model, ddim_sample, latent_diffusion, one_torch_thread, save_ckpt,
)
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


# ----------------------------------------------------------------------------- semantic synthesis (SpatialRescaler)

RESCALER_TOL = 1e-5  # issue 4: the rescaled map against the original module


@pytest.fixture(scope="module")
def semantic(tmp_path_factory):
    yaml_file = os.path.join(CONFIGS, "tiny-semantic-synthesis-kl.yaml")
    model = latent_diffusion(yaml_file, seed=60)  # its cond stage: the reference SpatialRescaler (see original_ckpt)
    sd = state_dict_of(model)
    assert sorted(k for k in sd if k.startswith("cond_stage_model.")) == ["cond_stage_model.channel_mapper.weight"]
    path = save_ckpt(str(tmp_path_factory.mktemp("semantic") / "semantic.ckpt"), sd)
    return dict(model=model, path=path, yaml=yaml_file, pipe=ldm_jax.load_pipeline(path, config=yaml_file))


def rescaled_reference(model, map_bhwc):
    """LatentDiffusion.get_learned_conditioning: the cond stage's encode (the SpatialRescaler forward)."""
    with torch.no_grad(), one_torch_thread():
        return model.get_learned_conditioning(nchw(map_bhwc))


def test_spatial_rescaler_matches_original(semantic):
    model, pipe = semantic["model"], semantic["pipe"]
    rescaler, params = pipe.cond_stage_model, pipe.params["cond_stage"]
    assert (rescaler.n_stages, rescaler.method, rescaler.multiplier, rescaler.in_channels, rescaler.out_channels,
            rescaler.bias) == (2, "bilinear", 0.5, 5, 3, False)  # the YAML's, with the original defaults
    rng = np.random.default_rng(61)
    onehot = np.eye(5, dtype=np.float32)[rng.integers(0, 5, (2, 32, 32))]
    probs = rng.dirichlet(np.ones(5), (1, 27, 34)).astype(np.float32)  # odd sides: torch scales by 1/multiplier
    for x in (onehot, probs):
        got = rescaler.apply({"params": params}, x)
        want = nhwc(rescaled_reference(model, x))
        assert got.shape == want.shape == (x.shape[0], (x.shape[1] // 2) // 2, (x.shape[2] // 2) // 2, 3)
        print(f"SpatialRescaler {x.shape[1]}x{x.shape[2]} -> {want.shape[1]}x{want.shape[2]}: max abs err "
              f"{max_err(got, want):.2e}")
        assert max_err(got, want) < RESCALER_TOL


def test_spatial_rescaler_methods_match_torch_interpolate():
    """Every method the original can run on a map, shrinking and enlarging, odd sides, with a biased mapper."""
    from ldm_jax.models.spatial_rescaler import SpatialRescaler

    rng = np.random.default_rng(62)
    x = rng.standard_normal((2, 13, 10, 4)).astype(np.float32)
    for method, multiplier, n_stages in (("nearest", 0.45, 2), ("nearest", 2.0, 1), ("bilinear", 0.75, 2),
                                         ("bilinear", 1.5, 1), ("bicubic", 0.5, 2), ("bicubic", 1.7, 1),
                                         ("area", 0.4, 2), ("area", 1.0 / 3.0, 1)):
        torch.manual_seed(63)
        ref = SpatialRescalerReference(n_stages, method, multiplier, in_channels=4, out_channels=2, bias=True).eval()
        with torch.no_grad():
            want = nhwc(ref(nchw(x)))
        ours = SpatialRescaler(n_stages, method, multiplier, in_channels=4, out_channels=2, bias=True)
        params = {"channel_mapper": {"kernel": ref.channel_mapper.weight.detach().numpy().transpose(2, 3, 1, 0),
                                     "bias": ref.channel_mapper.bias.detach().numpy()}}
        got = ours.apply({"params": params}, x)
        assert got.shape == want.shape and ours.output_size(13, 10) == want.shape[1:3], (method, multiplier)
        assert max_err(got, want) < RESCALER_TOL, (method, multiplier, max_err(got, want))


def test_semantic_synthesis_concat_matches_latent_diffusion(semantic):
    model, pipe = semantic["model"], semantic["pipe"]
    assert model.model.conditioning_key == "concat"  # concat_mode's default, as semantic_synthesis256
    assert (pipe.conditioning_key, pipe.cond_stage, pipe.concat_channels, pipe.text_encoder) == (
        "concat", "rescaler", 3, None)
    rng = np.random.default_rng(64)
    labels = rng.integers(0, 5, (2, 32, 32))  # class indices at the image size (f = 4: latents 8x8)
    onehot = np.eye(5, dtype=np.float32)[labels]
    x_T = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)

    z_ref = ddim_sample(model, nchw(x_T), STEPS, cond=rescaled_reference(model, onehot))
    kw = dict(num_inference_steps=STEPS, guidance_scale=1.0, sampler="ddim", latents=x_T, segmentation=onehot,
              return_intermediates=True)
    images, steps = pipe([""] * 2, **kw)
    z = steps[-1]
    want = reference_images(model, z_ref)
    print(f"LDM semantic synthesis (SpatialRescaler concat): final latents max abs err {max_err(z, nhwc(z_ref)):.2e}, "
          f"images {max_err(images, want):.2e}")
    assert images.shape == (2, 32, 32, 3)
    assert max_err(z, nhwc(z_ref)) < LATENT_TOL
    assert max_err(images, want) < IMAGE_TOL and images.std() > 1e-3
    # class indices are one-hot encoded to the same input; no text, so no guidance whatever the scale
    same = pipe([""] * 2, **{**kw, "segmentation": labels, "guidance_scale": 7.5})[1][-1]
    assert max_err(same, z) < 1e-6
    # the map really enters
    other = pipe([""] * 2, **{**kw, "segmentation": labels[::-1]})[1][-1]
    assert max_err(other, z) > 1e-2
    # -1 is a pixel of no class: an all-zero input vector (training's data.ignore_label pixels)
    ignored = labels.copy()
    ignored[:, :8] = -1
    zeroed = onehot.copy()
    zeroed[:, :8] = 0.0
    from_ignored = pipe([""] * 2, **{**kw, "segmentation": ignored})[1][-1]
    assert max_err(from_ignored, pipe([""] * 2, **{**kw, "segmentation": zeroed})[1][-1]) < 1e-6
    assert max_err(from_ignored, z) > 1e-3


def test_semantic_synthesis_errors_and_inferred_config(semantic, tmp_path):
    pipe = semantic["pipe"]
    with pytest.raises(ValueError, match="segmentation has 4 channels but the SpatialRescaler takes in_channels=5"):
        pipe([""], num_inference_steps=2, segmentation=np.zeros((32, 32, 4), np.float32))
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        pipe([""], num_inference_steps=2, segmentation=np.full((32, 32), 5))
    with pytest.raises(ValueError, match=r"or -1 for no class, got values in \[-2, -2\]"):
        pipe([""], num_inference_steps=2, segmentation=np.full((32, 32), -2))
    with pytest.raises(ValueError, match="makes 4x4, but the latent size is 8x8"):
        pipe([""], num_inference_steps=2, height=32, width=32, segmentation=np.zeros((16, 16), np.int64))
    with pytest.raises(ValueError, match="pass segmentation="):
        pipe([""], num_inference_steps=2)
    with pytest.raises(ValueError, match="segmentation=.*not cond_image="):
        pipe([""], num_inference_steps=2, cond_image=np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="has none"):  # a model without a SpatialRescaler
        dataclasses.replace(pipe, cond_stage_model=None)([""], segmentation=np.zeros((32, 32), np.int64))

    with pytest.warns(UserWarning, match="2 bilinear halvings"):  # no YAML: the channel mapper names the cond stage
        inferred = load_original_pipeline(semantic["path"])
    assert (inferred.conditioning_key, inferred.cond_stage) == ("concat", "rescaler")
    assert inferred.cond_stage_model == pipe.cond_stage_model

    from omegaconf import OmegaConf

    from ldm_jax.convert.errors import CheckpointError
    from ldm_jax.convert.original_config import spec_from_original_config

    def spec_with(change):
        cfg = OmegaConf.to_container(OmegaConf.load(semantic["yaml"]))
        change(cfg["model"]["params"])
        return spec_from_original_config(cfg, "tiny-semantic-synthesis-kl.yaml")

    rescaler = lambda **kw: lambda p: p["cond_stage_config"]["params"].update(kw)  # noqa: E731
    with pytest.raises(CheckpointError, match="'linear' cannot resize a 2-D map"):
        spec_with(rescaler(method="linear"))
    with pytest.raises(CheckpointError, match="'lanczos' is not supported"):
        spec_with(rescaler(method="lanczos"))
    with pytest.raises(CheckpointError, match="in_channels=6 is not the 3 latent channels plus the .* 4 output"):
        spec_with(rescaler(out_channels=4))
    with pytest.raises(CheckpointError, match="only 'concat'"):
        spec_with(lambda p: p.update(conditioning_key="crossattn"))
    assert spec_with(rescaler(method="area", multiplier="0.25", n_stages=1)).cond_stage_params["multiplier"] == 0.25


def test_sample_cli_segmentation_label_map(semantic, tmp_path, capsys):
    """sample.py --segmentation: a label-map PNG (class indices) at the output size."""
    from PIL import Image

    import sample as sample_cli

    labels = tmp_path / "labels.png"
    Image.fromarray(np.random.default_rng(65).integers(0, 5, (32, 32)).astype(np.uint8), mode="L").save(labels)
    out = tmp_path / "out"
    code = sample_cli.main(["--checkpoint", semantic["path"], "--config", semantic["yaml"], "--steps", "2",
                            "--n_samples", "1", "--outdir", str(out), "--segmentation", str(labels)])
    assert code == 0, capsys.readouterr().err
    assert np.asarray(Image.open(out / "samples" / "00000.png")).shape == (32, 32, 3)


def test_released_semantic_synthesis_config_parses_to_the_original_sizes():
    """The model part of CompVis models/ldm/semantic_synthesis256/config.yaml (the CompVis file is not in the
    reference index; these are the values of published copies of it): 182 COCO-stuff classes halved twice
    from 256 to the 64x64 latents of its VQ-f4 first stage. Our U-Net has the original's parameter count."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from ldm_jax.convert.original_config import spec_from_original_config
    from ldm_jax.convert.unet_diffusers import unet_abstract_params, unet_config_from_diffusers
    from ldm_jax.models.spatial_rescaler import SpatialRescaler
    from ldm_jax.models.unet import UNet

    unet = dict(image_size=64, in_channels=6, out_channels=3, model_channels=128, attention_resolutions=[32, 16, 8],
                num_res_blocks=2, channel_mult=[1, 4, 8], num_heads=8)
    ddconfig = dict(double_z=False, z_channels=3, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4],
                    num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    cfg = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.0015, "linear_end": 0.0205, "timesteps": 1000, "loss_type": "l1", "first_stage_key": "image",
        "cond_stage_key": "segmentation", "image_size": 64, "channels": 3, "concat_mode": True,
        "cond_stage_trainable": True,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface",
                               "params": {"embed_dim": 3, "n_embed": 8192, "ddconfig": ddconfig}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.SpatialRescaler",
                              "params": {"n_stages": 2, "in_channels": 182, "out_channels": 3}}}}}
    spec = spec_from_original_config(cfg, "semantic_synthesis256/config.yaml")
    assert (spec.cond_stage, spec.conditioning_key, spec.vae["_class_name"], spec.sample_size) == (
        "rescaler", "concat", "VQModel", 64)
    rescaler = SpatialRescaler(**spec.cond_stage_params)
    assert rescaler.output_size(256, 256) == (64, 64) and rescaler.features == 3
    with torch.device("meta"):
        want = sum(p.numel() for p in UNetModel(**unet).parameters())
    ours = unet_abstract_params(UNet(unet_config_from_diffusers(spec.unet)))
    assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(ours)) == want == 215_229_315
