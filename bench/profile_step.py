"""Where the time of one compiled U-Net forward / forward+backward goes, per XLA op class.

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true \\
    python bench/profile_step.py [--preset cpu] [--batch 4] [--what grad|fwd] [--conv xla|matmul] [--top 25]

Runs the jitted function under ``jax.profiler.trace`` (Perfetto trace), sums the
duration of every executed XLA thunk, maps each thunk back to its HLO
instruction in ``compiled.as_text()`` and groups them:

* ``conv fwd`` / ``conv input-grad`` / ``conv kernel-grad`` (a convolution whose
  window is larger than any kernel of the model is a kernel gradient; a
  convolution under ``transpose(jvp(...))`` otherwise is an input gradient);
* ``dot fwd`` / ``dot bwd`` (matmuls: attention, linear layers, 1x1 convs, per-tap kernel gradients);
* everything else by fusion kind (``loop``, ``input``=reductions, ``copy/transpose``).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parse_hlo(text: str):
    """{instruction name: line} for every instruction, and {computation name: body text}."""
    lines, comps = {}, {}
    current, body = None, []
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            current, body = m.group(1), []
            continue
        if line.strip() == "}" and current:
            comps[current] = "\n".join(body)
            current = None
            continue
        if current is not None:
            body.append(line)
            im = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", line)
            if im:
                lines[im.group(1)] = line
    return lines, comps


def classify(name: str, lines: dict, comps: dict, max_kernel: int = 5) -> str:
    line = lines.get(name, "")
    backward = "transpose(jvp" in line
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = line + "\n" + (comps.get(called.group(1), "") if called else "")
    if " convolution(" in body:
        win = re.search(r"window=\{size=(\d+)x(\d+)", body)
        if win and max(int(win.group(1)), int(win.group(2))) > max_kernel:
            return "conv kernel-grad"
        backward = backward or "transpose(jvp" in body
        return "conv input-grad" if backward else "conv fwd"
    if " dot(" in body:
        return "dot bwd" if backward or "transpose(jvp" in body else "dot fwd"
    for kind in ("kLoop", "kInput", "kOutput", "kCustom"):
        if f"kind={kind}" in line:
            tag = {"kLoop": "loop fusion", "kInput": "reduction fusion", "kOutput": "output fusion",
                   "kCustom": "library fusion"}[kind]
            if "transpose" in name or "copy" in name:
                tag = "copy/transpose fusion"
            return tag + (" bwd" if backward or "transpose(jvp" in body else "")
    op = re.search(r"= \S+ (\w[\w-]*)\(", line)
    return (op.group(1) if op else "other") + (" bwd" if backward else "")


def profile(fn, args, reps=3):
    import jax

    jax.block_until_ready(fn(*args))
    logdir = tempfile.mkdtemp(prefix="ldm_jax_prof_")
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(reps):
            jax.block_until_ready(fn(*args))
    path = sorted(glob.glob(os.path.join(logdir, "**", "*perfetto_trace.json.gz"), recursive=True))[-1]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    durations = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            durations[e["name"]] += e["dur"] / 1e3 / reps  # ms per call
    return durations


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--what", default="grad", choices=["grad", "fwd"])
    ap.add_argument("--conv", default="xla", help="conv impl: xla, matmul, auto")
    ap.add_argument("--attention", default="xla")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    if "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
        print("note: set XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true for per-op events", file=sys.stderr)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bench.presets import PRESETS
    from ldm_jax.models.unet import UNet, UNetConfig

    p = PRESETS[args.preset]
    dt = jnp.dtype(args.dtype)
    unet = UNet(UNetConfig(**p.unet_config(), conv_impl=args.conv), dtype=dt, attention_impl=args.attention)
    b, hw = args.batch, p.latent
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, hw, hw, 4)), dt)
    t = jnp.asarray(np.arange(b) * 37 + 11, jnp.int32)
    ctx = jnp.asarray(rng.standard_normal((b, p.context_len, p.context_dim)), dt)
    shapes = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), x, t, ctx))["params"]
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), jnp.float32), shapes)

    if args.what == "grad":
        def f(p):
            def loss(p):
                return jnp.mean(unet.apply({"params": p}, x, t, ctx).astype(jnp.float32) ** 2)
            return jax.value_and_grad(loss)(p)
    else:
        def f(p):
            return unet.apply({"params": p}, x, t, ctx)
    compiled = jax.jit(f).lower(params).compile()
    lines, comps = parse_hlo(compiled.as_text())
    durations = profile(compiled, (params,), args.reps)
    groups = collections.Counter()
    per_op = []
    for name, ms in durations.items():
        if name in lines and not re.search(r"= \S+ while\(", lines[name]) and " while(" not in lines[name]:
            cls = classify(name, lines, comps)
            groups[cls] += ms
            per_op.append((ms, name, cls))
    total = sum(groups.values())
    print(f"{args.what} B{b} conv={args.conv} attention={args.attention} dtype={args.dtype}: "
          f"{total:.1f} ms in XLA ops per call")
    for cls, ms in groups.most_common():
        print(f"  {cls:28s} {ms:9.1f} ms  {100 * ms / total:5.1f}%")
    print(f"top {args.top} ops:")
    for ms, name, cls in sorted(per_op, reverse=True)[:args.top]:
        shape = re.search(r"= (\S+) ", lines[name])
        print(f"  {ms:8.2f} ms  {cls:24s} {name:36s} {shape.group(1)[:60] if shape else ''}")


if __name__ == "__main__":
    main()
