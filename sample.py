"""Sample images from a latent diffusion model (text-to-image, img2img, inpainting).

    python sample.py --checkpoint PATH --prompt "a red apple" [--steps 50 --sampler ddim --seed 0
                     --scale 7.5 --n_samples 4 --n_iter 1 --H 512 --W 512 --outdir outputs]
    python sample.py --checkpoint PATH --from-file prompts.txt          # one prompt per line
    python sample.py --checkpoint PATH --prompt "..." --init-img in.png --strength 0.7
    python sample.py --checkpoint PATH --prompt "..." --init-img in.png --mask mask.png
    python sample.py --checkpoint PATH --class_label 207                 # class-conditional models
    python sample.py --checkpoint PATH                                   # unconditional models: no prompt
    python sample.py --checkpoint bsr_sr.ckpt --config bsr_sr.yaml --cond-img low_res.png   # concat-conditioned
    python sample.py --checkpoint x4-upscaler-ema.ckpt --config x4-upscaling.yaml --prompt "..." \
                     --cond-img low_res.png --noise-level 20                                # SD 2 x4 upscaler
    python sample.py --checkpoint semantic_synthesis256.ckpt --config config.yaml \
                     --segmentation labels.png          # semantic synthesis (SpatialRescaler cond stage)
    python sample.py --checkpoint txt2img-f8-large.ckpt --config txt2img-1p4B-eval.yaml \
                     --tokenizer bert-base-uncased/vocab.txt --prompt "..."   # LDM text-to-image (BERT)
    python sample.py --checkpoint layout2img.ckpt --config config.yaml --layout layouts.json   # layout-to-image
    python sample.py --checkpoint runs/layout --layout layouts.json                # a layout training workdir

A layout file (--layout) holds one layout, a list of objects with boxes relative to the image
(x0, y0 = top-left corner, w, h; all in [0, 1]; a box in pixels is [x/W, y/H, w/W, h/H]):
    [{"category": 3, "bbox": [0.1, 0.2, 0.5, 0.4]}, {"category": 0, "bbox": [0.55, 0.05, 0.4, 0.3]}]
or several (a list of such lists), each sampled like one prompt (--n_samples images, --n_iter
batches). "category" is the model's category number; "is_group_of": true (a crowd) only where the
model's number of classes is known (a workdir). The ids are built as the model's data built them
(taming's ObjectsBoundingBoxConditionalBuilder: a workdir's data.layout; a released file's
vocabulary and length), over the whole image; no guidance (these models have no unconditional input).

PATH: a diffusers folder, a CompVis/Stability .ckpt/.safetensors file, or a
train.py workdir. Writes outdir/samples/NNNNN.png (generation settings in the
PNG text chunks) and outdir/grid.png; rerunning the same command skips images already written (a
folder holding another job's images is an error). Batch b of the job (prompt b // n_iter) uses seed
--seed + b: its images equal the API's pipe([prompt] * n_samples, seed=seed + b, ...) with the same
flags. Bad flags or files are one "error: ..." line (exit code 2), before anything is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from ldm_jax.one_line_errors import OneLineErrorParser


def parse_args(argv=None):
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", "--ckpt", required=True, help="model folder or file")
    p.add_argument("--config", default=None, help="original YAML config for single-file checkpoints")
    p.add_argument("--tokenizer", default=None,
                   help="the BERT vocabulary (folder or vocab.txt) of an original LDM text-to-image checkpoint "
                        "(BERTEmbedder cond stage: the .ckpt holds no vocabulary)")
    p.add_argument("--prompt", default=None, help="the prompt to render")
    p.add_argument("--from-file", "--from_file", dest="from_file", default=None,
                   help="a UTF-8 file with one prompt per line (instead of --prompt); blank lines are skipped and "
                        "whitespace around a line is stripped; each prompt gets --n_iter batches of --n_samples")
    p.add_argument("--negative_prompt", "--negative-prompt", default=None,
                   help="the unconditional prompt of classifier-free guidance, for every prompt (used when "
                        "--scale > 1)")
    p.add_argument("--n_samples", type=int, default=4, help="images per prompt and iteration (one batch)")
    p.add_argument("--n_iter", type=int, default=1,
                   help="batches per prompt; batch b of the job (prompt b // n_iter) uses seed --seed + b")
    p.add_argument("--steps", "--ddim_steps", type=int, default=50, help="sampler steps")
    p.add_argument("--scale", type=float, default=None,
                   help="classifier-free guidance scale (default 7.5; 1, i.e. none, with --layout)")
    p.add_argument("--sampler", default=None, help="ddpm, ddim (default), plms, dpmpp_2m, euler or euler_a")
    p.add_argument("--plms", action="store_true", help="the CompVis scripts' flag: --sampler plms")
    p.add_argument("--fixed_code", "--fixed-code", action="store_true",
                   help="the CompVis txt2img flag: every batch starts from the same initial noise (the first "
                        "batch's, seed --seed); text-to-image only")
    p.add_argument("--skip_grid", "--skip-grid", action="store_true", help="do not write grid.png")
    p.add_argument("--skip_save", "--skip-save", action="store_true",
                   help="write only grid.png, not the single images (a rerun then renders everything again); with "
                        "--skip_grid nothing is written (CompVis: for speed measurements)")
    p.add_argument("--n_rows", "--n-rows", type=int, default=0,
                   help="images per row of grid.png (default 0: --n_samples, one batch per row)")
    p.add_argument("--eta", "--ddim_eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the first batch; batch b uses seed + b, so its images equal the Python API's "
                        "pipe([prompt] * n_samples, seed=seed + b, ...)")
    p.add_argument("--compilation-cache", "--compilation_cache", dest="compilation_cache", default=None,
                   help="JAX persistent compilation cache: a directory, 'default' or 'off' "
                        "(unset: on only if $LDM_JAX_COMPILATION_CACHE names a directory)")
    p.add_argument("--H", type=int, default=None, help="image height (default: the model's)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the model's)")
    p.add_argument("--outdir", default="outputs/samples",
                   help="output folder: samples/NNNNN.png (settings in the PNG text chunks) and grid.png (one row "
                        "per batch); a rerun of the same command skips the images already written, another "
                        "job's images there are an error")
    p.add_argument("--init-img", "--init_img", dest="init_img", default=None,
                   help="img2img / inpainting source image (any format PIL reads; converted to RGB, alpha "
                        "dropped; not resized: its size must match --H/--W when given, multiples of the "
                        "autoencoder factor)")
    p.add_argument("--strength", type=float, default=None,
                   help="img2img / inpainting strength in [0, 1] (default 0.8): int(steps * strength) steps are "
                        "run; only with --init-img")
    p.add_argument("--mask", default=None,
                   help="inpainting mask image, the size of --init-img (converted to grayscale, white = repaint, "
                        "binarised at 0.5)")
    p.add_argument("--class_label", type=int, default=None, help="class index for class-conditional models")
    p.add_argument("--cond-img", dest="cond_img", default=None,
                   help="conditioning image of a concat-conditioned model (super-resolution: the low-res image, "
                        "the output is the autoencoder factor larger); Pipeline's cond_image=")
    p.add_argument("--segmentation", default=None,
                   help="semantic synthesis models (SpatialRescaler cond stage): the label map at the output size, "
                        "a single-channel PNG of class indices (0 .. in_channels - 1) or a .npy of class indices "
                        "(H, W) or of a one-hot / probability map (H, W, in_channels); Pipeline's segmentation=")
    p.add_argument("--noise-level", "--noise_level", dest="noise_level", type=int, default=None,
                   help="noise-augmented upscalers (SD 2 x4 upscaler): the level the --cond-img low-res image is "
                        "noised to and the U-Net is told, an int below the model's max_noise_level (350 for the "
                        "released x4 upscaler); default 20 as diffusers; Pipeline's noise_level=")
    p.add_argument("--layout", default=None,
                   help="layout-to-image models: a JSON file of object layouts (one: a list of {\"category\": int, "
                        "\"bbox\": [x0, y0, w, h]} with the box relative to the image, in [0, 1]; several: a list of "
                        "such lists), used instead of --prompt; see above")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype (default float32; parameters stay float32)")
    p.add_argument("--precision", default=None, choices=["full", "autocast"],
                   help="the CompVis scripts' flag: full = --dtype float32, autocast = --dtype bfloat16")
    args = p.parse_args(argv)
    by_precision = {"full": "float32", "autocast": "bfloat16", None: None}[args.precision]
    if args.dtype and by_precision and args.dtype != by_precision:
        p.error(f"--precision {args.precision} and --dtype {args.dtype} disagree; give one")
    args.dtype = args.dtype or by_precision or "float32"
    if args.plms and args.sampler not in (None, "plms"):
        p.error(f"--plms and --sampler {args.sampler} disagree; give one")
    args.sampler = "plms" if args.plms else (args.sampler or "ddim")
    return args


class _WithInputs:
    """The pipeline with fixed keywords (``cond_image=``, ``segmentation=``, ``noise_level=``) added to every call (the
    sampling job passes the rest)."""

    def __init__(self, pipe, **inputs):
        self._pipe, self._inputs = pipe, inputs

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        return self._pipe(*args, **self._inputs, **kwargs)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ldm_jax.convert.errors import CheckpointError
    from ldm_jax.sampling_job import SamplingJob, read_prompt_file

    try:
        layouts = None
        if args.layout:  # (the file's structure is checked before the slow model load)
            if args.from_file or args.prompt is not None or args.class_label is not None:
                raise ValueError("--layout is the condition of a layout-to-image model; it does not go with "
                                 "--prompt, --from-file or --class_label")
            from ldm_jax.data.layout_file import describe_layout, read_layout_file

            layouts = read_layout_file(args.layout)
            prompts = [describe_layout(layout) for layout in layouts]  # (recorded in the PNGs as "layout")
        elif args.from_file:
            if args.prompt is not None:  # (one would be silently ignored)
                raise ValueError("give --prompt or --from-file, not both")
            prompts = read_prompt_file(args.from_file)
        elif args.prompt is not None:
            prompts = [args.prompt]
        else:  # class-conditional, concat-conditioned or unconditional models (checked once loaded)
            prompts = [""]
        if args.cond_img and not os.path.isfile(args.cond_img):
            raise FileNotFoundError(f"--cond-img file not found: {args.cond_img}")
        if args.segmentation and not os.path.isfile(args.segmentation):
            raise FileNotFoundError(f"--segmentation file not found: {args.segmentation}")
        if args.strength is not None and not args.init_img:  # (it would be silently ignored)
            raise ValueError("--strength is the img2img / inpainting strength: it needs --init-img")
        if args.fixed_code and (args.cond_img or args.segmentation):  # (their size comes from that input)
            raise ValueError("--fixed_code is for text-to-image, class-conditional and unconditional sampling; "
                             "not with --cond-img / --segmentation")
        scale = args.scale if args.scale is not None else (1.0 if layouts is not None else 7.5)
        job = SamplingJob(
            prompts=prompts, n_samples=args.n_samples, n_iter=args.n_iter, steps=args.steps, scale=scale,
            sampler=args.sampler, eta=args.eta, seed=args.seed, height=args.H, width=args.W,
            negative_prompt=args.negative_prompt, init_image=args.init_img,
            strength=0.8 if args.strength is None else args.strength,
            mask=args.mask, class_label=args.class_label, checkpoint=args.checkpoint, fixed_code=args.fixed_code,
            skip_save=args.skip_save, skip_grid=args.skip_grid, n_rows=args.n_rows)
        job.validate()  # fail on bad flags before the (slow) model load
        import ldm_jax
        from ldm_jax.compile_cache import configure_compilation_cache
        from ldm_jax.sampling_job import check_model_flags, check_outdir, run_sampling_job

        check_outdir(args.outdir)

        configure_compilation_cache(args.compilation_cache)
        load_kw = {"tokenizer": args.tokenizer} if args.tokenizer else {}
        pipe = ldm_jax.load_pipeline(args.checkpoint, config=args.config, dtype=args.dtype, **load_kw)
        builder = getattr(pipe, "layout_builder", None)
        if layouts is not None:
            if builder is None:
                raise ValueError(f"--layout is for layout-to-image models (an LDMBert over layout token ids: CompVis "
                                 "layout2img-openimages256, or a diffusion.conditioning='layout' workdir); "
                                 f"{args.checkpoint} is not one")
            from ldm_jax.data.layout_file import layout_file_ids

            job = dataclasses.replace(job, context_ids=layout_file_ids(layouts, builder, args.layout))
        elif builder is not None:
            raise ValueError(f"{args.checkpoint} is a layout-to-image model: it takes object layouts, not text or "
                             "class labels; give --layout FILE.json (a list of {\"category\": int, \"bbox\": "
                             "[x0, y0, w, h]} objects, boxes relative to the image)")
        no_prompt = not args.from_file and args.prompt is None and args.class_label is None and layouts is None
        if no_prompt and pipe.text_encoder is not None:
            raise ValueError("this model is text- or class-conditioned: give --prompt, --from-file or --class_label")
        check_model_flags(pipe, args)
        inputs = {}
        if args.cond_img:
            inputs["cond_image"] = args.cond_img
        if args.segmentation:
            inputs["segmentation"] = args.segmentation
        if args.noise_level is not None:
            if not getattr(pipe, "is_upscaler", False):
                raise ValueError("--noise-level is for noise-augmented upscalers (the SD 2 x4 upscaler); "
                                 "this model is not one")
            inputs["noise_level"] = args.noise_level
        if inputs:
            pipe = _WithInputs(pipe, **inputs)
        from ldm_jax.sampling_job import sample_path

        total = job.num_batches * job.n_samples
        existing = 0 if args.skip_save else sum(os.path.isfile(sample_path(args.outdir, n)) for n in range(total))
        run_sampling_job(pipe, job, args.outdir)
    except (ValueError, OSError, CheckpointError) as e:  # (OSError: unreadable files, full disk, ...)
        print("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the images written so far are complete: rerun the same command to finish the "
              "job", file=sys.stderr)
        return 130
    earlier = f" ({existing} more from an earlier run of this job)" if existing else ""
    grid = os.path.join(args.outdir, "grid.png")
    if args.skip_save:
        print(f"rendered {total} images; wrote " + ("nothing (--skip_save --skip_grid)" if args.skip_grid else
                                                    f"their grid {grid} (--skip_save: not the single images)"))
    else:
        print(f"wrote {total - existing} images{earlier} to {os.path.join(args.outdir, 'samples')}"
              + ("" if args.skip_grid else f" and the grid {grid}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
