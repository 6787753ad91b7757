"""The latent-diffusion U-Net (Rombach et al. 2022, arXiv:2112.10752, Sec. 3.3).

One module covers the LDM family as diffusers lays it out:

* Stable Diffusion 1.x: 8 heads per block, 1x1-conv projections, context 768;
* Stable Diffusion 2.x: 64 channels per head, linear projections, context 1024;
* class-conditional LDMs (a label embedding added to the time embedding, also
  the noise-level embedding of the x4 upscaler);
* concatenation conditioning (inpainting: 9 input channels; upscaler: 7) -- the
  caller concatenates, the U-Net only has ``in_channels``;
* unconditional LDMs (no cross-attention: plain resnet stages, optionally with
  GroupNorm self-attention stages as in diffusers' ``UNet2DModel``).

Everything is NHWC: ``unet.apply({"params": p}, x_bhwc, t_b, ctx_btd)``.
Parameter names mirror diffusers' state dicts (see ``unet_blocks``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import conv, layers
from ldm_jax.models.unet_blocks import DownStage, MidStage, TimestepEmbedding, UpStage, timestep_embedding

Dtype = jnp.dtype
IntOrTuple = Union[int, Tuple[int, ...]]

DOWN_BLOCKS = {"DownBlock2D": None, "CrossAttnDownBlock2D": "cross", "AttnDownBlock2D": "self"}
UP_BLOCKS = {"UpBlock2D": None, "CrossAttnUpBlock2D": "cross", "AttnUpBlock2D": "self"}
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
CLASS_EMBED_TYPES = (None, "timestep", "identity")


def _tuple(value, n: int, name: str) -> tuple:
    """An int/bool/None broadcast to ``n`` blocks, or a length-``n`` sequence."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"UNetConfig.{name} has {len(value)} entries, expected one per block ({n})")
        return tuple(value)
    return (value,) * n


def _freeze(value):
    """Lists (e.g. from JSON) -> tuples, recursively, so the config is hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of the U-Net. Per-block fields take one value for all
    blocks or a tuple in down-block order (the up path uses them reversed)."""

    in_channels: int = 4  # input channels (latent 4; +5 for inpainting, +3 for the x4 upscaler)
    out_channels: int = 4  # predicted channels (eps or v)
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)  # width of each resolution level
    down_block_types: Tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: Tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"  # or "UNetMidBlock2D", or None
    mid_block_num_layers: int = 1  # (attention, resnet) pairs after the mid block's first resnet
    mid_block_attention: bool = True  # UNetMidBlock2D only: whether those pairs have self-attention
    layers_per_block: IntOrTuple = 2  # resnets per down block (up blocks have one more)
    # Transformer layers per spatial transformer: int, per-block tuple, or per-block
    # tuples of per-layer counts (then reverse_transformer_layers_per_block is required).
    transformer_layers_per_block: Union[int, Tuple] = 1
    reverse_transformer_layers_per_block: Optional[Tuple[Tuple[int, ...], ...]] = None  # per-layer counts, up path
    num_heads: Optional[IntOrTuple] = 8  # attention heads per block (CompVis num_heads) ...
    head_dim: Optional[IntOrTuple] = None  # ... or channels per head (CompVis num_head_channels); wins if set
    cross_attention_dim: Optional[IntOrTuple] = 768  # context width; None: no cross-attention
    only_cross_attention: Union[bool, Tuple[bool, ...]] = False  # attn1 also attends to the context
    use_linear_projection: bool = False  # SD2: linear proj_in/out instead of 1x1 convs
    upcast_attention: bool = False  # SD2 flag; the softmax is always float32 here, so informational
    norm_num_groups: int = 32  # GroupNorm groups everywhere
    norm_eps: float = 1e-5  # GroupNorm epsilon of the resnets and the output norm
    attn_norm_num_groups: Optional[int] = None  # UNetMidBlock2D self-attention groups (default: norm_num_groups)
    flip_sin_to_cos: bool = True  # timestep features as [cos, sin] (True for SD) or [sin, cos]
    freq_shift: float = 0.0  # "downscale_freq_shift" of the sinusoidal features (0 for SD, 1 for DDPM)
    time_embedding_dim: Optional[int] = None  # default 4 * block_out_channels[0]
    time_embedding_act_fn: Optional[str] = None  # None or "silu": applied once to the summed embedding
    num_class_embeds: Optional[int] = None  # class_embed_type None: size of the label-embedding table
    class_embed_type: Optional[str] = None  # None (table), "timestep" (sinusoid + MLP) or "identity"
    class_embeddings_concat: bool = False  # concatenate instead of add the class embedding
    center_input_sample: bool = False  # map the input x -> 2x - 1 first
    downsample_padding: int = 1  # 1: symmetric padding; 0: pad (0, 1) as in the CompVis autoencoder
    mid_block_scale_factor: float = 1.0  # residual sums in the mid block are divided by this
    conv_in_kernel: int = 3  # kernel size of conv_in (odd)
    conv_out_kernel: int = 3  # kernel size of conv_out (odd)
    dropout: float = 0.0  # dropout in the resnets (only with train=True)
    remat_blocks: bool = False  # rematerialise each resnet / attention block in the backward pass
    # Convolution implementation (ldm_jax.models.conv): "auto" = the fastest per backend
    # (matmul-formulated gradients on CPU, XLA's convolutions on GPU / TPU), "xla", "matmul".
    conv_impl: str = "auto"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _freeze(getattr(self, f.name)))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"UNetConfig: {n} block_out_channels but {len(self.down_block_types)} down and "
                f"{len(self.up_block_types)} up block types")
        for kind, table in (("down", DOWN_BLOCKS), ("up", UP_BLOCKS)):
            for t in getattr(self, f"{kind}_block_types"):
                if t not in table:
                    raise ValueError(
                        f"UNetConfig: unsupported {kind} block type {t!r}; expected one of {sorted(table)}")
        if self.mid_block_type not in MID_BLOCKS:
            raise ValueError(
                f"UNetConfig: unsupported mid_block_type {self.mid_block_type!r}; expected one of {MID_BLOCKS}")
        if self.class_embed_type not in CLASS_EMBED_TYPES:
            raise ValueError(
                f"UNetConfig: unsupported class_embed_type {self.class_embed_type!r}; "
                f"expected one of {CLASS_EMBED_TYPES}")
        if self.time_embedding_act_fn not in (None, "silu", "swish"):
            raise ValueError(f"UNetConfig: unsupported time_embedding_act_fn {self.time_embedding_act_fn!r}")
        if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
            raise ValueError("UNetConfig: conv_in_kernel and conv_out_kernel must be odd")
        if self.conv_impl not in conv.CONV_IMPLS:
            raise ValueError(f"UNetConfig: unknown conv_impl {self.conv_impl!r}; expected one of {conv.CONV_IMPLS}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"UNetConfig: downsample_padding must be 0 or 1, got {self.downsample_padding}")
        if self.uses_cross_attention and any(d is None for d in self.per_block("cross_attention_dim")):
            raise ValueError("UNetConfig: cross-attention blocks need cross_attention_dim")
        if self.num_heads is None and self.head_dim is None:
            raise ValueError("UNetConfig: set num_heads or head_dim")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"UNetConfig: block_out_channels {self.block_out_channels}: {c} channels are not "
                                 f"divisible into norm_num_groups={self.norm_num_groups} groups (GroupNorm)")
        attn_blocks = {i for i, t in enumerate(self.down_block_types) if DOWN_BLOCKS[t]}
        attn_blocks |= {n - 1 - j for j, t in enumerate(self.up_block_types) if UP_BLOCKS[t]}
        if self.mid_block_type == "UNetMidBlock2DCrossAttn" or (
                self.mid_block_type == "UNetMidBlock2D" and self.mid_block_attention and self.mid_block_num_layers):
            attn_blocks.add(n - 1)
        for i in sorted(attn_blocks):
            # Heads need not divide the channels: the attention then runs heads * dim_head < c wide
            # between its input and output projections, as diffusers' Transformer2DModel / Attention and
            # CompVis' SpatialTransformer build it (inner_dim = heads * dim_head).
            c, heads, dim_head = self.block_out_channels[i], self.heads(i), self.dim_head(i)
            if heads < 1 or dim_head < 1:
                what = (f"head_dim {self.per_block('head_dim')[i]}" if self.head_dim is not None
                        else f"{self.per_block('num_heads')[i]} heads")
                raise ValueError(f"UNetConfig: block {i} has {c} channels, fewer than {what} need")
        for name in ("layers_per_block", "only_cross_attention", "num_heads", "head_dim", "cross_attention_dim"):
            self.per_block(name)  # a per-block sequence of the wrong length fails here, not in __call__
        tl = self.transformer_layers_per_block
        nested = isinstance(tl, tuple) and any(isinstance(v, tuple) for v in tl)
        if nested and self.reverse_transformer_layers_per_block is None:
            raise ValueError(
                "UNetConfig: per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block")
        for i in range(n):
            self.down_transformer_layers(i)
            self.up_transformer_layers(i)

    # ---- per-block views -------------------------------------------------

    def per_block(self, name: str) -> tuple:
        return _tuple(getattr(self, name), len(self.block_out_channels), name)

    def heads(self, i: int) -> int:
        """Attention heads of down block ``i`` (the mid block uses the last block's)."""
        if self.head_dim is not None:
            head_dim = self.per_block("head_dim")[i]
            return self.block_out_channels[i] // head_dim if head_dim > 0 else 0
        return self.per_block("num_heads")[i]

    def dim_head(self, i: int) -> int:
        """Channels per head of down block ``i``: ``head_dim`` where set (CompVis num_head_channels: then
        ``c // head_dim`` heads of ``head_dim``), else ``c // num_heads`` (diffusers, CompVis num_heads)."""
        if self.head_dim is not None:
            return self.per_block("head_dim")[i]
        heads = self.per_block("num_heads")[i]
        return self.block_out_channels[i] // heads if heads > 0 else 0

    @property
    def uses_cross_attention(self) -> bool:
        """Whether any block attends to a context (then ``context_btd`` is required)."""
        return (any(DOWN_BLOCKS[t] == "cross" for t in self.down_block_types)
                or any(UP_BLOCKS[t] == "cross" for t in self.up_block_types)
                or self.mid_block_type == "UNetMidBlock2DCrossAttn")

    @property
    def context_width(self) -> Optional[int]:
        """Width D of ``context_btd``: the ``cross_attention_dim`` of the blocks with cross-attention
        (a per-block entry of a block without it is unused, as in diffusers; the used ones must
        agree, since one context feeds them all); None without cross-attention."""
        if not self.uses_cross_attention:
            return None
        dims = self.per_block("cross_attention_dim")
        used = sorted({dims[i] for i in attention_levels(self, "cross")})  # (the mid block reads the last entry)
        if len(used) != 1:
            raise ValueError(f"UNetConfig: the cross-attention blocks have different cross_attention_dim "
                             f"{used} (per block {list(dims)}), but one context feeds them all")
        return used[0]

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def down_transformer_layers(self, i: int) -> Tuple[int, ...]:
        layers_i = self.per_block("layers_per_block")[i]
        return _tuple(self.per_block("transformer_layers_per_block")[i], layers_i,
                      f"transformer_layers_per_block[{i}]")

    def up_transformer_layers(self, j: int) -> Tuple[int, ...]:
        """Per-layer transformer depth of up block ``j`` (up-path order)."""
        n = len(self.block_out_channels)
        layers_j = self.per_block("layers_per_block")[n - 1 - j] + 1
        if self.reverse_transformer_layers_per_block is not None:
            value = self.reverse_transformer_layers_per_block[j]
        else:
            value = self.per_block("transformer_layers_per_block")[n - 1 - j]
        return _tuple(value, layers_j, f"reverse_transformer_layers_per_block[{j}]")

    def mid_transformer_layers(self) -> int:
        last = self.per_block("transformer_layers_per_block")[-1]
        return last[0] if isinstance(last, tuple) else last


class UNet(nn.Module):
    """eps/v-prediction U-Net: (x_bhwc, t_b, ctx_btd, class_labels) -> (B, h, w, out_channels).

    ``t_b``: a scalar or (B,) timesteps (int or float). ``context_btd``: the
    text-encoder states (B, T, cross_attention_dim) for cross-attention models,
    else None. ``class_labels``: (B,) ints for a label table, or (B,) timesteps
    ("timestep") / (B, time_embed_dim) vectors ("identity"). Any spatial size: where a
    side does not divide by 2 ** (number of blocks - 1), each upsampler goes to its skip's
    size, as diffusers' ``upsample_size``. The result is in ``dtype``.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: layers.AttentionImpl = "xla"

    @nn.compact
    def __call__(self, x_bhwc, t_b, context_btd=None, class_labels=None, train: bool = False):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(cfg.block_out_channels)
        b = x_bhwc.shape[0]
        if x_bhwc.ndim != 4 or x_bhwc.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet: expected x of shape (B, H, W, {cfg.in_channels}), got {x_bhwc.shape}")
        if cfg.uses_cross_attention and context_btd is None:
            raise ValueError("UNet: this model has cross-attention; pass context_btd (B, T, D)")
        deterministic = not train

        if cfg.center_input_sample:
            x_bhwc = 2 * x_bhwc - 1.0

        # Time embedding (float32 sinusoid, then the MLP in `dtype`).
        t_b = jnp.broadcast_to(jnp.reshape(jnp.asarray(t_b), (-1,)), (b,))
        sinus = lambda t: timestep_embedding(  # noqa: E731
            t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, name="time_embedding", **kw)(sinus(t_b))
        emb = self._add_class_embedding(emb, class_labels, sinus, b)
        if cfg.time_embedding_act_fn is not None:
            emb = nn.silu(emb)

        ctx = None if context_btd is None else jnp.asarray(context_btd).astype(self.dtype)
        stage_kw = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, dropout=cfg.dropout,
                        remat=cfg.remat_blocks, attention_impl=self.attention_impl,
                        use_linear_projection=cfg.use_linear_projection, conv_impl=cfg.conv_impl, **kw)

        # Down path: every intermediate activation is kept as a skip connection.
        pad = cfg.conv_in_kernel // 2
        h = conv.Conv(cfg.block_out_channels[0], (cfg.conv_in_kernel,) * 2, padding=((pad, pad), (pad, pad)),
                      name="conv_in", impl=cfg.conv_impl, **kw)(x_bhwc)
        skips = [h]
        layers_per_block = cfg.per_block("layers_per_block")
        only_cross = cfg.per_block("only_cross_attention")
        for i, btype in enumerate(cfg.down_block_types):
            h, res = DownStage(
                cfg.block_out_channels[i], layers_per_block[i], attention=DOWN_BLOCKS[btype],
                heads=cfg.heads(i), dim_head=cfg.dim_head(i), transformer_layers=cfg.down_transformer_layers(i),
                only_cross_attention=only_cross[i], add_downsample=i < n - 1,
                downsample_padding=cfg.downsample_padding, name=f"down_blocks_{i}", **stage_kw,
            )(h, emb, ctx, deterministic)
            skips.extend(res)

        if cfg.mid_block_type is not None:
            attention = {"UNetMidBlock2DCrossAttn": "cross",
                         "UNetMidBlock2D": "self" if cfg.mid_block_attention else None}[cfg.mid_block_type]
            h = MidStage(
                cfg.block_out_channels[-1], cfg.mid_block_num_layers, attention=attention, heads=cfg.heads(n - 1),
                dim_head=cfg.dim_head(n - 1),
                transformer_layers=(cfg.mid_transformer_layers(),) * cfg.mid_block_num_layers,
                output_scale_factor=cfg.mid_block_scale_factor, attn_groups=cfg.attn_norm_num_groups,
                name="mid_block", **stage_kw,
            )(h, emb, ctx, deterministic)

        # Up path: block j mirrors down block n-1-j and consumes layers+1 skips. Each upsampler
        # goes to the size of the next block's first skip (diffusers' upsample_size, used when a
        # side does not divide by the overall downsampling; otherwise it is exactly 2x).
        for j, btype in enumerate(cfg.up_block_types):
            i = n - 1 - j
            num_layers = layers_per_block[i] + 1
            res, skips = skips[-num_layers:], skips[:-num_layers]
            h = UpStage(
                cfg.block_out_channels[i], num_layers, attention=UP_BLOCKS[btype], heads=cfg.heads(i),
                dim_head=cfg.dim_head(i),
                transformer_layers=cfg.up_transformer_layers(j), only_cross_attention=only_cross[i],
                add_upsample=j < n - 1, name=f"up_blocks_{j}", **stage_kw,
            )(h, tuple(res), emb, ctx, deterministic, upsample_hw=skips[-1].shape[1:3] if skips else None)

        h = layers.GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(h)
        pad = cfg.conv_out_kernel // 2
        return conv.Conv(cfg.out_channels, (cfg.conv_out_kernel,) * 2, padding=((pad, pad), (pad, pad)),
                         name="conv_out", impl=cfg.conv_impl, **kw)(nn.silu(h))

    def _add_class_embedding(self, emb, class_labels, sinus, b):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        has_class = cfg.class_embed_type is not None or cfg.num_class_embeds is not None
        if not has_class:
            if class_labels is not None:
                raise ValueError("UNet: class_labels given but the model has no class embedding")
            return emb
        if class_labels is None:
            raise ValueError("UNet: this model is class-conditional; pass class_labels")
        labels = jnp.asarray(class_labels)
        if cfg.class_embed_type is None:
            # Learned label table (CompVis `label_emb`, diffusers `class_embedding`).
            labels_b = jnp.broadcast_to(labels.reshape(-1), (b,))
            class_emb = nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, param_dtype=self.param_dtype,
                                 dtype=self.dtype, name="class_embedding")(labels_b.astype(jnp.int32))
        elif cfg.class_embed_type == "timestep":
            labels_b = jnp.broadcast_to(labels.reshape(-1), (b,))
            class_emb = TimestepEmbedding(cfg.time_embed_dim, name="class_embedding", **kw)(sinus(labels_b))
        else:  # "identity": the caller passes the embedding itself
            class_emb = jnp.broadcast_to(labels, (b, labels.shape[-1]))
        class_emb = class_emb.astype(emb.dtype)
        if cfg.class_embeddings_concat:
            return jnp.concatenate([emb, class_emb], axis=-1)
        return emb + class_emb


def attention_levels(fields, kind: str) -> list:
    """Levels (down-block indices) whose down block, up block or mid block has attention of
    ``kind`` ("cross" or "self"); the mid block counts as the last level. ``fields``: a
    UNetConfig or a dict of its fields (the diffusers converter checks its fields before
    building one)."""
    get = fields.get if isinstance(fields, dict) else lambda k: getattr(fields, k)  # noqa: E731
    down, up = get("down_block_types"), get("up_block_types")
    n = len(down)
    levels = {i for i, t in enumerate(down) if DOWN_BLOCKS.get(t) == kind}
    levels |= {n - 1 - j for j, t in enumerate(up) if UP_BLOCKS.get(t) == kind}
    mid = {"UNetMidBlock2DCrossAttn": "cross", "UNetMidBlock2D": "self" if get("mid_block_attention") else None}
    if mid.get(get("mid_block_type")) == kind and get("mid_block_num_layers"):
        levels.add(n - 1)
    return sorted(levels)


def unet_dummy_inputs(config: UNetConfig, batch: int = 1, size: Optional[int] = None, context_len: int = 8):
    """Abstract inputs (ShapeDtypeStructs) for ``jax.eval_shape(unet.init, ...)``.

    Returns ``(x_bhwc, t_b, context_btd, class_labels)``; ``context_btd`` and
    ``class_labels`` are None when the configuration does not use them.
    """
    n = len(config.block_out_channels)
    size = size or 2 ** (n - 1)
    x = jax.ShapeDtypeStruct((batch, size, size, config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32)
    ctx = None
    if config.uses_cross_attention:
        ctx = jax.ShapeDtypeStruct((batch, context_len, config.context_width), jnp.float32)
    labels = None
    if config.class_embed_type is None and config.num_class_embeds is not None:
        labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    elif config.class_embed_type == "timestep":
        labels = jax.ShapeDtypeStruct((batch,), jnp.float32)
    elif config.class_embed_type == "identity":
        labels = jax.ShapeDtypeStruct((batch, config.time_embed_dim), jnp.float32)
    return x, t, ctx, labels
