"""Blocks of the LDM / Stable Diffusion U-Net (NHWC).

Submodule names mirror the diffusers ``UNet2DConditionModel`` / ``UNet2DModel``
state-dict names with ``.N`` folded into ``name_N`` (``resnets_0``,
``attentions_1``, ``transformer_blocks_0``, ``to_out_0``, ``ff/net_0/proj``,
``downsamplers_0``), so ``ldm_jax.convert.mapping.convert_state_dict`` maps a
diffusers checkpoint without any rename.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import layers
from ldm_jax.models.dense import Dense

Dtype = jnp.dtype


def timestep_embedding(
    t_b: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal timestep features, (B,) -> (B, dim), always float32.

    The transformer position encoding of Vaswani et al. 2017 (Sec. 3.5) used as
    the diffusion-step embedding by Ho et al. 2020 (DDPM, Appendix B), in the
    form of diffusers' ``get_timestep_embedding``:
    freq_k = exp(-log(max_period) * k / (dim/2 - freq_shift)), k < dim/2, and
    emb = [sin(t freq), cos(t freq)] (or [cos, sin] with ``flip_sin_to_cos``),
    zero-padded by one column when ``dim`` is odd.
    """
    half = dim // 2
    # The frequencies are constants: computed in numpy with the float32 roundings
    # of the reference (float32 exponent, correctly rounded exp), because XLA's
    # float32 exp/division may be 1 ulp off, which at t ~ 1000 moves sin/cos by 3e-5.
    exponent_k = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    exponent_k = exponent_k / np.float32(half - freq_shift)
    freqs_k = jnp.asarray(np.exp(exponent_k.astype(np.float64)).astype(np.float32))
    args_bk = t_b.astype(jnp.float32)[:, None] * freqs_k[None, :]
    sin, cos = jnp.sin(args_bk), jnp.cos(args_bk)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: linear_1 -> SiLU -> linear_2."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.Dense(self.features, name="linear_1", **kw)(x)
        return nn.Dense(self.features, name="linear_2", **kw)(nn.silu(x))


class GEGLU(nn.Module):
    """Gated GELU of Shazeer 2020 ("GLU Variants Improve Transformer", Eq. 6):
    ``proj`` to 2*inner features, split into (h, gate), return h * GELU(gate)
    with the exact (erf) GELU, as torch ``F.gelu`` does by default."""

    inner: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Dense(2 * self.inner, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: net_0 (GEGLU), net_1 (dropout, p=0
    in the U-Net), net_2 (Linear back to ``dim``); inner width 4 * dim."""

    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btc: jax.Array) -> jax.Array:
        dim = x_btc.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(dim * self.mult, name="net_0", **kw)(x_btc)
        return Dense(dim, name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer layer of the LDM spatial transformer
    (Rombach et al. 2022, Sec. 3.3 / Appendix: self-attention, cross-attention
    to the conditioning tokens, GEGLU feed-forward, each with a residual).

    With ``only_cross_attention`` the first attention also attends to the
    context (the SD x4 upscaler); with ``cross_attention=False`` there is no
    second attention (diffusers leaves ``norm2``/``attn2`` out).
    """

    heads: int
    dim_head: int
    cross_attention: bool = True
    only_cross_attention: bool = False
    norm_eps: float = 1e-5
    attention_impl: layers.AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_btc: jax.Array, ctx_bsd: Optional[jax.Array]) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn_kw = dict(heads=self.heads, dim_head=self.dim_head, impl=self.attention_impl, **kw)
        norm = lambda name: nn.LayerNorm(epsilon=self.norm_eps, name=name, **kw)  # noqa: E731
        h = norm("norm1")(x_btc)
        x_btc = x_btc + layers.Attention(name="attn1", **attn_kw)(
            h, ctx_bsd if self.only_cross_attention else None)
        if self.cross_attention:
            h = norm("norm2")(x_btc)
            x_btc = x_btc + layers.Attention(name="attn2", **attn_kw)(h, ctx_bsd)
        h = norm("norm3")(x_btc)
        return x_btc + FeedForward(name="ff", **kw)(h)


class SpatialTransformer(nn.Module):
    """diffusers ``Transformer2DModel`` on continuous inputs (CompVis
    ``SpatialTransformer``): GroupNorm(eps 1e-6) -> proj_in (1x1 conv, or a
    linear layer on tokens with ``use_linear_projection``) -> transformer
    layers over the H*W tokens -> proj_out -> + input."""

    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    cross_attention: bool = True
    only_cross_attention: bool = False
    attention_impl: layers.AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: Optional[str] = None  # proj_in / proj_out 1x1 convolutions (ldm_jax.models.conv)

    @nn.compact
    def __call__(self, x_bhwc: jax.Array, ctx_bsd: Optional[jax.Array]) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x_bhwc.shape
        inner = self.heads * self.dim_head
        h = layers.GroupNorm(self.groups, 1e-6, name="norm", **kw)(x_bhwc)
        if self.use_linear_projection:
            h_btc = Dense(inner, name="proj_in", **kw)(h.reshape(b, hgt * wid, c))
        else:
            proj_in = layers.conv1x1(inner, name="proj_in", conv_impl=self.conv_impl, **kw)
            h_btc = proj_in(h).reshape(b, hgt * wid, inner)
        for k in range(self.num_layers):
            h_btc = BasicTransformerBlock(
                self.heads, self.dim_head, cross_attention=self.cross_attention,
                only_cross_attention=self.only_cross_attention,
                attention_impl=self.attention_impl, name=f"transformer_blocks_{k}", **kw,
            )(h_btc, ctx_bsd)
        if self.use_linear_projection:
            out = Dense(c, name="proj_out", **kw)(h_btc).reshape(b, hgt, wid, c)
        else:
            out = layers.conv1x1(c, name="proj_out", conv_impl=self.conv_impl, **kw)(h_btc.reshape(b, hgt, wid, inner))
        return (out + x_bhwc).astype(self.dtype)


# --------------------------------------------------------------------------
# U-Net stages. ``attention`` is None (plain resnets), "cross" (spatial
# transformer, CrossAttn*Block2D) or "self" (GroupNorm self-attention with a
# residual, the Attn*Block2D of diffusers' UNet2DModel).
# --------------------------------------------------------------------------


class _StageBase(nn.Module):
    out_channels: int
    num_layers: int
    attention: Optional[str] = None
    heads: int = 1
    dim_head: Optional[int] = None  # channels per head (UNetConfig.dim_head); None: out_channels // heads
    transformer_layers: Tuple[int, ...] = (1,)
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.0
    remat: bool = False
    attention_impl: layers.AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: Optional[str] = None  # convolution impl of every conv in the stage (ldm_jax.models.conv)

    def _resnet(self, name: str):
        # static_argnums counts self: (self, x, temb, deterministic).
        cls = nn.remat(layers.ResnetBlock, static_argnums=(3,)) if self.remat else layers.ResnetBlock
        return cls(self.out_channels, groups=self.groups, epsilon=self.eps,
                   dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                   conv_impl=self.conv_impl)

    def _attention(self, j: int, groups: Optional[int] = None):
        """The j-th attention of the stage, as a function of (x_bhwc, ctx_bsd)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name=f"attentions_{j}")
        dim_head = self.dim_head or self.out_channels // self.heads
        if self.attention == "cross":
            cls = nn.remat(SpatialTransformer) if self.remat else SpatialTransformer
            return cls(
                self.heads, dim_head, num_layers=self.transformer_layers[j], groups=self.groups,
                use_linear_projection=self.use_linear_projection,
                only_cross_attention=self.only_cross_attention,
                attention_impl=self.attention_impl, conv_impl=self.conv_impl, **kw)
        if self.attention == "self":
            cls = nn.remat(layers.Attention) if self.remat else layers.Attention
            mod = cls(self.heads, dim_head, qkv_bias=True, norm_groups=groups or self.groups,
                      norm_epsilon=self.eps, impl=self.attention_impl, **kw)
            return lambda x, ctx: mod(x)
        raise ValueError(f"unknown attention kind {self.attention!r}")


class DownStage(_StageBase):
    """DownBlock2D / CrossAttnDownBlock2D / AttnDownBlock2D: ``num_layers``
    x (resnet [+ attention]), then an optional stride-2 conv. Returns the
    output and the skip activations (one per layer, plus the downsampled one)."""

    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, ctx, deterministic: bool = True):
        skips = []
        for j in range(self.num_layers):
            x = self._resnet(f"resnets_{j}")(x, temb, deterministic)
            if self.attention:
                x = self._attention(j)(x, ctx)
            skips.append(x)
        if self.add_downsample:
            x = layers.Downsample(
                self.out_channels, asymmetric_pad=self.downsample_padding == 0,
                dtype=self.dtype, param_dtype=self.param_dtype, name="downsamplers_0", conv_impl=self.conv_impl)(x)
            skips.append(x)
        return x, tuple(skips)


class UpStage(_StageBase):
    """UpBlock2D / CrossAttnUpBlock2D / AttnUpBlock2D: for each layer,
    concatenate the matching skip (last first) on channels, resnet
    [+ attention]; then an optional nearest 2x upsample + conv."""

    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips: Sequence[jax.Array], temb, ctx, deterministic: bool = True,
                 upsample_hw: Optional[Tuple[int, int]] = None):
        """``upsample_hw``: the next stage's skip size, for sides that did not halve evenly."""
        if len(skips) != self.num_layers:
            raise ValueError(f"up stage expects {self.num_layers} skip tensors, got {len(skips)}")
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
            x = self._resnet(f"resnets_{j}")(x, temb, deterministic)
            if self.attention:
                x = self._attention(j)(x, ctx)
        if self.add_upsample:
            x = layers.Upsample(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="upsamplers_0", conv_impl=self.conv_impl)(x, upsample_hw)
        return x


class MidStage(_StageBase):
    """UNetMidBlock2DCrossAttn (attention="cross") or UNetMidBlock2D
    (attention="self" or None): resnet, then ``num_layers`` x ([attention,]
    resnet). ``output_scale_factor`` divides each residual sum, as in diffusers
    (1 for every released LDM / SD checkpoint)."""

    output_scale_factor: float = 1.0
    attn_groups: Optional[int] = None

    @nn.compact
    def __call__(self, x, temb, ctx, deterministic: bool = True):
        rescale = (lambda v: v) if self.output_scale_factor == 1 else (  # noqa: E731
            lambda v: v / self.output_scale_factor)
        x = rescale(self._resnet("resnets_0")(x, temb, deterministic))
        for j in range(self.num_layers):
            if self.attention == "self":  # diffusers rescales (attention + residual) too
                x = rescale(self._attention(j, self.attn_groups)(x, ctx))
            elif self.attention == "cross":
                x = self._attention(j)(x, ctx)
            x = rescale(self._resnet(f"resnets_{j + 1}")(x, temb, deterministic))
        return x
