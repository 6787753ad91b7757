"""Model configuration of an original CompVis / Stability checkpoint.

Latent diffusion checkpoints (Rombach et al. 2022, arXiv:2112.10752) are
described by the YAML they were trained with (``v1-inference.yaml``,
``v2-inference-v.yaml``, ``cin256-v2.yaml``, ...)::

    model.params.{linear_start, linear_end, timesteps, beta_schedule, parameterization,
                  scale_factor, conditioning_key, image_size}
    model.params.unet_config.params         openaimodel.UNetModel arguments
    model.params.first_stage_config         AutoencoderKL / VQModelInterface (+ ddconfig)
    model.params.cond_stage_config          FrozenCLIPEmbedder / FrozenOpenCLIPEmbedder /
                                            ClassEmbedder / __is_unconditional__ / __is_first_stage__ /
                                            torch.nn.Identity / SpatialRescaler (semantic synthesis) /
                                            BERTEmbedder (LDM txt2img; its vocab via tokenizer=)
    model.params.low_scale_config           LatentUpscaleDiffusion (SD 2 x4 upscaler): the low-res
                                            image's noise schedule and max_noise_level

That YAML is read with ``yaml.safe_load`` (``read_original_yaml``); without
one, a YAML-shaped dict is inferred from the checkpoint's keys and shapes
(``original_infer.infer_original_config``). Either way the same translation
(``spec_from_original_config``) turns it into diffusers-style config dicts
which the existing ``unet_config_from_diffusers`` / ``vae_config_from_diffusers``
turn into model configurations, so there is one source of truth for model
construction.

``conditioning_key`` is resolved as ``LatentDiffusion`` does (``resolve_conditioning_key``):
the older configs (bsr_sr) give only ``concat_mode``, whose default makes them "concat".
Without a YAML, a U-Net with more input channels than latents and no cond-stage weights is
taken as concat-conditioned: ``__is_first_stage__`` for 2C + 1 channels (LDM inpainting),
else ``torch.nn.Identity`` (super-resolution).

What cannot be inferred from the weights (pass the YAML, or the override):

* the attention head count: SD 1.x (1x1-conv projections) -> 8 heads, SD 2.x
  (linear projections) -> 64 channels per head, other LDMs without a spatial
  transformer -> 32 channels per head (the LDM celeba/ffhq/lsun configs);
* eps- vs v-prediction of SD 2.x: the 512-base (eps) and 768-v (v) models
  have identical keys. The default is eps (with a warning);
  ``prediction_type="v_prediction"`` or ``v2-inference-v.yaml`` selects v.
  (diffusers guesses from ``global_step == 875000``, which misreads
  SD 2.1-512; it is not used here.)
* cross- instead of self-attention in a transformer's first attention (``disable_self_attentions``,
  ``disable_middle_self_attn``) where ``context_dim`` equals that block's channels: the weights have
  the same shapes; inferred as self-attention (a differing width is detected);
* the noise schedule, when the checkpoint lacks the ``betas`` / ``alphas_cumprod`` buffers (where it has
  them they win over a YAML as well, as in the original, whose ``load_state_dict`` overwrites them);
* ``scale_factor`` without a ``scale_factor`` buffer: 0.18215 (SD) for KL,
  1.0 (LatentDiffusion's default) for VQ first stages.
* a ``SpatialRescaler``'s resizing (found by its ``cond_stage_model.channel_mapper``
  weight): assumed ``n_stages = log2(f)`` bilinear halvings, the map at the image
  resolution (the released semantic synthesis models).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from ldm_jax.convert.errors import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
CLIP_PREFIXES = ("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")
OPEN_CLIP_PREFIX = "cond_stage_model.model."

# CompVis names of the conditioning models this project loads.
COND_STAGES = {
    "FrozenCLIPEmbedder": "clip",
    "FrozenOpenCLIPEmbedder": "open_clip",
    "ClassEmbedder": "class",
    "BERTEmbedder": "bert",  # the LDM text-to-image model (txt2img-1p4B): LDMBert, see convert/ldm_bert_weights.py
}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}

# Defaults of ldm.models.diffusion.ddpm.DDPM / LatentDiffusion.
_LDM_DEFAULTS = dict(linear_start=1e-4, linear_end=2e-2, timesteps=1000, beta_schedule="linear",
                     parameterization="eps", cosine_s=8e-3, scale_factor=1.0)
_UNSUPPORTED_HINT = "this option is not implemented by ldm_jax's U-Net"


@dataclasses.dataclass
class OriginalSpec:
    """Everything needed to build the models of one original checkpoint."""

    unet: Dict[str, Any]          # diffusers unet config.json (UNet2DConditionModel or UNet2DModel)
    vae: Dict[str, Any]           # diffusers vae config.json (AutoencoderKL or VQModel)
    cond_stage: str               # "clip" | "open_clip" | "class" | "bert" | "none" | "first_stage" | "identity" |
                                  # "rescaler" (SpatialRescaler)
    cond_stage_params: Dict[str, Any]  # YAML params of the conditioning model (for "rescaler": all six
                                       # SpatialRescaler arguments, defaults filled in; see rescaler_params_from_ldm)
    conditioning_key: Optional[str]    # as LatentDiffusion resolves it: crossattn | concat | hybrid | adm |
                                       # hybrid-adm | None (see resolve_conditioning_key)
    scheduler: Dict[str, Any]     # diffusers scheduler_config.json
    sample_size: int              # default latent side (model.params.image_size)
    source: str                   # the YAML path, or "<file> (inferred from keys)"
    qkv_new_order: bool = False   # AttentionBlock use_new_attention_order (q/k/v split before heads)
    # LatentUpscaleDiffusion's low_scale_config (ImageConcatWithNoiseAugmentation, the SD 2 x4 upscaler):
    # the schedule that noises the low-res image (a diffusers scheduler config) and the exclusive bound of
    # the noise level; None for other models (see low_scale_from_ldm).
    low_res_scheduler: Optional[Dict[str, Any]] = None
    max_noise_level: Optional[int] = None


def _num(value, key: str, source: str) -> float:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; accept it as a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: {key}={value!r} is not a number") from None


def _target_name(cfg: Mapping, what: str, source: str) -> str:
    if isinstance(cfg, str):  # "__is_unconditional__" / "__is_first_stage__"
        return cfg
    if not isinstance(cfg, Mapping) or "target" not in cfg:
        raise CheckpointError(f"{source}: {what} has no 'target'")
    return str(cfg["target"])


def read_original_yaml(path: str) -> Dict[str, Any]:
    """The original inference YAML, parsed with ``yaml.safe_load`` and checked for
    ``model.params.unet_config`` and ``model.params.first_stage_config``."""
    import yaml

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such YAML file")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise CheckpointError(f"{path}: not valid YAML ({e})") from None
    params = cfg.get("model", {}).get("params") if isinstance(cfg, dict) else None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: not an original latent-diffusion config (no model.params)")
    for key in ("unet_config", "first_stage_config"):
        if not isinstance(params.get(key), dict):
            raise CheckpointError(f"{path}: model.params.{key} is missing; this loader needs a latent "
                                  "diffusion config (U-Net + first stage)")
    return cfg


# ----------------------------------------------------------------------------- schedule


def ldm_betas(schedule: str, timesteps: int, linear_start: float, linear_end: float,
              cosine_s: float = 8e-3) -> np.ndarray:
    """CompVis ``make_beta_schedule`` in float64 (ldm/modules/diffusionmodules/util.py)."""
    T = int(timesteps)
    if schedule == "linear":  # diffusers "scaled_linear"
        return np.linspace(linear_start ** 0.5, linear_end ** 0.5, T, dtype=np.float64) ** 2
    if schedule == "sqrt_linear":  # diffusers "linear"
        return np.linspace(linear_start, linear_end, T, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, T, dtype=np.float64) ** 0.5
    if schedule == "cosine":  # Nichol & Dhariwal 2021 Eq. 17, normalised by alphas[0], clipped at 0.999
        steps = np.arange(T + 1, dtype=np.float64) / T + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    raise CheckpointError(f"unknown beta_schedule {schedule!r} (CompVis schedules: linear, sqrt_linear, "
                          "sqrt, cosine)")


def schedule_betas(params: Mapping, source: str) -> np.ndarray:
    """The float64 betas ``register_schedule`` makes from ``model.params`` (``given_betas``, else
    ``make_beta_schedule`` with DDPM's defaults)."""
    if params.get("given_betas") is not None:
        return np.asarray(params["given_betas"], np.float64)
    get = lambda k: params.get(k, _LDM_DEFAULTS[k])  # noqa: E731
    return ldm_betas(str(get("beta_schedule")), int(get("timesteps")),
                     _num(get("linear_start"), "linear_start", source), _num(get("linear_end"), "linear_end", source),
                     _num(get("cosine_s"), "cosine_s", source))


def scheduler_config_from_ldm(params: Mapping, source: str, prediction_type: Optional[str] = None) -> Dict:
    """diffusers scheduler config from ``model.params`` (linear_start, linear_end,
    timesteps, beta_schedule, parameterization).

    CompVis "linear" is linspace of sqrt(beta) squared, i.e. diffusers
    "scaled_linear"; "sqrt_linear" is diffusers "linear"; the other CompVis
    schedules are written as ``trained_betas``. ``steps_offset=1`` reproduces
    the CompVis DDIM/PLMS timesteps (``make_ddim_timesteps`` adds 1).
    """
    get = lambda k: params.get(k, _LDM_DEFAULTS[k])  # noqa: E731
    T = int(get("timesteps"))
    start, end = _num(get("linear_start"), "linear_start", source), _num(get("linear_end"), "linear_end", source)
    schedule = str(get("beta_schedule"))
    config: Dict[str, Any] = {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": T, "beta_start": start, "beta_end": end,
        "beta_schedule": "scaled_linear", "trained_betas": None,
        "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
        "skip_prk_steps": True, "timestep_spacing": "leading",
    }
    given = params.get("given_betas")
    if given is not None:
        config["trained_betas"] = [float(b) for b in given]
    elif schedule == "sqrt_linear":
        config["beta_schedule"] = "linear"
    elif schedule != "linear":
        cosine_s = _num(get("cosine_s"), "cosine_s", source)
        config["trained_betas"] = ldm_betas(schedule, T, start, end, cosine_s).tolist()
    parameterization = str(get("parameterization"))
    if parameterization not in PREDICTION_TYPES:
        raise CheckpointError(f"{source}: unsupported parameterization {parameterization!r} "
                              f"(expected one of {sorted(PREDICTION_TYPES)})")
    config["prediction_type"] = prediction_type or PREDICTION_TYPES[parameterization]
    if config["prediction_type"] not in PREDICTION_TYPES.values():
        raise ValueError(f"prediction_type must be one of {sorted(PREDICTION_TYPES.values())}, "
                         f"got {config['prediction_type']!r}")
    return config


# ----------------------------------------------------------------------------- U-Net


def _per_level(value, n: int, key: str, source: str) -> List:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise CheckpointError(f"{source}: unet_config {key} has {len(value)} entries for {n} levels")
        return list(value)
    return [value] * n


def _collapse(values: List):
    return values[0] if all(v == values[0] for v in values) else list(values)


def unet_config_from_ldm(unet_params: Mapping, sample_size: int, source: str) -> Dict[str, Any]:
    """openaimodel ``UNetModel`` arguments -> a diffusers U-Net config.json dict.

    Spatial-transformer U-Nets become ``UNet2DConditionModel`` (``attention_head_dim``
    there is the number of heads per block); U-Nets with the older
    ``AttentionBlock`` become ``UNet2DModel`` (channels per head).
    """
    p = dict(unet_params)
    bad = lambda key, value, why=_UNSUPPORTED_HINT: CheckpointError(  # noqa: E731
        f"{source}: unet_config {key}={value!r} is not supported ({why})")
    for key, ok in (("dims", (2,)), ("conv_resample", (True,)), ("resblock_updown", (False,)),
                    ("use_scale_shift_norm", (False,)), ("n_embed", (None,)),
                    ("num_attention_blocks", (None,)), ("disable_middle_self_attn", (False,)),
                    ("adm_in_channels", (None,))):
        if key in p and p[key] not in ok:
            raise bad(key, p[key])
    mc = int(p["model_channels"])
    mult = [int(m) for m in p["channel_mult"]]
    n = len(mult)
    if mult[0] != 1:
        # openaimodel.UNetModel ends with conv_nd(dims, model_channels, out_channels, 3) although its last output
        # block has model_channels * channel_mult[0] channels: the original only runs with channel_mult[0] == 1
        # (and diffusers' conv_in would output block_out_channels[0], not model_channels).
        raise bad("channel_mult", mult, "the first multiplier must be 1, as openaimodel's input conv and output "
                                         "conv have model_channels channels")
    channels = [mc * m for m in mult]
    num_res = _per_level(p["num_res_blocks"], n, "num_res_blocks", source)
    attn_res = set(int(r) for r in p.get("attention_resolutions") or ())
    has_attn = [2 ** i in attn_res for i in range(n)]
    spatial = bool(p.get("use_spatial_transformer", False))
    num_heads = int(p.get("num_heads", -1))
    head_channels = int(p.get("num_head_channels", -1))
    if num_heads == -1 and head_channels == -1:
        raise CheckpointError(f"{source}: unet_config needs num_heads or num_head_channels")

    legacy = bool(p.get("legacy", True))  # UNetModel's default

    def heads(ch: int) -> int:  # openaimodel: num_head_channels wins over num_heads
        if head_channels != -1:
            if ch % head_channels:
                # openaimodel with legacy=True and a SpatialTransformer: num_heads = ch // num_head_channels, then
                # dim_head = ch // num_heads (not num_head_channels), so the heads still cover all ch channels
                # (e.g. 96 channels, num_head_channels 64 -> 1 head of 96).
                n_heads = ch // head_channels
                if spatial and legacy and n_heads:  # (n_heads * (ch // n_heads) <= ch wide: UNetConfig.dim_head)
                    return n_heads
                inner = n_heads * (ch // n_heads if spatial and legacy and n_heads else head_channels)
                raise CheckpointError(f"{source}: unet_config: {ch} channels are not divisible by "
                                      f"num_head_channels={head_channels} (the original's attention would have "
                                      f"{inner} inner channels; only heads covering "
                                      "all channels are implemented)" if ch >= head_channels else
                                      f"{source}: unet_config: {ch} channels are fewer than "
                                      f"num_head_channels={head_channels} (the original fails: no head)")
            return ch // head_channels
        if ch % num_heads and not spatial:  # (QKVAttention's reshape asserts it in AttentionBlock)
            raise bad("num_heads", num_heads, f"{ch} channels are not divisible by {num_heads} heads (the original "
                                              "AttentionBlock fails on it)")
        if num_heads > ch:
            raise bad("num_heads", num_heads, f"more heads than the {ch} channels (zero-width heads)")
        # SpatialTransformer(ch, num_heads, ch // num_heads): inner_dim = num_heads * (ch // num_heads), which may
        # be < ch, as diffusers builds attention_head_dim=num_heads (UNetConfig.dim_head)
        return num_heads

    def level_values(value_of) -> List[int]:
        """value_of(ch) (heads, or channels per head) per level. openaimodel computes the heads only where it puts
        attention (``if ds in attention_resolutions``) and for the middle block (the last level's width), so a level
        without attention may have channels the head size does not fit (32 channels, num_head_channels 64): such a
        level gets one head, which no layer uses."""
        def unused(c):
            try:
                return value_of(c)
            except CheckpointError:
                return 1 if spatial else c

        return [value_of(c) if has_attn[i] or i == n - 1 else unused(c) for i, c in enumerate(channels)]

    up_heads = int(p.get("num_heads_upsample", -1))
    # Only with legacy=True does the up path's AttentionBlock use num_heads_upsample: otherwise openaimodel passes
    # num_head_channels = ch // num_heads, which wins over num_heads_upsample (AttentionBlock.__init__).
    if not spatial and legacy and head_channels == -1 and up_heads not in (-1, num_heads):
        raise bad("num_heads_upsample", up_heads, "different head counts on the up path")
    num_classes = p.get("num_classes")
    if num_classes is not None and not isinstance(num_classes, int):
        raise bad("num_classes", num_classes, "only an int (a label table) is implemented")
    common = {
        "sample_size": int(sample_size),
        "in_channels": int(p["in_channels"]),
        "out_channels": int(p["out_channels"]),
        "block_out_channels": channels,
        "layers_per_block": _collapse(num_res),
        "norm_num_groups": 32, "norm_eps": 1e-5,  # openaimodel normalization(): GroupNorm32(32, ch)
        "flip_sin_to_cos": True, "freq_shift": 0,  # timestep_embedding: [cos, sin], exponent / half
        "downsample_padding": 1, "act_fn": "silu",
        "num_class_embeds": num_classes,
        "dropout": float(p.get("dropout", 0.0)),
    }
    if spatial:
        context_dim = p.get("context_dim")
        if context_dim is None:
            raise CheckpointError(f"{source}: unet_config use_spatial_transformer needs context_dim")
        if isinstance(context_dim, (list, tuple)):
            if len(set(context_dim)) != 1:
                raise bad("context_dim", context_dim, "one context width for all blocks")
            context_dim = context_dim[0]
        depth = p.get("transformer_depth", 1)
        disable_sa = p.get("disable_self_attentions")
        config = {
            "_class_name": "UNet2DConditionModel", **common,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "attention_head_dim": _collapse(level_values(heads)),  # = heads (diffusers misnomer)
            "cross_attention_dim": int(context_dim),
            "use_linear_projection": bool(p.get("use_linear_in_transformer", False)),
            "transformer_layers_per_block": _collapse(
                [int(d) for d in _per_level(depth, n, "transformer_depth", source)]),
            "only_cross_attention": (False if disable_sa is None else
                                     _collapse([bool(d) for d in _per_level(disable_sa, n, "disable_self_attentions",
                                                                              source)])),
            "upcast_attention": False,  # softmax is float32 in ldm_jax whatever this says
        }
    else:
        if p.get("context_dim") is not None:
            raise bad("context_dim", p["context_dim"], "cross-attention needs use_spatial_transformer")
        # AttentionBlock: channels per head (diffusers UNet2DModel attention_head_dim).
        dims = level_values(lambda c: c // heads(c))
        config = {
            "_class_name": "UNet2DModel", **common,
            "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
            "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
            "mid_block_type": "UNetMidBlock2D", "add_attention": True,
            "attention_head_dim": _collapse(dims),
        }
    return config


# ----------------------------------------------------------------------------- autoencoder


def first_stage_attention_levels(ddconfig: Mapping, source: str) -> List[bool]:
    """Per level (0 = full resolution): does the CompVis Encoder / Decoder put an AttnBlock after
    each ResnetBlock there? It does where the level's feature-map side ``curr_res`` is in
    ``attn_resolutions``: ``resolution // 2**i`` in the encoder, ``(resolution // 2**(n-1)) * 2**(n-1-i)``
    in the decoder (the same unless ``resolution`` is not a multiple of 2**(n-1): refused).
    ``attn_type: none`` makes every attention an Identity (no weights)."""
    n = len(ddconfig["ch_mult"])
    sides = {int(r) for r in ddconfig.get("attn_resolutions") or ()}
    if not sides or ddconfig.get("attn_type", "vanilla") == "none":
        return [False] * n
    if "resolution" not in ddconfig:
        raise CheckpointError(f"{source}: first_stage_config ddconfig attn_resolutions needs ddconfig resolution")
    resolution = int(ddconfig["resolution"])
    encoder = [resolution // 2 ** i in sides for i in range(n)]
    decoder = [(resolution // 2 ** (n - 1)) * 2 ** (n - 1 - i) in sides for i in range(n)]
    if encoder != decoder:
        raise CheckpointError(
            f"{source}: first_stage_config ddconfig attn_resolutions={sorted(sides)} with resolution={resolution} "
            f"is not supported (the original puts attention at encoder levels "
            f"{[i for i, a in enumerate(encoder) if a]} but decoder levels {[i for i, a in enumerate(decoder) if a]}; "
            "only the same levels in both are implemented)")
    return encoder


def vae_config_from_ldm(first_stage_config: Mapping, scale_factor: float, sample_size: int,
                        source: str) -> Dict[str, Any]:
    """``first_stage_config`` (AutoencoderKL / VQModelInterface + ddconfig) -> diffusers vae config dict."""
    target = _target_name(first_stage_config, "first_stage_config", source)
    params = dict(first_stage_config.get("params") or {})
    dd = dict(params.get("ddconfig") or {})
    if not dd:
        raise CheckpointError(f"{source}: first_stage_config has no params.ddconfig")
    name = target.rsplit(".", 1)[-1]
    if name == "AutoencoderKL":
        kind = "kl"
    elif name in ("VQModelInterface", "VQModel"):
        kind = "vq"
    else:
        raise CheckpointError(f"{source}: first stage {target!r} is not supported (AutoencoderKL, VQModelInterface)")
    bad = lambda key, value, why: CheckpointError(  # noqa: E731
        f"{source}: first_stage_config ddconfig {key}={value!r} is not supported ({why})")
    for key, ok in (("resamp_with_conv", True), ("give_pre_end", False), ("tanh_out", False),
                    ("use_linear_attn", False)):
        if key in dd and dd[key] != ok:
            raise bad(key, dd[key], f"only {ok} is implemented")
    attn_type = dd.get("attn_type", "vanilla")
    if attn_type not in ("vanilla", "vanilla-xformers", "none"):
        raise bad("attn_type", attn_type, "only vanilla softmax attention or none")
    z = int(dd["z_channels"])
    embed_dim = int(params.get("embed_dim", z))
    ch = int(dd["ch"])
    if int(dd["ch_mult"][0]) != 1:
        # The CompVis Encoder's conv_in outputs ch channels (in_ch_mult = (1,) + ch_mult), diffusers'
        # block_out_channels[0] = ch * ch_mult[0]: they only agree for ch_mult[0] == 1.
        raise bad("ch_mult", list(dd["ch_mult"]), "the first multiplier must be 1: the encoder's conv_in has ch "
                                                  "output channels")
    attn = first_stage_attention_levels(dd, source)  # AttnBlocks inside the levels (attn_resolutions)
    config = {
        "in_channels": int(dd.get("in_channels", 3)),
        "out_channels": int(dd.get("out_ch", 3)),
        "block_out_channels": [ch * int(m) for m in dd["ch_mult"]],
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
        "layers_per_block": int(dd["num_res_blocks"]),
        "act_fn": "silu", "norm_num_groups": 32,  # ldm Normalize(): GroupNorm(32, eps=1e-6)
        "latent_channels": z,
        "sample_size": int(dd.get("resolution", sample_size * 2 ** (len(dd["ch_mult"]) - 1))),
        "scaling_factor": float(scale_factor),
        "mid_block_add_attention": attn_type != "none",
    }
    if kind == "kl":
        if not dd.get("double_z", True):
            raise bad("double_z", False, "a KL autoencoder outputs mean and log-variance")
        if embed_dim != z:
            raise CheckpointError(f"{source}: first_stage_config embed_dim={embed_dim} differs from z_channels={z}; "
                                  "only embed_dim == z_channels is implemented for AutoencoderKL")
        return {"_class_name": "AutoencoderKL", **config, "use_quant_conv": True, "use_post_quant_conv": True}
    if dd.get("double_z", False):
        raise bad("double_z", True, "a VQ encoder outputs z_channels")
    if params.get("remap") is not None:
        raise CheckpointError(f"{source}: first_stage_config remap={params['remap']!r} (codebook index "
                              "remapping) is not supported")
    if "n_embed" not in params:
        raise CheckpointError(f"{source}: VQ first_stage_config needs params.n_embed")
    return {"_class_name": "VQModel", **config, "num_vq_embeddings": int(params["n_embed"]),
            "vq_embed_dim": embed_dim, "norm_type": "group", "lookup_from_codebook": False}


# ----------------------------------------------------------------------------- whole model

CONDITIONING_KEYS = (None, "crossattn", "concat", "hybrid", "adm", "hybrid-adm", "crossattn-adm")


def resolve_conditioning_key(model_params: Mapping, cond_target: str, source: str) -> Optional[str]:
    """``conditioning_key`` as ``LatentDiffusion.__init__`` resolves it (ldm/models/diffusion/ddpm.py):
    unset -> "concat" if ``concat_mode`` (default True) else "crossattn" (the older configs, e.g.
    bsr_sr, give only ``concat_mode``); an ``__is_unconditional__`` cond stage -> None unless
    ``force_null_conditioning``."""
    key = model_params.get("conditioning_key")
    if key is None:
        key = "concat" if model_params.get("concat_mode", True) else "crossattn"
    if cond_target == "__is_unconditional__" and not model_params.get("force_null_conditioning", False):
        key = None
    if key not in CONDITIONING_KEYS:
        raise CheckpointError(f"{source}: conditioning_key={key!r} is not one of the LatentDiffusion keys "
                              f"{[k for k in CONDITIONING_KEYS if k]}")
    return key


# ImageConcatWithNoiseAugmentation(noise_schedule_config, max_noise_level=1000): register_schedule's defaults.
_LOW_SCALE_SCHEDULE_DEFAULTS = dict(linear_start=1e-4, linear_end=2e-2, timesteps=1000, beta_schedule="linear",
                                    cosine_s=8e-3)


def low_scale_from_ldm(model_params: Mapping, conditioning_key: Optional[str], num_classes, source: str):
    """(low-res schedule as a diffusers scheduler config, max_noise_level) of ``model.params.low_scale_config``
    (``LatentUpscaleDiffusion``), or (None, None) without one.

    The SD 2 x4 upscaler's ``ImageConcatWithNoiseAugmentation`` noises the low-res image with its own
    schedule at a level l < max_noise_level (noise conditioning augmentation, Ho et al. 2021 "Cascaded
    Diffusion Models" Sec. 4.1); the image goes in as concatenated channels and l as the U-Net's class
    label (``hybrid-adm``), so l must also index the label table."""
    cfg = model_params.get("low_scale_config")
    if cfg is None:
        return None, None
    target = _target_name(cfg, "low_scale_config", source)
    if target.rsplit(".", 1)[-1] != "ImageConcatWithNoiseAugmentation":
        raise CheckpointError(f"{source}: low_scale_config target {target!r} is not supported (only "
                              "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation)")
    if conditioning_key != "hybrid-adm":
        raise CheckpointError(f"{source}: low_scale_config with conditioning_key {conditioning_key!r} is not "
                              "supported (the upscaler concatenates the low-res image and takes the noise level as "
                              "the class label: 'hybrid-adm')")
    params = dict(cfg.get("params") or {})
    if not isinstance(params.get("noise_schedule_config"), Mapping):
        raise CheckpointError(f"{source}: low_scale_config.params.noise_schedule_config is missing")
    noise = {**_LOW_SCALE_SCHEDULE_DEFAULTS, **params["noise_schedule_config"]}
    # The same CompVis schedule names as model.params (CompVis "linear" = diffusers "scaled_linear").
    full = scheduler_config_from_ldm(noise, f"{source} (low_scale_config)")
    schedule = {"_class_name": "DDPMScheduler",
                **{k: full[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                        "trained_betas")}}
    max_level = params.get("max_noise_level", 1000)
    if isinstance(max_level, bool) or not isinstance(max_level, int) or max_level < 1:
        raise CheckpointError(f"{source}: low_scale_config max_noise_level={max_level!r} is not a positive integer")
    bound = min(schedule["num_train_timesteps"], num_classes if isinstance(num_classes, int) else 0)
    if max_level > bound:
        raise CheckpointError(f"{source}: low_scale_config max_noise_level={max_level} exceeds the "
                              f"{schedule['num_train_timesteps']} steps of its schedule or the U-Net's "
                              f"num_classes={num_classes} (the noise level is the class label)")
    return schedule, max_level


# SpatialRescaler.__init__ defaults (ldm/modules/encoders/modules.py).
_RESCALER_DEFAULTS = dict(n_stages=1, method="bilinear", multiplier=0.5, in_channels=3, out_channels=None,
                          bias=False)


def rescaler_params_from_ldm(params: Mapping, source: str) -> Dict[str, Any]:
    """``cond_stage_config.params`` of a ``SpatialRescaler`` with its defaults filled in, checked."""
    from ldm_jax.models.spatial_rescaler import check_rescaler_options

    unknown = sorted(set(params) - set(_RESCALER_DEFAULTS))
    if unknown:
        raise CheckpointError(f"{source}: SpatialRescaler params {unknown} are not SpatialRescaler arguments "
                              f"({', '.join(_RESCALER_DEFAULTS)})")
    p = {**_RESCALER_DEFAULTS, **params}
    p["multiplier"] = _num(p["multiplier"], "cond_stage_config multiplier", source)
    try:
        check_rescaler_options(p["n_stages"], p["method"], p["multiplier"])
    except ValueError as e:
        raise CheckpointError(f"{source}: cond_stage_config: {e}") from None
    for key in ("in_channels", "out_channels"):
        value = p[key]
        if (value is not None or key == "in_channels") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointError(f"{source}: SpatialRescaler {key}={value!r} is not a positive integer")
    if not isinstance(p["bias"], bool):
        raise CheckpointError(f"{source}: SpatialRescaler bias={p['bias']!r} is not a boolean")
    return p


def _check_rescaler_fits(rescaler: Mapping, conditioning_key: Optional[str], unet_params: Mapping, vae: Mapping,
                         source: str) -> None:
    """A SpatialRescaler's output goes in as concatenated channels: LatentDiffusion passes a tensor condition as
    c_concat only for "concat" (c_crossattn otherwise), and the U-Net must take latents + its channels."""
    if conditioning_key != "concat":
        raise CheckpointError(f"{source}: a SpatialRescaler cond stage with conditioning_key {conditioning_key!r} is "
                              "not supported (only 'concat': the rescaled map is concatenated to the latents)")
    latent = int(vae.get("vq_embed_dim") or vae["latent_channels"])
    features = rescaler["out_channels"] if rescaler["out_channels"] is not None else rescaler["in_channels"]
    if int(unet_params["in_channels"]) != latent + int(features):
        raise CheckpointError(f"{source}: unet_config in_channels={unet_params['in_channels']} is not the "
                              f"{latent} latent channels plus the SpatialRescaler's {features} output channels")


def spec_from_original_config(cfg: Mapping, source: str, prediction_type: Optional[str] = None,
                              scale_factor: Optional[float] = None) -> OriginalSpec:
    """A parsed original YAML (or an inferred YAML-shaped dict) -> ``OriginalSpec``.

    ``scale_factor``: the checkpoint's ``scale_factor`` buffer (scale_by_std
    models), which wins over the YAML value.
    """
    p = cfg["model"]["params"]
    model_target = str(cfg["model"].get("target", ""))
    if model_target.endswith("ImageEmbeddingConditionedLatentDiffusion"):  # SD 2.1 unCLIP
        raise CheckpointError(f"{source}: model target {model_target!r} (unCLIP: a CLIP image embedding, "
                              "noise-augmented, through the U-Net's label_emb) is not supported")
    sample_size = int(p.get("image_size", 64))
    unet_cfg = p["unet_config"]
    unet_target = _target_name(unet_cfg, "unet_config", source)
    if not unet_target.endswith("UNetModel"):
        raise CheckpointError(f"{source}: unet_config target {unet_target!r} is not supported "
                              "(ldm.modules.diffusionmodules.openaimodel.UNetModel)")
    unet_params = unet_cfg.get("params") or {}
    if scale_factor is None:
        scale_factor = _num(p.get("scale_factor", _LDM_DEFAULTS["scale_factor"]), "scale_factor", source)
    vae = vae_config_from_ldm(p["first_stage_config"], scale_factor, sample_size, source)
    scheduler = scheduler_config_from_ldm(p, source, prediction_type)
    cond = p.get("cond_stage_config", "__is_unconditional__")
    cond_target = _target_name(cond, "cond_stage_config", source)
    cond_name = cond_target.rsplit(".", 1)[-1]
    cond_params = dict(cond.get("params") or {}) if isinstance(cond, Mapping) else {}
    if cond_target == "__is_unconditional__":
        cond_stage = "none"
    elif cond_target == "__is_first_stage__":
        cond_stage = "first_stage"
    elif cond_name in COND_STAGES:
        cond_stage = COND_STAGES[cond_name]
    elif cond_name in ("Identity", "IdentityEncoder"):
        cond_stage = "identity"
    elif cond_name == "SpatialRescaler":
        cond_stage = "rescaler"
        cond_params = rescaler_params_from_ldm(cond_params, source)
    else:
        raise CheckpointError(f"{source}: cond_stage_config target {cond_target!r} is not supported "
                              f"(supported: {', '.join(COND_STAGES)}, SpatialRescaler, torch.nn.Identity, "
                              "__is_unconditional__, __is_first_stage__)")
    if cond_stage == "clip" and cond_params.get("layer", "last") != "last":
        raise CheckpointError(f"{source}: FrozenCLIPEmbedder layer={cond_params['layer']!r} is not supported "
                              "(only 'last')")
    if cond_stage == "open_clip" and cond_params.get("layer", "last") not in ("last", "penultimate"):
        raise CheckpointError(f"{source}: FrozenOpenCLIPEmbedder layer={cond_params['layer']!r} is not supported")
    conditioning_key = resolve_conditioning_key(p, cond_target, source)
    if conditioning_key == "concat" and cond_stage in ("clip", "open_clip", "class", "bert"):
        raise CheckpointError(f"{source}: conditioning_key 'concat' with a {cond_name} cond stage is not supported "
                              "(a text/class context needs 'crossattn' or 'hybrid')")
    if cond_stage == "rescaler":
        _check_rescaler_fits(cond_params, conditioning_key, unet_params, vae, source)
    low_res_scheduler, max_noise_level = low_scale_from_ldm(p, conditioning_key, unet_params.get("num_classes"),
                                                            source)
    if scheduler["prediction_type"] == "v_prediction" and unet_params.get("context_dim") == 1024:
        sample_size = max(sample_size, 96)  # SD 2.x 768-v: diffusers' default 768 px
    return OriginalSpec(
        unet=unet_config_from_ldm(unet_params, sample_size, source),
        vae=vae, cond_stage=cond_stage, cond_stage_params=cond_params,
        conditioning_key=conditioning_key, scheduler=scheduler, sample_size=sample_size,
        source=source, qkv_new_order=bool(unet_params.get("use_new_attention_order", False)),
        low_res_scheduler=low_res_scheduler, max_noise_level=max_noise_level,
    )
