"""The U-Net against diffusers' UNet2DConditionModel / UNet2DModel.

Each reference is built tiny with every weight randomised (diffusers zero-inits
conv_out / proj_out and sets norms to 1, which would hide mistakes), saved with
``save_pretrained`` (safetensors) and loaded back with ``load_unet``.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.unet_diffusers import load_unet, unet_config_from_diffusers
from ldm_jax.models.unet import UNet, UNetConfig
from ldm_jax.models.unet_blocks import timestep_embedding

WEIGHTS = "diffusion_pytorch_model.safetensors"


def _randomize(model, seed):
    """Fill every tensor of the state dict: kernels ~ N(0, 1/fan_in), norm
    scales ~ 1 + N(0, 0.1^2), biases / other vectors ~ N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / float(np.prod(p.shape[1:])) ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


TINY = dict(block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, sample_size=16)
TINY1 = dict(TINY, layers_per_block=1)  # cheaper to compile where two layers add nothing

# name -> (diffusers class, constructor kwargs). Context width 48, 7 tokens.
CASES = {
    # (1) SD1: 8 heads everywhere (diffusers' `attention_head_dim` = heads), conv projections.
    "sd1": ("UNet2DConditionModel", dict(
        TINY, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, cross_attention_dim=48)),
    # (2) SD2: per-block heads (16 channels each), linear projections, upcast, 2-layer transformers.
    "sd2": ("UNet2DConditionModel", dict(
        TINY, block_out_channels=(32, 64, 64), layers_per_block=(1, 2, 1),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True,
        transformer_layers_per_block=(1, 2, 2), cross_attention_dim=48)),
    # (3) class-conditional (CompVis cin): a label table added to the time embedding.
    "class_cond": ("UNet2DConditionModel", dict(
        TINY1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, cross_attention_dim=48,
        num_class_embeds=10)),
    # (4) inpainting: 9 input channels.
    "inpaint9": ("UNet2DConditionModel", dict(
        TINY1, in_channels=9, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, cross_attention_dim=48)),
    # x4-upscaler layout: 7 input channels, noise-level label table, only_cross_attention per block.
    "upscaler7": ("UNet2DConditionModel", dict(
        TINY1, in_channels=7, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
        cross_attention_dim=48, use_linear_projection=True, only_cross_attention=(True, False),
        num_class_embeds=12)),
    # Less common switches in one model: "timestep" class embedding concatenated, time act,
    # [sin, cos] with freq shift 1, asymmetric downsample pad, per-layer transformer depths,
    # mid-block residual scale, centred input, other conv kernels.
    "extras": ("UNet2DConditionModel", dict(
        TINY, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
        cross_attention_dim=48, class_embed_type="timestep", class_embeddings_concat=True,
        time_embedding_act_fn="silu", flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
        transformer_layers_per_block=[[1, 2], [2, 1]], reverse_transformer_layers_per_block=[[1, 1, 2], [2, 1, 1]],
        mid_block_scale_factor=2.0, center_input_sample=True, conv_in_kernel=5, conv_out_kernel=1)),
    # (5) no cross-attention in UNet2DConditionModel: plain resnet stages, resnet-only mid block.
    "no_cross": ("UNet2DConditionModel", dict(
        TINY1, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2D")),
    # Unconditional LDM layout (UNet2DModel): GroupNorm self-attention stages and mid block.
    "uncond_2d": ("UNet2DModel", dict(
        TINY1, in_channels=3, out_channels=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16, num_class_embeds=5)),
}


def _build(name, tmp_path, seed=0):
    import diffusers

    cls_name, kwargs = CASES[name]
    torch.manual_seed(seed)
    model = getattr(diffusers, cls_name)(**kwargs).eval()
    _randomize(model, seed)
    folder = str(tmp_path / name)
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _inputs(name, batch=2, size=16):
    """(x_bhwc, t_b, ctx_btd or None, class_labels or None) for a case."""
    rng = np.random.default_rng(1)
    cls_name, kwargs = CASES[name]
    x = rng.standard_normal((batch, size, size, kwargs.get("in_channels", 4))).astype(np.float32)
    t = np.array([3, 917])[:batch]
    is_cross = cls_name == "UNet2DConditionModel" and name != "no_cross"
    ctx = rng.standard_normal((batch, 7, 48)).astype(np.float32) if is_cross else None
    labels = None
    if kwargs.get("class_embed_type") == "timestep":
        labels = np.array([5, 250])[:batch]
    elif kwargs.get("num_class_embeds"):
        labels = np.array([1, kwargs["num_class_embeds"] - 1])[:batch]
    return x, t, ctx, labels


def _torch_forward(model, x, t, ctx, labels):
    args = dict(class_labels=None if labels is None else torch.from_numpy(labels))
    with torch.no_grad():
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)
        if ctx is not None or type(model).__name__ == "UNet2DConditionModel":
            args["encoder_hidden_states"] = None if ctx is None else torch.from_numpy(ctx)
        out = model(xt, torch.from_numpy(t), **args).sample
    return out.permute(0, 2, 3, 1).numpy()


def _jax_forward(unet, params, x, t, ctx, labels):
    return np.asarray(jax.jit(unet.apply)({"params": params}, x, t, ctx, labels))


# Outputs of the parity test, reused by the attention-impl test to save a compile.
_XLA_OUTPUTS = {}


@pytest.mark.parametrize("name", list(CASES))
def test_unet_matches_diffusers(name, tmp_path):
    model, folder = _build(name, tmp_path)
    x, t, ctx, labels = _inputs(name)
    want = _torch_forward(model, x, t, ctx, labels)
    unet, params = load_unet(folder)
    got = _jax_forward(unet, params, x, t, ctx, labels)
    _XLA_OUTPUTS[name] = (folder, got)
    err = np.abs(got - want).max()
    print(f"{name}: max abs err {err:.2e} (output std {want.std():.3f})")
    assert want.std() > 0.1  # the randomised reference produces a non-trivial output
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


_CA, _CU = "CrossAttnDownBlock2D", "CrossAttnUpBlock2D"
FULL_SIZE = {  # released layouts (config values as in their unet/config.json)
    "sd15": ("UNet2DConditionModel", dict(
        attention_head_dim=8, cross_attention_dim=768, down_block_types=[_CA, _CA, _CA, "DownBlock2D"],
        up_block_types=["UpBlock2D", _CU, _CU, _CU])),
    "sd21": ("UNet2DConditionModel", dict(
        attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
        upcast_attention=True, down_block_types=[_CA, _CA, _CA, "DownBlock2D"],
        up_block_types=["UpBlock2D", _CU, _CU, _CU])),
    "x4_upscaler": ("UNet2DConditionModel", dict(
        attention_head_dim=8, block_out_channels=[256, 512, 512, 1024], cross_attention_dim=1024,
        down_block_types=["DownBlock2D", _CA, _CA, _CA], up_block_types=[_CU, _CU, _CU, "UpBlock2D"],
        in_channels=7, num_class_embeds=1000, only_cross_attention=[True, True, True, False],
        use_linear_projection=True)),
    "ldm_celebahq": ("UNet2DModel", dict(
        block_out_channels=[224, 448, 672, 896], attention_head_dim=32, in_channels=3, out_channels=3,
        down_block_types=["DownBlock2D"] + ["AttnDownBlock2D"] * 3,
        up_block_types=["AttnUpBlock2D"] * 3 + ["UpBlock2D"])),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_layouts_match_diffusers_names_and_shapes(name):
    """Released layouts, built on torch's meta device (no memory): every
    diffusers tensor maps onto the Flax tree with the right shape, and back."""
    import diffusers
    from ldm_jax.convert.mapping import convert_state_dict
    from ldm_jax.convert.unet_diffusers import unet_abstract_params

    cls_name, kwargs = FULL_SIZE[name]
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**kwargs)
    zero = np.zeros((), np.float32)
    sd = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in model.state_dict().items()}
    cfg = unet_config_from_diffusers(dict(model.config, _class_name=cls_name))
    target = unet_abstract_params(UNet(cfg))
    convert_state_dict(sd, target, source=name)  # raises on any missing / unexpected / misshapen key
    assert sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(target)) == sum(
        v.numel() for v in model.state_dict().values())


def test_config_semantics_of_attention_head_dim(tmp_path):
    """diffusers' UNet2DConditionModel `attention_head_dim` is the number of heads."""
    _, folder = _build("sd2", tmp_path)
    with open(os.path.join(folder, "config.json")) as f:
        cfg = unet_config_from_diffusers(json.load(f))
    assert [cfg.heads(i) for i in range(3)] == [2, 4, 4]
    assert cfg.use_linear_projection and cfg.upcast_attention
    assert cfg.down_transformer_layers(1) == (2, 2) and cfg.up_transformer_layers(1) == (2, 2, 2)


def test_attention_impls_agree(tmp_path):
    name = "upscaler7"
    x, t, ctx, labels = _inputs(name)
    if name in _XLA_OUTPUTS and os.path.isdir(_XLA_OUTPUTS[name][0]):
        folder, ref = _XLA_OUTPUTS[name]
    else:
        _, folder = _build(name, tmp_path)
        unet, params = load_unet(folder)
        ref = _jax_forward(unet, params, x, t, ctx, labels)
    fast, params = load_unet(folder, attention_impl="dot_product")
    assert fast.attention_impl == "dot_product"
    got = _jax_forward(fast, params, x, t, ctx, labels)
    print(f"dot_product vs xla: max abs err {np.abs(got - ref).max():.2e}")
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_bf16_compute_close_to_float32(tmp_path):
    """bf16 activations (float32 params, norm statistics and softmax) against the
    float32 torch reference. Tolerance: at most twice the error of PyTorch's own
    bf16 autocast on the same model and inputs (both are ~1.5% of max |out|:
    bf16 keeps 8 mantissa bits, ~0.4% per rounding, over ~30 layers), and below
    4% of max |out| in absolute terms."""
    model, folder = _build("sd1", tmp_path)
    x, t, ctx, _ = _inputs("sd1")
    want = _torch_forward(model, x, t, ctx, None)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch_bf16 = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    torch_err = np.abs(torch_bf16.float().permute(0, 2, 3, 1).numpy() - want).max()
    unet, params = load_unet(folder, dtype="bfloat16")
    out = jax.jit(unet.apply)({"params": params}, x, t, ctx)
    assert out.dtype == jnp.bfloat16
    assert all(p.dtype == np.float32 for p in jax.tree_util.tree_leaves(params))
    err = np.abs(np.asarray(out, np.float32) - want).max()
    scale = np.abs(want).max()
    print(f"bf16: max abs err {err:.2e} ({err / scale:.2%} of max |out|); torch autocast bf16: {torch_err:.2e}")
    assert err < 2 * torch_err
    assert err < 0.04 * scale


def test_bin_weights(tmp_path):
    pytest.importorskip("ldm_jax.convert.torch_pickle")
    model, folder = _build("uncond_2d", tmp_path)
    os.remove(os.path.join(folder, WEIGHTS))
    torch.save(model.state_dict(), os.path.join(folder, "diffusion_pytorch_model.bin"))
    x, t, ctx, labels = _inputs("uncond_2d")
    unet, params = load_unet(folder)
    got = _jax_forward(unet, params, x, t, ctx, labels)
    np.testing.assert_allclose(got, _torch_forward(model, x, t, ctx, labels), atol=1e-4, rtol=0)


def _small_config(**kw):
    """One-level JAX-only model with each block kind: cross-attention down,
    self-attention up and mid. Compiles in a few seconds."""
    return UNetConfig(**dict(dict(
        block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",), up_block_types=("AttnUpBlock2D",),
        mid_block_type="UNetMidBlock2D", layers_per_block=1, norm_num_groups=4, num_heads=2,
        cross_attention_dim=8), **kw))


CTX = np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32)


def _random_params(unet, *args):
    """N(0, 0.3^2) parameters on the abstract tree (avoids compiling init)."""
    shapes = jax.eval_shape(unet.init, jax.random.PRNGKey(0), *args)["params"]
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def test_remat_gives_identical_outputs_and_grads():
    unet = UNet(_small_config())
    remat = UNet(_small_config(remat_blocks=True))
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    params = _random_params(unet, x, 10, CTX)

    def value_and_grad(m):
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(m.apply({"params": p}, x, 10, CTX) ** 2)))(params)

    (v0, g0), (v1, g1) = value_and_grad(unet), value_and_grad(remat)
    np.testing.assert_array_equal(v1, v0)
    # Recomputation reorders float32 arithmetic in the backward pass: compare at
    # float32 resolution of the gradient scale (some grads, e.g. of to_k biases,
    # are exactly zero in exact arithmetic and pure rounding noise here).
    scale = max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(g0))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * scale, rtol=1e-5), g1, g0)


def test_dropout_only_in_training_and_scalar_timestep():
    unet = UNet(_small_config(dropout=0.5))
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    params = _random_params(unet, x, 1, CTX)
    apply = jax.jit(unet.apply, static_argnames="train")
    a = apply({"params": params}, x, np.array([7, 7]), CTX)
    b = apply({"params": params}, x, np.array([7, 7]), CTX, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    # Deterministic without train; a scalar timestep is broadcast over the batch.
    np.testing.assert_allclose(apply({"params": params}, x, np.int32(7), CTX), a, atol=1e-6, rtol=0)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([0, 1, 17, 999, 0.5], np.float32)
    for dim, flip, shift in [(32, True, 0), (33, False, 1)]:
        want = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        got = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)


# --- bad checkpoints and bad inputs ----------------------------------------------------------


def _edit_weights(folder, edit):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, WEIGHTS)
    sd = dict(load_file(path))
    edit(sd)
    save_file(sd, path)


@pytest.fixture
def sd1_folder(tmp_path):
    return _build("sd1", tmp_path)[1]


KEY = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"


def test_wrong_shape_weight_is_reported(sd1_folder):
    _edit_weights(sd1_folder, lambda sd: sd.__setitem__(KEY, np.zeros((32, 40), np.float32)))
    with pytest.raises(CheckpointError, match=KEY.replace(".", r"\.") + ".*shape"):
        load_unet(sd1_folder)


def test_missing_weight_is_reported(sd1_folder):
    _edit_weights(sd1_folder, lambda sd: sd.pop(KEY))
    with pytest.raises(CheckpointError, match="missing.*attn2/to_k/kernel"):
        load_unet(sd1_folder)


def test_unexpected_weight_is_reported(sd1_folder):
    extra = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.bias"
    _edit_weights(sd1_folder, lambda sd: sd.__setitem__(extra, np.zeros((32,), np.float32)))
    with pytest.raises(CheckpointError, match="unexpected.*" + extra.replace(".", r"\.")):
        load_unet(sd1_folder)


@pytest.mark.parametrize("key,value", [
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("class_embed_type", "projection"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("addition_embed_type", "text_time"),
    ("_class_name", "UNet3DConditionModel"),
])
def test_unsupported_config_is_reported(sd1_folder, key, value):
    path = os.path.join(sd1_folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg[key] = value
    with open(path, "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=f"config.json.*{key}.*{value if isinstance(value, str) else value[0]}"):
        load_unet(sd1_folder)


def test_bad_inputs_raise_clear_errors():
    cfg = UNetConfig(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                     norm_num_groups=4, num_heads=2, cross_attention_dim=8, num_class_embeds=3)
    unet = UNet(cfg)
    x, ctx, y = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1, 3, 8)), jnp.array([1])
    init = lambda *a: jax.eval_shape(unet.init, jax.random.PRNGKey(0), *a)  # noqa: E731
    init(x, 1, ctx, y)
    with pytest.raises(ValueError, match="context_btd"):
        init(x, 1, None, y)
    with pytest.raises(ValueError, match="class_labels"):
        init(x, 1, ctx, None)
    # an odd side is upsampled back to its skip's size (diffusers' upsample_size; parity with
    # diffusers at such sizes in test_unet_config_sweep)
    out = jax.eval_shape(lambda p, x: unet.apply(p, x, 1, ctx, y), init(jnp.zeros((1, 9, 8, 4)), 1, ctx, y),
                         jnp.zeros((1, 9, 8, 4)))
    assert out.shape == (1, 9, 8, 4)
    with pytest.raises(ValueError, match=r"\(B, H, W, 4\)"):
        init(jnp.zeros((1, 8, 8, 3)), 1, ctx, y)
    # (heads that do not divide the channels are built as diffusers does: test_unet_config_sweep)
    blocks = dict(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(ValueError, match="block 0 has 16 channels, fewer than 17 heads need"):
        UNetConfig(block_out_channels=(16, 32), norm_num_groups=4, num_heads=17, **blocks)
    with pytest.raises(ValueError, match="block 0 has 16 channels, fewer than head_dim 0 need"):
        UNetConfig(block_out_channels=(16, 32), norm_num_groups=4, head_dim=0, **blocks)
    with pytest.raises(ValueError, match="unsupported down block type"):
        UNetConfig(block_out_channels=(16,), down_block_types=("Foo",), up_block_types=("UpBlock2D",))
