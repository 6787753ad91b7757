"""Single-file CompVis / Stability checkpoints as users have them on disk: the same weights in other
containers (Lightning / bare / wrapped / DataParallel, safetensors under any name, fp16 / bf16), with other
content (EMA on / off / only, schedule buffers, training leftovers, LoRA, pruned text encoders, standalone
VAE files, SD 1 / SD 2 mixes) and the model families inferred without a YAML. Each either gives the model
the original ``ldm`` modules give with those weights, or is refused with a ``CheckpointError`` naming the
file and the key.

The tiny SD 1.x checkpoint is ``test_original``'s (``original_ckpt``: sdkit's UNetModel / Encoder / Decoder,
transformers CLIP, random perturbed weights); the architecture sweep is ``test_original_config_sweep``'s.
"""
import os
import warnings

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import ldm_jax
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.original_pipeline import read_original_checkpoint
from original_ckpt import (
    CONFIGS, clip_text_model, ddim_sample, first_stage, latent_diffusion, ldm_state_dict, open_clip_text_model,
    save_ckpt, save_safetensors, unet_model,
)
from tiny_sd import nchw, nhwc

from test_original import AE, SD1_UNET, SD2_UNET, TOL, ldm_betas, max_err, unet_outputs  # noqa: E402

YAML = os.path.join(CONFIGS, "tiny-v1-inference.yaml")
CLIP_PREFIX = "cond_stage_model.transformer.text_model."


def ema_name(key):  # LitEma: model_ema. + the DiffusionWrapper parameter name without dots
    return "model_ema." + key[len("model."):].replace(".", "")


def reference_unet(weights, params=SD1_UNET):
    """sdkit's UNetModel holding ``weights`` (model.diffusion_model.* names, any float dtype)."""
    unet = unet_model(0, **params)
    unet.load_state_dict({k[len("model.diffusion_model."):]: torch.from_numpy(np.asarray(v, np.float32))
                          for k, v in weights.items()})
    return unet


def flat(params):
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}


def assert_params(pipe, base, cast=None):
    """``pipe``'s parameters are ``base``'s (rounded through ``cast`` for fp16 / bf16 files)."""
    got, want = flat(pipe.params), flat(base.params)
    assert got.keys() == want.keys()
    for key, value in want.items():
        if cast is not None:
            value = value.astype(cast).astype(np.float32)
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ldm_jax.load_pipeline(path, **kw)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """SD 1.x weights with EMA copies, the LitEma buffers and the schedule buffers; loaded from a Lightning .ckpt."""
    unet, first, text = unet_model(0, **SD1_UNET), first_stage(10, AE, 4), clip_text_model(20)
    sd = ldm_state_dict(unet, first, text, CLIP_PREFIX, betas=ldm_betas(), ema_seed=5)
    sd[CLIP_PREFIX + "embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    folder = tmp_path_factory.mktemp("variants")
    base = ldm_jax.load_pipeline(save_ckpt(str(folder / "base.ckpt"), sd), config=YAML)
    got, ref = unet_outputs(base, unet, 4, 64)
    assert max_err(got, ref) < TOL
    return dict(sd=sd, unet=unet, base=base, folder=folder)


# ----------------------------------------------------------------------------- containers


def _tensors(sd, dtype=None):
    out = {}
    for k, v in sd.items():
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def _write(kind, sd, folder):
    """The state dict saved as ``kind``; returns the path."""
    if kind == "lightning":  # what Lightning's ModelCheckpoint writes next to the weights
        path = str(folder / "lightning.ckpt")
        torch.save({"state_dict": _tensors(sd), "global_step": 470000, "epoch": 3,
                    "pytorch-lightning_version": "1.4.2",
                    "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(3)}},
                                          "param_groups": [{"lr": 1e-4, "params": [0]}]}],
                    "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 3, "lr_lambdas": [{"warm_up_steps": [1]}]}],
                    "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}},
                    "hyper_parameters": {"lr": 1e-4}}, path)
        return path
    if kind in ("bare.pt", "bare.pth", "bare.bin", "bare.CKPT", "bare-no-suffix", "bare-as.safetensors"):
        path = str(folder / kind)
        torch.save(_tensors(sd), path)
        return path
    if kind in ("st.safetensors", "st.SAFETENSORS", "st-as.ckpt", "st-no-suffix"):  # renamed safetensors files
        return save_safetensors(str(folder / kind), sd)
    if kind == "data-parallel":  # torch.nn.DataParallel(model).state_dict()
        path = str(folder / "dp.ckpt")
        torch.save({"state_dict": _tensors({"module." + k: v for k, v in sd.items()})}, path)
        return path
    if kind == "model-prefix":  # a training wrapper holding the LatentDiffusion as .model, saved as safetensors
        return save_safetensors(str(folder / "wrapper.safetensors"), {"model." + k: v for k, v in sd.items()})
    if kind in ("model", "module"):  # {"model": sd} (plain trainers), {"module": sd} (DeepSpeed)
        path = str(folder / f"wrapped-{kind}.ckpt")
        torch.save({kind: _tensors(sd), "epoch": 1}, path)
        return path
    if kind == "fp16.ckpt":
        path = str(folder / kind)
        torch.save({"state_dict": _tensors(sd, torch.float16)}, path)
        return path
    if kind == "bf16.safetensors":
        return save_safetensors(str(folder / kind), {k: v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v
                                                     for k, v in sd.items()})
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["lightning", "bare.pt", "bare.bin", "bare.CKPT", "bare-no-suffix",
                                  "bare-as.safetensors", "st.safetensors",
                                  "st.SAFETENSORS", "st-as.ckpt", "st-no-suffix", "data-parallel", "model-prefix",
                                  "model", "module"])
def test_containers_give_the_same_model(sd1, kind):
    """The format is read from the content (a safetensors file renamed .ckpt / upper case / without suffix was
    sent to the pickle reader and refused, a torch file named .safetensors to the safetensors reader); {"model": sd} / {"module": sd} wrappers and a DataParallel
    ``module.`` / wrapper ``model.`` prefix (every key) give the original names (were "holds no tensors" /
    "no U-Net weights")."""
    path = _write(kind, sd1["sd"], sd1["folder"])
    state, step = read_original_checkpoint(path)
    assert state.keys() == sd1["sd"].keys() and step == (470000 if kind == "lightning" else None)
    for key, value in sd1["sd"].items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)
    if kind in ("lightning", "st-as.ckpt", "data-parallel", "model"):  # the whole load (the rest reads the same)
        assert_params(load(path, config=YAML if kind == "lightning" else None), sd1["base"])


@pytest.mark.parametrize("kind,cast", [("fp16.ckpt", np.float16), ("bf16.safetensors", ml_dtypes.bfloat16)])
def test_half_precision_files(sd1, kind, cast):
    """fp16 / bf16 releases: the weights as stored (widened to float32), and without a YAML the schedule's
    decimals recovered from the rounded ``betas`` buffer (were taken as 0.00085020 / 0.01200104 ``trained_betas``,
    a different schedule from the one the file was trained with)."""
    path = _write(kind, sd1["sd"], sd1["folder"])
    pipe = load(path)
    assert_params(pipe, sd1["base"], cast)
    cfg = pipe.scheduler_config
    assert (cfg["beta_schedule"], cfg["beta_start"], cfg["beta_end"], cfg["trained_betas"]) == (
        "scaled_linear", 0.00085, 0.012, None)
    weights = {k: v.astype(cast) for k, v in sd1["sd"].items() if k.startswith("model.diffusion_model.")}
    got, ref = unet_outputs(pipe, reference_unet(weights), 4, 64)
    assert max_err(got, ref) < TOL
    with warnings.catch_warnings():  # the rounded buffers agree with the YAML's schedule: no "differs" warning
        warnings.simplefilter("error")
        assert ldm_jax.load_pipeline(path, config=YAML).scheduler_config == cfg


def test_size_one_scale_factor_buffer(sd1, tmp_path):
    """A (1,) ``scale_factor`` buffer (0-d tensors re-saved by some tools) raised a TypeError."""
    sd = {**sd1["sd"], "scale_factor": np.asarray([0.13025], np.float32)}
    pipe = load(save_safetensors(str(tmp_path / "scale.safetensors"), sd))
    assert pipe.scaling_factor == pytest.approx(0.13025)


# ----------------------------------------------------------------------------- EMA


def test_ema_only_file_with_its_yaml(sd1, tmp_path):
    """Only ``model_ema.*`` U-Net weights: the original (use_ema=True) loads them with strict=False and samples
    inside ema_scope; the names come from the configuration (was "no U-Net weights"). Without use_ema, or
    without a YAML (the dotless names cannot be parsed), it is refused saying so."""
    sd = sd1["sd"]
    only = {k: v for k, v in sd.items() if not k.startswith("model.diffusion_model.")}
    path = save_safetensors(str(tmp_path / "ema-only.safetensors"), only)
    pipe = load(path, config=YAML, use_ema=True)
    ema = {k: sd[ema_name(k)] for k in sd if k.startswith("model.diffusion_model.")}
    got, ref = unet_outputs(pipe, reference_unet(ema), 4, 64)
    assert max_err(got, ref) < TOL
    assert_params(load(sd1["base"].source, config=YAML, use_ema=True), pipe)  # = the EMA of the full file
    with pytest.raises(CheckpointError, match=r"ema-only\.safetensors.*only their EMA copies.*use_ema=True"):
        load(path, config=YAML)
    with pytest.raises(CheckpointError, match=r"ema-only\.safetensors.*only EMA weights.*use_ema=True"):
        load(path, use_ema=True)
    del only[ema_name("model.diffusion_model.out.2.bias")]
    path = save_safetensors(str(tmp_path / "ema-partial.safetensors"), only)
    with pytest.raises(CheckpointError, match=r"ema-partial.*'model_ema\.diffusion_modelout2bias'"):
        load(path, config=YAML, use_ema=True)


# ----------------------------------------------------------------------------- schedule buffers


def test_schedule_buffers_win_over_the_yaml_as_in_the_original(tmp_path):
    """LatentDiffusion.load_state_dict overwrites the schedule buffers register_schedule made from the YAML and
    DDIMSampler reads model.alphas_cumprod: a file whose buffers differ from its YAML samples with the file's
    schedule. (ldm_jax used the YAML's.) Compared with the original LatentDiffusion + DDIMSampler."""
    cfg = OmegaConf.load(os.path.join(CONFIGS, "tiny-uncond-ldm-kl.yaml"))
    del cfg.model.params.unet_config.params["num_classes"]
    yaml_file = str(tmp_path / "uncond.yaml")
    OmegaConf.save(cfg, yaml_file)
    model = latent_diffusion(yaml_file, seed=40)
    model.register_schedule(linear_start=0.00085, linear_end=0.012)  # the file's, not the YAML's 0.0015..0.0195
    path = save_ckpt(str(tmp_path / "resched.ckpt"), {k: v.detach().numpy().copy()
                                                      for k, v in model.state_dict().items()})
    with pytest.warns(UserWarning, match=r"resched\.ckpt: the checkpoint's 'betas' buffer differs from the YAML"):
        pipe = ldm_jax.load_pipeline(path, config=yaml_file)
    x_T = np.random.default_rng(41).standard_normal((1, 8, 8, 4)).astype(np.float32)
    z_ref = ddim_sample(model, nchw(x_T), 4)
    _, steps = pipe([""], num_inference_steps=4, guidance_scale=1.0, sampler="ddim", latents=x_T,
                    return_intermediates=True)
    assert max_err(steps[-1], nhwc(z_ref)) < 1e-3


def test_schedule_from_alphas_cumprod_only(sd1, tmp_path):
    """A file that kept ``alphas_cumprod`` but not ``betas``: the schedule is recovered from it."""
    sd = {k: v for k, v in sd1["sd"].items() if k != "betas"}
    sd["alphas_cumprod"] = np.cumprod(1.0 - ldm_betas(0.0015, 0.0195)).astype(np.float32)
    cfg = load(save_safetensors(str(tmp_path / "ac.safetensors"), sd)).scheduler_config
    assert (cfg["beta_start"], cfg["beta_end"], cfg["trained_betas"]) == (0.0015, 0.0195, None)


# ----------------------------------------------------------------------------- extra and missing content


def test_training_leftovers_and_lora(sd1, tmp_path):
    """Autoencoder loss weights, logvar, LitEma buffers, a (1,) scale_factor and a float position_ids are
    ignored as by the original; LoRA weights beside the model are not applied (with a warning), inside the
    U-Net they are refused by name."""
    sd = dict(sd1["sd"])
    sd.update({"first_stage_model.loss.discriminator.main.0.weight": np.zeros((8, 3, 4, 4), np.float32),
               "first_stage_model.loss.logvar": np.zeros((), np.float32), "logvar": np.zeros(1000, np.float32),
               "posterior_variance": np.zeros(1000, np.float32), CLIP_PREFIX + "embeddings.position_ids":
               np.arange(77, dtype=np.float32)[None] - 1e-4,
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 32), np.float32)})
    with pytest.warns(UserWarning, match=r"LoRA weights beside the model .*lora_unet_down_blocks_0"):
        pipe = ldm_jax.load_pipeline(save_safetensors(str(tmp_path / "extra.safetensors"), sd), config=YAML)
    assert_params(pipe, sd1["base"])
    sd["model.diffusion_model.input_blocks.1.1.proj_in.lora_down.weight"] = np.zeros((4, 32), np.float32)
    with pytest.raises(CheckpointError, match=r"lora-in\.safetensors: 1 LoRA adapter weights inside the model "
                                              r".*proj_in\.lora_down"):
        load(save_safetensors(str(tmp_path / "lora-in.safetensors"), sd), config=YAML)


def test_pruned_text_encoder_and_sd1_sd2_mixes(sd1, tmp_path):
    """No cond_stage_model.* (the original downloads its text encoder): refused without a YAML too (was loaded as
    an unconditional model that cannot run). A text encoder whose width is not the U-Net's context width (an SD 1 /
    SD 2 mix) is refused at load (the original fails at the first forward); with both text towers in the file the
    one that fits the U-Net is taken."""
    sd = sd1["sd"]
    no_text = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    path = save_safetensors(str(tmp_path / "pruned.safetensors"), no_text)
    with pytest.raises(CheckpointError, match=r"pruned\.safetensors: the U-Net cross-attends to a 64-wide context.*"
                                              r"no text encoder weights \(cond_stage_model\.\*\)"):
        load(path)
    sd2_text = {"cond_stage_model.model." + k: v.detach().numpy()
                for k, v in open_clip_text_model(21).state_dict().items()}
    path = save_safetensors(str(tmp_path / "mix.safetensors"), {**no_text, **sd2_text})
    with pytest.raises(CheckpointError, match=r"mix\.safetensors: the conditioning model .* gives 128-wide contexts "
                                              r"but the U-Net's cross-attention .* takes 64"):
        load(path)
    wide = {CLIP_PREFIX + k: v.detach().numpy() for k, v in clip_text_model(22, hidden=128).state_dict().items()}
    with pytest.raises(CheckpointError, match="gives 128-wide contexts"):
        load(save_safetensors(str(tmp_path / "wide.safetensors"), {**no_text, **wide}), config=YAML)
    both = load(save_safetensors(str(tmp_path / "both.safetensors"), {**sd, **sd2_text}))
    assert_params(both, sd1["base"])


def test_standalone_vae_file(sd1, tmp_path):
    """A standalone first-stage file (vae-ft-mse-840000-ema-pruned.ckpt layout: encoder.*, decoder.*, loss.*)
    replaces the checkpoint's autoencoder with ``vae=``; loaded as a model it is refused saying what it is."""
    other = first_stage(30, AE, 4)
    vae_sd = {k: v.detach().numpy() for k, v in other.state_dict().items()}
    vae_sd.update({"loss.logvar": np.zeros((), np.float32), "model_ema.decay": np.asarray(0.999, np.float32)})
    vae_path = str(tmp_path / "vae-ft-mse.ckpt")
    torch.save({"state_dict": _tensors(vae_sd), "global_step": 840000}, vae_path)
    with pytest.raises(CheckpointError, match=r"vae-ft-mse\.ckpt: a standalone autoencoder"):
        load(vae_path)
    pipe = load(sd1["base"].source, config=YAML, vae=vae_path)
    # = the checkpoint holding that autoencoder as first_stage_model.* (whose parity test_original checks)
    swapped = {k: v for k, v in sd1["sd"].items() if not k.startswith("first_stage_model.")}
    swapped.update({"first_stage_model." + k: v.detach().numpy() for k, v in other.state_dict().items()})
    assert_params(pipe, load(save_safetensors(str(tmp_path / "swapped.safetensors"), swapped), config=YAML))
    assert max_err(pipe.params["vae"]["encoder"]["conv_in"]["kernel"],
                   sd1["base"].params["vae"]["encoder"]["conv_in"]["kernel"]) > 1e-2  # really another one
    diffusers_vae = {k: np.zeros((1,), np.float32) for k in (
        "encoder.conv_in.weight", "encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.conv_out.weight")}
    path = save_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"), diffusers_vae)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: a diffusers-format autoencoder"):
        load(sd1["base"].source, config=YAML, vae=path)


# ----------------------------------------------------------------------------- families without a YAML


def _family(tmp_path, name, unet_params, text, prefix, extra=None):
    unet = unet_model(0, **unet_params)
    sd = ldm_state_dict(unet, first_stage(10, AE, 4), text, prefix, betas=ldm_betas())
    sd.update(extra or {})
    return unet, save_safetensors(str(tmp_path / f"{name}.safetensors"), sd)


@pytest.mark.parametrize("name,in_channels,warning", [
    ("instruct-pix2pix", 8, r"latents \+ 4 image channels, as instruct-pix2pix.*image_conditioning="),
    ("depth2img", 5, r"depth-to-image model \(LatentDepth2ImageDiffusion.*depth_model\.\*\) is not loaded"),
])
def test_image_conditioned_families_load_with_what_they_need(tmp_path, name, in_channels, warning):
    """instruct-pix2pix (8 channels) and depth2img (5, MiDaS depth_model.*) U-Nets are the original's and take
    their extra channels as image_conditioning=; a warning says what they are (were loaded silently)."""
    rng = np.random.default_rng(0)
    extra = {"depth_model.model.pretrained.layer1.0.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32)}
    text, prefix = (open_clip_text_model(21), "cond_stage_model.model.") if name == "depth2img" else (
        clip_text_model(20), CLIP_PREFIX)
    params = {**(SD2_UNET if name == "depth2img" else SD1_UNET), "in_channels": in_channels}
    unet, path = _family(tmp_path, name, params, text, prefix, extra if name == "depth2img" else None)
    with pytest.warns(UserWarning, match=warning):
        pipe = ldm_jax.load_pipeline(path, prediction_type="epsilon")
    assert (pipe.conditioning_key, pipe.concat_channels) == ("hybrid", in_channels - 4)
    # the hybrid U-Net's forward is test_original's (9-channel inpainting); here its weights, OIHW -> HWIO
    want = unet.input_blocks[0][0].weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(pipe.params["unet"]["conv_in"]["kernel"], want)


def test_unclip_is_refused_by_name(tmp_path):
    """SD 2.1 unCLIP (embedder.*, noise_augmentor.*, a label_emb projection): refused naming it, with and
    without its YAML target."""
    rng = np.random.default_rng(0)
    extra = {"embedder.model.visual.proj": rng.standard_normal((16, 32)).astype(np.float32),
             "noise_augmentor.betas": np.linspace(1e-4, 2e-2, 1000).astype(np.float32),
             "model.diffusion_model.label_emb.0.0.weight": rng.standard_normal((256, 32)).astype(np.float32)}
    _, path = _family(tmp_path, "unclip", SD2_UNET, None, "", extra)
    with pytest.raises(CheckpointError, match=r"unclip\.safetensors: an unCLIP checkpoint.*'embedder\."):
        load(path)
    cfg = OmegaConf.load(YAML)
    cfg.model.target = "ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion"
    yaml_file = str(tmp_path / "unclip.yaml")
    OmegaConf.save(cfg, yaml_file)
    with pytest.raises(CheckpointError, match="unCLIP"):
        load(path, config=yaml_file)
