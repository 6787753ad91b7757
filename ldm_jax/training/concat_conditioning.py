"""Channels concatenated to the noisy latents (LDM Sec. 3.3, "conditioning via concatenation";
CompVis ``DiffusionWrapper`` with ``conditioning_key`` "concat", or "hybrid" next to
cross-attention), for training the concat-conditioned families ``ldm_jax.Pipeline`` samples:

* ``"low_res"``: super-resolution (LDM Sec. 4.4, the ``bsr_sr`` model: ``torch.nn.Identity``
  cond stage). The condition is the training image downsampled by the autoencoder factor f to
  the latent size, in [-1, 1] (3 channels). The downsample is an exact box filter (the mean of
  every f x f block: anti-aliased, what PIL's BOX / OpenCV's INTER_AREA give at an integer
  factor). The released bsr_sr model was trained on BSR degradations instead ("bsrgan_light":
  random blur, noise, JPEG, resize kernels; Zhang et al. 2021), which makes it robust to real
  low-resolution inputs; a batch that carries its own ``"low_res"`` images (B, h, w, 3) (uint8,
  or float in [-1, 1]) is used as given, which is where such degradations plug in.
* ``"noise_augmented_low_res"``: the SD 2 x4 upscaler family (Stability's ``LatentUpscaleDiffusion``
  with ``ImageConcatWithNoiseAugmentation``; noise conditioning augmentation, Ho et al. 2021
  "Cascaded Diffusion Models" Sec. 4.1). The "low_res" image, noised under its own schedule
  (``LOW_RES_SCHEDULE``: CompVis linear 1e-4..0.02, 1000 steps) at a level l drawn per example
  uniformly in [0, max_noise_level); l is the U-Net's class label (``hybrid-adm``).
* ``"inpainting"``: SD-inpainting / LDM inpainting (LDM Sec. 4.5). The condition is
  ``[mask at latent size (1 channel), first-stage latents of the masked image]`` in the order
  and scale of Stability's ``LatentInpaintDiffusion`` (``concat_keys=("mask", "masked_image")``,
  the masked image through ``get_first_stage_encoding``: a KL posterior *sample* times the
  scale factor, VQ's quantised latents times it) and of ``Pipeline``'s sampling of such a model
  (``_generate_fn``: ``masked = init * (mask < 0.5)``, ``_encode_image``, the mask taken at every
  f-th pixel, which is ``F.interpolate``'s nearest at an integer factor). The masks are drawn per
  example by ``random_masks`` (see there) unless the batch carries ``"inpaint_mask"``.
* ``"segmentation"``: semantic synthesis (LDM Sec. 4.3.2, the ``semantic_synthesis256`` /
  landscapes models: ``cond_stage_key: segmentation``, ``concat_mode``, ``cond_stage_trainable``).
  The batch's integer label map (B, H, W) at the image size is one-hot encoded (``np.eye(C)[labels]``
  as the CompVis / taming segmentation data sets build it; an ignored pixel, -1, is all zeros) and
  goes through a ``SpatialRescaler`` (``ldm_jax.models.spatial_rescaler``: ``n_stages`` bilinear
  halvings to the latent size, then a 1x1 conv to ``out_channels``) whose parameters are trained
  with the U-Net (``params["cond_stage"]``); in_channels = latent channels + out_channels.

Classifier-free guidance dropout never touches these channels (as the original and SD: only
the text/class condition is dropped; guidance at sampling time gives both branches the same
channels).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedule import add_noise
from ldm_jax.training.image_range import images_to_float

NOISE_AUGMENTED = "noise_augmented_low_res"
CONCATS = ("none", "low_res", NOISE_AUGMENTED, "inpainting", "segmentation")
LOW_RES_CONCATS = ("low_res", NOISE_AUGMENTED)  # the 3-channel low-res image (noised or not)
# The released x4 upscaler's low_scale_config: noise_schedule_config linear_start 1e-4, linear_end 0.02
# (CompVis "linear" = diffusers "scaled_linear"), 1000 steps; max_noise_level 350. The same diffusers
# scheduler-config dict as Pipeline.low_res_scheduler_config (convert.original_config.low_scale_from_ldm).
LOW_RES_SCHEDULE = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 1e-4,
                    "beta_end": 0.02, "beta_schedule": "scaled_linear"}
MAX_NOISE_LEVEL = 350


def num_concat_channels(concat: str, latent_channels: int, cond_channels: Optional[int] = None) -> int:
    """Channels ``concat`` adds to the U-Net input: 0, 3 (the RGB low-res image),
    latent_channels + 1 (masked-image latents and the mask) or the cond stage's output channels
    ``cond_channels`` (segmentation)."""
    if concat not in CONCATS:
        raise ValueError(f"diffusion.concat must be one of {CONCATS}, got {concat!r}")
    return {"none": 0, "low_res": 3, NOISE_AUGMENTED: 3, "inpainting": latent_channels + 1,
            "segmentation": int(cond_channels or 0)}[concat]


def check_unet_in_channels(in_channels: int, latent_channels: int, concat: str,
                           cond_channels: Optional[int] = None) -> None:
    """ValueError naming both numbers when the U-Net input is not latents + concat channels."""
    k = num_concat_channels(concat, latent_channels, cond_channels)
    if int(in_channels) != latent_channels + k:
        what = {"none": "the latents only (diffusion.concat='none')",
                "low_res": "the latents + the 3-channel low-res image (diffusion.concat='low_res')",
                NOISE_AUGMENTED: "the latents + the 3-channel noised low-res image "
                                 f"(diffusion.concat='{NOISE_AUGMENTED}')",
                "inpainting": f"the latents + the mask + the {latent_channels}-channel masked-image latents "
                              "(diffusion.concat='inpainting')",
                "segmentation": f"the latents + the SpatialRescaler's {k} output channels "
                                "(diffusion.concat='segmentation', model.cond_stage.out_channels)"}[concat]
        raise ValueError(f"model.unet.in_channels={in_channels}, but the U-Net input is {what}: "
                         f"{latent_channels} + {k} = {latent_channels + k} channels")


# ------------------------------------------------------------------ super-resolution
def area_downsample(x_bhwc: jax.Array, factor: int) -> jax.Array:
    """Mean over every ``factor`` x ``factor`` block: (B, H, W, C) -> (B, H/f, W/f, C)."""
    b, h, w, c = x_bhwc.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by the downsampling factor {factor}")
    return x_bhwc.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def low_res_condition(image_bhwc: jax.Array, factor: int) -> jax.Array:
    """The super-resolution condition of training images (uint8 or [-1, 1]): their box-filtered
    1/factor version in [-1, 1], float32 (B, H/f, W/f, 3) (the bsr_sr ``LR_image``, clean)."""
    return area_downsample(images_to_float(image_bhwc), factor)


def noise_augment(low_res_bhwc: jax.Array, noise_bhwc: jax.Array, levels_b: jax.Array, schedule) -> jax.Array:
    """sqrt(abar_l) x_low + sqrt(1 - abar_l) eps under the low-res ``schedule`` (a NoiseSchedule) at
    the per-example levels l (ImageConcatWithNoiseAugmentation.forward, Pipeline's upscaler chain)."""
    return add_noise(schedule, low_res_bhwc.astype(jnp.float32), noise_bhwc.astype(jnp.float32), levels_b)


# ------------------------------------------------------------------ inpainting masks
@dataclasses.dataclass(frozen=True)
class MaskConfig:
    """Random inpainting masks (``random_masks``); config key ``diffusion.inpainting_masks``.
    Sizes are fractions of the shorter image side."""

    full_prob: float = 0.25                         # P(whole image masked): SD-inpainting's "25% mask everything"
    box_prob: float = 0.5                           # P(boxes) among the other examples; else brush strokes
    max_shapes: int = 3                             # 1 .. max_shapes boxes (or strokes), uniformly
    box_size: Tuple[float, float] = (0.1, 0.7)      # box height and width, each uniform in this range
    stroke_vertices: int = 5                        # vertices of a stroke's polyline (a random walk)
    stroke_length: Tuple[float, float] = (0.1, 0.4)  # length of each polyline segment
    stroke_width: Tuple[float, float] = (0.05, 0.2)  # brush diameter (one per stroke)

    def __post_init__(self):
        for name in ("full_prob", "box_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"diffusion.inpainting_masks.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_shapes < 1 or self.stroke_vertices < 2:
            raise ValueError("diffusion.inpainting_masks: max_shapes must be >= 1 and stroke_vertices >= 2, got "
                             f"{self.max_shapes} and {self.stroke_vertices}")
        for name in ("box_size", "stroke_length", "stroke_width"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi:
                raise ValueError(f"diffusion.inpainting_masks.{name} must be a range (lo, hi) with 0 <= lo <= hi, "
                                 f"got {(lo, hi)}")

    @classmethod
    def from_mapping(cls, fields) -> "MaskConfig":
        fields = dict(fields or {})
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"diffusion.inpainting_masks: unknown keys {unknown}")
        for name in ("box_size", "stroke_length", "stroke_width"):
            if name in fields:
                fields[name] = tuple(float(v) for v in fields[name])
        return cls(**fields)


def random_masks(key: jax.Array, batch: int, height: int, width: int, cfg: MaskConfig = MaskConfig()) -> jax.Array:
    """(B, H, W, 1) float32 masks of 0/1 (1 = repaint), one per example from ``key``.

    The scheme of SD-inpainting's training (the runwayml model card: "During training, we
    generate synthetic masks and in 25% mask everything"), the synthetic masks in the style of
    LaMa's "wide" training masks (Suvorov et al. 2022: thick brush strokes and boxes): with
    probability ``full_prob`` the whole image; otherwise, with probability ``box_prob``, the
    union of 1..max_shapes axis-aligned boxes, else of 1..max_shapes brush strokes, each a
    polyline of ``stroke_vertices`` points (a random walk from a uniform start, uniform
    directions, segment lengths in ``stroke_length``; clipped to the image) drawn with a round
    brush of diameter ``stroke_width``. Pixel (i, j) is covered when its centre is."""
    side = float(min(height, width))
    k_full, k_kind, k_num, k_box, k_start, k_angle, k_len, k_width = jax.random.split(key, 8)
    s, v = cfg.max_shapes, cfg.stroke_vertices
    active = jnp.arange(s)[None, :] < jax.random.randint(k_num, (batch,), 1, s + 1)[:, None]  # (B, S)
    py = (jnp.arange(height, dtype=jnp.float32) + 0.5)[None, :, None]  # pixel centres (1, H, 1)
    px = (jnp.arange(width, dtype=jnp.float32) + 0.5)[None, None, :]   # (1, 1, W)
    e = lambda a: a[:, None, None]  # noqa: E731  (B,) -> (B, 1, 1)

    # Boxes: side lengths uniform in box_size * side, placed uniformly inside the image.
    u = jax.random.uniform(k_box, (4, batch, s))
    bh = jnp.minimum((cfg.box_size[0] + (cfg.box_size[1] - cfg.box_size[0]) * u[0]) * side, height)
    bw = jnp.minimum((cfg.box_size[0] + (cfg.box_size[1] - cfg.box_size[0]) * u[1]) * side, width)
    y0, x0 = u[2] * (height - bh), u[3] * (width - bw)

    # Brush strokes: pixels whose distance to a polyline segment is at most the brush radius.
    start = jax.random.uniform(k_start, (batch, s, 1, 2)) * jnp.array([height, width], jnp.float32)
    angle = jax.random.uniform(k_angle, (batch, s, v - 1), maxval=2.0 * math.pi)
    length = (cfg.stroke_length[0] + (cfg.stroke_length[1] - cfg.stroke_length[0])
              * jax.random.uniform(k_len, (batch, s, v - 1))) * side
    steps = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1) * length[..., None]  # (B, S, V-1, 2)
    points = jnp.concatenate([start, start + jnp.cumsum(steps, axis=2)], axis=2)
    points = jnp.clip(points, 0.0, jnp.array([height, width], jnp.float32))           # (B, S, V, 2)
    radius = (cfg.stroke_width[0] + (cfg.stroke_width[1] - cfg.stroke_width[0])
              * jax.random.uniform(k_width, (batch, s))) * side / 2.0

    # Static loops over shapes and segments keep every temporary (B, H, W) (512x512 batches).
    boxes = strokes = jnp.zeros((batch, height, width), bool)
    for i in range(s):
        top, left = e(y0[:, i]), e(x0[:, i])
        inside = (py >= top) & (py < top + e(bh[:, i])) & (px >= left) & (px < left + e(bw[:, i]))
        boxes = boxes | (inside & e(active[:, i]))
        for j in range(v - 1):
            ay, ax = e(points[:, i, j, 0]), e(points[:, i, j, 1])
            dy, dx = points[:, i, j + 1, 0] - points[:, i, j, 0], points[:, i, j + 1, 1] - points[:, i, j, 1]
            t = jnp.clip(((py - ay) * e(dy) + (px - ax) * e(dx)) / e(jnp.maximum(dy * dy + dx * dx, 1e-6)), 0.0, 1.0)
            d2 = jnp.square(py - ay - t * e(dy)) + jnp.square(px - ax - t * e(dx))
            strokes = strokes | ((d2 <= e(jnp.square(radius[:, i]))) & e(active[:, i]))

    full = jax.random.bernoulli(k_full, cfg.full_prob, (batch,))
    use_boxes = jax.random.bernoulli(k_kind, cfg.box_prob, (batch,))
    mask = e(full) | jnp.where(e(use_boxes), boxes, strokes)
    return mask.astype(jnp.float32)[..., None]


# ------------------------------------------------------------------ inpainting channels
def mask_to_latent_size(mask_bhw1: jax.Array, factor: int) -> jax.Array:
    """Nearest downsampling to the latent grid: every f-th pixel, as ``F.interpolate(mask,
    size=latent)`` (mode "nearest" at an integer factor) and ``Pipeline``'s ``mask[:, ::f, ::f]``."""
    return mask_bhw1[:, ::factor, ::factor, :]


def masked_image(image_bhwc: jax.Array, mask_bhw1: jax.Array) -> jax.Array:
    """The image in [-1, 1] with the region to repaint set to 0 (SD's ``image * (mask < 0.5)``)."""
    return images_to_float(image_bhwc) * (mask_bhw1 < 0.5).astype(jnp.float32)


def inpainting_condition(vae: nn.Module, vae_params, image_bhwc: jax.Array, mask_bhw1: jax.Array,
                         eps_bhwc: Optional[jax.Array], scale_factor) -> jax.Array:
    """``[mask at latent size, scale_factor * E(masked image)]`` (B, h, w, 1 + c), float32,
    gradient-free: E a KL posterior sample ``mean + std * eps`` (eps None: the mean) or VQ's
    quantised latents, what ``Pipeline._encode_image`` (``posterior.sample(rng) * scaling_factor``)
    gives at sampling time."""
    enc = vae.apply({"params": vae_params}, masked_image(image_bhwc, mask_bhw1), method="encode")
    if hasattr(enc, "logvar"):  # DiagonalGaussianDistribution
        z = enc.mean if eps_bhwc is None else enc.mean + enc.std * eps_bhwc.astype(enc.mean.dtype)
    else:  # VQEncoding: sample() is the quantised latents
        z = enc.latents
    z = z.astype(jnp.float32) * scale_factor
    mask = mask_to_latent_size(mask_bhw1.astype(jnp.float32), vae.config.downsample_factor)
    return jax.lax.stop_gradient(jnp.concatenate([mask, z], axis=-1))


# ------------------------------------------------------------------ semantic synthesis
def one_hot_labels(labels_bhw: jax.Array, num_classes: int) -> jax.Array:
    """(B, H, W) integer labels -> (B, H, W, num_classes) float32 one-hot; -1 (ignored) -> all zeros."""
    return jax.nn.one_hot(labels_bhw.astype(jnp.int32), num_classes, dtype=jnp.float32)


def segmentation_condition(rescaler: nn.Module, rescaler_params, labels_bhw: jax.Array) -> jax.Array:
    """The semantic-synthesis channels: the SpatialRescaler (trained, gradients flow into
    ``rescaler_params``) of the one-hot label maps, (B, h, w, out_channels)
    (``LatentDiffusion.get_learned_conditioning`` of the one-hot ``segmentation`` batch)."""
    return rescaler.apply({"params": rescaler_params}, one_hot_labels(labels_bhw, int(rescaler.in_channels)))
