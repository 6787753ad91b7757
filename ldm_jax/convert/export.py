"""``Pipeline`` -> a diffusers-format folder (the inverse of the loaders).

    save_diffusers(pipe, "out/")      # model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/

Each folder is one that a diffusers pipeline class loads and runs with the same
outputs, and that ``ldm_jax.load_pipeline`` reads back to the same parameters:

* text-conditioned (SD 1.x / 2.x): ``StableDiffusionPipeline``; 9-channel
  inpainting U-Nets: ``StableDiffusionInpaintPipeline`` (unet/, vae/,
  text_encoder/, tokenizer/, scheduler/);
* the CompVis LDM text-to-image model (an ``LDMBertModel`` text encoder):
  ``LDMTextToImagePipeline`` (unet/, vqvae/, bert/, tokenizer/, scheduler/);
* unconditional LDMs (VQ or KL first stage): ``LDMPipeline`` (unet/, vqvae/,
  scheduler/; diffusers calls the autoencoder "vqvae" whatever its class);
* super-resolution LDMs (the low-res image concatenated to the latents, scale
  factor 1, CompVis bsr_sr): ``LDMSuperResolutionPipeline`` (same layout);
* noise-augmented upscalers (the SD 2 x4 upscaler, scale factor 0.08333):
  ``StableDiffusionUpscalePipeline`` (as SD, plus low_res_scheduler/ and
  ``max_noise_level`` in model_index.json).

Class-conditional LDMs (a ``ClassEmbedder``, or any U-Net class embedding
outside the x4 upscaler: no other diffusers pipeline passes class labels) and
other concat conditioning have no diffusers pipeline and are refused with a
ValueError before anything is written (``save_unet`` / ``save_vae`` still
write the components). So are scheduler options that diffusers'
``StableDiffusionPipeline`` / ``StableDiffusionInpaintPipeline`` overwrite when
they load a folder (steps_offset other than 1 with "leading" spacing,
clip_sample), and U-Net layouts neither ``UNet2DConditionModel`` nor
``UNet2DModel`` builds (the ValueError names the field).

The folder is written next to its destination first and moved into place,
model_index.json last; see ``save_diffusers`` for which destinations are
accepted.

Parameter names are the inverse of ``mapping.convert_state_dict``: a Flax
module name ``name_N`` is the PyTorch ``name.N`` (a list index folded into
the name) except for the module names that really end in ``_N`` in the
diffusers classes (``TimestepEmbedding.linear_1/linear_2``), listed per model
below; kernels go back to OIHW / (out, in). Every written state dict is mapped
back onto the model's parameter tree before the files are written, so a name
this inverse got wrong is an error here, not a silently different model.

Weights are written by a small safetensors writer (no torch needed), with the
``{"format": "pt"}`` metadata transformers checks for.

``save_unet`` / ``save_vae`` / ``save_text_encoder`` write one component folder (config.json and one
safetensors file). Into a folder of an earlier save they replace it: every weight file a loader could
pick instead (other variants, shards and indexes, .bin; see ``_write_component``) is removed, other
files stay. A VQ quantizer that diffusers' VQModel cannot hold (beta other than 0.25, legacy=False) is
written with a warning: encode / decode are identical, only the training loss differs.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import uuid
import warnings
from typing import Any, Dict, FrozenSet, Mapping, Optional

import jax
import ml_dtypes
import numpy as np
from flax import traverse_util

from ldm_jax.convert.mapping import convert_state_dict
from ldm_jax.convert.weights_io import DIFFUSERS_WEIGHT_STEM, weight_files
from ldm_jax.models.clip import CLIPTextConfig, CLIPTextModel
from ldm_jax.models.unet import UNetConfig, attention_levels

# Flax module names that are real diffusers/transformers names ending in "_<digits>"
# (every other "name_N" is the PyTorch list entry name.N).
UNET_LITERAL_NAMES: FrozenSet[str] = frozenset({"linear_1", "linear_2"})  # TimestepEmbedding
VAE_LITERAL_NAMES: FrozenSet[str] = frozenset()
CLIP_LITERAL_NAMES: FrozenSet[str] = frozenset()

_FOLDED = re.compile(r"^(.+)_(\d+)$")
_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
                       np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float64): "F64",
                       np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}
DIFFUSERS_VERSION = "0.42.1"  # the version the written configs follow


# ----------------------------------------------------------------------------- names and files


def torch_name(path, literal_names: FrozenSet[str] = frozenset()) -> str:
    """The PyTorch name of one Flax parameter path: ``("down_blocks_0", "resnets_1", "conv1",
    "kernel")`` -> ``down_blocks.0.resnets.1.conv1.weight``."""
    *modules, leaf = path
    names = []
    for part in modules:
        m = _FOLDED.match(part)
        names.append(part if (m is None or part in literal_names) else f"{m.group(1)}.{m.group(2)}")
    return ".".join(names + ["weight" if leaf in ("kernel", "scale", "embedding") else leaf])


def flax_to_torch_state_dict(params, literal_names: FrozenSet[str] = frozenset(),
                             prefix: str = "") -> Dict[str, np.ndarray]:
    """Flax parameter tree -> PyTorch-named numpy state dict (inverse of ``convert_state_dict``)."""
    out: Dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(_unfreeze(params)).items():
        value = np.asarray(jax.device_get(value))
        if path[-1] == "kernel":
            if value.ndim == 4:  # conv HWIO -> OIHW
                value = np.transpose(value, (3, 2, 0, 1))
            elif value.ndim == 2:  # linear (in, out) -> (out, in)
                value = value.T
        key = prefix + torch_name(path, literal_names)
        if key in out:
            raise ValueError(f"two parameters map to the PyTorch name {key!r}")
        out[key] = np.ascontiguousarray(value)
    return out


def _unfreeze(tree):
    return tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)


def _check_inverse(state_dict: Mapping[str, np.ndarray], params, source: str, prefix: str = "") -> None:
    """The written names must map back onto exactly ``params``."""
    back = convert_state_dict(state_dict, params, source=source,
                              rename=(lambda k: k[len(prefix):]) if prefix else None)
    flat_back = traverse_util.flatten_dict(back)
    for path, value in traverse_util.flatten_dict(_unfreeze(params)).items():
        if not np.array_equal(np.asarray(flat_back[path]), np.asarray(jax.device_get(value))):
            raise AssertionError(f"{source}: {'/'.join(path)} does not survive the name round trip")


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[Dict[str, str]] = None) -> str:
    """A .safetensors file: u64 header size, JSON header (padded to 8 bytes), raw little-endian data."""
    header: Dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.ascontiguousarray(tensors[key])
        dtype = _SAFETENSORS_DTYPES.get(arr.dtype)
        if dtype is None:
            raise ValueError(f"write_safetensors: {key!r} has unsupported dtype {arr.dtype}")
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        header[key] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    # Written next to the target and renamed over it: a reader that has the old file memory-mapped
    # (read_safetensors) keeps the old contents instead of seeing them change or crashing (SIGBUS).
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for arr in arrays:
                f.write(arr.tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _json_value(value):
    """numpy / jax scalars and arrays (e.g. a schedule's trained_betas) as JSON numbers and lists;
    anything else is a TypeError naming the value, raised before the file is opened."""
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    raise TypeError(f"{type(value).__name__} {value!r} cannot be written as JSON")


def _write_json(path: str, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=_json_value)
    # Renamed over the target as write_safetensors does: a config.json that is a link (a Hugging Face
    # cache snapshot links every file to a shared blob) is replaced, not written through into the blob.
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _collapse(values):
    values = list(values)
    return values[0] if all(v == values[0] for v in values) else values


# ----------------------------------------------------------------------------- configs (inverse of *_from_diffusers)


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int) -> Dict[str, Any]:
    """``UNetConfig`` -> diffusers ``UNet2DConditionModel`` or ``UNet2DModel`` config.json dict
    (the inverse of ``unet_config_from_diffusers``), or a ValueError naming the field that
    neither class can express."""
    n = len(cfg.block_out_channels)
    self_levels, cross_levels = attention_levels(cfg, "self"), attention_levels(cfg, "cross")
    self_blocks = any(t.startswith("Attn") for t in cfg.down_block_types + cfg.up_block_types)
    if cfg.uses_cross_attention and self_blocks:
        # UNet2DConditionModel's attention_head_dim is heads per block, UNet2DModel has no context:
        # unet_config_from_diffusers refuses Attn*Block2D in a UNet2DConditionModel too.
        raise ValueError("save_diffusers: the U-Net mixes cross-attention and self-attention (Attn*Block2D) blocks; "
                         "diffusers' UNet2DConditionModel takes Cross* blocks only and UNet2DModel has no context")
    # Cross-attention decides first: head_dim (CompVis num_head_channels) with a context is a
    # UNet2DConditionModel (its attention_head_dim = heads per block), not a UNet2DModel, which has
    # no cross-attention blocks. Without a context, self-attention blocks, head_dim or a one-layer
    # UNetMidBlock2D (UNet2DConditionModel builds its UNetMidBlock2D with num_layers=0) mean UNet2DModel.
    model_2d = not cfg.uses_cross_attention and (self_blocks or cfg.head_dim is not None or (
        cfg.mid_block_type in ("UNetMidBlock2D", None) and cfg.mid_block_num_layers == 1))
    common = {
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": int(sample_size), "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": list(cfg.down_block_types), "up_block_types": list(cfg.up_block_types),
        "mid_block_type": cfg.mid_block_type,
        "layers_per_block": _collapse(cfg.per_block("layers_per_block")),
        "norm_num_groups": cfg.norm_num_groups, "norm_eps": cfg.norm_eps,
        "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift,
        "time_embedding_dim": cfg.time_embedding_dim, "num_class_embeds": cfg.num_class_embeds,
        "class_embed_type": cfg.class_embed_type, "center_input_sample": cfg.center_input_sample,
        "downsample_padding": cfg.downsample_padding, "mid_block_scale_factor": cfg.mid_block_scale_factor,
        "dropout": cfg.dropout, "act_fn": "silu", "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional",
    }
    if model_2d:
        # UNet2DModel has no per-block layer counts, conv kernel sizes, time-embedding activation,
        # class-embedding concatenation or mid-block depth: refuse rather than drop them.
        unsupported = {"mid_block_num_layers": (cfg.mid_block_num_layers, 1),
                       "time_embedding_act_fn": (cfg.time_embedding_act_fn, None),
                       "class_embeddings_concat": (cfg.class_embeddings_concat, False),
                       "conv_in_kernel": (cfg.conv_in_kernel, 3), "conv_out_kernel": (cfg.conv_out_kernel, 3)}
        for key, (value, allowed) in unsupported.items():
            if value != allowed and not (key == "mid_block_num_layers" and cfg.mid_block_type is None):
                raise ValueError(f"save_diffusers: {key}={value!r} in a U-Net without cross-attention; diffusers' "
                                 f"UNet2DModel only has {key}={allowed!r}")
        if isinstance(common["layers_per_block"], list):
            raise ValueError(f"save_diffusers: layers_per_block={common['layers_per_block']} in a U-Net without "
                             "cross-attention; diffusers' UNet2DModel takes one int")
        # Only the levels with self-attention use a head size (UNet2DModel: attention_head_dim is
        # the channels per head of every Attn block and of the mid block's attention).
        dims = {i: cfg.dim_head(i) for i in self_levels}
        if all(cfg.heads(i) == 1 and dims[i] == cfg.block_out_channels[i] for i in self_levels):
            # one head of full width at every level, whatever the widths: diffusers' attention_head_dim
            # None (checked first: these levels' channels per head differ whenever their widths do)
            head_dim = None
        elif not dims:  # no self-attention: unused, kept so that the config reads back the same
            head_dim = _collapse(cfg.per_block("head_dim")) if cfg.head_dim is not None else None
            head_dim = head_dim if isinstance(head_dim, int) else None
        else:
            head_dim = _collapse(dims.values())
            if isinstance(head_dim, list):
                raise ValueError(f"save_diffusers: channels per head differ between the self-attention levels "
                                 f"({dims}); diffusers' UNet2DModel takes one attention_head_dim")
            for i in self_levels:  # diffusers' Attention: channels // attention_head_dim heads of that width
                c = cfg.block_out_channels[i]
                if c // head_dim != cfg.heads(i):
                    raise ValueError(f"save_diffusers: level {i} has {cfg.heads(i)} heads of {head_dim} channels; "
                                     f"diffusers' UNet2DModel would build {c // head_dim} heads of {head_dim} from "
                                     f"its {c}")
        return {"_class_name": "UNet2DModel", **common, "attention_head_dim": head_dim,
                "add_attention": bool(cfg.mid_block_attention), "attn_norm_num_groups": cfg.attn_norm_num_groups,
                "downsample_type": "conv", "upsample_type": "conv"}
    if self_levels:  # a UNetMidBlock2D with attention: UNet2DConditionModel builds it without (add_attention=False)
        raise ValueError(f"save_diffusers: mid_block_type={cfg.mid_block_type!r} with mid_block_attention in a U-Net "
                         "with cross-attention has no diffusers UNet2DConditionModel equivalent")
    expected_mid = 1 if cfg.mid_block_type == "UNetMidBlock2DCrossAttn" else 0
    if cfg.mid_block_num_layers != expected_mid and cfg.mid_block_type is not None:
        raise ValueError(f"save_diffusers: mid_block_num_layers={cfg.mid_block_num_layers} with "
                         f"{cfg.mid_block_type} has no diffusers UNet2DConditionModel equivalent "
                         f"(it builds {expected_mid})")
    for i in cross_levels:  # diffusers' Transformer2DModel: heads of channels // heads each
        c, heads = cfg.block_out_channels[i], cfg.heads(i)
        if cfg.dim_head(i) != c // heads:
            raise ValueError(f"save_diffusers: level {i} has {heads} heads of {cfg.dim_head(i)} channels (head_dim "
                             f"{cfg.per_block('head_dim')[i]} does not divide its {c}); diffusers' "
                             f"UNet2DConditionModel takes heads only and would build heads of {c // heads}")
    tl = cfg.transformer_layers_per_block
    out = {"_class_name": "UNet2DConditionModel", **common,
           "attention_head_dim": _collapse([cfg.heads(i) for i in range(n)]),  # heads (diffusers' misnomer)
           "transformer_layers_per_block": list(tl) if isinstance(tl, tuple) else tl,
           "reverse_transformer_layers_per_block": cfg.reverse_transformer_layers_per_block,
           "only_cross_attention": (list(cfg.only_cross_attention) if isinstance(cfg.only_cross_attention, tuple)
                                    else cfg.only_cross_attention),
           "use_linear_projection": cfg.use_linear_projection, "upcast_attention": cfg.upcast_attention,
           "time_embedding_act_fn": cfg.time_embedding_act_fn,
           "class_embeddings_concat": cfg.class_embeddings_concat,
           "conv_in_kernel": cfg.conv_in_kernel, "conv_out_kernel": cfg.conv_out_kernel}
    if cross_levels:
        # The one width all cross-attention blocks read (UNetConfig.context_width): per-block entries
        # of blocks without cross-attention are unused in diffusers too, and load_unet collapses them.
        out["cross_attention_dim"] = cfg.context_width
    return out


def vae_config_to_diffusers(cfg, sample_size: int) -> Dict[str, Any]:
    """``AutoencoderConfig`` -> diffusers ``AutoencoderKL`` / ``VQModel`` config.json dict
    (the inverse of ``vae_config_from_diffusers``)."""
    n = len(cfg.block_out_channels)
    attn = [i in cfg.attention_levels for i in range(n)]  # per level, 0 = full resolution
    common = {
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu", "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_num_groups,
        "sample_size": int(sample_size), "scaling_factor": cfg.scaling_factor,
        "mid_block_add_attention": cfg.mid_block_attention,
    }
    if cfg.kind == "kl":
        return {"_class_name": "AutoencoderKL", **common, "shift_factor": cfg.shift_factor,
                "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
                "force_upcast": True}
    return {"_class_name": "VQModel", **common, "num_vq_embeddings": cfg.num_vq_embeddings,
            "vq_embed_dim": cfg.vq_embed_dim, "norm_type": "group", "lookup_from_codebook": False,
            "force_upcast": False}


def clip_config_to_transformers(cfg: CLIPTextConfig, pad_token_id: int) -> Dict[str, Any]:
    """``CLIPTextConfig`` -> transformers ``CLIPTextConfig`` dict. A "penultimate" encoder is
    written as diffusers does for SD 2.x: without its last block, read at the last layer."""
    layers = cfg.context_layer
    if cfg.eos_token_id == 2:
        # transformers' CLIPTextTransformer pools at argmax(ids) when eos_token_id is 2 (the legacy
        # configs of SD 1.x/2.x), never at the first id 2, so no config.json gives this pooled output
        raise ValueError("save_text_encoder: CLIPTextConfig.eos_token_id=2 (pooling at the first id 2) cannot be "
                         "written: transformers reads eos_token_id 2 as the legacy argmax(ids) pooling")
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "projection_dim": cfg.hidden_size,
        "num_hidden_layers": layers, "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": cfg.hidden_act,
        "layer_norm_eps": cfg.layer_norm_eps, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_factor": 1.0, "initializer_range": 0.02,
        # transformers pools at the first eos_token_id (unless it is the legacy 2); the highest id
        # gives ldm_jax's argmax(ids) position (CLIPTextConfig.eos_token_id None)
        "bos_token_id": 49406,
        "eos_token_id": cfg.vocab_size - 1 if cfg.eos_token_id is None else int(cfg.eos_token_id),
        "pad_token_id": int(pad_token_id),
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------- components


# The weight-file stems each kind of component folder is read under (by diffusers / transformers and by
# ldm_jax's loaders: unet_diffusers / vae_diffusers / clip_transformers.load_*).
DIFFUSERS_STEMS = (DIFFUSERS_WEIGHT_STEM,)
TRANSFORMERS_STEMS = ("model", "pytorch_model")


def _write_component(folder: str, config: Mapping[str, Any], weights_name: str, state_dict, stems) -> str:
    """config.json and the one weight file of a component folder, replacing an earlier save there.

    Every other weight file of ``stems`` goes first (``weights_io.weight_files``: other variants, shards
    and their indexes, .bin). diffusers' / transformers' save_pretrained remove only the shards of the
    name they write and leave an index, other variants and .bin files behind; diffusers then loads a
    stale sharded index before the new single file (and a loader given variant= or use_safetensors=False
    the stale copy), although the new config.json describes only the new weights. Other files (README,
    other stems, sub-folders) are left alone.

    As save_diffusers does with model_index.json, the old config.json goes first and the new one comes
    last: a save that fails half way leaves a folder that no loader takes (both need config.json),
    never a new config.json over old weights or the reverse."""
    os.makedirs(folder, exist_ok=True)
    config_path = os.path.join(folder, "config.json")
    if os.path.lexists(config_path) and not os.path.isdir(config_path):
        os.remove(config_path)
    for name in weight_files(folder, stems):
        if name != weights_name:  # replaced (atomically) by write_safetensors below
            os.remove(os.path.join(folder, name))
    path = write_safetensors(os.path.join(folder, weights_name), state_dict)
    _write_json(config_path, config)
    return path


def save_unet(unet, params, folder: str, sample_size: int) -> str:
    """diffusers ``UNet2DConditionModel`` / ``UNet2DModel`` folder (config.json and
    diffusion_pytorch_model.safetensors, replacing any earlier weight files: ``_write_component``)."""
    name = DIFFUSERS_WEIGHT_STEM + ".safetensors"
    sd = flax_to_torch_state_dict(params, UNET_LITERAL_NAMES)
    _check_inverse(sd, params, source=os.path.join(folder, name))
    config = unet_config_to_diffusers(unet.config, sample_size)  # refusals before anything is written
    return _write_component(folder, config, name, sd, DIFFUSERS_STEMS)


# diffusers' VQModel builds VectorQuantizer(..., beta=0.25, remap=None, sane_index_shape=False) with its
# default legacy=True (models/autoencoders/vq_model.py): neither is a config field, so a VQ model with other
# values is written with the same weights, encoder and decoder, and only its codebook loss changes.
DIFFUSERS_VQ_QUANTIZER = {"beta": 0.25, "legacy": True}


def _warn_vq_quantizer(cfg) -> None:
    """A warning for each VQ quantizer field diffusers' VQModel cannot hold (``DIFFUSERS_VQ_QUANTIZER``).

    A warning, not a refusal: encode / decode (what LDMPipeline and load_pipeline run) are identical;
    only training differs, through the loss diffusers returns as ``commit_loss`` (ldm_jax:
    ``VQEncoding.loss``), which the folder reads back with beta 0.25 and legacy=True in both libraries."""
    if cfg.kind != "vq":
        return
    ref_beta = DIFFUSERS_VQ_QUANTIZER["beta"]
    if float(cfg.beta) != ref_beta:
        # both loss forms are beta * mse + mse in value: (1 + beta) * mean((z_q - z)^2)
        warnings.warn(f"save_vae: AutoencoderConfig.beta={cfg.beta} is not written: diffusers' VQModel fixes the "
                      f"quantizer's beta at {ref_beta}, so the exported folder encodes and decodes identically but "
                      f"its commitment loss (VQModel commit_loss, ldm_jax VQEncoding.loss after loading) is "
                      f"(1 + {ref_beta}) * mse instead of (1 + {cfg.beta}) * mse, with other gradients",
                      UserWarning, stacklevel=3)
    if bool(cfg.legacy) != DIFFUSERS_VQ_QUANTIZER["legacy"]:
        warnings.warn(f"save_vae: AutoencoderConfig.legacy={cfg.legacy} is not written: diffusers' VQModel always "
                      "uses the legacy quantizer loss (beta on the codebook term), so the exported folder encodes "
                      "and decodes identically and its commitment loss has the same value, but its gradients weight "
                      "the codebook and commitment terms the other way", UserWarning, stacklevel=3)


def save_vae(vae, params, folder: str, sample_size: int) -> str:
    """diffusers ``AutoencoderKL`` / ``VQModel`` folder (as ``save_unet``). A VQ quantizer beta / legacy
    diffusers cannot hold is a warning (``_warn_vq_quantizer``)."""
    name = DIFFUSERS_WEIGHT_STEM + ".safetensors"
    sd = flax_to_torch_state_dict(params, VAE_LITERAL_NAMES)
    _check_inverse(sd, params, source=os.path.join(folder, name))
    config = vae_config_to_diffusers(vae.config, sample_size)
    _warn_vq_quantizer(vae.config)
    return _write_component(folder, config, name, sd, DIFFUSERS_STEMS)


def save_text_encoder(text_encoder: CLIPTextModel, params, folder: str, pad_token_id: int) -> str:
    """transformers ``CLIPTextModel`` folder (config.json and model.safetensors, replacing any earlier
    weight files: ``_write_component``); a penultimate-layer encoder loses its unused last block."""
    cfg = text_encoder.config
    params = _unfreeze(params)
    if cfg.context_layer != cfg.num_layers:
        encoder = dict(_unfreeze(params["encoder"]))
        encoder.pop(f"layers_{cfg.num_layers - 1}")
        params = {**params, "encoder": encoder}
        cfg = CLIPTextConfig(**{**cfg.__dict__, "num_layers": cfg.context_layer, "output_layer": "last"})
    sd = flax_to_torch_state_dict(params, CLIP_LITERAL_NAMES, prefix="text_model.")
    _check_inverse(sd, params, source=os.path.join(folder, "model.safetensors"), prefix="text_model.")
    config = clip_config_to_transformers(cfg, pad_token_id)
    return _write_component(folder, config, "model.safetensors", sd, TRANSFORMERS_STEMS)


def save_tokenizer(tokenizer, folder: str) -> str:
    """transformers ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs) of an ldm_jax CLIPTokenizer."""
    from ldm_jax.text.tokenizer import EOT_TOKEN, SOT_TOKEN

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer.encoder, f, ensure_ascii=False)
    merges = sorted(tokenizer.bpe_ranks.items(), key=lambda item: item[1])
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n")
    pad = tokenizer.decoder[tokenizer.pad_token_id]
    special = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": pad}
    _write_json(os.path.join(folder, "special_tokens_map.json"), special)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.max_length,
              "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special}
    if tokenizer.added_tokens:  # textual-inversion tokens, SD2's "!": as transformers 5 saves them
        config["added_tokens_decoder"] = {
            str(t.id): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                        "single_word": t.single_word, "special": t.special}
            for t in sorted(tokenizer.added_tokens, key=lambda t: t.id)}
    _write_json(os.path.join(folder, "tokenizer_config.json"), config)
    return folder


def diffusers_pipeline_class(pipe) -> str:
    """The diffusers pipeline class that runs ``pipe`` as this project does, or a ValueError
    saying why there is none (before anything is written)."""
    from ldm_jax.models.class_embedder import ClassEmbedder

    what = pipe.source or "this pipeline"
    extra = int(pipe.unet.config.in_channels) - int(pipe.vae.config.embed_dim)
    unet_cfg = pipe.unet.config
    class_embedding = unet_cfg.num_class_embeds is not None or unet_cfg.class_embed_type is not None
    if isinstance(pipe.text_encoder, ClassEmbedder) or (pipe.text_encoder is None and class_embedding):
        raise ValueError(f"save_diffusers: {what} is a class-conditional LDM; diffusers has no pipeline for "
                         "class-conditional latent diffusion (LDMPipeline is unconditional, DiTPipeline is another "
                         "architecture), so no loadable folder can be written. The U-Net and autoencoder alone can "
                         "be written with ldm_jax.convert.export.save_unet / save_vae")
    if pipe.text_encoder is not None:
        from ldm_jax.models.ldm_bert import LDMBertModel

        if isinstance(pipe.text_encoder, LDMBertModel):
            # LDMTextToImagePipeline takes latents only, sizes them height // 8 and tokenizes to 77.
            if extra != 0 or getattr(pipe, "is_upscaler", False) or class_embedding:
                raise ValueError(f"save_diffusers: {what} has an LDMBert text encoder and {extra} concatenated "
                                 f"channels{' and a U-Net class embedding' if class_embedding else ''}; diffusers' "
                                 "LDMTextToImagePipeline takes the latents and the text context only")
            if pipe.vae_scale_factor != 8 or pipe.text_encoder.config.max_position_embeddings != 77:
                raise ValueError(f"save_diffusers: {what} has autoencoder factor {pipe.vae_scale_factor} and "
                                 f"{pipe.text_encoder.config.max_position_embeddings} text positions; diffusers' "
                                 "LDMTextToImagePipeline hard-codes latents of height // 8 and 77 tokens")
            return "LDMTextToImagePipeline"
        if not isinstance(pipe.text_encoder, CLIPTextModel):
            raise ValueError(f"save_diffusers: unsupported text encoder {type(pipe.text_encoder).__name__}")
        if getattr(pipe, "is_upscaler", False):
            # diffusers resets any other VAE scaling factor to the released x4 upscaler's 0.08333
            if extra != 3 or float(pipe.vae.config.scaling_factor) != 0.08333:
                raise ValueError(f"save_diffusers: {what} is a noise-augmented upscaler with {extra} image channels "
                                 f"and scale_factor {pipe.vae.config.scaling_factor}; diffusers' "
                                 "StableDiffusionUpscalePipeline takes 3 (RGB) and 0.08333 only")
            return "StableDiffusionUpscalePipeline"
        if class_embedding:
            # StableDiffusion(Inpaint)Pipeline call the U-Net without class_labels (diffusers then fails
            # "class_labels should be provided when doing class conditioning")
            raise ValueError(f"save_diffusers: {what} has a U-Net class embedding (num_class_embeds="
                             f"{unet_cfg.num_class_embeds}, class_embed_type={unet_cfg.class_embed_type!r}) next to "
                             "the text context; diffusers' StableDiffusionPipeline passes no class labels (only "
                             "the x4 upscaler's noise level, StableDiffusionUpscalePipeline)")
        if extra == 0:
            return "StableDiffusionPipeline"
        if extra == pipe.vae.config.embed_dim + 1:
            return "StableDiffusionInpaintPipeline"
        raise ValueError(f"save_diffusers: {what} concatenates {extra} channels to the latents next to the text "
                         "context; diffusers has a pipeline only for the 9-channel inpainting layout")
    if extra == 0:
        return "LDMPipeline"
    # diffusers' LDMSuperResolutionPipeline: latents + the [-1, 1] low-res image (as many
    # channels as the latents), decoded without a scale factor.
    if getattr(pipe, "cond_stage", "") != "identity" or extra != pipe.vae.config.embed_dim:
        raise ValueError(f"save_diffusers: {what} is concat-conditioned (cond stage {pipe.cond_stage or 'unknown'!r}, "
                         f"{extra} extra channels); diffusers has a pipeline only for super-resolution (the low-res "
                         "image as the cond stage, as many channels as the latents)")
    if float(pipe.vae.config.scaling_factor) != 1.0:
        raise ValueError(f"save_diffusers: {what} has scale_factor {pipe.vae.config.scaling_factor}; diffusers' "
                         "LDMSuperResolutionPipeline decodes the latents without one (1.0 only)")
    return "LDMSuperResolutionPipeline"


# diffusers' StableDiffusionPipeline / StableDiffusionInpaintPipeline.__init__ rewrite the scheduler config
# they are given ("outdated" configs): steps_offset -> 1 (both) and clip_sample -> False
# (StableDiffusionPipeline; it checks getattr(scheduler.config, "clip_sample", False), i.e. only scheduler
# classes with that argument). skip_prk_steps -> True (inpainting) changes nothing: "plms" forces it here.
_PIPELINE_SCHEDULER_PATCHES = {"StableDiffusionPipeline": ("steps_offset", "clip_sample"),
                               "StableDiffusionInpaintPipeline": ("steps_offset",)}


def _check_scheduler_kept(pipeline_class: str, scheduler: Mapping[str, Any], what: str) -> None:
    """A ValueError where ``pipeline_class`` would run ``scheduler`` with other options than this
    project does (see _PIPELINE_SCHEDULER_PATCHES): the exported folder would sample differently."""
    from ldm_jax.diffusion.scheduler_config import SAMPLER_DEFAULTS

    patched = _PIPELINE_SCHEDULER_PATCHES.get(pipeline_class, ())
    defaults = next((d for cls, d in SAMPLER_DEFAULTS.values() if cls == scheduler.get("_class_name")), None)
    if defaults is None:
        return  # a scheduler class this project has no sampler for: nothing of ours to compare with
    spacing = scheduler.get("timestep_spacing", defaults.get("timestep_spacing", "leading"))
    # steps_offset only moves "leading" timesteps (set_timesteps of DDIM / PNDM / DDPM / Euler / DPM-Solver)
    if "steps_offset" in patched and spacing == "leading" and scheduler.get("steps_offset", 0) != 1:
        raise ValueError(f"save_diffusers: {what} samples with steps_offset={scheduler.get('steps_offset', 0)} and "
                         f"'leading' timestep spacing, but diffusers' {pipeline_class} resets steps_offset to 1 when "
                         "it loads the scheduler, so the exported folder would sample other timesteps; set "
                         "scheduler_config['steps_offset'] = 1 (or another timestep_spacing) first")
    if "clip_sample" in patched and "clip_sample" in defaults and scheduler.get("clip_sample", defaults["clip_sample"]):
        raise ValueError(f"save_diffusers: {what} clips the predicted sample ({scheduler['_class_name']} clip_sample "
                         f"{'true' if 'clip_sample' in scheduler else 'default true'}), but diffusers' "
                         f"{pipeline_class} resets clip_sample to False when it loads the scheduler; set "
                         "scheduler_config['clip_sample'] = False first")


def save_diffusers(pipe, folder: str) -> str:
    """Write ``pipe`` as a diffusers folder (see the module docstring); returns ``folder``.

    Raises ValueError, before writing anything, for a pipeline diffusers has no class for
    (class-conditional LDMs, concat conditioning other than super-resolution).

    ``folder`` may be new, empty, or a diffusers folder (it has a model_index.json, e.g. an earlier
    export or the folder ``pipe`` was loaded from), whose components are then replaced; anything else
    (a file, a folder with other contents, an unwritable place) is an OSError naming it. Everything
    is first written into a staging folder next to ``folder`` and moved in at the end, model_index.json
    last: an export that fails leaves ``folder`` as it was, or (while replacing an earlier export)
    without a model_index.json, so neither diffusers nor ``load_pipeline`` takes a half-written
    folder for a complete one (both load any folder with a model_index.json)."""
    pipeline_class = diffusers_pipeline_class(pipe)
    _check_scheduler_kept(pipeline_class, _scheduler_json(pipe.scheduler_config, "DDIMScheduler"),
                          pipe.source or "this pipeline")
    old_index = _check_target(folder)
    stage = _make_stage(folder)
    try:
        written = _write_pipeline(pipe, stage, pipeline_class)
        _install(stage, folder, written, old_index)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return folder


def _check_target(folder: str) -> Optional[Dict[str, Any]]:
    """None for a new or empty ``folder``; the model_index.json of a diffusers folder to replace;
    else an OSError (FileExistsError) saying what is in the way."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise FileExistsError(errno.EEXIST, f"save_diffusers: {folder!r} exists and is not a folder", folder)
    if not os.path.isdir(folder) or not os.listdir(folder):
        return None
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise FileExistsError(errno.EEXIST, f"save_diffusers: {folder!r} is not empty and is not a diffusers "
                              "folder (no model_index.json); export into a new or empty folder, or over an earlier "
                              "export, so that no unrelated file is replaced", folder)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        index = None
    return index if isinstance(index, dict) else {}


def _make_stage(folder: str) -> str:
    """A new empty folder next to ``folder`` (same file system, so moving out of it is a rename)."""
    parent = os.path.dirname(os.path.abspath(folder))
    stage = os.path.join(parent, f".{os.path.basename(os.path.abspath(folder))}.export-{uuid.uuid4().hex[:12]}")
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(stage)  # umask-default permissions, as os.makedirs(folder) would give
    except OSError as e:
        # OSError(errno, ...) is the matching subclass (PermissionError, NotADirectoryError, ...)
        raise OSError(e.errno, f"save_diffusers: cannot write {folder!r} ({e.strerror or e})",
                      e.filename) from e
    return stage


def _install(stage: str, folder: str, written, old_index: Optional[Dict[str, Any]]) -> None:
    """Move the staged export into ``folder``, model_index.json last."""
    if not os.path.lexists(folder):
        os.rename(stage, folder)  # all at once
        return
    index_path = os.path.join(folder, "model_index.json")
    if old_index is not None:
        # Replacing a diffusers folder: its model_index.json goes first, so that until the new one is
        # in place the folder is not loadable at all (rather than new weights under an old index).
        os.remove(index_path)
    stale = [name for name, entry in (old_index or {}).items()
             if isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and name not in written
             and _is_component_dir(folder, name)]
    for name in written:
        if name == "model_index.json":
            continue
        target = os.path.join(folder, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)
        os.rename(os.path.join(stage, name), target)
    for name in stale:  # components of the old pipeline that this one does not have (e.g. vae/ -> vqvae/)
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
    os.rename(os.path.join(stage, "model_index.json"), index_path)


def _is_component_dir(folder: str, name: str) -> bool:
    """``name`` (a model_index.json key) is a plain sub-folder of ``folder``, not a path elsewhere."""
    path = os.path.join(folder, name)
    return (name == os.path.basename(name) and name not in ("", ".", "..") and os.path.isdir(path)
            and not os.path.islink(path))


def _scheduler_json(config: Mapping[str, Any], default_class: str) -> Dict[str, Any]:
    """scheduler_config.json contents: ``config`` with its class (``default_class`` where it names none)."""
    return {"_class_name": default_class, **dict(config), "_diffusers_version": DIFFUSERS_VERSION}


def _write_pipeline(pipe, folder: str, pipeline_class: str):
    """Write every file into the (new, empty) ``folder``; returns the names written at its top level."""
    # diffusers' LDM pipelines call the autoencoder "vqvae" (whatever its class)
    vae_name = "vae" if pipeline_class.startswith("StableDiffusion") else "vqvae"
    save_unet(pipe.unet, pipe.params["unet"], os.path.join(folder, "unet"), pipe.sample_size)
    save_vae(pipe.vae, pipe.params["vae"], os.path.join(folder, vae_name), pipe.default_size)
    scheduler = _scheduler_json(pipe.scheduler_config, "DDIMScheduler")
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler)
    vae_class = "AutoencoderKL" if pipe.vae.config.kind == "kl" else "VQModel"
    unet_class = unet_config_to_diffusers(pipe.unet.config, pipe.sample_size)["_class_name"]
    index: Dict[str, Any] = {"_class_name": pipeline_class, "_diffusers_version": DIFFUSERS_VERSION,
                             "unet": ["diffusers", unet_class], vae_name: ["diffusers", vae_class],
                             "scheduler": ["diffusers", scheduler["_class_name"]]}
    if pipeline_class == "LDMTextToImagePipeline":
        from ldm_jax.convert.ldm_bert_weights import save_ldm_bert

        save_ldm_bert(pipe.text_encoder, pipe.params["text_encoder"], os.path.join(folder, "bert"))
        pipe.tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
        index.update({"bert": ["latent_diffusion", "LDMBertModel"], "tokenizer": ["transformers", "BertTokenizer"]})
    elif pipe.text_encoder is not None:
        save_text_encoder(pipe.text_encoder, pipe.params["text_encoder"], os.path.join(folder, "text_encoder"),
                          pipe.tokenizer.pad_token_id)
        save_tokenizer(pipe.tokenizer, os.path.join(folder, "tokenizer"))
        index.update({"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                      "safety_checker": [None, None], "feature_extractor": [None, None]})
        if pipeline_class == "StableDiffusionUpscalePipeline":
            low_res = _scheduler_json(pipe.low_res_scheduler_config, "DDPMScheduler")
            os.makedirs(os.path.join(folder, "low_res_scheduler"), exist_ok=True)
            _write_json(os.path.join(folder, "low_res_scheduler", "scheduler_config.json"), low_res)
            index.update({"low_res_scheduler": ["diffusers", low_res["_class_name"]], "watermarker": [None, None],
                          "max_noise_level": int(pipe.max_noise_level)})
        else:
            index.update({"image_encoder": [None, None], "requires_safety_checker": False})
    _write_json(os.path.join(folder, "model_index.json"), index)
    return sorted(os.listdir(folder))


__all__ = ["save_diffusers", "diffusers_pipeline_class", "save_unet", "save_vae", "save_text_encoder", "save_tokenizer",
           "flax_to_torch_state_dict", "write_safetensors", "unet_config_to_diffusers",
           "vae_config_to_diffusers", "clip_config_to_transformers"]
