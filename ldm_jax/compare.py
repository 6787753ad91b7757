"""Compare this project with diffusers (PyTorch) on the same weights, prompts and noise.

    python -m ldm_jax.compare --checkpoint PATH [--prompt "..." (repeatable) --negative_prompt "..."
                              --steps 20 --sampler ddim --scale 7.5 --seed 0 --H 512 --W 512
                              --repeats 1 --outdir compare]

PATH is a diffusers folder (or anything ``load_pipeline`` reads; non-diffusers
checkpoints are first exported with ``save_diffusers`` so both sides read the
same weights). Both pipelines start from the same standard-normal latents and,
for stochastic samplers, get the same per-step noise. Prints per-image max/mean
absolute error, the per-step error of the latents, and images/s of both (the
JAX side timed after its compilation, which is reported separately); writes
``side_by_side.png`` (top row diffusers, bottom row ldm_jax).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List

import numpy as np

from ldm_jax.one_line_errors import OneLineErrorParser

# diffusers scheduler class for each sampler name of this project
DIFFUSERS_SCHEDULERS = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "plms": "PNDMScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
}
_RANDN_MODULES = ("diffusers.schedulers.scheduling_ddpm", "diffusers.schedulers.scheduling_ddim",
                  "diffusers.schedulers.scheduling_euler_ancestral_discrete")


class _NoiseFeed:
    """Stands in for diffusers' randn_tensor inside the schedulers: hands out this
    project's per-step noise, in order, so stochastic samplers are comparable."""

    def __init__(self, arrays):
        self.arrays, self.i = list(arrays), 0

    def __call__(self, shape, generator=None, device=None, dtype=None, **_):
        import torch

        arr = self.arrays[min(self.i, len(self.arrays) - 1)]
        self.i += 1
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))).to(dtype or torch.float32)


def check_arguments(prompts: List[str], *, steps: int, sampler: str, scale: float, repeats: int) -> None:
    """Refuse bad settings before the (slow) loading of both pipelines; each message names its flag."""
    if sampler not in DIFFUSERS_SCHEDULERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(DIFFUSERS_SCHEDULERS)}")
    if not prompts:
        raise ValueError("--prompt: give at least one prompt")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1 (the timed runs after the compiling one), got {repeats}")
    if not np.isfinite(scale):
        raise ValueError(f"--scale must be a finite number, got {scale}")


def compare(checkpoint: str, prompts: List[str], *, steps: int = 20, sampler: str = "ddim", scale: float = 7.5,
            seed: int = 0, height=None, width=None, negative_prompt=None, outdir: str = "compare",
            repeats: int = 1) -> Dict[str, object]:
    import importlib

    import diffusers
    import jax
    import torch

    import ldm_jax
    from ldm_jax.diffusion import samplers
    from ldm_jax.image_io import make_grid, to_uint8

    check_arguments(prompts, steps=steps, sampler=sampler, scale=scale, repeats=repeats)
    ours = ldm_jax.load_pipeline(checkpoint)
    folder = checkpoint
    tmp = None
    if not (os.path.isdir(checkpoint) and os.path.isfile(os.path.join(checkpoint, "model_index.json"))):
        from ldm_jax.convert.export import save_diffusers

        tmp = tempfile.TemporaryDirectory()
        folder = tmp.name
        save_diffusers(ours, folder)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                           requires_safety_checker=False)
    if sampler != "plms":
        ref.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[sampler]).from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)

    height = height or ours.default_size
    width = width or ours.default_size
    f = ours.vae_scale_factor
    shape = (len(prompts), height // f, width // f, ours.latent_channels)
    latents = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    step_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)  # the pipeline's per-step noise stream
    feed = [np.asarray(samplers.step_noise(step_rng, i, shape)) for i in range(steps + 2)]
    negatives = None if negative_prompt is None else [negative_prompt] * len(prompts)

    ref_steps: List[np.ndarray] = []

    def record(pipe, i, t, kw):
        ref_steps.append(kw["latents"].detach().numpy().transpose(0, 2, 3, 1).copy())
        return {}

    originals = {m: importlib.import_module(m).randn_tensor for m in _RANDN_MODULES}
    try:
        for m in _RANDN_MODULES:
            importlib.import_module(m).randn_tensor = _NoiseFeed(feed)
        t0 = time.perf_counter()
        with torch.no_grad():
            ref_images = ref(prompts, negative_prompt=negatives, num_inference_steps=steps, guidance_scale=scale,
                             height=height, width=width, output_type="np",
                             latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
                             callback_on_step_end=record).images
        torch_s = time.perf_counter() - t0
    finally:
        for m, fn in originals.items():
            importlib.import_module(m).randn_tensor = fn

    call = dict(negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=scale, height=height,
                width=width, seed=seed, sampler=sampler, latents=latents, return_intermediates=True)
    t0 = time.perf_counter()
    images, our_steps = ours(prompts, **call)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        ours(prompts, **call)
    jax_s = (time.perf_counter() - t0) / repeats

    per_image = [(float(np.abs(a - b).max()), float(np.abs(a - b).mean())) for a, b in zip(images, ref_images)]
    n = min(len(ref_steps), len(our_steps))
    per_step = [float(np.abs(our_steps[-n + i] - ref_steps[-n + i]).max()) for i in range(n)]
    os.makedirs(outdir, exist_ok=True)
    grid = make_grid(np.concatenate([ref_images, images]), cols=len(prompts))
    from PIL import Image

    side_path = os.path.join(outdir, "side_by_side.png")
    Image.fromarray(to_uint8(grid)).save(side_path)
    if tmp is not None:
        tmp.cleanup()
    return dict(per_image=per_image, per_step=per_step, torch_images_per_s=len(prompts) / torch_s,
                jax_images_per_s=len(prompts) / jax_s, jax_first_call_s=first_s, side_by_side=side_path,
                max_error=max(e for e, _ in per_image))


def main(argv=None) -> int:
    p = OneLineErrorParser(prog="python -m ldm_jax.compare", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompt", action="append", default=None, help="repeatable; default: two sample prompts")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--H", type=int, default=None)
    p.add_argument("--W", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1, help="timed JAX runs after the compiling one")
    p.add_argument("--outdir", default="compare")
    args = p.parse_args(argv)
    prompts = args.prompt or ["a red apple", "a blue car"]
    try:
        r = compare(args.checkpoint, prompts, steps=args.steps, sampler=args.sampler, scale=args.scale,
                    seed=args.seed, height=args.H, width=args.W, negative_prompt=args.negative_prompt,
                    outdir=args.outdir, repeats=args.repeats)
    except (ValueError, OSError) as e:  # (CheckpointError is a ValueError; OSError: unreadable files, full disk)
        print("error: " + "; ".join(str(e).splitlines()), file=sys.stderr)
        return 2
    print(f"{'image':>5} {'max abs err':>12} {'mean abs err':>13}  prompt")
    for i, ((mx, mean), prompt) in enumerate(zip(r["per_image"], prompts)):
        print(f"{i:>5} {mx:>12.2e} {mean:>13.2e}  {prompt}")
    print("per-step max abs error of the latents: " + " ".join(f"{e:.1e}" for e in r["per_step"]))
    print(f"diffusers (PyTorch): {r['torch_images_per_s']:.3f} images/s | ldm_jax: {r['jax_images_per_s']:.3f} "
          f"images/s (first call incl. compile {r['jax_first_call_s']:.1f} s)")
    print(f"side-by-side image (top: diffusers, bottom: ldm_jax): {r['side_by_side']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
