"""Original CompVis / Stability weight names -> diffusers / transformers names.

A single-file checkpoint holds every model under one prefix:

    model.diffusion_model.*    openaimodel UNetModel  -> diffusers U-Net names
    model_ema.*                the same, EMA copies, with the dots removed
    first_stage_model.*        ldm Encoder/Decoder    -> diffusers AutoencoderKL / VQModel names
                               (down.{i}.attn.{j} -> down_blocks.{i}.attentions.{j}, Attn*Block2D)
    cond_stage_model.*         text encoder / class embedding / SpatialRescaler channel_mapper
                               (see original_pipeline)

The U-Net renaming follows the block structure of the configuration (not a
scan of the keys): openaimodel numbers its blocks as one flat list,
``input_blocks.{k}`` = conv_in, then per level ``num_res_blocks`` x
(ResBlock [+ attention]) and a Downsample; ``output_blocks.{k}`` per level
``num_res_blocks + 1`` x (ResBlock [+ attention] [+ Upsample]). diffusers
groups them as ``down_blocks.{level}.resnets.{j}`` / ``.attentions.{j}`` /
``.downsamplers.0`` (and ``up_blocks`` in up-path order). Inside a ResBlock
``in_layers.0/2, emb_layers.1, out_layers.0/3, skip_connection`` are
``norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut``; a
SpatialTransformer has the diffusers names already. The older
``AttentionBlock`` fuses q/k/v into one 1x1 Conv1d whose output channels are
grouped per head ([q_h, k_h, v_h] for each head h, ``QKVAttentionLegacy``) or
per projection (``QKVAttention``): it is split into ``to_q/to_k/to_v``.

The functions return the weights keyed by their original names (a split
tensor gets a ``#q``/``#k``/``#v`` suffix) plus a ``rename`` for
``mapping.convert_state_dict``, so that every error names the original key.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.original_config import UNET_PREFIX, VAE_PREFIX

EMA_PREFIX = "model_ema."
_EMA_BUFFERS = ("model_ema.decay", "model_ema.num_updates")  # LitEma's own buffers, not weights
_TAG = "#"

Rename = Callable[[str], Optional[str]]

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


# ----------------------------------------------------------------------------- EMA


def ema_key(key: str) -> str:
    """``model.diffusion_model.input_blocks.0.0.weight`` -> ``model_ema.diffusion_modelinput_blocks00weight``
    (LitEma stores ``name.replace('.', '')`` of the DiffusionWrapper's parameters)."""
    return EMA_PREFIX + key[len("model."):].replace(".", "")


def select_unet_weights(state_dict: Mapping[str, np.ndarray], use_ema: bool, source: str,
                        expected: Optional[Iterable[str]] = None) -> Dict[str, np.ndarray]:
    """The U-Net weights keyed ``model.diffusion_model.*``: the trained ones, or with
    ``use_ema`` their EMA copies (an error when the file has none).

    ``expected``: the ``model.diffusion_model.*`` names the configured U-Net has. A file with only
    ``model_ema.*`` U-Net weights (the trained copy dropped) loads with ``use_ema`` by them, as the
    original does: LatentDiffusion(use_ema=True) loads it with strict=False and its ``ema_scope``
    copies ``model_ema`` into the model for sampling."""
    unet = {k: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    has_ema = any(k.startswith(EMA_PREFIX) and k not in _EMA_BUFFERS for k in state_dict)
    if not use_ema:
        if not unet and has_ema:
            raise CheckpointError(f"{source}: no {UNET_PREFIX}* weights, only their EMA copies ({EMA_PREFIX}*): "
                                  "load it with use_ema=True (and its YAML)")
        return unet
    if not has_ema:
        raise CheckpointError(f"{source}: use_ema=True but the checkpoint holds no EMA weights ({EMA_PREFIX}*); "
                              "it may be an EMA-only export whose model.diffusion_model.* already are the EMA "
                              "weights: load it with use_ema=False")
    names = sorted(unet)
    if not names and expected is not None:
        names = sorted(set(expected))
        by_ema: Dict[str, str] = {}
        for name in names:  # LitEma's dot removal could merge two names (input_blocks.1.1 / input_blocks.11)
            other = by_ema.setdefault(ema_key(name), name)
            if other != name:
                raise CheckpointError(f"{source}: {other!r} and {name!r} have the same EMA name {ema_key(name)!r}; "
                                      "the EMA-only file cannot be read")
        unused = sorted(k for k in state_dict if k.startswith(EMA_PREFIX) and k not in _EMA_BUFFERS
                        and k not in by_ema)
        if unused:  # EMA weights of another architecture: the configuration does not fit the file
            raise CheckpointError(f"{source}: {len(unused)} EMA weights are not weights of the configured U-Net, "
                                  f"e.g. {unused[:3]} (the configuration does not fit this checkpoint)")
    missing = [k for k in names if ema_key(k) not in state_dict]
    if missing:
        raise CheckpointError(f"{source}: use_ema=True but {len(missing)} U-Net weights have no EMA copy, "
                              f"e.g. {ema_key(missing[0])!r} for {missing[0]!r}")
    return {k: state_dict[ema_key(k)] for k in names}


# ----------------------------------------------------------------------------- U-Net


def _levels(unet_config: Mapping) -> Tuple[int, List[int], List[bool]]:
    """(levels, resnets per level, attention per level) of a diffusers U-Net config dict."""
    types = list(unet_config["down_block_types"])
    n = len(types)
    lpb = unet_config["layers_per_block"]
    num_res = list(lpb) if isinstance(lpb, (list, tuple)) else [int(lpb)] * n
    return n, num_res, [t != "DownBlock2D" for t in types]


def unet_block_table(unet_config: Mapping) -> Dict[str, Tuple[str, str]]:
    """openaimodel module prefix -> (diffusers prefix, kind), kind in
    {"plain", "resnet", "attention"}, from the block structure."""
    n, num_res, attn = _levels(unet_config)
    table = {
        "input_blocks.0.0": ("conv_in", "plain"),
        "time_embed.0": ("time_embedding.linear_1", "plain"),
        "time_embed.2": ("time_embedding.linear_2", "plain"),
        "label_emb": ("class_embedding", "plain"),
        "middle_block.0": ("mid_block.resnets.0", "resnet"),
        "middle_block.1": ("mid_block.attentions.0", "attention"),
        "middle_block.2": ("mid_block.resnets.1", "resnet"),
        "out.0": ("conv_norm_out", "plain"),
        "out.2": ("conv_out", "plain"),
    }
    k = 1
    for i in range(n):
        for j in range(num_res[i]):
            table[f"input_blocks.{k}.0"] = (f"down_blocks.{i}.resnets.{j}", "resnet")
            if attn[i]:
                table[f"input_blocks.{k}.1"] = (f"down_blocks.{i}.attentions.{j}", "attention")
            k += 1
        if i < n - 1:
            table[f"input_blocks.{k}.0.op"] = (f"down_blocks.{i}.downsamplers.0.conv", "plain")
            k += 1
    k = 0
    for u in range(n):  # up-path order: level n-1 first
        i = n - 1 - u
        for j in range(num_res[i] + 1):
            table[f"output_blocks.{k}.0"] = (f"up_blocks.{u}.resnets.{j}", "resnet")
            if attn[i]:
                table[f"output_blocks.{k}.1"] = (f"up_blocks.{u}.attentions.{j}", "attention")
            if i > 0 and j == num_res[i]:
                table[f"output_blocks.{k}.{2 if attn[i] else 1}.conv"] = (f"up_blocks.{u}.upsamplers.0.conv", "plain")
            k += 1
    return table


def _split_qkv(key: str, value: np.ndarray, heads: int, new_order: bool, source: str) -> Dict[str, np.ndarray]:
    """AttentionBlock ``qkv`` (3C, C[, 1]) weight or (3C,) bias -> q, k, v (C, C) / (C,)."""
    value = np.asarray(value)
    if value.ndim == 3:
        value = value[..., 0]
    rows = value.shape[0]
    if rows % (3 * heads):
        raise CheckpointError(f"{source}: weight {key!r} has shape {value.shape}; expected 3 x channels rows "
                              f"for {heads} heads (the configuration does not fit this checkpoint)")
    d = rows // (3 * heads)
    rest = value.shape[1:]
    if new_order:  # QKVAttention: chunk(3) first, then heads
        parts = value.reshape((3, heads * d) + rest)
    else:  # QKVAttentionLegacy: per head [q, k, v]
        parts = np.moveaxis(value.reshape((heads, 3, d) + rest), 1, 0).reshape((3, heads * d) + rest)
    return {f"{key}{_TAG}{name}": np.ascontiguousarray(parts[i]) for i, name in enumerate("qkv")}


def prepare_unet(unet_weights: Mapping[str, np.ndarray], unet_config: Mapping, *, qkv_new_order: bool = False,
                 source: str = "") -> Tuple[Dict[str, np.ndarray], Rename]:
    """(weights keyed by original names, rename) for ``convert_state_dict`` onto the
    U-Net of the diffusers config dict ``unet_config``."""
    table = unet_block_table(unet_config)
    n, _, _ = _levels(unet_config)
    spatial = unet_config.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel"
    channels = list(unet_config["block_out_channels"])
    head_dim = unet_config.get("attention_head_dim")
    head_dims = list(head_dim) if isinstance(head_dim, (list, tuple)) else [head_dim] * n

    def heads_of(block: str) -> int:  # AttentionBlock heads of an input/middle/output block
        if block.startswith("middle_block"):
            level = n - 1
        else:
            new = table[block][0]  # down_blocks.{i}... / up_blocks.{u}...
            idx = int(new.split(".")[1])
            level = idx if new.startswith("down_blocks") else n - 1 - idx
        d = head_dims[level]
        return 1 if d is None else channels[level] // int(d)

    out: Dict[str, np.ndarray] = {}
    for key, value in unet_weights.items():
        local = key[len(UNET_PREFIX):]
        if not spatial and re.search(r"\.1\.qkv\.(weight|bias)$", local):
            block = local.rsplit(".", 2)[0]
            if block in table and table[block][1] == "attention":
                out.update(_split_qkv(key, value, heads_of(block), qkv_new_order, source))
                continue
        value = np.asarray(value)
        if value.ndim == 3 and value.shape[-1] == 1:  # Conv1d 1x1 (AttentionBlock proj_out) -> linear
            value = value[..., 0]
        out[key] = value

    def rename(key: str) -> Optional[str]:
        key, _, tag = key.partition(_TAG)
        parts = key[len(UNET_PREFIX):].split(".")
        for size in (4, 3, 2, 1):
            found = table.get(".".join(parts[:size]))
            if found is None:
                continue
            new, kind = found
            rest = ".".join(parts[size:])
            if kind == "resnet":
                head, _, leaf = rest.rpartition(".")
                rest = f"{_RESNET.get(head, head)}.{leaf}"
            elif kind == "attention" and not spatial:  # AttentionBlock -> diffusers Attention
                head, _, leaf = rest.rpartition(".")
                head = {"norm": "group_norm", "qkv": f"to_{tag}", "proj_out": "to_out.0"}.get(head, head)
                rest = f"{head}.{leaf}"
            return f"{new}.{rest}" if rest else new
        return key  # reported as unexpected, under its original name

    return out, rename


# ----------------------------------------------------------------------------- autoencoder

_VAE_RULES = (
    (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.(.+)$"), "encoder.down_blocks.{0}.resnets.{1}.{2}"),
    (re.compile(r"^encoder\.down\.(\d+)\.downsample\.(.+)$"), "encoder.down_blocks.{0}.downsamplers.0.{1}"),
    (re.compile(r"^(encoder|decoder)\.mid\.block_1\.(.+)$"), "{0}.mid_block.resnets.0.{1}"),
    (re.compile(r"^(encoder|decoder)\.mid\.block_2\.(.+)$"), "{0}.mid_block.resnets.1.{1}"),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)$"),
     "{0}.mid_block.attentions.0.{1}.{2}"),
    (re.compile(r"^(encoder|decoder)\.norm_out\.(.+)$"), "{0}.conv_norm_out.{1}"),
)
_VAE_UP = (
    (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.(.+)$"), "decoder.up_blocks.{0}.resnets.{1}.{2}"),
    (re.compile(r"^decoder\.up\.(\d+)\.upsample\.(.+)$"), "decoder.up_blocks.{0}.upsamplers.0.{1}"),
)
# AttnBlocks inside the levels (ddconfig attn_resolutions): down.{i}.attn.{j} / up.{i}.attn.{j}
_VAE_LEVEL_ATTENTION = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.(norm|q|k|v|proj_out)\."
                                  r"(weight|bias)$")
_VAE_ATTENTION_CONV = re.compile(r"\.(mid\.attn_1|down\.\d+\.attn\.\d+|up\.\d+\.attn\.\d+)\."
                                 r"(q|k|v|proj_out)\.weight$")


def prepare_vae(vae_weights: Mapping[str, np.ndarray], num_levels: int) -> Tuple[Dict[str, np.ndarray], Rename]:
    """(weights keyed by original names, rename) for the first-stage model.

    ``decoder.up.{i}`` is stored in resolution order (up.0 = full resolution),
    diffusers' ``up_blocks`` in execution order: ``up_blocks.{n-1-i}``. The
    attention blocks' 1x1 convolutions (middle, and ``attn.{j}`` inside the
    levels) become linear weights.
    """
    out = {}
    for key, value in vae_weights.items():
        value = np.asarray(value)
        if _VAE_ATTENTION_CONV.search(key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[key] = value

    def rename(key: str) -> Optional[str]:
        local = key[len(VAE_PREFIX):]
        for pattern, template in _VAE_RULES:
            m = pattern.match(local)
            if m:
                groups = list(m.groups())
                if "attentions" in template:
                    groups[1] = _VAE_ATTENTION[groups[1]]
                return _resnet_shortcut(template.format(*groups))
        for pattern, template in _VAE_UP:
            m = pattern.match(local)
            if m:
                level = int(m.group(1))
                return _resnet_shortcut(template.format(num_levels - 1 - level, *m.groups()[1:]))
        m = _VAE_LEVEL_ATTENTION.match(local)
        if m:
            part, level, j, name, leaf = m.groups()
            if part == "encoder.down":
                return f"encoder.down_blocks.{level}.attentions.{j}.{_VAE_ATTENTION[name]}.{leaf}"
            return f"decoder.up_blocks.{num_levels - 1 - int(level)}.attentions.{j}.{_VAE_ATTENTION[name]}.{leaf}"
        return local  # conv_in / conv_out / quant_conv / post_quant_conv / quantize.embedding

    return out, rename


def _resnet_shortcut(key: str) -> str:
    return key.replace(".nin_shortcut.", ".conv_shortcut.")


# ----------------------------------------------------------------------------- diffusers -> original names
# (for error messages: which original key a configuration needs but the file lacks)

_RESNET_BACK = {v: k for k, v in _RESNET.items()}
_ATTENTION_BLOCK_BACK = {"group_norm": "norm", "to_q": "qkv", "to_k": "qkv", "to_v": "qkv", "to_out.0": "proj_out"}


def unet_original_name(unet_config: Mapping) -> Callable[[str], str]:
    """diffusers U-Net key -> the ``model.diffusion_model.*`` key it comes from
    (``to_q``/``to_k``/``to_v`` of an AttentionBlock all come from ``qkv``)."""
    back = {new: (old, kind) for old, (new, kind) in unet_block_table(unet_config).items()}
    spatial = unet_config.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel"

    def name(key: str) -> str:
        parts = key.split(".")
        for size in range(len(parts) - 1, 0, -1):
            found = back.get(".".join(parts[:size]))
            if found is None:
                continue
            old, kind = found
            head, leaf = ".".join(parts[size:-1]), parts[-1]
            if kind == "resnet":
                head = _RESNET_BACK.get(head, head)
            elif kind == "attention" and not spatial:
                head = _ATTENTION_BLOCK_BACK.get(head, head)
            return UNET_PREFIX + ".".join(p for p in (old, head, leaf) if p)
        return UNET_PREFIX + key

    return name


_VAE_BACK_RULES = (
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)$"), "encoder.down.{0}.block.{1}.{2}"),
    (re.compile(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)$"), "encoder.down.{0}.downsample.{1}"),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.0\.(.+)$"), "{0}.mid.block_1.{1}"),
    (re.compile(r"^(encoder|decoder)\.mid_block\.resnets\.1\.(.+)$"), "{0}.mid.block_2.{1}"),
    (re.compile(r"^(encoder|decoder)\.conv_norm_out\.(.+)$"), "{0}.norm_out.{1}"),
)


def vae_original_name(num_levels: int) -> Callable[[str], str]:
    """diffusers autoencoder key -> the ``first_stage_model.*`` key it comes from."""
    attention_back = {v: k for k, v in _VAE_ATTENTION.items()}

    def name(key: str) -> str:
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        m = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key)
        if m:
            return f"{VAE_PREFIX}{m.group(1)}.mid.attn_1.{attention_back.get(m.group(2), m.group(2))}.{m.group(3)}"
        m = re.match(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)\.(weight|bias)$",
                     key)
        if m:
            block = int(m.group(2))
            if m.group(1) == "encoder.down_blocks":
                old = f"encoder.down.{block}"
            else:  # up_blocks run from the lowest resolution
                old = f"decoder.up.{num_levels - 1 - block}"
            return f"{VAE_PREFIX}{old}.attn.{m.group(3)}.{attention_back.get(m.group(4), m.group(4))}.{m.group(5)}"
        m = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)$", key)
        if m:
            level = num_levels - 1 - int(m.group(1))
            inner = f"block.{m.group(3)}" if m.group(2) == "resnets" else "upsample"
            return f"{VAE_PREFIX}decoder.up.{level}.{inner}.{m.group(4)}"
        for pattern, template in _VAE_BACK_RULES:
            m = pattern.match(key)
            if m:
                return VAE_PREFIX + template.format(*m.groups())
        return VAE_PREFIX + key

    return name
