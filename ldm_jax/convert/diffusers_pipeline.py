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
"""
from __future__ import annotations

import os
from typing import Optional


from ldm_jax.convert.clip_transformers import load_text_encoder
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.unet_diffusers import load_unet
from ldm_jax.convert.vae_diffusers import load_vae
from ldm_jax.convert.weights_io import place_params, read_json
from ldm_jax.text.tokenizer import CLIPTokenizer

_DTYPES = ("float32", "bfloat16", "float16")


def load_diffusers_pipeline(folder: str, dtype: str = "float32", attention_impl: str = "xla",
                            variant: Optional[str] = None):
    from ldm_jax.pipeline import Pipeline

    if str(dtype) not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    index_path = os.path.join(folder, "model_index.json")
    index = read_json(index_path)
    # diffusers' LDMPipeline / LDMSuperResolutionPipeline call the autoencoder "vqvae"
    vae_name = "vae" if _present(index, "vae") or not _present(index, "vqvae") else "vqvae"
    for required in ("unet", vae_name, "scheduler"):
        if not _present(index, required):
            raise CheckpointError(f"{index_path}: no {required!r} component; this loader needs unet, vae (or vqvae) "
                                  "and scheduler")
    kw = dict(dtype=dtype, param_dtype="float32", attention_impl=attention_impl)
    unet, unet_params = load_unet(os.path.join(folder, "unet"), variant=variant, **kw)
    vae, vae_params = load_vae(os.path.join(folder, vae_name), variant=variant, **kw)
    text_encoder = tokenizer = None
    params = {"unet": unet_params, "vae": vae_params}
    if _present(index, "text_encoder"):
        text_encoder, params["text_encoder"] = load_text_encoder(os.path.join(folder, "text_encoder"), **kw)
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    elif _present(index, "bert"):
        from ldm_jax.convert.ldm_bert_weights import load_ldm_bert
        from ldm_jax.text.bert_tokenizer import BERTTokenizer

        text_encoder, params["text_encoder"] = load_ldm_bert(os.path.join(folder, "bert"), variant=variant, **kw)
        # padded to the position table (77; diffusers hard-codes 77), not the saved model_max_length ("unset")
        tokenizer = BERTTokenizer.from_pretrained(os.path.join(folder, "tokenizer"),
                                                  max_length=text_encoder.config.max_position_embeddings)
    scheduler_config = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
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
