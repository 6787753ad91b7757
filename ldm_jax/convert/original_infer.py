"""Inferring an original LDM configuration from a checkpoint's keys and shapes.

``infer_original_config(state_dict, source)`` returns a YAML-shaped dict
(``{"model": {"params": ...}}``, the schema of ``v1-inference.yaml``) that
``original_config.spec_from_original_config`` translates like a real YAML.
What the weights cannot tell (head counts, eps vs v for SD 2.x, the schedule
without a ``betas`` buffer) is listed in ``original_config``'s docstring.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Dict, List, Mapping, Optional

import ml_dtypes
import numpy as np

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.original_config import (
    CLIP_PREFIXES, COND_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, ldm_betas,
)

_SD_SCALE_FACTOR = 0.18215


def _collapse(values: List):
    return values[0] if all(v == values[0] for v in values) else list(values)

def _sub(state_dict: Mapping[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _transformer_depth(unet: Mapping, block: str) -> int:
    pat = re.compile(rf"^{re.escape(block)}\.transformer_blocks\.(\d+)\.")
    return 1 + max((int(m.group(1)) for k in unet for m in [pat.match(k)] if m), default=-1)


def infer_unet_params(unet: Mapping[str, np.ndarray], source: str) -> Dict[str, Any]:
    """openaimodel ``UNetModel`` arguments from ``model.diffusion_model.*`` (prefix removed)."""
    def need(key):
        if key not in unet:
            raise CheckpointError(f"{source}: cannot infer the U-Net: no {UNET_PREFIX}{key}")
        return unet[key]

    conv_in = need("input_blocks.0.0.weight")
    mc, in_ch = int(conv_in.shape[0]), int(conv_in.shape[1])
    out_ch = int(need("out.2.weight").shape[0])
    # Options whose weights would otherwise be misread as another layout (openaimodel.UNetModel / ResBlock):
    # resblock_updown makes the up/downsamplers ResBlocks (output_blocks.{k}.{1|2}.in_layers.*, and an
    # input block that looks like one more resnet); use_scale_shift_norm doubles emb_layers' outputs.
    updown = sorted(k for k in unet if re.match(r"^output_blocks\.\d+\.[12]\.in_layers\.", k))
    if updown:
        raise CheckpointError(f"{source}: the U-Net up/downsamples with ResBlocks ({UNET_PREFIX}{updown[0]}: "
                              "unet_config resblock_updown=True), which is not supported (only conv up/downsampling)")
    emb, res_out = unet.get("input_blocks.1.0.emb_layers.1.weight"), unet.get("input_blocks.1.0.in_layers.2.weight")
    if emb is not None and res_out is not None and emb.shape[0] == 2 * res_out.shape[0]:
        raise CheckpointError(f"{source}: {UNET_PREFIX}input_blocks.1.0.emb_layers.1.weight has 2 x channels outputs "
                              "(unet_config use_scale_shift_norm=True), which is not supported")
    levels: List[List[int]] = [[]]  # input block indices of the resnets of each level
    level_channels: List[int] = []
    k = 1
    while True:
        if f"input_blocks.{k}.0.op.weight" in unet:
            levels.append([])
        elif f"input_blocks.{k}.0.in_layers.2.weight" in unet:
            ch = int(unet[f"input_blocks.{k}.0.in_layers.2.weight"].shape[0])
            if not levels[-1]:
                level_channels.append(ch)
            levels[-1].append(k)
        else:
            break
        k += 1
    if not levels[-1] or len(level_channels) != len(levels):
        raise CheckpointError(f"{source}: cannot infer the U-Net levels from the input_blocks keys")
    later = sorted({int(m.group(1)) for key in unet for m in [re.match(r"^input_blocks\.(\d+)\.", key)] if m
                    and int(m.group(1)) > k})
    if later:  # a block without weights in between: openaimodel's Downsample with conv_resample=False (avg pool)
        raise CheckpointError(f"{source}: {UNET_PREFIX}input_blocks.{k} has no weights but input_blocks.{later[0]} "
                              "follows: a parameter-free Downsample (unet_config conv_resample=False, average "
                              "pooling) is not supported")
    mult = []
    for ch in level_channels:
        if ch % mc:
            raise CheckpointError(f"{source}: level width {ch} is not a multiple of model_channels {mc}")
        mult.append(ch // mc)
    attn_levels, only_cross, depths = [], [], []
    spatial = "middle_block.1.proj_in.weight" in unet
    if not spatial and "middle_block.1.qkv.weight" not in unet:
        raise CheckpointError(f"{source}: cannot infer the U-Net: the middle block has no attention")
    context_dim = None
    for i, ks in enumerate(levels):
        with_attn = [any(key.startswith(f"input_blocks.{b}.1.") for key in unet) for b in ks]
        if any(with_attn) and not all(with_attn):
            raise CheckpointError(f"{source}: level {i} has attention on some blocks only (num_attention_blocks); "
                                  "not supported")
        if with_attn[0]:
            attn_levels.append(2 ** i)
            if spatial:
                block = f"input_blocks.{ks[0]}.1"
                depths.append(_transformer_depth(unet, block))
                context_dim = int(need(f"{block}.transformer_blocks.0.attn2.to_k.weight").shape[1])
                attn1_in = int(need(f"{block}.transformer_blocks.0.attn1.to_k.weight").shape[1])
                inner = int(need(f"{block}.proj_in.weight").shape[0])
                if inner != level_channels[i]:
                    # SpatialTransformer(ch, n_heads, d_head) with n_heads * d_head < ch: num_heads /
                    # num_head_channels (legacy=False) not dividing the level's channels
                    raise CheckpointError(f"{source}: {UNET_PREFIX}{block}.proj_in.weight projects the "
                                          f"{level_channels[i]} channels of level {i} to {inner} (unet_config "
                                          "num_heads / num_head_channels not dividing the channels); only "
                                          "attention over all channels is supported")
                only_cross.append(attn1_in != level_channels[i])
                continue
        depths.append(_transformer_depth(unet, "middle_block.1") if spatial else 1)
        only_cross.append(False)
    num_res = [len(ks) for ks in levels]
    # The up path must have attention where the down path has (num_attention_blocks can differ there: openaimodel
    # gives output block i of a level attention if i < num_attention_blocks[level], of num_res_blocks + 1).
    k = 0
    for i in reversed(range(len(levels))):
        for _ in range(num_res[i] + 1):
            if (f"output_blocks.{k}.1.norm.weight" in unet) != (2 ** i in attn_levels):
                raise CheckpointError(f"{source}: {UNET_PREFIX}output_blocks.{k} (level {i} of the up path) "
                                      f"{'has' if 2 ** i not in attn_levels else 'lacks'} attention unlike the "
                                      "level's input blocks (unet_config num_attention_blocks); not supported")
            k += 1
    params: Dict[str, Any] = {
        "image_size": 32, "in_channels": in_ch, "out_channels": out_ch, "model_channels": mc,
        "attention_resolutions": attn_levels, "num_res_blocks": _collapse(num_res), "channel_mult": mult,
        # legacy=True (UNetModel's default) only matters where num_head_channels does not divide a level's channels:
        # there it gives ch // num_head_channels heads over all channels, the only layout whose proj_in is ch -> ch
        "use_spatial_transformer": spatial, "legacy": True,
    }
    if spatial:
        context_dim = int(need("middle_block.1.transformer_blocks.0.attn2.to_k.weight").shape[1])
        mid_attn1 = int(need("middle_block.1.transformer_blocks.0.attn1.to_k.weight").shape[1])
        if mid_attn1 != level_channels[-1]:  # attn1 attends to the context: disable_middle_self_attn=True
            raise CheckpointError(f"{source}: {UNET_PREFIX}middle_block.1.transformer_blocks.0.attn1.to_k.weight "
                                  f"takes {mid_attn1} (context) channels, not the {level_channels[-1]} of the middle "
                                  "block (unet_config disable_middle_self_attn=True), which is not supported")
        mid_inner = int(need("middle_block.1.proj_in.weight").shape[0])
        if mid_inner != level_channels[-1]:  # as for the levels' proj_in above
            raise CheckpointError(f"{source}: {UNET_PREFIX}middle_block.1.proj_in.weight projects the "
                                  f"{level_channels[-1]} channels to {mid_inner} (unet_config num_heads / "
                                  "num_head_channels not dividing the channels); only attention over all channels "
                                  "is supported")
        linear = np.ndim(unet["middle_block.1.proj_in.weight"]) == 2
        params.update(context_dim=context_dim, use_linear_in_transformer=linear,
                      transformer_depth=_collapse(depths))
        if any(only_cross):
            params["disable_self_attentions"] = only_cross
        if linear:  # SD 2.x: 64 channels per head
            narrow = [c for i, c in enumerate(level_channels) if c < 64 and (2 ** i in attn_levels or
                                                                         i == len(level_channels) - 1)]  # or middle
            if narrow:
                raise CheckpointError(f"{source}: the attention head size cannot be inferred: the SD 2.x 64 "
                                      f"channels per head do not fit {narrow[0]}-channel attention blocks; pass the "
                                      "original YAML (num_heads / num_head_channels)")
            params["num_head_channels"] = 64
        else:  # SD 1.x: 8 heads
            params["num_heads"] = 8
    else:
        params["num_head_channels"] = 32  # LDM celeba/ffhq/lsun configs
    if "label_emb.weight" in unet:
        params["num_classes"] = int(unet["label_emb.weight"].shape[0])
    elif any(key.startswith("label_emb.") for key in unet):
        raise CheckpointError(f"{source}: U-Net label_emb {sorted(k for k in unet if k.startswith('label_emb.'))[:3]} "
                              "(a projection of continuous labels: unet_config num_classes 'continuous' / "
                              "'sequential' with adm_in_channels, as the unCLIP models) is not supported")
    return params


def infer_first_stage_config(vae: Mapping[str, np.ndarray], source: str) -> Dict[str, Any]:
    """``first_stage_config`` (target + params + ddconfig) from ``first_stage_model.*`` (prefix removed)."""
    def need(key):
        if key not in vae:
            raise CheckpointError(f"{source}: cannot infer the autoencoder: no {VAE_PREFIX}{key}")
        return vae[key]

    conv_in = need("encoder.conv_in.weight")
    ch = int(conv_in.shape[0])
    n = 1 + max(int(m.group(1)) for k in vae for m in [re.match(r"^encoder\.down\.(\d+)\.", k)] if m)
    mult = []
    for i in range(n):
        width = int(need(f"encoder.down.{i}.block.0.conv1.weight").shape[0])
        if width % ch:
            raise CheckpointError(f"{source}: encoder level width {width} is not a multiple of ch {ch}")
        mult.append(width // ch)
    num_res = 1 + max(int(m.group(1)) for k in vae for m in [re.match(r"^encoder\.down\.0\.block\.(\d+)\.", k)] if m)
    z = int(need("decoder.conv_in.weight").shape[1])
    enc_out = int(need("encoder.conv_out.weight").shape[0])
    # AttnBlocks inside the levels (down.{i}.attn.* / up.{i}.attn.*, both in resolution order): as the
    # feature-map sides attn_resolutions of a 256-pixel ddconfig, 256 // 2**level
    levels = {part: {int(m.group(1)) for k in vae for m in [re.match(rf"^{part}\.(\d+)\.attn\.", k)] if m}
              for part in ("encoder.down", "decoder.up")}
    if levels["encoder.down"] != levels["decoder.up"]:
        raise CheckpointError(
            f"{source}: the autoencoder has attention at encoder levels {sorted(levels['encoder.down'])} but decoder "
            f"levels {sorted(levels['decoder.up'])} ({VAE_PREFIX}encoder.down.*.attn / decoder.up.*.attn); only the "
            "same levels in both (ddconfig attn_resolutions) is supported")
    ddconfig = {
        "double_z": enc_out == 2 * z, "z_channels": z, "resolution": 256,
        "in_channels": int(conv_in.shape[1]), "out_ch": int(need("decoder.conv_out.weight").shape[0]),
        "ch": ch, "ch_mult": mult, "num_res_blocks": num_res,
        "attn_resolutions": [256 // 2 ** i for i in sorted(levels["encoder.down"])],
        "attn_type": "vanilla" if "encoder.mid.attn_1.q.weight" in vae else "none",
    }
    if "quantize.embedding.weight" in vae:
        codebook = vae["quantize.embedding.weight"]
        return {"target": "ldm.models.autoencoder.VQModelInterface",
                "params": {"embed_dim": int(codebook.shape[1]), "n_embed": int(codebook.shape[0]),
                           "ddconfig": ddconfig}}
    embed_dim = int(need("quant_conv.weight").shape[0]) // 2
    return {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"embed_dim": embed_dim, "ddconfig": ddconfig}}


def _text_width(state_dict: Mapping[str, np.ndarray], open_clip: bool) -> Optional[int]:
    """The width of the SD 1.x (transformers CLIP) or SD 2.x (open_clip) text tower in the file, or None."""
    keys = [OPEN_CLIP_PREFIX + "token_embedding.weight"] if open_clip else [
        p + "embeddings.token_embedding.weight" for p in CLIP_PREFIXES]
    found = [state_dict[k] for k in keys if k in state_dict and np.ndim(state_dict[k]) == 2]
    return int(np.shape(found[0])[1]) if found else None


def infer_cond_stage_config(state_dict: Mapping[str, np.ndarray], source: str, context_dim: Optional[int] = None):
    """``cond_stage_config`` from the ``cond_stage_model.*`` keys (``context_dim``: the U-Net's, which picks
    the text tower of a file holding both an SD 1.x and an SD 2.x one)."""
    clip, open_clip = _text_width(state_dict, False), _text_width(state_dict, True)
    if clip is not None and open_clip is not None:
        # A mix of SD 1.x and SD 2.x weights (bad merges): the original YAML names one cond stage and
        # load_state_dict(strict=False) ignores the other's keys; without a YAML only the U-Net's context
        # width can tell which one, when exactly one fits it.
        fits = [name for name, width in (("clip", clip), ("open_clip", open_clip)) if width == context_dim]
        if len(fits) != 1:
            raise CheckpointError(
                f"{source}: holds both an SD 1.x text encoder ({CLIP_PREFIXES[0]}*, width {clip}) and an SD 2.x one "
                f"({OPEN_CLIP_PREFIX}*, width {open_clip}) and the U-Net's context width {context_dim} does not tell "
                "which one it uses; pass the original YAML")
        if fits[0] == "clip":
            open_clip = None
        else:
            clip = None
    if clip is not None:
        return {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    if open_clip is not None:
        # Every released SD 2.x model uses the penultimate layer.
        return {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"layer": "penultimate"}}
    if COND_PREFIX + "embedding.weight" in state_dict:
        n_classes, dim = state_dict[COND_PREFIX + "embedding.weight"].shape
        return {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                "params": {"embed_dim": int(dim), "n_classes": int(n_classes)}}
    bert_tokens = state_dict.get(COND_PREFIX + "transformer.token_emb.weight")
    if bert_tokens is not None:
        # BERTEmbedder (LDM text-to-image): an x-transformers TransformerWrapper; its Encoder interleaves
        # attention and feed-forward blocks as attn_layers.layers.{2i} / {2i+1}.
        blocks = {int(m.group(1)) for k in state_dict
                  for m in [re.match(re.escape(COND_PREFIX) + r"transformer\.attn_layers\.layers\.(\d+)\.", k)] if m}
        positions = state_dict.get(COND_PREFIX + "transformer.pos_emb.emb.weight")
        params = {"n_embed": int(bert_tokens.shape[1]), "n_layer": len(blocks) // 2,
                  "vocab_size": int(bert_tokens.shape[0])}
        if positions is not None:
            params["max_seq_len"] = int(positions.shape[0])
        return {"target": "ldm.modules.encoders.modules.BERTEmbedder", "params": params}
    mapper = state_dict.get(COND_PREFIX + "channel_mapper.weight")
    if mapper is not None and np.ndim(mapper) == 4 and tuple(np.shape(mapper)[2:]) == (1, 1):
        # SpatialRescaler (semantic synthesis): its 1x1 channel_mapper conv; the resizing is not in the weights
        # (n_stages etc. are filled in by infer_original_config).
        return {"target": "ldm.modules.encoders.modules.SpatialRescaler",
                "params": {"in_channels": int(mapper.shape[1]), "out_channels": int(mapper.shape[0]),
                           "bias": COND_PREFIX + "channel_mapper.bias" in state_dict}}
    other = sorted(k for k in state_dict if k.startswith(COND_PREFIX))
    if other and all(VAE_PREFIX + k[len(COND_PREFIX):] in state_dict for k in other):
        # LatentDiffusion with cond_stage_config __is_first_stage__ stores the first stage twice
        return "__is_first_stage__"
    if other:
        raise CheckpointError(f"{source}: unknown conditioning model weights (e.g. {other[:3]}); pass the "
                              "original YAML (supported: FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, ClassEmbedder, "
                              "SpatialRescaler)")
    return "__is_unconditional__"


def _stored_schedule(state_dict: Mapping[str, np.ndarray]):
    """(kind, values as stored, float64 values) of the schedule buffer ``register_schedule`` saved: "betas", else
    "alphas_cumprod" (files that kept only some buffers), or None."""
    for kind in ("betas", "alphas_cumprod"):
        stored = state_dict.get(kind)
        if stored is not None and np.ndim(stored) == 1 and np.size(stored) > 1:
            stored = np.asarray(stored)
            if np.issubdtype(stored.dtype, np.floating) or stored.dtype == ml_dtypes.bfloat16:
                return kind, stored, stored.astype(np.float64)
    return None


def _as_stored(kind: str, betas: np.ndarray) -> np.ndarray:
    return betas if kind == "betas" else np.cumprod(1.0 - betas)


def _matches_stored(stored: np.ndarray, values: np.ndarray) -> bool:
    """Whether float64 ``values`` round to ``stored`` in its dtype: register_schedule computes the schedule in
    float64 and stores it as float32, and "fp16" / "bf16" releases cast the buffers too, so a file holds the
    schedule only to its dtype's precision (one ulp: eps relative, the smallest normal absolute)."""
    info = ml_dtypes.finfo(stored.dtype)
    return values.shape == stored.shape and bool(np.all(
        np.abs(values - stored.astype(np.float64)) <= float(info.eps) * np.abs(values) + float(info.smallest_normal)))


def _schedule_from_buffers(state_dict: Mapping[str, np.ndarray]) -> Optional[Dict[str, Any]]:
    """linear_start / linear_end / timesteps / beta_schedule (or ``given_betas``) from the schedule buffers,
    or None without them. The YAML's decimals (0.00085) are recovered as the shortest ones whose CompVis
    schedule rounds to the stored values, in float32 and in the float16 / bfloat16 of pruned releases."""
    found = _stored_schedule(state_dict)
    if found is None:
        return None
    kind, stored, values = found
    T = len(values)
    if kind == "betas":
        first, last = values[0], values[-1]
    else:
        first, last = 1.0 - values[0], 1.0 - values[-1] / values[-2]
    candidates = lambda x: dict.fromkeys(float(f"{x:.{d}g}") for d in range(1, 8))  # noqa: E731
    for schedule in ("linear", "sqrt_linear"):
        for start in candidates(first):
            for end in candidates(last):
                if _matches_stored(stored, _as_stored(kind, ldm_betas(schedule, T, start, end))):
                    return {"timesteps": T, "linear_start": start, "linear_end": end, "beta_schedule": schedule}
    if kind == "betas":
        betas = values
    else:  # beta_t = 1 - alphas_cumprod_t / alphas_cumprod_{t-1}
        betas = 1.0 - values / np.concatenate([[1.0], values[:-1]])
    return {"timesteps": T, "linear_start": float(betas[0]), "linear_end": float(betas[-1]),
            "given_betas": betas.tolist()}


def reconcile_schedule(cfg: Mapping[str, Any], state_dict: Mapping[str, np.ndarray], source: str) -> Dict[str, Any]:
    """The YAML config with the file's noise schedule where the two differ.

    The original loads a checkpoint with ``LatentDiffusion.load_state_dict(sd, strict=False)``
    (scripts/txt2img.py), which overwrites the ``betas`` / ``alphas_cumprod`` / ... buffers that
    ``register_schedule`` made from the YAML, and its samplers read ``model.alphas_cumprod``: the file's
    schedule wins. Agreement is checked to the stored dtype's precision (float16 / bfloat16 releases)."""
    from ldm_jax.convert.original_config import schedule_betas

    found = _stored_schedule(state_dict)
    if found is None:
        return dict(cfg)
    kind, stored, _ = found
    params = cfg["model"]["params"]
    if _matches_stored(stored, _as_stored(kind, schedule_betas(params, source))):
        return dict(cfg)
    from_file = _schedule_from_buffers(state_dict)
    warnings.warn(f"{source}: the checkpoint's {kind!r} buffer differs from the YAML's schedule (timesteps "
                  f"{params.get('timesteps', 1000)}, {params.get('beta_schedule', 'linear')} "
                  f"{params.get('linear_start')}..{params.get('linear_end')}); using the checkpoint's, as the "
                  "original does (load_state_dict overwrites the schedule buffers)")
    new_params = {k: v for k, v in params.items()
                  if k not in ("timesteps", "linear_start", "linear_end", "beta_schedule", "given_betas")}
    new_params.update(from_file)
    return {**cfg, "model": {**cfg["model"], "params": new_params}}


def check_model_family(state_dict: Mapping[str, np.ndarray], source: str) -> None:
    """Refuse, by name, the files of LatentDiffusion subclasses ldm_jax does not implement, and a standalone
    first-stage file given as a whole model."""
    unclip = sorted(k for k in state_dict if k.startswith(("embedder.", "noise_augmentor.")))
    if unclip:
        # SD 2.1 unCLIP (ImageEmbeddingConditionedLatentDiffusion): a CLIP image encoder (embedder.*) whose
        # noise-augmented embedding (noise_augmentor.*) enters the U-Net through a label_emb projection
        raise CheckpointError(f"{source}: an unCLIP checkpoint (ImageEmbeddingConditionedLatentDiffusion: "
                              f"{unclip[0]!r}, ...), which is not supported")
    model_keys = (k for k in state_dict if k not in ("model_ema.decay", "model_ema.num_updates"))
    if not any(k.startswith((UNET_PREFIX, "model_ema.")) for k in model_keys) and (
            "encoder.conv_in.weight" in state_dict or "decoder.conv_out.weight" in state_dict):
        raise CheckpointError(f"{source}: a standalone autoencoder (first-stage) file (encoder.*, decoder.*), not "
                              "a whole latent-diffusion checkpoint: load the model's file and give this one as "
                              "vae=...")


def _check_context_optional(unet_params: Mapping[str, Any], source: str) -> None:
    """A cross-attention U-Net without cond-stage weights: the original runs it without a context only where
    every attention block's context width equals its channels (attn2 then attends to the block's own features);
    else the file is a pruned one whose text encoder the original downloads (FrozenCLIPEmbedder /
    FrozenOpenCLIPEmbedder load their pretrained weights in __init__) and ldm_jax cannot."""
    mc, mult = unet_params["model_channels"], unet_params["channel_mult"]
    channels = {mc * mult[i] for i in range(len(mult)) if 2 ** i in unet_params["attention_resolutions"]}
    channels.add(mc * mult[-1])  # the middle block
    context_dim = unet_params["context_dim"]
    if channels != {context_dim}:
        family = {768: " (SD 1.x: FrozenCLIPEmbedder, openai/clip-vit-large-patch14)",
                  1024: " (SD 2.x: FrozenOpenCLIPEmbedder, ViT-H-14)"}.get(context_dim, "")
        raise CheckpointError(f"{source}: the U-Net cross-attends to a {context_dim}-wide context{family} but the "
                              f"file has no text encoder weights ({COND_PREFIX}*): a pruned file whose text encoder "
                              "the original downloads; ldm_jax downloads nothing: use a file that includes it")


def infer_original_config(state_dict: Mapping[str, np.ndarray], source: str) -> Dict[str, Any]:
    """A YAML-shaped config ({"model": {"params": ...}}) inferred from the keys and shapes.

    See the module docstring for what cannot be inferred and the defaults used.
    """
    unet = _sub(state_dict, UNET_PREFIX)
    check_model_family(state_dict, source)
    if not unet:
        if any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")
               for k in state_dict):
            raise CheckpointError(f"{source}: only EMA weights (model_ema.*) and no {UNET_PREFIX}* keys; LitEma "
                                  "removes the dots from their names, so the U-Net cannot be inferred from them: "
                                  "pass the original YAML (config=...) with use_ema=True")
        raise CheckpointError(f"{source}: not an original latent-diffusion checkpoint (no {UNET_PREFIX}* keys)")
    if any(k.startswith("low_scale_model.") for k in state_dict):
        raise CheckpointError(f"{source}: a LatentUpscaleDiffusion checkpoint (the SD 2 x4 upscaler: "
                              "low_scale_model.* buffers); its max_noise_level, scale_factor and parameterization "
                              "are not in the weights: pass its original YAML (config='x4-upscaling.yaml')")
    vae = {k: v for k, v in _sub(state_dict, VAE_PREFIX).items() if not k.startswith("loss.")}
    if not vae:
        raise CheckpointError(f"{source}: no first-stage autoencoder weights ({VAE_PREFIX}*)")
    unet_params = infer_unet_params(unet, source)
    first_stage = infer_first_stage_config(vae, source)
    cond = infer_cond_stage_config(state_dict, source, unet_params.get("context_dim"))
    cond_name = cond if isinstance(cond, str) else cond["target"].rsplit(".", 1)[-1]
    if cond_name in ("__is_unconditional__", "__is_first_stage__") and "context_dim" in unet_params:
        _check_context_optional(unet_params, source)
    latent_ch = first_stage["params"]["embed_dim"]
    if cond_name in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder", "ClassEmbedder", "BERTEmbedder"):
        key = "hybrid" if unet_params["in_channels"] != latent_ch else "crossattn"
    elif cond_name == "__is_first_stage__":
        key = "concat"
    elif cond_name == "SpatialRescaler":
        # The map comes at the image resolution and must reach the latent size: the released semantic
        # synthesis models halve it bilinearly log2(f) times (n_stages 2 for their f = 4 first stage).
        key = "concat"
        factor = 2 ** (len(first_stage["params"]["ddconfig"]["ch_mult"]) - 1)
        cond["params"].update(n_stages=int(np.log2(factor)), method="bilinear", multiplier=0.5)
        warnings.warn(f"{source}: SpatialRescaler cond stage without its YAML: assuming {cond['params']['n_stages']} "
                      "bilinear halvings (the map at the image resolution, as the semantic synthesis models); pass "
                      "the original YAML if that is wrong")
    elif unet_params["in_channels"] != latent_ch:
        # Concat conditioning without cond-stage weights. The released ones: LDM inpainting
        # (inpainting_big: latents + first-stage latents of the masked image + the mask, 2C + 1
        # channels, cond stage __is_first_stage__) and super-resolution (bsr_sr: latents + the
        # low-res image, cond stage torch.nn.Identity).
        key = "concat"
        first = unet_params["in_channels"] == 2 * latent_ch + 1
        cond = "__is_first_stage__" if first else {"target": "torch.nn.Identity"}
    else:
        key = None
    params: Dict[str, Any] = {
        "image_size": 64, "channels": latent_ch, "conditioning_key": key,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        "first_stage_config": first_stage, "cond_stage_config": cond,
        "scale_factor": _SD_SCALE_FACTOR if first_stage["target"].endswith("AutoencoderKL") else 1.0,
    }
    from_file = _schedule_from_buffers(state_dict)
    if from_file is not None:
        params.update(from_file)
    elif cond_name in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder"):
        params.update(linear_start=0.00085, linear_end=0.012, timesteps=1000)  # Stable Diffusion
    else:
        params.update(linear_start=0.0015, linear_end=0.0195, timesteps=1000)  # LDM configs
        warnings.warn(f"{source}: no 'betas' buffer; assuming the LDM schedule linear 0.0015..0.0195, "
                      "pass the original YAML if that is wrong")
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}
