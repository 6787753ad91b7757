"""CLIP text transformer (Radford et al. 2021, arXiv:2103.00020, Sec. 2.4):
the conditioning encoder of Stable Diffusion.

A GPT-2 style pre-LN transformer with a causal mask over token + learned
position embeddings:

    h_0 = token_embedding[ids] + position_embedding[:L]
    h_i = h_{i-1} + attn(LN1(h_{i-1}));  h_i = h_i + mlp(LN2(h_i))
    context = final_layer_norm(h_N)       SD1 (OpenAI CLIP ViT-L/14)
    context = final_layer_norm(h_{N-1})   SD2 (OpenCLIP ViT-H/14, "penultimate")
    pooled  = final_layer_norm(h_N)[argmax(ids)]   (the EOT token: highest id), or
              final_layer_norm(h_N)[first i with ids[i] == eos_token_id] when that is set

Parameter names mirror transformers' ``CLIPTextModel`` with the
``text_model.`` prefix dropped: ``embeddings/token_embedding/embedding``,
``encoder/layers_{i}/self_attn/{q,k,v,out}_proj``, ``layer_norm1``,
``mlp/fc1``, ``mlp/fc2``, ``layer_norm2``, ``final_layer_norm``.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Literal, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import ATTENTION_IMPLS, AttentionImpl, Dtype, activation, dot_product_attention, layer_norm

OutputLayer = Literal["last", "penultimate"]
_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408               # BPE vocabulary incl. SOT (49406) and EOT (49407)
    hidden_size: int = 768                # width D of the residual stream
    intermediate_size: int = 3072         # MLP hidden width
    num_layers: int = 12                  # transformer blocks
    num_heads: int = 12                   # attention heads (head dim = D / heads)
    max_position_embeddings: int = 77     # context length (learned positions)
    hidden_act: str = "quick_gelu"        # "quick_gelu" (OpenAI: x*sigmoid(1.702x)) or "gelu" (exact erf)
    layer_norm_eps: float = 1e-5          # epsilon of every LayerNorm
    output_layer: OutputLayer = "last"    # block whose output feeds final_layer_norm for the context
    eos_token_id: Optional[int] = None    # pooled position: None = argmax(ids) (OpenAI / open_clip, and
                                          # transformers with the legacy eos_token_id == 2); an id = its
                                          # first occurrence, 0 where absent (transformers >= 4.31)

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}")
        if self.output_layer not in ("last", "penultimate"):
            raise ValueError(f"output_layer must be 'last' or 'penultimate', got {self.output_layer!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.eos_token_id is not None and (isinstance(self.eos_token_id, bool)
                                              or not isinstance(self.eos_token_id, numbers.Integral)):
            raise ValueError(f"eos_token_id must be None or an integer id, got {self.eos_token_id!r}")
        if self.output_layer == "penultimate" and self.num_layers < 1:
            # One block is enough: FrozenOpenCLIPEmbedder.text_transformer_forward (and transformers'
            # hidden_states[-2]) then give ln_final of the embeddings, h_0.
            raise ValueError("output_layer='penultimate' needs at least 1 layer")

    @classmethod
    def clip_l14(cls, **overrides) -> "CLIPTextConfig":
        """OpenAI CLIP ViT-L/14 text tower (Stable Diffusion 1.x)."""
        return cls(**{**dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_layers=12,
                             num_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                             output_layer="last"), **overrides})

    @classmethod
    def open_clip_h14(cls, **overrides) -> "CLIPTextConfig":
        """OpenCLIP ViT-H/14 text tower as used by SD 2.x (FrozenOpenCLIPEmbedder,
        layer="penultimate": the 24th block is skipped, then ln_final)."""
        return cls(**{**dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_layers=24,
                             num_heads=16, max_position_embeddings=77, hidden_act="gelu",
                             output_layer="penultimate"), **overrides})

    @property
    def context_layer(self) -> int:
        """Number of blocks run to get the context (``num_layers`` or one less)."""
        return self.num_layers - (1 if self.output_layer == "penultimate" else 0)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids_bl: jax.Array) -> jax.Array:
        cfg = self.config
        length = ids_bl.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok_bld = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="token_embedding", **kw)(ids_bl)
        pos_ld = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embedding", **kw)(
            jnp.arange(length))
        return tok_bld + pos_ld[None]


class CLIPAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v/out projections."""

    config: CLIPTextConfig
    attention_impl: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bld: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        heads, head_dim = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        split = lambda a: a.reshape(a.shape[:2] + (heads, head_dim))  # noqa: E731  (B, L, H, Dh)
        q = split(nn.Dense(cfg.hidden_size, name="q_proj", **kw)(x_bld))
        k = split(nn.Dense(cfg.hidden_size, name="k_proj", **kw)(x_bld))
        v = split(nn.Dense(cfg.hidden_size, name="v_proj", **kw)(x_bld))
        h_blhd = dot_product_attention(q, k, v, impl=self.attention_impl, causal=True)
        h_bld = h_blhd.reshape(h_blhd.shape[:2] + (cfg.hidden_size,))
        return nn.Dense(cfg.hidden_size, name="out_proj", **kw)(h_bld)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bld: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.Dense(cfg.intermediate_size, name="fc1", **kw)(x_bld)
        return nn.Dense(cfg.hidden_size, name="fc2", **kw)(activation(cfg.hidden_act, h))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    config: CLIPTextConfig
    attention_impl: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_bld: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(self.config.layer_norm_eps, "layer_norm1", **kw)(x_bld)
        x_bld = x_bld + CLIPAttention(self.config, self.attention_impl, name="self_attn", **kw)(h)
        h = layer_norm(self.config.layer_norm_eps, "layer_norm2", **kw)(x_bld)
        return x_bld + CLIPMLP(self.config, name="mlp", **kw)(h)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    attention_impl: AttentionImpl = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.layers = [
            CLIPEncoderLayer(self.config, self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype)
            for _ in range(self.config.num_layers)
        ]  # named layers_0 ... layers_{N-1}

    def __call__(self, x_bld: jax.Array, num_layers: int) -> Tuple[jax.Array, ...]:
        """(h_0, h_1, ..., h_num_layers): the input and each block's output."""
        states = [x_bld]
        for layer in self.layers[:num_layers]:
            states.append(layer(states[-1]))
        return tuple(states)


class CLIPTextModel(nn.Module):
    """``apply({"params": p}, ids_bl)`` -> context (B, L, D) for the U-Net.

    ``return_pooled=True`` also returns the pooled features (B, D):
    final_layer_norm of the *last* block's output at the EOT position, as
    transformers' ``pooler_output`` and open_clip's ``text_global_pool``:
    ``argmax(ids)`` (the first EOT when EOT is the highest id and also pads), or
    with ``config.eos_token_id`` set the first position holding that id.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32          # computation dtype
    param_dtype: Dtype = jnp.float32    # parameter storage dtype
    attention_impl: AttentionImpl = "xla"

    def setup(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention impl {self.attention_impl!r}; expected one of {ATTENTION_IMPLS}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPTextEmbeddings(self.config, **kw)
        self.encoder = CLIPEncoder(self.config, self.attention_impl, **kw)
        self.final_layer_norm = layer_norm(self.config.layer_norm_eps, "final_layer_norm", **kw)

    def _check_ids(self, ids_bl: jax.Array) -> None:
        if ids_bl.ndim != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {ids_bl.shape}")
        if not jnp.issubdtype(ids_bl.dtype, jnp.integer):
            raise TypeError(f"input_ids must be integers, got {ids_bl.dtype}")

    def __call__(self, ids_bl: jax.Array, return_pooled: bool = False):
        self._check_ids(ids_bl)
        cfg = self.config
        # Every block runs at init so that the parameter tree always holds all
        # num_layers blocks (checkpoints store them even when the context skips one).
        need_all = return_pooled or self.is_initializing()
        states = self.encoder(self.embeddings(ids_bl), cfg.num_layers if need_all else cfg.context_layer)
        context_bld = self.final_layer_norm(states[cfg.context_layer])
        if not return_pooled:
            return context_bld
        last_bld = self.final_layer_norm(states[cfg.num_layers])
        return context_bld, self._pool(last_bld, ids_bl)

    def hidden_states(self, ids_bl: jax.Array) -> Tuple[jax.Array, ...]:
        """(h_0, ..., h_N) before final_layer_norm, like transformers'
        ``output_hidden_states`` (SDXL takes ``h_{N-1}`` without the final LN)."""
        self._check_ids(ids_bl)
        states = self.encoder(self.embeddings(ids_bl), self.config.num_layers)
        if self.is_initializing():
            self.final_layer_norm(states[-1])
        return states

    def pooled(self, ids_bl: jax.Array) -> jax.Array:
        """final_layer_norm(h_N) at the EOT position (see the class docstring): (B, D)."""
        return self(ids_bl, return_pooled=True)[1]

    def _pool(self, x_bld: jax.Array, ids_bl: jax.Array) -> jax.Array:
        eos = self.config.eos_token_id
        if eos is None:
            eot_b = jnp.argmax(ids_bl, axis=-1)
        else:
            # transformers CLIPTextTransformer.forward (eos_token_id != 2): the first position equal
            # to eos_token_id ((ids == eos).int().argmax(-1); 0 where the id is absent). argmax(ids)
            # would pick an added token (textual inversion ids above EOT) instead.
            eot_b = jnp.argmax(ids_bl == eos, axis=-1)
        return jnp.take_along_axis(x_bld, eot_b[:, None, None], axis=1)[:, 0]
