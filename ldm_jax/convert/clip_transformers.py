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
    variant: Optional[str] = None,
):
    """(CLIPTextModel, params) from a transformers CLIPTextModel folder.

    ``output_layer`` overrides the default "last" (a diffusers SD2 text
    encoder already has its last block removed: 23 layers, "last").
    ``variant`` (e.g. "fp16") reads ``model.fp16.safetensors`` & co.
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
    path = find_weights(folder, ("model", "pytorch_model"), variant=variant)
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


# open_clip's CLIPTextCfg defaults (open_clip/model.py) for the fields the text transformer reads
_OPEN_CLIP_TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12, mlp_ratio=4.0,
                                eos_id=2, pool_type="argmax", proj_type="linear")
# CLIPTextCfg fields that change the context and CLIPTextModel cannot express
_OPEN_CLIP_REFUSED = ("embed_cls", "no_causal_mask", "qk_norm", "scaled_cosine_attn", "scale_heads",
                      "scale_attn_inner", "scale_attn", "scale_fc")
# CLIPTextCfg fields with no effect on the text transformer's outputs (tokenizer, head, CoCa settings)
_OPEN_CLIP_INERT = ("hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "pad_id", "output_tokens",
                    "proj_bias", "ls_init_value", "block_type", "final_ln_after_pool", "hf_model_pretrained",
                    "hf_proj_type", "hf_pooler_type")


def clip_config_from_open_clip(model_config: Mapping, output_layer: Optional[str] = None, *, pooled: bool = False,
                               quick_gelu: Optional[bool] = None,
                               source: str = "open_clip model config") -> CLIPTextConfig:
    """``CLIPTextConfig`` of an open_clip text tower from its model config (the JSON of
    ``open_clip/model_configs``, with ``text_cfg``, ``embed_dim`` and ``quick_gelu``; or a bare ``text_cfg``).

    ``quick_gelu`` overrides the config's flag (open_clip's ``force_quick_gelu``; OpenAI weights).
    ``pooled=True`` says the caller uses ``CLIPTextModel``'s pooled output too: it is open_clip's
    ``text_global_pool`` at argmax(ids) or the first ``eos_id`` *before* ``text_projection``, so a
    tower with a projection or another ``pool_type`` is then refused. Options that change the
    context (``no_causal_mask``, ``embed_cls``, custom attention blocks, ``act_kwargs``, an HF
    text tower) are always refused with a ``CheckpointError`` naming the key and ``source``.
    ``ls_init_value`` (layer scale) is fine: ``clip_params_from_open_clip`` folds it."""
    top = dict(model_config)
    text = dict(top["text_cfg"]) if isinstance(top.get("text_cfg"), Mapping) else top
    cfg = {**_OPEN_CLIP_TEXT_DEFAULTS, **text}
    if text.get("hf_model_name"):
        raise CheckpointError(f"{source}: text_cfg.hf_model_name={text['hf_model_name']!r} is a Hugging Face text "
                              "tower, not open_clip's TextTransformer")
    known = set(_OPEN_CLIP_TEXT_DEFAULTS) | set(_OPEN_CLIP_REFUSED) | set(_OPEN_CLIP_INERT) | {
        "act_kwargs", "norm_kwargs", "hf_model_name"}
    unknown = sorted(k for k in text if k not in known and (text is not top or k not in (
        "embed_dim", "quick_gelu", "vision_cfg", "custom_text", "init_logit_bias", "init_logit_scale")))
    if unknown:
        raise CheckpointError(f"{source}: unsupported open_clip text_cfg keys {unknown}")
    for key in _OPEN_CLIP_REFUSED:
        if cfg.get(key):
            raise CheckpointError(f"{source}: text_cfg.{key}={cfg[key]!r} is not supported by ldm_jax's CLIPTextModel "
                                  "(a causal pre-LN transformer without a class token or custom attention blocks)")
    if cfg.get("act_kwargs"):
        raise CheckpointError(f"{source}: text_cfg.act_kwargs={cfg['act_kwargs']!r} is not supported (only the exact "
                              "nn.GELU and QuickGELU)")
    norm = dict(cfg.get("norm_kwargs") or {})
    eps = norm.pop("eps", 1e-5)
    if norm:
        raise CheckpointError(f"{source}: text_cfg.norm_kwargs keys {sorted(norm)} are not supported (only eps)")
    pool_type = cfg["pool_type"]
    if pool_type not in ("argmax", "eos", "first", "last", "none"):
        raise CheckpointError(f"{source}: unknown text_cfg.pool_type={pool_type!r}")
    if pooled and pool_type not in ("argmax", "eos"):
        raise CheckpointError(f"{source}: text_cfg.pool_type={pool_type!r}: CLIPTextModel pools at argmax(ids) or "
                              "the first eos_id only")
    # TextTransformer has a text_projection unless proj_type is 'none' or output_dim (embed_dim) is falsy.
    output_dim = top.get("embed_dim")
    if pooled and output_dim and cfg["proj_type"] != "none":
        raise CheckpointError(f"{source}: the text tower projects its pooled output (embed_dim={output_dim}, "
                              f"proj_type={cfg['proj_type']!r}), which CLIPTextModel does not: its pooled output is "
                              "the one before text_projection")
    width, mlp_ratio = int(cfg["width"]), float(cfg["mlp_ratio"])
    if quick_gelu is None:
        quick_gelu = bool(top.get("quick_gelu", False))
    try:
        return CLIPTextConfig(
            vocab_size=int(cfg["vocab_size"]), hidden_size=width,
            intermediate_size=int(width * mlp_ratio),  # ResidualAttentionBlock: int(d_model * mlp_ratio)
            num_layers=int(cfg["layers"]), num_heads=int(cfg["heads"]),
            max_position_embeddings=int(cfg["context_length"]),
            hidden_act="quick_gelu" if quick_gelu else "gelu", layer_norm_eps=float(eps),
            output_layer=output_layer or "last",
            eos_token_id=int(cfg["eos_id"]) if pool_type == "eos" else None)
    except ValueError as e:
        raise CheckpointError(f"{source}: unsupported open_clip text config ({e})") from None


# open_clip options whose weights CLIPTextModel has no place for (refused by name, not as a bare
# "unexpected key"): CoCa's appended class token (embed_cls) and CustomResidualAttentionBlock's extras
# (qk_norm: attn.ln_q/ln_k, scaled_cosine_attn: attn.logit_scale, scale_heads: attn.head_scale,
# scale_attn_inner: attn.ln_inner, scale_attn: ln_attn, scale_fc: mlp.ln).
_OPEN_CLIP_UNSUPPORTED = (
    (re.compile(r"^cls_emb$"), "embed_cls (a class token appended to the text, as CoCa)"),
    (re.compile(r"^transformer\.resblocks\.\d+\."
                r"(attn\.(ln_q|ln_k|ln_inner)\.|attn\.(logit_scale|head_scale)$|ln_attn\.|mlp\.ln\.)"),
     "CustomResidualAttentionBlock options (qk_norm / scaled_cosine_attn / scale_heads / scale_attn_inner / "
     "scale_attn / scale_fc)"),
)
# LayerScale (ls_init_value): ResidualAttentionBlock computes x + gamma_1 * out_proj(attn) and
# x + gamma_2 * c_proj(mlp); a per-output-channel scale of a linear layer, folded into its weight and bias.
_LAYER_SCALE = re.compile(r"^(transformer\.resblocks\.\d+\.)ls_([12])\.gamma$")
_LAYER_SCALE_TARGET = {"1": "attn.out_proj", "2": "mlp.c_proj"}


def _fold_layer_scale(weights: Dict[str, np.ndarray], prefix: str, source: str) -> Dict[str, np.ndarray]:
    """open_clip text weights (prefix stripped) with every ``ls_{1,2}.gamma`` folded into the linear
    layer it scales: gamma * (W x + b) = (gamma[:, None] * W) x + gamma * b, exactly the same block."""
    out = dict(weights)
    for key in [k for k in weights if _LAYER_SCALE.match(k)]:
        block, which = _LAYER_SCALE.match(key).groups()
        gamma = np.asarray(out.pop(key))
        target = block + _LAYER_SCALE_TARGET[which]
        for leaf in ("weight", "bias"):
            if target + "." + leaf not in out:
                raise CheckpointError(f"{source}: layer scale {prefix + key!r} needs {prefix + target}.{leaf}, "
                                      "which is missing")
        w, b = np.asarray(out[target + ".weight"]), np.asarray(out[target + ".bias"])
        if gamma.shape != b.shape or w.ndim != 2 or w.shape[0] != b.shape[0]:
            raise CheckpointError(f"{source}: layer scale {prefix + key!r} has shape {gamma.shape}; expected "
                                  f"{b.shape} (the output width of {prefix + target})")
        out[target + ".weight"] = (gamma[:, None].astype(np.float64) * w).astype(w.dtype)
        out[target + ".bias"] = (gamma.astype(np.float64) * b).astype(b.dtype)
    return out


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
    holds the U-Net and VAE; a raw open_clip CLIP state dict has the tower at the
    top level, prefix ""; a CustomTextCLIP one under "text."). ``text_projection``,
    ``logit_scale``, ``attn_mask`` and ``visual.*`` are not part of the text encoder and are
    skipped: the context is ln_final of the blocks (FrozenOpenCLIPEmbedder), and the
    pooled output of ``CLIPTextModel`` is the one *before* the projection (open_clip's
    ``text_global_pool``). Layer scale (``ls_1`` / ``ls_2.gamma``) is folded into the
    layers it scales. Missing, unexpected or wrongly shaped weights, and options
    CLIPTextModel lacks (``cls_emb``, custom attention blocks), raise ``CheckpointError``
    naming the key.

    What the weights cannot show is the caller's ``config``: the head count, the
    activation (``hidden_act="quick_gelu"`` for OpenAI and ``*-quickgelu`` towers),
    the LayerNorm epsilon, and that the attention is causal (open_clip's
    ``no_causal_mask=True`` towers are not supported).
    """
    width = config.hidden_size
    raw: Dict[str, np.ndarray] = {}
    for full_key, value in state_dict.items():
        if not full_key.startswith(prefix):
            continue
        key = full_key[len(prefix):]
        if _OPEN_CLIP_IGNORE.match(key):
            continue
        for pattern, what in _OPEN_CLIP_UNSUPPORTED:
            if pattern.search(key):
                raise CheckpointError(f"{source}: weight {full_key!r} belongs to open_clip's {what}, which "
                                      "ldm_jax's CLIPTextModel does not implement")
        raw[key] = value
    if not raw:
        raise CheckpointError(f"{source}: no open_clip text weights under the prefix {prefix!r}")
    flat: Dict[str, np.ndarray] = {}
    for key, value in _fold_layer_scale(raw, prefix, source).items():
        full_key = prefix + key
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
    model = CLIPTextModel(config, param_dtype=_dtype(param_dtype))
    return convert_state_dict(
        flat, text_abstract_params(model), source=source,
        rename=lambda k: _open_clip_rename(k[len(prefix):]),
    )
