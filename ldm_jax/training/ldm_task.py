"""The LDM training task: builds the trained U-Net, the frozen first stage and text encoder
from a config, and implements the hooks the generic loop (``loop.py``) calls.

Config keys read here (see ``configs/emoji_ldm.py`` for defaults):

* ``model.unet`` (UNetConfig fields), ``model.dtype`` ("float32" | "bfloat16": compute
  dtype of all modules; parameters stay float32), ``model.attention_impl``, ``model.remat``;
* ``first_stage.checkpoint`` (a diffusers ``vae/`` folder; "" = random init from
  ``first_stage.autoencoder`` when ``first_stage.random_init``), ``first_stage.seed``,
  ``first_stage.scale_by_std`` / ``first_stage.scale_factor``;
* ``text_encoder.kind``: "clip" (default) or "ldm_bert" (the CompVis LDM text-to-image
  ``BERTEmbedder``, ``models/ldm_bert.py``: a WordPiece tokenizer feeding a transformer trained
  from scratch with the U-Net);
* ``text_encoder.checkpoint`` ("clip": a transformers CLIPTextModel folder, "" = a seeded random
  CLIP from ``text_encoder.clip``; "ldm_bert": a diffusers ``bert/`` folder, "" = a seeded random
  LDMBert from ``text_encoder.ldm_bert``, LDMBertConfig fields), ``text_encoder.tokenizer``
  ("clip": folder, "" = vendored CLIP BPE; "ldm_bert": required, bert-base-uncased's vocab.txt or
  a BERT tokenizer folder, copied into ``WORKDIR/tokenizer``), ``text_encoder.max_length``,
  ``text_encoder.pad_token_id`` (CLIP), ``text_encoder.seed``,
  ``text_encoder.trainable`` (optimise it jointly with the U-Net, LDM Sec. 3.3; the trained
  parameters are then ``{"unet": ..., "text_encoder": ...}``, starting from the checkpoint
  or the seeded init);
* ``diffusion.*`` (schedule, prediction type, min-SNR, offset noise, conditioning, CFG
  dropout), ``train.*`` (OptimizerConfig fields + ``num_steps``), ``mesh.min_fsdp_size``,
  ``mesh.rules``, ``sample.*``;
* ``diffusion.conditioning``: what reaches the U-Net through cross-attention or its class
  embedding: "text" (tau = the text encoder), "class" (``num_class_embeds``), "class_crossattn"
  (the LDM ClassEmbedder), "layout" (LDM layout-to-image: the data's ``"layout_ids"``, taming's
  object-box tokens of ``data.layout``, into an LDMBert ``text_encoder.ldm_bert`` trained with the
  U-Net; no tokenizer, no CFG dropout; the workdir samples with ``pipe(context_ids=ids)``; see
  ``scene_conditioning.py``) or "none";
* ``diffusion.loss_type``: "l2" (default) or "l1" (CompVis ``loss_type: l1``: the semantic-synthesis
  and layout models);
* ``diffusion.rescale_betas_zero_snr`` (zero-terminal SNR, diffusers' key), ``diffusion.input_perturbation``
  (diffusers ``--input_perturbation``), and the CompVis ``p_losses`` terms ``diffusion.l_simple_weight`` /
  ``original_elbo_weight`` / ``logvar_init`` / ``v_posterior`` (``LDMStepConfig``); ``diffusion.learn_logvar``
  is refused, and an ``init.original_config`` YAML's objective options must match these;
* ``diffusion.concat``: what is concatenated to the noisy latents on the channel axis
  (``concat_conditioning.py``; independent of ``conditioning``, so "text" + a concat is the
  CompVis "hybrid" key): "none"; "low_res" (super-resolution, LDM Sec. 4.4 / bsr_sr: the
  training image box-filtered to the latent size, [-1, 1]; U-Net in_channels = latent channels
  + 3; a workdir samples with ``pipe(..., cond_image=low_res)``); "noise_augmented_low_res" (the
  SD 2 x4 upscaler family: that image noised under ``diffusion.low_res_schedule`` at a level in
  [0, ``diffusion.max_noise_level``) drawn per example, the level the U-Net's class label; needs
  conditioning "text"; the workdir is an upscaler: ``pipe(prompt, cond_image=..., noise_level=20)``);
  "inpainting" (SD-inpainting /
  LDM Sec. 4.5: [mask at latent size, scale_factor * E(masked image)], in_channels = 2 x latent
  channels + 1; masks drawn per example as ``diffusion.inpainting_masks`` (MaskConfig fields)
  says; a workdir samples with ``pipe(prompt, init_image=..., mask=...)``); "segmentation" (semantic
  synthesis, LDM Sec. 4.3.2: the data's ``"segmentation"`` label maps one-hot through the
  ``model.cond_stage`` SpatialRescaler, trained with the U-Net as ``params["cond_stage"]``;
  in_channels = latent channels + its out_channels; a workdir samples with
  ``pipe([""], segmentation=labels)``). The concat channels are never dropped for CFG; inpainting,
  segmentation and layouts cannot train on precomputed latents;
* ``init.checkpoint`` / ``init.original_config`` / ``init.use_ema``: start from a released
  model's U-Net and take its frozen stages (``init_checkpoint.py``: a text-to-image file with a
  concat gets conv_in widened with zeros for the concat channels (SD-inpainting's recipe); an x4
  upscaler file trains with "noise_augmented_low_res" and its low-res schedule / max_noise_level; an
  LDM txt2img file's BERTEmbedder with ``text_encoder.kind="ldm_bert"``, its vocabulary from
  ``text_encoder.tokenizer``; a semantic-synthesis file with "segmentation", its SpatialRescaler the
  start of ``params["cond_stage"]``; a layout-to-image file with conditioning "layout", its LDMBert the
  start of the trained encoder, ``data.layout`` checked to build its ids);
* ``data.precompute_latents``: train on latents encoded once into ``WORKDIR/latents``
  (``latent_dataset``, ``latent_cache.py``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.models.unet import UNet, UNetConfig, unet_dummy_inputs
from ldm_jax.training import concat_conditioning as concat_lib
from ldm_jax.training import init_checkpoint, ldm_step, optim
from ldm_jax.training.objective_config import (
    check_original_objective, loss_terms, schedule_config_from, schedule_from_config,
)
from ldm_jax.training import scene_conditioning as scene_lib
from ldm_jax.training import sharding as shd
from ldm_jax.training import state as state_lib
from ldm_jax.training.config_access import compute_dtype, config_as_dict as _as_dict, config_get as _get

log = logging.getLogger(__name__)

# Loaders for first-stage checkpoints that are not diffusers folders, tried in order:
# (predicate(path) -> bool, loader(path, dtype, attention_impl) -> (module, params)).
# The autoencoder trainer registers its own workdir format here.
_SCALE_BY_STD_STREAM = 2 ** 31 - 1  # fold_in(state.rng, .) for the scale-by-std posterior sample
FIRST_STAGE_LOADERS: List[Tuple[Callable[[str], bool], Callable[..., Tuple[Any, Any]]]] = []


def register_first_stage_loader(predicate: Callable[[str], bool], loader: Callable[..., Tuple[Any, Any]]) -> None:
    FIRST_STAGE_LOADERS.append((predicate, loader))


def _init_frozen(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, min_fsdp_size: int, rules):
    """Seeded random init of a *frozen* model (demo / smoke runs only), then placed on its
    shardings. It runs on one device, so the compiled initialiser is the same for every
    mesh (and hits the compilation cache); trained state never goes this way."""
    params = jax.jit(init_fn)(rng)
    return shd.shard_tree(params, shd.tree_shardings(params, mesh, min_fsdp_size, rules))


def build_first_stage(cfg, dtype, attention_impl: str, mesh: Mesh, min_fsdp_size: int, rules, init_pipe=None):
    """(autoencoder module, params) from ``config.first_stage`` (or ``init_pipe``'s when
    ``first_stage.checkpoint`` is unset)."""
    from ldm_jax.models.autoencoder import AutoencoderConfig, build_autoencoder, init_params

    path = _get(cfg, "checkpoint", "") or ""
    if not path and init_pipe is not None:
        params = init_pipe.params["vae"]
        return init_pipe.vae, shd.shard_tree(params, shd.tree_shardings(params, mesh, min_fsdp_size, rules))
    if path:
        from ldm_jax.training import autoencoder_task  # noqa: F401  (registers the autoencoder-workdir loader)

        for predicate, loader in FIRST_STAGE_LOADERS:
            if predicate(path):
                module, params = loader(path, dtype=dtype, attention_impl=attention_impl)
                break
        else:
            if os.path.isfile(os.path.join(path, "config.json")):
                from ldm_jax.convert import load_vae

                module, params = load_vae(path, dtype=dtype, attention_impl=attention_impl)
            elif os.path.isdir(os.path.join(path, "checkpoints")):
                raise NotImplementedError(
                    f"first_stage.checkpoint={path!r} looks like a train.py workdir; loading our own "
                    "autoencoder checkpoints is added with the autoencoder trainer (register a loader with "
                    "ldm_jax.training.ldm_task.register_first_stage_loader)")
            else:
                raise FileNotFoundError(
                    f"first_stage.checkpoint={path!r}: expected a diffusers vae/ folder with config.json")
        return module, shd.shard_tree(params, shd.tree_shardings(params, mesh, min_fsdp_size, rules))
    if not _get(cfg, "random_init", False):
        raise ValueError("config.first_stage: set checkpoint (a diffusers vae/ folder) or random_init=True")
    ae_cfg = AutoencoderConfig(**_as_dict(_get(cfg, "autoencoder")))
    module = build_autoencoder(ae_cfg, attention_impl=attention_impl, dtype=dtype)
    params = _init_frozen(lambda k: init_params(module, k), jax.random.PRNGKey(int(_get(cfg, "seed", 0))),
                           mesh, min_fsdp_size, rules)
    return module, params


TEXT_ENCODER_KINDS = ("clip", "ldm_bert")


def text_encoder_kind(cfg) -> str:
    kind = _get(cfg, "kind", "clip") or "clip"
    if kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"text_encoder.kind must be one of {TEXT_ENCODER_KINDS}, got {kind!r}")
    return kind


def ldm_bert_tokenizer_path(cfg) -> str:
    """``text_encoder.tokenizer`` of an ldm_bert encoder: required, since neither a diffusers
    ``bert/`` folder nor an original checkpoint carries the WordPiece vocabulary."""
    path = _get(cfg, "tokenizer", "") or ""
    if not path:
        raise ValueError("text_encoder.kind='ldm_bert' needs text_encoder.tokenizer: bert-base-uncased's vocab.txt "
                         "(30522 lines) or a BERT tokenizer folder (e.g. the tokenizer/ of "
                         "CompVis/ldm-text2im-large-256), as --config.text_encoder.tokenizer=PATH")
    return str(path)


def _build_ldm_bert(cfg, dtype, attention_impl: str, mesh: Mesh, min_fsdp_size: int, rules, init_pipe=None):
    """(LDMBertModel, params, BERTTokenizer): ``text_encoder.kind="ldm_bert"``."""
    from ldm_jax.models.ldm_bert import LDMBertConfig, LDMBertModel
    from ldm_jax.text.bert_tokenizer import BERTTokenizer

    tok_path = ldm_bert_tokenizer_path(cfg)
    path = _get(cfg, "checkpoint", "") or ""
    if not path and init_pipe is not None:
        if not isinstance(init_pipe.text_encoder, LDMBertModel):
            raise ValueError(f"init.checkpoint={init_pipe.source}: text_encoder.kind='ldm_bert' needs an LDM "
                             "text-to-image model (a BERTEmbedder cond stage); set text_encoder.kind to match it, "
                             "or text_encoder.checkpoint")
        params = init_pipe.params["text_encoder"]
        module = init_pipe.text_encoder
    elif path:
        from ldm_jax.convert.ldm_bert_weights import load_ldm_bert

        module, params = load_ldm_bert(path, dtype=dtype, attention_impl=attention_impl)
    else:
        bert_cfg = LDMBertConfig(**_as_dict(_get(cfg, "ldm_bert")))
        module = LDMBertModel(bert_cfg, dtype=dtype, attention_impl=attention_impl)
        ids = jnp.zeros((1, bert_cfg.max_position_embeddings), jnp.int32)
        params = _init_frozen(lambda k: module.init(k, ids)["params"],
                              jax.random.PRNGKey(int(_get(cfg, "seed", 0))), mesh, min_fsdp_size, rules)
    if path or init_pipe is not None:  # (_init_frozen places its own)
        params = shd.shard_tree(params, shd.tree_shardings(params, mesh, min_fsdp_size, rules))
    max_length = int(_get(cfg, "max_length", 0) or module.config.max_position_embeddings)
    if max_length > module.config.max_position_embeddings:
        raise ValueError(f"text_encoder.max_length={max_length} exceeds the encoder's "
                         f"max_position_embeddings {module.config.max_position_embeddings}")
    tokenizer = BERTTokenizer.from_pretrained(tok_path, max_length=max_length)
    if tokenizer.vocab_size > module.config.vocab_size:  # ids past the table would index out of range
        raise ValueError(f"text_encoder.tokenizer={tok_path!r} has {tokenizer.vocab_size} tokens but the encoder's "
                         f"embedding table {module.config.vocab_size} (vocab_size)")
    return module, params, tokenizer


def build_text_encoder(cfg, dtype, attention_impl: str, mesh: Mesh, min_fsdp_size: int, rules, init_pipe=None):
    """(text encoder, params, tokenizer) from ``config.text_encoder`` (or ``init_pipe``'s
    when ``text_encoder.checkpoint`` is unset): a CLIPTextModel, or an LDMBertModel for
    ``kind="ldm_bert"``."""
    from ldm_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from ldm_jax.text.tokenizer import CLIPTokenizer

    if text_encoder_kind(cfg) == "ldm_bert":
        return _build_ldm_bert(cfg, dtype, attention_impl, mesh, min_fsdp_size, rules, init_pipe=init_pipe)
    path = _get(cfg, "checkpoint", "") or ""
    tok_path = _get(cfg, "tokenizer", "") or ""
    if not path and init_pipe is not None:
        if init_pipe.text_encoder is None:
            raise ValueError(f"init.checkpoint={init_pipe.source}: the model has no text encoder; "
                             "set diffusion.conditioning to match it, or text_encoder.checkpoint")
        if not isinstance(init_pipe.text_encoder, CLIPTextModel):
            raise ValueError(f"init.checkpoint={init_pipe.source}: its text encoder is a "
                             f"{type(init_pipe.text_encoder).__name__}, not CLIP; set text_encoder.kind='ldm_bert' "
                             "for an LDM text-to-image (BERTEmbedder) model")
        params = init_pipe.params["text_encoder"]
        params = shd.shard_tree(params, shd.tree_shardings(params, mesh, min_fsdp_size, rules))
        return init_pipe.text_encoder, params, init_pipe.tokenizer
    if path:
        from ldm_jax.convert import load_text_encoder

        module, params = load_text_encoder(path, dtype=dtype, attention_impl=attention_impl)
        params = shd.shard_tree(params, shd.tree_shardings(params, mesh, min_fsdp_size, rules))
    else:
        clip_cfg = CLIPTextConfig(**_as_dict(_get(cfg, "clip")))
        module = CLIPTextModel(clip_cfg, dtype=dtype, attention_impl=attention_impl)
        ids = jnp.zeros((1, clip_cfg.max_position_embeddings), jnp.int32)
        params = _init_frozen(lambda k: module.init(k, ids)["params"],
                               jax.random.PRNGKey(int(_get(cfg, "seed", 0))), mesh, min_fsdp_size, rules)
    max_length = int(_get(cfg, "max_length", 0) or module.config.max_position_embeddings)
    if tok_path:
        tokenizer = CLIPTokenizer.from_pretrained(tok_path, max_length=max_length)
    else:
        tokenizer = CLIPTokenizer(pad_token_id=int(_get(cfg, "pad_token_id", 49407)), max_length=max_length)
    return module, params, tokenizer


def build_class_embedder(diff_cfg, ctx_dim: Optional[int], seed: int, dtype, mesh: Mesh, min_fsdp_size: int, rules,
                         init_pipe=None):
    """(ClassEmbedder, params, ClassLabelTokenizer) for ``conditioning="class_crossattn"``:
    ``diffusion.num_classes`` labels plus the unconditional one (the last row, CFG's null
    label), ``ctx_dim`` wide; from ``init_pipe`` (a cin256-style model) when given."""
    from ldm_jax.models.class_embedder import ClassEmbedder, ClassLabelTokenizer

    if init_pipe is not None:
        if not isinstance(init_pipe.text_encoder, ClassEmbedder):
            raise ValueError(f"init.checkpoint={init_pipe.source}: diffusion.conditioning='class_crossattn' needs a "
                             "class-conditional model (a ClassEmbedder cond stage, as cin256)")
        module, params = init_pipe.text_encoder, init_pipe.params["text_encoder"]
    else:
        if ctx_dim is None:
            raise ValueError("diffusion.conditioning='class_crossattn' needs a U-Net with cross-attention "
                             "(model.unet.cross_attention_dim)")
        n = _get(diff_cfg, "num_classes", None)
        if n is None or int(n) < 1:
            raise ValueError("diffusion.conditioning='class_crossattn' needs diffusion.num_classes (the labels are "
                             "0 .. num_classes - 1; one more row is the unconditional label)")
        module = ClassEmbedder(int(n) + 1, int(ctx_dim), dtype=dtype)
        params = _init_frozen(lambda k: module.init(k, jnp.zeros((1, 1), jnp.int32))["params"],
                              jax.random.PRNGKey(seed), mesh, min_fsdp_size, rules)
    if module.embed_dim != ctx_dim:
        raise ValueError(f"model.unet.cross_attention_dim={ctx_dim} does not match the class embedding width "
                         f"{module.embed_dim}")
    return module, params, ClassLabelTokenizer(module.num_classes)


CONDITIONINGS = ("text", "class", "class_crossattn", "layout", "none")
WORKDIR_TOKENIZER = "tokenizer"  # WORKDIR/tokenizer: the BERT vocabulary of an ldm_bert run


class LDMTask:
    """Hooks for ``loop.train``: init/abstract state, batch preparation, the jitted step,
    scale-by-std at the start, metadata for checkpoints and sample grids."""

    def __init__(self, config, mesh: Mesh):
        self.config = config
        self.mesh = mesh
        model = config.model
        self.dtype = compute_dtype(model)
        attention_impl = _get(model, "attention_impl", "xla")
        self.min_fsdp_size = int(_get(config.mesh, "min_fsdp_size", 2 ** 18))
        self.rules = [tuple(r) for r in (_get(config.mesh, "rules", ()) or ())]
        sharding_kw = dict(mesh=mesh, min_fsdp_size=self.min_fsdp_size, rules=self.rules)

        # init.checkpoint: a released model whose U-Net starts training and whose stages are frozen.
        # An LDM txt2img file lacks its BERT vocabulary: text_encoder.tokenizer goes with it.
        te_cfg = _get(config, "text_encoder")
        bert_vocab = None
        if _get(config.diffusion, "conditioning", "text") == "text" and text_encoder_kind(te_cfg) == "ldm_bert":
            bert_vocab = ldm_bert_tokenizer_path(te_cfg)  # fails early, before any checkpoint is read
        self.init_pipe = init_checkpoint.load_init_pipeline(_get(config, "init"), self.dtype.name, attention_impl,
                                                            tokenizer=bert_vocab)
        unet_fields = _as_dict(model.unet)
        if not unet_fields:
            if self.init_pipe is None:
                raise ValueError("config.model.unet is empty: give the U-Net's fields, or init.checkpoint to take "
                                 "its architecture")
            # (a checkpoint without concat channels gets the concat's: its conv_in is widened, see there)
            unet_fields = init_checkpoint.unet_fields_from(self.init_pipe,
                                                           _get(config.diffusion, "concat", "none") or "none")
        unet_fields["remat_blocks"] = bool(_get(model, "remat", unet_fields.get("remat_blocks", False)))
        self.unet = UNet(UNetConfig(**unet_fields), dtype=self.dtype, attention_impl=attention_impl)

        diff = config.diffusion
        # "class_crossattn": the label through cross-attention (the LDM ClassEmbedder of cin256), a
        # learned (B, 1, D) context trained with the U-Net; to the step it is a trained text encoder.
        self.conditioning = _get(diff, "conditioning", "text")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"diffusion.conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        class_crossattn = self.conditioning == "class_crossattn"
        # "layout": token ids of object layouts into a trained LDMBert (scene_conditioning.py); to the
        # step it is a trained text encoder too.
        layout = self.conditioning == "layout"
        conditioning = "text" if (class_crossattn or layout) else self.conditioning
        self.concat = _get(diff, "concat", "none") or "none"  # checked by LDMStepConfig
        # A semantic-synthesis / layout-to-image file trains only as that family (scene_conditioning.py).
        scene_lib.check_init_family(self.init_pipe, self.concat, self.conditioning)
        if self.concat == "segmentation" or layout:
            if layout and float(_get(diff, "cond_drop_prob", 0.0)):
                raise ValueError("diffusion.conditioning='layout' has no classifier-free guidance (the original "
                                 "drops no condition, and a layout model has no unconditional input): set "
                                 f"diffusion.cond_drop_prob=0, got {_get(diff, 'cond_drop_prob', 0.0)}")
        self.step_cfg = ldm_step.LDMStepConfig(
            prediction_type=_get(diff, "prediction_type", "epsilon"),
            min_snr_gamma=_get(diff, "min_snr_gamma", None) or None,
            offset_noise=float(_get(diff, "offset_noise", 0.0)),
            conditioning=conditioning,
            cond_drop_prob=float(_get(diff, "cond_drop_prob", 0.1)),
            null_class=_get(diff, "null_class", None),
            sample_posterior=bool(_get(config.first_stage, "sample_posterior", True)),
            train_text_encoder=class_crossattn or layout or (
                conditioning == "text" and bool(_get(config.text_encoder, "trainable", False))),
            concat=self.concat,
            masks=concat_lib.MaskConfig.from_mapping(_as_dict(_get(diff, "inpainting_masks", None))),
            # concat="noise_augmented_low_res" (SD 2 x4 upscaler): the low-res image's schedule and level bound.
            low_res_schedule=tuple(sorted({**concat_lib.LOW_RES_SCHEDULE,
                                           **_as_dict(_get(diff, "low_res_schedule", None))}.items())),
            max_noise_level=int(_get(diff, "max_noise_level", concat_lib.MAX_NOISE_LEVEL)),
            loss_type=_get(diff, "loss_type", "l2") or "l2",
            **loss_terms(diff),
        )
        if self.concat == concat_lib.NOISE_AUGMENTED and self.conditioning != "text":
            raise ValueError(f"diffusion.concat={self.concat!r} (the SD 2 x4 upscaler family: text through cross-"
                             "attention, the noise level as class label) needs diffusion.conditioning='text', got "
                             f"{self.conditioning!r}")
        self.schedule_config = schedule_config_from(diff, self.step_cfg.prediction_type)
        self.schedule = schedule_from_config(self.schedule_config)
        if self.init_pipe is not None:
            init_checkpoint.check_schedule(self.init_pipe, self.schedule_config,
                                           bool(_get(_get(config, "init"), "allow_schedule_change", False)))
            check_original_objective(_get(config, "init"), self.step_cfg)

        self.vae, vae_params = build_first_stage(config.first_stage, self.dtype, attention_impl, **sharding_kw,
                                                 init_pipe=self.init_pipe)
        # Semantic synthesis: the SpatialRescaler whose output is concatenated (trained, params["cond_stage"]).
        # From init.checkpoint: the file's rescaler settings (model.cond_stage={}) or checked against them.
        self.cond_stage = (scene_lib.build_cond_stage(config, self.dtype, init_pipe=self.init_pipe)
                           if self.concat == "segmentation" else None)
        concat_lib.check_unet_in_channels(self.unet.config.in_channels, self.vae.config.embed_dim, self.concat,
                                          None if self.cond_stage is None else self.cond_stage.features)
        self._check_init_concat_layout()
        self.text_encoder = self.tokenizer = self.layout_builder = None
        te_params = empty_ids = None
        ucfg = self.unet.config
        ctx_dim = ucfg.context_width
        if class_crossattn:
            self.text_encoder, te_params, self.tokenizer = build_class_embedder(
                diff, ctx_dim, int(_get(config.text_encoder, "seed", 0)), self.dtype, **sharding_kw,
                init_pipe=self.init_pipe)
            empty_ids = jnp.asarray(self.tokenizer([""]))
        elif layout:  # no tokenizer: the ids come from the data; the empty layout stands for "no condition"
            # (from init.checkpoint: the file's LDMBert, its weights the start of the trained encoder)
            self.text_encoder, te_params, self.layout_builder = scene_lib.build_layout_encoder(
                config, self.dtype, attention_impl, **sharding_kw, init_pipe=self.init_pipe)
            empty_ids = jnp.asarray(self.layout_builder.empty()[None], jnp.int32)
            if ctx_dim != self.text_encoder.config.hidden_size:
                raise ValueError(f"model.unet.cross_attention_dim={ctx_dim} does not match the layout encoder width "
                                 f"{self.text_encoder.config.hidden_size}")
        elif conditioning == "text":
            self.text_encoder, te_params, self.tokenizer = build_text_encoder(
                config.text_encoder, self.dtype, attention_impl, **sharding_kw, init_pipe=self.init_pipe)
            empty_ids = jnp.asarray(self.tokenizer([""]))
            if ctx_dim != self.text_encoder.config.hidden_size:
                raise ValueError(f"model.unet.cross_attention_dim={ctx_dim} does not match the text encoder width "
                                 f"{self.text_encoder.config.hidden_size}")

        fixed = _get(config.first_stage, "scale_factor", None)
        self.scale_by_std = bool(_get(config.first_stage, "scale_by_std", False))
        self.scale_factor = float(np.float32(fixed if fixed is not None else self.vae.config.scaling_factor))
        rep = shd.replicated(mesh)
        # A trained text encoder starts from te_params (see init_state) and lives in the state.
        frozen = {"vae": vae_params, "text_encoder": None if self.step_cfg.train_text_encoder else te_params,
                  "scale_factor": jax.device_put(jnp.float32(self.scale_factor), rep),
                  "empty_ids": None if empty_ids is None else shd.shard_tree(np.asarray(empty_ids), rep)}
        self.frozen = frozen
        self.frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)

        train = config.train
        opt_fields = _as_dict(train)
        opt_fields.setdefault("num_steps", int(train.num_steps))
        self.opt_cfg = optim.OptimizerConfig.from_mapping(opt_fields)
        self.tx = optim.make_optimizer(self.opt_cfg)
        self.global_batch_size = int(train.batch_size)
        shd.check_batch_size(self.global_batch_size, mesh, self.opt_cfg.grad_accum_steps)

        x, t, ctx, labels = unet_dummy_inputs(self.unet.config, batch=1, context_len=8)
        dummy = [jnp.zeros(a.shape, a.dtype) if a is not None else None for a in (x, t, ctx, labels)]
        unet = self.unet
        init_params = lambda k: unet.init(k, *dummy)["params"]  # noqa: E731
        if self.step_cfg.train_text_encoder:
            # Placeholder text-encoder weights of the right shapes; init_state puts the start weights in.
            te = self.text_encoder
            ids = jnp.zeros((1, np.asarray(empty_ids).shape[1]), jnp.int32)  # (1, 1) for class tokens
            init_params = lambda k: {"unet": unet.init(k, *dummy)["params"],  # noqa: E731
                                     "text_encoder": te.init(jax.random.PRNGKey(0), ids)["params"]}
        if self.cond_stage is not None:  # params {"unet"[, "text_encoder"], "cond_stage"}: its init is the start
            base_init, joint, cs = init_params, self.step_cfg.train_text_encoder, self.cond_stage
            size = self._image_size()
            init_params = lambda k: {**(base_init(k) if joint else {"unet": base_init(k)}),  # noqa: E731
                                     "cond_stage": scene_lib.init_cond_stage(cs, jax.random.fold_in(k, 1), size)}
        self._init_fn = state_lib.make_init_fn(init_params, self.tx, use_ema=self.opt_cfg.ema_decay > 0)
        self._abstract, self.state_shardings = state_lib.abstract_train_state(
            self._init_fn, mesh, self.min_fsdp_size, self.rules)
        # Start weights put into a fresh state by init_state: {"unet": ...[, "text_encoder": ...][, "cond_stage": ...]}.
        self._start_params = {}
        if self.init_pipe is not None:
            expected, _ = ldm_step.split_trained_params(self._abstract.params, self.step_cfg.train_text_encoder,
                                                        self.cond_stage is not None)
            # The file's U-Net, checked leaf by leaf (conv_in widened with zeros for new concat channels).
            self._start_params["unet"] = init_checkpoint.start_unet_params(
                expected, self.init_pipe, self.concat, self.vae.config.embed_dim)
            init_checkpoint.check_scale_factor(self.init_pipe, config.first_stage, self.scale_factor)
            if self.cond_stage is not None:  # the file's SpatialRescaler (settings checked by build_cond_stage)
                self._start_params["cond_stage"] = init_checkpoint.start_cond_stage_params(
                    self._abstract.params["cond_stage"], self.init_pipe)
        if self.step_cfg.train_text_encoder:
            self._start_params["text_encoder"] = te_params
        step_fn = ldm_step.make_train_step(self.unet, self.schedule, self.tx, self.step_cfg, self.opt_cfg,
                                           vae=self.vae, text_encoder=self.text_encoder, mesh=mesh,
                                           cond_stage=self.cond_stage)
        self.step_fn = step_fn  # the pure function (tests compare it unjitted)
        # SyncedJit: with several processes, compile, then meet at a barrier before the first run.
        self._jitted = shd.SyncedJit(
            ldm_step.jit_train_step(step_fn, mesh, self.state_shardings, self.frozen_shardings), "train_step")
        self._init_jit = shd.SyncedJit(jax.jit(self._init_fn, out_shardings=self.state_shardings), "init")
        self._latent_std_fn = None
        self._pipeline = None
        if jax.process_index() == 0:
            n = state_lib.param_count(self._abstract.params)
            log.info("%s: %.2fM trained parameters (%s compute); mesh %s",
                     "U-Net + text encoder" if self.step_cfg.train_text_encoder else "U-Net", n / 1e6,
                     self.dtype.name, dict(mesh.shape))

    def _check_init_concat_layout(self) -> None:
        """init.checkpoint models whose concat channels mean something else than this task builds."""
        pipe = self.init_pipe
        if pipe is None:
            return
        if getattr(pipe, "is_upscaler", False):
            if self.concat != concat_lib.NOISE_AUGMENTED:
                raise ValueError(f"init.checkpoint={pipe.source} is a noise-augmented upscaler (SD 2 x4: the low-res "
                                 "image noised to a level given as a class label); train it with diffusion.concat="
                                 f"'{concat_lib.NOISE_AUGMENTED}', got {self.concat!r}")
            # Its U-Net knows the levels of the file's low-res schedule: the step noises with that schedule
            # and bound (taken from the file when unset; a conflicting setting is an error).
            schedule, level = init_checkpoint.upscaler_low_res(pipe, self.config.diffusion)
            self.step_cfg = dataclasses.replace(self.step_cfg, low_res_schedule=schedule, max_noise_level=level)
            return
        if self.concat == "none":
            return
        if self.concat == "inpainting" and pipe.cond_stage == "first_stage":
            raise ValueError(f"init.checkpoint={pipe.source} is a CompVis LDM inpainting model (channels [unscaled "
                             "first-stage mode of the masked image, mask]); diffusion.concat='inpainting' trains the "
                             "SD-inpainting layout [mask, scaled posterior sample of the masked image]")

    # ------------------------------------------------------------------ loop hooks
    def init_state(self, rng: jax.Array):
        """A fresh state; the U-Net from init.checkpoint and a trained text encoder from its
        start weights when given (params and EMA alike)."""
        # params {"unet"[, "text_encoder"][, "cond_stage"]} when more than the U-Net trains: replace the parts given
        joint = self.step_cfg.train_text_encoder or self.cond_stage is not None
        given = dict(self._start_params) if joint else self._start_params.get("unet")
        if given is not None and (jax.tree_util.tree_structure(given)
                                  == jax.tree_util.tree_structure(self._abstract.params)):
            # Every trained weight is given (init.checkpoint): the state is built around them, without
            # compiling and running a random U-Net init only to replace it. make_init_fn as _init_fn does
            # (same rng split, fresh optimizer state); copies, so the state owns its buffers (the step
            # donates them) and the checkpoint's arrays stay intact.
            if getattr(self, "_start_jit", None) is None:
                use_ema = self.opt_cfg.ema_decay > 0

                def from_start(rng, params):
                    copied = jax.tree_util.tree_map(jnp.copy, params)
                    return state_lib.make_init_fn(lambda _: copied, self.tx, use_ema=use_ema)(rng)

                self._start_jit = shd.SyncedJit(jax.jit(from_start, out_shardings=self.state_shardings), "init")
            return self._start_jit(rng, given)
        state = self._init_jit(rng)
        if not self._start_params:
            return state
        # Copies placed like the state (params and EMA own their buffers: the step donates them).
        copy = jax.jit(lambda t: jax.tree_util.tree_map(jnp.copy, t), out_shardings=self.state_shardings.params)

        def start(params):
            return copy({**params, **self._start_params} if joint else self._start_params["unet"])

        return state.replace(params=start(state.params),
                             ema_params=None if state.ema_params is None else start(state.ema_params))

    def trained_params(self, state, use_ema: bool = True):
        """(U-Net params, text-encoder params) to sample with: the EMA weights when kept, and
        the frozen text encoder unless it was trained."""
        params = self._weights(state, use_ema)
        unet_params, te_params = ldm_step.split_trained_params(params, self.step_cfg.train_text_encoder,
                                                               self.cond_stage is not None)
        return unet_params, (te_params if te_params is not None else self.frozen["text_encoder"])

    def cond_stage_params(self, state, use_ema: bool = True):
        """The trained SpatialRescaler's parameters (semantic synthesis; EMA when kept), else None."""
        if self.cond_stage is None:
            return None
        return self._weights(state, use_ema)["cond_stage"]

    @staticmethod
    def _weights(state, use_ema: bool):
        """The trained parameter tree to sample with: the EMA weights when kept (and asked for)."""
        return state.ema_params if (use_ema and state.ema_params is not None) else state.params

    def abstract_state(self):
        return self._abstract

    def prepare_batch(self, host_batch: Dict[str, Any]) -> Dict[str, np.ndarray]:
        """Process-local data-pipeline output -> numeric arrays for ``shard_batch``."""
        out = {}
        if "latents" in host_batch:
            out["latents"] = np.asarray(host_batch["latents"], np.float32)
            if "latents_std" in host_batch and self.step_cfg.sample_posterior:
                # KL posterior std from a latent cache: train_step draws z = mean + std * eps.
                out["latents_std"] = np.asarray(host_batch["latents_std"], np.float32)
        else:
            out["image"] = np.asarray(host_batch["image"])
        # Concat-conditioning inputs a data source may provide (else the step builds them).
        if self.concat in concat_lib.LOW_RES_CONCATS and "low_res" in host_batch:
            out["low_res"] = np.asarray(host_batch["low_res"])
        if self.concat == "inpainting" and "inpaint_mask" in host_batch:
            out["inpaint_mask"] = np.asarray(host_batch["inpaint_mask"], np.float32)
        if self.concat == "segmentation":
            if "segmentation" not in host_batch:
                raise KeyError("diffusion.concat='segmentation' needs label maps in the data: a 'segmentation' field "
                               "(data.name='segmentation_folder' or 'synthetic_segmentation')")
            out["segmentation"] = np.asarray(host_batch["segmentation"], np.int32)
        if self.conditioning == "layout":
            if "layout_ids" not in host_batch:
                raise KeyError("diffusion.conditioning='layout' needs object layouts in the data: a 'layout_ids' field "
                               "(data.name='coco_layout' or 'synthetic_layout')")
            ids = np.asarray(host_batch["layout_ids"], np.int32)
            if ids.shape[1:] != (self.layout_builder.embedding_dim,):
                raise ValueError(f"the data's layout_ids have length {ids.shape[1]}, the layout encoder takes "
                                 f"{self.layout_builder.embedding_dim} (data.layout)")
            out["input_ids"] = ids
        elif self.conditioning == "class_crossattn":
            if "label" not in host_batch:
                raise KeyError("class-conditional training needs a 'label' field in the data "
                               "(data.label_key, or data.folder_labels=True for an image folder)")
            out["input_ids"] = self.tokenizer(np.asarray(host_batch["label"], np.int64).tolist())
        elif self.step_cfg.conditioning == "text":
            out["input_ids"] = self.tokenizer([str(c) for c in np.asarray(host_batch["caption"]).tolist()])
        elif self.step_cfg.conditioning == "class":
            if "label" not in host_batch:
                raise KeyError("class-conditional training needs a 'label' field in the data")
            out["label"] = np.asarray(host_batch["label"], np.int32)
        return out

    def on_first_batch(self, state, batch) -> None:
        """scale_by_std (LDM Sec. 4.3): scale_factor = 1 / std(first batch's latents); only on
        a fresh start (a resumed run restores it from the checkpoint metadata)."""
        if not self.scale_by_std:
            return
        if "latents" in batch and "latents_std" in batch:
            # Precomputed KL posterior (mean, std): the posterior sample the image path would
            # draw (same eps: normal(fold_in(rng, stream)), see make_latent_std_fn).
            def posterior_std(mean, std_, rng):
                return jnp.std(ldm_step.posterior_sample(mean, std_, rng), ddof=1)

            fn = shd.SyncedJit(jax.jit(posterior_std, out_shardings=shd.replicated(self.mesh)), "latent_std")
            std = float(fn(batch["latents"], batch["latents_std"],
                           jax.random.fold_in(state.rng, _SCALE_BY_STD_STREAM)))
        elif "latents" in batch:
            fn = shd.SyncedJit(jax.jit(lambda z: jnp.std(z, ddof=1), out_shardings=shd.replicated(self.mesh)),
                               "latent_std")
            std = float(fn(batch["latents"]))
        else:
            if self._latent_std_fn is None:
                self._latent_std_fn = shd.SyncedJit(
                    ldm_step.make_latent_std_fn(self.vae, self.mesh, self.step_cfg.sample_posterior), "latent_std")
            std = float(self._latent_std_fn(self.frozen["vae"], batch["image"],
                                            jax.random.fold_in(state.rng, _SCALE_BY_STD_STREAM)))
        self.set_scale_factor(1.0 / std)
        if jax.process_index() == 0:
            log.info("scale_by_std: latent std %.5f -> scale_factor %.5f", std, self.scale_factor)

    def set_scale_factor(self, value: float) -> None:
        self.scale_factor = float(np.float32(value))
        self.frozen["scale_factor"] = jax.device_put(jnp.float32(self.scale_factor), shd.replicated(self.mesh))

    def train_step(self, state, batch):
        return self._jitted(state, batch, self.frozen)

    def latent_dataset(self, config, workdir: str, seed: int):
        """``data.precompute_latents``: the training iterator over ``WORKDIR/latents`` (encoded
        once by the frozen first stage, rebuilt when stale); see ``latent_cache``."""
        from ldm_jax.training import latent_cache

        if self.concat == "segmentation" or self.conditioning == "layout":
            raise ValueError("data.precompute_latents=True is not supported with label maps or layouts (the cache does "
                             "not store them with their crops and flips); set data.precompute_latents=False")
        if self.concat == "inpainting":
            raise ValueError("data.precompute_latents=True cannot train diffusion.concat='inpainting': the masked "
                             "image changes with every drawn mask and is encoded by the first stage each step; "
                             "set data.precompute_latents=False")
        return latent_cache.prepare_latent_dataset(self, config, workdir, seed)

    def write_workdir_assets(self, workdir: str) -> None:
        """Files a workdir needs to sample on its own (process 0, before training): the BERT
        vocabulary as ``WORKDIR/tokenizer`` (load_workdir_pipeline reads it from there), so the
        run does not depend on the ``text_encoder.tokenizer`` path staying in place."""
        from ldm_jax.text.bert_tokenizer import BERTTokenizer

        if isinstance(self.tokenizer, BERTTokenizer):
            self.tokenizer.save_pretrained(os.path.join(workdir, WORKDIR_TOKENIZER))

    def metadata(self) -> Dict[str, Any]:
        return {"scale_factor": self.scale_factor}

    def load_metadata(self, meta: Dict[str, Any]) -> None:
        if meta.get("scale_factor") is not None:
            self.set_scale_factor(meta["scale_factor"])

    # ------------------------------------------------------------------ samples
    def sample(self, state, step: int) -> Optional[np.ndarray]:
        """Images (N, H, W, 3) in [0, 1] from the EMA weights (params without EMA) on the
        fixed ``sample.prompts`` / ``sample.class_labels``, with few sampler steps."""
        cfg = self.config.sample
        pipe = self._sample_pipeline()
        pipe.params["unet"], te_params = self.trained_params(state)
        if te_params is not None:
            pipe.params["text_encoder"] = te_params
        if self.cond_stage is not None:
            pipe.params["cond_stage"] = self.cond_stage_params(state)
        kw = dict(num_inference_steps=int(_get(cfg, "num_inference_steps", 20)),
                  guidance_scale=float(_get(cfg, "guidance_scale", 3.0)), seed=int(_get(cfg, "seed", 0)),
                  sampler=_get(cfg, "sampler", "ddim"), height=self._image_size(), width=self._image_size())
        if self.conditioning == "layout":  # the synthetic scenes' layouts; no guidance (no unconditional input)
            n = int(_get(cfg, "num_images", 4))
            ids = scene_lib.sample_layout_ids(self.layout_builder, n, self._image_size())
            return pipe(context_ids=ids, **{**kw, "guidance_scale": 1.0})
        if self.conditioning == "text":
            prompts = list(_get(cfg, "prompts", ["a red square"]))
            return pipe(prompts, **kw, **self._sample_concat_inputs(len(prompts)))
        if self.conditioning in ("class", "class_crossattn"):
            labels = list(_get(cfg, "class_labels", [0, 1, 2, 3]))
            return pipe([""] * len(labels), class_labels=labels, **kw, **self._sample_concat_inputs(len(labels)))
        n = int(_get(cfg, "num_images", 4))
        return pipe([""] * n, **{**kw, "guidance_scale": 1.0, **self._sample_concat_inputs(n)})

    def _sample_concat_inputs(self, n: int) -> Dict[str, Any]:
        """The Pipeline inputs of a concat-conditioned model for the sample grids: the low-res
        version of ``sample.images`` (image files; default: synthetic squares) for SR, or those
        images with a centred box to repaint (strength 1) for inpainting."""
        if self.concat == "none":
            return {}
        if self.concat == "segmentation":  # sample.segmentations (label PNGs), else synthetic scenes' maps
            size = self._image_size()
            return {"segmentation": scene_lib.sample_segmentations(self.config, n, size, self.cond_stage.in_channels)}
        from ldm_jax.data.pipeline import preprocess

        size = self._image_size()
        paths = list(_get(self.config.sample, "images", ()) or ())
        if paths:
            from PIL import Image

            images = [preprocess(np.asarray(Image.open(p).convert("RGB")), size, center_crop=True, random_flip=False,
                                 rng=None) for p in paths]
        else:
            from ldm_jax.training.loop import SyntheticDataset

            synth = SyntheticDataset(1, image_size=size)
            images = [synth.example(i)["image"] for i in range(n)]
        images = np.stack([images[i % len(images)] for i in range(n)]).astype(np.float32) / 255.0
        if self.concat in concat_lib.LOW_RES_CONCATS:
            low_res = concat_lib.area_downsample(jnp.asarray(images), self.vae.config.downsample_factor)
            out = {"cond_image": np.asarray(low_res)}  # output: data.image_size, as kw's height / width
            if self.concat == concat_lib.NOISE_AUGMENTED:  # diffusers' default level 20, inside the trained range
                out["noise_level"] = min(20, self.step_cfg.max_noise_level - 1)
            return out
        mask = np.zeros((n, size, size), np.float32)
        mask[:, size // 4: size - size // 4, size // 4: size - size // 4] = 1.0
        return {"init_image": images, "mask": mask, "strength": 1.0}

    def pipeline_conditioning(self) -> Dict[str, Any]:
        """``Pipeline`` fields that make it sample this task's concat channels as the step built
        them: conditioning_key "concat" ("hybrid" next to cross-attention) and cond_stage
        "identity" (SR: the [-1, 1] low-res image as given) or "" (inpainting: Pipeline's
        [mask, scale_factor * posterior sample of the masked image] layout, not CompVis LDM
        inpainting's first-stage one)."""
        if self.concat == "none":
            return {}
        if self.concat == concat_lib.NOISE_AUGMENTED:  # an upscaler: Pipeline.is_upscaler, noise_level=
            return {"conditioning_key": "hybrid-adm", "cond_stage": "identity",
                    "low_res_scheduler_config": dict(self.step_cfg.low_res_schedule),
                    "max_noise_level": int(self.step_cfg.max_noise_level)}
        key = "hybrid" if self.text_encoder is not None else "concat"
        if self.concat == "segmentation":  # Pipeline runs the trained rescaler on segmentation= (params["cond_stage"])
            return {"conditioning_key": key, "cond_stage": "rescaler", "cond_stage_model": self.cond_stage}
        return {"conditioning_key": key, "cond_stage": "identity" if self.concat == "low_res" else ""}

    def _image_size(self) -> int:
        return int(_get(self.config.data, "image_size", 32))

    def _sample_pipeline(self):
        from ldm_jax.pipeline import Pipeline

        mesh = self.mesh

        class _MeshPipeline(Pipeline):
            # Outputs replicated on the training mesh, so every process can read the images;
            # SyncedJit: with several processes, compile, then meet before the first run.
            def _jit(self, key, fn):
                if key not in self._jit_cache:
                    self._jit_cache[key] = shd.SyncedJit(jax.jit(fn, out_shardings=NamedSharding(mesh, P())), "sample")
                return self._jit_cache[key]

        vae = self.vae.clone(config=dataclasses.replace(self.vae.config, scaling_factor=self.scale_factor))
        if self._pipeline is None or self._pipeline.scaling_factor != self.scale_factor:
            params = {"vae": self.frozen["vae"]}
            if self.text_encoder is not None:
                params["text_encoder"] = self.frozen["text_encoder"]
            self._pipeline = _MeshPipeline(
                unet=self.unet, vae=vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, params=params,
                scheduler_config={**self.schedule_config, "clip_sample": False, "set_alpha_to_one": False,
                                  "steps_offset": 1},
                source="training", sample_size=self._image_size() // self.vae.config.downsample_factor, mesh=mesh,
                **self.pipeline_conditioning())
        return self._pipeline
