"""The trained cond stages of the LDM semantic-synthesis and layout-to-image models, built for
``LDMTask`` from the config, and the fixed inputs of their sample grids.

* Semantic synthesis (``diffusion.concat="segmentation"``; CompVis ``semantic_synthesis256`` /
  ``semantic_synthesis512``: ``cond_stage_key: segmentation``, ``concat_mode: true``,
  ``cond_stage_trainable: true``, ``loss_type: l1``): ``model.cond_stage`` holds the
  ``SpatialRescaler`` fields (n_stages, method, multiplier, in_channels = the number of classes,
  out_channels, bias). Its channel mapper is trained with the U-Net (``params["cond_stage"]``);
  the label maps come from the data as ``"segmentation"`` (``ldm_jax.data.segmentation``).
* Layout-to-image (``diffusion.conditioning="layout"``; CompVis ``layout2img-openimages256``: a
  ``BERTEmbedder`` with ``use_tokenizer: false`` over ``cond_stage_key: coordinates_bbox``,
  ``conditioning_key: crossattn``, ``cond_stage_trainable: true``, ``loss_type: l1``): the token ids
  of taming's ``ObjectsBoundingBoxConditionalBuilder`` (``data.layout``, ``ldm_jax.data.layout_tokens``)
  feed an ``LDMBertModel`` (``text_encoder.ldm_bert``: vocab_size = no_tokens, max_position_embeddings
  = the sequence length) trained with the U-Net from a seeded init, through cross-attention. The
  original drops nothing for classifier-free guidance (``LatentDiffusion`` has no condition dropout;
  ``Layout2ImgDiffusion`` only adds box plots to its image logs), so ``diffusion.cond_drop_prob``
  must be 0, and the model has no tokenizer: it samples with ``pipe(context_ids=ids)``.

Fine-tuning the released files (``init.checkpoint`` = the original ``.ckpt`` with its YAML as
``init.original_config``; ``init_checkpoint.py`` takes the U-Net and the frozen first stage):

* a semantic-synthesis file (a ``SpatialRescaler`` cond stage with a channel mapper) trains with
  ``diffusion.concat="segmentation"``; its rescaler settings (n_stages, method, multiplier,
  in_channels, out_channels, bias) are ``model.cond_stage`` (``{}`` takes the file's; given, they must
  be the file's) and its ``channel_mapper`` weights are where ``params["cond_stage"]`` starts;
* a layout-to-image file (a ``BERTEmbedder`` with ``use_tokenizer: false``) trains with
  ``diffusion.conditioning="layout"``; its LDMBert is ``text_encoder.ldm_bert`` (``{}`` takes the
  file's; given, it must be the file's) and starts the trained encoder from the file's weights, and
  ``data.layout`` must build the file's sequences: ``no_tokens`` = its vocab_size (8192) and
  3 x ``no_max_objects`` (+ 2 with ``encode_crop``) = its max_seq_len (92 = 3 x 30 + 2).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.training.config_access import config_as_dict as _as_dict, config_get as _get
from ldm_jax.training.init_checkpoint import log_main_process

RESCALER_FIELDS = ("n_stages", "method", "multiplier", "in_channels", "out_channels", "bias")


def init_rescaler_fields(init_pipe) -> dict:
    """The SpatialRescaler settings of a semantic-synthesis ``init.checkpoint`` (its YAML's
    cond_stage_config), or a ValueError when the file is not one with trainable rescaler weights."""
    module = getattr(init_pipe, "cond_stage_model", None)
    if init_pipe.cond_stage != "rescaler" or module is None:
        kind = init_pipe.cond_stage or (type(init_pipe.text_encoder).__name__ if init_pipe.text_encoder is not None
                                        else "none")
        raise ValueError(f"init.checkpoint={init_pipe.source} is not a semantic-synthesis model (its cond stage: "
                         f"{kind}); diffusion.concat='segmentation' fine-tunes a file with a SpatialRescaler cond "
                         "stage (CompVis semantic_synthesis256 / 512, with its YAML as init.original_config), or "
                         "trains from scratch (init.checkpoint='')")
    if module.out_channels is None:
        raise ValueError(f"init.checkpoint={init_pipe.source}: its SpatialRescaler has no channel mapper (no "
                         "out_channels in its YAML), so no cond-stage weights; diffusion.concat='segmentation' trains "
                         "the rescaler's 1x1 conv (model.cond_stage.out_channels)")
    return {k: getattr(module, k) for k in RESCALER_FIELDS}


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and float(a) == float(b)
    return a == b


def build_cond_stage(config, dtype, init_pipe=None):
    """The ``SpatialRescaler`` of ``model.cond_stage`` for ``diffusion.concat="segmentation"``; with
    ``init_pipe`` (a semantic-synthesis init.checkpoint) the file's settings, which a non-empty
    ``model.cond_stage`` must repeat."""
    from ldm_jax.models.spatial_rescaler import SpatialRescaler, check_rescaler_options

    fields = _as_dict(_get(config.model, "cond_stage", None))
    released = None if init_pipe is None else init_rescaler_fields(init_pipe)
    if released is not None and not fields:
        fields = dict(released)
        log_main_process("init.checkpoint=%s: model.cond_stage={} takes its SpatialRescaler %s", init_pipe.source, released)
    if not fields:
        raise ValueError("diffusion.concat='segmentation' needs model.cond_stage: the SpatialRescaler's fields "
                         "(n_stages, in_channels = the number of classes, out_channels; as semantic_synthesis256's "
                         "cond_stage_config: n_stages 2, in_channels 182, out_channels 3)")
    unknown = sorted(set(fields) - set(RESCALER_FIELDS))
    if unknown:
        raise ValueError(f"model.cond_stage: unknown keys {unknown}; expected {sorted(RESCALER_FIELDS)}")
    if not fields.get("out_channels"):
        raise ValueError("model.cond_stage.out_channels must be set: the trained part of the cond stage is its 1x1 "
                         "channel mapper (the original's cond_stage_trainable)")
    module = SpatialRescaler(**fields, dtype=dtype)
    check_rescaler_options(module.n_stages, module.method, module.multiplier)
    if released is not None:
        # The file's channel mapper is the start of params["cond_stage"]: the map must reach it resized and
        # one-hot encoded as the file's model was trained (the 1x1 kernel's shape alone would not tell).
        diffs = [f"{k}={getattr(module, k)!r} (the file's: {released[k]!r})" for k in RESCALER_FIELDS
                 if not _same(getattr(module, k), released[k])]
        if diffs:
            raise ValueError(f"model.cond_stage does not describe init.checkpoint={init_pipe.source}'s "
                             f"SpatialRescaler: {'; '.join(diffs)}. Set model.cond_stage to the file's {released}, "
                             "or to {} to take it from the file")
    classes = _get(config.data, "num_classes", None)
    if classes is not None and int(classes) != int(module.in_channels):
        raise ValueError(f"data.num_classes={classes} but model.cond_stage.in_channels={module.in_channels}: the "
                         "label maps are one-hot encoded to in_channels channels")
    return module


def init_cond_stage(module, rng: jax.Array, image_size: int):
    """Initial rescaler parameters (the channel mapper's 1x1 kernel) for an image_size map."""
    dummy = jnp.zeros((1, image_size, image_size, int(module.in_channels)), jnp.float32)
    return module.init(rng, dummy)["params"]


def model_layout_builder(config):
    """The ``LayoutTokenBuilder`` of ``data.layout`` as the model sees it: vocabulary, sequence
    length and empty layout (no_object_classes only changes the group / flag modifiers of the
    object tokens, which the pipeline's builder takes from the data's category count)."""
    from ldm_jax.data.layout_tokens import LayoutTokenBuilder
    from ldm_jax.data.scene_sources import layout_config

    fields = layout_config(config.data)
    return LayoutTokenBuilder.from_config(fields, no_object_classes=fields["no_object_classes"] or 1)


def is_layout_model(pipe) -> bool:
    """A layout-to-image model: an LDMBert fed token ids, no tokenizer (BERTEmbedder use_tokenizer: false)."""
    from ldm_jax.models.ldm_bert import LDMBertModel

    return isinstance(pipe.text_encoder, LDMBertModel) and pipe.tokenizer is None


def _layout_length_hint(length: int) -> str:
    from ldm_jax.data.layout_tokens import layout_shape_for_length

    shape = layout_shape_for_length(length)
    if shape is None:
        return f"no builder gives {length} ids (3 per object, + 2 crop tokens)"
    return f"no_max_objects={shape[0]}, encode_crop={shape[1]}"


def _init_layout_bert(init_pipe, given: dict, builder):
    """The LDMBertConfig of a layout-to-image init.checkpoint, checked against ``text_encoder.ldm_bert``
    (``given``; empty: the file's) and the data's layout builder."""
    import dataclasses

    from ldm_jax.models.ldm_bert import LDMBertConfig

    if not is_layout_model(init_pipe):
        kind = "none" if init_pipe.text_encoder is None else type(init_pipe.text_encoder).__name__
        extra = " with a tokenizer (text-to-image)" if init_pipe.tokenizer is not None else ""
        raise ValueError(f"init.checkpoint={init_pipe.source} is not a layout-to-image model (its text encoder: "
                         f"{kind}{extra}); diffusion.conditioning='layout' fine-tunes a file whose cond stage is a "
                         "BERTEmbedder with use_tokenizer: false (CompVis layout2img-openimages256, with its YAML as "
                         "init.original_config), or trains from scratch (init.checkpoint='')")
    released = init_pipe.text_encoder.config
    if given:
        mine = LDMBertConfig(**given)
        diffs = [f"{f.name}={getattr(mine, f.name)!r} (the file's: {getattr(released, f.name)!r})"
                 for f in dataclasses.fields(LDMBertConfig) if getattr(mine, f.name) != getattr(released, f.name)]
        if diffs:
            raise ValueError(f"text_encoder.ldm_bert does not describe init.checkpoint={init_pipe.source}'s LDMBert: "
                             f"{'; '.join(diffs)}. Set it to the file's, or to {{}} to take it from the file")
    else:
        log_main_process("init.checkpoint=%s: text_encoder.ldm_bert={} takes its LDMBert %s", init_pipe.source, released)
    # The file's encoder learnt its table over this vocabulary and its positions over this length: the
    # data's builder must produce exactly these ids (a grid of another no_tokens means other coordinates).
    if builder.no_tokens != released.vocab_size or builder.embedding_dim != released.max_position_embeddings:
        raise ValueError(
            f"data.layout builds {builder.embedding_dim} ids (3 x no_max_objects={builder.no_max_objects}"
            f"{' + 2 crop tokens' if builder.encode_crop else ''}) over no_tokens={builder.no_tokens}, but "
            f"init.checkpoint={init_pipe.source}'s LDMBert takes {released.max_position_embeddings} ids "
            f"(max_position_embeddings) of a {released.vocab_size}-token vocabulary (vocab_size): set "
            f"data.layout.no_tokens={released.vocab_size} and "
            f"{_layout_length_hint(released.max_position_embeddings)} (the released layout2img model: no_tokens "
            "8192, no_max_objects 30, encode_crop True: 92 ids)")
    return released


def build_layout_encoder(config, dtype, attention_impl: str, mesh, min_fsdp_size: int, rules, init_pipe=None):
    """(LDMBertModel, start params, builder) for ``diffusion.conditioning="layout"``: the seeded init,
    or the LDMBert of ``init_pipe`` (a layout-to-image init.checkpoint)."""
    from ldm_jax.models.ldm_bert import LDMBertConfig, LDMBertModel
    from ldm_jax.training import sharding as shd

    builder = model_layout_builder(config)
    te_cfg = config.text_encoder
    kind = _get(te_cfg, "kind", "ldm_bert") or "ldm_bert"
    if kind != "ldm_bert":
        raise ValueError(f"diffusion.conditioning='layout' embeds layout token ids with an LDMBert (the original's "
                         f"BERTEmbedder, use_tokenizer: false); set text_encoder.kind='ldm_bert', got {kind!r}")
    if _get(te_cfg, "checkpoint", "") or "":
        raise ValueError("diffusion.conditioning='layout' trains its LDMBert from a seeded init "
                         "(text_encoder.checkpoint is not supported)")
    if not bool(_get(te_cfg, "trainable", True)):
        raise ValueError("diffusion.conditioning='layout': the layout encoder is trained with the U-Net "
                         "(cond_stage_trainable); text_encoder.trainable=False is not supported")
    given = _as_dict(_get(te_cfg, "ldm_bert", None))
    if init_pipe is not None:
        bert_cfg = _init_layout_bert(init_pipe, given, builder)
        module = LDMBertModel(bert_cfg, dtype=dtype, attention_impl=attention_impl)
        params = init_pipe.params["text_encoder"]
        return module, shd.shard_tree(params, shd.tree_shardings(params, mesh, min_fsdp_size, rules)), builder
    bert_cfg = LDMBertConfig(**given)
    if bert_cfg.vocab_size < builder.no_tokens or bert_cfg.max_position_embeddings != builder.embedding_dim:
        raise ValueError(f"text_encoder.ldm_bert has vocab_size {bert_cfg.vocab_size} and max_position_embeddings "
                         f"{bert_cfg.max_position_embeddings}, but data.layout gives {builder.no_tokens} tokens and "
                         f"sequences of {builder.embedding_dim} (3 x no_max_objects {builder.no_max_objects}"
                         f"{' + 2 crop tokens' if builder.encode_crop else ''}): set vocab_size >= no_tokens and "
                         "max_position_embeddings = the sequence length")
    module = LDMBertModel(bert_cfg, dtype=dtype, attention_impl=attention_impl)
    ids = jnp.zeros((1, builder.embedding_dim), jnp.int32)
    params = jax.jit(lambda k: module.init(k, ids)["params"])(jax.random.PRNGKey(int(_get(te_cfg, "seed", 0))))
    params = shd.shard_tree(params, shd.tree_shardings(params, mesh, min_fsdp_size, rules))
    return module, params, builder


def sample_segmentations(config, n: int, size: int, num_classes: int) -> np.ndarray:
    """int32 (n, size, size) label maps for the sample grids: ``sample.segmentations`` (label PNG
    paths, center-cropped and resized with nearest) or the built-in synthetic scenes'."""
    from ldm_jax.data.pipeline import preprocess_example
    from ldm_jax.data.segmentation import normalize_labels, read_label_map

    paths = list(_get(config.sample, "segmentations", ()) or ())
    maps = []
    if paths:
        for p in paths:
            labels = normalize_labels(read_label_map(p), num_classes, what=f"sample.segmentations {p}")
            labels = np.maximum(labels, 0)  # (no ignore label here)
            dummy = np.zeros(labels.shape + (3,), np.uint8)
            maps.append(preprocess_example(dummy, labels, size, center_crop=True, random_flip=False, rng=None)[1])
    else:
        from ldm_jax.data.synthetic_scenes import SyntheticSegmentationSource

        source = SyntheticSegmentationSource(n, height=size, width=size, num_classes=max(2, min(5, num_classes)))
        maps = [source.load(i)["segmentation"] for i in range(n)]
    return np.stack([maps[i % len(maps)] for i in range(n)]).astype(np.int32)


def sample_layout_ids(builder, n: int, size: int) -> np.ndarray:
    """int32 (n, L) layout ids for the sample grids: the built-in synthetic scenes' objects over the
    whole image (no crop, no flip, the given order)."""
    import warnings

    from ldm_jax.data.synthetic_scenes import SyntheticLayoutSource

    classes = max(2, min(5, builder.no_object_classes + 1))
    source = SyntheticLayoutSource(n, height=size, width=size, num_classes=classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.stack([builder.build(source.load(i)["objects"]) for i in range(n)]).astype(np.int32)


def check_init_family(init_pipe, concat: str, conditioning: str) -> None:
    """A semantic-synthesis or layout-to-image init.checkpoint trains only as what it is."""
    if init_pipe is None:
        return
    if getattr(init_pipe, "cond_stage", "") == "rescaler" and concat != "segmentation":
        raise ValueError(f"init.checkpoint={init_pipe.source} is a semantic-synthesis model (a SpatialRescaler cond "
                         "stage whose map channels are concatenated to the latents); train it with "
                         f"diffusion.concat='segmentation', got {concat!r}")
    if is_layout_model(init_pipe) and conditioning != "layout":
        raise ValueError(f"init.checkpoint={init_pipe.source} is a layout-to-image model (an LDMBert over layout "
                         "token ids, no tokenizer); train it with diffusion.conditioning='layout', got "
                         f"{conditioning!r}")


def layout_sampling_builder(config):
    """The ``LayoutTokenBuilder`` a layout workdir samples with (``Pipeline.layout_builder``, for
    ``sample.py --layout``): ``data.layout``, with no_object_classes when known (set there, or the
    synthetic_layout data's count), else None (objects with flags are then refused)."""
    from ldm_jax.data.layout_tokens import LayoutTokenBuilder
    from ldm_jax.data.scene_sources import layout_config

    fields = layout_config(config.data)
    classes = fields["no_object_classes"]
    if classes is None and _get(config.data, "name", "") == "synthetic_layout":
        classes = int(_get(config.data, "num_classes", None) or 5) - 1  # SyntheticLayoutSource: class - 1
    return LayoutTokenBuilder(None if classes is None else int(classes), int(fields["no_max_objects"]),
                              int(fields["no_tokens"]), bool(fields["encode_crop"]),
                              bool(fields["use_group_parameter"]), bool(fields["use_additional_parameters"]))
