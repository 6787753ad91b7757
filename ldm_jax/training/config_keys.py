"""The training config's keys beyond the loop's (``config_access.check_train_config``): ``model.*``
(U-Net, autoencoder, cond stage), ``first_stage.*``, ``text_encoder.*``, ``init.*``, ``diffusion.*``,
``data.*``, ``sample.*``, ``mesh.*``, ``eval.*``, ``loss.*``, checked by ``check_config_keys`` before a
task is built (``loop.prepare``), so that a wrong type, an out-of-range value, an unknown name or a
missing file is one ValueError ``config key a.b=VALUE: what is allowed`` instead of a
ZeroDivisionError / reshape error from inside a model, or a crash at the first sample grid.
"""
from __future__ import annotations

import os
from typing import Any, Dict

from ldm_jax.training.config_access import _MISSING, _is_int, _is_number, config_as_dict, config_get


# Each rule: value -> None (fine) or what is allowed.
def _int_rule(low=None, none_ok=False, note=""):
    def rule(v):
        if v is None and none_ok:
            return None
        bound = "" if low is None else f" >= {low}"
        if not _is_int(v):
            return f"expected an integer{bound}{' or None' if none_ok else ''}{note}"
        if low is not None and v < low:
            return f"must be{bound}{note}"
        return None
    return rule


def _num_rule(low=None, high=None, low_open=False, high_open=False, none_ok=False, note=""):
    def rule(v):
        if v is None and none_ok:
            return None
        if low is not None and high is not None:
            bound = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            bound = f" {'>' if low_open else '>='} {low:g}"
        else:
            bound = ""
        if not _is_number(v):
            return f"expected a finite number{bound}{' or None' if none_ok else ''}{note}"
        if ((low is not None and (v <= low if low_open else v < low))
                or (high is not None and (v >= high if high_open else v > high))):
            return f"must be{bound}{note}"
        return None
    return rule


def _ints_rule(low=1, scalar_ok=True, none_ok=False, nonempty=True, note=""):
    """An integer (when scalar_ok) or a tuple of integers, each >= low."""
    def rule(v):
        if v is None and none_ok:
            return None
        items = (v,) if (scalar_ok and _is_int(v)) else v
        what = ("an integer or " if scalar_ok else "") + f"a tuple of integers >= {low}"
        if not isinstance(items, (tuple, list)) or not all(_is_int(i) for i in items):
            return f"expected {what}{' or None' if none_ok else ''}{note}"
        if nonempty and not items:
            return f"expected {what}, not an empty tuple{note}"
        if any(i < low for i in items):
            return f"expected {what}{note}"
        return None
    return rule


def _choice_rule(options, tuple_ok=False):
    def rule(v):
        items = v if (tuple_ok and isinstance(v, (tuple, list))) else (v,)
        bad = [i for i in items if not (isinstance(i, (str, type(None))) and i in options)]
        if bad or (tuple_ok and not items):
            return f"expected {'a tuple of names from' if tuple_ok else 'one of'} {tuple(options)}"
        return None
    return rule


def _pair_rule(low=0.0, high=1.0):
    def rule(v):
        if (not isinstance(v, (tuple, list)) or len(v) != 2 or not all(_is_number(i) for i in v)
                or not low <= v[0] <= v[1] <= high):
            return f"expected (min, max) with {low:g} <= min <= max <= {high:g}"
        return None
    return rule


def _layer_counts_rule(v):
    """transformer_layers_per_block: an integer, one per block, or per-block tuples of per-layer counts."""
    items = [v] if _is_int(v) else list(v) if isinstance(v, (tuple, list)) else None
    if items is not None:
        items = [j for i in items for j in (i if isinstance(i, (tuple, list)) else (i,))]
    if not items or not all(_is_int(i) and i >= 1 for i in items):
        return "expected an integer >= 1, a tuple of them (one per block) or per-block tuples of them"
    return None


def _str_rule(v):
    return None if isinstance(v, str) else "expected a string"


def _strs_rule(v):
    if v is None or (isinstance(v, (tuple, list)) and all(isinstance(i, str) for i in v)):
        return None
    return "expected a tuple of strings (or None: the task's default)"


def _regex_rule(v):
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        return "expected a regular expression (a string) or None"
    import re

    try:
        re.compile(v)
    except re.error as e:
        return f"not a valid regular expression ({e})"
    return None


def _path_rule(kind="path"):
    """"" (unset) or an existing file / directory; remote paths (gs://, ...) are not checked here."""
    def rule(v):
        if v is None or v == "":
            return None
        if not isinstance(v, str):
            return f"expected a {kind} (a string)"
        if "://" in v or os.path.exists(v):
            return None
        return f"no such file or directory (expected a {kind})"
    return rule


def _paths_rule(v):
    if not isinstance(v, (tuple, list)) or not all(isinstance(i, str) for i in v):
        return "expected a tuple of file paths"
    missing = [p for p in v if "://" not in p and not os.path.isfile(p)]
    return f"no such file: {missing[0]!r}" if missing else None


def _mesh_axis_rule(v):
    if _is_int(v) and (v == -1 or v >= 1):
        return None
    return "expected an integer >= 1, or -1 (all devices the other axis leaves)"


def _mesh_rules_rule(v):
    import re

    if not isinstance(v, (tuple, list)):
        return "expected a tuple of (regex, PartitionSpec tuple) pairs"
    for r in v:
        if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)):
            return f"expected a tuple of (regex, PartitionSpec tuple) pairs, got the entry {r!r}"
        try:
            re.compile(r[0])
        except re.error as e:
            return f"the rule {r[0]!r} is not a valid regular expression ({e})"
    return None


def _key_rules():
    """{dotted key: rule}; ``*`` stands for the section of an autoencoder's fields."""
    from ldm_jax.diffusion.losses import LOSS_TYPES, PREDICTION_TYPES
    from ldm_jax.models.clip import _ACTIVATIONS as CLIP_ACTIVATIONS
    from ldm_jax.models.discriminator import NORMS as DISC_NORMS
    from ldm_jax.models.spatial_rescaler import METHODS as RESCALER_METHODS
    from ldm_jax.training.autoencoder_losses import DISC_LOSSES, PIXEL_LOSSES
    from ldm_jax.training.concat_conditioning import CONCATS
    from ldm_jax.training.ldm_task import CONDITIONINGS, TEXT_ENCODER_KINDS
    from ldm_jax.models.conv import CONV_IMPLS
    from ldm_jax.models.layers import ACTIVATIONS, ATTENTION_IMPLS
    from ldm_jax.models.unet import DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS

    positive, count = _int_rule(1), _int_rule(0)
    rules = {
        "mesh.data": _mesh_axis_rule, "mesh.fsdp": _mesh_axis_rule, "mesh.min_fsdp_size": count,
        "mesh.rules": _mesh_rules_rule,
        "model.attention_impl": _choice_rule(ATTENTION_IMPLS),
        # U-Net (UNetConfig fields)
        "model.unet.in_channels": positive, "model.unet.out_channels": positive,
        "model.unet.block_out_channels": _ints_rule(1, scalar_ok=False),
        "model.unet.down_block_types": _choice_rule(tuple(DOWN_BLOCKS), tuple_ok=True),
        "model.unet.up_block_types": _choice_rule(tuple(UP_BLOCKS), tuple_ok=True),
        "model.unet.mid_block_type": _choice_rule(MID_BLOCKS),
        "model.unet.layers_per_block": _ints_rule(0),
        "model.unet.mid_block_num_layers": count,
        "model.unet.transformer_layers_per_block": _layer_counts_rule,
        "model.unet.num_heads": _ints_rule(1, none_ok=True), "model.unet.head_dim": _ints_rule(1, none_ok=True),
        "model.unet.cross_attention_dim": _ints_rule(1, none_ok=True),
        "model.unet.norm_num_groups": positive, "model.unet.attn_norm_num_groups": _int_rule(1, none_ok=True),
        "model.unet.norm_eps": _num_rule(0.0, low_open=True),
        "model.unet.num_class_embeds": _int_rule(1, none_ok=True),
        "model.unet.time_embedding_dim": _int_rule(1, none_ok=True),
        "model.unet.dropout": _num_rule(0.0, 1.0, high_open=True),
        "model.unet.conv_impl": _choice_rule(CONV_IMPLS),
        # the LDM's SpatialRescaler (semantic synthesis)
        "model.cond_stage.n_stages": count, "model.cond_stage.in_channels": positive,
        "model.cond_stage.out_channels": _int_rule(1, none_ok=True),
        "model.cond_stage.method": _choice_rule(RESCALER_METHODS),
        "model.cond_stage.multiplier": _num_rule(0.0, low_open=True),
        # autoencoder fields (first_stage.autoencoder of an LDM, model.autoencoder of a first-stage run)
        "*.kind": _choice_rule(("kl", "vq")), "*.in_channels": positive, "*.out_channels": positive,
        "*.latent_channels": positive, "*.block_out_channels": _ints_rule(1, scalar_ok=False),
        "*.layers_per_block": positive, "*.norm_num_groups": positive,
        "*.attention_levels": _ints_rule(0, scalar_ok=False, nonempty=False),
        "*.num_vq_embeddings": positive, "*.vq_embed_dim": _int_rule(1, none_ok=True),
        "*.beta": _num_rule(0.0), "*.scaling_factor": _num_rule(0.0, low_open=True),
        "*.shift_factor": _num_rule(none_ok=True), "*.conv_impl": _choice_rule(CONV_IMPLS),
        "model.kind": _choice_rule(("kl", "vq")), "model.codebook_init": _choice_rule(("uniform", "data")),
        "first_stage.checkpoint": _path_rule("diffusers vae/ folder or autoencoder workdir"),
        "first_stage.seed": _int_rule(), "first_stage.scale_factor": _num_rule(0.0, low_open=True, none_ok=True),
        # text encoder
        "text_encoder.kind": _choice_rule(TEXT_ENCODER_KINDS),
        "text_encoder.checkpoint": _path_rule("model folder"), "text_encoder.tokenizer": _path_rule("tokenizer"),
        "text_encoder.seed": _int_rule(), "text_encoder.pad_token_id": count,
        "text_encoder.max_length": _int_rule(0, none_ok=True, note=" (0: the encoder's max_position_embeddings)"),
        "text_encoder.clip.vocab_size": positive, "text_encoder.clip.hidden_size": positive,
        "text_encoder.clip.intermediate_size": positive, "text_encoder.clip.num_layers": count,
        "text_encoder.clip.num_heads": positive, "text_encoder.clip.max_position_embeddings": positive,
        "text_encoder.clip.hidden_act": _choice_rule(CLIP_ACTIVATIONS),
        "text_encoder.clip.layer_norm_eps": _num_rule(0.0, low_open=True),
        "text_encoder.ldm_bert.hidden_act": _choice_rule(ACTIVATIONS),
        "text_encoder.ldm_bert.layer_norm_eps": _num_rule(0.0, low_open=True),
        **{f"text_encoder.ldm_bert.{k}": positive for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                                             "head_dim", "intermediate_size",
                                                             "max_position_embeddings")},
        # init checkpoint
        "init.checkpoint": _path_rule("checkpoint file, diffusers folder or train.py workdir"),
        "init.original_config": _path_rule("YAML file"),
        # objective
        "diffusion.conditioning": _choice_rule(CONDITIONINGS),
        "diffusion.concat": _choice_rule(CONCATS),
        "diffusion.prediction_type": _choice_rule(PREDICTION_TYPES),
        "diffusion.loss_type": _choice_rule(LOSS_TYPES),
        "diffusion.min_snr_gamma": _num_rule(0.0, low_open=True, none_ok=True, note=" (None: no min-SNR weighting)"),
        "diffusion.offset_noise": _num_rule(), "diffusion.input_perturbation": _num_rule(0.0),
        "diffusion.cond_drop_prob": _num_rule(0.0, 1.0), "diffusion.num_classes": _int_rule(1, none_ok=True),
        "diffusion.null_class": _int_rule(0, none_ok=True), "diffusion.max_noise_level": positive,
        "diffusion.low_res_schedule.num_train_timesteps": _int_rule(2),
        "diffusion.low_res_schedule.beta_start": _num_rule(0.0, 1.0, high_open=True),
        "diffusion.low_res_schedule.beta_end": _num_rule(0.0, 1.0, high_open=True),
        "diffusion.l_simple_weight": _num_rule(0.0), "diffusion.original_elbo_weight": _num_rule(0.0),
        "diffusion.logvar_init": _num_rule(), "diffusion.v_posterior": _num_rule(0.0, 1.0),
        "diffusion.inpainting_masks.box_prob": _num_rule(0.0, 1.0),
        "diffusion.inpainting_masks.full_prob": _num_rule(0.0, 1.0),
        "diffusion.inpainting_masks.max_shapes": positive, "diffusion.inpainting_masks.stroke_vertices": _int_rule(2),
        **{f"diffusion.inpainting_masks.{k}": _pair_rule() for k in ("box_size", "stroke_length", "stroke_width")},
        # data
        "data.name": _str_rule, "data.exclude_captions": _regex_rule, "data.num_examples": positive,
        "data.num_classes": _int_rule(1, none_ok=True), "data.ignore_label": _int_rule(none_ok=True),
        "data.num_epochs": _int_rule(1, none_ok=True), "data.num_threads": positive,
        "data.prefetch_batches": count,
        "data.layout.no_tokens": positive, "data.layout.no_max_objects": positive,
        "data.layout.no_object_classes": _int_rule(1, none_ok=True), "data.layout.min_objects_per_image": count,
        "data.layout.min_object_area": _num_rule(0.0, 1.0),
        # sample grids
        "sample.num_inference_steps": positive, "sample.guidance_scale": _num_rule(), "sample.seed": _int_rule(),
        "sample.prompts": _strs_rule, "sample.class_labels": _ints_rule(0, scalar_ok=False, nonempty=False),
        "sample.num_images": positive, "sample.images": _paths_rule, "sample.segmentations": _paths_rule,
        "sample.eta": _num_rule(0.0),
        # first-stage training: evaluation and loss
        "eval.batch_size": positive, "eval.num_batches": _int_rule(0, note=" (0: the whole split)"),
        "eval.num_images": count, "eval.split": _str_rule,
        "loss.disc_start": _int_rule(0, note=" (the step the discriminator joins)"),
        "loss.disc_ndf": positive, "loss.disc_num_layers": count, "loss.disc_norm_groups": positive,
        "loss.logvar_init": _num_rule(), "loss.lpips_weights": _path_rule("LPIPS weights file"),
        "loss.disc_loss": _choice_rule(DISC_LOSSES), "loss.pixel_loss": _choice_rule(PIXEL_LOSSES),
        "loss.disc_norm": _choice_rule(DISC_NORMS), "loss.pixelloss_weight": _num_rule(0.0),
        **{f"loss.{k}": _num_rule(0.0) for k in ("disc_weight", "disc_factor", "kl_weight", "perceptual_weight",
                                                  "codebook_weight")},
    }
    return rules


def _lookup(config, key: str):
    value = config
    for part in key.split("."):
        try:
            value = value[part]
        except (KeyError, AttributeError, TypeError, IndexError):
            return _MISSING
    return value


def check_config_keys(config) -> None:
    """The keys beyond the loop's (``check_train_config``): ``model.*`` (U-Net, autoencoder, cond stage),
    ``first_stage.*``, ``text_encoder.*``, ``init.*`` paths, ``diffusion.*``, ``data.*``, ``sample.*``,
    ``mesh.*``, ``eval.*``, ``loss.*``. A wrong type, an out-of-range value, an unknown name or a
    missing file is a ValueError ``config key a.b=VALUE: what is allowed``; keys a config does not
    have are skipped, and so are values the reference code accepts (a negative guidance scale,
    layers_per_block=0, ...). Combinations of keys are checked after (``_check_combinations``)."""
    rules = _key_rules()
    ae_sections = ["first_stage.autoencoder"]
    autoencoder_task = config_get(config, "task", "ldm") == "autoencoder"
    if autoencoder_task:
        ae_sections.append("model.autoencoder")
    for key, rule in rules.items():
        keys = [key.replace("*", s, 1) for s in ae_sections] if key.startswith("*.") else [key]
        for name in keys:
            v = _lookup(config, name)
            if v is _MISSING:
                continue
            problem = rule(v)
            if problem:
                raise ValueError(f"config key {name}={v!r}: {problem}")
    _check_combinations(config, ae_sections)
    name = _lookup(config, "data.name")
    if name is not _MISSING:
        from ldm_jax.data.pipeline import check_dataset_name

        # The splits the run reads: "train" for training, eval.split for the autoencoder's evaluations.
        splits = {"data.name": "train"}
        enabled, split = _lookup(config, "eval.enabled"), _lookup(config, "eval.split")
        if autoencoder_task and (enabled in (_MISSING, None) or bool(enabled)):
            splits["eval.split"] = "validation" if split in (_MISSING, None) else split
        check_dataset_name(name, _lookup(config, "data.data_dir") or None, splits)


def _section(config, key: str) -> Dict[str, Any]:
    """The dict at dotted ``key`` ({} when missing or None)."""
    value = _lookup(config, key)
    return {} if value is _MISSING or value is None else config_as_dict(value)


def _as_tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _check_combinations(config, ae_sections) -> None:
    """Keys that must agree with each other; the dataclasses' own checks (UNetConfig, AutoencoderConfig,
    CLIPTextConfig, ...) with their message prefixed by the config section."""
    unet = _section(config, "model.unet")
    if unet and "block_out_channels" in unet:  # (else UNetConfig's default widths: _build checks)
        n = len(_as_tuple(unet["block_out_channels"]))
        for key in ("down_block_types", "up_block_types"):
            if key in unet and len(_as_tuple(unet[key])) != n:
                raise ValueError(f"config key model.unet.{key}={unet[key]!r}: expected {n} block types, one per "
                                 f"model.unet.block_out_channels={unet.get('block_out_channels')!r}")
        for key in ("layers_per_block", "num_heads", "head_dim", "cross_attention_dim"):
            if isinstance(unet.get(key), (tuple, list)) and len(unet[key]) != n:
                raise ValueError(f"config key model.unet.{key}={unet[key]!r}: expected one integer or {n} (one per "
                                 "model.unet.block_out_channels)")
    if unet:
        from ldm_jax.models.unet import UNetConfig

        _build("model.unet", UNetConfig, unet)
    for section in ae_sections:
        fields = _section(config, section)
        if not fields or (section == "first_stage.autoencoder" and not _ae_is_built(config)):
            continue
        if section == "model.autoencoder":
            fields = {**fields, "kind": config_get(_lookup(config, "model"), "kind", "kl")}
        from ldm_jax.models.autoencoder import AutoencoderConfig

        ae = _build(section, AutoencoderConfig, fields)
        size = _lookup(config, "data.image_size")
        if _is_int(size) and size % ae.downsample_factor:
            raise ValueError(f"config key data.image_size={size}: not divisible by the autoencoder's factor "
                             f"{ae.downsample_factor} ({section}.block_out_channels has "
                             f"{len(ae.block_out_channels)} levels: f = 2^{len(ae.block_out_channels) - 1})")
    te = _lookup(config, "text_encoder")
    clip = _section(config, "text_encoder.clip")
    if (clip and not config_get(te, "checkpoint", "") and config_get(te, "kind", "clip") == "clip"
            and not config_get(_lookup(config, "init"), "checkpoint", "")):  # (else a loaded encoder: its config)
        from ldm_jax.models.clip import CLIPTextConfig

        clip_cfg = _build("text_encoder.clip", CLIPTextConfig, clip)
        length = config_get(te, "max_length", 0)
        if _is_int(length) and length > clip_cfg.max_position_embeddings:
            raise ValueError(f"config key text_encoder.max_length={length}: must be <= text_encoder.clip."
                             f"max_position_embeddings={clip_cfg.max_position_embeddings} (0: that length)")
        pad = config_get(te, "pad_token_id", None)
        if _is_int(pad) and pad >= clip_cfg.vocab_size:
            raise ValueError(f"config key text_encoder.pad_token_id={pad}: must be below text_encoder.clip."
                             f"vocab_size={clip_cfg.vocab_size}")
    if (config_get(_lookup(config, "diffusion"), "conditioning", "text") == "class" and unet
            and unet.get("num_class_embeds") is None and unet.get("class_embed_type") is None):
        raise ValueError("config key diffusion.conditioning='class': the label goes through the U-Net's class "
                         "embedding, which model.unet.num_class_embeds (None here) sizes; set it to the number of "
                         "classes, or use diffusion.conditioning='class_crossattn' with diffusion.num_classes")
    diff = _section(config, "diffusion")
    level, low_res = diff.get("max_noise_level"), diff.get("low_res_schedule") or {}
    steps = low_res.get("num_train_timesteps", 1000)
    if diff.get("concat") == "noise_augmented_low_res" and _is_int(level) and _is_int(steps) and level > steps:
        raise ValueError(f"config key diffusion.max_noise_level={level}: must be <= the low-res schedule's "
                         f"{steps} steps (diffusion.low_res_schedule.num_train_timesteps)")
    labels = _lookup(config, "sample.class_labels")
    classes = {"class": ("model.unet.num_class_embeds", unet.get("num_class_embeds")),
               "class_crossattn": ("diffusion.num_classes", diff.get("num_classes"))}.get(diff.get("conditioning"))
    if classes and _is_int(classes[1]) and isinstance(labels, (tuple, list)) \
            and any(_is_int(i) and i >= classes[1] for i in labels):
        raise ValueError(f"config key sample.class_labels={labels!r}: the labels must be below {classes[0]}="
                         f"{classes[1]}")
    data_axis, fsdp_axis = _lookup(config, "mesh.data"), _lookup(config, "mesh.fsdp")
    if data_axis == -1 and fsdp_axis == -1:
        raise ValueError("config keys mesh.data=-1 and mesh.fsdp=-1: at most one axis may be -1 (all devices the "
                         "other axis leaves)")
    loss = _section(config, "loss")
    if config_get(config, "task", "ldm") == "autoencoder" and loss:
        # The discriminator the loss builds (use_actnorm switches the norm; GroupNorm groups must divide
        # its widths): autoencoder_losses.discriminator_config, its errors named as config keys.
        from ldm_jax.training.autoencoder_losses import discriminator_config

        channels = _section(config, "model.autoencoder").get("in_channels", 3)
        try:
            discriminator_config(loss, channels if _is_int(channels) else 3, where="config key loss")
        except ValueError as e:
            text = str(e)
            if text.startswith("DiscriminatorConfig"):
                text = (f"config keys loss.disc_ndf={loss.get('disc_ndf', 64)!r}, loss.disc_norm_groups="
                        f"{loss.get('disc_norm_groups', 32)!r}: {text}")
            raise ValueError(text) from None
    init = _lookup(config, "init")
    if init is not _MISSING and config_get(init, "original_config", "") and not config_get(init, "checkpoint", ""):
        raise ValueError(f"config key init.original_config={config_get(init, 'original_config')!r}: it describes "
                         "init.checkpoint's model, which is not set (set init.checkpoint, or leave this '')")
    fs = _section(config, "first_stage")
    if (config_get(config, "task", "ldm") == "ldm" and fs and not fs.get("checkpoint") and not fs.get("random_init")
            and not config_get(_lookup(config, "init"), "checkpoint", "")):
        raise ValueError(f"config key first_stage.random_init={fs.get('random_init')!r}: with no first_stage.checkpoint "
                         "(and no init.checkpoint) the first stage has no weights; set first_stage.checkpoint (a "
                         "diffusers vae/ folder or an autoencoder workdir) or first_stage.random_init=True")
    data = _section(config, "data")
    if data.get("name") in ("folder", "segmentation_folder", "coco_layout"):
        path = data.get("path")
        if not path or not isinstance(path, str):
            raise ValueError(f"config key data.path={path!r}: data.name={data['name']!r} needs data.path, the "
                             "directory of the images (--config.data.path=DIR)")
        if "://" not in path and not os.path.isdir(path):
            why = "is a file, not a folder" if os.path.exists(path) else "does not exist"
            raise ValueError(f"config key data.path={path!r}: {why} (data.name={data['name']!r} reads the images "
                             "from this directory)")
    sample_every = _lookup(config, "train.sample_every")
    if _is_int(sample_every) and sample_every > 0:
        prompts, labels = _lookup(config, "sample.prompts"), _lookup(config, "sample.class_labels")
        conditioning = diff.get("conditioning", "text")
        if conditioning == "text" and isinstance(prompts, (tuple, list)) and not prompts:
            raise ValueError(f"config key sample.prompts=(): the sample grids (train.sample_every={sample_every}) "
                             "need at least one prompt; or set train.sample_every=0")
        if conditioning in ("class", "class_crossattn") and isinstance(labels, (tuple, list)) and not labels:
            raise ValueError(f"config key sample.class_labels=(): the sample grids (train.sample_every="
                             f"{sample_every}) need at least one class label; or set train.sample_every=0")


def _ae_is_built(config) -> bool:
    """first_stage.autoencoder is read only for a random-init first stage (no checkpoint)."""
    fs = _lookup(config, "first_stage")
    return (fs is not _MISSING and not config_get(fs, "checkpoint", "") and bool(config_get(fs, "random_init", False))
            and not config_get(_lookup(config, "init"), "checkpoint", ""))


def _build(section: str, cls, fields):
    """``cls(**fields)`` with its ValueError / TypeError naming the config section (and the field
    when the message names one)."""
    import dataclasses

    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise ValueError(f"config key {section}.{unknown[0]}: unknown {cls.__name__} field; expected one of "
                         f"{tuple(names)}")
    try:
        return cls(**fields)
    except (ValueError, TypeError, ZeroDivisionError) as e:
        import re

        text = str(e)
        named = [n for n in names if n in fields and re.search(rf"\b{n}\b", text)]
        keys = ", ".join(f"{section}.{n}={fields[n]!r}" for n in named) or section
        raise ValueError(f"config key{'s' if len(named) > 1 else ''} {keys}: {text}") from None
