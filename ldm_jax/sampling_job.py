"""Batch sampling jobs: many prompts x iterations -> PNG files, restartable.

A job is a list of batches; batch b renders ``n_samples`` images of one prompt
with seed ``seed + b``. Image n of the job is ``outdir/samples/NNNNN.png`` with
the prompt, seed, sampler, steps and scale in its PNG text chunks. A batch whose
files all exist is skipped, so rerunning a killed job completes it without
changing what was already written; files are written to a temporary name and
renamed, so a kill never leaves a half-written PNG. An existing file whose
recorded settings differ from the job's (another job's output in the same
folder) is an error, not silently kept. With several processes
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
from ldm_jax.image_io import make_grid, prepare_image, prepare_mask, to_uint8
from ldm_jax.writable_dir import directory_problem


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
    # The CompVis txt2img.py flags: --fixed_code (every batch starts from the first batch's initial noise,
    # its start_code drawn once), --skip_save (only the grid is written), --skip_grid, --n_rows (images per
    # grid row; 0: n_samples).
    fixed_code: bool = False
    skip_save: bool = False
    skip_grid: bool = False
    n_rows: int = 0

    def validate(self) -> None:
        """Checks of the flags alone (before the slow model load); errors name the sample.py flag."""
        if self.sampler not in SAMPLER_NAMES:
            raise ValueError(f"--sampler: unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
        if not self.prompts:
            raise ValueError("no prompts: give --prompt or a non-empty --from-file")
        for name in ("n_samples", "n_iter", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for flag, size in (("--H", self.height), ("--W", self.width)):
            if size is not None and size < 1:  # (the API would name height/width, mid-job)
                raise ValueError(f"{flag} must be a positive number of pixels (or left out for the model's "
                                 f"default), got {size}")
        if not -2 ** 63 <= self.seed or self.seed + self.num_batches - 1 >= 2 ** 64:
            # (batch b uses seed + b; the API refuses seeds outside 64 bits, mid-job)
            raise ValueError(f"--seed {self.seed}: the job's seeds {self.seed} .. {self.seed + self.num_batches - 1} "
                             "must fit in 64 bits")
        if not np.isfinite(self.scale):  # (a NaN scale is a black image; the API refuses it mid-job)
            raise ValueError(f"--scale must be a finite number, got {self.scale}")
        if not (np.isfinite(self.eta) and self.eta >= 0):
            raise ValueError(f"--eta must be a finite number >= 0, got {self.eta}")
        for flag, path in (("--init-img", self.init_image), ("--mask", self.mask)):
            if path and not os.path.isfile(path):
                raise FileNotFoundError(f"{flag} file not found: {path}")
        if self.mask and not self.init_image:
            raise ValueError("--mask needs --init-img (the image to inpaint)")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"--strength must be in [0, 1], got {self.strength}")
        if self.n_rows < 0:
            raise ValueError(f"--n_rows must be >= 0 (0: --n_samples images per grid row), got {self.n_rows}")
        if self.fixed_code and self.init_image:  # (as the CompVis scripts: txt2img.py has it, img2img.py not)
            raise ValueError("--fixed_code fixes text-to-image's initial noise; img2img / inpainting (--init-img) "
                             "noise the image instead")
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
    """One prompt per line (UTF-8); blank lines are skipped, surrounding whitespace is stripped
    (every other character, '#' included, is part of the prompt)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--from-file: prompt file not found: {path}")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first prompt; kept,
        # it would be tokenized and change that prompt's images.
        with open(path, encoding="utf-8-sig") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"--from-file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not prompts:
        raise ValueError(f"--from-file: prompt file {path} has no prompts")
    return prompts


def check_outdir(outdir: str) -> None:
    """Fail early (before the model load, writing nothing) when ``outdir`` cannot become a folder of samples."""
    path = os.path.abspath(outdir)
    for sub in (os.path.join(path, "samples"), path):
        if os.path.exists(sub) and not os.path.isdir(sub):
            raise ValueError(f"--outdir {outdir}: {sub} exists and is not a directory")
    problem = directory_problem(path)
    if problem:
        raise ValueError(f"--outdir {outdir}: {problem}")


def sample_path(outdir: str, index: int) -> str:
    return os.path.join(outdir, "samples", f"{index:05d}.png")


def _fields(job: SamplingJob, prompt: str, seed: int, k: int) -> dict:
    fields = dict(prompt=prompt, negative_prompt=job.negative_prompt or "", seed=seed, index_in_batch=k,
                  batch_size=job.n_samples,  # (the noise of image k depends on the batch size)
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
    if job.fixed_code:  # (the initial noise is then the first batch's, seed job.seed)
        fields["fixed_code"] = job.seed
    return {key: str(value) for key, value in fields.items()}


def _metadata(job: SamplingJob, prompt: str, seed: int, k: int) -> PngInfo:
    info = PngInfo()
    for key, value in _fields(job, prompt, seed, k).items():
        info.add_text(key, value)
    return info


def _read_image(flag: str, path: str, read):
    """``read(path)`` with the errors naming the flag and the file (not an image, wrong size, ...)."""
    try:
        return read(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path}: {e}") from None


def _write_png(path: str, image_hwc: np.ndarray, info: Optional[PngInfo] = None) -> None:
    tmp = path + ".partial"
    try:
        Image.fromarray(to_uint8(image_hwc)).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:  # (disk full, interrupted): no half-written file stays behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _same(recorded: str, expected: str) -> bool:
    if recorded == expected:
        return True
    try:  # numbers written by another caller (7 vs 7.0)
        return float(recorded) == float(expected)
    except ValueError:
        return False


def _check_existing(path: str, job: SamplingJob, prompt: str, seed: int, k: int) -> None:
    """An existing sample must be this job's: a rerun skips it, so another job's file (other prompt, seed,
    sampler, ... in the same outdir) would silently stand in for this job's image."""
    try:
        with Image.open(path) as im:
            recorded, size = dict(getattr(im, "text", {}) or {}), im.size[::-1]
    except OSError as e:
        raise ValueError(f"--outdir: {path} exists but is not a readable PNG ({e}); remove it or use another "
                         "--outdir") from None
    want = {key: info_value for key, info_value in _fields(job, prompt, seed, k).items()}
    for key, value in want.items():
        if key == "checkpoint":
            same = os.path.realpath(recorded.get(key, "")) == os.path.realpath(value) or recorded.get(key) == value
        elif key == "batch_size" and key not in recorded:  # (files written before it was recorded)
            same = True
        else:
            same = key in recorded and _same(recorded[key], value)
        if not same:
            got = recorded.get(key, "<missing>")
            raise ValueError(f"--outdir: {path} was written by another job ({key} {got[:60]!r}, this job "
                             f"{value[:60]!r}); a rerun only completes the same job: use another --outdir")
    for key in sorted(set(recorded) - set(want)):  # an option (init_image, fixed_code, ...) this job has not
        raise ValueError(f"--outdir: {path} was written by another job ({key} {recorded[key][:60]!r}, this "
                         "job none); a rerun only completes the same job: use another --outdir")
    for name, want_size, got_size in (("--H", job.height, size[0]), ("--W", job.width, size[1])):
        if want_size is not None and want_size != got_size:
            raise ValueError(f"--outdir: {path} was written by another job (image {size[0]}x{size[1]}, "
                             f"this job {name} {want_size}); use another --outdir")


def run_sampling_job(pipe, job: SamplingJob, outdir: str, progress: bool = True) -> List[str]:
    """Render every batch of ``job`` not already on disk; returns all sample paths of the job ([] with
    ``skip_save``, which renders every batch and writes only the grid, or nothing with ``skip_grid``
    too: CompVis' speed-measurement mode).

    The images equal ``pipe([prompt] * n_samples, seed=seed + b, ...)`` of the same arguments (the
    init image and mask are read as the API reads the paths). Bad inputs fail before anything is
    written: no folder, no file, no progress bar."""
    from tqdm import tqdm

    job.validate()
    check_outdir(outdir)
    factor = getattr(pipe, "vae_scale_factor", 1)
    for name, size in (("--H", job.height), ("--W", job.width)):
        if size is not None and size % factor:
            raise ValueError(f"{name}={size} is not a multiple of the autoencoder factor {factor}; "
                             f"height and width must be multiples of the autoencoder factor {factor}")
    init = mask = None
    if job.init_image:
        init = _read_image("--init-img", job.init_image, lambda x: prepare_image(x, 1, job.height, job.width))
        if init.shape[1] % factor or init.shape[2] % factor:  # (the API names neither the flag nor the file)
            raise ValueError(f"--init-img {job.init_image} is {init.shape[1]}x{init.shape[2]} (height x width), not "
                             f"multiples of the autoencoder factor {factor}; crop or resize it")
    if job.mask:  # read here so that a bad file fails before the first batch, naming it
        mask = _read_image("--mask", job.mask, lambda x: prepare_mask(x, 1, init.shape[1], init.shape[2]))
    if job.init_image and int(job.steps * job.strength) < 1:
        # diffusers' get_timesteps (and Pipeline) run int(steps * strength) of the steps: none here.
        raise ValueError(f"--strength {job.strength} with --steps {job.steps} leaves no denoising steps "
                         f"(int(steps * strength) = 0 are run); raise --strength or --steps")
    p, num_p = jax.process_index(), jax.process_count()
    if job.skip_save and num_p > 1:
        raise ValueError("--skip_save keeps the images in memory for the grid: it needs a single process "
                         f"(this job runs on {num_p})")
    mine = [b for b in range(job.num_batches) if b % num_p == p]
    # (--skip_save: nothing on disk to resume from)
    todo = list(mine) if job.skip_save else [b for b in mine if not _batch_on_disk(outdir, job, b)]
    start_code = _start_code(pipe, job) if job.fixed_code else None
    kept = []  # (--skip_save) the images, for the grid
    # The bar starts after the first batch: an error in it (bad input refused by the pipeline) is then
    # the only output, one line.
    bar, t0, made = None, time.perf_counter(), 0
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
                eta=job.eta, init_image=init, strength=job.strength, mask=mask, latents=start_code, **cond)
            if job.skip_save:
                kept.extend(images if not job.skip_grid else ())
            else:
                _make_dir(os.path.join(outdir, "samples"), outdir)
                for k, image in enumerate(images):
                    _write_png(sample_path(outdir, b * job.n_samples + k), image, _metadata(job, prompt, seed, k))
            made += len(images)
            if bar is None:
                bar = tqdm(total=len(todo) * job.n_samples, unit="img", disable=not progress or p != 0,
                           desc=f"sampling ({len(mine) - len(todo)} batches already done)")
            bar.update(len(images))
            bar.set_postfix(img_per_s=f"{made / (time.perf_counter() - t0):.2f}")
    finally:  # an interrupted job still leaves a clean terminal line
        if bar is not None:
            bar.close()
    paths = [sample_path(outdir, n) for n in range(job.num_batches * job.n_samples)]
    cols = job.n_rows or job.n_samples  # (CompVis' n_rows is torchvision make_grid's nrow: images per row)
    if job.skip_save:
        if not job.skip_grid:
            _make_dir(outdir, outdir)
            _write_png(os.path.join(outdir, "grid.png"), make_grid(np.stack(kept), cols=cols))
        return []
    if p == 0 and not job.skip_grid and all(os.path.isfile(x) for x in paths):
        grid = make_grid(np.stack([np.asarray(Image.open(x).convert("RGB"), np.float32) / 255 for x in paths]),
                         cols=cols)
        _write_png(os.path.join(outdir, "grid.png"), grid)
    return paths


def _batch_on_disk(outdir: str, job: SamplingJob, b: int) -> bool:
    """Whether every image of batch ``b`` is in ``outdir`` (each checked to be this job's)."""
    prompt, seed, done = job.prompts[b // job.n_iter], job.seed + b, True
    for k in range(job.n_samples):
        path = sample_path(outdir, b * job.n_samples + k)
        if os.path.isfile(path):
            _check_existing(path, job, prompt, seed, k)
        else:
            done = False
    return done


def _make_dir(path: str, outdir: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--outdir {outdir}: cannot create {path}: {e.strerror or e}") from None


def _start_code(pipe, job: SamplingJob) -> np.ndarray:
    """--fixed_code: the initial noise of the job's first batch (seed ``job.seed``), for every batch, as
    CompVis txt2img.py draws its start_code once. The same draw as ``pipe(..., seed=job.seed)`` makes."""
    from ldm_jax.pipeline import initial_noise

    f = pipe.vae_scale_factor
    height, width = job.height or pipe.default_size, job.width or pipe.default_size
    shape = (job.n_samples, height // f, width // f, pipe.latent_channels)
    return np.asarray(initial_noise(job.seed, shape))


def check_model_flags(pipe, args) -> None:
    """sample.py flags (``args``) the loaded model cannot use, named as flags (the API would name its
    own arguments)."""
    if args.class_label is not None and getattr(pipe.unet, "config", None) is not None \
            and pipe.unet.config.num_class_embeds is None and not hasattr(pipe.tokenizer, "unconditional_class"):
        raise ValueError(f"--class_label: {args.checkpoint} is not a class-conditional model")
    k, c = getattr(pipe, "concat_channels", 0), getattr(pipe, "latent_channels", 0)
    if k and k == c + 1 and not (args.cond_img or args.segmentation) and not (args.init_img and args.mask):
        # a 9-channel (diffusers) or LDM inpainting U-Net: the masked image is part of its input
        raise ValueError(f"{args.checkpoint} is an inpainting model: give --init-img and --mask")
