"""Original CompVis / Stability single-file checkpoints: loading (with the original YAML and
inferred from the keys), parity with the original ``ldm`` modules, export to diffusers, errors.

The checkpoints are built from the original modules (``tests/original_ckpt.py``) with random
weights (every parameter perturbed), saved with torch.save / safetensors; the YAMLs are tiny
versions of the original ones in ``tests/original_configs/``.
"""
import dataclasses
import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import ldm_jax
from ldm_jax.convert.errors import CheckpointError, UnsafePickleError
from ldm_jax.convert.export import save_diffusers
from ldm_jax.convert.original_config import read_original_yaml, scheduler_config_from_ldm, spec_from_original_config
from ldm_jax.convert.original_pipeline import load_original_pipeline
from original_ckpt import (
    CONFIGS, clip_text_model, first_stage, ldm_state_dict, open_clip_context, open_clip_text_model, save_ckpt,
    save_safetensors, unet_model,
)
from tiny_sd import nchw, nhwc

TOL = 1e-4  # issue 4: float32 parity, max abs
IMAGE_TOL = 2e-3  # end-to-end images against diffusers
AE = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
          num_res_blocks=1, attn_resolutions=[], dropout=0.0)
SD1_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
                num_res_blocks=1, channel_mult=[1, 2], num_heads=8, use_spatial_transformer=True,
                transformer_depth=1, context_dim=64, legacy=False)
SD2_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[2, 1],
                num_res_blocks=1, channel_mult=[1, 2], num_head_channels=64, use_spatial_transformer=True,
                use_linear_in_transformer=True, transformer_depth=1, context_dim=128, legacy=False)
CIN_UNET = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2, 1],
                num_res_blocks=1, channel_mult=[1, 2], num_heads=1, use_spatial_transformer=True,
                transformer_depth=1, context_dim=32)
LABEL_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
                  num_res_blocks=1, channel_mult=[1, 2], num_head_channels=32, num_classes=5)
PROMPTS = ["a red apple on a table", "a blue car"]


def yaml_path(name):
    return os.path.join(CONFIGS, name)


def ldm_betas(start=0.00085, end=0.012):
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    return np.asarray(make_beta_schedule("linear", 1000, linear_start=start, linear_end=end), np.float64)


@functools.lru_cache(maxsize=None)
def jit_apply(module, method=None):
    """``module.apply`` under jit, one per (module, method): a compilation is cheaper on CPU
    than op-by-op dispatch, and pipelines with the same configuration share it."""
    return jax.jit(lambda params, *args: module.apply({"params": params}, *args, method=method))


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def unet_outputs(pipe, unet, in_channels, context_dim=None, labels=None, seed=0):
    """(ours, original) U-Net outputs, NCHW, for two timesteps."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, in_channels, 8, 8)).astype(np.float32)
    t = np.array([10, 800])
    ctx = None if context_dim is None else rng.standard_normal((2, 7, context_dim)).astype(np.float32)
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t), context=None if ctx is None else torch.from_numpy(ctx),
                   y=None if labels is None else torch.from_numpy(labels)).numpy()
    got = jit_apply(pipe.unet)(pipe.params["unet"], nhwc(x), t, ctx, labels)
    return np.asarray(got).transpose(0, 3, 1, 2), ref


def check_kl_autoencoder(pipe, first, name):
    image = np.random.default_rng(1).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        mean, logvar = first.encode(torch.from_numpy(image))
        decoded = first.decode(mean)
    post = jit_apply(pipe.vae, "encode")(pipe.params["vae"], nhwc(image))
    dec = jit_apply(pipe.vae, "decode")(pipe.params["vae"], post.mean)
    errs = (max_err(nchw(post.mean), mean), max_err(nchw(post.logvar), logvar), max_err(nchw(dec), decoded))
    print(f"{name} KL autoencoder: mean {errs[0]:.2e}, logvar {errs[1]:.2e}, decode {errs[2]:.2e}")
    assert max(errs) < TOL


def assert_same_params(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """SD 1.x layout: crossattn U-Net (8 heads, conv projections), KL-f2, transformers CLIP, EMA copies; .ckpt."""
    unet, first, text = unet_model(0, **SD1_UNET), first_stage(10, AE, 4), clip_text_model(20)
    # the layout of the released files (transformers 4 kept the "text_model." level)
    sd = ldm_state_dict(unet, first, text, "cond_stage_model.transformer.text_model.", betas=ldm_betas(), ema_seed=5)
    # buffers the released SD 1.x files carry next to the weights
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    sd["lvlb_weights"] = np.ones(1000, np.float32)
    path = save_ckpt(str(tmp_path_factory.mktemp("sd1") / "sd1.ckpt"), sd)
    pipe = ldm_jax.load_pipeline(path, config=yaml_path("tiny-v1-inference.yaml"))
    return dict(path=path, sd=sd, unet=unet, first=first, text=text, pipe=pipe)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """SD 2.x-v layout: linear projections, 64-channel heads, open_clip text tower (penultimate); .safetensors."""
    unet, first, text = unet_model(1, **SD2_UNET), first_stage(11, AE, 4), open_clip_text_model(21)
    sd = ldm_state_dict(unet, first, text, "cond_stage_model.model.", betas=ldm_betas())
    path = save_safetensors(str(tmp_path_factory.mktemp("sd2") / "sd2-v.safetensors"), sd)
    pipe = ldm_jax.load_pipeline(path, config=yaml_path("tiny-v2-inference-v.yaml"))
    return dict(path=path, sd=sd, unet=unet, first=first, text=text, pipe=pipe)


# ----------------------------------------------------------------------------- SD 1.x


def test_sd1_matches_original_modules(sd1):
    pipe = sd1["pipe"]
    got, ref = unet_outputs(pipe, sd1["unet"], 4, 64)
    print(f"SD1 UNet: max abs err {max_err(got, ref):.2e} (output scale {np.abs(ref).max():.2f})")
    assert max_err(got, ref) < TOL
    check_kl_autoencoder(pipe, sd1["first"], "SD1")
    ids = pipe.tokenize(PROMPTS)
    assert ids[1, -1] == 49407  # SD1 pads with <|endoftext|>, like its transformers tokenizer
    with torch.no_grad():
        want = sd1["text"](torch.from_numpy(ids).long()).last_hidden_state.numpy()
    context = jit_apply(pipe.text_encoder)(pipe.params["text_encoder"], ids)
    print(f"SD1 CLIP text encoder: max abs err {max_err(context, want):.2e}")
    assert max_err(context, want) < TOL


def test_sd1_schedule_and_settings_from_yaml(sd1):
    pipe = sd1["pipe"]
    cfg = pipe.scheduler_config
    assert (cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"]) == (
        "scaled_linear", 0.00085, 0.012, 1000)
    assert cfg["prediction_type"] == "epsilon" and cfg["steps_offset"] == 1
    # CompVis make_beta_schedule("linear") == diffusers "scaled_linear"
    want = np.cumprod(1.0 - ldm_betas())
    np.testing.assert_allclose(pipe.schedule.alphas_cumprod64, want, rtol=1e-12)
    assert pipe.scaling_factor == 0.18215 and pipe.sample_size == 8 and pipe.vae_scale_factor == 2


def test_sd1_inferred_config_gives_the_same_model(sd1):
    inferred = load_original_pipeline(sd1["path"])
    assert_same_params(inferred.params, sd1["pipe"].params)
    assert inferred.unet.config == sd1["pipe"].unet.config
    assert inferred.vae.config == sd1["pipe"].vae.config
    assert inferred.text_encoder.config == sd1["pipe"].text_encoder.config
    for key in ("beta_schedule", "num_train_timesteps", "prediction_type"):
        assert inferred.scheduler_config[key] == sd1["pipe"].scheduler_config[key]
    # linear_start / linear_end recovered from the float32 "betas" buffer
    assert (inferred.scheduler_config["beta_start"], inferred.scheduler_config["beta_end"]) == (0.00085, 0.012)


def test_ema_weights(sd1):
    pipe = load_original_pipeline(sd1["path"], config=yaml_path("tiny-v1-inference.yaml"), use_ema=True)
    sd = sd1["sd"]
    ema = {k[len("model.diffusion_model."):]: torch.from_numpy(sd["model_ema." + k[len("model."):].replace(".", "")])
           for k in sd if k.startswith("model.diffusion_model.")}
    reference = unet_model(0, **SD1_UNET)
    reference.load_state_dict(ema)
    got, ref = unet_outputs(pipe, reference, 4, 64)
    print(f"SD1 UNet from model_ema.*: max abs err {max_err(got, ref):.2e}")
    assert max_err(got, ref) < TOL
    assert max_err(got, unet_outputs(sd1["pipe"], sd1["unet"], 4, 64)[0]) > 1e-2  # really the other weights
    assert_same_params(pipe.params["vae"], sd1["pipe"].params["vae"])


def test_bf16_compute_close_to_float32(sd1):
    pipe = load_original_pipeline(sd1["path"], config=yaml_path("tiny-v1-inference.yaml"), dtype="bfloat16")
    assert jax.tree_util.tree_leaves(pipe.params)[0].dtype == jnp.float32
    got, ref = unet_outputs(pipe, sd1["unet"], 4, 64)
    rel = max_err(got, ref) / np.abs(ref).max()
    print(f"SD1 UNet bf16 compute: max abs err relative to the output scale {rel:.2e}")
    assert rel < 5e-2  # bf16 has 8 mantissa bits; ~20 layers deep


# ----------------------------------------------------------------------------- SD 2.x


def test_sd2_v_matches_original_modules(sd2):
    pipe = sd2["pipe"]
    assert pipe.scheduler_config["prediction_type"] == "v_prediction"
    assert pipe.text_encoder.config.output_layer == "penultimate" and pipe.text_encoder.config.num_heads == 2
    got, ref = unet_outputs(pipe, sd2["unet"], 4, 128)
    print(f"SD2-v UNet (linear projections, 64-ch heads): max abs err {max_err(got, ref):.2e}")
    assert max_err(got, ref) < TOL
    check_kl_autoencoder(pipe, sd2["first"], "SD2")
    ids = pipe.tokenize(PROMPTS)
    assert ids[1, -1] == 0  # open_clip pads with 0
    # open_clip.tokenize (FrozenOpenCLIPEmbedder) spells the specials <start_of_text> / <end_of_text>
    assert pipe.tokenizer.encode("a <end_of_text> b <|endoftext|>") == [320, 49407, 321, 27, 347, 40786, 4160, 91, 285]
    context = jit_apply(pipe.text_encoder)(pipe.params["text_encoder"], ids)
    want = open_clip_context(sd2["text"], ids, "penultimate")
    print(f"SD2 OpenCLIP text tower (penultimate): max abs err {max_err(context, want):.2e}")
    assert max_err(context, want) < TOL


def test_sd2_inferred_defaults_to_eps_with_a_warning(sd2):
    with pytest.warns(UserWarning, match="prediction_type='v_prediction'"):
        inferred = ldm_jax.load_pipeline(sd2["path"])
    assert inferred.scheduler_config["prediction_type"] == "epsilon"
    assert_same_params(inferred.params, sd2["pipe"].params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = ldm_jax.load_pipeline(sd2["path"], prediction_type="v_prediction")
    assert v.scheduler_config["prediction_type"] == "v_prediction"


# ----------------------------------------------------------------------------- other families


def test_inpainting_9_channels(tmp_path):
    unet = unet_model(4, **{**SD1_UNET, "in_channels": 9})
    first, text = first_stage(14, AE, 4), clip_text_model(24)
    # transformers-5 naming (no "text_model." level) is accepted as well
    sd = ldm_state_dict(unet, first, text, "cond_stage_model.transformer.", betas=ldm_betas())
    path = save_ckpt(str(tmp_path / "inpaint.ckpt"), sd)
    pipe = ldm_jax.load_pipeline(path, config=yaml_path("tiny-v1-inpainting-inference.yaml"))
    assert pipe.unet.config.in_channels == 9
    got, ref = unet_outputs(pipe, unet, 9, 64)
    print(f"inpainting UNet (9 channels): max abs err {max_err(got, ref):.2e}")
    assert max_err(got, ref) < TOL
    inferred = load_original_pipeline(path)
    assert_same_params(inferred.params, pipe.params)
    assert inferred.unet.config == pipe.unet.config


def test_class_conditional_cin_with_vq_first_stage(tmp_path):
    """cin256-v2 family: ClassEmbedder context through cross-attention, VQ first stage."""
    unet = unet_model(2, **CIN_UNET)
    first = first_stage(12, {**AE, "double_z": False, "z_channels": 3}, 3, n_embed=16)
    torch.manual_seed(3)
    embedder = torch.nn.Embedding(11, 32)
    sd = ldm_state_dict(unet, first, embedder, "cond_stage_model.embedding.",
                        betas=ldm_betas(0.0015, 0.0195))
    path = save_ckpt(str(tmp_path / "cin.ckpt"), sd)
    pipe = ldm_jax.load_pipeline(path, config=yaml_path("tiny-cin-ldm-vq.yaml"))
    assert_same_params(load_original_pipeline(path).params, pipe.params)

    got, ref = unet_outputs(pipe, unet, 3, 32)
    print(f"class-conditional (cross-attention) UNet: max abs err {max_err(got, ref):.2e}")
    assert max_err(got, ref) < TOL
    labels = pipe.tokenize(["3", "", 7])  # "" = the unconditional class n_classes - 1
    np.testing.assert_array_equal(labels, [[3], [10], [7]])
    context = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, labels)
    with torch.no_grad():
        want = embedder(torch.from_numpy(labels[:, 0]).long()[:, None]).numpy()  # ClassEmbedder: embedding(c[:, None])
    assert context.shape == (3, 1, 32) and max_err(context, want) < TOL

    image = np.random.default_rng(4).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        h = first.encode(torch.from_numpy(image))
        _, indices = first.quantize_latents(h)
        decoded = first.decode(h)
    enc = jit_apply(pipe.vae, "encode")(pipe.params["vae"], nhwc(image))
    dec = jit_apply(pipe.vae, "decode")(pipe.params["vae"], enc.pre_quant)
    assert len(np.unique(indices.numpy())) > 4  # several codes in use
    np.testing.assert_array_equal(enc.indices, indices.numpy())
    errs = max_err(nchw(enc.pre_quant), h), max_err(nchw(dec), decoded)
    print(f"VQ first stage: pre-quant {errs[0]:.2e}, quantise+decode {errs[1]:.2e}")
    assert max(errs) < TOL
    assert pipe.scaling_factor == 1.0  # LatentDiffusion's default scale_factor
    with pytest.raises(ValueError, match="class indices"):
        pipe.tokenize(["a cat"])
    out = pipe(["3", "7"], num_inference_steps=2, guidance_scale=3.0, height=16, width=16)
    assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="class-conditional LDM; diffusers has no pipeline"):
        save_diffusers(pipe, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """openaimodel UNet with the older AttentionBlock (fused qkv, 2 heads) and a label table."""
    unet, first = unet_model(3, **LABEL_UNET), first_stage(13, AE, 4)
    sd = ldm_state_dict(unet, first, None, betas=ldm_betas(0.0015, 0.0195))
    path = save_ckpt(str(tmp_path_factory.mktemp("labelled") / "labelled.ckpt"), sd)
    pipe = ldm_jax.load_pipeline(path, config=yaml_path("tiny-uncond-ldm-kl.yaml"))
    return dict(path=path, unet=unet, first=first, pipe=pipe)


def test_label_table_and_attention_block_unet(labelled):
    pipe = labelled["pipe"]
    labels = np.array([1, 4])
    got, ref = unet_outputs(pipe, labelled["unet"], 4, labels=labels)
    print(f"AttentionBlock UNet with label_emb: max abs err {max_err(got, ref):.2e}")
    assert max_err(got, ref) < TOL
    check_kl_autoencoder(pipe, labelled["first"], "LDM")
    assert pipe.text_encoder is None and pipe.scaling_factor == 0.5
    inferred = load_original_pipeline(labelled["path"])
    assert_same_params(inferred.params, pipe.params)
    out = pipe([""] * 2, num_inference_steps=2, guidance_scale=1.0, class_labels=[1, 2], height=16, width=16)
    assert out.shape == (2, 16, 16, 3) and np.isfinite(out).all()


def test_label_table_export_is_refused_but_components_load_in_diffusers(labelled, tmp_path):
    import diffusers

    from ldm_jax.convert.export import save_unet, save_vae

    with pytest.raises(ValueError, match="class-conditional LDM; diffusers has no pipeline"):
        save_diffusers(labelled["pipe"], str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    folder = str(tmp_path / "ldm")
    pipe = labelled["pipe"]
    save_unet(pipe.unet, pipe.params["unet"], os.path.join(folder, "unet"), pipe.sample_size)
    save_vae(pipe.vae, pipe.params["vae"], os.path.join(folder, "vae"), pipe.default_size)
    unet, info = diffusers.UNet2DModel.from_pretrained(folder, subfolder="unet", output_loading_info=True)
    assert not any(info.values()), info
    x = np.random.default_rng(5).standard_normal((2, 4, 8, 8)).astype(np.float32)
    t, labels = torch.tensor([10, 800]), torch.tensor([1, 4])
    with torch.no_grad():
        got = unet(torch.from_numpy(x), t, class_labels=labels).sample.numpy()
        ref = labelled["unet"](torch.from_numpy(x), t, y=labels).numpy()
    print(f"exported UNet2DModel (diffusers) vs original: max abs err {max_err(got, ref):.2e}")
    assert max_err(got, ref) < TOL
    _, info = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae", output_loading_info=True)
    assert not any(info.values()), info


UNCOND_UNET = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2, 1],
                   num_res_blocks=1, channel_mult=[1, 2], num_head_channels=32)


def test_unconditional_vq_export_runs_in_diffusers_ldm_pipeline(tmp_path):
    """celebahq-ldm-vq-4 family -> save_diffusers -> diffusers.LDMPipeline: same images from the same noise."""
    import json

    import diffusers

    unet = unet_model(6, **UNCOND_UNET)
    first = first_stage(16, {**AE, "double_z": False, "z_channels": 3}, 3, n_embed=16)
    sd = ldm_state_dict(unet, first, None, betas=ldm_betas(0.0015, 0.0195))
    path = save_ckpt(str(tmp_path / "uncond.ckpt"), sd)
    pipe = ldm_jax.load_pipeline(path, config=yaml_path("tiny-uncond-ldm-vq.yaml"))
    assert pipe.text_encoder is None and pipe.conditioning_key is None and pipe.vae.config.kind == "vq"
    folder = save_diffusers(pipe, str(tmp_path / "ldm"))
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "LDMPipeline" and index["vqvae"] == ["diffusers", "VQModel"] and "vae" not in index
    for cls, sub in ((diffusers.UNet2DModel, "unet"), (diffusers.VQModel, "vqvae")):
        _, info = cls.from_pretrained(folder, subfolder=sub, output_loading_info=True)
        assert not any(info.values()), (sub, info)

    ref_pipe = diffusers.LDMPipeline.from_pretrained(folder)
    ref_pipe.set_progress_bar_config(disable=True)
    # LDMPipeline draws its noise with randn_tensor(generator) = torch.randn on CPU; the same draw for ours
    latents = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = ref_pipe(batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=4,
                       output_type="np").images
    got = pipe([""] * 2, num_inference_steps=4, guidance_scale=1.0, sampler="ddim", latents=nhwc(latents))
    print(f"unconditional VQ LDM -> diffusers LDMPipeline: max abs image error {max_err(got, ref):.2e}")
    assert got.shape == ref.shape == (2, 16, 16, 3)
    assert max_err(got, ref) < IMAGE_TOL and got.std() > 1e-3
    back = ldm_jax.load_pipeline(folder)  # reads vqvae/ back
    assert_same_params(back.params, pipe.params)
    assert back.vae.config == pipe.vae.config


# ----------------------------------------------------------------------------- agreement with diffusers' converter


def test_key_mapping_agrees_with_diffusers_single_file_conversion(sd1, sd2):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from ldm_jax.convert.mapping import convert_state_dict
    from ldm_jax.convert.unet_diffusers import unet_abstract_params
    from ldm_jax.models.autoencoder import abstract_params

    for case, yaml_name in ((sd1, "tiny-v1-inference.yaml"), (sd2, "tiny-v2-inference-v.yaml")):
        spec = spec_from_original_config(read_original_yaml(yaml_path(yaml_name)), yaml_name)
        checkpoint = {k: torch.from_numpy(np.asarray(v)) for k, v in case["sd"].items()}
        theirs = convert_ldm_unet_checkpoint(checkpoint, spec.unet)
        pipe = case["pipe"]
        params = convert_state_dict({k: v.numpy() for k, v in theirs.items()}, unet_abstract_params(pipe.unet),
                                    source="diffusers")
        assert_same_params(params, pipe.params["unet"])
        theirs = convert_ldm_vae_checkpoint(checkpoint, spec.vae)
        params = convert_state_dict({k: v.numpy() for k, v in theirs.items()}, abstract_params(pipe.vae),
                                    source="diffusers")
        assert_same_params(params, pipe.params["vae"])


@pytest.mark.parametrize("name", ["v1-inference.yaml", "v2-inference-v.yaml", "x4-upscaling.yaml",
                                  "cin256-v2.yaml"])
def test_released_yaml_configs(name):
    """The released YAMLs give the released architectures (diffusers' configs for SD 1.x / 2.x)."""
    from diffusers.loaders.single_file_utils import (
        create_unet_diffusers_config_from_ldm, create_vae_diffusers_config_from_ldm,
    )

    original = read_original_yaml(yaml_path(name))
    spec = spec_from_original_config(original, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' image_size deprecation
        want_unet = create_unet_diffusers_config_from_ldm(original, {}, image_size=512)
        want_vae = create_vae_diffusers_config_from_ldm(original, {}, image_size=256)
    for key in ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
                "layers_per_block", "cross_attention_dim", "use_linear_projection",
                "transformer_layers_per_block", "num_class_embeds"):
        assert spec.unet.get(key) == want_unet.get(key), key
    assert spec.unet["only_cross_attention"] == want_unet.get("only_cross_attention", False)
    assert spec.unet["attention_head_dim"] == want_unet["attention_head_dim"]  # heads per block
    for key in ("in_channels", "out_channels", "block_out_channels", "latent_channels", "layers_per_block"):
        assert spec.vae[key] == want_vae[key], key
    if "scale_factor" in original["model"]["params"]:  # else LatentDiffusion's 1.0 (diffusers assumes 0.18215)
        assert spec.vae["scaling_factor"] == want_vae["scaling_factor"]
    expected = {
        "v1-inference.yaml": ("clip", "epsilon", 8, 64, "AutoencoderKL"),
        "v2-inference-v.yaml": ("open_clip", "v_prediction", [5, 10, 20, 20], 96, "AutoencoderKL"),
        "x4-upscaling.yaml": ("open_clip", "v_prediction", 8, 128, "AutoencoderKL"),
        "cin256-v2.yaml": ("class", "epsilon", 1, 64, "VQModel"),
    }[name]
    assert (spec.cond_stage, spec.scheduler["prediction_type"], spec.unet["attention_head_dim"], spec.sample_size,
            spec.vae["_class_name"]) == expected


def test_released_sd_architectures_have_the_released_sizes():
    from ldm_jax.convert.unet_diffusers import unet_abstract_params, unet_config_from_diffusers
    from ldm_jax.models.unet import UNet

    for name, want in (("v1-inference.yaml", 859_520_964), ("v2-inference-v.yaml", 865_910_724)):
        spec = spec_from_original_config(read_original_yaml(yaml_path(name)), name)
        params = unet_abstract_params(UNet(unet_config_from_diffusers(spec.unet)))
        assert sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params)) == want, name


def test_ldm_beta_schedules():
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    from ldm_jax.diffusion.schedule import NoiseSchedule

    for schedule in ("linear", "sqrt_linear", "cosine", "sqrt"):
        cfg = scheduler_config_from_ldm({"beta_schedule": schedule, "linear_start": 0.0015, "linear_end": 0.0195,
                                         "timesteps": 1000, "parameterization": "v"}, "test.yaml")
        want = np.asarray(make_beta_schedule(schedule, 1000, linear_start=0.0015, linear_end=0.0195), np.float64)
        np.testing.assert_allclose(NoiseSchedule.from_diffusers_config(cfg).betas64, want, rtol=1e-12, atol=1e-15)
        assert cfg["prediction_type"] == "v_prediction"


# ----------------------------------------------------------------------------- export round trip


@pytest.mark.parametrize("case,sampler", [("sd1", "ddim"), ("sd2", "dpmpp_2m")])
def test_export_round_trip_matches_diffusers(case, sampler, sd1, sd2, tmp_path):
    import diffusers
    import transformers

    from test_pipeline import DIFFUSERS_SCHEDULERS

    ours = {"sd1": sd1, "sd2": sd2}[case]["pipe"]
    folder = save_diffusers(ours, str(tmp_path / case))
    for cls, sub in ((diffusers.UNet2DConditionModel, "unet"), (diffusers.AutoencoderKL, "vae")):
        _, info = cls.from_pretrained(folder, subfolder=sub, output_loading_info=True)
        assert not any(info.values()), (sub, info)
    _, info = transformers.CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"),
                                                         output_loading_info=True)
    assert not any(info.values()), info

    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 requires_safety_checker=False)
    ref_pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler]).from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        ref = ref_pipe(PROMPTS, num_inference_steps=4, guidance_scale=7.5, height=16, width=16,
                       latents=nchw(latents), output_type="np").images
    got = ours(PROMPTS, num_inference_steps=4, guidance_scale=7.5, height=16, width=16, latents=latents,
               sampler=sampler)
    print(f"{case} -> diffusers folder, {sampler}: max abs image error {max_err(got, ref):.2e}")
    assert max_err(got, ref) < IMAGE_TOL and got.std() > 1e-3

    back = ldm_jax.load_pipeline(folder)
    assert_same_params(back.params["unet"], ours.params["unet"])
    assert_same_params(back.params["vae"], ours.params["vae"])
    text = dict(ours.params["text_encoder"])
    if ours.text_encoder.config.output_layer == "penultimate":  # written without its unused last block
        last = f"layers_{ours.text_encoder.config.num_layers - 1}"
        text["encoder"] = {k: v for k, v in text["encoder"].items() if k != last}
    assert_same_params(back.params["text_encoder"], text)
    assert back.tokenizer.pad_token_id == ours.tokenizer.pad_token_id
    for key in ("beta_start", "beta_end", "beta_schedule", "prediction_type", "steps_offset", "num_train_timesteps"):
        assert back.scheduler_config[key] == ours.scheduler_config[key]
    np.testing.assert_array_equal(back.tokenize(PROMPTS), ours.tokenize(PROMPTS))


# ----------------------------------------------------------------------------- errors


def test_wrong_yaml_names_key_and_shapes(sd1):
    with pytest.raises(CheckpointError) as e:
        ldm_jax.load_pipeline(sd1["path"], config=yaml_path("tiny-v2-inference-v.yaml"))
    msg = str(e.value)
    print(msg)
    assert "model.diffusion_model." in msg and "shape" in msg and "does not fit" in msg
    with pytest.raises(CheckpointError, match=r"(?s)'model\.diffusion_model\.input_blocks\.0\.0\.weight' has shape "
                                              r"\(32, 4, 3, 3\).*\(3, 3, 9, 32\).*does not fit"):
        ldm_jax.load_pipeline(sd1["path"], config=yaml_path("tiny-v1-inpainting-inference.yaml"))


def test_missing_keys_are_named(sd1, tmp_path):
    sd = dict(sd1["sd"])
    del sd["model.diffusion_model.out.2.bias"]
    del sd["first_stage_model.decoder.mid.attn_1.q.weight"]
    path = save_safetensors(str(tmp_path / "missing.safetensors"), sd)
    with pytest.raises(CheckpointError, match=r"missing.*model\.diffusion_model\.out\.2\.bias"):
        ldm_jax.load_pipeline(path, config=yaml_path("tiny-v1-inference.yaml"))
    sd["model.diffusion_model.out.2.bias"] = sd1["sd"]["model.diffusion_model.out.2.bias"]
    path = save_safetensors(str(tmp_path / "missing_vae.safetensors"), sd)
    with pytest.raises(CheckpointError, match=r"missing.*first_stage_model\.decoder\.mid\.attn_1\.q\.weight"):
        ldm_jax.load_pipeline(path, config=yaml_path("tiny-v1-inference.yaml"))
    text_only = {k: v for k, v in sd1["sd"].items() if not k.startswith(("cond_stage_model.", "model_ema."))}
    path = save_safetensors(str(tmp_path / "no_text.safetensors"), text_only)
    with pytest.raises(CheckpointError, match="FrozenCLIPEmbedder but the checkpoint has no"):
        ldm_jax.load_pipeline(path, config=yaml_path("tiny-v1-inference.yaml"))
    with pytest.raises(CheckpointError, match="no EMA weights"):
        load_original_pipeline(path, config=yaml_path("tiny-v1-inference.yaml"), use_ema=True)


def test_truncated_files(sd1, tmp_path):
    data = open(sd1["path"], "rb").read()
    for name in ("cut.ckpt", "cut.safetensors"):
        path = str(tmp_path / name)
        if name.endswith(".safetensors"):
            save_safetensors(path, sd1["sd"])
            data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        with pytest.raises(CheckpointError) as e:
            ldm_jax.load_pipeline(path)
        print(f"{name}: {e.value}")


def test_unsupported_options_are_named(sd1, tmp_path):
    import yaml

    cfg = read_original_yaml(yaml_path("tiny-v1-inference.yaml"))
    cfg["model"]["params"]["unet_config"]["params"]["resblock_updown"] = True
    path = str(tmp_path / "bad.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    with pytest.raises(CheckpointError, match="resblock_updown=True"):
        ldm_jax.load_pipeline(sd1["path"], config=path)
    cfg = read_original_yaml(yaml_path("tiny-v1-inference.yaml"))
    cfg["model"]["params"]["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.BERTEmbedder"}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    with pytest.raises(CheckpointError, match="BERTEmbedder"):
        ldm_jax.load_pipeline(sd1["path"], config=path)
    with open(path, "w") as f:
        f.write("model: [unclosed")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        ldm_jax.load_pipeline(sd1["path"], config=path)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_ckpt_is_refused(sd1, tmp_path):
    marker = tmp_path / "pwned"
    state = {k: torch.from_numpy(np.asarray(v)) for k, v in list(sd1["sd"].items())[:3]}
    path = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": state, "callbacks": _Exploit(str(marker))}, path)
    with pytest.raises(UnsafePickleError):
        ldm_jax.load_pipeline(path)
    assert not marker.exists()


def _count(tree):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name,expected", [
    # (conditioning_key as LatentDiffusion resolves it, cond stage, U-Net class, in_channels, first stage)
    ("celebahq-ldm-vq-4.yaml", (None, "none", "UNet2DModel", 3, "VQModel")),
    ("bsr_sr-config.yaml", ("concat", "identity", "UNet2DModel", 6, "VQModel")),  # concat_mode's default
    ("cin256-v2.yaml", ("crossattn", "class", "UNet2DConditionModel", 3, "VQModel")),
    ("v2-inpainting-inference.yaml", ("hybrid", "open_clip", "UNet2DConditionModel", 9, "AutoencoderKL")),
    ("x4-upscaling.yaml", ("hybrid-adm", "open_clip", "UNet2DConditionModel", 7, "AutoencoderKL")),
    ("cin-ldm-vq-f8.yaml", ("crossattn", "class", "UNet2DConditionModel", 4, "VQModel")),  # attn_resolutions [32]
])
def test_released_ldm_yamls_build_the_original_parameter_counts(name, expected):
    """Released YAMLs, verbatim: the parsed spec, and our U-Net / first stage at the released size have
    exactly as many parameters as the original openaimodel.UNetModel / Encoder+Decoder built from the
    same YAML (on torch's meta device: no memory, no init)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    from ldm_jax.convert.unet_diffusers import unet_abstract_params, unet_config_from_diffusers
    from ldm_jax.convert.vae_diffusers import vae_config_from_diffusers
    from ldm_jax.models.autoencoder import abstract_params, build_autoencoder
    from ldm_jax.models.unet import UNet
    from original_ckpt import FirstStage

    original = read_original_yaml(yaml_path(name))
    spec = spec_from_original_config(original, name)
    assert (spec.conditioning_key, spec.cond_stage, spec.unet["_class_name"], spec.unet["in_channels"],
            spec.vae["_class_name"]) == expected
    p = original["model"]["params"]
    first = p["first_stage_config"]["params"]
    with torch.device("meta"):
        unet_ref = UNetModel(**p["unet_config"]["params"])
        first_ref = FirstStage(first["ddconfig"], first["embed_dim"], first.get("n_embed"))
    ours_unet = unet_abstract_params(UNet(unet_config_from_diffusers(spec.unet)))
    ours_vae = abstract_params(build_autoencoder(vae_config_from_diffusers(spec.vae)))
    want_unet = sum(t.numel() for t in unet_ref.state_dict().values())
    want_vae = sum(t.numel() for t in first_ref.state_dict().values())
    print(f"{name}: U-Net {_count(ours_unet):,} parameters (original {want_unet:,}), first stage "
          f"{_count(ours_vae):,} (original {want_vae:,})")
    assert (_count(ours_unet), _count(ours_vae)) == (want_unet, want_vae)


def test_first_stage_attn_resolutions_become_levels():
    """cin-ldm-vq-f8.yaml (verbatim): attn_resolutions [32] at resolution 256 is level 3 of 4 (256 / 2**3),
    the lowest; attn_type none makes every AttnBlock an Identity; a resolution that puts the encoder's and
    the decoder's attention at different levels (the original halves down and doubles up) is named."""
    original = read_original_yaml(yaml_path("cin-ldm-vq-f8.yaml"))
    vae = spec_from_original_config(original, "cin-ldm-vq-f8.yaml").vae
    assert vae["down_block_types"] == ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]
    assert vae["up_block_types"] == ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3
    dd = original["model"]["params"]["first_stage_config"]["params"]["ddconfig"]
    dd["attn_type"] = "none"
    vae = spec_from_original_config(original, "cin-ldm-vq-f8.yaml").vae
    assert vae["down_block_types"] == ["DownEncoderBlock2D"] * 4 and not vae["mid_block_add_attention"]
    dd.update(attn_type="vanilla", resolution=260, attn_resolutions=[65])  # encoder 260/130/65, decoder 32/64
    with pytest.raises(CheckpointError, match=r"cin-ldm-vq-f8.yaml: first_stage_config ddconfig "
                                              r"attn_resolutions=\[65\] with resolution=260 is not supported.*"
                                              r"encoder levels \[2\] but decoder levels \[\]"):
        spec_from_original_config(original, "cin-ldm-vq-f8.yaml")


# First stages with AttnBlocks inside the levels (ddconfig attn_resolutions; KL-f16/f32, VQ-f8/f16):
# (ddconfig, levels with attention). KL: levels 0 and 1 of 3 (16 and 8 px); VQ: the lowest, level 2 (4 px).
AE_ATTN = {
    "kl": (dict(AE, ch_mult=[1, 2, 2], attn_resolutions=[16, 8]), (0, 1)),
    "vq": (dict(AE, double_z=False, z_channels=3, ch_mult=[1, 2, 2], attn_resolutions=[4]), (2,)),
}


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_first_stage_attention_in_levels_matches_original(kind, tmp_path):
    """The original Encoder/Decoder with attn_resolutions, loaded from its original names (with the
    YAML and inferred from the keys) against the original modules; exported to diffusers
    (AttnDownEncoderBlock2D / AttnUpDecoderBlock2D), run there, and read back."""
    import diffusers
    import yaml

    dd, levels = AE_ATTN[kind]
    cfg = read_original_yaml(yaml_path(f"tiny-uncond-ldm-{kind}.yaml"))
    p = cfg["model"]["params"]
    p["first_stage_config"]["params"]["ddconfig"] = dd
    p["unet_config"]["params"].pop("num_classes", None)  # unconditional: save_diffusers writes an LDMPipeline
    config = str(tmp_path / "attn.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    embed = p["first_stage_config"]["params"]["embed_dim"]
    unet = unet_model(7, **{**UNCOND_UNET, "in_channels": embed, "out_channels": embed})
    first = first_stage(17, dd, embed, n_embed=16 if kind == "vq" else None)
    assert {i for i in range(3) if len(first.encoder.down[i].attn)} == set(levels)
    sd = ldm_state_dict(unet, first, None, betas=ldm_betas(0.0015, 0.0195))
    path = save_ckpt(str(tmp_path / f"{kind}.ckpt"), sd)
    pipe = ldm_jax.load_pipeline(path, config=config)
    assert pipe.vae.config.attention_levels == levels and pipe.vae.config.downsample_factor == 4
    inferred = load_original_pipeline(path)
    assert inferred.vae.config.attention_levels == levels
    assert_same_params(inferred.params["vae"], pipe.params["vae"])

    image = np.random.default_rng(6).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    if kind == "kl":
        check_kl_autoencoder(pipe, first, "KL with attn_resolutions")
        with torch.no_grad():
            z, _ = first.encode(torch.from_numpy(image))
    else:
        with torch.no_grad():
            z = first.encode(torch.from_numpy(image))
            _, indices = first.quantize_latents(z)
        enc = jit_apply(pipe.vae, "encode")(pipe.params["vae"], nhwc(image))
        np.testing.assert_array_equal(enc.indices, indices.numpy())
        assert len(np.unique(indices.numpy())) > 4  # several codes in use
        dec = jit_apply(pipe.vae, "decode")(pipe.params["vae"], enc.pre_quant)
        with torch.no_grad():
            want = first.decode(z)
        errs = max_err(nchw(enc.pre_quant), z), max_err(nchw(dec), want)
        print(f"VQ with attn_resolutions: pre-quant {errs[0]:.2e}, quantise+decode {errs[1]:.2e}")
        assert max(errs) < TOL
    with torch.no_grad():
        want = first.decode(z).numpy()
    assert want.std() > 0.1  # a non-trivial comparison

    folder = save_diffusers(pipe, str(tmp_path / "ldm"))
    cls = diffusers.AutoencoderKL if kind == "kl" else diffusers.VQModel
    exported, info = cls.from_pretrained(folder, subfolder="vqvae", output_loading_info=True)
    assert not any(info.values()), info
    assert [t.startswith("Attn") for t in exported.config.down_block_types] == [i in levels for i in range(3)]
    with torch.no_grad():
        x = torch.from_numpy(image)
        latents = exported.encode(x).latent_dist.mean if kind == "kl" else exported.encode(x).latents
        decoded = exported.decode(z).sample.numpy()
    errs = max_err(latents, z), max_err(decoded, want)
    print(f"{kind} exported to diffusers vs original: encode {errs[0]:.2e}, decode {errs[1]:.2e}")
    assert max(errs) < TOL
    back = ldm_jax.load_pipeline(folder)
    assert back.vae.config == pipe.vae.config
    assert_same_params(back.params["vae"], pipe.params["vae"])

    if 0 in levels:  # a missing weight is named by its original key (up.0: the full-resolution level)
        del sd["first_stage_model.decoder.up.0.attn.1.proj_out.weight"]
        path = save_safetensors(str(tmp_path / "missing.safetensors"), sd)
        with pytest.raises(CheckpointError, match=r"missing.*first_stage_model\.decoder\.up\.0\.attn\.1\."
                                                  r"proj_out\.weight"):
            ldm_jax.load_pipeline(path, config=config)


# ----------------------------------------------------------------------------- fine-tuning from a released file


def _emoji_ldm_config(arg=""):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "emoji_ldm_cfg", os.path.join(os.path.dirname(CONFIGS), "..", "configs", "emoji_ldm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("use_ema", [False, True])
def test_fine_tuning_starts_from_the_released_file(sd1, use_ema):
    """init.checkpoint = an SD 1.x-layout .ckpt (+ its YAML): the first state's U-Net (params and
    EMA) is the file's (model.* or model_ema.*), placed on the 2x4 FSDP mesh; the frozen
    autoencoder, text encoder, tokenizer and scale factor are the file's; a step runs and
    moves the weights. model.unet = {} takes the file's architecture."""
    from jax.sharding import PartitionSpec as P

    from ldm_jax.training import sharding as shd
    from ldm_jax.training.ldm_task import LDMTask

    cfg = _emoji_ldm_config("runlocal")
    cfg.model.unet = {}
    cfg.init.checkpoint = sd1["path"]
    cfg.init.original_config = yaml_path("tiny-v1-inference.yaml")
    cfg.init.use_ema = use_ema
    cfg.first_stage.scale_by_std = False
    cfg.mesh.min_fsdp_size = 2 ** 10
    task = LDMTask(cfg, shd.make_mesh(2, 4))
    released = load_original_pipeline(sd1["path"], config=yaml_path("tiny-v1-inference.yaml"), use_ema=use_ema)
    state = task.init_state(jax.random.PRNGKey(0))
    host = shd.gather_to_host
    assert_same_params(host(state.params), host(released.params["unet"]))
    assert_same_params(host(state.ema_params), host(released.params["unet"]))
    assert_same_params(host(task.frozen["vae"]), host(released.params["vae"]))
    assert_same_params(host(task.frozen["text_encoder"]), host(released.params["text_encoder"]))
    if use_ema:  # the EMA copies differ from model.* (ema_seed), so this really picked them
        assert not np.allclose(np.asarray(host(state.params)["conv_in"]["kernel"]),
                               np.asarray(sd1["pipe"].params["unet"]["conv_in"]["kernel"]))
    assert task.scale_factor == np.float32(0.18215)
    assert task.tokenizer(["a"]).shape == (1, 77)
    kernel = state.params["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]
    assert kernel.shape == (3, 3, 32, 64) and kernel.sharding.spec == P(None, None, None, "fsdp")
    if use_ema:
        return  # the step below is the same program for both
    before = np.asarray(host(state.params)["conv_in"]["kernel"])
    batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
             "caption": np.asarray(["a red apple", "a blue car"] * 4)}
    state1, metrics = task.train_step(state, shd.shard_batch(task.prepare_batch(batch), task.mesh))
    assert np.isfinite(float(metrics["loss"]))
    assert np.abs(np.asarray(host(state1.params)["conv_in"]["kernel"]) - before).max() > 0


def test_fine_tuning_refuses_another_architecture(sd1):
    """model.unet that does not describe the file's U-Net: a CheckpointError naming the leaves."""
    from ldm_jax.training import sharding as shd
    from ldm_jax.training.ldm_task import LDMTask

    cfg = _emoji_ldm_config("runlocal")  # a (32, 64) U-Net with 2 heads and 32-wide context
    cfg.model.unet = dict(cfg.model.unet, cross_attention_dim=64)
    cfg.init.checkpoint = sd1["path"]
    cfg.init.original_config = yaml_path("tiny-v1-inference.yaml")
    with pytest.raises(CheckpointError, match=r"sd1.ckpt: its U-Net does not match config.model.unet: .*"
                                              r"(missing|unexpected|checkpoint \()"):
        LDMTask(cfg, shd.make_mesh(1, 1, devices=jax.devices()[:1]))


def test_fine_tuning_refuses_another_schedule_or_objective(sd1, caplog):
    """diffusion.beta_* / prediction_type that are not the file's (its YAML's linear_start 0.00085,
    linear_end 0.012, eps): a ValueError naming both, unless init.allow_schedule_change."""
    import logging

    from ldm_jax.training import sharding as shd
    from ldm_jax.training.ldm_task import LDMTask

    def config(**diffusion):
        cfg = _emoji_ldm_config("runlocal")
        cfg.model.unet = {}
        cfg.init.checkpoint = sd1["path"]
        cfg.init.original_config = yaml_path("tiny-v1-inference.yaml")
        for key, value in diffusion.items():
            cfg.diffusion[key] = value
        return cfg

    mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"sd1.ckpt differ: prediction_type='v_prediction' vs the file's 'epsilon'"):
        LDMTask(config(prediction_type="v_prediction"), mesh)
    with pytest.raises(ValueError, match=r"noise schedule .*beta_end=0.02.* vs the file's .*beta_end=0.012.*"
                                         r"init.allow_schedule_change=True"):
        LDMTask(config(beta_end=0.02), mesh)
    cfg = config(prediction_type="v_prediction")
    cfg.init.allow_schedule_change = True
    with caplog.at_level(logging.WARNING, logger="ldm_jax.training.init_checkpoint"):
        task = LDMTask(cfg, mesh)
    assert task.step_cfg.prediction_type == "v_prediction"
    assert "prediction_type='v_prediction' vs the file's 'epsilon'" in caplog.text


# ------------------------------------------------------------------ inpainting from a text-to-image file
# SD-inpainting's recipe (runwayml sd-v1-5-inpainting from sd-v1-2 / v1-5): the text-to-image U-Net with
# 5 more input channels in its first convolution, zero-initialised. The reference is the original
# LatentInpaintDiffusion (sdkit's ldm = Stability's SD 2 repository) built with ckpt_path = the file:
# LatentFinetuneDiffusion.init_from_ckpt does `new = zeros_like(param); new[:, :keep_dims] = ckpt` for
# finetune_keys (model.diffusion_model.input_blocks.0.0.weight, keep_finetune_dims 4).


def original_inpainting_from(path):
    """The original LatentInpaintDiffusion (tiny-v1-inpainting-inference.yaml) initialised from the
    text-to-image file ``path``; returns its widened U-Net (torch)."""
    import contextlib
    import io

    from omegaconf import OmegaConf

    from original_ckpt import import_ldm_ddpm

    ddpm, _ = import_ldm_ddpm()
    params = OmegaConf.load(yaml_path("tiny-v1-inpainting-inference.yaml")).model.params
    params.cond_stage_config = {"target": "torch.nn.Identity"}  # FrozenCLIPEmbedder would download CLIP
    params.ckpt_path = path
    with contextlib.redirect_stdout(io.StringIO()) as out:
        model = ddpm.LatentInpaintDiffusion(**params).eval()
    assert "modifying key 'model.diffusion_model.input_blocks.0.0.weight'" in out.getvalue()  # its finetune path
    return model.model.diffusion_model


def _inpainting_config(path, unet=None):
    cfg = _emoji_ldm_config("runlocal")
    cfg.model.unet = unet or {}
    cfg.diffusion.concat = "inpainting"
    cfg.init.checkpoint = path
    cfg.init.original_config = yaml_path("tiny-v1-inference.yaml")
    cfg.first_stage.scale_by_std = False
    cfg.mesh.min_fsdp_size = 2 ** 10
    return cfg


def test_inpainting_fine_tuning_from_a_text_to_image_file_widens_conv_in(sd1, tmp_path, caplog):
    """diffusion.concat="inpainting" + init.checkpoint = a plain (4-channel) SD file, model.unet={}: the
    U-Net takes 4 + 5 channels; the first state (params and EMA, 2x4 FSDP mesh) equals the original
    LatentInpaintDiffusion's U-Net after init_from_ckpt from that file (saved in the original format and
    loaded with the 9-channel YAML): conv_in's first 4 input channels the file's, the 5 new ones 0,
    every other leaf the file's. A step runs and trains the new channels. An explicit model.unet with
    in_channels=9 gives the same start weights."""
    import logging

    from ldm_jax.training import sharding as shd
    from ldm_jax.training.ldm_task import LDMTask

    released = sd1["pipe"].params["unet"]
    # The original: input_blocks.0.0.weight (O, I, kh, kw) widened to 9 input channels with zeros.
    orig_unet = original_inpainting_from(sd1["path"])
    w = orig_unet.input_blocks[0][0].weight.detach().numpy()
    assert w.shape == (32, 9, 3, 3) and not w[:, 4:].any()
    np.testing.assert_array_equal(w[:, :4], sd1["unet"].input_blocks[0][0].weight.detach().numpy())
    sd = ldm_state_dict(orig_unet, sd1["first"], sd1["text"], "cond_stage_model.transformer.text_model.",
                        betas=ldm_betas())
    ref = load_original_pipeline(save_ckpt(str(tmp_path / "orig-inpainting.ckpt"), sd),
                                 config=yaml_path("tiny-v1-inpainting-inference.yaml"))
    assert ref.unet.config.in_channels == 9

    with caplog.at_level(logging.INFO, logger="ldm_jax.training.init_checkpoint"):
        task = LDMTask(_inpainting_config(sd1["path"]), shd.make_mesh(2, 4))
    assert task.unet.config.in_channels == 9 and task.unet.config == dataclasses.replace(
        sd1["pipe"].unet.config, in_channels=9, remat_blocks=task.unet.config.remat_blocks)
    assert "conv_in widened from 4 to 9 input channels for diffusion.concat='inpainting'" in caplog.text
    state = task.init_state(jax.random.PRNGKey(0))
    host = shd.gather_to_host
    start = host(state.params)
    assert_same_params(start, host(ref.params["unet"]))  # = the original's widened U-Net
    assert_same_params(host(state.ema_params), start)
    kernel = np.asarray(start["conv_in"]["kernel"])  # (3, 3, in, out)
    assert kernel.shape == (3, 3, 9, 32) and not kernel[:, :, 4:].any()
    np.testing.assert_array_equal(kernel[:, :, :4], np.asarray(released["conv_in"]["kernel"]))
    rest = lambda p: {k: v for k, v in p.items() if k != "conv_in"}  # noqa: E731
    assert_same_params(rest(start), host(rest(released)))
    np.testing.assert_array_equal(start["conv_in"]["bias"], np.asarray(released["conv_in"]["bias"]))
    assert_same_params(host(task.frozen["vae"]), host(sd1["pipe"].params["vae"]))

    batch = {"image": np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8),
             "caption": np.asarray(["a red apple", "a blue car"] * 4)}
    state1, metrics = task.train_step(state, shd.shard_batch(task.prepare_batch(batch), task.mesh))
    new = np.asarray(host(state1.params)["conv_in"]["kernel"])[:, :, 4:]
    print(f"inpainting from a 4-channel file: loss {float(metrics['loss']):.5f}, new conv_in channels after one "
          f"step max |w| {np.abs(new).max():.2e}")
    assert np.isfinite(float(metrics["loss"])) and np.abs(new).max() > 0  # the concat channels train

    # model.unet given (the file's architecture with in_channels 9): the same start weights.
    fields = dataclasses.asdict(sd1["pipe"].unet.config)
    explicit = LDMTask(_inpainting_config(sd1["path"], dict(fields, in_channels=9)), shd.make_mesh(2, 4))
    assert_same_params(host(explicit._start_params["unet"]), start)


def test_inpainting_fine_tuning_refuses_other_mismatches(sd1):
    """Only conv_in's input channels may differ, and only from a file that takes the latents alone."""
    from types import SimpleNamespace

    from ldm_jax.training import sharding as shd
    from ldm_jax.training.init_checkpoint import start_unet_params
    from ldm_jax.training.ldm_task import LDMTask

    fields = dataclasses.asdict(sd1["pipe"].unet.config)
    cfg = _inpainting_config(sd1["path"], dict(fields, in_channels=9, block_out_channels=(32, 32)))
    with pytest.raises(CheckpointError, match=r"sd1.ckpt: its U-Net does not match config.model.unet: .*"
                                              r"conv_in/kernel: checkpoint \(3, 3, 4, 32\), model.unet \(3, 3, 9, 32\)"
                                              r".*widened only from a checkpoint that takes the 4 latent channels"):
        LDMTask(cfg, shd.make_mesh(1, 1, devices=jax.devices()[:1]))

    def params(in_channels, out=8):
        return {"conv_in": {"kernel": np.ones((3, 3, in_channels, out), np.float32), "bias": np.ones(out, np.float32)}}

    def start(file_in, want_in, concat="inpainting", want_out=8):
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params(want_in, want_out))
        return start_unet_params(abstract, SimpleNamespace(params={"unet": params(file_in)}, source="file.ckpt"),
                                 concat, 4)

    got = start(4, 9)["conv_in"]["kernel"]
    assert got.shape == (3, 3, 9, 8) and np.asarray(got[:, :, :4]).all() and not np.asarray(got[:, :, 4:]).any()
    assert start(4, 7, "low_res")["conv_in"]["kernel"].shape == (3, 3, 7, 8)  # the low-res image: 3 zero channels
    with pytest.raises(CheckpointError, match=r"file.ckpt: .*conv_in/kernel: checkpoint \(3, 3, 7, 8\), model.unet "
                                              r"\(3, 3, 9, 8\).*takes the 4 latent channels alone"):
        start(7, 9)  # a concat model (e.g. the x4 upscaler's 4 + 3) is not re-purposed
    with pytest.raises(CheckpointError, match=r"conv_in/kernel: checkpoint \(3, 3, 4, 8\), model.unet \(3, 3, 9, 8\)"):
        start(4, 9, "none")  # no concat: nothing to widen for
    with pytest.raises(CheckpointError, match=r"conv_in/bias.*conv_in/kernel"):
        start(4, 9, want_out=16)  # another difference in the same layer
