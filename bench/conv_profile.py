"""Where the U-Net's convolution time goes, per op, on this machine.

    python bench/conv_profile.py [--preset cpu|gpu] [--batch 2] [--dtype float32] [--reps 5]

Collects every convolution of the benchmark U-Net (shapes, stride, padding,
how often it occurs) by tracing the model with a Flax method interceptor, then
times, for each distinct shape, in JAX: the forward, the input gradient and the
kernel gradient with ``impl="xla"`` (XLA's own gradients) and the kernel
gradient with ``impl="matmul"`` (per-tap matmuls, ``ldm_jax.models.conv``); and
in PyTorch eager the same three (``conv2d``, ``torch.nn.grad.conv2d_input`` /
``conv2d_weight``). Prints per-shape milliseconds and occurrence-weighted totals.
Also prints the convolution ops of the compiled backward (``as_text()``).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def collect_conv_shapes(unet, params, x, t, ctx):
    """{(x_shape, kernel_shape, strides, padding): count} of every nn.Conv call in ``unet``."""
    import flax.linen as nn
    import jax

    counts = collections.Counter()

    def interceptor(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, nn.Conv) and context.method_name == "__call__":
            xin = args[0]
            k = tuple(mod.kernel_size)
            s = tuple(mod.strides) if isinstance(mod.strides, (tuple, list)) else (mod.strides or 1,) * 2
            pad = mod.padding if isinstance(mod.padding, str) else tuple(tuple(p) for p in mod.padding)
            counts[(tuple(xin.shape), k + (xin.shape[-1], mod.features), s, pad)] += 1
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda p: unet.apply({"params": p}, x, t, ctx), params)
    return counts


def time_conv_shapes(counts, reps=5, dtype="float32", torch_too=True, cpu=False):
    import jax
    import jax.numpy as jnp

    from bench.timing import median_ms
    from ldm_jax.models import conv as C

    jdt = jnp.dtype(dtype)
    rows = []
    rng = np.random.default_rng(0)
    for (xs, ks, s, pad), n in sorted(counts.items(), key=lambda kv: -np.prod(kv[0][0]) * kv[0][1][-1]):
        pads = C._explicit_padding(pad, np.zeros(xs), np.zeros(ks), s)
        x = jnp.asarray(rng.standard_normal(xs), jdt)
        w = jnp.asarray(rng.standard_normal(ks) * 0.05, jdt)
        y = C._lax_conv(x, w, s, pads)
        g = jnp.asarray(rng.standard_normal(y.shape), jdt)
        fwd = jax.jit(lambda x, w: C._lax_conv(x, w, s, pads))
        dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: C._lax_conv(x, w, s, pads), x)[1](g)[0])
        dw_xla = jax.jit(lambda x, w, g: jax.vjp(lambda w: C._lax_conv(x, w, s, pads), w)[1](g)[0])
        dw_mm = jax.jit(lambda x, w, g: C.kernel_grad_matmul(x, g, w.shape, s, pads).astype(w.dtype))
        fwd_mm = jax.jit(lambda x, w: C.conv_matmul_grad(x, w, s, pads))
        dx_mm = jax.jit(lambda x, w, g: jax.vjp(lambda x: C.conv_matmul_grad(x, w, s, pads), x)[1](g)[0])
        r = dict(x=xs, k=ks, s=s, n=n, gflop=2 * np.prod(y.shape) * np.prod(ks[:3]) / 1e9)
        ms = lambda fn: median_ms(fn, reps, cpu=cpu)  # noqa: E731
        r["j_fwd"] = ms(lambda: fwd(x, w).block_until_ready())
        r["j_fwd_matmul"] = ms(lambda: fwd_mm(x, w).block_until_ready())
        r["j_dx"] = ms(lambda: dx(x, w, g).block_until_ready())
        r["j_dx_matmul"] = ms(lambda: dx_mm(x, w, g).block_until_ready())
        r["j_dw_xla"] = ms(lambda: dw_xla(x, w, g).block_until_ready())
        r["j_dw_matmul"] = ms(lambda: dw_mm(x, w, g).block_until_ready())
        if torch_too:
            import torch

            tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
            xt = torch.from_numpy(np.asarray(x, np.float32).transpose(0, 3, 1, 2).copy()).to(tdt)
            wt = torch.from_numpy(np.asarray(w, np.float32).transpose(3, 2, 0, 1).copy()).to(tdt)
            gt = torch.from_numpy(np.asarray(g, np.float32).transpose(0, 3, 1, 2).copy()).to(tdt)
            (pt, pb), (pl, pr) = pads
            if pt == pb and pl == pr:
                tpad, xin = (pt, pl), xt
            else:  # asymmetric: pad explicitly
                tpad, xin = (0, 0), torch.nn.functional.pad(xt, (pl, pr, pt, pb))
            with torch.no_grad():
                r["t_fwd"] = ms(lambda: torch.nn.functional.conv2d(xin, wt, stride=s, padding=tpad))
                r["t_dx"] = ms(lambda: torch.nn.grad.conv2d_input(xin.shape, wt, gt, stride=s, padding=tpad))
                r["t_dw"] = ms(lambda: torch.nn.grad.conv2d_weight(xin, wt.shape, gt, stride=s, padding=tpad))
        rows.append(r)
        print(format_row(r), flush=True)
    return rows


COLS = ("j_fwd", "j_fwd_matmul", "j_dx", "j_dx_matmul", "j_dw_xla", "j_dw_matmul", "t_fwd", "t_dx", "t_dw")


def format_row(r):
    head = f"x{r['x']} k{r['k'][0]}x{r['k'][1]} {r['k'][2]}->{r['k'][3]} s{r['s'][0]} n={r['n']:2d} {r['gflop']:.2f}GF"
    return f"{head:58s} " + " ".join(f"{c}={r[c]:.2f}" for c in COLS if c in r)


def totals(rows):
    return {c: round(sum(r[c] * r["n"] for r in rows), 1) for c in COLS if c in rows[0]}


def backward_conv_ops(unet, params, x, t, ctx, impl):
    """Convolution / dot lines of the compiled gradient of the U-Net under ``impl``."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.models import conv as C

    with C.route_convs(impl):
        loss = lambda p: jnp.mean(unet.apply({"params": p}, x, t, ctx) ** 2)  # noqa: E731
        text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    kinds = collections.Counter()
    for line in text.splitlines():
        if " convolution(" in line:
            window = line.split("window={")[1].split("}")[0] if "window={" in line else ""
            kinds["convolution " + window.split(" ")[0] + " " + line.split("dim_labels=")[1].split(",")[0]] += 1
        elif " dot(" in line:
            kinds["dot"] += 1
        elif "__ynn_fusion" in line or "__xnn_fusion" in line or "__onednn" in line:
            kinds["library fusion " + line.split('"kind":"')[1].split('"')[0]] += 1
    return kinds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--hlo", action="store_true", help="also list the backward's convolution ops")
    ap.add_argument("--single-core", action="store_true",
                    help="one thread on one core for both libraries, process CPU time (robust under load)")
    args = ap.parse_args(argv)
    if args.single_core:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
        os.environ["BENCH_THREADS"] = "1"
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    import jax
    import jax.numpy as jnp

    from bench.presets import PRESETS
    from ldm_jax.models.unet import UNet, UNetConfig

    if not args.no_torch:
        import torch

        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    p = PRESETS[args.preset]
    cfg = UNetConfig(**p.unet_config())
    unet = UNet(cfg, dtype=jnp.dtype(args.dtype))
    b, hw = args.batch, p.latent
    x = jnp.zeros((b, hw, hw, 4), jnp.dtype(args.dtype))
    t = jnp.zeros((b,), jnp.int32)
    ctx = jnp.zeros((b, p.context_len, p.context_dim), jnp.dtype(args.dtype))
    params = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), x, t, ctx))["params"]
    counts = collect_conv_shapes(unet, params, x, t, ctx)
    print(f"{sum(counts.values())} convolutions, {len(counts)} distinct shapes (preset {args.preset}, B{b})")
    rows = time_conv_shapes(counts, reps=args.reps, dtype=args.dtype, torch_too=not args.no_torch,
                            cpu=args.single_core)
    print("occurrence-weighted totals (ms):", totals(rows))
    if args.hlo:
        real = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
        for impl in ("xla", "matmul"):
            print(impl, dict(backward_conv_ops(unet, real, x, t, ctx, impl)))


if __name__ == "__main__":
    main()
