"""The LDM perceptual autoencoders: ``AutoencoderKL`` and ``VQModel``.

Rombach et al. 2022 (arXiv:2112.10752), Sec. 3.1 and Appendix G: an image
x (H, W, 3) is encoded to z (H/f, W/f, c) with f = 2^(len(block_out_channels)-1),
regularised either by a small KL penalty towards N(0, I) ("KL-reg",
``AutoencoderKL``) or by a vector-quantisation layer absorbed into the decoder
("VQ-reg", ``VQModel``, van den Oord et al. 2017 / Esser et al. 2021).

The network is the CompVis / diffusers ``Encoder`` / ``Decoder``: ResNet blocks
(GroupNorm eps 1e-6, no time embedding), stride-2 convolutions with the
asymmetric (0, 1, 0, 1) padding, one single-head spatial self-attention in the
middle block, nearest-neighbour upsampling. Levels listed in
``attention_levels`` (CompVis ``ddconfig.attn_resolutions``; the larger LDM
first stages KL-f16/f32, VQ-f8/f16) add the same self-attention after every
ResNet block of that level, in the encoder and in the decoder (diffusers
``Attn{Down,Up}*Block2D``, ``down_blocks_i.attentions_j``). Submodule names follow diffusers
(``encoder.down_blocks_0.resnets_1``, ``decoder.up_blocks_0.upsamplers_0.conv``,
``quant_conv``, ``post_quant_conv``, ``quantize.embedding``) so a diffusers
``vae/`` state dict maps onto the parameters mechanically
(``ldm_jax.convert.vae_diffusers``).

Inputs and outputs are NHWC. Images are in [-1, 1]; decoded images are not
clipped. ``scaling_factor`` is carried in the config for the diffusion model
(z * scaling_factor) and never applied by encode / decode.

    module.apply({"params": p}, x_bhwc, method="encode") -> DiagonalGaussianDistribution | VQEncoding
    module.apply({"params": p}, z_bhwc, method="decode") -> images (B, H, W, out_channels)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from ldm_jax.models import conv, layers
from ldm_jax.models.conv import CONV_IMPLS
from ldm_jax.models.layers import AttentionImpl, GroupNorm, ResnetBlock, conv3x3
from ldm_jax.models.quantizer import (  # noqa: F401  (re-exported)
    VectorQuantizer, VQEncoding, codebook_perplexity, codebook_usage,
)

Dtype = jnp.dtype
_EPS = 1e-6  # GroupNorm epsilon everywhere in the autoencoder


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Hyperparameters of the first-stage model (diffusers ``AutoencoderKL`` / ``VQModel`` config)."""

    kind: str = "kl"                    # "kl" (AutoencoderKL, double_z) or "vq" (VQModel)
    in_channels: int = 3                # image channels in
    out_channels: int = 3               # image channels out
    latent_channels: int = 4            # CompVis z_channels: encoder output / decoder input channels
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)  # per resolution; f = 2^(len-1)
    layers_per_block: int = 2           # ResNet blocks per encoder level (decoder has one more)
    norm_num_groups: int = 32           # GroupNorm groups
    mid_block_attention: bool = True    # single-head self-attention in the middle blocks
    attention_levels: Tuple[int, ...] = ()  # levels (indices into block_out_channels, 0 = full resolution) with
                                        # that self-attention after every ResNet block, encoder and decoder alike.
                                        # CompVis attn_resolutions lists feature-map sides, resolution // 2**level;
                                        # levels keep the config independent of the image size (converters map
                                        # them; diffusers: AttnDownEncoderBlock2D / AttnUpDecoderBlock2D)
    use_quant_conv: bool = True         # 1x1 conv after the encoder (KL: 2c -> 2c; VQ: c -> vq_embed_dim)
    use_post_quant_conv: bool = True    # 1x1 conv before the decoder
    num_vq_embeddings: int = 256        # VQ: codebook size K (CompVis n_embed)
    vq_embed_dim: Optional[int] = None  # VQ: codebook vector size (CompVis embed_dim); None = latent_channels
    beta: float = 0.25                  # VQ: commitment weight
    legacy: bool = True                 # VQ: taming/diffusers' legacy loss (beta on the codebook term)
    scaling_factor: float = 0.18215     # latent scale for the diffusion model (data only)
    shift_factor: Optional[float] = None  # latent shift for the diffusion model (data only)
    conv_impl: str = "auto"             # convolutions (ldm_jax.models.conv): "auto" (fastest per backend), "xla",
                                        # or "matmul"

    def __post_init__(self):
        if self.kind not in ("kl", "vq"):
            raise ValueError(f"AutoencoderConfig.kind must be 'kl' or 'vq', got {self.kind!r}")
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        if not self.block_out_channels:
            raise ValueError("AutoencoderConfig.block_out_channels must not be empty")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"AutoencoderConfig: block_out_channels {self.block_out_channels} are not all "
                    f"divisible by norm_num_groups={self.norm_num_groups}")
        levels = tuple(int(i) for i in self.attention_levels)
        n = len(self.block_out_channels)
        if len(set(levels)) != len(levels) or any(not 0 <= i < n for i in levels):
            raise ValueError(f"AutoencoderConfig.attention_levels must be distinct levels in [0, {n}), "
                             f"got {self.attention_levels}")
        object.__setattr__(self, "attention_levels", tuple(sorted(levels)))
        if self.layers_per_block < 1:
            raise ValueError(f"AutoencoderConfig.layers_per_block must be >= 1, got {self.layers_per_block}")
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"AutoencoderConfig: unknown conv_impl {self.conv_impl!r}; expected one of {CONV_IMPLS}")
        if self.kind == "vq" and not (self.use_quant_conv and self.use_post_quant_conv):
            raise ValueError("AutoencoderConfig: a VQ model always has quant_conv and post_quant_conv")

    @property
    def double_z(self) -> bool:
        """The KL encoder outputs mean and log-variance (2 * latent_channels)."""
        return self.kind == "kl"

    @property
    def downsample_factor(self) -> int:
        """f: image side / latent side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def embed_dim(self) -> int:
        """Channels of the latents handed to the diffusion model (VQ: codebook size D)."""
        if self.kind == "vq" and self.vq_embed_dim is not None:
            return self.vq_embed_dim
        return self.latent_channels


@struct.dataclass
class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) per latent element (CompVis ldm/modules/distributions).

    Held in float32. ``logvar`` is clamped to [-30, 20] on construction by
    ``from_moments``. ``deterministic`` makes it a point mass at the mean
    (std = var = 0, kl = nll = 0).
    """

    mean: jax.Array    # (B, h, w, c)
    logvar: jax.Array  # (B, h, w, c), clamped to [-30, 20]
    deterministic: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def from_moments(cls, moments_bhw2c: jax.Array, deterministic: bool = False) -> "DiagonalGaussianDistribution":
        """Split the encoder output along channels: first half mean, second half log-variance."""
        mean, logvar = jnp.split(moments_bhw2c.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0), deterministic=deterministic)

    @property
    def std(self) -> jax.Array:
        if self.deterministic:
            return jnp.zeros_like(self.mean)
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        if self.deterministic:
            return jnp.zeros_like(self.mean)
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """Reparameterised sample mean + std * eps, eps ~ N(0, I) (Kingma & Welling 2014)."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: Optional["DiagonalGaussianDistribution"] = None) -> jax.Array:
        """KL(self || other) summed over (h, w, c) -> (B,); other=None means N(0, I).

        Closed form for diagonal Gaussians (Kingma & Welling 2014, Appendix B):
        0.5 * sum((mu1 - mu2)^2 / var2 + var1 / var2 - 1 - logvar1 + logvar2).
        A deterministic distribution returns zeros (CompVis returns a one-element 0).
        """
        axes = tuple(range(1, self.mean.ndim))
        if self.deterministic:
            return jnp.zeros(self.mean.shape[:1], jnp.float32)
        if other is None:
            return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)
        return 0.5 * jnp.sum(
            jnp.square(self.mean - other.mean) / other.var
            + self.var / other.var - 1.0 - self.logvar + other.logvar,
            axis=axes,
        )

    def nll(self, sample: jax.Array, axes: Optional[Tuple[int, ...]] = None) -> jax.Array:
        """Negative log-likelihood of ``sample``, summed over ``axes`` (default all but batch)."""
        if axes is None:
            axes = tuple(range(1, self.mean.ndim))
        if self.deterministic:
            return jnp.zeros(self.mean.shape[:1], jnp.float32)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * jnp.sum(
            log_two_pi + self.logvar + jnp.square(sample - self.mean) / self.var, axis=axes)


# ----------------------------------------------------------------------------- blocks


def _self_attention(channels: int, groups: int, impl: AttentionImpl, name: str, **kw) -> nn.Module:
    """The autoencoder's AttnBlock: GroupNorm, one head over H*W, residual (diffusers Attention)."""
    return layers.Attention(heads=1, dim_head=channels, qkv_bias=True, norm_groups=groups,
                            norm_epsilon=_EPS, impl=impl, name=name, **kw)


class _MidBlock(nn.Module):
    """diffusers UNetMidBlock2D without time embedding: resnet, [attention], resnet."""

    channels: int
    groups: int
    attention: bool
    attention_impl: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: Optional[str] = None

    @nn.compact
    def __call__(self, h_bhwc: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h_bhwc = ResnetBlock(self.channels, self.groups, _EPS, name="resnets_0", conv_impl=self.conv_impl,
                             **kw)(h_bhwc)
        if self.attention:
            h_bhwc = _self_attention(self.channels, self.groups, self.attention_impl, "attentions_0", **kw)(h_bhwc)
        return ResnetBlock(self.channels, self.groups, _EPS, name="resnets_1", conv_impl=self.conv_impl, **kw)(h_bhwc)


class _DownEncoderBlock(nn.Module):
    """diffusers DownEncoderBlock2D: ``num_layers`` resnets, then an optional stride-2 conv.
    With ``attention``: AttnDownEncoderBlock2D (CompVis Encoder: ``down[i].block[j]`` then ``down[i].attn[j]``)."""

    channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: Optional[str] = None
    attention: bool = False
    attention_impl: AttentionImpl = "xla"

    @nn.compact
    def __call__(self, h_bhwc: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(kw)
        kw["conv_impl"] = self.conv_impl
        for j in range(self.num_layers):
            h_bhwc = ResnetBlock(self.channels, self.groups, _EPS, name=f"resnets_{j}", **kw)(h_bhwc)
            if self.attention:
                h_bhwc = _self_attention(self.channels, self.groups, self.attention_impl, f"attentions_{j}",
                                         **akw)(h_bhwc)
        if self.add_downsample:
            h_bhwc = layers.Downsample(self.channels, asymmetric_pad=True, name="downsamplers_0", **kw)(h_bhwc)
        return h_bhwc


class _UpDecoderBlock(nn.Module):
    """diffusers UpDecoderBlock2D: ``num_layers`` resnets, then optional 2x nearest upsampling + conv.
    With ``attention``: AttnUpDecoderBlock2D (CompVis Decoder: ``up[i].block[j]`` then ``up[i].attn[j]``)."""

    channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: Optional[str] = None
    attention: bool = False
    attention_impl: AttentionImpl = "xla"

    @nn.compact
    def __call__(self, h_bhwc: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(kw)
        kw["conv_impl"] = self.conv_impl
        for j in range(self.num_layers):
            h_bhwc = ResnetBlock(self.channels, self.groups, _EPS, name=f"resnets_{j}", **kw)(h_bhwc)
            if self.attention:
                h_bhwc = _self_attention(self.channels, self.groups, self.attention_impl, f"attentions_{j}",
                                         **akw)(h_bhwc)
        if self.add_upsample:
            h_bhwc = layers.Upsample(self.channels, name="upsamplers_0", **kw)(h_bhwc)
        return h_bhwc


class Encoder(nn.Module):
    """Image (B, H, W, in) -> (B, H/f, W/f, out_channels) features (CompVis/diffusers Encoder)."""

    config: AutoencoderConfig
    out_channels: int  # 2 * latent_channels for KL (double_z), latent_channels for VQ
    attention_impl: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bhwc: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(conv_impl=cfg.conv_impl, **kw)
        channels = cfg.block_out_channels
        h = conv3x3(channels[0], name="conv_in", **ckw)(x_bhwc.astype(self.dtype))
        for i, ch in enumerate(channels):
            h = _DownEncoderBlock(
                ch, cfg.layers_per_block, cfg.norm_num_groups, add_downsample=i < len(channels) - 1,
                attention=i in cfg.attention_levels, attention_impl=self.attention_impl,
                name=f"down_blocks_{i}", **ckw)(h)
        h = _MidBlock(channels[-1], cfg.norm_num_groups, cfg.mid_block_attention,
                      self.attention_impl, name="mid_block", **ckw)(h)
        h = GroupNorm(cfg.norm_num_groups, _EPS, name="conv_norm_out", **kw)(h)
        return conv3x3(self.out_channels, name="conv_out", **ckw)(nn.silu(h))


class Decoder(nn.Module):
    """Latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out) (CompVis/diffusers Decoder)."""

    config: AutoencoderConfig
    attention_impl: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z_bhwc: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ckw = dict(conv_impl=cfg.conv_impl, **kw)
        reversed_channels = tuple(reversed(cfg.block_out_channels))
        h = conv3x3(reversed_channels[0], name="conv_in", **ckw)(z_bhwc.astype(self.dtype))
        h = _MidBlock(reversed_channels[0], cfg.norm_num_groups, cfg.mid_block_attention,
                      self.attention_impl, name="mid_block", **ckw)(h)
        n = len(reversed_channels)
        for i, ch in enumerate(reversed_channels):  # up_blocks_i is level n - 1 - i
            h = _UpDecoderBlock(
                ch, cfg.layers_per_block + 1, cfg.norm_num_groups, add_upsample=i < n - 1,
                attention=(n - 1 - i) in cfg.attention_levels, attention_impl=self.attention_impl,
                name=f"up_blocks_{i}", **ckw)(h)
        h = GroupNorm(cfg.norm_num_groups, _EPS, name="conv_norm_out", **kw)(h)
        return conv3x3(cfg.out_channels, name="conv_out", **ckw)(nn.silu(h))


def _pointwise(features: int, dtype: Dtype, param_dtype: Dtype, conv_impl: Optional[str] = None) -> nn.Conv:
    """1x1 convolution (quant_conv / post_quant_conv); named by its setup attribute."""
    return conv.Conv(features, (1, 1), padding="VALID", dtype=dtype, param_dtype=param_dtype, impl=conv_impl)


def _check_input(x: jax.Array, channels: int, what: str, model: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{model}: expected {what} of shape (B, H, W, {channels}) (NHWC), got {tuple(x.shape)}")


# ----------------------------------------------------------------------------- models


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder (LDM "KL-f4/f8/...", the Stable Diffusion VAE)."""

    config: AutoencoderConfig
    attention_impl: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        if cfg.kind != "kl":
            raise ValueError(f"AutoencoderKL needs a config with kind='kl', got {cfg.kind!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = cfg.latent_channels
        self.encoder = Encoder(cfg, 2 * c, self.attention_impl, **kw)
        self.decoder = Decoder(cfg, self.attention_impl, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = _pointwise(2 * c, conv_impl=cfg.conv_impl, **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _pointwise(c, conv_impl=cfg.conv_impl, **kw)

    def encode(self, x_bhwc: jax.Array) -> DiagonalGaussianDistribution:
        """Images (B, H, W, in) in [-1, 1] -> posterior q(z|x) over (B, H/f, W/f, c)."""
        _check_input(x_bhwc, self.config.in_channels, "images", "AutoencoderKL.encode")
        moments = self.encoder(x_bhwc)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution.from_moments(moments)

    def decode(self, z_bhwc: jax.Array) -> jax.Array:
        """Latents (B, h, w, c) (unscaled) -> images (B, h*f, w*f, out), unclipped."""
        _check_input(z_bhwc, self.config.latent_channels, "latents", "AutoencoderKL.decode")
        z = z_bhwc.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x_bhwc: jax.Array, sample_posterior: bool = True,
                 rng: Optional[jax.Array] = None) -> Tuple[jax.Array, DiagonalGaussianDistribution]:
        """Reconstruction and posterior (CompVis AutoencoderKL.forward).

        With ``sample_posterior`` the latent is drawn with ``rng``, or with the
        module's ``"sample"`` RNG stream when ``rng`` is None; otherwise the mode.
        """
        posterior = self.encode(x_bhwc)
        if sample_posterior:
            z = posterior.sample(self.make_rng("sample") if rng is None else rng)
        else:
            z = posterior.mode()
        return self.decode(z), posterior


class VQModel(nn.Module):
    """VQ-regularised autoencoder (LDM "VQ-f4/f8/...", taming VQGAN first stage)."""

    config: AutoencoderConfig
    attention_impl: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        if cfg.kind != "vq":
            raise ValueError(f"VQModel needs a config with kind='vq', got {cfg.kind!r}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, cfg.latent_channels, self.attention_impl, **kw)
        self.quant_conv = _pointwise(cfg.embed_dim, conv_impl=cfg.conv_impl, **kw)
        self.quantize = VectorQuantizer(
            cfg.num_vq_embeddings, cfg.embed_dim, beta=cfg.beta, legacy=cfg.legacy, **kw)
        self.post_quant_conv = _pointwise(cfg.latent_channels, conv_impl=cfg.conv_impl, **kw)
        self.decoder = Decoder(cfg, self.attention_impl, **kw)

    def encode(self, x_bhwc: jax.Array) -> VQEncoding:
        """Images (B, H, W, in) -> quantised latents, pre-quantisation latents, indices, loss."""
        _check_input(x_bhwc, self.config.in_channels, "images", "VQModel.encode")
        pre_quant = self.quant_conv(self.encoder(x_bhwc))
        latents, loss, indices = self.quantize(pre_quant)
        return VQEncoding(latents=latents, pre_quant=pre_quant, indices=indices, loss=loss)

    def decode_quantized(self, zq_bhwd: jax.Array) -> jax.Array:
        """Already-quantised latents -> images (diffusers decode(force_not_quantize=True))."""
        _check_input(zq_bhwd, self.config.embed_dim, "latents", "VQModel.decode")
        return self.decoder(self.post_quant_conv(zq_bhwd.astype(self.dtype)))

    def decode(self, z_bhwd: jax.Array) -> jax.Array:
        """Latents (B, h, w, D) -> nearest codebook entries -> images (B, h*f, w*f, out)."""
        _check_input(z_bhwd, self.config.embed_dim, "latents", "VQModel.decode")
        zq, _, _ = self.quantize(z_bhwd)
        return self.decode_quantized(zq)

    def decode_indices(self, indices_bhw: jax.Array) -> jax.Array:
        """Codebook indices (B, h, w) -> images (LDM's decode_code / get_codebook_entry)."""
        return self.decode_quantized(self.quantize.lookup(indices_bhw))

    def __call__(self, x_bhwc: jax.Array, sample_posterior: bool = True,
                 rng: Optional[jax.Array] = None) -> Tuple[jax.Array, VQEncoding]:
        """Reconstruction and encoding (with ``loss``); the quantised latents go
        straight to the decoder so the straight-through gradient reaches the encoder.
        ``sample_posterior`` and ``rng`` are accepted for a uniform signature; VQ is deterministic."""
        del sample_posterior, rng
        enc = self.encode(x_bhwc)
        return self.decode_quantized(enc.latents), enc


def build_autoencoder(config: AutoencoderConfig, *, attention_impl: AttentionImpl = "xla",
                      dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> nn.Module:
    """``AutoencoderKL`` or ``VQModel`` for ``config.kind``."""
    cls = AutoencoderKL if config.kind == "kl" else VQModel
    return cls(config, attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype)


def init_params(module: nn.Module, rng: jax.Array, image_size: int = 0):
    """Randomly initialised parameters for ``module`` (the size only sets the trace shape)."""
    cfg = module.config
    side = image_size or 2 * cfg.downsample_factor
    x = jnp.zeros((1, side, side, cfg.in_channels), jnp.float32)
    return module.init({"params": rng, "sample": rng}, x, False)["params"]


def abstract_params(module: nn.Module):
    """ShapeDtypeStruct tree of ``module``'s parameters, without allocating them (traced as
    ``init_params``; read from the store of traced results when it is on)."""
    from ldm_jax.executable_store import stored_param_shapes

    side = 2 * module.config.downsample_factor
    x = jax.ShapeDtypeStruct((1, side, side, module.config.in_channels), jnp.float32)
    return stored_param_shapes(module, (x,), static_args=(False,), rng_names=("params", "sample"))
