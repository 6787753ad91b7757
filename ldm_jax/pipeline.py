"""Text-to-image, image-to-image and inpainting with a latent diffusion model.

    pipe = ldm_jax.load_pipeline("path/to/diffusers-folder")
    images = pipe("a red apple", num_inference_steps=30, sampler="dpmpp_2m")  # (B, H, W, 3) in [0, 1]

The whole generation after tokenisation runs as one ``jax.jit``: text encoding,
the scan-based sampler (with classifier-free guidance by batch concatenation,
Ho & Salimans 2022 Eq. 6) and the VAE decode. The guidance scale, eta and the
schedule values are traced, so changing them does not recompile; the sampler,
step count, shapes and the mode (txt2img / img2img / inpaint) are static.

Randomness is a function of ``seed`` only: the initial noise is
``normal(fold_in(key(seed), 0))``, the per-step sampler noise
``fold_in(fold_in(key(seed), 1), step)`` and the VAE posterior sample
``fold_in(key(seed), 2)`` (``3`` for the masked image of an inpainting model,
``4`` for the noise augmenting the low-res image of an upscaler).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.diffusion import samplers
from ldm_jax.diffusion.guidance import guided_denoiser
from ldm_jax.diffusion.schedule import NoiseSchedule, add_noise
from ldm_jax.diffusion.scheduler_config import resolve_scheduler_options
from ldm_jax.image_io import prepare_image, prepare_mask
from ldm_jax.executable_store import StoredProgram

Prompt = Union[str, Sequence[str]]

# Streams folded into the seed's key.
_NOISE, _STEPS, _POSTERIOR, _MASKED_POSTERIOR, _COND_NOISE = 0, 1, 2, 3, 4


@dataclasses.dataclass
class Pipeline:
    """A loaded latent diffusion model: Linen modules, their parameters, the tokenizer
    and the saved scheduler configuration (a diffusers-style dict)."""

    unet: Any
    vae: Any
    text_encoder: Any                 # None for unconditional / class-conditional models
    tokenizer: Any                    # None when text_encoder is None
    params: Dict[str, Any]            # {"unet": ..., "vae": ..., "text_encoder": ...}
    scheduler_config: Dict[str, Any]  # diffusers scheduler_config.json contents
    source: str = ""                  # where it was loaded from, for messages
    sample_size: int = 64             # default latent side (diffusers unet config sample_size)
    mesh: Optional[Mesh] = None       # batch axis "data"; None = all local devices when B divides
    # Original LDM conditioning (CompVis LatentDiffusion): conditioning_key (None, "crossattn",
    # "concat", "hybrid", ...) and what builds the concatenated channels: "identity" (the image
    # itself, e.g. bsr_sr's low-res image), "first_stage" (its first-stage encoding, LDM
    # inpainting); "" for models loaded from diffusers folders / workdirs.
    conditioning_key: Optional[str] = None
    cond_stage: str = ""
    # Noise-augmented upscalers (LatentUpscaleDiffusion / diffusers StableDiffusionUpscalePipeline, the SD 2
    # x4 upscaler): the diffusers scheduler config of the schedule that noises the low-res image, and the
    # exclusive bound of the noise level (the U-Net's class label); None for every other model.
    low_res_scheduler_config: Optional[Dict[str, Any]] = None
    max_noise_level: Optional[int] = None
    # A cond stage that turns a map into the concatenated channels inside the jitted chain: the
    # SpatialRescaler of the CompVis semantic-synthesis models (``cond_stage == "rescaler"``), with
    # params["cond_stage"]; None for every other model.
    cond_stage_model: Any = None
    # Layout-to-image models (an LDMBert over layout token ids, no tokenizer): the LayoutTokenBuilder that
    # makes their context_ids from object boxes (sample.py --layout, ldm_jax.data.layout_file); None otherwise.
    layout_builder: Any = None
    _jit_cache: Dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ properties
    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.embed_dim

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_diffusers_config(self.scheduler_config)

    @property
    def is_upscaler(self) -> bool:
        """A noise-augmented upscaler: ``cond_image=`` (low-res image) + ``noise_level=``."""
        return self.low_res_scheduler_config is not None

    @property
    def default_size(self) -> int:
        """diffusers' default: sample_size of the UNet times the VAE factor."""
        return int(self.sample_size) * self.vae_scale_factor

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: List[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise ValueError(
                f"{self.source or 'this model'} has no tokenizer: its text encoder embeds token ids, not text "
                "(a BERTEmbedder with use_tokenizer: false, e.g. the layout-to-image model, whose ids come from "
                "taming-transformers' ObjectsBoundingBoxConditionalBuilder, ldm_jax.data.LayoutTokenBuilder here); pass "
                "context_ids= (B, L) instead")
        return np.asarray(self.tokenizer(prompts), dtype=np.int32)

    def encode_prompt(self, prompts: Prompt) -> jax.Array:
        """Text-encoder states (B, L, D) for a list of prompts (jitted)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._encode_ids(self.tokenize(prompts))

    def encode_ids(self, context_ids) -> jax.Array:
        """Text-encoder states (B, L, D) for token ids (B, L), checked as ``__call__``'s ``context_ids``."""
        return self._encode_ids(self._check_context_ids(context_ids))

    def _encode_ids(self, ids: np.ndarray) -> jax.Array:
        fn = self._jit("text", lambda p, ids: self.text_encoder.apply({"params": p}, ids))
        return fn(self.params["text_encoder"], ids)

    def _check_context_ids(self, context_ids) -> np.ndarray:
        """int32 (B, L) token ids for the text encoder, or a ValueError / TypeError naming what is wrong."""
        what = self.source or "this model"
        config = getattr(self.text_encoder, "config", None)
        vocab, length = getattr(config, "vocab_size", None), getattr(config, "max_position_embeddings", None)
        if vocab is None or length is None:
            kind = "no text encoder" if self.text_encoder is None else f"a {type(self.text_encoder).__name__}"
            raise ValueError(f"{what}: context_ids= are token ids for a token-embedding text encoder (LDMBert, "
                             f"CLIP); this model has {kind}")
        ids = np.asarray(context_ids)
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"context_ids must be integer token ids, got dtype {ids.dtype} (text goes in prompt=)")
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] != length:
            # The text encoder's full length, as the original data pipeline pads to it (max_seq_len).
            raise ValueError(f"context_ids must have shape (B, {length}) (B >= 1, {length} = the text encoder's "
                             f"max_position_embeddings / max_seq_len), got {ids.shape}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise ValueError(f"context_ids must be in [0, {vocab}) (the text encoder's vocab_size), got values in "
                             f"[{low}, {high}]")
        return ids.astype(np.int32)

    # ------------------------------------------------------------------ main call
    def __call__(
        self,
        prompt: Optional[Prompt] = None,
        negative_prompt: Optional[Prompt] = None,
        num_inference_steps: int = 50,
        guidance_scale: Optional[float] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        seed: int = 0,
        sampler: str = "ddim",
        eta: float = 0.0,
        latents: Optional[np.ndarray] = None,
        init_image=None,
        strength: float = 0.8,
        mask=None,
        class_labels: Optional[Sequence[int]] = None,
        cond_image=None,
        image_conditioning: Optional[np.ndarray] = None,
        segmentation=None,
        noise_level: int = 20,
        cond_noise: Optional[np.ndarray] = None,
        return_latents: bool = False,
        return_intermediates: bool = False,
        context_ids: Optional[np.ndarray] = None,
    ):
        """Generate images; see the module docstring and DESIGN.md for the contract.

        prompt: a string or a list (the batch). ``guidance_scale``: classifier-free guidance,
        default 7.5 (1.0, i.e. none, for a model without a tokenizer, see ``context_ids``).
        ``context_ids``: precomputed token ids (B, L) for the text encoder, used instead of
        ``prompt`` (give one of the two); L is its max_position_embeddings (max_seq_len), the ids
        in [0, vocab_size). They are traced: new ids do not recompile. This is how the CompVis
        layout-to-image model (layout2img-openimages256: a BERTEmbedder with ``use_tokenizer:
        false``) is sampled: its ids encode object classes and boxes, built by taming-transformers'
        ``ObjectsBoundingBoxConditionalBuilder`` as in the original data pipeline (not part of this
        project). That model has no unconditional input (the original samples it without
        guidance), so guidance_scale > 1 and ``negative_prompt`` are refused there; for a model with
        a tokenizer the unconditional branch is the tokenized ``negative_prompt`` as usual.
        ``latents``: standard-normal noise (B, h, w, C) NHWC used instead of the seed's initial
        noise, as diffusers' pipelines use their ``latents=`` argument: txt2img and inpaint start
        from it scaled by the sampler's init_noise_sigma, at every strength (inpaint below strength 1
        too, as StableDiffusionInpaintPipeline; the 4-channel blend noises the kept region with it);
        img2img (whose diffusers pipeline takes no ``latents=``) adds it to the encoded image. Without
        ``latents`` an inpaint run below strength 1 starts from the image noised to its first step,
        as diffusers does when it draws the noise. ``init_image``: (B, H, W, 3) / (H, W, 3) in [0, 1], PIL image(s) or
        paths. ``mask``: same size, 1 = repaint, 0 = keep. ``strength``: as diffusers'
        img2img / inpaint pipelines, the last int(num_inference_steps * strength) steps run, from
        the encoded image noised to the first of them (inpaint at strength 1: the noise alone,
        scaled by init_noise_sigma); a strength leaving no step is a ValueError (plms img2img runs
        PNDM's one extra step, as diffusers does).

        Concat-conditioned models (original ``conditioning_key`` "concat"/"hybrid", U-Net
        input = latents + k more channels, CompVis ``DiffusionWrapper``): ``cond_image``
        is the conditioning image in [0, 1] (same forms as ``init_image``): for a
        ``torch.nn.Identity`` cond stage (super-resolution, bsr_sr) the low-resolution
        image itself at the latent size h x w (mapped to [-1, 1]; the output is f times
        larger); for ``__is_first_stage__`` an image of the output size, encoded by the
        first stage (KL mode / VQ pre-quantisation latents, unscaled, as
        ``LatentDiffusion.get_learned_conditioning``). ``image_conditioning``: the k
        channels themselves, (B, h, w, k) NHWC, concatenated as given (any other cond
        stage, e.g. a segmentation map already through its SpatialRescaler). The
        unconditional branch of classifier-free guidance gets the same channels.

        Semantic synthesis (a ``SpatialRescaler`` cond stage, ``cond_stage_model``; CompVis
        ``semantic_synthesis256`` / landscapes): ``segmentation`` is the rescaler's input at the
        image size H x W: a map (B, H, W, C_in) / (H, W, C_in) (one-hot or class probabilities,
        C_in = the rescaler's in_channels, values used as given: no [0, 1] -> [-1, 1] mapping), or
        integer class indices (B, H, W) / (H, W) (one-hot encoded here), or a path (.npy, or a
        single-channel label-map PNG). It is resized to the latent size (``n_stages`` x
        ``multiplier``, PyTorch's interpolation) and channel-mapped inside the jitted chain; the
        output is the map's size (H x W must rescale to H/f x W/f). These models have no text
        encoder, so there is no guidance (as for every concat model without text).

        Noise-augmented upscalers (``is_upscaler``: the SD 2 x4 upscaler, original
        ``LatentUpscaleDiffusion`` with ``hybrid-adm``, or a diffusers
        ``StableDiffusionUpscalePipeline`` folder): ``cond_image`` is the low-resolution image
        at the latent size (the output is the autoencoder factor larger), noised to
        ``noise_level`` (an int in [0, max_noise_level), diffusers' default 20) with the
        model's low-res schedule; the level is also the U-Net's class label, in both
        guidance branches. ``cond_noise``: the standard-normal noise (B, h, w, 3) used for
        that instead of the seed's. The noise level is traced (no recompilation). Returns float32
        (B, H, W, 3) in [0, 1]; with ``return_latents`` the final latents
        (B, h, w, C) instead; with ``return_intermediates`` a pair (that output,
        the latents after every sampler step (S, B, h, w, C)).
        """
        if context_ids is not None:
            if prompt is not None or class_labels is not None:
                raise ValueError("give either prompt (text) or context_ids (token ids), not both "
                                 f"{'prompt' if prompt is not None else 'class_labels'} and context_ids")
            context_ids = self._check_context_ids(context_ids)
            prompts = [""] * context_ids.shape[0]  # the batch size only: never tokenized
        elif prompt is None:
            raise ValueError("prompt: give a prompt (or context_ids=, precomputed token ids)")
        else:
            prompts = _as_prompt_list(prompt, "prompt")
        _check_call_scalars(height, width, seed, guidance_scale)
        # A text encoder without a tokenizer (BERTEmbedder use_tokenizer: false) has no defined
        # unconditional input: the original samples the layout model without guidance.
        token_ids_only = self.text_encoder is not None and self.tokenizer is None
        if guidance_scale is None:
            guidance_scale = 1.0 if token_ids_only else 7.5
        if token_ids_only and (guidance_scale > 1.0 or negative_prompt is not None):
            raise ValueError(f"{self.source or 'this model'} takes token ids only (no tokenizer) and has no "
                             "unconditional input for classifier-free guidance: use guidance_scale=1.0 (the "
                             "default here) and no negative_prompt")
        if self.conditioning_key in ("hybrid-adm", "crossattn-adm") and not self.is_upscaler:
            raise ValueError(f"{self.source}: conditioning_key {self.conditioning_key!r} without a noise-augmented "
                             "low-res image (low_scale_config, the SD 2 x4 upscaler) is not implemented by Pipeline: "
                             "its class-label input (c_adm) is not known; the U-Net can be applied directly")
        if self.is_upscaler:
            self._check_upscaler_inputs(noise_level, class_labels, cond_image, image_conditioning)
        elif cond_noise is not None:
            raise ValueError("cond_noise is the noise of a noise-augmented upscaler's low-res image; this model "
                             "is not one")
        if class_labels is not None and self.unet.config.num_class_embeds is None:
            # LDM class-conditional models take the label through cross-attention (ClassEmbedder):
            # their "tokenizer" reads class indices as prompts.
            if not hasattr(self.tokenizer, "unconditional_class"):
                raise ValueError("class_labels given, but this model is not class-conditional")
            prompts, class_labels = [str(int(c)) for c in class_labels], None
        batch = len(prompts)
        if batch == 0:
            raise ValueError("prompt: give at least one prompt")
        if negative_prompt is None:
            negatives = [""] * batch
        else:
            negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else _as_prompt_list(
                negative_prompt, "negative_prompt")
            if len(negatives) != batch:
                raise ValueError(f"negative_prompt has {len(negatives)} entries for {batch} prompts (give a string, "
                                 f"or a list of {batch})")
        if mask is not None and init_image is None:
            raise ValueError("mask needs init_image (the image to inpaint)")

        # Image size and latent shape.
        f = self.vae_scale_factor
        # The images as given (k of them, k dividing the batch), not repeated to the batch: they are
        # encoded once and their latents tiled, as diffusers' img2img/inpaint prepare_latents
        # (`torch.cat([init_latents] * (batch_size // k))`, `image_latents.repeat(...)`), so a single
        # image for B prompts gets one posterior sample, not B different ones.
        init_bhwc = None if init_image is None else prepare_image(init_image, batch, height, width, repeat=False)
        if init_bhwc is not None:
            height, width = init_bhwc.shape[1:3]
        concat, concat_kind = self._concat_input(cond_image, image_conditioning, batch, height, width,
                                                 inpaint=mask is not None, segmentation=segmentation)
        if self.is_upscaler:
            concat_kind = "noise_augmented"
        if concat is not None and concat_kind == "first_stage":
            height, width = concat.shape[1:3]
        elif concat is not None and concat_kind == "cond_stage":
            height, width = (side * f for side in self.cond_stage_model.output_size(*concat.shape[1:3]))
        elif concat is not None:
            height, width = concat.shape[1] * f, concat.shape[2] * f
        height = int(height or self.default_size)
        width = int(width or self.default_size)
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of the autoencoder factor {f}, got {height}x{width}")
        latent_shape = (batch, height // f, width // f, self.latent_channels)

        # Sampler plan from the saved scheduler config (diffusers' from_config semantics).
        options = resolve_scheduler_options(sampler, self.scheduler_config)
        mode = "txt2img" if init_bhwc is None else ("inpaint" if mask is not None else "img2img")
        start_index = 0
        if mode != "txt2img":
            # Every scheduler here has diffusers `order` 1 (SamplerPlan.order).
            start_index = samplers.start_index_for_strength(num_inference_steps, strength, 1)
        # first_step: the zero-terminal-SNR checks only refuse a timestep the run visits (img2img with
        # trailing spacing and strength < 1 never steps from t = T - 1; diffusers is finite there).
        plan = samplers.make_plan_from_options(
            sampler, NoiseSchedule.from_diffusers_config(options), num_inference_steps, options, eta=eta,
            first_step=start_index)
        # diffusers' get_timesteps runs the timesteps from t_start = N - int(N * strength) on. With no
        # step left its inpaint pipeline raises ("the number of pipeline steps is 0"), and img2img fails
        # on the empty timestep tensor, except with PNDM (plms), whose N + 1 timesteps leave one: its
        # img2img then runs that single step, and so does this pipeline.
        if start_index >= (plan.num_inference_steps if mode == "inpaint" else plan.num_steps):
            raise ValueError(f"strength={strength} leaves no denoising steps; use a larger strength (with "
                             f"num_inference_steps={num_inference_steps}, int(num_inference_steps * strength) "
                             "steps are run)")

        key = jax.random.PRNGKey(seed)
        if latents is None:
            noise = initial_noise(seed, latent_shape)
        else:
            noise = jnp.asarray(latents, jnp.float32)
            if noise.shape != latent_shape:
                raise ValueError(f"latents must have shape {latent_shape} (B, h, w, C), got {tuple(noise.shape)}")
        if concat_kind == "noise_augmented":
            if cond_noise is None:
                cond_noise = jax.random.normal(jax.random.fold_in(key, _COND_NOISE), concat.shape, jnp.float32)
            cond_noise = jnp.asarray(cond_noise, jnp.float32)
            if cond_noise.shape != concat.shape:
                raise ValueError(f"cond_noise must have the shape of the low-res image batch {concat.shape} "
                                 f"(B, h, w, 3), got {tuple(cond_noise.shape)}")

        use_cfg = guidance_scale > 1.0 and (self.text_encoder is not None or class_labels is not None)
        has_text = self.text_encoder is not None
        inputs = dict(
            noise=noise,
            ids=(context_ids if context_ids is not None else self.tokenize(prompts)) if has_text else None,
            neg_ids=self.tokenize(negatives) if has_text and use_cfg else None,  # only the guided chain reads it
            class_labels=None if class_labels is None else jnp.asarray(class_labels, jnp.int32),
            init=None if init_bhwc is None else jnp.asarray(init_bhwc * 2.0 - 1.0),
            mask=None if mask is None else jnp.asarray(self._mask_for(mask, init_bhwc, batch, height, width)),
            concat=None if concat is None else jnp.asarray(concat, jnp.float32),
            cond_noise=cond_noise if concat_kind == "noise_augmented" else None,
            noise_level=jnp.full((batch,), noise_level, jnp.int32) if concat_kind == "noise_augmented" else None,
        )
        # diffusers' inpaint pipeline starts from its `latents=` argument times init_noise_sigma at every
        # strength (prepare_latents), and from the image noised to the first step only when it draws the
        # noise itself; img2img has no `latents=` there, so it is always the noise added to the image.
        start_from_noise = mode == "txt2img" or (mode == "inpaint" and (start_index == 0 or latents is not None))
        fn = self._generate_fn(mode, use_cfg, start_index, return_latents, return_intermediates, concat_kind,
                               start_from_noise)
        inputs = self._shard(inputs)
        out = fn(self.params, inputs, plan, key, jnp.float32(guidance_scale))
        return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a), dtype=np.float32), out)

    # ------------------------------------------------------------------ the jitted chain
    def _generate_fn(self, mode: str, use_cfg: bool, start_index: int, return_latents: bool,
                     return_intermediates: bool, concat_kind: Optional[str] = None, start_from_noise: bool = True):
        def generate(params, inputs, plan, key, guidance_scale):
            ctx = uncond_ctx = None
            if self.text_encoder is not None:
                encode = lambda ids: self.text_encoder.apply({"params": params["text_encoder"]}, ids)  # noqa: E731
                ctx = encode(inputs["ids"])
                uncond_ctx = encode(inputs["neg_ids"]) if use_cfg else None
            labels = inputs["class_labels"]
            uncond_labels = None
            if labels is not None and use_cfg:
                # The CompVis class-conditional models reserve the last class as "no label".
                uncond_labels = jnp.full_like(labels, self.unet.config.num_class_embeds - 1)
            if concat_kind == "noise_augmented":
                # The noise level is the ADM label y; guidance gives both branches the same level and the
                # same noised image (LatentUpscaleDiffusion.log_images, diffusers' upscale pipeline).
                labels = inputs["noise_level"]

            noise = inputs["noise"]
            batch = noise.shape[0]
            extra_channels = None
            inpaint = None
            if concat_kind == "first_stage":
                extra_channels = self._first_stage_condition(params, inputs["concat"])
            elif concat_kind == "cond_stage":  # LatentDiffusion.get_learned_conditioning: SpatialRescaler.encode
                extra_channels = self.cond_stage_model.apply({"params": params["cond_stage"]}, inputs["concat"])
            elif concat_kind == "noise_augmented":
                # Noise conditioning augmentation (Ho et al. 2021, "Cascaded Diffusion Models", Sec. 4.1):
                # c = sqrt(abar_l) x_low + sqrt(1 - abar_l) eps under the low-res schedule, at level l.
                low_res_schedule = NoiseSchedule.from_diffusers_config(self.low_res_scheduler_config)
                extra_channels = add_noise(low_res_schedule, inputs["concat"], inputs["cond_noise"],
                                           inputs["noise_level"])
            elif concat_kind is not None:
                extra_channels = inputs["concat"]
            x = samplers.scale_initial_noise(plan, noise)
            if mode != "txt2img":
                image_latents = _tile_batch(
                    self._encode_image(params, inputs["init"], jax.random.fold_in(key, _POSTERIOR)), batch)
                if not start_from_noise:
                    x = samplers.noise_to_start(plan, image_latents, noise, start_index)
                if mode == "inpaint":
                    f = self.vae_scale_factor
                    mask_bhw1 = _tile_batch(inputs["mask"][:, ::f, ::f, :], batch)  # nearest, as F.interpolate
                    init = inputs["init"]
                    if init.shape[0] != inputs["mask"].shape[0] and 1 not in (init.shape[0], inputs["mask"].shape[0]):
                        init = _tile_batch(init, batch)  # _mask_for tiled the mask to the batch
                    if self.unet.config.in_channels == self.latent_channels:
                        inpaint = samplers.Inpaint(mask_bhw1, image_latents, noise)
                    elif self._ldm_inpainting:
                        # CompVis LDM inpainting (scripts/inpaint.py): c_concat = [first-stage
                        # encoding of the masked image (unscaled), the mask at latent size].
                        masked = init * (inputs["mask"] < 0.5)
                        extra_channels = jnp.concatenate(
                            [_tile_batch(self._first_stage_condition(params, masked), batch), mask_bhw1], axis=-1)
                    else:
                        # diffusers prepare_mask_latents: encode the masked image(s) as given, then repeat.
                        masked = init * (inputs["mask"] < 0.5)
                        masked_latents = _tile_batch(self._encode_image(
                            params, masked, jax.random.fold_in(key, _MASKED_POSTERIOR)), batch)
                        extra_channels = jnp.concatenate([mask_bhw1, masked_latents], axis=-1)

            def apply_unet(x_bhwc, t_b, ctx_btd, labels_b):
                return self.unet.apply({"params": params["unet"]}, x_bhwc, t_b, ctx_btd, labels_b)

            model_fn = guided_denoiser(
                apply_unet, ctx, uncond_ctx, labels, uncond_labels,
                guidance_scale=guidance_scale, extra_channels=extra_channels)
            z = samplers.sample(model_fn, x, plan, jax.random.fold_in(key, _STEPS), start_index=start_index,
                                inpaint=inpaint, return_intermediates=return_intermediates)
            z, steps = z if return_intermediates else (z, None)
            if return_latents:
                out = z
            else:
                images = self.vae.apply({"params": params["vae"]}, z / self.scaling_factor, method="decode")
                out = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
            return (out, steps) if return_intermediates else out

        return self._jit(("generate", mode, use_cfg, start_index, return_latents, return_intermediates, concat_kind,
                          start_from_noise), generate)

    def _static_description(self) -> str:
        """Everything the jitted chain closes over except the parameters (which are arguments):
        the modules with their configurations, dtypes and attention implementations, and the
        conditioning fields. The executable store keys compiled chains by it."""
        skip = ("params", "tokenizer", "layout_builder", "source", "sample_size", "mesh", "_jit_cache")
        return repr([(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in skip])

    # ------------------------------------------------------------------ concat conditioning
    @property
    def concat_channels(self) -> int:
        """Channels the U-Net takes after the latents (0 for text/class/unconditional models)."""
        return int(self.unet.config.in_channels) - self.latent_channels

    @property
    def _ldm_inpainting(self) -> bool:
        """CompVis LDM inpainting: concat of the masked image's first-stage latents and the mask."""
        return (self.conditioning_key == "concat" and self.cond_stage == "first_stage"
                and self.concat_channels == self.latent_channels + 1)

    def _concat_input(self, cond_image, image_conditioning, batch: int, height, width, inpaint: bool,
                      segmentation=None):
        """(array, kind) for the concatenated U-Net channels, checked against the model;
        kind "channels" (the channels themselves: ``image_conditioning``, or the image in
        [-1, 1] at latent size for an identity cond stage), "first_stage" (an image in
        [-1, 1] at the output size, encoded in the jitted chain) or "cond_stage" (the
        ``segmentation`` map at the output size, through ``cond_stage_model`` in the chain)."""
        k, f = self.concat_channels, self.vae_scale_factor
        what = self.source or "this model"
        given = [name for name, v in (("cond_image", cond_image), ("image_conditioning", image_conditioning),
                                      ("segmentation", segmentation)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give one of cond_image, image_conditioning and segmentation, not {' and '.join(given)}")
        if segmentation is not None and self.cond_stage_model is None:
            raise ValueError(f"{what}: segmentation= is the input of a SpatialRescaler cond stage (semantic "
                             "synthesis models); this model has none")
        if cond_image is not None and self.cond_stage_model is not None:
            raise ValueError(f"{what} conditions on a map through its SpatialRescaler: pass segmentation= "
                             f"(B, H, W, {self.cond_stage_model.in_channels}) or class indices (B, H, W), not "
                             "cond_image=")
        if not given:
            inpaint_model = inpaint and (k == self.latent_channels + 1)  # diffusers 9-channel / LDM inpainting
            if k > 0 and self.cond_stage_model is not None:
                raise ValueError(
                    f"{what}: the U-Net takes {k} channels concatenated to the latents from a SpatialRescaler "
                    f"cond stage; pass segmentation= (B, H, W, {self.cond_stage_model.in_channels}) one-hot / "
                    "probabilities or (B, H, W) class indices at the image size, or image_conditioning= "
                    "(B, h, w, k)")
            if k > 0 and not inpaint_model:
                raise ValueError(
                    f"{what}: the U-Net takes {k} channels concatenated to the latents "
                    f"(conditioning_key={self.conditioning_key!r}, cond stage {self.cond_stage or 'unknown'!r}); "
                    "pass them: cond_image= (the low-res image of a super-resolution model, or an image the first "
                    "stage encodes) or image_conditioning= (B, h, w, k)")
            return None, None
        if k <= 0:
            raise ValueError(f"{what}: cond_image / image_conditioning need a concat-"
                             f"conditioned U-Net, but its {self.unet.config.in_channels} input channels are the "
                             "latents only")
        if segmentation is not None:
            from ldm_jax.models.spatial_rescaler import prepare_segmentation

            rescaler = self.cond_stage_model
            arr = prepare_segmentation(segmentation, int(rescaler.in_channels))
            out_hw = rescaler.output_size(*arr.shape[1:3])
            want = ((height or out_hw[0] * f) // f, (width or out_hw[1] * f) // f)
            if tuple(out_hw) != want:
                raise ValueError(
                    f"segmentation is {arr.shape[1]}x{arr.shape[2]}, which the SpatialRescaler ({rescaler.n_stages} "
                    f"x {rescaler.method} by {rescaler.multiplier}) makes {out_hw[0]}x{out_hw[1]}, but the latent "
                    f"size is {want[0]}x{want[1]} (height x width / {f}); give it at the image size")
            return self._repeat_batch(arr, batch), "cond_stage"
        if image_conditioning is not None:
            arr = np.asarray(image_conditioning, np.float32)
            arr = arr[None] if arr.ndim == 3 else arr
            if arr.ndim != 4 or arr.shape[-1] != k:
                raise ValueError(f"image_conditioning must be (B, h, w, {k}) NHWC, got shape {arr.shape}")
            kind = "channels"
        else:
            arr = prepare_image(cond_image, batch, None, None) * 2.0 - 1.0
            kind = "first_stage" if self.cond_stage == "first_stage" else "channels"
            if kind == "channels" and arr.shape[-1] != k:
                raise ValueError(f"cond_image has {arr.shape[-1]} channels but the U-Net takes {k} concatenated "
                                 "channels; pass image_conditioning= (B, h, w, k) instead")
            if kind == "first_stage" and self.latent_channels != k:
                raise ValueError(f"cond_image is encoded to {self.latent_channels} channels but the U-Net takes {k} "
                                 "concatenated channels; for LDM inpainting pass init_image= and mask=")
        if kind == "first_stage":
            want = (height or arr.shape[1], width or arr.shape[2])
            if tuple(arr.shape[1:3]) != want:
                raise ValueError(f"cond_image is {arr.shape[1]}x{arr.shape[2]} but height x width is "
                                 f"{want[0]}x{want[1]}")
        else:
            want = ((height or arr.shape[1] * f) // f, (width or arr.shape[2] * f) // f)
            if tuple(arr.shape[1:3]) != want:
                what = "image_conditioning" if cond_image is None else "cond_image (the low-resolution image)"
                raise ValueError(f"{what} is {arr.shape[1]}x{arr.shape[2]} but must have the latent size "
                                 f"{want[0]}x{want[1]} (height x width / {f})")
        return self._repeat_batch(arr, batch), kind

    @staticmethod
    def _repeat_batch(arr: np.ndarray, batch: int) -> np.ndarray:
        if arr.shape[0] != batch:
            if batch % arr.shape[0]:
                raise ValueError(f"cond_image / image_conditioning / segmentation has {arr.shape[0]} entries, which "
                                 f"does not divide the batch of {batch}")
            arr = np.concatenate([arr] * (batch // arr.shape[0]))
        return arr

    def _check_upscaler_inputs(self, noise_level, class_labels, cond_image, image_conditioning) -> None:
        what = self.source or "this model"
        if class_labels is not None:
            raise ValueError(f"{what} is a noise-augmented upscaler: its class label is the noise level; pass "
                             "noise_level= instead of class_labels=")
        if image_conditioning is not None:
            raise ValueError(f"{what} is an upscaler: give it cond_image= (the low-resolution image), not "
                             "image_conditioning=")
        if cond_image is None:
            raise ValueError(f"{what} is an upscaler: pass cond_image= (the low-resolution image in [0, 1], "
                             f"at the latent size: the output is {self.vae_scale_factor}x larger)")
        if isinstance(noise_level, (bool, np.bool_)) or not isinstance(noise_level, (int, np.integer)):
            raise ValueError(f"noise_level must be an int, got {noise_level!r}")
        if not 0 <= noise_level < self.max_noise_level:
            # ImageConcatWithNoiseAugmentation trains on levels randint(0, max_noise_level).
            raise ValueError(f"noise_level must be in [0, {self.max_noise_level}) (max_noise_level of {what}), "
                             f"got {noise_level}")

    def _first_stage_condition(self, params, image_bhwc):
        """``LatentDiffusion.get_learned_conditioning`` with ``__is_first_stage__``: the
        first stage's ``encode`` (KL: the posterior mode; VQ: the pre-quantisation
        latents), not multiplied by the scale factor."""
        enc = self.vae.apply({"params": params["vae"]}, image_bhwc, method="encode")
        return enc.pre_quant if hasattr(enc, "pre_quant") else enc.mode()

    def _encode_image(self, params, image_bhwc, rng):
        """Scaled latents of images in [-1, 1]: a posterior sample (KL), as diffusers'
        img2img/inpaint pipelines; the quantised latents (VQ)."""
        posterior = self.vae.apply({"params": params["vae"]}, image_bhwc, method="encode")
        return posterior.sample(rng) * self.scaling_factor

    # ------------------------------------------------------------------ plumbing
    def _jit(self, key, fn):
        """The jitted ``fn`` for ``key`` (subclasses override it, e.g. the training sampler's
        replicated outputs). With the persistent compilation cache on, the sampling chain is
        also stored whole, so a later process skips tracing it (executable_store.py)."""
        if key not in self._jit_cache:
            if isinstance(key, tuple) and key[0] == "generate":
                self._jit_cache[key] = StoredProgram(fn, f"{self._static_description()}\n{key}", name="sampling chain")
            else:
                self._jit_cache[key] = jax.jit(fn)
        return self._jit_cache[key]

    def _batch_mesh(self, batch: int) -> Optional[Mesh]:
        mesh = self.mesh
        if mesh is None:
            devices = jax.local_devices()
            if len(devices) <= 1 or batch % len(devices):
                return None
            mesh = Mesh(np.asarray(devices), ("data",))
        return mesh if batch % mesh.shape["data"] == 0 else None

    def _shard(self, inputs: Dict[str, Any]) -> Dict[str, Any]:
        """Put per-example inputs on a ("data",) mesh when the batch divides evenly."""
        mesh = self._batch_mesh(inputs["noise"].shape[0])
        if mesh is None:
            return inputs
        batch_sharding = NamedSharding(mesh, P("data"))
        # init / mask keep the number of images given (tiled to the batch inside the chain): replicated.
        replicated = NamedSharding(mesh, P())
        batch = inputs["noise"].shape[0]
        return {k: (None if v is None else jax.device_put(v, batch_sharding if v.shape[0] == batch else replicated))
                for k, v in inputs.items()}

    @staticmethod
    def _mask_for(mask, init_bhwc: np.ndarray, batch: int, height: int, width: int) -> np.ndarray:
        """The binarised mask (m, H, W, 1), m the number given. diffusers computes the masked image as
        ``init_image * (mask_condition < 0.5)`` on the images and masks as given (broadcast) and encodes
        that; when the two counts do not broadcast (neither 1 nor equal) both are tiled to the batch
        here (diffusers raises a shape error there)."""
        arr = prepare_mask(mask, batch, height, width, repeat=False)
        m, k = arr.shape[0], init_bhwc.shape[0]
        if m != k and 1 not in (m, k):
            arr = np.concatenate([arr] * (batch // m))
        return arr


def initial_noise(seed: int, latent_shape) -> jax.Array:
    """The standard-normal initial noise ``Pipeline.__call__`` draws for ``seed`` (B, h, w, C), when no
    ``latents=`` are given."""
    return jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), _NOISE), tuple(latent_shape), jnp.float32)


def _tile_batch(x: jax.Array, batch: int) -> jax.Array:
    """``x`` (k, ...) tiled to (batch, ...) (k divides batch), as ``torch.cat([x] * (batch // k))``."""
    return x if x.shape[0] == batch else jnp.tile(x, (batch // x.shape[0],) + (1,) * (x.ndim - 1))


def _as_prompt_list(prompt, name: str) -> List[str]:
    """A list of strings from a string or a sequence of strings, else a TypeError naming ``name``
    (diffusers' check_inputs: `prompt` has to be of type `str` or `list`)."""
    if isinstance(prompt, str):
        return [prompt]
    try:
        items = list(prompt)
    except TypeError:
        items = None
    if items is None or not all(isinstance(p, str) for p in items):
        got = type(prompt).__name__ if items is None else \
            f"a {type(prompt).__name__} holding {sorted({type(p).__name__ for p in items})}"
        raise TypeError(f"{name} must be a string or a list of strings, got {got}")
    return items


def _check_call_scalars(height, width, seed, guidance_scale) -> None:
    """Clear errors for ``__call__``'s scalar arguments, before they reach jax (where a negative size
    is an MLIR error, a None seed an opaque conversion error, and a NaN scale a silently black image)."""
    for name, v in (("height", height), ("width", width)):
        if v is None:
            continue
        integral = isinstance(v, (int, np.integer)) or (isinstance(v, (float, np.floating)) and float(v).is_integer())
        if isinstance(v, (bool, np.bool_)) or not integral or v < 0:
            # 0 means "the default size", as diffusers' `height = height or sample_size * vae_scale_factor`.
            raise ValueError(f"{name} must be a positive integer (pixels) or None for the model's default, got {v!r}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int (the only source of randomness here), got {seed!r}")
    if not -2 ** 63 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must fit in 64 bits, got {seed}")
    if guidance_scale is not None:
        try:
            g = None if isinstance(guidance_scale, (str, bytes)) else float(guidance_scale)
        except (TypeError, ValueError):
            g = None
        if g is None or not np.isfinite(g):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")


def load_pipeline(path: str, config: Optional[str] = None, dtype: str = "float32", **kwargs) -> Pipeline:
    """A ``Pipeline`` from a diffusers-format folder (model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/), a ``train.py`` LDM workdir, or a single original CompVis/Stability
    .ckpt/.safetensors file (``config``: its original YAML, else inferred from the keys;
    ``use_ema=``, ``prediction_type=``, ``tokenizer=`` (the vocab.txt / tokenizer folder an LDM
    txt2img BERTEmbedder checkpoint lacks) and ``vae=`` (a standalone CompVis first-stage file replacing
    the checkpoint's) pass through to ``load_original_pipeline``; ``variant=``
    ("fp16", ...) to ``load_diffusers_pipeline``, as diffusers' ``from_pretrained(variant=)``).
    ``dtype``: compute dtype ("float32" or "bfloat16"); parameters stay float32."""
    import os

    from ldm_jax.convert.diffusers_pipeline import load_diffusers_pipeline
    from ldm_jax.convert.errors import CheckpointError

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json")):
        return load_diffusers_pipeline(path, dtype=dtype, **kwargs)
    if os.path.isfile(path):  # a single CompVis/Stability .ckpt/.safetensors file (+ its original YAML)
        from ldm_jax.convert.original_pipeline import load_original_pipeline

        return load_original_pipeline(path, config=config, dtype=dtype, **kwargs)
    from ldm_jax.convert.workdir_pipeline import is_train_workdir, load_workdir_pipeline

    if os.path.isdir(path) and is_train_workdir(path):  # a train.py workdir
        return load_workdir_pipeline(path, dtype=dtype, **kwargs)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file or directory")
    raise CheckpointError(
        f"{path}: not a model: expected a diffusers folder (model_index.json), a train.py workdir "
        "(config.json + checkpoints/) or a .ckpt/.safetensors file")
