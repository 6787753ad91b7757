"""diffusers ``unet/`` folder (config.json + weights) -> (UNet, params).

Reads ``UNet2DConditionModel`` (SD1/SD2, class-conditional, inpainting, x4
upscaler, cross-attention-free variants) and ``UNet2DModel`` (unconditional
LDMs) configurations. Weights are mapped by name onto the abstract parameter
tree of the Flax module (``jax.eval_shape`` of init: no random weights are
materialised), transposed once, and checked for missing / unexpected / wrongly
shaped tensors (``CheckpointError`` naming the key).

Note on diffusers' naming: in ``UNet2DConditionModel`` the config key
``attention_head_dim`` is the *number of heads* per block (a historical
misnomer that diffusers keeps; ``num_attention_heads`` must be null there),
while in ``UNet2DModel`` it really is the channels per head. Both are mapped
to ``UNetConfig.num_heads`` / ``UNetConfig.head_dim`` accordingly.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import jax.numpy as jnp

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.mapping import convert_state_dict
from ldm_jax.convert.weights_io import find_weights, read_json, read_state_dict
from ldm_jax.models.unet import UNet, UNetConfig, attention_levels, unet_dummy_inputs

# Config keys restricted to the values this U-Net implements (other values change
# the architecture); a key that is absent takes diffusers' default, which is allowed.
_CONDITION_REQUIRED = {
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "attention_type": ("default",),
    "dual_cross_attention": (False, None),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "addition_embed_type": (None,),
    "time_cond_proj_dim": (None,),
    "timestep_post_act": (None,),
    # cross_attention_norm, resnet_skip_time_act and resnet_out_scale_factor are not checked:
    # diffusers' get_down_block / get_mid_block / get_up_block hand them only to the
    # Simple*CrossAttn* and Resnet*sampleBlock2D blocks, which _CONDITION_BLOCKS refuses, so
    # they cannot change a model accepted here.
    "num_attention_heads": (None,),  # diffusers itself refuses it in UNet2DConditionModel
    "time_embedding_act_fn": (None, "silu", "swish"),
    "class_embed_type": (None, "timestep", "identity"),
}
_MODEL2D_REQUIRED = {
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default",),
    "time_embedding_type": ("positional",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "class_embed_type": (None, "timestep", "identity"),
    "mid_block_type": ("UNetMidBlock2D", None),
}
_CONDITION_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}
_MODEL2D_BLOCKS = {
    "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}
_SOURCE = "config.json"


def _json(value):
    return list(value) if isinstance(value, tuple) else value


def _unsupported(source: str, key: str, value, allowed) -> CheckpointError:
    return CheckpointError(
        f"{source}: unsupported value {key}={value!r} (this UNet supports {', '.join(map(repr, allowed))})")


def _check(cfg: dict, required: dict, blocks: dict, source: str):
    for key, allowed in required.items():
        if key in cfg and cfg[key] not in allowed:
            raise _unsupported(source, key, cfg[key], allowed)
    for key, allowed in blocks.items():
        for value in cfg.get(key, ()):
            if value not in allowed:
                raise _unsupported(source, key, value, allowed)


def unet_config_from_diffusers(config: dict, source: str = _SOURCE) -> UNetConfig:
    """A diffusers ``unet/config.json`` dict -> ``UNetConfig``.

    Raises CheckpointError naming the key and value of any setting this
    implementation does not cover.
    """
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name == "UNet2DConditionModel":
        fields = _from_condition_model(config, source)
    elif class_name == "UNet2DModel":
        fields = _from_2d_model(config, source)
    else:
        raise _unsupported(source, "_class_name", class_name, ("UNet2DConditionModel", "UNet2DModel"))
    try:
        unet_config = UNetConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None
    if not unet_config.uses_cross_attention:  # diffusers keeps a default of 1280 that nothing uses
        unet_config = dataclasses.replace(unet_config, cross_attention_dim=None)
    elif isinstance(unet_config.cross_attention_dim, tuple):
        unet_config = dataclasses.replace(unet_config, cross_attention_dim=_context_width(unet_config, source))
    return unet_config


def _check_heads(fields: dict, kind: str, value, source: str):
    """Refuse, naming ``attention_head_dim``, head layouts that build no attention.

    ``kind`` "cross" (UNet2DConditionModel): ``value`` is the number of heads
    per level; diffusers builds heads of ``c // heads`` channels, also when that
    does not divide ``c`` (the transformer then runs ``heads * (c // heads)``
    wide between proj_in and proj_out; ``UNetConfig.dim_head`` does the same).
    ``kind`` "self" (UNet2DModel): ``value`` is the channels per head (None:
    one head); ``c // value`` heads of ``value`` channels. More heads than
    channels (or a head wider than the level) would be zero-width attention.
    Only levels with such attention are checked, as only they use it.
    """
    if value is None:
        return
    n = len(fields["block_out_channels"])
    per_level = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    if len(per_level) != n:
        return  # UNetConfig reports the length mismatch
    what = "heads" if kind == "cross" else "channels per head"
    for i in attention_levels(fields, kind):
        c, v = fields["block_out_channels"][i], per_level[i]
        if not isinstance(v, int) or v < 1 or v > c:
            raise _unsupported(source, "attention_head_dim", _json(value), (
                f"{what} (a positive int, at most the {c} channels of level {i}, which has attention)",))


def _context_width(config: UNetConfig, source: str) -> int:
    """The one context width of a per-block ``cross_attention_dim`` (``UNetConfig.context_width``:
    diffusers gives block i ``cross_attention_dim[i]``, but a block without cross-attention ignores
    its entry and ``forward`` takes one ``encoder_hidden_states`` for all the others), so the saved
    config reads as one int whatever the unused entries say."""
    try:
        return config.context_width
    except ValueError:
        raise _unsupported(source, "cross_attention_dim", list(config.per_block("cross_attention_dim")),
                           ("one width shared by all cross-attention blocks",)) from None


def _common(cfg: dict, defaults: dict) -> dict:
    get = lambda k: cfg.get(k, defaults[k])  # noqa: E731
    return dict(
        in_channels=get("in_channels"),
        out_channels=get("out_channels"),
        block_out_channels=tuple(get("block_out_channels")),
        down_block_types=tuple(get("down_block_types")),
        up_block_types=tuple(get("up_block_types")),
        layers_per_block=get("layers_per_block"),
        norm_num_groups=get("norm_num_groups"),
        norm_eps=get("norm_eps"),
        flip_sin_to_cos=get("flip_sin_to_cos"),
        freq_shift=get("freq_shift"),
        time_embedding_dim=cfg.get("time_embedding_dim"),
        num_class_embeds=cfg.get("num_class_embeds"),
        class_embed_type=cfg.get("class_embed_type"),
        center_input_sample=cfg.get("center_input_sample", False),
        downsample_padding=get("downsample_padding"),
        mid_block_scale_factor=get("mid_block_scale_factor"),
        dropout=cfg.get("dropout", 0.0),
    )


def _from_condition_model(cfg: dict, source: str) -> dict:
    _check(cfg, _CONDITION_REQUIRED, _CONDITION_BLOCKS, source)
    defaults = dict(
        in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        downsample_padding=1, mid_block_scale_factor=1.0)
    if cfg.get("norm_num_groups", 32) is None:
        raise _unsupported(source, "norm_num_groups", None, ("an integer",))
    for key in ("conv_in_kernel", "conv_out_kernel"):
        if cfg.get(key, 3) % 2 == 0:
            raise _unsupported(source, key, cfg[key], ("odd kernel sizes",))
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None):
        raise _unsupported(source, "mid_block_type", mid, ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None))
    out = _common(cfg, defaults)
    heads = cfg.get("attention_head_dim", 8)  # = number of heads, see the module docstring
    if heads is None:  # diffusers itself fails on it (`len(None)` in _check_config)
        raise _unsupported(source, "attention_head_dim", heads, ("an int or a list of ints",))
    out.update(
        mid_block_type=mid,
        # get_mid_block builds UNetMidBlock2D with num_layers=0 (one resnet) here.
        mid_block_num_layers=1 if mid == "UNetMidBlock2DCrossAttn" else 0,
        mid_block_attention=False,
        transformer_layers_per_block=cfg.get("transformer_layers_per_block", 1),
        reverse_transformer_layers_per_block=cfg.get("reverse_transformer_layers_per_block"),
        num_heads=heads,
        head_dim=None,
        cross_attention_dim=cfg.get("cross_attention_dim", 1280),
        only_cross_attention=cfg.get("only_cross_attention", False),
        use_linear_projection=cfg.get("use_linear_projection", False),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
        time_embedding_act_fn=cfg.get("time_embedding_act_fn"),
        class_embeddings_concat=bool(cfg.get("class_embeddings_concat", False)),
        conv_in_kernel=cfg.get("conv_in_kernel", 3),
        conv_out_kernel=cfg.get("conv_out_kernel", 3),
    )
    if out["time_embedding_act_fn"] == "swish":
        out["time_embedding_act_fn"] = "silu"
    _check_heads(out, "cross", heads, source)
    if isinstance(heads, (list, tuple)) and None in heads:
        # diffusers accepts null entries for levels without cross-attention (they
        # are never used: get_down_block only turns a null into `output_channel`
        # for the Simple* blocks); _check_heads refused them on attention levels.
        out["num_heads"] = tuple(1 if h is None else h for h in heads)
    return out


def _from_2d_model(cfg: dict, source: str) -> dict:
    _check(cfg, _MODEL2D_REQUIRED, _MODEL2D_BLOCKS, source)
    defaults = dict(
        in_channels=3, out_channels=3, block_out_channels=(224, 448, 672, 896),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
        downsample_padding=1, mid_block_scale_factor=1.0)
    if not isinstance(cfg.get("layers_per_block", 2), int):
        raise _unsupported(source, "layers_per_block", cfg["layers_per_block"], ("an int",))
    if cfg.get("norm_num_groups", 32) is None:  # diffusers' resnets fail on GroupNorm(None, c) too
        raise _unsupported(source, "norm_num_groups", None, ("an integer",))
    out = _common(cfg, defaults)
    head_dim = cfg.get("attention_head_dim", 8)  # real channels per head here; None: one head
    mid = cfg.get("mid_block_type", "UNetMidBlock2D")
    out.update(
        mid_block_type=mid,
        mid_block_num_layers=1,
        mid_block_attention=bool(cfg.get("add_attention", True)),
        attn_norm_num_groups=cfg.get("attn_norm_num_groups"),
        num_heads=1 if head_dim is None else None,
        head_dim=head_dim,
        cross_attention_dim=None,
    )
    _check_heads(out, "self", head_dim, source)
    return out


def load_unet(
    folder: str,
    dtype="float32",
    param_dtype="float32",
    attention_impl: str = "xla",
    variant: Optional[str] = None,
) -> Tuple[UNet, dict]:
    """Load a diffusers ``unet/`` folder as ``(UNet module, params)``.

    ``folder`` holds ``config.json`` and ``diffusion_pytorch_model[.variant]``
    (``.safetensors``, ``.bin`` or sharded). Parameters come back as numpy
    arrays in ``param_dtype``; computation runs in ``dtype``.
    """
    config_path = os.path.join(folder, "config.json")
    config = unet_config_from_diffusers(read_json(config_path), source=config_path)
    unet = UNet(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype), attention_impl=attention_impl)
    weights_path = find_weights(folder, ["diffusion_pytorch_model"], variant=variant)
    state_dict = read_state_dict(weights_path)
    target = unet_abstract_params(unet)
    params = convert_state_dict(state_dict, target, source=weights_path)
    return unet, params


def unet_abstract_params(unet: UNet) -> dict:
    """The parameter tree of ``unet`` as ShapeDtypeStructs (nothing allocated)."""
    from ldm_jax.executable_store import stored_param_shapes

    return stored_param_shapes(unet, unet_dummy_inputs(unet.config))
