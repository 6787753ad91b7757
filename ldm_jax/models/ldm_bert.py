"""LDMBert: the text encoder of the CompVis LDM text-to-image model (Rombach et al.
2022, arXiv:2112.10752, Sec. 4.3.1: "LDM-KL-8-G", ``txt2img-1p4B-eval.yaml``).

The paper's "BERT-tokenizer + transformer" is not BERT: a bert-base-uncased
WordPiece tokenizer feeds a transformer trained from scratch with the U-Net
(CompVis ``BERTEmbedder``: an x-transformers ``TransformerWrapper`` over an
``Encoder(dim=n_embed, depth=n_layer)``; diffusers ``LDMBertModel``):

    h_0 = embed_tokens[ids] + embed_positions[:L]          (learned, absolute; no scaling)
    h_i = h_{i-1} + out(attn(LN_a(h_{i-1})))                pre-norm, no mask, non-causal
    h_i = h_i + fc2(gelu(fc1(LN_f(h_i))))                   exact (erf) GELU
    context = layer_norm(h_N)                               (B, L, D), D = 1280 released

Attention has ``num_heads`` heads of ``head_dim`` channels whatever the width
(x-transformers' defaults 8 x 64 = 512 for the released D = 1280): q/k/v
projections without bias, the output projection with bias; scale
``head_dim ** -0.5``. MLP width 4 D. Every LayerNorm has eps 1e-5. Padding
([PAD] = 0) is attended to: neither reference passes a mask.

Parameter names mirror diffusers' ``LDMBertModel`` with the ``model.`` prefix
dropped: ``embed_tokens``, ``embed_positions``, ``layers_{i}/self_attn_layer_norm``,
``layers_{i}/self_attn/{q,k,v,out}_proj``, ``layers_{i}/final_layer_norm``,
``layers_{i}/fc1``, ``fc2``, ``layer_norm`` (its unused ``to_logits`` LM head is not kept).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import (ACTIVATIONS, ATTENTION_IMPLS, AttentionImpl, Dtype, activation, dot_product_attention,
                                    layer_norm)


@dataclasses.dataclass(frozen=True)
class LDMBertConfig:
    vocab_size: int = 30522               # bert-base-uncased WordPiece vocabulary
    hidden_size: int = 1280               # width D (diffusers d_model, CompVis n_embed)
    num_layers: int = 32                  # blocks (encoder_layers / n_layer)
    num_heads: int = 8                    # attention heads (x-transformers default)
    head_dim: int = 64                    # channels per head, independent of D (x-transformers default)
    intermediate_size: int = 5120         # MLP width (encoder_ffn_dim; 4 D in CompVis)
    max_position_embeddings: int = 77     # context length (learned positions; max_seq_len)
    hidden_act: str = "gelu"              # transformers ACT2FN name; "gelu" is exact erf GELU (torch nn.GELU())
    layer_norm_eps: float = 1e-5          # torch.nn.LayerNorm default, both references

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LDMBertConfig.{name} must be a positive int, got {value!r}")

    @classmethod
    def txt2img_f8_large(cls, **overrides) -> "LDMBertConfig":
        """The released LDM-KL-8-G text encoder (``BERTEmbedder(n_embed=1280, n_layer=32)``)."""
        return cls(**{**dict(vocab_size=30522, hidden_size=1280, num_layers=32, num_heads=8, head_dim=64,
                             intermediate_size=5120, max_position_embeddings=77), **overrides})

    @property
    def inner_dim(self) -> int:
        """Width of q / k / v (heads x head_dim)."""
        return self.num_heads * self.head_dim


class LDMBertAttention(nn.Module):
    """Bidirectional multi-head self-attention; q/k/v without bias (x-transformers ``Attention``)."""

    config: LDMBertConfig
    attention_impl: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bld: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        split = lambda a: a.reshape(a.shape[:2] + (cfg.num_heads, cfg.head_dim))  # noqa: E731  (B, L, H, Dh)
        q = split(nn.Dense(cfg.inner_dim, use_bias=False, name="q_proj", **kw)(x_bld))
        k = split(nn.Dense(cfg.inner_dim, use_bias=False, name="k_proj", **kw)(x_bld))
        v = split(nn.Dense(cfg.inner_dim, use_bias=False, name="v_proj", **kw)(x_bld))
        # softmax(q k^T / sqrt(head_dim)) v: the scale is the head width's, not D's.
        h_blhd = dot_product_attention(q, k, v, impl=self.attention_impl)
        h_bli = h_blhd.reshape(h_blhd.shape[:2] + (cfg.inner_dim,))
        return nn.Dense(cfg.hidden_size, name="out_proj", **kw)(h_bli)


class LDMBertLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + fc2(act(fc1(LN(x))))."""

    config: LDMBertConfig
    attention_impl: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bld: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(cfg.layer_norm_eps, "self_attn_layer_norm", **kw)(x_bld)
        x_bld = x_bld + LDMBertAttention(cfg, self.attention_impl, name="self_attn", **kw)(h)
        h = layer_norm(cfg.layer_norm_eps, "final_layer_norm", **kw)(x_bld)
        h = nn.Dense(cfg.intermediate_size, name="fc1", **kw)(h)
        return x_bld + nn.Dense(cfg.hidden_size, name="fc2", **kw)(activation(cfg.hidden_act, h))


class LDMBertModel(nn.Module):
    """``apply({"params": p}, ids_bl)`` -> context (B, L, D) for the U-Net's cross-attention."""

    config: LDMBertConfig
    dtype: Dtype = jnp.float32          # computation dtype
    param_dtype: Dtype = jnp.float32    # parameter storage dtype
    attention_impl: AttentionImpl = "xla"

    @nn.compact
    def __call__(self, ids_bl: jax.Array) -> jax.Array:
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention impl {self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        cfg = self.config
        if ids_bl.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {ids_bl.shape}")
        if not jnp.issubdtype(ids_bl.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integers, got {ids_bl.dtype}")
        length = ids_bl.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x_bld = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embed_tokens", **kw)(ids_bl)
        x_bld = x_bld + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="embed_positions", **kw)(
            jnp.arange(length))[None]
        for i in range(cfg.num_layers):
            x_bld = LDMBertLayer(cfg, self.attention_impl, name=f"layers_{i}", **kw)(x_bld)
        return layer_norm(cfg.layer_norm_eps, "layer_norm", **kw)(x_bld)
