"""A ``train.py`` LDM workdir -> ``ldm_jax.Pipeline`` (for sample.py and load_pipeline).

    workdir/config.json        the run's configuration (written by train.py)
    workdir/checkpoints/N/     orbax checkpoints (params, EMA params, metadata)
    workdir/tokenizer/         the BERT vocabulary of a text_encoder.kind="ldm_bert" run

The U-Net weights (and the text encoder's, when it was trained jointly) are the EMA
weights when the run kept them; the frozen first stage and a frozen text encoder
are rebuilt from the configuration exactly as training built them, and the latent
scale factor comes from the checkpoint metadata (``scale_by_std``). A concat-conditioned
run (``diffusion.concat``) gets the ``conditioning_key`` / ``cond_stage`` that make the
Pipeline build its extra U-Net channels as training did (``LDMTask.pipeline_conditioning``):
super-resolution samples with ``cond_image=`` (the low-res image, output f times larger),
inpainting with ``init_image=`` and ``mask=``; a noise-augmented upscaler run
("noise_augmented_low_res": conditioning_key "hybrid-adm", its low-res schedule and max_noise_level)
with ``cond_image=`` and ``noise_level=``; a semantic-synthesis run ("segmentation") gets its trained
SpatialRescaler as ``cond_stage_model`` / ``params["cond_stage"]`` and samples with ``segmentation=``
(label maps at the image size). An LDMBert run (``text_encoder.kind="ldm_bert"``) tokenizes with the
vocabulary saved as ``workdir/tokenizer/``; a layout run (``diffusion.conditioning="layout"``) has no
tokenizer and samples with ``context_ids=`` (``ldm_jax.data.layout_tokens`` ids); its
``Pipeline.layout_builder`` is the run's ``data.layout`` builder (``sample.py --layout``).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.weights_io import read_json


def is_train_workdir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints"))


def load_workdir_pipeline(workdir: str, dtype: str = "float32", use_ema: bool = True):
    from ldm_jax.pipeline import Pipeline
    from ldm_jax.training import sharding as shd
    from ldm_jax.training.checkpoint import CheckpointManager
    from ldm_jax.training import scene_conditioning as scene_lib
    from ldm_jax.training.ldm_task import WORKDIR_TOKENIZER, LDMTask

    config_path = os.path.join(workdir, "config.json")
    config = ml_collections.ConfigDict(read_json(config_path))
    if config.get("task", "ldm") != "ldm":
        raise CheckpointError(f"{workdir}: a {config.task!r} training run, not a latent diffusion model; "
                              "sample from the workdir of an LDM run (configs/emoji_ldm.py)")
    config.model.dtype = str(dtype)
    te_cfg = config.get("text_encoder", None)
    tok_dir = os.path.join(workdir, WORKDIR_TOKENIZER)
    if te_cfg is not None and te_cfg.get("kind", "clip") == "ldm_bert" and os.path.isdir(tok_dir):
        # The vocabulary train.py copied into the workdir, not the (maybe moved) path it trained from.
        te_cfg.tokenizer = tok_dir
    mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])
    task = LDMTask(config, mesh)
    manager = CheckpointManager(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        restored = manager.restore_latest(task.abstract_state())
    finally:
        manager.close()
    if restored is None:
        raise CheckpointError(f"{workdir}: no checkpoint under checkpoints/ yet")
    state, extra = restored
    task.load_metadata(extra)
    unet_params, te_params = task.trained_params(state, use_ema)
    params = {"unet": unet_params, "vae": task.frozen["vae"]}
    if task.text_encoder is not None:
        params["text_encoder"] = te_params
    if task.cond_stage is not None:  # semantic synthesis: the trained SpatialRescaler
        params["cond_stage"] = task.cond_stage_params(state, use_ema)
    vae = task.vae.clone(config=dataclasses.replace(task.vae.config, scaling_factor=task.scale_factor))
    # The sampler options a freshly trained model wants: no x0 clipping (latents are unit-variance,
    # not images), SD's leading spacing with offset 1.
    scheduler_config = dict(task.schedule_config, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                            timestep_spacing="leading")
    image_size = int(config.data.get("image_size", 32))
    # Concat-conditioned runs (diffusion.concat): conditioning_key / cond_stage make the Pipeline build the
    # concatenated channels as the train step did (cond_image= for SR, init_image= + mask= for inpainting).
    return Pipeline(unet=task.unet, vae=vae, text_encoder=task.text_encoder, tokenizer=task.tokenizer,
                    params=params, scheduler_config=scheduler_config, source=workdir,
                    sample_size=image_size // vae.config.downsample_factor, **task.pipeline_conditioning(),
                    layout_builder=(scene_lib.layout_sampling_builder(config) if task.conditioning == "layout"
                                    else None))
