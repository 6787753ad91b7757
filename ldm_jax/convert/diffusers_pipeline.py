"""A diffusers-format pipeline folder -> ``ldm_jax.Pipeline``.

    folder/model_index.json          which component is which class
    folder/unet/                     UNet2DConditionModel (or UNet2DModel)
    folder/vae/ (or vqvae/)          AutoencoderKL or VQModel (LDMPipeline / LDMSuperResolutionPipeline
                                     name it vqvae)
    folder/text_encoder/, tokenizer/ CLIPTextModel + CLIPTokenizer (absent for unconditional models)
    folder/bert/, tokenizer/         LDMTextToImagePipeline instead: LDMBertModel + BertTokenizer (CompVis
                                     LDM txt2img, ldm-text2im-large-256), prompts padded to 77
    folder/scheduler/scheduler_config.json
    folder/low_res_scheduler/        StableDiffusionUpscalePipeline only: the DDPMScheduler that noises the
                                     low-res image (with model_index.json's max_noise_level, default 350)

Weight files are found as diffusers finds them (``weights_io.find_weights``): ``.safetensors`` or
``.bin`` (torch pickles, read without running code), whole or sharded with an index json, in any
stored dtype (float16 / bfloat16 files are cast to float32 parameters). ``variant="fp16"`` (the
``load_pipeline(..., variant=...)`` keyword, as diffusers' ``from_pretrained(variant=...)``) loads
``diffusion_pytorch_model.fp16.safetensors`` & co. As in diffusers, a component without files of
that variant falls back to its plain files, and a folder with no file of that variant at all is an
error; without ``variant`` a component that only has variant files is an error naming them.

Components this loader does not use (safety_checker, feature_extractor, image_encoder, ...) are
ignored, listed or not. Stable Diffusion XL folders (text_encoder_2 / tokenizer_2) are refused by
name: their second text encoder and added time/text embeddings are not implemented.
"""
from __future__ import annotations

import os
from typing import Optional


from ldm_jax.convert.clip_transformers import load_text_encoder
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.unet_diffusers import load_unet
from ldm_jax.convert.vae_diffusers import load_vae
from ldm_jax.convert.weights_io import available_variants, place_params, read_json
from ldm_jax.text.tokenizer import CLIPTokenizer

_DTYPES = ("float32", "bfloat16", "float16")
_DIFFUSERS_STEMS = ("diffusion_pytorch_model",)
_TRANSFORMERS_STEMS = ("model", "pytorch_model")
# model_index.json components of Stable Diffusion XL (and its refiner): a second CLIP text encoder
# (CLIPTextModelWithProjection) whose pooled output, with the image sizes, feeds the U-Net's
# addition_embed_type "text_time" embedding. Refused by name rather than failing on a missing key.
_SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")


# diffusers' StableDiffusion*Pipeline.__init__ rewrite an "outdated" scheduler config before
# sampling (with a deprecation warning): steps_offset != 1 becomes 1 (a config without the key
# has its class default, 0), clip_sample True becomes False (txt2img / img2img), skip_prk_steps
# False becomes True (inpainting). A folder is run as its model_index.json class runs it.
_PIPELINE_SCHEDULER_FIXES = {
    "StableDiffusionPipeline": ("steps_offset", "clip_sample"),
    "StableDiffusionImg2ImgPipeline": ("steps_offset", "clip_sample"),
    "StableDiffusionInpaintPipeline": ("steps_offset", "skip_prk_steps"),
}
_CLIP_SAMPLE_BY_DEFAULT = ("DDIMScheduler", "DDPMScheduler")  # their clip_sample defaults to True


def as_the_pipeline_class_reads_it(pipeline_class, scheduler_config: dict) -> dict:
    """The saved scheduler config as the diffusers pipeline class ``pipeline_class`` (model_index.json's
    ``_class_name``) leaves it after its __init__ (see _PIPELINE_SCHEDULER_FIXES)."""
    fixes = _PIPELINE_SCHEDULER_FIXES.get(pipeline_class, ())
    if not isinstance(scheduler_config, dict):
        return scheduler_config
    out = dict(scheduler_config)
    if "steps_offset" in fixes:
        out["steps_offset"] = 1
    default_clip = out.get("_class_name") in _CLIP_SAMPLE_BY_DEFAULT
    if "clip_sample" in fixes and out.get("clip_sample", default_clip) is True:
        out["clip_sample"] = False
    if "skip_prk_steps" in fixes and out.get("_class_name") == "PNDMScheduler" and not out.get("skip_prk_steps"):
        out["skip_prk_steps"] = True
    return out


def load_diffusers_pipeline(folder: str, dtype: str = "float32", attention_impl: str = "xla",
                            variant: Optional[str] = None):
    from ldm_jax.pipeline import Pipeline

    if str(dtype) not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    index_path = os.path.join(folder, "model_index.json")
    index = read_json(index_path)
    if not isinstance(index, dict):
        raise CheckpointError(f"{index_path}: expected a JSON object of components, found {type(index).__name__}")
    sdxl = [name for name in _SDXL_COMPONENTS if _present(index, name)]
    if sdxl:
        raise CheckpointError(
            f"{index_path}: {index.get('_class_name', 'this pipeline')} has component(s) {', '.join(sdxl)} "
            "(Stable Diffusion XL): a second text encoder and the U-Net's added text/time embeddings "
            "(addition_embed_type 'text_time') are not implemented; this loader reads SD 1.x/2.x-style folders")
    # diffusers' LDMPipeline / LDMSuperResolutionPipeline call the autoencoder "vqvae"
    vae_name = "vae" if _present(index, "vae") or not _present(index, "vqvae") else "vqvae"
    for required in ("unet", vae_name, "scheduler"):
        if not _present(index, required):
            raise CheckpointError(f"{index_path}: no {required!r} component; this loader needs unet, vae (or vqvae) "
                                  "and scheduler")
    text_name = "text_encoder" if _present(index, "text_encoder") else "bert" if _present(index, "bert") else None
    used = ["unet", vae_name, "scheduler"] + ([text_name, "tokenizer"] if text_name else [])
    for name in used:  # a component listed in model_index.json whose folder is gone
        if not os.path.isdir(os.path.join(folder, name)):
            if _present(index, name):
                raise CheckpointError(f"{index_path}: lists component {name!r} ({'/'.join(map(str, index[name]))}) "
                                      f"but its folder {os.path.join(folder, name)} is missing")
            raise CheckpointError(f"{index_path}: no {name!r} component, and no {name!r} folder, for the "
                                  f"{text_name} to tokenize prompts with")
    variants = _component_variants(folder, {"unet": _DIFFUSERS_STEMS, vae_name: _DIFFUSERS_STEMS,
                                            **({text_name: _TRANSFORMERS_STEMS} if text_name else {})}, variant)
    kw = dict(dtype=dtype, param_dtype="float32", attention_impl=attention_impl)
    unet, unet_params = load_unet(os.path.join(folder, "unet"), variant=variants["unet"], **kw)
    vae, vae_params = load_vae(os.path.join(folder, vae_name), variant=variants[vae_name], **kw)
    text_encoder = tokenizer = None
    params = {"unet": unet_params, "vae": vae_params}
    if text_name == "text_encoder":
        text_encoder, params["text_encoder"] = load_text_encoder(
            os.path.join(folder, "text_encoder"), variant=variants["text_encoder"], **kw)
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    elif text_name == "bert":
        from ldm_jax.convert.ldm_bert_weights import load_ldm_bert
        from ldm_jax.text.bert_tokenizer import BERTTokenizer

        text_encoder, params["text_encoder"] = load_ldm_bert(os.path.join(folder, "bert"), variant=variants["bert"],
                                                             **kw)
        # padded to the position table (77; diffusers hard-codes 77), not the saved model_max_length ("unset")
        tokenizer = BERTTokenizer.from_pretrained(os.path.join(folder, "tokenizer"),
                                                  max_length=text_encoder.config.max_position_embeddings)
    elif unet.config.uses_cross_attention:
        # diffusers' StableDiffusionPipeline refuses such a folder too (text_encoder is a required component)
        raise CheckpointError(f"{index_path}: the U-Net has cross-attention (cross_attention_dim="
                              f"{unet.config.cross_attention_dim}) but there is no text_encoder (or bert) component "
                              "to condition it")
    scheduler_config = as_the_pipeline_class_reads_it(
        index.get("_class_name"), read_json(os.path.join(folder, "scheduler", "scheduler_config.json")))
    unet_json = read_json(os.path.join(folder, "unet", "config.json"))
    sample_size = unet_json.get("sample_size") or 64
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    params = place_params(params)
    extra = {}
    if index.get("_class_name") == "LDMSuperResolutionPipeline":  # latents + the low-res image in [-1, 1]
        extra = dict(conditioning_key="concat", cond_stage="identity")
    elif index.get("_class_name") == "StableDiffusionUpscalePipeline":
        # latents + the noise-augmented low-res image, the noise level as the class label (the SD 2 x4
        # upscaler; diffusers' default max_noise_level is 350)
        if not _present(index, "low_res_scheduler"):
            raise CheckpointError(f"{index_path}: a StableDiffusionUpscalePipeline needs its low_res_scheduler")
        low_res = read_json(os.path.join(folder, "low_res_scheduler", "scheduler_config.json"))
        max_level = index.get("max_noise_level", 350)
        if isinstance(max_level, bool) or not isinstance(max_level, int) or max_level < 1:
            raise CheckpointError(f"{index_path}: max_noise_level={max_level!r} is not a positive integer")
        extra = dict(conditioning_key="hybrid-adm", low_res_scheduler_config=low_res, max_noise_level=max_level)
    return Pipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, params=params,
                    scheduler_config=scheduler_config, source=folder, sample_size=int(sample_size), **extra)


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None


def _component_variants(folder: str, stems: dict, variant: Optional[str]) -> dict:
    """Component -> the weight variant to load it with. As diffusers' ``variant_compatible_siblings``:
    with ``variant`` set, each component that has files of that variant loads them, the others fall
    back to their plain files; no component with that variant at all is an error."""
    if variant is None:
        return {name: None for name in stems}
    if not isinstance(variant, str) or not variant or "/" in variant:
        raise ValueError(f"variant must be a file-name tag such as 'fp16', got {variant!r}")
    found = {name: available_variants(os.path.join(folder, name), s) for name, s in stems.items()}
    out = {name: variant if variant in v else None for name, v in found.items()}
    if not any(out.values()):
        others = sorted({str(v) for f in found.values() for v in f if v is not None})
        raise CheckpointError(
            f"{folder}: no weight files of variant={variant!r} in {', '.join(stems)}"
            + (f" (variants present: {', '.join(others)})" if others else " (only plain files: drop variant=)"))
    return out

