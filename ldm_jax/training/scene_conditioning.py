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
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.training.config_access import config_as_dict as _as_dict, config_get as _get


def build_cond_stage(config, dtype):
    """The ``SpatialRescaler`` of ``model.cond_stage`` for ``diffusion.concat="segmentation"``."""
    from ldm_jax.models.spatial_rescaler import SpatialRescaler, check_rescaler_options

    fields = _as_dict(_get(config.model, "cond_stage", None))
    if not fields:
        raise ValueError("diffusion.concat='segmentation' needs model.cond_stage: the SpatialRescaler's fields "
                         "(n_stages, in_channels = the number of classes, out_channels; as semantic_synthesis256's "
                         "cond_stage_config: n_stages 2, in_channels 182, out_channels 3)")
    allowed = {"n_stages", "method", "multiplier", "in_channels", "out_channels", "bias"}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValueError(f"model.cond_stage: unknown keys {unknown}; expected {sorted(allowed)}")
    if not fields.get("out_channels"):
        raise ValueError("model.cond_stage.out_channels must be set: the trained part of the cond stage is its 1x1 "
                         "channel mapper (the original's cond_stage_trainable)")
    module = SpatialRescaler(**fields, dtype=dtype)
    check_rescaler_options(module.n_stages, module.method, module.multiplier)
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


def build_layout_encoder(config, dtype, attention_impl: str, mesh, min_fsdp_size: int, rules):
    """(LDMBertModel, seeded params, builder) for ``diffusion.conditioning="layout"``."""
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
    bert_cfg = LDMBertConfig(**_as_dict(_get(te_cfg, "ldm_bert")))
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


def check_not_init_checkpoint(init_pipe, what: str) -> None:
    """init.checkpoint is refused for the semantic-synthesis and layout families (trained from scratch)."""
    if init_pipe is not None:
        raise ValueError(f"init.checkpoint={init_pipe.source}: fine-tuning a released model is not supported with "
                         f"{what}; train from scratch (init.checkpoint='')")
