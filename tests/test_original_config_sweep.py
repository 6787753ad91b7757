"""Original YAML variants beyond the released ones: ldm_jax either matches the original ``ldm``
modules (``openaimodel.UNetModel``, the first-stage Encoder / Decoder) or refuses the configuration
with a ``CheckpointError`` naming the option, with the YAML and with the configuration inferred from
the keys.

Each model is built from a tiny variant of ``tests/original_configs/tiny-v1-inference.yaml``
(``unet_config`` / ``first_stage_config`` params replaced; a ``ClassEmbedder`` context instead of
CLIP, which would need a download) with random, perturbed weights (``original_ckpt``).
"""
import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import ldm_jax
from ldm_jax.convert.errors import CheckpointError
from original_ckpt import CONFIGS, first_stage, ldm_state_dict, save_ckpt, unet_model
from tiny_sd import nhwc

from test_original import AE, TOL  # noqa: E402 - the tiny first stage and float32 tolerance of the parity tests
SPATIAL = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
               num_res_blocks=1, channel_mult=[1, 2], num_heads=8, use_spatial_transformer=True,
               transformer_depth=1, context_dim=32, legacy=False)
ATTENTION_BLOCK = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
                       num_res_blocks=1, channel_mult=[1, 2], num_head_channels=32)


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def checkpoint(tmp_path, name, unet_params, ae=AE, seed=0):
    """(ckpt path, YAML path, original U-Net): a LatentDiffusion checkpoint of the variant."""
    unet = unet_model(seed, **unet_params)
    first = first_stage(seed + 10, ae, ae["z_channels"])
    cfg = OmegaConf.load(os.path.join(CONFIGS, "tiny-v1-inference.yaml"))
    p = cfg.model.params
    p.unet_config.params = OmegaConf.create(unet_params)
    p.first_stage_config.params.ddconfig = OmegaConf.create(ae)
    p.first_stage_config.params.embed_dim = ae["z_channels"]
    cond, prefix = None, "cond_stage_model.embedding."
    context_dim = unet_params.get("context_dim")
    if isinstance(context_dim, list):  # one per transformer block (sdkit's SpatialTransformer), all the same here
        context_dim = context_dim[0]
    if context_dim is None:
        p.cond_stage_config = "__is_unconditional__"
        p.pop("conditioning_key")
    else:
        torch.manual_seed(seed + 3)
        cond = torch.nn.Embedding(11, context_dim)
        p.cond_stage_config = OmegaConf.create({"target": "ldm.modules.encoders.modules.ClassEmbedder",
                                                "params": {"embed_dim": context_dim, "n_classes": 11}})
    sd = ldm_state_dict(unet, first, cond, prefix)
    path = save_ckpt(str(tmp_path / f"{name}.ckpt"), sd)
    yaml = str(tmp_path / f"{name}.yaml")
    OmegaConf.save(cfg, yaml)
    return path, yaml, unet


def unet_error(pipe, unet, unet_params, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, unet_params["in_channels"], 8, 8)).astype(np.float32)
    t = np.array([10, 800])
    dim = unet_params.get("context_dim")
    ctx = None if dim is None else rng.standard_normal((2, 7, dim)).astype(np.float32)
    with torch.no_grad():
        ref = unet(torch.from_numpy(x), torch.from_numpy(t),
                   context=None if ctx is None else torch.from_numpy(ctx)).numpy()
    got = pipe.unet.apply({"params": pipe.params["unet"]}, nhwc(x), t, ctx, None)
    return max_err(np.asarray(got).transpose(0, 3, 1, 2), ref)


def test_legacy_spatial_transformer_heads_when_num_head_channels_does_not_divide(tmp_path):
    """openaimodel with legacy=True (UNetModel's default) and a SpatialTransformer: num_heads = ch //
    num_head_channels, then dim_head = ch // num_heads, so 96 channels with num_head_channels 64 are one
    head of 96 (and 192 channels three of 64). Used to be refused as 'not divisible'."""
    params = {**{k: v for k, v in SPATIAL.items() if k != "num_heads"}, "model_channels": 96,
              "num_head_channels": 64, "legacy": True, "use_linear_in_transformer": True}
    path, yaml, unet = checkpoint(tmp_path, "legacy96", params)
    assert unet.input_blocks[1][1].transformer_blocks[0].attn1.heads == 1  # the original: 1 head of 96
    # the inferred configuration (linear projections: SD 2.x's 64 channels per head) reads it the same way
    for config in (yaml, None):
        err = unet_error(ldm_jax.load_pipeline(path, config=config), unet, params)
        print(f"legacy=True, 96 channels, num_head_channels 64 ({'YAML' if config else 'inferred'}): "
              f"max abs err {err:.2e}")
        assert err < TOL
    # legacy=False: dim_head = 64, so the attention has 64 inner channels: refused, naming the option
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(yaml), {"model": {"params": {"unet_config": {
        "params": {"legacy": False}}}}}), yaml)
    with pytest.raises(CheckpointError, match="num_head_channels=64"):
        ldm_jax.load_pipeline(path, config=yaml)


def test_num_heads_upsample_is_ignored_without_legacy(tmp_path):
    """With legacy=False openaimodel passes num_head_channels = ch // num_heads to the up path's AttentionBlocks,
    which wins over num_heads_upsample: the same heads everywhere. Used to be refused."""
    params = {**{k: v for k, v in ATTENTION_BLOCK.items() if k != "num_head_channels"}, "num_heads": 2,
              "num_heads_upsample": 1, "legacy": False}
    path, yaml, unet = checkpoint(tmp_path, "heads_up", params)
    assert unet.output_blocks[0][1].num_heads == 2
    err = unet_error(ldm_jax.load_pipeline(path, config=yaml), unet, params)
    print(f"AttentionBlock, num_heads 2, num_heads_upsample 1, legacy=False: max abs err {err:.2e}")
    assert err < TOL
    # legacy=True really uses 1 head on the up path: still refused, by name
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(yaml), {"model": {"params": {"unet_config": {
        "params": {"legacy": True}}}}}), yaml)
    with pytest.raises(CheckpointError, match="num_heads_upsample=1"):
        ldm_jax.load_pipeline(path, config=yaml)


@pytest.mark.parametrize("option, value, match", [
    ("resblock_updown", True, "unet_config resblock_updown=True"),
    ("conv_resample", False, "unet_config conv_resample=False"),
    ("use_scale_shift_norm", True, "unet_config use_scale_shift_norm=True"),
    ("num_attention_blocks", [1, 0], "unet_config num_attention_blocks"),
    # (context 32 wide, the middle block 64: with equal widths it cannot be told from the weights)
    ("disable_middle_self_attn", True, "unet_config disable_middle_self_attn=True"),
])
def test_unsupported_unet_options_are_named_when_inferred(option, value, match, tmp_path):
    """Without the YAML these layouts used to be misread (a ResBlock downsampler taken for a resnet, levels
    lost at a weightless average-pool Downsample, ...) and failed with an unrelated shape or 'missing
    weights' error; the inferred configuration now names the option, as the YAML does."""
    params = {**SPATIAL, "attention_resolutions": [1, 2], option: value}
    path, yaml, _ = checkpoint(tmp_path, "variant", params)  # (a file name without the option's)
    for config in (yaml, None):
        with pytest.raises(CheckpointError, match=match):
            ldm_jax.load_pipeline(path, config=config)


def test_first_multiplier_other_than_one_is_refused_by_name(tmp_path):
    """channel_mult[0] != 1: openaimodel's output conv takes model_channels (the original U-Net does not run);
    the CompVis Encoder's conv_in has ch outputs where diffusers' has ch * ch_mult[0]. Both used to fail
    with a shape error on a weight."""
    params = {**SPATIAL, "channel_mult": [2, 2]}
    path, yaml, _ = checkpoint(tmp_path, "unet_mult", params)  # (builds; its forward fails)
    for config in (yaml, None):
        with pytest.raises(CheckpointError, match=r"unet_config channel_mult=\[2, 2\]"):
            ldm_jax.load_pipeline(path, config=config)
    path, yaml, _ = checkpoint(tmp_path, "ae_mult", SPATIAL, ae={**AE, "ch_mult": [2, 2]})
    for config in (yaml, None):
        with pytest.raises(CheckpointError, match=r"ddconfig ch_mult=\[2, 2\]"):
            ldm_jax.load_pipeline(path, config=config)


def test_num_heads_not_dividing_the_channels_matches_the_original(tmp_path):
    """SpatialTransformer(ch, 3, ch // 3) has 3 * (ch // 3) < ch inner channels (30 of 32, 63 of 64): built as
    the original builds it from the YAML (was refused). Inferred from the keys, the head count of a 30-wide
    projection is ambiguous: refused, naming the projection."""
    params = {**SPATIAL, "num_heads": 3}
    path, yaml, unet = checkpoint(tmp_path, "heads3", params)
    assert unet.input_blocks[1][1].transformer_blocks[0].attn1.heads == 3
    err = unet_error(ldm_jax.load_pipeline(path, config=yaml), unet, params)
    print(f"num_heads 3 on 32 / 64 channels (YAML): max abs err {err:.2e}")
    assert err < TOL
    # inferred: proj_in maps the 32 channels to 30 (used to be a shape error on that weight)
    with pytest.raises(CheckpointError, match=r"proj_in.weight projects the 32 channels of level 0 to 30"):
        ldm_jax.load_pipeline(path)
    # linear projections narrower than SD 2.x's 64-channel heads: the head size is not guessed
    params = {**SPATIAL, "use_linear_in_transformer": True}
    path, _, _ = checkpoint(tmp_path, "linear32", params)
    with pytest.raises(CheckpointError, match="head size cannot be inferred"):
        ldm_jax.load_pipeline(path)


@pytest.mark.parametrize("name, params", [
    ("three_levels_per_level_res_blocks", {**SPATIAL, "channel_mult": [1, 2, 2], "num_res_blocks": [1, 2, 1],
                                           "attention_resolutions": [4, 1]}),
    ("depth2_context_list", {**SPATIAL, "transformer_depth": 2, "context_dim": [32, 32]}),
    # openaimodel computes heads only where it puts attention: 32-channel level 0 has none (used to be refused,
    # "32 channels are not divisible by num_head_channels=64")
    ("head_size_wider_than_a_level_without_attention", {
        **{k: v for k, v in SPATIAL.items() if k != "num_heads"}, "num_head_channels": 64,
        "attention_resolutions": [2], "use_linear_in_transformer": True}),
    ("attention_block_lowest_level_only", {**ATTENTION_BLOCK, "channel_mult": [1, 2, 2], "num_res_blocks": 2,
                                           "attention_resolutions": [4]}),
])
def test_variants_match_original_with_yaml_and_inferred(name, params, tmp_path):
    """Layouts the released configs do not have: the YAML and the inferred configuration build the same model,
    which matches the original U-Net."""
    context_list = isinstance(params.get("context_dim"), list)
    path, yaml, unet = checkpoint(tmp_path, name, params)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10, 800])
    dim = params.get("context_dim")
    dim = dim[0] if context_list else dim
    ctx = None if dim is None else rng.standard_normal((2, 7, dim)).astype(np.float32)
    with torch.no_grad():  # sdkit's SpatialTransformer takes one context per transformer block (SD 2 code)
        tctx = None if ctx is None else torch.from_numpy(ctx)
        ref = unet(torch.from_numpy(x), torch.from_numpy(t),
                   context=[tctx] * len(params["context_dim"]) if context_list else tctx).numpy()
    for config in (yaml, None):
        pipe = ldm_jax.load_pipeline(path, config=config)
        got = pipe.unet.apply({"params": pipe.params["unet"]}, nhwc(x), t, ctx, None)
        err = max_err(np.asarray(got).transpose(0, 3, 1, 2), ref)
        print(f"{name} ({'YAML' if config else 'inferred'}): max abs err {err:.2e}")
        assert err < TOL


def test_clip_max_length_sets_the_context_length(tmp_path):
    """FrozenCLIPEmbedder(max_length=16) pads / truncates the prompt to 16 tokens, so the U-Net attends to a
    16-token context (ldm/modules/encoders/modules.py). It used to be ignored: a 77-token context, silently."""
    from original_ckpt import clip_text_model

    params = {**SPATIAL, "context_dim": 64}
    unet, first, text = unet_model(0, **params), first_stage(10, AE, 4), clip_text_model(20)
    sd = ldm_state_dict(unet, first, text, "cond_stage_model.transformer.text_model.")
    path = save_ckpt(str(tmp_path / "sd1.ckpt"), sd)
    cfg = OmegaConf.load(os.path.join(CONFIGS, "tiny-v1-inference.yaml"))
    cfg.model.params.unet_config.params = OmegaConf.create(params)
    full = ldm_jax.load_pipeline(path, config=os.path.join(CONFIGS, "tiny-v1-inference.yaml"))
    cfg.model.params.cond_stage_config.params = {"max_length": 16}
    yaml = str(tmp_path / "max_length.yaml")
    OmegaConf.save(cfg, yaml)
    pipe = ldm_jax.load_pipeline(path, config=yaml)
    prompts = ["a red apple on a table", "a blue car"]
    ids = pipe.tokenize(prompts)
    assert ids.shape == (2, 16)
    # short prompts: the transformers tokenizer's ids at max_length 16 are the first 16 of those at 77 (EOT padding)
    want_ids = full.tokenize(prompts)[:, :16]
    np.testing.assert_array_equal(ids, want_ids)
    with torch.no_grad():
        want = text(torch.from_numpy(want_ids).long()).last_hidden_state.numpy()
    context = pipe.text_encoder.apply({"params": pipe.params["text_encoder"]}, ids)
    assert context.shape == (2, 16, 64) and max_err(context, want) < TOL
    cfg.model.params.cond_stage_config.params = {"max_length": 100}  # more than the 77 learned positions
    OmegaConf.save(cfg, yaml)
    with pytest.raises(CheckpointError, match="max_length=100"):
        ldm_jax.load_pipeline(path, config=yaml)
