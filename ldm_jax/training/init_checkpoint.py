"""``init.checkpoint``: start LDM training from a released model (fine-tuning).

    python train.py --config configs/sd1_finetune.py --workdir W \\
        --config.init.checkpoint=v1-5-pruned-emaonly.safetensors --config.data.path=IMAGES

``init.checkpoint`` is anything ``ldm_jax.load_pipeline`` reads: a single original
CompVis / Stability ``.ckpt`` / ``.safetensors`` file (``init.original_config``: its YAML,
"" = inferred from the keys; ``init.use_ema``: its ``model_ema.*`` weights), a diffusers
folder or another ``train.py`` workdir. Its U-Net weights become the first step's
parameters (and EMA), its autoencoder and text encoder the frozen stages unless
``first_stage.checkpoint`` / ``text_encoder.checkpoint`` name others (a fixed
``first_stage.scale_factor`` must then be the file's autoencoder's). ``model.unet``
must describe the same U-Net (checked leaf by leaf); ``model.unet = {}`` takes the
checkpoint's. A resumed run restores its own checkpoint and only reuses the frozen
stages from here. Pickles are read with the restricted unpickler (nothing executed).

Which files go with which ``diffusion.concat``:

* a model that takes the latents alone (e.g. SD 1.x / 2.x text-to-image) and a concat that adds
  channels (``"inpainting"``: SD-inpainting's recipe; also ``"low_res"``): the U-Net's first
  convolution is *widened*. ``conv_in``'s kernel gets the new input channels, the checkpoint's
  weights on the first (latent) channels and zeros on the new (concat) ones, so the first step
  computes exactly the checkpoint's function. This is what Stability's
  ``LatentFinetuneDiffusion.init_from_ckpt`` (``finetune_keys`` = ``input_blocks.0.0.weight``,
  ``keep_finetune_dims=4``: ``new = zeros_like(param); new[:, :4] = ckpt``) does, and how
  SD-inpainting was made (runwayml's model card: "5 additional input channels ... whose weights were
  zero-initialized after restoring the non-inpainting checkpoint"). The bias and every other leaf
  must match as they are; any other difference is a ``CheckpointError``. ``model.unet = {}`` takes
  the checkpoint's architecture with ``in_channels`` raised to latent + concat channels.
* an SD 2 x4 upscaler (``Pipeline.is_upscaler``: ``LatentUpscaleDiffusion``, ``low_scale_config``)
  trains only with ``diffusion.concat = "noise_augmented_low_res"``. The file's low-res noise
  schedule and ``max_noise_level`` are the ones the step uses: ``diffusion.low_res_schedule`` /
  ``diffusion.max_noise_level`` left unset (absent or None) take the file's; set, they must
  describe the same schedule (equal betas) / the same level, else a ``ValueError`` naming both.
  Its KL-f4 autoencoder (scale factor 0.08333) and OpenCLIP text encoder are the frozen stages.
* an LDM text-to-image file with a ``BERTEmbedder`` needs ``text_encoder.kind = "ldm_bert"`` and
  the vocabulary in ``text_encoder.tokenizer`` (the file has none); with ``text_encoder.trainable``
  its BERT starts training from the file's weights (``cond_stage_trainable: true``), otherwise it
  is frozen.
* a semantic-synthesis file (CompVis ``semantic_synthesis256`` / ``512``: a ``SpatialRescaler`` cond
  stage) trains only with ``diffusion.concat = "segmentation"``: its U-Net, its first stage (VQ-f4 for
  the released ones, scale factor 1) frozen, and its rescaler's ``channel_mapper`` as the start of
  the trained ``params["cond_stage"]``; ``model.cond_stage`` must repeat the file's rescaler settings
  (n_stages, method, multiplier, in_channels, out_channels, bias) or be ``{}`` to take them.
* a layout-to-image file (``layout2img-openimages256``: a ``BERTEmbedder`` with ``use_tokenizer:
  false``) trains only with ``diffusion.conditioning = "layout"``: its U-Net, its first stage frozen,
  and its LDMBert as the start of the trained layout encoder; ``text_encoder.ldm_bert`` must be the
  file's or ``{}``, and ``data.layout`` must build the file's ids (no_tokens = its vocab_size 8192,
  3 x no_max_objects + 2 crop tokens = its max_seq_len 92).

The training noise schedule and prediction type (``diffusion.num_train_timesteps`` / ``beta_*`` /
``prediction_type``) must be the file's, else a ``ValueError`` names both
(``init.allow_schedule_change = True`` fine-tunes under the config's on purpose).

The file's EMA (``init.use_ema``) covers its U-Net only (the original's ``LitEma`` holds
``model.diffusion_model``), so the rescaler / LDMBert start from the file's weights either way.
See ``scene_conditioning.py`` for the checks.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.errors import CheckpointError
from ldm_jax.training import concat_conditioning as concat_lib
from ldm_jax.training import sharding as shd
from ldm_jax.training.config_access import config_as_dict as _as_dict, config_get as _get

log = logging.getLogger(__name__)

CONV_IN_KERNEL = "conv_in/kernel"  # (kh, kw, in, out): the U-Net's first convolution, HWIO
_IN_AXIS = 2


def load_init_pipeline(init_cfg, dtype: str, attention_impl: str, tokenizer: Optional[str] = None):
    """The ``Pipeline`` of ``init.checkpoint`` (None when unset). ``tokenizer``: the vocabulary
    (vocab.txt / folder) of a single-file LDM txt2img model, whose BERTEmbedder the file lacks."""
    path = str(_get(init_cfg, "checkpoint", "") or "")
    if not path:
        return None
    import ldm_jax

    kwargs: Dict[str, Any] = {}
    if path.endswith((".ckpt", ".safetensors", ".pt", ".pth", ".bin")):
        kwargs["use_ema"] = bool(_get(init_cfg, "use_ema", False))
        if tokenizer:
            kwargs["tokenizer"] = tokenizer
    pipe = ldm_jax.load_pipeline(path, config=_get(init_cfg, "original_config", "") or None, dtype=dtype, **kwargs)

    def with_attention(module):
        return module.clone(attention_impl=attention_impl) if hasattr(module, "attention_impl") else module

    return dataclasses.replace(pipe, unet=with_attention(pipe.unet), vae=with_attention(pipe.vae),
                               text_encoder=None if pipe.text_encoder is None else with_attention(pipe.text_encoder))


def log_main_process(msg: str, *args) -> None:
    """``log.info`` on process 0 only (every host runs the same init, one line is enough)."""
    if jax.process_index() == 0:
        log.info(msg, *args)


def unet_fields_from(pipe, concat: str = "none") -> Dict[str, Any]:
    """The checkpoint U-Net's UNetConfig fields (for ``model.unet = {}``). A checkpoint that takes
    the latents alone, trained with a ``concat`` that adds channels, gets ``in_channels`` = latent +
    concat channels (its conv_in is widened by ``start_unet_params``)."""
    fields = dataclasses.asdict(pipe.unet.config)
    latent = int(pipe.latent_channels)
    extra = concat_lib.num_concat_channels(concat, latent)
    if extra and int(fields["in_channels"]) == latent:
        fields["in_channels"] = latent + extra
        log_main_process("init.checkpoint=%s: model.unet={} takes its U-Net with in_channels %d -> %d (diffusion.concat=%r adds "
             "%d channels; conv_in is widened with zeros for them)", pipe.source, latent, latent + extra, concat, extra)
    return fields


def _shapes(tree) -> Dict[str, Tuple[int, ...]]:
    return {shd.path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _problems(want: Dict[str, tuple], have: Dict[str, tuple]) -> List[str]:
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k} {have[k]}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: checkpoint {have[k]}, model.unet {want[k]}" for k in sorted(set(want) & set(have))
                 if want[k] != have[k]]
    return problems


def _raise_mismatch(problems: List[str], source: str, what: str, note: str = "") -> None:
    shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} in all)" if len(problems) > 6 else "")
    raise CheckpointError(
        f"init.checkpoint={source}: its {what} does not match config.model.unet: {shown}.{note} "
        "Set model.unet to the checkpoint's architecture, or model.unet={} to take it from the checkpoint")


def check_same_structure(expected, got, source: str, what: str = "U-Net") -> None:
    """CheckpointError naming the missing, unexpected and wrongly shaped leaves of ``got``
    against ``expected`` (trees of arrays / ShapeDtypeStructs)."""
    problems = _problems(_shapes(expected), _shapes(got))
    if problems:
        _raise_mismatch(problems, source, what)


def start_unet_params(expected, pipe, concat: str, latent_channels: int):
    """The U-Net weights training starts from: ``pipe``'s, checked leaf by leaf against
    ``expected`` (the trained U-Net's abstract params). The one difference allowed is conv_in's
    input channels when the checkpoint takes the ``latent_channels`` latents alone and ``concat``
    adds the rest: the kernel is widened with zeros for the concat channels (Stability's
    LatentFinetuneDiffusion.init_from_ckpt, see the module docstring)."""
    got = pipe.params["unet"]
    want, have = _shapes(expected), _shapes(got)
    problems = _problems(want, have)
    if not problems:
        return got
    w, h = want.get(CONV_IN_KERNEL), have.get(CONV_IN_KERNEL)
    conv_in_only = (len(problems) == 1 and w is not None and h is not None and len(w) == len(h) == 4
                    and w[:_IN_AXIS] + w[_IN_AXIS + 1:] == h[:_IN_AXIS] + h[_IN_AXIS + 1:])
    extra = concat_lib.num_concat_channels(concat, latent_channels)
    if not (conv_in_only and extra and h[_IN_AXIS] == latent_channels and w[_IN_AXIS] == latent_channels + extra):
        note = ""
        if w is not None and h is not None and w != h:
            note = (f" (conv_in is widened only from a checkpoint that takes the {latent_channels} latent channels "
                    f"alone, to the {latent_channels} + {extra} channels of diffusion.concat={concat!r}, when nothing "
                    "else differs)")
        _raise_mismatch(problems, pipe.source, "U-Net", note)
    old = got["conv_in"]["kernel"]
    # New input channels start at zero: the widened U-Net is the checkpoint's function of the latents,
    # and the concat channels start contributing as their weights train (init_from_ckpt's zeros_like).
    kernel = jnp.zeros(w, old.dtype).at[:, :, :h[_IN_AXIS], :].set(old)
    log_main_process("init.checkpoint=%s: U-Net conv_in widened from %d to %d input channels for diffusion.concat=%r: channels "
         "0..%d are the checkpoint's, %d..%d (the concat channels) start at zero (as Stability's "
         "LatentFinetuneDiffusion.init_from_ckpt)", pipe.source, h[_IN_AXIS], w[_IN_AXIS], concat,
         h[_IN_AXIS] - 1, h[_IN_AXIS], w[_IN_AXIS] - 1)
    return {**got, "conv_in": {**got["conv_in"], "kernel": kernel}}


def start_cond_stage_params(expected, pipe):
    """The semantic-synthesis file's SpatialRescaler weights (its ``channel_mapper``), where the trained
    ``params["cond_stage"]`` starts (the original trains them with the U-Net: cond_stage_trainable),
    checked leaf by leaf against ``expected`` (the rescaler's abstract params)."""
    got = pipe.params["cond_stage"]
    problems = _problems(_shapes(expected), _shapes(got))
    if problems:  # (build_cond_stage has compared the settings; this guards the weights themselves)
        raise CheckpointError(f"init.checkpoint={pipe.source}: its SpatialRescaler weights do not fit "
                              f"model.cond_stage: {'; '.join(problems)}")
    return got


def check_scale_factor(pipe, first_stage_cfg, scale_factor: float) -> None:
    """A fixed ``first_stage.scale_factor`` must be the file's when its autoencoder is the first stage:
    its U-Net was trained on latents scaled so (SD 0.18215, the x4 upscaler 0.08333)."""
    if _get(first_stage_cfg, "checkpoint", "") or _get(first_stage_cfg, "scale_factor", None) is None:
        return
    given, released = _get(first_stage_cfg, "scale_factor"), float(pipe.vae.config.scaling_factor)
    if np.float32(scale_factor) != np.float32(released):
        raise ValueError(f"first_stage.scale_factor={given} but init.checkpoint={pipe.source}'s autoencoder (the "
                         f"first stage) scales its latents by {released:.6g}; set first_stage.scale_factor="
                         f"{released:.6g} or None to take the file's")


def _hashable(value):
    return tuple(value) if isinstance(value, (list, tuple, np.ndarray)) else value


def _same_schedule(config_a, config_b) -> bool:
    """Whether two diffusers scheduler configs give the same noise schedule (length and betas)."""
    from ldm_jax.diffusion.schedule import NoiseSchedule

    a, b = NoiseSchedule.from_diffusers_config(config_a), NoiseSchedule.from_diffusers_config(config_b)
    return a.num_train_timesteps == b.num_train_timesteps and np.allclose(a.betas64, b.betas64, rtol=1e-9, atol=0.0)


def check_schedule(pipe, schedule_config: Dict[str, Any], allow_change: bool) -> None:
    """The training noise schedule (``diffusion.num_train_timesteps`` / ``beta_*``) and prediction
    type against the ones ``pipe`` (the init.checkpoint) was trained with (its scheduler config:
    the YAML's ``linear_start`` / ``linear_end`` / ``parameterization`` for an original file).
    Fine-tuning under another schedule or objective changes what every timestep's output means
    (e.g. an eps-prediction config on an SD 2 768-v file), so a difference is a ``ValueError``
    naming both, unless ``init.allow_schedule_change`` (a deliberate change, as SD 2-v was made from
    SD 2-base), where it is logged."""
    file_config = dict(pipe.scheduler_config)
    differences = []
    if not _same_schedule(schedule_config, file_config):
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas",
                "rescale_betas_zero_snr")
        differences.append(
            f"noise schedule {', '.join(f'{k}={schedule_config[k]!r}' for k in keys if k in schedule_config)} vs the "
            f"file's {', '.join(f'{k}={file_config[k]!r}' for k in keys if file_config.get(k) is not None)}")
    file_prediction = file_config.get("prediction_type") or "epsilon"
    if schedule_config["prediction_type"] != file_prediction:
        differences.append(f"prediction_type={schedule_config['prediction_type']!r} vs the file's {file_prediction!r}")
    if not differences:
        return
    message = f"training config (diffusion.*) and init.checkpoint={pipe.source} differ: {'; '.join(differences)}"
    if not allow_change:
        raise ValueError(f"{message}. Set diffusion.* to the file's values, or init.allow_schedule_change=True to "
                         "fine-tune under the new schedule / objective deliberately")
    if jax.process_index() == 0:
        log.warning("%s (init.allow_schedule_change: training under the config's)", message)


def upscaler_low_res(pipe, diffusion_cfg) -> Tuple[tuple, int]:
    """(low-res schedule as LDMStepConfig.low_res_schedule, max_noise_level) of an x4-upscaler
    ``pipe``: the file's; ``diffusion.low_res_schedule`` / ``diffusion.max_noise_level``, where
    set, must agree with it (the U-Net learnt its class labels as levels of this schedule)."""
    file_schedule = {k: _hashable(v) for k, v in pipe.low_res_scheduler_config.items() if v is not None}
    file_level = int(pipe.max_noise_level)
    given = _as_dict(_get(diffusion_cfg, "low_res_schedule", None))
    if given:
        if not _same_schedule({**concat_lib.LOW_RES_SCHEDULE, **given}, file_schedule):
            raise ValueError(
                f"diffusion.low_res_schedule={given} does not describe init.checkpoint={pipe.source}'s low-res noise "
                f"schedule {file_schedule} (its low_scale_config); set it to that, or to None to take the file's")
    given_level = _get(diffusion_cfg, "max_noise_level", None)
    if given_level is not None and int(given_level) != file_level:
        raise ValueError(f"diffusion.max_noise_level={given_level} but init.checkpoint={pipe.source} was trained with "
                         f"max_noise_level={file_level} (its low_scale_config; the level is its U-Net's class label); "
                         f"set diffusion.max_noise_level={file_level} or None to take the file's")
    return tuple(sorted(file_schedule.items())), file_level
