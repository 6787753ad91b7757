"""diffusers ``unet/config.json`` layouts beyond the released ones, against
diffusers' UNet2DConditionModel / UNet2DModel.

Each parity case is a config that a diffusers user can write and diffusers
builds and runs; ``load_unet`` must either reproduce it (float32, the
tolerance of ``test_unet.py``) or refuse it with a ``CheckpointError`` naming
the file, the key and what is supported. Tiny models (16-32 channels, 8x8 to
8x16 latents) so that the whole file stays well under two minutes on 2 cores.
"""
import json

import jax
import numpy as np
import pytest
import torch

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.unet_diffusers import load_unet, unet_config_from_diffusers
from test_unet import _randomize

CA, CU, D, U = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "DownBlock2D", "UpBlock2D"
AD, AU = "AttnDownBlock2D", "AttnUpBlock2D"
TINY = dict(block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1)
COND = dict(TINY, down_block_types=(CA, D), up_block_types=(U, CU), attention_head_dim=2, cross_attention_dim=24)
MODEL2D = dict(TINY, in_channels=3, out_channels=3, down_block_types=(D, AD), up_block_types=(AU, U),
               attention_head_dim=8)


# name -> (diffusers class, constructor kwargs, (batch, height, width), context width or None)
CASES = {
    # Per-block cross_attention_dim whose last entry belongs to a block without
    # cross-attention (mid block None): the context is 24 wide, not 32. Used to
    # fail in load_unet with a to_k shape mismatch.
    "cross_dim_last_entry_unused": ("UNet2DConditionModel", dict(
        COND, cross_attention_dim=[24, 32], mid_block_type=None), (2, 8, 8), 24),
    # attention_head_dim null on a level without attention: diffusers never uses
    # it. Used to be refused.
    "heads_null_on_plain_level": ("UNet2DConditionModel", dict(
        COND, attention_head_dim=[2, None], mid_block_type=None), (1, 8, 8), 24),
    # Keys that diffusers passes only to the Simple*/Resnet*sample blocks, so they
    # change nothing here. Used to be refused.
    "simple_block_keys_ignored": ("UNet2DConditionModel", dict(
        COND, resnet_out_scale_factor=2.0, resnet_skip_time_act=True, cross_attention_norm="layer_norm"),
        (2, 8, 8), 24),
    # Representative layouts (these passed before): three levels in mixed order,
    # per-block heads / layers / transformer depths / only-cross, linear projections,
    # a class table, 9 input channels, [sin, cos] with shift 1, non-square, batch 3.
    "mixed_three_levels": ("UNet2DConditionModel", dict(
        block_out_channels=(16, 32, 48), norm_num_groups=16, in_channels=9, out_channels=4,
        down_block_types=(CA, CA, D), up_block_types=(U, CU, CU), attention_head_dim=[2, 4, 8],
        use_linear_projection=True, transformer_layers_per_block=[2, 1, 1], layers_per_block=[2, 1, 1],
        only_cross_attention=[False, True, False], flip_sin_to_cos=False, freq_shift=1, num_class_embeds=3,
        cross_attention_dim=24), (3, 8, 16), 24),
    # UNet2DModel: self-attention at both ends, own mid-attention groups, a
    # "timestep" class embedding, other time width, centred input, pad (0, 1).
    "model2d_three_levels": ("UNet2DModel", dict(
        MODEL2D, block_out_channels=(16, 16, 32), norm_num_groups=4, down_block_types=(AD, D, AD),
        up_block_types=(AU, U, AU), attn_norm_num_groups=2, class_embed_type="timestep",
        time_embedding_dim=40, center_input_sample=True, downsample_padding=0), (2, 16, 8), None),
    # Latent sides the overall downsampling (4) does not divide: diffusers forwards each skip's
    # size to the upsamplers (upsample_size, nearest F.interpolate), e.g. 7 -> 4 -> 2 -> 4 -> 7.
    "odd_sizes_three_levels": ("UNet2DConditionModel", dict(
        block_out_channels=(16, 32, 32), norm_num_groups=8, down_block_types=(CA, CA, D),
        up_block_types=(U, CU, CU), attention_head_dim=2, cross_attention_dim=24), (2, 7, 10), 24),
    # the same with downsample_padding 0 (pad (0, 1)): 9 -> 4 -> 1, up 1 -> 4 -> 9 (not 2x minus one)
    "odd_sizes_pad0": ("UNet2DConditionModel", dict(
        block_out_channels=(16, 32, 32), norm_num_groups=8, down_block_types=(CA, D, CA),
        up_block_types=(CU, U, CU), attention_head_dim=2, cross_attention_dim=24, downsample_padding=0),
        (1, 9, 6), 24),
    # Heads that do not divide the channels: diffusers runs the transformer heads * (c // heads) wide
    # between proj_in and proj_out (3 heads of 5 on 16 channels, 5 of 6 on 32). Used to be refused.
    "heads_not_dividing": ("UNet2DConditionModel", dict(
        COND, block_out_channels=(16, 32), down_block_types=(CA, CA), up_block_types=(CU, CU),
        attention_head_dim=[3, 5]), (2, 8, 8), 24),
    "heads_not_dividing_linear_projection_depth2": ("UNet2DConditionModel", dict(
        COND, attention_head_dim=3, use_linear_projection=True, transformer_layers_per_block=2), (1, 8, 8), 24),
    # UNet2DModel: 24 channels with 16 per head -> one 16-wide head; 16 with 5 -> three 5-wide heads.
    "model2d_head_dim_not_dividing": ("UNet2DModel", dict(
        MODEL2D, block_out_channels=(16, 24), down_block_types=(AD, AD), up_block_types=(AU, AU),
        attention_head_dim=5), (2, 8, 8), None),
    "model2d_head_dim_not_dividing_mid": ("UNet2DModel", dict(
        MODEL2D, block_out_channels=(16, 24), attention_head_dim=16), (1, 8, 8), None),
}


def _build(name, tmp_path, seed=0):
    import diffusers

    cls_name, kwargs, _, _ = CASES[name]
    torch.manual_seed(seed)
    model = _randomize(getattr(diffusers, cls_name)(**kwargs).eval(), seed)
    folder = str(tmp_path / name)
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _inputs(name):
    cls_name, kwargs, (b, h, w), ctx_dim = CASES[name]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((b, h, w, kwargs.get("in_channels", 4))).astype(np.float32)
    t = np.array([3, 917, 500])[:b]
    ctx = None if ctx_dim is None else rng.standard_normal((b, 5, ctx_dim)).astype(np.float32)
    labels = None
    if kwargs.get("class_embed_type") == "timestep":
        labels = np.array([5, 250, 7])[:b]
    elif kwargs.get("num_class_embeds"):
        labels = np.array([1, kwargs["num_class_embeds"] - 1, 0])[:b]
    return x, t, ctx, labels


@pytest.mark.parametrize("name", list(CASES))
def test_config_matches_diffusers(name, tmp_path):
    model, folder = _build(name, tmp_path)
    x, t, ctx, labels = _inputs(name)
    args = dict(class_labels=None if labels is None else torch.from_numpy(labels))
    if ctx is not None:
        args["encoder_hidden_states"] = torch.from_numpy(ctx)
    with torch.no_grad():
        want = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), **args).sample
    want = want.permute(0, 2, 3, 1).numpy()
    unet, params = load_unet(folder)
    got = np.asarray(jax.jit(unet.apply)({"params": params}, x, t, ctx, labels))
    print(f"{name}: max abs err {np.abs(got - want).max():.2e} (output std {want.std():.3f})")
    assert want.std() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_unused_cross_attention_dim_entries_collapse():
    """The context width is the one the cross-attention blocks use, whatever the
    other entries say (callers size the context from the config)."""
    cfg = unet_config_from_diffusers(dict(COND, cross_attention_dim=[24, 32], mid_block_type=None))
    assert cfg.cross_attention_dim == 24
    cfg = unet_config_from_diffusers(dict(COND, cross_attention_dim=[32, 24], down_block_types=(D, CA),
                                          up_block_types=(CU, U)))
    assert cfg.cross_attention_dim == 24


# Configs refused with an error naming config.json, the key and what is supported
# (where diffusers builds them they used to fail obscurely or name no config key).
REFUSED = {
    "heads_null_on_attention_level": (dict(COND, attention_head_dim=[None, 2]), r"attention_head_dim=\[None, 2\]"),
    # More heads than channels / a head wider than its level: zero-width attention in diffusers.
    "more_heads_than_channels": (dict(COND, attention_head_dim=[17, 2]), r"attention_head_dim=\[17, 2\].*16 channels"),
    "model2d_head_wider_than_level": (dict(MODEL2D, _class_name="UNet2DModel", block_out_channels=(16, 24),
                                           attention_head_dim=32), "attention_head_dim=32.*24 channels"),
    # Two cross-attention blocks of different widths cannot share one encoder_hidden_states.
    "cross_dims_differ": (dict(COND, cross_attention_dim=[24, 32]), r"cross_attention_dim=\[24, 32\].*one width"),
    # diffusers refuses these too; they used to fail later (only_cross_attention in
    # UNet.__call__, without the file) or with a TypeError.
    "only_cross_attention_length": (dict(COND, only_cross_attention=[True]), "only_cross_attention has 1 entries"),
    "model2d_norm_groups_null": (dict(MODEL2D, _class_name="UNet2DModel", norm_num_groups=None),
                                 "norm_num_groups=None"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_unsupported_layout_is_refused_by_key(name, tmp_path):
    config, pattern = REFUSED[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json.*" + pattern):
        unet_config_from_diffusers(json.loads(path.read_text()), source=str(path))


def test_context_width_of_a_hand_built_config():
    """UNetConfig.context_width (what unet_dummy_inputs and the trainer size the context by) is the
    width of the blocks with cross-attention, not the last per-block entry."""
    from ldm_jax.models.unet import UNetConfig, unet_dummy_inputs

    kw = dict(block_out_channels=(32, 64), layers_per_block=1, num_heads=2, norm_num_groups=8,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None)
    cfg = UNetConfig(**kw, cross_attention_dim=(24, 32))
    assert cfg.context_width == 24
    assert unet_dummy_inputs(cfg)[2].shape[-1] == 24
    assert UNetConfig(**kw, cross_attention_dim=16).context_width == 16
    assert UNetConfig(**{**kw, "down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2},
                      cross_attention_dim=(24, 32)).context_width is None
    with pytest.raises(ValueError, match=r"different cross_attention_dim \[24, 32\]"):
        UNetConfig(**{**kw, "mid_block_type": "UNetMidBlock2DCrossAttn"}, cross_attention_dim=(24, 32)).context_width
