"""Batch sampling jobs: many prompts x iterations -> PNG files, restartable.

A job is a list of batches; batch b renders ``n_samples`` images of one prompt
with seed ``seed + b``. Image n of the job is ``outdir/samples/NNNNN.png`` with
the prompt, seed, sampler, steps and scale in its PNG text chunks. A batch whose
files all exist is skipped, so rerunning a killed job completes it without
changing what was already written; files are written to a temporary name and
renamed, so a kill never leaves a half-written PNG. With several processes
(multi-host), process p renders batches p, p + P, p + 2P, ...

A layout-to-image model's job gives token ids per prompt (``context_ids``, one
row per layout of ``sample.py --layout``) in place of text; its prompts are then
the layouts' descriptions, recorded as ``layout`` in the PNGs.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import List, Optional, Sequence

import jax
import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm_jax.diffusion.timesteps import SAMPLER_NAMES
from ldm_jax.image_io import make_grid, prepare_image, to_uint8


@dataclasses.dataclass(frozen=True)
class SamplingJob:
    prompts: Sequence[str]              # one entry per prompt ("" for unconditional models)
    n_samples: int = 4                  # images per batch (one prompt)
    n_iter: int = 1                     # batches per prompt
    steps: int = 50                     # sampler steps
    scale: float = 7.5                  # classifier-free guidance scale
    sampler: str = "ddim"               # one of SAMPLER_NAMES
    eta: float = 0.0                    # DDIM eta
    seed: int = 0                       # batch b uses seed + b
    height: Optional[int] = None        # None: the model's default size
    width: Optional[int] = None
    negative_prompt: Optional[str] = None
    init_image: Optional[str] = None    # img2img / inpainting source image (path)
    strength: float = 0.8               # img2img strength
    mask: Optional[str] = None          # inpainting mask (path; white = repaint)
    class_label: Optional[int] = None   # class-conditional models
    checkpoint: str = ""                # recorded in the metadata
    # (len(prompts), L) token ids used instead of the prompts' text (layout-to-image models: the layouts'
    # ids); the prompts are then only descriptions, written to the PNGs as "layout"
    context_ids: Optional[np.ndarray] = None

    def validate(self) -> None:
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        if not self.prompts:
            raise ValueError("no prompts: give --prompt or a non-empty --from-file")
        for name in ("n_samples", "n_iter", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("init_image", "mask"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise FileNotFoundError(f"--{name.replace('_', '-')} file not found: {path}")
        if self.mask and not self.init_image:
            raise ValueError("--mask needs --init-img (the image to inpaint)")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"--strength must be in [0, 1], got {self.strength}")
        if self.context_ids is not None:
            ids = np.asarray(self.context_ids)
            if ids.ndim != 2 or ids.shape[0] != len(self.prompts):
                raise ValueError(f"context_ids must have one row per prompt ({len(self.prompts)}), got shape "
                                 f"{ids.shape}")
            if self.class_label is not None:
                raise ValueError("context_ids (layouts) and --class_label do not go together")

    @property
    def num_batches(self) -> int:
        return len(self.prompts) * self.n_iter


def read_prompt_file(path: str) -> List[str]:
    """One prompt per line; blank lines are skipped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts")
    return prompts


def sample_path(outdir: str, index: int) -> str:
    return os.path.join(outdir, "samples", f"{index:05d}.png")


def _metadata(job: SamplingJob, prompt: str, seed: int, k: int) -> PngInfo:
    info = PngInfo()
    fields = dict(prompt=prompt, negative_prompt=job.negative_prompt or "", seed=seed, index_in_batch=k,
                  sampler=job.sampler, steps=job.steps, scale=job.scale, eta=job.eta,
                  checkpoint=job.checkpoint, software="ldm_jax")
    if job.context_ids is not None:  # a layout: its description, not a prompt
        fields = {"layout" if key == "prompt" else key: value for key, value in fields.items()}
    if job.init_image:
        fields.update(init_image=job.init_image, strength=job.strength)
    if job.mask:
        fields["mask"] = job.mask
    if job.class_label is not None:
        fields["class_label"] = job.class_label
    for key, value in fields.items():
        info.add_text(key, str(value))
    return info


def _write_png(path: str, image_hwc: np.ndarray, info: Optional[PngInfo] = None) -> None:
    tmp = path + ".partial"
    Image.fromarray(to_uint8(image_hwc)).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def run_sampling_job(pipe, job: SamplingJob, outdir: str, progress: bool = True) -> List[str]:
    """Render every batch of ``job`` not already on disk; returns all sample paths of the job."""
    from tqdm import tqdm

    job.validate()
    factor = getattr(pipe, "vae_scale_factor", 1)
    for name, size in (("--H", job.height), ("--W", job.width)):
        if size is not None and size % factor:
            raise ValueError(f"{name}={size} is not a multiple of the autoencoder factor {factor}; "
                             f"height and width must be multiples of the autoencoder factor {factor}")
    init = None
    if job.init_image:
        init = prepare_image(job.init_image, 1, job.height, job.width)
    os.makedirs(os.path.join(outdir, "samples"), exist_ok=True)
    p, num_p = jax.process_index(), jax.process_count()
    mine = [b for b in range(job.num_batches) if b % num_p == p]
    todo = [b for b in mine if not all(os.path.isfile(sample_path(outdir, b * job.n_samples + k))
                                       for k in range(job.n_samples))]
    bar = tqdm(total=len(todo) * job.n_samples, unit="img", disable=not progress or p != 0,
               desc=f"sampling ({len(mine) - len(todo)} batches already done)")
    t0, made = time.perf_counter(), 0
    try:
        for b in todo:
            prompt = job.prompts[b // job.n_iter]
            seed = job.seed + b
            if job.context_ids is None:
                cond = dict(class_labels=None if job.class_label is None else [job.class_label] * job.n_samples)
                text = [prompt] * job.n_samples
            else:  # token ids (a layout), repeated over the batch; no text
                row = np.asarray(job.context_ids)[b // job.n_iter]
                cond, text = dict(context_ids=np.repeat(row[None], job.n_samples, axis=0)), None
            images = pipe(
                text, negative_prompt=job.negative_prompt, num_inference_steps=job.steps,
                guidance_scale=job.scale, height=job.height, width=job.width, seed=seed, sampler=job.sampler,
                eta=job.eta, init_image=init, strength=job.strength, mask=job.mask, **cond)
            for k, image in enumerate(images):
                _write_png(sample_path(outdir, b * job.n_samples + k), image, _metadata(job, prompt, seed, k))
            made += len(images)
            bar.update(len(images))
            bar.set_postfix(img_per_s=f"{made / (time.perf_counter() - t0):.2f}")
    finally:  # an interrupted job still leaves a clean terminal line
        bar.close()
    paths = [sample_path(outdir, n) for n in range(job.num_batches * job.n_samples)]
    if p == 0 and all(os.path.isfile(x) for x in paths):
        grid = make_grid(np.stack([np.asarray(Image.open(x).convert("RGB"), np.float32) / 255 for x in paths]),
                         cols=job.n_samples)
        _write_png(os.path.join(outdir, "grid.png"), grid)
    return paths
