"""``ldm_jax.convert.export`` over the configurations a user can build, against diffusers / transformers.

Each U-Net / autoencoder / text-encoder configuration built in ldm_jax is written with
``save_unet`` / ``save_vae`` / ``save_text_encoder``; the folder must load in the diffusers or
transformers class its config.json names with no missing, unexpected or mismatched weight, run
with the same outputs (float32, 1e-4 as the loading tests), read back with the ldm_jax loaders to
the same parameters and configuration, and a second export must write the same config.json.
Configurations that neither diffusers class can express are refused with a ValueError naming the
field, before anything is written. ``save_diffusers`` is checked end to end on pipelines built from
configs (diffusers' pipeline class, a 2-step image) and on the places it writes into (an existing
export, an empty or non-empty folder, a file, an unwritable path, a failure half way).

Parameters are random numpy arrays of the abstract parameter shapes (nothing is traced for the
structure-only cases), so most cases cost a diffusers construction and two safetensors files.
"""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import torch

import ldm_jax
from ldm_jax.convert import export
from ldm_jax.convert.clip_transformers import load_text_encoder, text_abstract_params
from ldm_jax.convert.unet_diffusers import load_unet, unet_abstract_params
from ldm_jax.convert.vae_diffusers import load_vae
from ldm_jax.models.autoencoder import AutoencoderConfig, abstract_params, build_autoencoder
from ldm_jax.models.clip import CLIPTextConfig, CLIPTextModel
from ldm_jax.models.unet import UNet, UNetConfig, attention_levels
from ldm_jax.pipeline import Pipeline

ATOL = 1e-4  # as tests/test_unet_config_sweep.py and tests/test_first_stage_text_config_sweep.py
CA, CU, D, U = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "DownBlock2D", "UpBlock2D"
AD, AU = "AttnDownBlock2D", "AttnUpBlock2D"
COND = dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, down_block_types=(CA, D),
            up_block_types=(U, CU), num_heads=2, cross_attention_dim=24)
SELF = dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, in_channels=3, out_channels=3,
            down_block_types=(D, AD), up_block_types=(AU, U), mid_block_type="UNetMidBlock2D", num_heads=None,
            head_dim=8, cross_attention_dim=None)


def random_params(shapes, seed):
    """Numpy arrays for a tree of ShapeDtypeStructs: kernels ~ N(0, 1/fan_in), norm scales
    ~ 1 + N(0, 0.1^2), biases and embeddings N(0, 0.1^2) (every tensor nonzero, so a misplaced
    weight shows in the outputs)."""
    rng = np.random.default_rng(seed)

    def one(path, s):
        leaf = path[-1].key
        if leaf == "kernel":
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        if leaf == "scale":
            return (1 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, shapes)


def assert_same_tree(got, want):
    flat_got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(got)[0]}
    flat_want = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    assert sorted(flat_got) == sorted(flat_want)
    for key, value in flat_want.items():
        np.testing.assert_array_equal(np.asarray(flat_got[key]), np.asarray(value), err_msg=key)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def read_json(path):
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- U-Net

# name -> (UNetConfig kwargs, the diffusers class export must write, compare outputs too: True, or
# "slow" for test_unet_export_matches_diffusers_outputs, run with the slow tests)
UNET_CASES = {
    # head_dim (CompVis num_head_channels) with cross-attention: used to be written as a UNet2DModel
    # (CrossAttn blocks without a context; diffusers: "cross_attention_dim must be specified").
    "cond_head_dim": (dict(COND, num_heads=None, head_dim=8), "UNet2DConditionModel", True),
    "cond_head_dim_per_level": (dict(COND, num_heads=None, head_dim=(8, 16), down_block_types=(CA, CA),
                                     up_block_types=(CU, CU)), "UNet2DConditionModel", False),
    # mid_block_type None (UNetConfig's mid_block_num_layers default 1 is unused): used to be written
    # as a UNet2DModel, or refused
    "cond_mid_none": (dict(COND, mid_block_type=None), "UNet2DConditionModel", False),
    # per-block cross_attention_dim whose unused entry differs: written as the one context width
    # (load_unet reads it back so; a re-export used to write a different config.json)
    "cond_cross_dim_unused_entry": (dict(COND, cross_attention_dim=(24, 32), mid_block_type=None),
                                    "UNet2DConditionModel", False),
    # the space the loading sweeps cover, in the other direction
    "cond_mixed_three_levels": (dict(COND, block_out_channels=(16, 16, 32), down_block_types=(CA, D, CA),
                                     up_block_types=(CU, U, CU), layers_per_block=(1, 2, 1), num_heads=(2, 1, 4),
                                     transformer_layers_per_block=(2, 1, 1), only_cross_attention=(True, False, False),
                                     use_linear_projection=True, upcast_attention=True, in_channels=9),
                                "UNet2DConditionModel", "slow"),
    "cond_nested_depths": (dict(COND, down_block_types=(CA, CA), up_block_types=(CU, CU), layers_per_block=2,
                                transformer_layers_per_block=((1, 2), (2, 1)),
                                reverse_transformer_layers_per_block=((1, 2, 1), (2, 1, 1))),
                           "UNet2DConditionModel", False),
    "cond_class_time_variants": (dict(COND, num_class_embeds=5, class_embeddings_concat=True, time_embedding_dim=40,
                                      time_embedding_act_fn="silu", flip_sin_to_cos=False, freq_shift=1,
                                      conv_in_kernel=5, conv_out_kernel=1, center_input_sample=True,
                                      downsample_padding=0, mid_block_scale_factor=2.0, norm_eps=1e-6,
                                      in_channels=7, out_channels=8), "UNet2DConditionModel", "slow"),
    "cond_class_timestep_4_levels": (dict(COND, block_out_channels=(8, 16, 16, 24), norm_num_groups=4,
                                          down_block_types=(CA, CA, CA, D), up_block_types=(U, CU, CU, CU),
                                          class_embed_type="timestep"), "UNet2DConditionModel", False),
    "cond_no_context_plain_mid": (dict(COND, down_block_types=(D, D), up_block_types=(U, U), cross_attention_dim=None,
                                       mid_block_type="UNetMidBlock2D", mid_block_num_layers=0),
                                  "UNet2DConditionModel", False),
    "self_head_dim": (SELF, "UNet2DModel", False),
    # one head per level of different widths, or heads only counted where there is attention: the
    # channels per head of the levels without attention used to be compared too, and refused
    "self_one_head": (dict(SELF, num_heads=1, head_dim=None), "UNet2DModel", True),
    "self_heads_plain_level0": (dict(SELF, num_heads=2, head_dim=None), "UNet2DModel", False),
    "self_three_levels_class": (dict(SELF, block_out_channels=(16, 16, 32), down_block_types=(AD, D, AD),
                                     up_block_types=(AU, U, AU), attn_norm_num_groups=2, class_embed_type="timestep",
                                     time_embedding_dim=40, center_input_sample=True, downsample_padding=0),
                                "UNet2DModel", "slow"),
    "self_no_mid_attention": (dict(SELF, mid_block_attention=False, num_class_embeds=4), "UNet2DModel", False),
    "plain_mid_none": (dict(SELF, down_block_types=(D, D), up_block_types=(U, U), mid_block_type=None),
                       "UNet2DModel", False),
    # heads that do not divide the channels (attention narrower than the level), where diffusers
    # builds the same: 3 heads of 5 on 16 channels; one 16-wide head on 24 channels
    "cond_heads_not_dividing": (dict(COND, num_heads=3), "UNet2DConditionModel", False),
    "self_head_dim_not_dividing": (dict(SELF, block_out_channels=(16, 24), head_dim=16), "UNet2DModel", False),
}


def _config(kwargs) -> UNetConfig:
    try:
        return UNetConfig(**kwargs)
    except ValueError as e:  # heads that do not divide the channels: only where UNetConfig builds them
        if "heads" in str(e) or "head_dim" in str(e):
            pytest.skip(f"UNetConfig refuses this head layout: {e}")
        raise


def _unet_inputs(cfg, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 8, 8, cfg.in_channels)).astype(np.float32)
    t = np.array([3, 917])
    ctx = rng.standard_normal((2, 5, cfg.context_width)).astype(np.float32) if cfg.uses_cross_attention else None
    labels = None
    if cfg.class_embed_type == "timestep":
        labels = np.array([5, 250])
    elif cfg.num_class_embeds:
        labels = np.array([1, cfg.num_class_embeds - 1])
    return x, t, ctx, labels


def _comparable(cfg: UNetConfig) -> UNetConfig:
    """``cfg`` with the fields diffusers' configs cannot tell apart spelt one way: heads per level
    (UNet2DModel: only where there is attention; head_dim or num_heads), the one context width,
    per-block values as tuples, and the fields of blocks that are not there (mid-block attention
    and depth without a UNetMidBlock2D, linear projections without cross-attention)."""
    n = len(cfg.block_out_channels)
    cross = cfg.uses_cross_attention
    used = set(range(n)) if cross else set(attention_levels(cfg, "self"))
    mid_layers = cfg.mid_block_num_layers if cfg.mid_block_type is not None else 0
    return dataclasses.replace(
        cfg, num_heads=tuple(cfg.heads(i) if i in used else None for i in range(n)), head_dim=None,
        cross_attention_dim=cfg.context_width, mid_block_num_layers=mid_layers,
        mid_block_attention=cfg.mid_block_attention if cfg.mid_block_type == "UNetMidBlock2D" and mid_layers else True,
        layers_per_block=cfg.per_block("layers_per_block"), only_cross_attention=cfg.per_block("only_cross_attention"),
        use_linear_projection=cfg.use_linear_projection and cross)


def _export_unet(name, tmp_path):
    import diffusers

    kwargs, class_name, _ = UNET_CASES[name]
    cfg = _config(kwargs)
    unet = UNet(cfg)
    params = random_params(unet_abstract_params(unet), seed=0)
    folder = str(tmp_path / "unet")
    export.save_unet(unet, params, folder, sample_size=8)
    written = read_json(os.path.join(folder, "config.json"))
    assert written["_class_name"] == class_name
    model, info = getattr(diffusers, class_name).from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    return unet, params, folder, written, model


def _assert_same_outputs(name, unet, params, model):
    x, t, ctx, labels = _unet_inputs(unet.config)
    got = np.asarray(unet.apply({"params": params}, x, t, ctx, labels))
    kw = {} if labels is None else {"class_labels": torch.from_numpy(labels)}
    if ctx is not None:
        kw["encoder_hidden_states"] = torch.from_numpy(ctx)
    with torch.no_grad():
        want = model.eval()(nchw(x), torch.from_numpy(t), **kw).sample.permute(0, 2, 3, 1).numpy()
    err = float(np.abs(got - want).max())
    print(f"\n{name}: exported {type(model).__name__} vs ldm_jax: max abs error {err:.2e}")
    assert want.std() > 0.1 and err < ATOL


@pytest.mark.parametrize("name", list(UNET_CASES))
def test_unet_export_loads_in_diffusers_and_round_trips(name, tmp_path):
    unet, params, folder, written, model = _export_unet(name, tmp_path)
    cfg = unet.config
    if UNET_CASES[name][2] is True:
        _assert_same_outputs(name, unet, params, model)
    back, back_params = load_unet(folder)
    assert_same_tree(back_params, params)
    assert _comparable(back.config) == _comparable(cfg)
    export.save_unet(back, back_params, str(tmp_path / "again"), sample_size=8)
    assert read_json(str(tmp_path / "again" / "config.json")) == written


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, case in UNET_CASES.items() if case[2] == "slow"])
def test_unet_export_matches_diffusers_outputs(name, tmp_path):
    unet, params, _, _, model = _export_unet(name, tmp_path)
    _assert_same_outputs(name, unet, params, model)


# Configurations neither UNet2DConditionModel nor UNet2DModel builds: refused by field, nothing written.
UNET_REFUSED = {
    "cross_and_self_blocks": (dict(COND, down_block_types=(CA, AD), up_block_types=(AU, CU)),
                              "mixes cross-attention and self-attention"),
    "cond_one_layer_plain_mid": (dict(COND, mid_block_type="UNetMidBlock2D", mid_block_attention=False),
                                 "mid_block_num_layers=1 with UNetMidBlock2D"),
    "self_per_block_layers": (dict(SELF, layers_per_block=(1, 2)), r"layers_per_block=\[1, 2\].*one int"),
    "self_conv_kernel": (dict(SELF, conv_in_kernel=5), "conv_in_kernel=5.*UNet2DModel"),
    "self_mid_without_layers": (dict(SELF, mid_block_num_layers=0), "mid_block_num_layers=0.*UNet2DModel"),
    "self_head_sizes_differ": (dict(SELF, down_block_types=(AD, AD), up_block_types=(AU, AU), num_heads=2,
                                    head_dim=None), "channels per head differ"),
    # one 12-wide head on 16 channels: UNet2DConditionModel takes heads only (1 head -> 16 wide)
    "cond_head_dim_not_dividing": (dict(COND, num_heads=None, head_dim=12), "head_dim 12 does not divide its 16"),
}


@pytest.mark.parametrize("name", list(UNET_REFUSED))
def test_unet_without_diffusers_equivalent_is_refused(name, tmp_path):
    kwargs, pattern = UNET_REFUSED[name]
    unet = UNet(_config(kwargs))
    folder = tmp_path / "unet"
    with pytest.raises(ValueError, match=pattern):
        export.save_unet(unet, random_params(unet_abstract_params(unet), 0), str(folder), sample_size=8)
    assert not (folder / "config.json").exists()


# diffusers folders read with load_unet and written again: the same weights and the same model
# (diffusers' resolved config), whatever keys the original spelt out or left to defaults.
INVERSE = {
    # attention_head_dim None: one head per level, of each level's width (used to be refused:
    # "channels per head differ")
    "model2d_one_full_head_per_level": ("UNet2DModel", dict(
        block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1, down_block_types=(AD, AD),
        up_block_types=(AU, AU), attention_head_dim=None)),
    "sd2_like": ("UNet2DConditionModel", dict(
        block_out_channels=(16, 32, 32), norm_num_groups=8, layers_per_block=1, down_block_types=(CA, CA, D),
        up_block_types=(U, CU, CU), attention_head_dim=[2, 4, 4], use_linear_projection=True, upcast_attention=True,
        cross_attention_dim=24)),
    "upscaler_like_unused_cross_dim": ("UNet2DConditionModel", dict(
        COND, num_heads=None, attention_head_dim=2, in_channels=7, num_class_embeds=10, mid_block_type=None,
        only_cross_attention=[True, False], cross_attention_dim=[24, 32])),
}


@pytest.mark.parametrize("name", list(INVERSE))
def test_diffusers_unet_folder_exports_back_to_the_same_model(name, tmp_path):
    import diffusers

    cls_name, kwargs = INVERSE[name]
    cls = getattr(diffusers, cls_name)
    torch.manual_seed(0)
    model = cls(**{k: v for k, v in kwargs.items() if k != "num_heads"})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(tmp_path / "src"))
    unet, params = load_unet(str(tmp_path / "src"))
    export.save_unet(unet, params, str(tmp_path / "out"), sample_size=8)
    again, info = cls.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not any(info.values()), info
    want = model.state_dict()
    assert sorted(again.state_dict()) == sorted(want)
    for key, value in again.state_dict().items():
        assert torch.equal(value, want[key]), key
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    differ = {k: (v, again.config.get(k)) for k, v in model.config.items()
              if not k.startswith("_") and k != "sample_size" and norm(v) != norm(again.config.get(k))}
    if name == "upscaler_like_unused_cross_dim":  # the one width the cross-attention blocks read
        assert differ.pop("cross_attention_dim") == ([24, 32], 24)
    assert not differ


# ----------------------------------------------------------------------------- autoencoder, text encoder

VAE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
VAE_CASES = {  # name -> (AutoencoderConfig kwargs, compare decoder outputs too)
    "kl_three_levels": (dict(VAE, block_out_channels=(8, 8, 16), attention_levels=(0, 2), latent_channels=8,
                             in_channels=4, out_channels=1, scaling_factor=0.3611, shift_factor=0.1159), False),
    "kl_encoder_quant_only": (dict(VAE, use_quant_conv=True, use_post_quant_conv=False, mid_block_attention=False),
                              False),
    "vq_embed_dim": (dict(VAE, kind="vq", num_vq_embeddings=16, vq_embed_dim=2, attention_levels=(1,),
                          scaling_factor=1.0, mid_block_attention=False), True),
}


@pytest.mark.parametrize("name", list(VAE_CASES))
def test_vae_export_loads_in_diffusers_and_round_trips(name, tmp_path):
    import diffusers

    kwargs, compare = VAE_CASES[name]
    cfg = AutoencoderConfig(**kwargs)
    vae = build_autoencoder(cfg)
    params = random_params(abstract_params(vae), seed=1)
    folder = str(tmp_path / "vae")
    export.save_vae(vae, params, folder, sample_size=16)
    written = read_json(os.path.join(folder, "config.json"))
    model, info = getattr(diffusers, written["_class_name"]).from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    if compare:
        z = np.random.default_rng(0).standard_normal((1, 2, 3, cfg.embed_dim)).astype(np.float32)
        with torch.no_grad():
            want = model.eval().decode(nchw(z)).sample.permute(0, 2, 3, 1).numpy()
        got = np.asarray(vae.apply({"params": params}, z, method="decode"))
        assert want.std() > 0.1 and float(np.abs(got - want).max()) < ATOL
    back, back_params = load_vae(folder)
    assert_same_tree(back_params, params)
    assert back.config == cfg
    export.save_vae(back, back_params, str(tmp_path / "again"), sample_size=16)
    assert read_json(str(tmp_path / "again" / "config.json")) == written


CLIP = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, max_position_embeddings=20)


@pytest.mark.parametrize("overrides", [dict(num_layers=1, output_layer="penultimate", hidden_act="gelu"),
                                       dict(num_heads=1, eos_token_id=7, layer_norm_eps=1e-6)],
                         ids=["penultimate_of_one_layer", "eos7_one_head"])
def test_text_encoder_export_matches_transformers(overrides, tmp_path):
    from transformers import CLIPTextModel as HFModel

    cfg = CLIPTextConfig(**{**CLIP, **overrides})
    model = CLIPTextModel(cfg)
    params = random_params(text_abstract_params(model), seed=2)
    export.save_text_encoder(model, params, str(tmp_path), pad_token_id=0)
    hf, info = HFModel.from_pretrained(str(tmp_path), output_loading_info=True, attn_implementation="eager")
    assert not any(info.values()), info
    ids = np.random.default_rng(0).integers(3, 290, (2, 20)).astype(np.int32)
    ids[:, 9] = 7 if cfg.eos_token_id else 299
    with torch.no_grad():
        out = hf.eval()(torch.from_numpy(ids).long())
    got = np.asarray(model.apply({"params": params}, ids))
    assert float(np.abs(got - out.last_hidden_state.numpy()).max()) < ATOL
    back, back_params = load_text_encoder(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(back.apply({"params": back_params}, ids)), got)


def test_text_encoder_pooling_at_id_2_is_refused(tmp_path):
    """transformers reads eos_token_id 2 as the legacy argmax(ids) pooling: a model pooling at the
    first id 2 has no config.json (it used to be written, pooling elsewhere in transformers)."""
    model = CLIPTextModel(CLIPTextConfig(**CLIP, eos_token_id=2))
    params = random_params(text_abstract_params(model), seed=2)
    with pytest.raises(ValueError, match="eos_token_id=2"):
        export.save_text_encoder(model, params, str(tmp_path / "te"), pad_token_id=0)
    assert not (tmp_path / "te" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- pipelines

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def tiny_pipeline(unet_kwargs=None, vae_kwargs=None, text=True, scheduler=None, seed=0, **clip_overrides):
    from ldm_jax.text.tokenizer import CLIPTokenizer

    unet = UNet(UNetConfig(**(unet_kwargs or dict(COND, cross_attention_dim=32))))
    vae = build_autoencoder(AutoencoderConfig(**(vae_kwargs or VAE)))
    params = {"unet": random_params(unet_abstract_params(unet), seed),
              "vae": random_params(abstract_params(vae), seed + 1)}
    text_encoder = tokenizer = None
    if text:
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**CLIP, "vocab_size": 49408, "max_position_embeddings": 77,
                                                       **clip_overrides}))
        params["text_encoder"] = random_params(text_abstract_params(text_encoder), seed + 2)
        tokenizer = CLIPTokenizer(pad_token_id=49407)
    return Pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, params=params,
                    scheduler_config=dict(scheduler or SD_SCHEDULER), source="tiny", sample_size=8)


@pytest.mark.slow
def test_pipeline_built_from_configs_matches_diffusers(tmp_path):
    """An SD 2-style pipeline built in ldm_jax (head_dim U-Net, penultimate CLIP, v-prediction with
    trailing spacing and zero terminal SNR): diffusers' StableDiffusionPipeline on the exported
    folder gives the same 2-step image; load_pipeline reads back the same parameters and scheduler."""
    import diffusers

    pipe = tiny_pipeline(dict(COND, num_heads=None, head_dim=8, cross_attention_dim=32, use_linear_projection=True),
                         dict(VAE, attention_levels=(1,)), num_layers=3, output_layer="penultimate",
                         hidden_act="gelu",
                         scheduler=dict(SD_SCHEDULER, prediction_type="v_prediction", steps_offset=0,
                                        timestep_spacing="trailing", rescale_betas_zero_snr=True))
    folder = export.save_diffusers(pipe, str(tmp_path / "sd"))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    prompts = ["a red cube", "two dogs"]
    latents = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
    with torch.no_grad():
        want = ref(prompts, num_inference_steps=2, guidance_scale=7.5, height=16, width=16, latents=nchw(latents),
                   output_type="np").images
    got = pipe(prompts, num_inference_steps=2, guidance_scale=7.5, height=16, width=16, latents=latents,
               sampler="ddim")
    err = float(np.abs(np.asarray(got) - want).max())
    print(f"\nbuilt SD2-style pipeline -> diffusers: max abs image error {err:.2e}")
    assert err < 1e-3 and want.std() > 1e-3
    back = ldm_jax.load_pipeline(folder)
    assert_same_tree(back.params["unet"], pipe.params["unet"])
    # (read as StableDiffusionPipeline reads it: steps_offset 0 -> 1, which trailing spacing does not use)
    from ldm_jax.convert.diffusers_pipeline import as_the_pipeline_class_reads_it

    assert {k: v for k, v in back.scheduler_config.items() if not k.startswith("_")} == \
        as_the_pipeline_class_reads_it("StableDiffusionPipeline", pipe.scheduler_config)
    assert back.scheduler_config["steps_offset"] == 1


@pytest.mark.parametrize("kind,unet_kwargs,text,pipeline_class,unet_class", [
    ("sd_head_dim", dict(COND, num_heads=None, head_dim=8, cross_attention_dim=32), True,
     "StableDiffusionPipeline", "UNet2DConditionModel"),
    ("inpainting_mid_none", dict(COND, cross_attention_dim=32, in_channels=9, mid_block_type=None), True,
     "StableDiffusionInpaintPipeline", "UNet2DConditionModel"),
    ("unconditional_self_attention", dict(SELF, in_channels=4, out_channels=4), False, "LDMPipeline", "UNet2DModel"),
])
def test_pipeline_export_loads_in_its_diffusers_class(kind, unet_kwargs, text, pipeline_class, unet_class, tmp_path):
    import diffusers

    pipe = tiny_pipeline(unet_kwargs, text=text, scheduler=dict(SD_SCHEDULER, trained_betas=None,
                                                                beta_end=np.float64(0.012)))
    folder = export.save_diffusers(pipe, str(tmp_path / kind))
    index = read_json(os.path.join(folder, "model_index.json"))
    assert index["_class_name"] == pipeline_class and index["unet"] == ["diffusers", unet_class]
    kw = dict(safety_checker=None, requires_safety_checker=False) if text else {}
    ref = getattr(diffusers, pipeline_class).from_pretrained(folder, **kw)
    assert type(ref.unet).__name__ == unet_class
    back = ldm_jax.load_pipeline(folder)
    assert_same_tree(back.params, pipe.params)
    assert back.scheduler_config["beta_end"] == 0.012  # a numpy scalar is written as a JSON number


@pytest.mark.parametrize("scheduler,match", [
    (dict(SD_SCHEDULER, steps_offset=0), "steps_offset=0 and 'leading'"),
    ({k: v for k, v in SD_SCHEDULER.items() if k != "steps_offset"}, "steps_offset=0 and 'leading'"),
    (dict(SD_SCHEDULER, clip_sample=True), "clip_sample true"),
    ({k: v for k, v in SD_SCHEDULER.items() if k != "clip_sample"}, "clip_sample default true"),
], ids=["offset0", "offset_absent", "clip", "clip_absent"])
def test_scheduler_options_stable_diffusion_pipeline_overrides_are_refused(small_pipes, scheduler, match, tmp_path):
    """StableDiffusionPipeline.__init__ resets steps_offset to 1 and clip_sample to False: a pipeline
    sampling otherwise would run other timesteps / no clipping in diffusers (a 2-step image differed
    by 4e-2 and 0.66 before), so it is refused; where the option changes nothing (trailing spacing)
    or the diffusers pipeline keeps it (LDMPipeline), the export goes ahead."""
    sd = dataclasses.replace(small_pipes["sd"], scheduler_config=scheduler)
    with pytest.raises(ValueError, match=f"{match}.*StableDiffusionPipeline resets"):
        export.save_diffusers(sd, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    export.save_diffusers(dataclasses.replace(small_pipes["ldm"], scheduler_config=scheduler), str(tmp_path / "ldm"))
    trailing = dict(scheduler, timestep_spacing="trailing")
    if "clip" not in match:
        export.save_diffusers(dataclasses.replace(sd, scheduler_config=trailing), str(tmp_path / "trailing"))
        written = read_json(str(tmp_path / "trailing" / "scheduler" / "scheduler_config.json"))
        assert written.get("steps_offset") == scheduler.get("steps_offset")  # written as it is


def test_text_pipeline_with_class_embedding_is_refused(tmp_path):
    """StableDiffusionPipeline calls the U-Net without class labels (diffusers then fails at the first
    step): refused before anything is written."""
    pipe = tiny_pipeline(dict(COND, cross_attention_dim=32, class_embed_type="timestep"))
    with pytest.raises(ValueError, match="class embedding.*class_embed_type='timestep'"):
        export.save_diffusers(pipe, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    unconditional = tiny_pipeline(dict(SELF, in_channels=4, out_channels=4, class_embed_type="timestep"), text=False)
    with pytest.raises(ValueError, match="class-conditional"):
        export.save_diffusers(unconditional, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- where the folder goes


@pytest.fixture(scope="module")
def small_pipes():
    return {"sd": tiny_pipeline(), "ldm": tiny_pipeline(dict(SELF, in_channels=4, out_channels=4), text=False)}


def test_export_over_an_earlier_export_replaces_it(small_pipes, tmp_path):
    """An existing diffusers folder (an earlier export, the folder a pipeline was loaded from) is
    replaced, components the new pipeline does not have included; other files stay."""
    folder = str(tmp_path / "out")
    export.save_diffusers(small_pipes["sd"], folder)
    (tmp_path / "out" / "README.md").write_text("notes")
    loaded = ldm_jax.load_pipeline(folder)
    export.save_diffusers(loaded, folder)  # into the folder it was loaded from
    assert_same_tree(ldm_jax.load_pipeline(folder).params, small_pipes["sd"].params)
    export.save_diffusers(small_pipes["ldm"], folder)
    assert sorted(os.listdir(folder)) == ["README.md", "model_index.json", "scheduler", "unet", "vqvae"]
    assert read_json(os.path.join(folder, "model_index.json"))["_class_name"] == "LDMPipeline"
    assert_same_tree(ldm_jax.load_pipeline(folder).params, small_pipes["ldm"].params)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging folder left behind


def test_export_into_an_empty_folder(small_pipes, tmp_path):
    export.save_diffusers(small_pipes["ldm"], str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model_index.json", "scheduler", "unet", "vqvae"]


def test_export_refuses_what_is_in_the_way(small_pipes, tmp_path):
    """A file, a folder with other contents, a path under a file: an OSError naming the path, and
    nothing written or removed."""
    pipe = small_pipes["ldm"]
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(FileExistsError, match="'.*file' exists and is not a folder"):
        export.save_diffusers(pipe, str(target))
    with pytest.raises(OSError, match=r"cannot write '.*file/sub'"):
        export.save_diffusers(pipe, str(target / "sub"))
    assert target.read_text() == "x"
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty and is not a diffusers folder"):
        export.save_diffusers(pipe, str(other))
    assert os.listdir(other) == ["data.txt"]
    assert sorted(os.listdir(tmp_path)) == ["file", "other"]


def test_failed_export_leaves_no_folder_that_loads(small_pipes, tmp_path, monkeypatch):
    """A failure half way (here: writing the text encoder) leaves no folder at all, or an earlier
    export as it was: never new weights next to an old or a missing component under a
    model_index.json (diffusers and load_pipeline load any folder that has one)."""
    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    folder = tmp_path / "out"
    monkeypatch.setattr(export, "save_text_encoder", fail)
    with pytest.raises(OSError, match="No space left"):
        export.save_diffusers(small_pipes["sd"], str(folder))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    export.save_diffusers(small_pipes["ldm"], str(folder))
    before = {p: open(os.path.join(r, p), "rb").read() for r, _, fs in os.walk(folder) for p in fs}
    monkeypatch.setattr(export, "save_text_encoder", fail)
    with pytest.raises(OSError, match="No space left"):
        export.save_diffusers(small_pipes["sd"], str(folder))
    after = {p: open(os.path.join(r, p), "rb").read() for r, _, fs in os.walk(folder) for p in fs}
    assert after == before and sorted(os.listdir(tmp_path)) == ["out"]
