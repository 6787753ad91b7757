"""PyTorch and this project in ONE process, calls alternated, one thread on one core,
process CPU time per call: a ratio that other load on a shared machine barely moves.

    python bench/interleaved.py [--preset cpu] [--only unet_fwd,train_step] [--reps 5] [--out FILE.md]

(Wall-clock time with all cores, which ``bench/run.py`` reports, is what a user
sees; on a busy machine it swings by 2x between runs, and PyTorch's OpenMP pool
suffers more from oversubscription than XLA's. This measures work instead.)

Rows: U-Net forward at the preset's batches, and the train step (forward,
backward, AdamW) at the training batch, each for several JAX variants
(``--variants conv:attention,...``; the first is the default fast path).
Same weights on both sides (the preset's random diffusers folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pin_single_core():
    """One core, one thread for both libraries. Must run before jax / torch import."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass


def cpu_ms(fn) -> float:
    c0 = time.process_time()
    fn()
    return (time.process_time() - c0) * 1e3


def alternate(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Round-robin calls; per name the median and min CPU milliseconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k].append(cpu_ms(fn))
    return {k: {"median": round(statistics.median(v), 1), "min": round(min(v), 1), "n": len(v)}
            for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--only", default="unet_fwd,train_step")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--variants", default="auto:dot_product,xla:dot_product,xla:xla",
                    help="JAX conv:attention pairs; the first is this project's default fast path")
    ap.add_argument("--batches", default=None, help="U-Net forward batches (default: the preset's)")
    ap.add_argument("--workdir", default=os.path.join(__import__("tempfile").gettempdir(), "ldm_jax_bench"))
    ap.add_argument("--out", default=None, help="append a Markdown table to this file")
    args = ap.parse_args(argv)
    pin_single_core()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import torch

    from bench.build import build_folder
    from bench.presets import PRESETS
    from ldm_jax.convert.unet_diffusers import load_unet

    torch.set_num_threads(1)
    preset = PRESETS[args.preset]
    folder = build_folder(preset, os.path.join(args.workdir, f"sd_{preset.name}"))
    from diffusers import UNet2DConditionModel

    variants = [tuple(v.split(":")) for v in args.variants.split(",") if v]
    tunet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"))
    junet, jparams = load_unet(os.path.join(folder, "unet"))
    jparams = jax.device_put(jparams)
    rng = np.random.default_rng(0)
    hw = preset.latent

    def variant(conv_impl, attention_impl):
        return junet.clone(attention_impl=attention_impl,
                           config=dataclasses.replace(junet.config, conv_impl=conv_impl))
    rows, raw = [], {}
    load0 = os.getloadavg()

    def inputs(b):
        x = rng.standard_normal((b, hw, hw, 4)).astype(np.float32)
        t = (np.arange(b) * 37 + 11).astype(np.int64)
        c = rng.standard_normal((b, preset.context_len, preset.context_dim)).astype(np.float32)
        n = rng.standard_normal((b, hw, hw, 4)).astype(np.float32)
        return x, t, c, n

    only = args.only.split(",")
    if "unet_fwd" in only:
        batches = [int(b) for b in args.batches.split(",")] if args.batches else list(preset.unet_batches)
        tunet.eval()
        for b in batches:
            x, t, c, _ = inputs(b)
            xt, tt, ct = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(c)
            fns = {}

            def torch_fwd():
                with torch.inference_mode():
                    tunet(xt, tt, ct)
            fns["torch"] = torch_fwd
            xj, tj, cj = jnp.asarray(x), jnp.asarray(t.astype(np.int32)), jnp.asarray(c)
            for cv, att in variants:
                u = variant(cv, att)
                comp = jax.jit(lambda p, x, t, c, u=u: u.apply({"params": p}, x, t, c)).lower(
                    jparams, xj, tj, cj).compile()
                fns[f"jax conv={cv} attention={att}"] = lambda comp=comp: comp(jparams, xj, tj, cj).block_until_ready()
            res = alternate(fns, args.reps)
            raw[f"unet_fwd_B{b}"] = res
            _save_partial(args, raw)
            rows += _rows(f"U-Net forward B{b}", res)
            print(f"unet_fwd B{b}: {res}", flush=True)

    if "train_step" in only:
        b = preset.train_batch
        x, t, c, n = inputs(b)
        tunet.train()
        opt = torch.optim.AdamW(tunet.parameters(), lr=1e-5, weight_decay=0.01)
        xt, tt, ct = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), torch.from_numpy(c)
        nt = torch.from_numpy(n.transpose(0, 3, 1, 2).copy())

        def torch_step():
            loss = torch.nn.functional.mse_loss(tunet(xt, tt, ct).sample, nt)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns = {"torch": torch_step}
        xj, tj, cj, nj = jnp.asarray(x), jnp.asarray(t.astype(np.int32)), jnp.asarray(c), jnp.asarray(n)
        tx = optax.adamw(1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
        for cv, att in variants:
            u = variant(cv, att)

            def step(p, o, u=u):
                loss, g = jax.value_and_grad(
                    lambda p: jnp.mean(jnp.square(u.apply({"params": p}, xj, tj, cj, train=True) - nj)))(p)
                upd, o = tx.update(g, o, p)
                return optax.apply_updates(p, upd), o, loss

            comp = jax.jit(step).lower(jparams, tx.init(jparams)).compile()
            state = [jparams, tx.init(jparams)]

            def run(comp=comp, state=state):
                p, o, loss = comp(*state)
                state[0], state[1] = p, o
                loss.block_until_ready()
            fns[f"jax conv={cv} attention={att}"] = run
        res = alternate(fns, args.reps)
        raw["train_step"] = res
        _save_partial(args, raw)
        rows += _rows(f"train step B{b} (fwd+bwd+AdamW)", res)
        print(f"train_step B{b}: {res}", flush=True)

    load1 = os.getloadavg()
    md = _markdown(preset, rows, load0, load1, args)
    print("\n" + md)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + md)
        path = os.path.splitext(args.out)[0] + f"_interleaved_{preset.name}.json"
        with open(path, "w") as f:
            json.dump({"loads": [load0, load1], "results": raw}, f, indent=1)
        if os.path.exists(path + ".partial"):
            os.remove(path + ".partial")


def _save_partial(args, raw):
    if args.out:
        with open(os.path.splitext(args.out)[0] + f"_interleaved_{args.preset}.json.partial", "w") as f:
            json.dump(raw, f, indent=1)


def _rows(what, res):
    t = res["torch"]["median"]
    out = []
    for k, v in res.items():
        if k == "torch":
            continue
        out.append((what, k.replace("jax ", ""), f"{t / 1e3:.2f} s" if t >= 1e4 else f"{t:.0f} ms",
                    f"{v['median'] / 1e3:.2f} s" if v["median"] >= 1e4 else f"{v['median']:.0f} ms",
                    f"**{t / v['median']:.2f}x**"))
    return out


def _markdown(preset, rows, load0, load1, args):
    lines = [
        f"## Interleaved, one core, CPU time (preset `{preset.name}`)", "",
        f"`python bench/interleaved.py --preset {preset.name} --reps {args.reps}` on "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}: PyTorch eager and this project in "
        f"one process, calls alternated, both libraries single-threaded on one core; process CPU time per call "
        f"(median of {args.reps}). Load average at start {tuple(round(v, 2) for v in load0)}, at end "
        f"{tuple(round(v, 2) for v in load1)}. Speed-up = PyTorch / this project.", "",
        "| what | JAX variant | PyTorch | this project | speed-up |", "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
