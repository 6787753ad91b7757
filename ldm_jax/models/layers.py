"""Building blocks shared by the U-Net, the autoencoder and the text encoder.

Everything is NHWC. Submodule names follow the diffusers / transformers
parameter names (``norm1``, ``conv1``, ``to_q``, ``to_out_0`` ...), so that a
PyTorch state dict maps onto a Flax parameter tree by a mechanical rename
(see ``ldm_jax.convert.mapping``).

Precision policy: parameters are stored in ``param_dtype`` (float32 master
weights by default), computation runs in ``dtype``; normalisation statistics
and the attention softmax are always computed in float32.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import attention_kernels, conv
from ldm_jax.models.dense import Dense

# "xla":         explicit einsum + float32 softmax, runs everywhere and is the reference.
# "dot_product": the fast path of the current backend (``attention_kernels.attention``):
#                cuDNN flash attention on a CUDA GPU where it applies (bf16/fp16, head dim
#                multiple of 8), the blocked recomputing attention on CPU,
#                jax.nn.dot_product_attention (XLA) elsewhere.
# "blocked":     FlashAttention's schedule in XLA ops with a recomputing backward (any backend).
# "cudnn":       cuDNN flash attention, strict (raises where it cannot run).
# "splash":      Pallas splash attention (TPU).
AttentionImpl = Literal["xla", "dot_product", "blocked", "cudnn", "splash"]
ATTENTION_IMPLS = ("xla", "dot_product", "blocked", "cudnn", "splash")

Dtype = jnp.dtype

# transformers' ACT2FN names of the text encoders' feed-forward activations.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu")


def activation(name: str, x: jax.Array) -> jax.Array:
    """A text encoder's feed-forward activation by its transformers name."""
    if name == "gelu":  # torch nn.GELU() / F.gelu: the exact erf form
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    if name == "quick_gelu":  # Radford et al. 2021 (OpenAI CLIP): x * sigmoid(1.702 x)
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def layer_norm(epsilon: float, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    # Flax computes the statistics in float32 for low-precision inputs.
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)


def dot_product_attention(
    q_bthd: jax.Array,
    k_bshd: jax.Array,
    v_bshd: jax.Array,
    *,
    impl: AttentionImpl = "xla",
    causal: bool = False,
) -> jax.Array:
    """softmax(q k^T / sqrt(d)) v over heads, (B, T, H, D) -> (B, T, H, D).

    Scores are accumulated and normalised in float32 whatever the input dtype
    (this subsumes SD2's ``upcast_attention``); the probabilities are cast back
    to the value dtype for the second product.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    scale = 1.0 / math.sqrt(q_bthd.shape[-1])
    if impl != "xla":
        return attention_kernels.attention(q_bthd, k_bshd, v_bshd, impl=impl, scale=scale, causal=causal)
    logits_bhts = jnp.einsum(
        "bthd,bshd->bhts", q_bthd, k_bshd, preferred_element_type=jnp.float32
    ) * scale
    if causal:
        t, s = logits_bhts.shape[-2:]
        keep_ts = jnp.tril(jnp.ones((t, s), dtype=bool))
        logits_bhts = jnp.where(keep_ts, logits_bhts, jnp.finfo(jnp.float32).min)
    probs_bhts = jax.nn.softmax(logits_bhts, axis=-1).astype(v_bshd.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs_bhts, v_bshd)


def group_normalize(x: jax.Array, num_groups: int, epsilon: float) -> jax.Array:
    """(x - mean) / sqrt(var + epsilon) per example and channel group, in float32 (Wu & He 2018,
    "Group Normalization", Eq. 1-2; the variance of the centred values, as torch).

    Each statistic is reduced in two steps, first over the positions (B, P, C) -> (B, C), then over
    the channels of each group (B, G, C/G) -> (B, G), instead of one reduction over (positions,
    channels of a group): XLA:CPU (jaxlib 0.10) hands that one to YNNPACK, which reduces the
    non-adjacent axes at ~2 GB/s (8.5 ms for a 256x256x64 float32 map on the 2-core AMD EPYC bench
    machine, whose memory copies run at ~18 GB/s). In two steps, GroupNorm + SiLU on
    (1, 256, 256, 64): 23.9 -> 7.3 ms forward, 76 -> 36 ms forward + backward; on (16, 32, 32, 128):
    13.8 -> 3.8 ms and 34.8 -> 7.6 ms (bench/RESULTS.md, "A second CPU: AMD EPYC"). The same sums
    in another order and the same number of passes over x; not yet measured on a GPU.
    """
    b, c = x.shape[0], x.shape[-1]
    per_group = c // num_groups
    x32 = x.astype(jnp.float32).reshape(b, -1, c)
    count = x32.shape[1] * per_group

    def group_mean(values):  # (B, P, C) -> (B, 1, C): each channel gets its group's mean
        per_channel = values.sum(axis=1)                                           # (B, C)
        per_group_mean = per_channel.reshape(b, num_groups, per_group).sum(axis=-1) / count
        return jnp.repeat(per_group_mean, per_group, axis=-1)[:, None, :]

    centred = x32 - group_mean(x32)
    variance = group_mean(jnp.square(centred))
    return (centred * jax.lax.rsqrt(variance + epsilon)).reshape(x.shape)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the channel (last) axis; statistics in float32 (``group_normalize``)."""

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        normed = group_normalize(x, self.num_groups, self.epsilon)
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        out = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return out.astype(self.dtype)


def conv3x3(features: int, dtype: Dtype, param_dtype: Dtype, name: str, stride: int = 1,
            conv_impl: Optional[str] = None) -> nn.Conv:
    """A 3x3 convolution with PyTorch's padding=1. ``conv_impl``: see ``ldm_jax.models.conv``
    ("auto", "xla", "matmul"; None: the process default)."""
    return conv.Conv(
        features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
        dtype=dtype, param_dtype=param_dtype, name=name, impl=conv_impl,
    )


def conv1x1(features: int, dtype: Dtype, param_dtype: Dtype, name: str, conv_impl: Optional[str] = None) -> nn.Conv:
    return conv.Conv(features, (1, 1), padding="VALID", dtype=dtype, param_dtype=param_dtype, name=name,
                     impl=conv_impl)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D / CompVis ResBlock (Ho et al. 2020 style).

    h = conv1(silu(norm1(x))) [+ time_emb_proj(silu(temb))]
    h = conv2(dropout(silu(norm2(h))))
    out = shortcut(x) + h, with a 1x1 ``conv_shortcut`` when channels change.
    """

    out_channels: int
    groups: int = 32
    epsilon: float = 1e-5
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: Optional[str] = None  # convolution impl (ldm_jax.models.conv); None: the process default

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(conv_impl=self.conv_impl, **kw)
        h = GroupNorm(self.groups, self.epsilon, name="norm1", **kw)(x)
        h = conv3x3(self.out_channels, name="conv1", **ckw)(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups, self.epsilon, name="norm2", **kw)(h)
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
        h = conv3x3(self.out_channels, name="conv2", **ckw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv1x1(self.out_channels, name="conv_shortcut", **ckw)(x)
        return (x + h).astype(self.dtype)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution. ``asymmetric_pad`` reproduces the autoencoder's
    pad (0, 1, 0, 1) + padding 0; otherwise PyTorch padding=1 (the U-Net)."""

    out_channels: int
    asymmetric_pad: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        padding = ((0, 1), (0, 1)) if self.asymmetric_pad else ((1, 1), (1, 1))
        return conv.Conv(
            self.out_channels, (3, 3), strides=(2, 2), padding=padding,
            dtype=self.dtype, param_dtype=self.param_dtype, name="conv", impl=self.conv_impl,
        )(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution.

    ``output_hw``: the size to upsample to instead of 2x (diffusers' ``Upsample2D(output_size=)``,
    which the U-Net passes when a side does not divide by its overall downsampling: a stride-2
    convolution maps n to ceil(n / 2), so the skip is 2m - 1 where 2m would come back). It is
    PyTorch's ``F.interpolate(mode="nearest", size=)``: output row i reads input row
    floor(i * (in / out)), the scale in float32 as ATen computes it."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x: jax.Array, output_hw: Optional[Tuple[int, int]] = None) -> jax.Array:
        h, w = x.shape[1:3]
        if output_hw is None or tuple(output_hw) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:
            x = jnp.take(x, _nearest_source(h, output_hw[0]), axis=1)
            x = jnp.take(x, _nearest_source(w, output_hw[1]), axis=2)
        return conv3x3(self.out_channels, self.dtype, self.param_dtype, name="conv", conv_impl=self.conv_impl)(x)


def _nearest_source(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output index of ATen's nearest interpolation (upsample_nearest2d)."""
    scale = np.float32(size_in) / np.float32(size_out)
    src = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, size_in - 1)


class Attention(nn.Module):
    """diffusers ``Attention``: to_q / to_k / to_v / to_out_0 over tokens.

    With ``norm_groups`` set it is the autoencoder's spatial self-attention
    block: GroupNorm (``group_norm``) on a (B, H, W, C) input, one head over
    the H*W positions, and a residual connection.
    """

    heads: int
    dim_head: int
    out_dim: Optional[int] = None  # defaults to the query dimension
    qkv_bias: bool = False
    norm_groups: Optional[int] = None
    norm_epsilon: float = 1e-6
    impl: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context_bsd: Optional[jax.Array] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = x
        spatial_shape = None
        if self.norm_groups is not None:
            x = GroupNorm(self.norm_groups, self.norm_epsilon, name="group_norm", **kw)(x)
            spatial_shape = x.shape
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, H*W, C)
        context_bsd = x if context_bsd is None else context_bsd
        inner = self.heads * self.dim_head
        q = Dense(inner, use_bias=self.qkv_bias, name="to_q", **kw)(x)
        k = Dense(inner, use_bias=self.qkv_bias, name="to_k", **kw)(context_bsd)
        v = Dense(inner, use_bias=self.qkv_bias, name="to_v", **kw)(context_bsd)
        split = lambda a: a.reshape(a.shape[:2] + (self.heads, self.dim_head))  # noqa: E731
        h = dot_product_attention(split(q), split(k), split(v), impl=self.impl)
        h = h.reshape(h.shape[:2] + (inner,))
        out = Dense(self.out_dim or x.shape[-1], name="to_out_0", **kw)(h)
        if spatial_shape is not None:
            out = out.reshape(spatial_shape) + residual
        return out.astype(self.dtype)
