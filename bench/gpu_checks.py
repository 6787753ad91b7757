"""Numerical checks of the GPU fast paths, on the GPU (run by bench/gpu_session.sh).

The test suite runs on CPU, where cuDNN flash attention cannot run; this script
is its GPU counterpart: at Stable Diffusion 1.5's attention shapes (bfloat16) it
compares ``attention_impl="cudnn"`` with the XLA reference path, forward and
gradients, and puts the difference next to the rounding error of bf16 itself
(the XLA path in bf16 against the same inputs in float32). Then a small U-Net in
bf16 with ``attention_impl="dot_product"`` against ``"xla"``.

    python bench/gpu_checks.py [--out checks.json]

Prints one line per check and writes the numbers as JSON. Exit status 1 when a
check exceeds its bound (the fast path's error more than 4x bf16's own, plus a
small floor) or the fast path silently did not run. Where cuDNN refuses a shape
(``cudnn_refused``) the row checks ``"dot_product"``'s fallback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ldm_jax.models import layers  # noqa: E402

FAST = "cudnn"  # the path under test; --fast blocked dry-runs this script on a CPU

# (name, batch, query tokens, key tokens, heads, head dim): SD1.5 at 512x512, one image with CFG.
SHAPES = [
    ("self 64x64, 320 ch", 2, 4096, 4096, 8, 40),
    ("cross 64x64 x 77", 2, 4096, 77, 8, 40),
    ("self 32x32, 640 ch", 2, 1024, 1024, 8, 80),
    ("self 16x16, 1280 ch", 2, 256, 256, 8, 160),
    ("cross 16x16 x 77", 2, 256, 77, 8, 160),
    ("CLIP causal 77", 2, 77, 77, 12, 64),
]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def attention_check(name, b, t, s, n, h, causal):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q32, k32, v32 = (jax.random.normal(kk, shape, jnp.float32) for kk, shape in
                     zip(keys, [(b, t, n, h), (b, s, n, h), (b, s, n, h)]))
    g32 = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
    q, k, v, g = (x.astype(jnp.bfloat16) for x in (q32, k32, v32, g32))

    def run(impl, q, k, v, g):
        def f(q, k, v):
            return layers.dot_product_attention(q, k, v, impl=impl, causal=causal)

        out, vjp = jax.vjp(f, q, k, v)
        return (out,) + vjp(g)

    impl, refused = FAST, None
    try:
        traced = jax.jit(lambda *a: run(impl, *a)).lower(q, k, v, g).as_text().count("__cudnn$fmha")
    except NotImplementedError as e:
        # cuDNN refuses some shapes (jax 0.11 rejects odd sequence lengths when differentiating):
        # then check what attention_impl="dot_product" does instead, its fallback.
        impl, refused, traced = "dot_product", str(e), 0
    got = jax.jit(lambda *a: run(impl, *a))(q, k, v, g)
    ref_bf16 = jax.jit(lambda *a: run("xla", *a))(q, k, v, g)
    ref_f32 = jax.jit(lambda *a: run("xla", *a))(q.astype(jnp.float32), k.astype(jnp.float32),
                                                v.astype(jnp.float32), g.astype(jnp.float32))
    row = {"check": f"attention {name}", "shape": [b, t, s, n, h], "causal": causal, "impl": impl,
           "cudnn_calls_traced": traced}
    if refused:
        row["cudnn_refused"] = refused
    ok = traced > 0 or FAST != "cudnn" or refused is not None
    for what, x, r16, r32 in zip(("out", "dq", "dk", "dv"), got, ref_bf16, ref_f32):
        fast_vs_f32, xla_bf16_vs_f32 = rel_err(x, r32), rel_err(r16, r32)
        row[what] = {"fast_vs_f32": fast_vs_f32, "xla_bf16_vs_f32": xla_bf16_vs_f32,
                     "fast_vs_xla_bf16": rel_err(x, r16)}
        ok &= fast_vs_f32 <= 4 * xla_bf16_vs_f32 + 2e-3
    row["ok"] = bool(ok)
    return row


def unet_check():
    from ldm_jax.models.unet import UNet, UNetConfig

    cfg = UNetConfig(block_out_channels=(64, 128, 128), layers_per_block=1,
                     down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                     num_heads=8, cross_attention_dim=64)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 4)), jnp.bfloat16)
    t = jnp.asarray([11, 500], jnp.int32)
    c = jnp.asarray(rng.standard_normal((2, 77, 64)), jnp.bfloat16)
    ref = UNet(cfg, dtype=jnp.bfloat16, attention_impl="xla")
    params = jax.jit(ref.init)(jax.random.PRNGKey(0), x, t, c)["params"]
    fast = ref.clone(attention_impl="dot_product" if FAST == "cudnn" else FAST)
    fn = jax.jit(lambda p, x, t, c: fast.apply({"params": p}, x, t, c))
    traced = fn.lower(params, x, t, c).as_text().count("__cudnn$fmha")
    out_fast = fn(params, x, t, c)
    out_ref = jax.jit(lambda p, x, t, c: ref.apply({"params": p}, x, t, c))(params, x, t, c)
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    ref32 = UNet(cfg, dtype=jnp.float32, attention_impl="xla")
    out_32 = jax.jit(lambda p, x, t, c: ref32.apply({"params": p}, x, t, c))(
        p32, x.astype(jnp.float32), t, c.astype(jnp.float32))
    row = {"check": "U-Net bf16, attention_impl=dot_product vs xla", "cudnn_calls_traced": traced,
           "fast_vs_f32": rel_err(out_fast, out_32), "xla_bf16_vs_f32": rel_err(out_ref, out_32),
           "fast_vs_xla_bf16": rel_err(out_fast, out_ref)}
    row["ok"] = bool((traced > 0 or FAST != "cudnn") and row["fast_vs_f32"] <= 4 * row["xla_bf16_vs_f32"] + 2e-3)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--fast", default="cudnn", help="attention impl under test (cudnn; blocked for a CPU dry run)")
    args = ap.parse_args()
    global FAST
    FAST = args.fast
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), compute capability "
          f"{getattr(dev, 'compute_capability', '?')}, jax {jax.__version__}", flush=True)
    rows = []
    checks = [(f"attention {s[0]}", lambda s=s: attention_check(*s, causal=s[0].startswith("CLIP")))
              for s in SHAPES] + [("U-Net", unet_check)]
    for name, check in checks:
        try:
            row = check()
        except Exception as e:  # noqa: BLE001 - report and go on with the other checks
            row = {"check": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:600]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": dev.device_kind, "jax": jax.__version__, "checks": rows}, f, indent=1)
    print(f"{sum(r['ok'] for r in rows)} of {len(rows)} checks passed", flush=True)
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
