"""An original CompVis / Stability single-file checkpoint -> ``ldm_jax.Pipeline``.

    pipe = load_original_pipeline("v1-5-pruned-emaonly.safetensors")              # inferred config
    pipe = load_original_pipeline("768-v-ema.ckpt", config="v2-inference-v.yaml")  # its YAML
    pipe = load_original_pipeline("sd.ckpt", use_ema=True)                        # model_ema.* weights
    pipe = load_original_pipeline("sd.ckpt", vae="vae-ft-mse-840000-ema-pruned.ckpt")  # another first stage

The file is read by content (safetensors or a torch.save pickle, whatever its suffix), from a Lightning
``{"state_dict": ...}`` wrapper, a bare state dict or a ``{"model"|"module": ...}`` wrapper, with a
DataParallel ``module.`` prefix removed. Its ``betas`` / ``alphas_cumprod`` buffers win over the YAML's
schedule, as ``load_state_dict`` makes them win in the original (``original_infer.reconcile_schedule``).

Families (``cond_stage_config``):

* FrozenCLIPEmbedder (SD 1.x): transformers CLIP names under
  ``cond_stage_model.transformer.``; tokenizer pads with EOT (49407).
* FrozenOpenCLIPEmbedder (SD 2.x): open_clip names under
  ``cond_stage_model.model.``, context from the ``layer`` of the YAML
  ("penultimate" for every released model); tokenizer pads with 0.
* ClassEmbedder (class-conditional LDMs): ``text_encoder`` is a
  ``ClassEmbedder`` giving a (B, 1, D) context and ``tokenizer`` a
  ``ClassLabelTokenizer``: prompts are class indices, "" the unconditional class.
* BERTEmbedder (the LDM text-to-image model, txt2img-1p4B): an ``LDMBertModel``
  from the x-transformers names under ``cond_stage_model.transformer.``; its
  WordPiece vocabulary is not in the file: ``tokenizer=`` (folder or vocab.txt). With
  ``use_tokenizer: false`` (the layout-to-image model, layout2img-openimages256) there is no
  tokenizer: it samples from ``context_ids=``, which ``Pipeline.layout_builder`` (taming's
  builder with the file's vocabulary and length: ``released_layout_builder``) makes from boxes.
* __is_unconditional__: no text encoder; an unconditional model samples with
  ``pipe([""] * batch)``.
* Concat conditioning (``conditioning_key`` "concat", or unset with the default
  ``concat_mode: true``): no text encoder; the concatenated channels come from
  ``pipe(..., cond_image=...)``: a ``torch.nn.Identity`` cond stage
  (super-resolution, bsr_sr) takes the low-res image at the latent size, an
  ``__is_first_stage__`` one (LDM inpainting) its first-stage encoding
  (``init_image=`` + ``mask=`` build [masked-image latents, mask]); a
  ``SpatialRescaler`` (semantic synthesis) is ``Pipeline.cond_stage_model``
  (params ``"cond_stage"``: its ``cond_stage_model.channel_mapper.*`` 1x1 conv)
  and takes ``segmentation=`` (B, H, W, in_channels) at the image size, resized
  inside the jitted chain; any cond stage: ``image_conditioning=`` (B, h, w, k),
  the channels themselves.

Inpainting models (9 input channels, ``conditioning_key: hybrid``) run through
``Pipeline``'s inpaint mode as the diffusers ones do; other hybrid models take
the text context and ``cond_image=`` / ``image_conditioning=``. The SD 2 x4
upscaler (``LatentUpscaleDiffusion``, ``hybrid-adm`` with a ``low_scale_config``)
takes the text context, ``cond_image=`` (the low-res image, noise-augmented with
the YAML's low-scale schedule) and ``noise_level=`` (the U-Net's class label).

The CLIP head count is ``hidden_size // 64`` (OpenAI CLIP and OpenCLIP both
use 64-channel heads); the YAML does not carry it.
"""
from __future__ import annotations

import os
import re
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.convert.clip_transformers import (clip_config_from_transformers, clip_params_from_open_clip,
                                               text_abstract_params)
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.export import UNET_LITERAL_NAMES, torch_name
from ldm_jax.convert.mapping import convert_state_dict
from ldm_jax.convert.original_config import (
    CLIP_PREFIXES, COND_PREFIX, OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, OriginalSpec, read_original_yaml,
    spec_from_original_config,
)
from ldm_jax.convert.original_infer import check_model_family, infer_original_config, reconcile_schedule
from ldm_jax.convert.original_keys import (
    prepare_unet, prepare_vae, select_unet_weights, unet_original_name, vae_original_name,
)
from ldm_jax.convert.unet_diffusers import unet_abstract_params, unet_config_from_diffusers
from ldm_jax.convert.vae_diffusers import vae_config_from_diffusers
from ldm_jax.convert.weights_io import place_params, read_safetensors, unwrap_state_dict, weight_format
from ldm_jax.models.autoencoder import abstract_params as vae_abstract_params
from ldm_jax.models.autoencoder import build_autoencoder
from ldm_jax.models.class_embedder import ClassEmbedder, ClassLabelTokenizer
from ldm_jax.models.clip import CLIPTextModel
from ldm_jax.models.spatial_rescaler import SpatialRescaler
from ldm_jax.models.unet import UNet
from ldm_jax.text.tokenizer import CLIPTokenizer

_DTYPES = ("float32", "bfloat16", "float16")
SD1_PAD_TOKEN = 49407  # transformers' openai/clip-vit-large-patch14 tokenizer pads with <|endoftext|>
SD2_PAD_TOKEN = 0  # open_clip.tokenize pads with 0
_CLIP_HEAD_DIM = 64


# Containers other trainers wrap a state dict in, tried when the top level holds no tensors and no
# "state_dict" (Lightning): {"model": sd} (plain torch trainers), {"module": sd} (DeepSpeed), {"model_state_dict": sd}.
_WRAPPER_KEYS = ("model", "module", "model_state_dict")
# Prefixes a wrapper module puts before every LatentDiffusion name: torch.nn.DataParallel /
# DistributedDataParallel ("module."), or a training wrapper holding the model as .model ("model.", recognised by
# model.model.diffusion_model.* with no model.diffusion_model.* key).
_WRAPPER_PREFIXES = ("module.", "model.")


def _unwrap_container(obj):
    if not isinstance(obj, dict) or "state_dict" in obj or any(isinstance(v, np.ndarray) for v in obj.values()):
        return obj
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict) and any(isinstance(v, np.ndarray) for v in inner.values()):
            return inner
    return obj


def _strip_wrapper_prefix(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The original names of a state dict saved from a wrapped LatentDiffusion (every key under ``module.``
    or ``model.``), which LatentDiffusion.load_state_dict(strict=False) would silently ignore, leaving the
    model at its initialisation."""
    for _ in range(len(_WRAPPER_PREFIXES)):  # e.g. module.model.<name>
        for prefix in _WRAPPER_PREFIXES:
            if not state or not all(k.startswith(prefix) for k in state):
                continue
            stripped = {k[len(prefix):]: v for k, v in state.items()}
            if prefix == "model." and not any(k.startswith(UNET_PREFIX) for k in stripped):
                continue  # model.diffusion_model.* are the original names themselves
            state = stripped
    return state


def read_original_checkpoint(path: str) -> Tuple[Dict[str, np.ndarray], Optional[int]]:
    """(tensors, global_step or None) of a .ckpt / .safetensors file, read without running code.

    The format is taken from the content (safetensors or a torch.save pickle; any suffix, any case);
    the state dict from a Lightning ``{"state_dict": ...}`` wrapper, a plain state dict, or
    ``{"model" | "module" | "model_state_dict": ...}``; a wrapper's ``module.`` / ``model.`` prefix on every
    key is removed."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if weight_format(path) == "safetensors":  # by content: renamed files are common
        return _strip_wrapper_prefix(read_safetensors(path)), None
    from ldm_jax.convert.torch_pickle import load_torch_pickle

    obj = load_torch_pickle(path)
    step = obj.get("global_step") if isinstance(obj, dict) else None
    state = unwrap_state_dict(_unwrap_container(obj), path)
    return _strip_wrapper_prefix(state), step if isinstance(step, int) else None


def _convert(weights, target, *, rename, source: str, config_source: str, ignore=(), original_name=None,
             literal_names=frozenset()):
    """``convert_state_dict`` with a hint about the configuration on mismatch.

    ``original_name`` (diffusers key -> original key) lets a missing weight be
    reported under the name the checkpoint should have had.
    """
    hint = (f"\n  The model configuration ({config_source}) does not fit this checkpoint: pass the original YAML "
            "the checkpoint was made with (config=...), or check that it is the right file.")
    try:
        return convert_state_dict(weights, target, source=source, rename=rename, ignore=ignore)
    except CheckpointError as e:
        error = e
    if original_name is not None and "has shape" not in str(error):
        # Missing / unexpected weights: name the missing ones as the checkpoint should have them.
        present = {k.split("#", 1)[0] for k in weights}
        expected = sorted({original_name(torch_name(path, literal_names))
                           for path in traverse_util.flatten_dict(_unfreeze(target))})
        missing = [k for k in expected if k not in present]
        if missing:
            raise CheckpointError(f"{source}: {len(missing)} weights the model needs are missing from the "
                                  f"checkpoint, e.g. {missing[:5]}\n  ({error}){hint}") from None
    raise CheckpointError(f"{error}{hint}") from None


def _unfreeze(tree):
    return tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)


def _clip_text_config(weights: Mapping[str, np.ndarray], prefix: str, open_clip: bool, output_layer: str,
                      source: str, hidden_act: Optional[str] = None):
    """CLIPTextConfig from the text-tower shapes (the YAML only names a pretrained version)."""
    def need(key):
        if prefix + key not in weights:
            raise CheckpointError(f"{source}: text encoder weight {prefix + key!r} is missing")
        return np.shape(weights[prefix + key])

    if open_clip:
        vocab, width = need("token_embedding.weight")
        positions = need("positional_embedding")[0]
        layer_re, fc1 = r"transformer\.resblocks\.(\d+)\.", "transformer.resblocks.0.mlp.c_fc.weight"
    else:
        vocab, width = need("embeddings.token_embedding.weight")
        positions = need("embeddings.position_embedding.weight")[0]
        layer_re, fc1 = r"encoder\.layers\.(\d+)\.", "encoder.layers.0.mlp.fc1.weight"
    pattern = re.compile("^" + re.escape(prefix) + layer_re)
    layers = 1 + max((int(m.group(1)) for k in weights for m in [pattern.match(k)] if m), default=-1)
    if width % _CLIP_HEAD_DIM and width > _CLIP_HEAD_DIM:
        raise CheckpointError(f"{source}: text width {width} is not a multiple of CLIP's 64-channel heads")
    return clip_config_from_transformers({
        "vocab_size": vocab, "hidden_size": width, "intermediate_size": need(fc1)[0],
        "num_hidden_layers": layers, "num_attention_heads": max(1, width // _CLIP_HEAD_DIM),
        "max_position_embeddings": positions,
        "hidden_act": hidden_act or ("gelu" if open_clip else "quick_gelu"),
        "layer_norm_eps": 1e-5,
    }, output_layer=output_layer)


def _open_clip_activation(cond_params: Mapping[str, Any], config_source: str) -> str:
    """The MLP activation FrozenOpenCLIPEmbedder's ``open_clip.create_model_and_transforms(arch,
    pretrained=version)`` builds: QuickGELU for the ``*-quickgelu`` archs (their model config sets
    ``quick_gelu``) and for ``version="openai"`` (open_clip 2.0, which SD 2.x pins, loads the OpenAI
    weights with QuickGELU), nn.GELU otherwise. The weights alone cannot tell."""
    arch, version = cond_params.get("arch", "ViT-H-14"), cond_params.get("version", "laion2b_s32b_b79k")
    if not isinstance(arch, str) or (version is not None and not isinstance(version, str)):
        raise CheckpointError(f"{config_source}: FrozenOpenCLIPEmbedder arch={arch!r} / version={version!r} must be "
                              "open_clip model / pretrained names")
    quick = arch.lower().endswith("-quickgelu") or (version or "").lower() == "openai"
    return "quick_gelu" if quick else "gelu"


def _load_cond_stage(spec: OriginalSpec, state: Mapping[str, np.ndarray], source: str, kw: dict,
                     tokenizer: Optional[str] = None):
    """(text_encoder, params, tokenizer) for the conditioning model, or (None, None, None).
    ``tokenizer``: the vocabulary path a BERTEmbedder needs (not stored in its checkpoint)."""
    if spec.cond_stage == "clip":
        prefix = next((p for p in CLIP_PREFIXES if p + "embeddings.token_embedding.weight" in state), None)
        if prefix is None:
            raise CheckpointError(f"{source}: the configuration ({spec.source}) has a FrozenCLIPEmbedder but the "
                                  f"checkpoint has no {CLIP_PREFIXES[0]}* weights")
        config = _clip_text_config(state, prefix, False, "last", source)
        model = CLIPTextModel(config, **kw)
        weights = {k: v for k, v in state.items() if k.startswith(prefix)}
        params = _convert(weights, text_abstract_params(model), rename=lambda k: k[len(prefix):], source=source,
                          config_source=spec.source, ignore=(r"(^|\.)position_ids$",),
                          original_name=lambda k: prefix + k)
        # FrozenCLIPEmbedder.tokenize pads / truncates to its max_length (default 77) and the context has that
        # many tokens (ldm/modules/encoders/modules.py: tokenizer(..., max_length=self.max_length,
        # padding="max_length")). (FrozenOpenCLIPEmbedder ignores its max_length: open_clip.tokenize is 77.)
        max_length = spec.cond_stage_params.get("max_length", config.max_position_embeddings)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not (
                2 <= max_length <= config.max_position_embeddings):
            raise CheckpointError(f"{source}: FrozenCLIPEmbedder max_length={max_length!r} ({spec.source}) is not "
                                  f"supported (2 to the text encoder's {config.max_position_embeddings} positions)")
        return model, params, CLIPTokenizer(pad_token_id=SD1_PAD_TOKEN, max_length=max_length)
    if spec.cond_stage == "open_clip":
        if OPEN_CLIP_PREFIX + "token_embedding.weight" not in state:
            raise CheckpointError(f"{source}: the configuration ({spec.source}) has a FrozenOpenCLIPEmbedder but "
                                  f"the checkpoint has no {OPEN_CLIP_PREFIX}* weights")
        layer = spec.cond_stage_params.get("layer", "last")
        config = _clip_text_config(state, OPEN_CLIP_PREFIX, True, layer, source,
                                   hidden_act=_open_clip_activation(spec.cond_stage_params, spec.source))
        model = CLIPTextModel(config, **kw)
        try:
            params = clip_params_from_open_clip(state, config, source=source, prefix=OPEN_CLIP_PREFIX)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}\n  The model configuration ({spec.source}) does not fit this checkpoint.") from None
        # open_clip.tokenize: open_clip's SimpleTokenizer, which spells the specials <start_of_text> / <end_of_text>
        return model, params, CLIPTokenizer(pad_token_id=SD2_PAD_TOKEN, max_length=config.max_position_embeddings,
                                            style="open_clip")
    if spec.cond_stage == "class":
        key = COND_PREFIX + "embedding.weight"
        if key not in state:
            raise CheckpointError(f"{source}: the configuration ({spec.source}) has a ClassEmbedder but the "
                                  f"checkpoint has no {key!r}")
        p = spec.cond_stage_params
        model = ClassEmbedder(int(p.get("n_classes", 1000)), int(p["embed_dim"]), **kw)
        target = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1), jnp.int32))["params"]
        weights = {k: v for k, v in state.items() if k.startswith(COND_PREFIX)}
        params = _convert(weights, target, rename=lambda k: k[len(COND_PREFIX):], source=source,
                          config_source=spec.source, original_name=lambda k: COND_PREFIX + k)
        return model, params, ClassLabelTokenizer(model.num_classes)
    if spec.cond_stage == "bert":  # LDM txt2img: x-transformers names -> LDMBertModel
        from ldm_jax.convert.ldm_bert_weights import load_original_bert

        return load_original_bert(spec, state, source, kw, tokenizer, convert=_convert)
    return None, None, None


def _load_rescaler(spec: OriginalSpec, state: Mapping[str, np.ndarray], source: str, kw: dict):
    """(SpatialRescaler, params) of a semantic-synthesis cond stage (params {} without a channel mapper)."""
    p = spec.cond_stage_params
    model = SpatialRescaler(n_stages=int(p["n_stages"]), method=str(p["method"]), multiplier=float(p["multiplier"]),
                            in_channels=int(p["in_channels"]), out_channels=p["out_channels"], bias=bool(p["bias"]),
                            **kw)
    weights = {k: v for k, v in state.items() if k.startswith(COND_PREFIX)}
    if model.out_channels is None:
        if weights:
            raise CheckpointError(f"{source}: the configuration ({spec.source}) has a SpatialRescaler without "
                                  f"out_channels (no weights) but the checkpoint has {sorted(weights)[:3]}")
        return model, {}
    x = jax.ShapeDtypeStruct((1, 8, 8, model.in_channels), jnp.float32)  # any size: the 1x1 conv is all it holds
    target = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    params = _convert(weights, target, rename=lambda k: k[len(COND_PREFIX):], source=source,
                      config_source=spec.source, original_name=lambda k: COND_PREFIX + k)
    return model, params


def released_layout_builder(bert_config):
    """The ``LayoutTokenBuilder`` of a layout-to-image file (a BERTEmbedder with ``use_tokenizer: false``),
    or None when its length fits no builder. The file records only the vocabulary (vocab_size = no_tokens)
    and the sequence length (max_seq_len = 3 x no_max_objects [+ 2 crop tokens]); the rest are taming's
    scene-image settings the released layout2img model was trained with (use_group_parameter, no
    OpenImages flags). Its number of object classes is not recorded (None: objects with flags are
    refused), so category numbers are checked only against the vocabulary."""
    from ldm_jax.data.layout_tokens import LayoutTokenBuilder, layout_shape_for_length

    shape = layout_shape_for_length(bert_config.max_position_embeddings)
    if shape is None or int(bert_config.vocab_size) < 4:
        return None
    return LayoutTokenBuilder(None, shape[0], int(bert_config.vocab_size), shape[1], use_group_parameter=True,
                              use_additional_parameters=False)


def read_standalone_vae(path: str) -> Dict[str, np.ndarray]:
    """A standalone first-stage file (``vae-ft-mse-840000-ema-pruned.ckpt``, the CompVis ``kl-f8`` models) as
    ``first_stage_model.*`` weights. Its keys are AutoencoderKL's (``encoder.*``, ``decoder.*``, ``quant_conv.*``,
    ``post_quant_conv.*``), or already under ``first_stage_model.``; the training-only ``loss.*`` (LPIPS,
    discriminator) and LitEma's ``model_ema.*`` are dropped, as the webui's VAE loader does."""
    state, _ = read_original_checkpoint(path)
    if any(k.startswith(VAE_PREFIX) for k in state):
        state = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(("loss.", "model_ema."))}
    diffusers = sorted(k for k in state if k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")))
    if diffusers:
        raise CheckpointError(f"{path}: a diffusers-format autoencoder ({diffusers[0]!r}); vae= takes a CompVis "
                              "first-stage file (encoder.down.*, decoder.up.*)")
    if "encoder.conv_in.weight" not in state or "decoder.conv_out.weight" not in state:
        raise CheckpointError(f"{path}: not a CompVis autoencoder file (no encoder.conv_in.weight / "
                              f"decoder.conv_out.weight, found e.g. {sorted(state)[:3]})")
    return {VAE_PREFIX + k: v for k, v in state.items()}


_LORA_KEY = re.compile(r"(^|\.)lora_")  # kohya lora_unet_* / lora_te_*, peft .lora_A. / .lora_down.
_MODEL_PREFIXES = (UNET_PREFIX, VAE_PREFIX, COND_PREFIX, "model_ema.")


def _check_lora(state: Mapping[str, np.ndarray], path: str) -> None:
    """LoRA weights stored beside the model (kohya ``lora_unet_*`` / ``lora_te_*``) are not merged: the original
    ignores them too (load_state_dict(strict=False)), but silently; say so. Inside the model prefixes (a LoRA-
    patched module saved with its adapters) the original would drop them as well and run the base weights, which
    is not what such a file means: refused, naming the key."""
    inside = sorted(k for k in state if k.startswith(_MODEL_PREFIXES) and _LORA_KEY.search(k))
    if inside:
        raise CheckpointError(f"{path}: {len(inside)} LoRA adapter weights inside the model (e.g. {inside[0]!r}) are "
                              "not supported: merge them into the base weights first")
    lora = sorted(k for k in state if not k.startswith(_MODEL_PREFIXES) and _LORA_KEY.search(k))
    if lora:
        warnings.warn(f"{path}: {len(lora)} LoRA weights beside the model (e.g. {lora[0]!r}) are not applied; "
                      "merge them into the weights first")


def _explain_image_conditioning(spec: OriginalSpec, cfg: Mapping, state: Mapping[str, np.ndarray],
                                path: str, inferred: bool) -> None:
    """Hybrid text + image models whose image channels ldm_jax does not compute itself: the U-Net is
    the original's and takes them as ``image_conditioning=``; say what they are (an instruct-pix2pix layout
    only when inferred or named by its YAML target: other hybrid YAMLs say what their channels are)."""
    if spec.conditioning_key != "hybrid":
        return
    latent = int(spec.vae.get("vq_embed_dim") or spec.vae["latent_channels"])
    extra = int(spec.unet["in_channels"]) - latent
    target = str(cfg.get("model", {}).get("target", ""))
    if target.endswith("LatentDepth2ImageDiffusion") or any(k.startswith("depth_model.") for k in state):
        # LatentDepth2ImageDiffusion.get_input: MiDaS depth (depth_model.*), bicubic-resized to the latent
        # size, min-max normalised per sample to [-1, 1], concatenated as c_concat
        warnings.warn(f"{path}: a depth-to-image model (LatentDepth2ImageDiffusion, {extra} depth channel): its MiDaS "
                      "depth estimator (depth_model.*) is not loaded; pass the depth map as image_conditioning= "
                      f"(B, h, w, {extra}) at the latent size, min-max normalised to [-1, 1] per sample")
    elif extra == latent and spec.cond_stage in ("clip", "open_clip") and ("ddpm_edit" in target or inferred):
        # instruct-pix2pix (ddpm_edit.LatentDiffusion): c_concat = encode_first_stage(image).mode(), unscaled
        warnings.warn(f"{path}: {2 * latent} U-Net input channels (latents + {latent} image channels, as "
                      "instruct-pix2pix): pass the input image's first-stage latents (the posterior mode, not "
                      f"multiplied by scale_factor) as image_conditioning= (B, h, w, {latent}); guidance applies "
                      "to the text only (instruct-pix2pix's image guidance scale 1)")


def _check_context_width(text_encoder, unet: UNet, path: str, config_source: str) -> None:
    """The conditioning model's output width must be the U-Net's cross-attention context width; the original
    only fails at the first forward (a matmul shape error), e.g. for a file mixing SD 1.x and SD 2.x weights."""
    context_dim = getattr(unet.config, "cross_attention_dim", None)
    if text_encoder is None or context_dim is None:
        return
    if isinstance(text_encoder, CLIPTextModel):
        width = text_encoder.config.hidden_size
    elif isinstance(text_encoder, ClassEmbedder):
        width = text_encoder.embed_dim
    else:
        return
    if int(width) != int(context_dim):
        raise CheckpointError(f"{path}: the conditioning model ({COND_PREFIX}*) gives {width}-wide contexts but the "
                              f"U-Net's cross-attention ({UNET_PREFIX}*.attn2.to_k.weight) takes {context_dim} "
                              f"({config_source}); the file mixes models (e.g. SD 1.x and SD 2.x weights) or the "
                              "configuration does not fit it")


def load_original_pipeline(path: str, config: Optional[str] = None, dtype: str = "float32", use_ema: bool = False,
                           prediction_type: Optional[str] = None, attention_impl: str = "xla",
                           tokenizer: Optional[str] = None, vae: Optional[str] = None):
    """A ``Pipeline`` from an original single-file checkpoint (.ckpt / .safetensors).

    Args:
      path: the checkpoint (``state_dict`` wrapper or a plain state dict).
      config: its original inference YAML; None infers the configuration from the keys
        and shapes (see ``original_config`` for what that cannot know).
      dtype: compute dtype ("float32", "bfloat16", "float16"); parameters stay float32.
      use_ema: take the U-Net weights from ``model_ema.*`` (error if the file has none).
      prediction_type: "epsilon" / "v_prediction" / "sample", overriding the YAML's
        ``parameterization`` (needed for SD 2.x 768-v files loaded without a YAML).
      tokenizer: a BERTEmbedder model's (LDM txt2img) vocabulary, which its checkpoint lacks: a
        tokenizer folder or bert-base-uncased's vocab.txt (required there, unused otherwise; not
        for ``use_tokenizer: false``, the layout model, which samples from ``context_ids=``).
      vae: a standalone first-stage file (e.g. ``vae-ft-mse-840000-ema-pruned.ckpt``) whose weights replace the
        checkpoint's ``first_stage_model.*`` (the webui's ``--vae``); it must fit the configured autoencoder.
    Raises:
      CheckpointError: unreadable / truncated file, unsupported configuration, or
        weights that do not fit it (naming the key and both shapes).
    """
    from ldm_jax.pipeline import Pipeline

    if str(dtype) not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    state, global_step = read_original_checkpoint(path)
    check_model_family(state, path)
    if vae is not None:
        state = {**{k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)}, **read_standalone_vae(vae)}
    _check_lora(state, path)
    scale_buffer = state.get("scale_factor")
    # a 0-d buffer (register_buffer('scale_factor', torch.tensor(x))), or (1,) after some re-saving tools
    scale_factor = (None if scale_buffer is None or np.size(scale_buffer) != 1
                    else float(np.asarray(scale_buffer, np.float64).reshape(())))
    if config is None:
        cfg = infer_original_config(state, path)
        config_source = f"inferred from the keys of {os.path.basename(path)}"
    else:
        # the file's schedule buffers win over the YAML's, as in the original (see reconcile_schedule)
        cfg = reconcile_schedule(read_original_yaml(config), state, path)
        config_source = config
    spec = spec_from_original_config(cfg, config_source, prediction_type=prediction_type, scale_factor=scale_factor)
    if spec.cond_stage == "bert" and tokenizer is None:  # fail before converting the U-Net
        from ldm_jax.convert.ldm_bert_weights import bert_uses_tokenizer, missing_tokenizer_error

        if bert_uses_tokenizer(spec.cond_stage_params, config_source):  # use_tokenizer: false takes token ids
            raise missing_tokenizer_error(path)
    _explain_image_conditioning(spec, cfg, state, path, inferred=config is None)
    if config is None and spec.cond_stage == "open_clip" and prediction_type is None:
        step = "" if global_step is None else f" (global_step {global_step})"
        warnings.warn(f"{path}{step}: SD 2.x checkpoint loaded without its YAML: assuming eps-prediction (the "
                      "512-base models). For the 768-v models pass prediction_type='v_prediction' or "
                      "config='v2-inference-v.yaml'.")

    kw = dict(dtype=jnp.dtype(dtype), param_dtype=jnp.float32)
    unet = UNet(unet_config_from_diffusers(spec.unet, source=config_source), attention_impl=attention_impl, **kw)
    unet_target = unet_abstract_params(unet)
    expected = None
    if use_ema and not any(k.startswith(UNET_PREFIX) for k in state):  # an EMA-only file: names from the config
        original = unet_original_name(spec.unet)
        expected = {original(torch_name(p, UNET_LITERAL_NAMES))
                    for p in traverse_util.flatten_dict(_unfreeze(unet_target))}
    weights, rename = prepare_unet(select_unet_weights(state, use_ema, path, expected), spec.unet,
                                   qkv_new_order=spec.qkv_new_order, source=path)
    if not weights:
        raise CheckpointError(f"{path}: no U-Net weights (model.diffusion_model.*)")
    params: Dict[str, Any] = {"unet": _convert(
        weights, unet_target, rename=rename, source=path, config_source=config_source,
        original_name=unet_original_name(spec.unet), literal_names=UNET_LITERAL_NAMES)}

    vae = build_autoencoder(vae_config_from_diffusers(spec.vae, source=config_source),
                            attention_impl=attention_impl, **kw)
    vae_weights = {k: v for k, v in state.items()
                   if k.startswith(VAE_PREFIX) and not k.startswith(VAE_PREFIX + "loss.")}
    vae_weights, vae_rename = prepare_vae(vae_weights, len(vae.config.block_out_channels))
    params["vae"] = _convert(vae_weights, vae_abstract_params(vae), rename=vae_rename, source=path,
                             config_source=config_source,
                             original_name=vae_original_name(len(vae.config.block_out_channels)))

    text_encoder, text_params, tokenizer = _load_cond_stage(spec, state, path, kw, tokenizer)
    _check_context_width(text_encoder, unet, path, config_source)
    if text_encoder is not None:
        params["text_encoder"] = text_params
    layout_builder = None
    if spec.cond_stage == "bert" and tokenizer is None:  # use_tokenizer: false: the layout-to-image model
        layout_builder = released_layout_builder(text_encoder.config)
    cond_stage_model = None
    if spec.cond_stage == "rescaler":
        cond_stage_model, params["cond_stage"] = _load_rescaler(spec, state, path, kw)
    params = place_params(params)
    return Pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, params=params,
                    scheduler_config=spec.scheduler, source=path, sample_size=spec.sample_size,
                    conditioning_key=spec.conditioning_key, cond_stage=spec.cond_stage,
                    cond_stage_model=cond_stage_model, layout_builder=layout_builder,
                    low_res_scheduler_config=spec.low_res_scheduler, max_noise_level=spec.max_noise_level)
