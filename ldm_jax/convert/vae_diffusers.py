"""A diffusers ``vae/`` (or VQ ``vqvae/``) folder -> (AutoencoderKL | VQModel, params).

The folder holds ``config.json`` (``_class_name`` ``AutoencoderKL`` or
``VQModel``) and ``diffusion_pytorch_model[.variant].safetensors`` (or
``.bin``). Parameter names map mechanically (``ldm_jax.convert.mapping``);
the old attention names that many hub VAE checkpoints still carry
(``query``/``key``/``value``/``proj_attn``, diffusers < 0.14) are renamed to
``to_q``/``to_k``/``to_v``/``to_out.0`` as diffusers does on load.

The ``Attn*`` block types (attention after every resnet of a level) become
``AutoencoderConfig.attention_levels``; they must sit at the same levels in the
encoder and the decoder. Anything the Flax model does not implement (other
block types, activation, spatial norm, ...) is a ``CheckpointError`` naming
config.json, the key and the value, never a silent approximation.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional, Tuple

import jax.numpy as jnp

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.mapping import convert_state_dict
from ldm_jax.convert.weights_io import find_weights, place_params, read_json, read_state_dict
from ldm_jax.models.autoencoder import AutoencoderConfig, abstract_params, build_autoencoder
from ldm_jax.models.layers import ATTENTION_IMPLS

SUPPORTED_CLASSES = ("AutoencoderKL", "VQModel")
# config.json key -> (plain block, the same with a self-attention after every resnet)
BLOCK_TYPES = {"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
               "up_block_types": ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")}
WEIGHT_STEMS = ("diffusion_pytorch_model",)

_DEPRECATED_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_deprecated_attention(key: str) -> str:
    """``...attentions.0.query.weight`` -> ``...attentions.0.to_q.weight`` (and key/value/proj_attn)."""
    m = _DEPRECATED_ATTENTION.match(key)
    if m is None:
        return key
    return f"{m.group(1)}.{_NEW_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"


def _unsupported(source: str, key: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: unsupported {key}={value!r} ({why})")


def _scaling_factor(cfg: Mapping[str, Any], source: str) -> float:
    value = cfg.get("scaling_factor", 0.18215)  # diffusers' default for AutoencoderKL and VQModel
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise _unsupported(source, "scaling_factor", value, "the latent scale must be a positive number")
    return float(value)


def vae_config_from_diffusers(config_dict: Mapping[str, Any], class_name: Optional[str] = None,
                              *, source: str = "config.json") -> AutoencoderConfig:
    """``AutoencoderConfig`` from a diffusers ``AutoencoderKL`` / ``VQModel`` config dict.

    ``class_name`` defaults to ``config_dict["_class_name"]``. Raises
    ``CheckpointError`` (naming ``source``, the key and the value) for anything
    this implementation does not reproduce exactly.
    """
    cfg = dict(config_dict)
    class_name = class_name or cfg.get("_class_name")
    if class_name not in SUPPORTED_CLASSES:
        raise _unsupported(source, "_class_name", class_name, f"expected one of {SUPPORTED_CLASSES}")
    kind = "kl" if class_name == "AutoencoderKL" else "vq"

    block_out_channels = tuple(cfg.get("block_out_channels", (64,)))
    n = len(block_out_channels)
    types, attention = {}, {}  # block-types key -> the types, the levels (0 = full resolution) with attention
    for key, (block, attn_block) in BLOCK_TYPES.items():
        types[key] = list(cfg.get(key, [block] * n))
        if len(types[key]) != n or any(t not in (block, attn_block) for t in types[key]):
            raise _unsupported(source, key, types[key], f"only {n} x {block!r} or {attn_block!r} (one per "
                               "block_out_channels entry) is implemented")
        # up_block_types run from the lowest resolution: entry u is level n - 1 - u
        attention[key] = {(i if key == "down_block_types" else n - 1 - i) for i, t in enumerate(types[key])
                          if t == attn_block}
    down, up = attention["down_block_types"], attention["up_block_types"]
    if down != up:
        raise _unsupported(source, "down_block_types", types["down_block_types"],
                           f"attention at encoder levels {sorted(down)} but decoder levels {sorted(up)} "
                           f"(up_block_types {types['up_block_types']}); only the same levels in both "
                           "(CompVis attn_resolutions) is implemented")
    # diffusers get_activation lower-cases act_fn and maps both "silu" and "swish" to nn.SiLU
    # (diffusers.models.activations.ACT2CLS), so "swish" / "SiLU" are the same network.
    act_fn = cfg.get("act_fn", "silu")
    if not isinstance(act_fn, str) or act_fn.lower() not in ("silu", "swish"):
        raise _unsupported(source, "act_fn", act_fn, "only 'silu' (alias 'swish') is implemented")
    if cfg.get("norm_type", "group") != "group":
        raise _unsupported(source, "norm_type", cfg["norm_type"], "only 'group' is implemented")
    # Ignored on purpose: sample_size (tiling only), force_upcast (dtype is the caller's choice),
    # lookup_from_codebook (only affects decode(force_not_quantize=True); see VQModel.decode_indices),
    # latents_mean / latents_std (pipeline data, not used by the autoencoder).

    common = dict(
        in_channels=int(cfg.get("in_channels", 3)),
        out_channels=int(cfg.get("out_channels", 3)),
        block_out_channels=block_out_channels,
        layers_per_block=int(cfg.get("layers_per_block", 1)),
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        mid_block_attention=bool(cfg.get("mid_block_add_attention", True)),
        attention_levels=tuple(sorted(down)),
        scaling_factor=_scaling_factor(cfg, source),
    )
    if kind == "kl":
        shift = cfg.get("shift_factor")
        kwargs = dict(
            common, kind="kl",
            latent_channels=int(cfg.get("latent_channels", 4)),
            use_quant_conv=bool(cfg.get("use_quant_conv", True)),
            use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
            shift_factor=None if shift is None else float(shift),
        )
    else:
        vq_dim = cfg.get("vq_embed_dim")
        kwargs = dict(
            common, kind="vq",
            latent_channels=int(cfg.get("latent_channels", 3)),
            num_vq_embeddings=int(cfg.get("num_vq_embeddings", 256)),
            vq_embed_dim=None if vq_dim is None else int(vq_dim),
            beta=0.25, legacy=True,  # what diffusers' VQModel hard-codes
        )
    try:
        return AutoencoderConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _dtype(value, what: str):
    try:
        return jnp.dtype(value)
    except TypeError:
        raise ValueError(f"load_vae: unknown {what} {value!r}") from None


def load_vae(folder: str, dtype="float32", param_dtype="float32", attention_impl: str = "xla",
             variant: Optional[str] = None) -> Tuple[Any, dict]:
    """Load a diffusers autoencoder folder.

    Returns ``(module, params)``: ``module`` is an ``AutoencoderKL`` or
    ``VQModel`` computing in ``dtype``; ``params`` a nested dict of jax arrays in
    ``param_dtype``. Use ``module.apply({"params": params}, x, method="encode")``.
    """
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"load_vae: unknown attention_impl {attention_impl!r}; expected one of {ATTENTION_IMPLS}")
    compute_dtype, storage_dtype = _dtype(dtype, "dtype"), _dtype(param_dtype, "param_dtype")
    config_path = os.path.join(folder, "config.json")
    config = vae_config_from_diffusers(read_json(config_path), source=config_path)
    module = build_autoencoder(config, attention_impl=attention_impl, dtype=compute_dtype,
                               param_dtype=storage_dtype)
    weights_path = find_weights(folder, WEIGHT_STEMS, variant=variant)
    state_dict = read_state_dict(weights_path)
    target = abstract_params(module)
    params = convert_state_dict(state_dict, target, source=weights_path, rename=rename_deprecated_attention)
    return module, place_params(params)
