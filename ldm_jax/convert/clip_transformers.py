"""CLIP text encoder weights -> ``ldm_jax.models.clip`` parameters.

Two sources:

* a transformers ``CLIPTextModel`` folder (diffusers ``text_encoder/``):
  config.json + model.safetensors / pytorch_model.bin, keys with or without
  the ``text_model.`` prefix;
* an open_clip text tower state dict (SD 2.x checkpoints keep it under
  ``cond_stage_model.model.``): fused ``attn.in_proj_*`` are split into
  q / k / v, ``positional_embedding`` is a raw (L, D) parameter.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.mapping import convert_state_dict
from ldm_jax.convert.weights_io import find_weights, read_json, read_state_dict
from ldm_jax.models.clip import CLIPTextConfig, CLIPTextModel

_TRANSFORMERS_IGNORE = (r"(^|\.)position_ids$",)  # a non-persistent buffer in recent versions


# transformers' CLIPTextConfig default for an absent eos_token_id (since v4.31, PR #24773)
_TRANSFORMERS_EOS_DEFAULT = 49407
# The only transformers classes whose weights are exactly ``CLIPTextModel``'s
_SUPPORTED_ARCHITECTURES = ("CLIPTextModel",)


def _pool_token_id(cfg: Mapping, vocab_size: int, source: str) -> Optional[int]:
    """``CLIPTextConfig.eos_token_id`` reproducing transformers' pooled position.

    transformers' CLIPTextTransformer.forward pools at ``argmax(ids)`` when the
    config's ``eos_token_id`` is the legacy 2 (SD 1.x / 2.x hub configs) and
    otherwise at the first position holding ``eos_token_id`` (0 where absent).
    When the id is ``vocab_size - 1``, the highest id there is, the two agree on
    every row that holds it, so it maps to None (argmax) too and such configs stay
    equal to the presets; they differ only on a row without any EOS, which
    transformers does not support ("we assume each sequence contains an
    eos_token_id"). ``null`` (where transformers' pooling fails) pools at argmax.
    """
    eos = cfg.get("eos_token_id", _TRANSFORMERS_EOS_DEFAULT)
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int)):
        raise CheckpointError(f"{source}: unsupported eos_token_id={eos!r} (the pooled position needs a "
                              "single integer id, or null)")
    if eos is None or eos == 2 or eos == vocab_size - 1:
        return None
    return eos


def clip_config_from_transformers(config_dict: Mapping, output_layer: Optional[str] = None,
                                  source: str = "CLIP text config") -> CLIPTextConfig:
    """``CLIPTextConfig`` from a transformers CLIPTextConfig dict (or a CLIPConfig's ``text_config``).

    Raises ``CheckpointError`` naming ``source`` (the config.json path) for a missing key or a
    value the model does not implement."""
    cfg = dict(config_dict.get("text_config") or config_dict)
    try:
        vocab_size = int(cfg["vocab_size"])
        fields = dict(
            vocab_size=vocab_size,
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: CLIP text config lacks {e.args[0]!r}") from None
    fields.update(
        hidden_act=cfg.get("hidden_act", "quick_gelu"),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        output_layer=output_layer or "last",
        eos_token_id=_pool_token_id(cfg, vocab_size, source),
    )
    try:
        return CLIPTextConfig(**fields)
    except ValueError as e:  # e.g. hidden_act "relu": name the file and the key, not only the dataclass
        raise CheckpointError(f"{source}: unsupported CLIP text config ({e})") from None


def text_abstract_params(model):
    """The parameter tree of a token-id text encoder (CLIP, LDMBert) as ShapeDtypeStructs."""
    from ldm_jax.executable_store import stored_param_shapes

    return stored_param_shapes(model, (jax.ShapeDtypeStruct((1, model.config.max_position_embeddings), jnp.int32),))


def _dtype(name) -> jnp.dtype:
    return jnp.dtype(name) if isinstance(name, str) else name


def load_text_encoder(
    folder: str,
    dtype="float32",
    param_dtype="float32",
    attention_impl: str = "xla",
    output_layer: Optional[str] = None,
):
    """(CLIPTextModel, params) from a transformers CLIPTextModel folder.

    ``output_layer`` overrides the default "last" (a diffusers SD2 text
    encoder already has its last block removed: 23 layers, "last").
    """
    config_path = os.path.join(folder, "config.json")
    config_dict = read_json(config_path)
    # CLIPTextModelWithProjection (SDXL's text_encoder_2) adds text_projection on the pooled output,
    # which CLIPTextModel does not have: refuse by name rather than as an unexpected weight.
    unsupported = [a for a in config_dict.get("architectures") or () if a not in _SUPPORTED_ARCHITECTURES]
    if unsupported:
        raise CheckpointError(f"{config_path}: unsupported architectures={unsupported!r} (only "
                              f"{_SUPPORTED_ARCHITECTURES} is implemented; e.g. the text_projection of "
                              "CLIPTextModelWithProjection is not)")
    config = clip_config_from_transformers(config_dict, output_layer, source=config_path)
    path = find_weights(folder, ("model", "pytorch_model"))
    model = CLIPTextModel(config, dtype=_dtype(dtype), param_dtype=_dtype(param_dtype),
                          attention_impl=attention_impl)
    state = read_state_dict(path)
    params = convert_state_dict(
        state, text_abstract_params(model), source=path,
        rename=lambda k: k[len("text_model."):] if k.startswith("text_model.") else k,
        ignore=_TRANSFORMERS_IGNORE,
    )
    return model, params


_OPEN_CLIP_IGNORE = re.compile(r"^(text_projection|logit_scale|logit_bias|attn_mask|visual\.)")
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "attn.out_proj.": "self_attn.out_proj.",
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_SPLIT_TAG = "#"  # key#q: the q third of a fused in_proj tensor


def _open_clip_rename(key: str) -> Optional[str]:
    """open_clip text-tower name (prefix stripped) -> transformers CLIPTextModel name."""
    key, _, part = key.partition(_SPLIT_TAG)
    if key == "token_embedding.weight":
        return "embeddings.token_embedding.weight"
    if key == "positional_embedding":
        return "embeddings.position_embedding.weight"
    if key.startswith("ln_final."):
        return "final_layer_norm." + key[len("ln_final."):]
    m = _RESBLOCK.match(key)
    if m is None:
        return key  # reported as unexpected
    index, rest = m.groups()
    if part and rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        rest = f"self_attn.{part}_proj." + ("weight" if rest.endswith("weight") else "bias")
    else:
        for old, new in _BLOCK_RENAMES.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
    return f"encoder.layers.{index}.{rest}"


def clip_params_from_open_clip(
    state_dict: Mapping[str, np.ndarray],
    config: CLIPTextConfig,
    source: str,
    prefix: str = "",
    *,
    param_dtype="float32",
) -> Dict:
    """Params for ``CLIPTextModel(config)`` from open_clip text-tower weights.

    Only keys starting with ``prefix`` are read (a full SD2 checkpoint also
    holds the U-Net and VAE). ``text_projection``, ``logit_scale``,
    ``attn_mask`` and ``visual.*`` are not part of the text encoder and are
    skipped. Missing, unexpected or wrongly shaped weights raise
    ``CheckpointError`` naming the key.
    """
    width = config.hidden_size
    flat: Dict[str, np.ndarray] = {}
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        if _OPEN_CLIP_IGNORE.match(key):
            continue
        value = np.asarray(value)
        if key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            want = (3 * width, width) if key.endswith("weight") else (3 * width,)
            if value.shape != want:
                raise CheckpointError(
                    f"{source}: weight {full_key!r} has shape {value.shape}; expected the fused q/k/v "
                    f"{want} for hidden_size {width}")
            for name, third in zip("qkv", np.split(value, 3, axis=0)):
                flat[f"{full_key}{_SPLIT_TAG}{name}"] = third
        else:
            flat[full_key] = value
    if not flat:
        raise CheckpointError(f"{source}: no open_clip text weights under the prefix {prefix!r}")
    model = CLIPTextModel(config, param_dtype=_dtype(param_dtype))
    return convert_state_dict(
        flat, text_abstract_params(model), source=source,
        rename=lambda k: _open_clip_rename(k[len(prefix):]),
    )
