"""LDMBert weights -> ``ldm_jax.models.ldm_bert`` parameters, and back.

Two sources of the same network (see the model's docstring):

* diffusers ``LDMTextToImagePipeline``'s ``bert/`` folder (``LDMBertModel``:
  config.json with d_model / encoder_layers / ..., weights under ``model.``);
* an original CompVis checkpoint with ``cond_stage_config: BERTEmbedder``: an
  x-transformers ``TransformerWrapper`` under ``cond_stage_model.transformer.``.
  ``Encoder(depth=n)`` interleaves its blocks as ``attn_layers.layers.{2i}`` (attention)
  and ``.{2i+1}`` (feed-forward), each ``[norm, block, residual]``::

      token_emb.weight                          embed_tokens
      pos_emb.emb.weight                        embed_positions
      attn_layers.layers.{2i}.0.*               layers_i/self_attn_layer_norm
      attn_layers.layers.{2i}.1.to_{q,k,v}      layers_i/self_attn/{q,k,v}_proj   (no bias)
      attn_layers.layers.{2i}.1.to_out.*        layers_i/self_attn/out_proj
      attn_layers.layers.{2i+1}.0.*             layers_i/final_layer_norm
      attn_layers.layers.{2i+1}.1.net.0.0.*     layers_i/fc1   (Sequential(Linear, GELU))
      attn_layers.layers.{2i+1}.1.net.2.*       layers_i/fc2   (net.1 is Dropout)
      norm.*                                    layer_norm

The LM heads (``to_logits``) of both are unused by text-to-image and are skipped.
The tokenizer's vocabulary is not in an original checkpoint: ``tokenizer=`` (a
folder or bert-base-uncased's vocab.txt) must be given. A BERTEmbedder with
``use_tokenizer: false`` (the layout-to-image model, layout2img-openimages256) embeds
token ids built by its data pipeline (taming-transformers'
``ObjectsBoundingBoxConditionalBuilder``), not text: it loads without a tokenizer and
samples from ``Pipeline(context_ids=...)``.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.mapping import convert_state_dict
from ldm_jax.convert.weights_io import find_weights, read_json, read_state_dict
from ldm_jax.models.ldm_bert import LDMBertConfig, LDMBertModel
from ldm_jax.text.bert_tokenizer import BERTTokenizer

BERT_PREFIX = "cond_stage_model.transformer."
_HEAD = (r"^to_logits\.",)  # the unused LM head, in both namings
# BERTEmbedder(n_embed, n_layer, vocab_size=30522, max_seq_len=77, device, use_tokenizer, embedding_dropout).
_BERT_EMBEDDER_PARAMS = ("n_embed", "n_layer", "vocab_size", "max_seq_len", "device", "use_tokenizer",
                         "embedding_dropout")
# x-transformers' Attention / FeedForward defaults that BERTEmbedder does not override.
_X_HEADS, _X_DIM_HEAD, _X_FF_MULT = 8, 64, 4


def _dtype(name) -> jnp.dtype:
    return jnp.dtype(name) if isinstance(name, str) else name


def abstract_params(model: LDMBertModel):
    from ldm_jax.convert.clip_transformers import text_abstract_params

    return text_abstract_params(model)


# ----------------------------------------------------------------------------- diffusers bert/ folder


def ldm_bert_config_from_diffusers(config: Mapping[str, Any], source: str = "config.json") -> LDMBertConfig:
    """``LDMBertConfig`` from diffusers' LDMBertConfig dict (bert/config.json)."""
    if config.get("scale_embedding"):
        # LDMBertEncoder.forward never applies it; refuse rather than guess which was meant.
        raise CheckpointError(f"{source}: scale_embedding=true is not implemented (diffusers' LDMBertModel ignores it)")
    try:
        return LDMBertConfig(
            vocab_size=int(config.get("vocab_size", 30522)),
            hidden_size=int(config.get("d_model", 1280)),
            num_layers=int(config.get("encoder_layers", 32)),
            num_heads=int(config.get("encoder_attention_heads", 8)),
            head_dim=int(config.get("head_dim", 64)),
            intermediate_size=int(config.get("encoder_ffn_dim", 5120)),
            max_position_embeddings=int(config.get("max_position_embeddings", 77)),
            hidden_act=str(config.get("activation_function", "gelu")),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def ldm_bert_config_to_diffusers(cfg: LDMBertConfig) -> Dict[str, Any]:
    """The inverse: diffusers ``LDMBertConfig`` dict (inference settings: no dropout)."""
    return {
        "architectures": ["LDMBertModel"], "model_type": "ldmbert",
        "vocab_size": cfg.vocab_size, "d_model": cfg.hidden_size, "encoder_layers": cfg.num_layers,
        "num_hidden_layers": cfg.num_layers, "encoder_attention_heads": cfg.num_heads, "head_dim": cfg.head_dim,
        "encoder_ffn_dim": cfg.intermediate_size, "max_position_embeddings": cfg.max_position_embeddings,
        "activation_function": cfg.hidden_act, "scale_embedding": False, "dropout": 0.0, "attention_dropout": 0.0,
        "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "classifier_dropout": 0.0, "init_std": 0.02,
        "use_cache": True, "pad_token_id": 0, "torch_dtype": "float32",
    }


def load_ldm_bert(folder: str, dtype="float32", param_dtype="float32", attention_impl: str = "xla",
                  variant: Optional[str] = None):
    """(LDMBertModel, params) from diffusers' ``bert/`` folder (config.json + model.safetensors)."""
    config_path = os.path.join(folder, "config.json")
    config = ldm_bert_config_from_diffusers(read_json(config_path), source=config_path)
    model = LDMBertModel(config, dtype=_dtype(dtype), param_dtype=_dtype(param_dtype), attention_impl=attention_impl)
    path = find_weights(folder, ("model", "pytorch_model"), variant=variant)
    params = convert_state_dict(
        read_state_dict(path), abstract_params(model), source=path,
        rename=lambda k: k[len("model."):] if k.startswith("model.") else k, ignore=_HEAD)
    return model, params


# ----------------------------------------------------------------------------- original BERTEmbedder


_X_LAYER = re.compile(r"^attn_layers\.layers\.(\d+)\.([01])\.(.+)$")
_X_ATTN = {"to_q.": "self_attn.q_proj.", "to_k.": "self_attn.k_proj.", "to_v.": "self_attn.v_proj.",
           "to_out.": "self_attn.out_proj."}
_X_FF = {"net.0.0.": "fc1.", "net.2.": "fc2."}
_TOP = {"token_emb.": "embed_tokens.", "pos_emb.emb.": "embed_positions.", "norm.": "layer_norm."}


def _swap_prefix(rest: str, table: Mapping[str, str]) -> Optional[str]:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return None


def compvis_to_ldm_bert_name(key: str) -> str:
    """x-transformers name (``cond_stage_model.transformer.`` stripped) -> LDMBertModel name
    (``model.`` stripped); a name it does not know is returned as is (reported as unexpected)."""
    top = _swap_prefix(key, _TOP)
    if top is not None:
        return top
    m = _X_LAYER.match(key)
    if m is None:
        return key
    index, slot, rest = int(m.group(1)), m.group(2), m.group(3)
    block, attn = index // 2, index % 2 == 0  # layer types ("a", "f") * depth
    if slot == "0":
        return f"layers.{block}.{'self_attn_layer_norm' if attn else 'final_layer_norm'}.{rest}"
    renamed = _swap_prefix(rest, _X_ATTN if attn else _X_FF)
    return key if renamed is None else f"layers.{block}.{renamed}"


def ldm_bert_to_compvis_name(key: str) -> str:
    """The inverse, for naming missing weights as the checkpoint should have them."""
    for old, new in _TOP.items():
        if key.startswith(new):
            return BERT_PREFIX + old + key[len(new):]
    m = re.match(r"^layers\.(\d+)\.(.+)$", key)
    if m is None:
        return BERT_PREFIX + key
    block, rest = int(m.group(1)), m.group(2)
    for table, offset in ((_X_ATTN, 0), (_X_FF, 1)):
        for old, new in table.items():
            if rest.startswith(new):
                return f"{BERT_PREFIX}attn_layers.layers.{2 * block + offset}.1.{old}{rest[len(new):]}"
    for norm, offset in (("self_attn_layer_norm.", 0), ("final_layer_norm.", 1)):
        if rest.startswith(norm):
            return f"{BERT_PREFIX}attn_layers.layers.{2 * block + offset}.0.{rest[len(norm):]}"
    return BERT_PREFIX + key


def ldm_bert_config_from_original(params: Mapping[str, Any], source: str) -> LDMBertConfig:
    """``LDMBertConfig`` of ``BERTEmbedder(**cond_stage_config.params)``: width n_embed, n_layer
    blocks, x-transformers' 8 heads of 64 and 4x MLP."""
    unknown = sorted(set(params) - set(_BERT_EMBEDDER_PARAMS))
    if unknown:
        raise CheckpointError(f"{source}: BERTEmbedder params {unknown} are not BERTEmbedder arguments "
                              f"({', '.join(_BERT_EMBEDDER_PARAMS)})")
    for key in ("n_embed", "n_layer"):
        if key not in params:
            raise CheckpointError(f"{source}: cond_stage_config BERTEmbedder needs params.{key}")
    try:
        width = int(params["n_embed"])
        return LDMBertConfig(vocab_size=int(params.get("vocab_size", 30522)), hidden_size=width,
                             num_layers=int(params["n_layer"]), num_heads=_X_HEADS, head_dim=_X_DIM_HEAD,
                             intermediate_size=_X_FF_MULT * width,
                             max_position_embeddings=int(params.get("max_seq_len", 77)), hidden_act="gelu")
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cond_stage_config BERTEmbedder: {e}") from None


def bert_uses_tokenizer(params: Mapping[str, Any], source: str) -> bool:
    """BERTEmbedder's ``use_tokenizer`` (default true): false means it is fed token ids, not text."""
    value = params.get("use_tokenizer", True)
    if not isinstance(value, bool):
        raise CheckpointError(f"{source}: BERTEmbedder use_tokenizer must be true or false, got {value!r}")
    return value


def missing_tokenizer_error(source: str) -> CheckpointError:
    return CheckpointError(
        f"{source}: the cond stage is a BERTEmbedder (CompVis LDM text-to-image), whose WordPiece vocabulary is not "
        "stored in the checkpoint: pass tokenizer= a bert-base-uncased vocab.txt (30522 lines) or a tokenizer folder "
        "(e.g. the tokenizer/ of CompVis/ldm-text2im-large-256), as load_pipeline(path, config=..., "
        "tokenizer='vocab.txt')")


def load_original_bert(spec, state: Mapping[str, np.ndarray], source: str, kw: dict, tokenizer: Optional[str],
                       convert: Callable):
    """(LDMBertModel, params, BERTTokenizer) of a ``BERTEmbedder`` cond stage; the tokenizer is
    None for ``use_tokenizer: false`` (token ids from the data pipeline, see the module docstring).

    ``convert``: ``original_pipeline._convert`` (names missing weights as the checkpoint should
    have them). ``tokenizer``: a tokenizer folder or bert-base-uncased's vocab.txt."""
    config = ldm_bert_config_from_original(spec.cond_stage_params, spec.source)
    uses_tokenizer = bert_uses_tokenizer(spec.cond_stage_params, spec.source)
    if not uses_tokenizer and tokenizer is not None:
        # The original never tokenizes for this model: a vocabulary given here would be silently wrong.
        raise CheckpointError(f"{source}: tokenizer={tokenizer!r} given, but the BERTEmbedder has use_tokenizer: "
                              "false (it embeds token ids, e.g. a layout's; pass them as context_ids=)")
    if uses_tokenizer and tokenizer is None:
        raise missing_tokenizer_error(source)
    if BERT_PREFIX + "token_emb.weight" not in state:
        raise CheckpointError(f"{source}: the configuration ({spec.source}) has a BERTEmbedder but the checkpoint has "
                              f"no {BERT_PREFIX}token_emb.weight")
    model = LDMBertModel(config, **kw)
    weights = {k: v for k, v in state.items() if k.startswith(BERT_PREFIX)}
    params = convert(weights, abstract_params(model), rename=lambda k: compvis_to_ldm_bert_name(k[len(BERT_PREFIX):]),
                     source=source, config_source=spec.source, ignore=(r"^" + re.escape(BERT_PREFIX) + r"to_logits\.",),
                     original_name=ldm_bert_to_compvis_name)
    if not uses_tokenizer:
        return model, params, None
    try:
        tok = BERTTokenizer.from_pretrained(tokenizer, max_length=config.max_position_embeddings)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"tokenizer={tokenizer!r}: {e}") from None
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer={tokenizer!r} has {tok.vocab_size} tokens but the BERTEmbedder's table "
                              f"{config.vocab_size} (vocab_size): not this model's vocabulary")
    return model, params, tok


# ----------------------------------------------------------------------------- export


def save_ldm_bert(model: LDMBertModel, params, folder: str) -> str:
    """diffusers' ``bert/`` folder (config.json + model.safetensors, names under ``model.``).

    The LM head ``to_logits`` is not written (this project does not keep it; text-to-image never
    calls it): diffusers' LDMBertModel initialises it and reports it as missing."""
    from ldm_jax.convert.export import TRANSFORMERS_STEMS, _check_inverse, _write_component, flax_to_torch_state_dict

    sd = flax_to_torch_state_dict(params, prefix="model.")
    _check_inverse(sd, params, source=os.path.join(folder, "model.safetensors"), prefix="model.")
    # (replacing the weight files of an earlier save there, as save_text_encoder)
    return _write_component(folder, ldm_bert_config_to_diffusers(model.config), "model.safetensors", sd,
                            TRANSFORMERS_STEMS)
