"""One benchmark measurement per process:

    python bench/cases.py CASE SIDE --preset cpu --folder DIR [--batch B] [--conv matmul] [--attention xla]

CASE: unet_fwd | train_step | txt2img | vae_decode | first_image.
SIDE: "torch" (diffusers PyTorch eager) or "jax" (this project).
Prints one line ``RESULT {json}``. ``bench/run.py`` runs these in fresh
subprocesses, so memory peaks, thread pools and compilation caches of one
measurement never leak into another.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

T_START = time.time()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from bench.presets import PRESETS  # noqa: E402
from bench.timing import current_rss_mb, summary_ms  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"


# ------------------------------------------------------------------ memory
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ------------------------------------------------------------------ torch side
def torch_env(preset):
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    sync = torch.cuda.synchronize if dev == "cuda" else None
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[preset.dtype]
    return torch, dev, sync, dtype


def torch_inputs(torch, dev, dtype, preset, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, preset.latent, preset.latent, generator=g).to(dev, dtype)
    t = (torch.arange(b) * 37 + 11).to(dev)
    c = torch.randn(b, preset.context_len, preset.context_dim, generator=g).to(dev, dtype)
    n = torch.randn(b, 4, preset.latent, preset.latent, generator=g).to(dev)
    return x, t, c, n


def torch_unet_fwd(preset, folder, b, **_):
    torch, dev, sync, dtype = torch_env(preset)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), torch_dtype=dtype).to(dev).eval()
    x, t, c, _ = torch_inputs(torch, dev, dtype, preset, b)
    with torch.inference_mode():
        s = summary_ms(lambda: unet(x, t, c).sample, preset.reps, warmup=2, sync=sync)
    return {"ms": s}


def torch_train_step(preset, folder, b, **_):
    torch, dev, sync, dtype = torch_env(preset)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).to(dev).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=0.01, fused=(dev == "cuda"))
    x, t, c, n = torch_inputs(torch, dev, torch.float32, preset, b)
    autocast = dev == "cuda" and dtype != torch.float32

    def step():
        with torch.autocast(dev, dtype=dtype, enabled=autocast):
            out = unet(x, t, c).sample
        loss = torch.nn.functional.mse_loss(out.float(), n)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    s = summary_ms(step, preset.train_reps, warmup=1, sync=sync)
    res = {"ms": s, "img_per_s": round(b / (s["median"] / 1e3), 3)}
    if dev == "cuda":
        res["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        res["peak_rss_mb"] = peak_rss_mb()
    return res


def torch_pipeline(preset, folder):
    torch, dev, sync, dtype = torch_env(preset)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev), sync


def torch_txt2img(preset, folder, **_):
    pipe, sync = torch_pipeline(preset, folder)
    size = preset.image_size

    def run():
        return pipe(PROMPT, num_inference_steps=preset.txt2img_steps, guidance_scale=7.5, height=size,
                    width=size, output_type="np").images

    s = summary_ms(run, preset.txt2img_reps, warmup=1, sync=sync)
    return {"ms": s, "image": [size, size]}


def torch_vae_decode(preset, folder, **_):
    torch, dev, sync, dtype = torch_env(preset)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), torch_dtype=dtype).to(dev).eval()
    z = torch.randn(preset.vae_batch, 4, preset.latent, preset.latent, generator=torch.Generator().manual_seed(0))
    z = z.to(dev, dtype)
    with torch.inference_mode():
        s = summary_ms(lambda: vae.decode(z).sample, preset.reps, warmup=1, sync=sync)
    return {"ms": s}


def torch_first_image(preset, folder, **_):
    t_import = time.time()
    pipe, sync = torch_pipeline(preset, folder)
    t_loaded = time.time()
    size = preset.image_size
    pipe(PROMPT, num_inference_steps=preset.txt2img_steps, height=size, width=size, output_type="np")
    if sync:
        sync()
    t_first = time.time()
    pipe(PROMPT, num_inference_steps=preset.txt2img_steps, height=size, width=size, output_type="np")
    if sync:
        sync()
    t_second = time.time()
    return {"t_first_abs": t_first, "import_s": round(t_import - T_START, 2),
            "load_s": round(t_loaded - t_import, 2), "first_call_s": round(t_first - t_loaded, 2),
            "second_call_s": round(t_second - t_first, 2)}


# ------------------------------------------------------------------ jax side
class JaxVariant:
    """Which fast paths the JAX side uses: ``UNetConfig.conv_impl`` / ``AutoencoderConfig.conv_impl``
    and the modules' ``attention_impl`` (models are loaded with the defaults, then cloned)."""

    def __init__(self, conv="auto", attention="dot_product"):
        self.conv, self.attention = conv, attention

    def routing(self):
        """Kept for callers that trace inside it; the variant lives in the module configs now."""
        return contextlib.nullcontext()

    def apply(self, module):
        """The module with this variant's attention impl and (if it has convolutions) conv impl."""
        kw = {"attention_impl": self.attention}
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "conv_impl"):
            kw["config"] = dataclasses.replace(cfg, conv_impl=self.conv)
        return module.clone(**kw)


def jax_inputs(preset, b, seed=0):
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    dt = jnp.dtype(preset.dtype)
    x = jnp.asarray(rng.standard_normal((b, preset.latent, preset.latent, 4)), dt)
    t = jnp.asarray(np.arange(b) * 37 + 11, jnp.int32)
    c = jnp.asarray(rng.standard_normal((b, preset.context_len, preset.context_dim)), dt)
    n = jnp.asarray(rng.standard_normal((b, preset.latent, preset.latent, 4)), jnp.float32)
    return x, t, c, n


def _jax_memory():
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices may not implement it
        stats = {}
    return stats


def fused_attention_calls(lowered, compiled) -> dict:
    """On a GPU, how many cuDNN fused-attention calls the traced program holds and how many the
    compiled one kept (proof that the fast path is the one measured; 0 means XLA attention)."""
    import jax

    if jax.default_backend() != "gpu":
        return {}
    res = {}
    for key, program in (("cudnn_fmha_traced", lowered), ("cudnn_fmha_compiled", compiled)):
        try:
            res[key] = program.as_text().count("__cudnn$fmha")
        except Exception:  # noqa: BLE001
            pass
    return res


def jax_unet_fwd(preset, folder, b, variant, **_):
    import jax
    import jax.numpy as jnp

    from ldm_jax.convert.unet_diffusers import load_unet

    unet, params = load_unet(os.path.join(folder, "unet"), dtype=preset.dtype, param_dtype=preset.dtype)
    unet = variant.apply(unet)
    params = jax.device_put(params)  # one batched transfer; a per-leaf jnp.asarray dispatches an op per leaf
    x, t, c, _ = jax_inputs(preset, b)
    with variant.routing():
        fn = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
        t0 = time.time()
        lowered = fn.lower(params, x, t, c)
        compiled = lowered.compile()
        compile_s = time.time() - t0
    s = summary_ms(lambda: compiled(params, x, t, c).block_until_ready(), preset.reps, warmup=2)
    res = {"ms": s, "compile_s": round(compile_s, 2), **fused_attention_calls(lowered, compiled)}
    if jax.default_backend() == "cpu":  # on GPU the count misses cuDNN's convolutions and attention
        try:
            res["gflop"] = round(compiled.cost_analysis()["flops"] / 1e9, 2)
        except Exception:  # noqa: BLE001
            pass
    return res


def jax_train_step(preset, folder, b, variant, remat=False, **_):
    import functools

    import jax
    import jax.numpy as jnp
    import optax

    from ldm_jax.convert.unet_diffusers import load_unet

    unet, params = load_unet(os.path.join(folder, "unet"), dtype=preset.dtype, param_dtype="float32")
    unet = variant.apply(unet)
    if remat:
        unet = unet.clone(config=dataclasses.replace(unet.config, remat_blocks=True))
    params = jax.device_put(params)  # one batched transfer; a per-leaf jnp.asarray dispatches an op per leaf
    tx = optax.adamw(1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
    opt_state = jax.jit(tx.init)(params)
    x, t, c, n = jax_inputs(preset, b)

    def loss_fn(p):
        out = unet.apply({"params": p}, x, t, c, train=True)
        return jnp.mean(jnp.square(out.astype(jnp.float32) - n))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    with variant.routing():
        t0 = time.time()
        lowered = step.lower(params, opt_state)
        compiled = lowered.compile()
        compile_s = time.time() - t0
    state = [params, opt_state]

    def run():
        p, o, loss = compiled(*state)
        state[0], state[1] = p, o
        loss.block_until_ready()

    run()
    reset_peak_rss()
    s = summary_ms(run, preset.train_reps, warmup=1)
    res = {"ms": s, "img_per_s": round(b / (s["median"] / 1e3), 3), "compile_s": round(compile_s, 2),
           **fused_attention_calls(lowered, compiled)}
    mem = _jax_memory()
    if "peak_bytes_in_use" in mem:
        res["peak_mem_mb"] = round(mem["peak_bytes_in_use"] / 2**20, 1)
    if jax.default_backend() == "cpu":
        res["peak_rss_mb"] = peak_rss_mb()
        try:
            res["gflop"] = round(compiled.cost_analysis()["flops"] / 1e9, 2)
        except Exception:  # noqa: BLE001
            pass
    return res


def jax_pipeline(preset, folder, variant):
    import ldm_jax

    pipe = ldm_jax.load_pipeline(folder, dtype=preset.dtype)
    pipe.unet, pipe.vae = variant.apply(pipe.unet), variant.apply(pipe.vae)
    pipe.text_encoder = variant.apply(pipe.text_encoder)  # causal attention: blocked on CPU too
    return pipe


def jax_txt2img(preset, folder, variant, **_):
    pipe = jax_pipeline(preset, folder, variant)
    size = preset.image_size

    def run(seed=0):
        return pipe(PROMPT, num_inference_steps=preset.txt2img_steps, guidance_scale=7.5, height=size, width=size,
                    sampler="ddim", seed=seed)

    with variant.routing():
        t0 = time.time()
        run()
        first_s = time.time() - t0
    s = summary_ms(run, preset.txt2img_reps, warmup=1)
    # A new seed, prompt and guidance scale must reuse the compiled program.
    before = len(pipe._jit_cache)
    misses = _count_compiles(lambda: pipe("another prompt", num_inference_steps=preset.txt2img_steps,
                                          guidance_scale=5.0, height=size, width=size, sampler="ddim", seed=7))
    return {"ms": s, "first_call_s": round(first_s, 2), "image": [size, size],
            "recompiles_on_new_seed_prompt_scale": misses, "jit_entries": [before, len(pipe._jit_cache)]}


def _count_compiles(fn) -> int:
    """How many XLA compilations ``fn()`` triggers (via jax's compile log)."""
    import logging

    import jax

    hits = []

    class Handler(logging.Handler):
        def emit(self, record):
            if "Finished XLA compilation" in record.getMessage() or "Compiling" in record.getMessage():
                hits.append(record.getMessage())

    logger = logging.getLogger("jax._src.dispatch")
    handler = Handler(level=logging.DEBUG)
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            fn()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
    return sum("Finished XLA compilation" in h for h in hits)


def jax_vae_decode(preset, folder, variant, **_):
    import jax
    import jax.numpy as jnp

    from ldm_jax.convert.vae_diffusers import load_vae

    vae, params = load_vae(os.path.join(folder, "vae"), dtype=preset.dtype, param_dtype=preset.dtype)
    vae = variant.apply(vae)
    params = jax.device_put(params)  # one batched transfer; a per-leaf jnp.asarray dispatches an op per leaf
    z = jnp.asarray(np.random.default_rng(0).standard_normal((preset.vae_batch, preset.latent, preset.latent, 4)),
                    jnp.dtype(preset.dtype))
    with variant.routing():
        compiled = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode")).lower(params, z).compile()
    s = summary_ms(lambda: compiled(params, z).block_until_ready(), preset.reps, warmup=1)
    return {"ms": s}


def jax_first_image(preset, folder, variant, cache_dir=None, **_):
    import jax

    if cache_dir:
        from ldm_jax.compile_cache import enable_compilation_cache

        enable_compilation_cache(cache_dir)
    t_import = time.time()
    pipe = jax_pipeline(preset, folder, variant)
    size = preset.image_size
    t_loaded = time.time()
    with variant.routing():
        out = pipe(PROMPT, num_inference_steps=preset.txt2img_steps, guidance_scale=7.5, height=size, width=size,
                   sampler="ddim")
    t_first = time.time()
    pipe(PROMPT, num_inference_steps=preset.txt2img_steps, guidance_scale=7.5, height=size, width=size,
         sampler="ddim")
    t_second = time.time()
    jax.effects_barrier()
    return {"t_first_abs": t_first, "import_s": round(t_import - T_START, 2), "load_s": round(t_loaded - t_import, 2),
            "first_call_s": round(t_first - t_loaded, 2), "second_call_s": round(t_second - t_first, 2),
            "compile_s": round((t_first - t_loaded) - (t_second - t_first), 2), "cache": bool(cache_dir),
            "image_mean": float(np.mean(out))}


CASES = {
    ("unet_fwd", "torch"): torch_unet_fwd, ("unet_fwd", "jax"): jax_unet_fwd,
    ("train_step", "torch"): torch_train_step, ("train_step", "jax"): jax_train_step,
    ("txt2img", "torch"): torch_txt2img, ("txt2img", "jax"): jax_txt2img,
    ("vae_decode", "torch"): torch_vae_decode, ("vae_decode", "jax"): jax_vae_decode,
    ("first_image", "torch"): torch_first_image, ("first_image", "jax"): jax_first_image,
}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("case", choices=sorted({c for c, _ in CASES}))
    ap.add_argument("side", choices=["torch", "jax"])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--folder", required=True)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--conv", default="auto", help="JAX convolution impl: auto, xla, matmul")
    ap.add_argument("--attention", default="dot_product",
                    help="JAX attention impl: dot_product (the backend's fast path), xla, blocked, cudnn, splash")
    ap.add_argument("--remat", action="store_true", help="JAX train step with remat_blocks")
    ap.add_argument("--cache-dir", default=None, help="first_image: JAX persistent compilation cache dir")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    b = args.batch or (preset.train_batch if args.case == "train_step" else preset.unet_batches[0])
    fn = CASES[(args.case, args.side)]
    kw = dict(b=b, variant=JaxVariant(args.conv, args.attention), remat=args.remat, cache_dir=args.cache_dir)
    res = fn(preset, args.folder, **kw)
    res.update(case=args.case, side=args.side, batch=b, rss_mb=current_rss_mb())
    if args.side == "jax":
        res.update(conv=args.conv, attention=args.attention, remat=args.remat)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
