"""Benchmark table: this project next to diffusers PyTorch, same weights, same run.

    python bench/run.py [--preset cpu|gpu] [--only unet_fwd,train_step,...] [--out bench/RESULTS.md]

Sections (``--only``): unet_fwd, train_step, txt2img, vae_decode, first_image.
Every measurement runs in a fresh subprocess (``bench/cases.py``), alternating
PyTorch and JAX, on the random-weight diffusers folder that ``bench/build.py``
writes for the preset (both sides load the same safetensors). Writes a
Markdown table to ``--out`` and the raw results next to it
(``results_<preset>.json``). See bench/README.md for what each row means.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.presets import PRESETS  # noqa: E402
from bench.timing import load_average  # noqa: E402

SECTIONS = ("unet_fwd", "train_step", "txt2img", "vae_decode", "first_image")


# ------------------------------------------------------------------ environment
def environment(preset_name: str) -> dict:
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu": _cpu_model(), "cores": os.cpu_count(), "preset": preset_name}
    for mod in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "transformers", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            info[mod] = f"missing ({type(e).__name__})"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            info["gpu"] = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def wait_for_quiet(max_load: float, max_wait_s: float) -> tuple:
    """Sleep until the 1-minute load average is below ``max_load`` (or ``max_wait_s`` passed)."""
    t0 = time.time()
    while load_average() and load_average()[0] >= max_load and time.time() - t0 < max_wait_s:
        print(f"  load {load_average()} >= {max_load}: waiting 60 s", flush=True)
        time.sleep(60)
    return load_average()


# ------------------------------------------------------------------ subprocess runner
MIN_CASE_S = 30  # with --budget-s: a measurement is not started with less time than this left
class Runner:
    def __init__(self, preset: str, folder: str, timeout_s: float, log, single_core: bool = False,
                 deadline: float = None):
        self.preset, self.folder, self.timeout_s, self.log = preset, folder, timeout_s, log
        self.single_core = single_core
        self.deadline = deadline  # time.time() after which nothing runs (--budget-s)

    def __call__(self, case: str, side: str, *extra: str, env_update=None) -> dict:
        cmd = [sys.executable, os.path.join(ROOT, "bench", "cases.py"), case, side, "--preset", self.preset,
               "--folder", self.folder, *extra]
        env = dict(os.environ)
        env.setdefault("PYTHONWARNINGS", "ignore")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        for k, v in (env_update or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        preexec = None
        if self.single_core:
            # One thread on one core for both libraries; the table then uses process CPU time,
            # which other processes on a shared machine barely disturb.
            env["BENCH_THREADS"] = "1"
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
            core = min(os.sched_getaffinity(0))
            preexec = lambda: os.sched_setaffinity(0, {core})  # noqa: E731
        label = " ".join([case, side, *extra])
        timeout_s = self.timeout_s
        if self.deadline is not None:
            timeout_s = min(timeout_s, self.deadline - time.time())
            if timeout_s < MIN_CASE_S:
                self.log(f"  {label}: skipped (time budget spent)")
                return {"error": "skipped: --budget-s spent before this measurement"}
        load_before = load_average()
        t_launch = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=ROOT,
                                  preexec_fn=preexec)
        except subprocess.TimeoutExpired:
            cut = self.deadline is not None and timeout_s < self.timeout_s  # (the budget, not --timeout, stopped it)
            res = {"error": ("skipped: --budget-s spent during this measurement, stopped after " if cut else
                             "timeout after ") + f"{timeout_s:.0f}s"}
        else:
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode == 0 and lines:
                res = json.loads(lines[-1][len("RESULT "):])
            else:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
                res = {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-800:]}
        res["wall_s"] = round(time.time() - t_launch, 2)
        if "t_first_abs" in res:
            res["time_to_first_image_s"] = round(res.pop("t_first_abs") - t_launch, 2)
        res["load"] = [load_before, load_average()]
        self.log(f"  {label}: {_brief(res)}")
        return res


def _brief(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"][:300]
    keys = ("ms", "img_per_s", "compile_s", "time_to_first_image_s", "peak_rss_mb", "peak_mem_mb", "wall_s")
    parts = []
    for k in keys:
        if k in res:
            v = res[k]["median"] if isinstance(res[k], dict) else res[k]
            parts.append(f"{k}={v}")
    return " ".join(parts)


def best(results: list) -> dict:
    """Of repeated rounds, the one with the smallest median (the least disturbed)."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    return min(ok, key=lambda r: r["ms"].get(METRIC, r["ms"]["median"]) if "ms" in r
               else r.get("time_to_first_image_s", 0))


# ------------------------------------------------------------------ sections
def run_sections(preset, runner: Runner, only, rounds: int, conv_variants, attention_variants,
                 checkpoint=lambda partial: None) -> dict:
    """Every measurement of the chosen sections, in the order of ``only`` (so a run under a time
    budget measures what matters most first); ``checkpoint(partial_results)`` after each one
    (so a killed or timed-out run still leaves its raw results on disk)."""
    no_cache = {"LDM_JAX_COMPILATION_CACHE": None, "JAX_COMPILATION_CACHE_DIR": None}
    cache_dir = tempfile.mkdtemp(prefix="ldm_jax_bench_cache_") if "first_image" in only else None
    b_train = str(preset.train_batch)
    per_section = {
        "unet_fwd": [entry for b in preset.unet_batches for entry in (
            [(f"unet_fwd_B{b}_torch", "unet_fwd", "torch", ["--batch", str(b)]),
             (f"unet_fwd_B{b}_jax", "unet_fwd", "jax", ["--batch", str(b)])]
            + [(f"unet_fwd_B{b}_jax_attn-{att}", "unet_fwd", "jax", ["--batch", str(b), "--attention", att])
               for att in attention_variants])],
        "train_step": (
            [("train_step_torch", "train_step", "torch", ["--batch", b_train]),
             ("train_step_jax", "train_step", "jax", ["--batch", b_train])]
            + [(f"train_step_jax_conv-{cv}", "train_step", "jax", ["--batch", b_train, "--conv", cv])
               for cv in conv_variants]
            + [(f"train_step_jax_attn-{att}", "train_step", "jax", ["--batch", b_train, "--attention", att])
               for att in attention_variants]),
        "vae_decode": [("vae_decode_torch", "vae_decode", "torch", []), ("vae_decode_jax", "vae_decode", "jax", [])],
        "txt2img": [("txt2img_torch", "txt2img", "torch", []), ("txt2img_jax", "txt2img", "jax", [])],
        # Time to first image is measured once (not per round): the cache-write run must precede the warm one.
        "first_image": [("first_image_torch", "first_image", "torch", []),
                        ("first_image_jax_cache_write", "first_image", "jax", ["--cache-dir", cache_dir]),
                        ("first_image_jax_cache_warm", "first_image", "jax", ["--cache-dir", cache_dir]),
                        ("first_image_jax_cold", "first_image", "jax", [])],
    }
    entries = [e for section in only for e in per_section[section]]
    results = {key: [] for key, *_ in entries}
    for r in range(rounds):
        if rounds > 1:
            runner.log(f"round {r + 1}/{rounds}")
        for key, case, side, extra in entries:
            if case == "first_image" and r > 0:
                continue
            env_update = no_cache if case == "first_image" else None
            results[key].append(runner(case, side, *extra, env_update=env_update))
            checkpoint(_collect(results, cache_dir))
    return _collect(results, cache_dir)


def _collect(results: dict, cache_dir) -> dict:
    """Per row the least-disturbed round (and every round's median when there were several)."""
    R = {}
    for key, rounds_done in results.items():
        if not rounds_done:
            continue
        R[key] = dict(best(rounds_done), rounds=len(rounds_done))
        if len(rounds_done) > 1:
            R[key]["round_medians_ms"] = [r["ms"]["median"] for r in rounds_done if "ms" in r]
    if cache_dir and "first_image_jax_cache_warm" in R:
        R["first_image_cache_dir_mb"] = round(_dir_size(cache_dir) / 2**20, 1)
    return R


def _dir_size(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


# ------------------------------------------------------------------ table
METRIC = "median"  # "cpu_median" with --single-core


def _ms(res):
    if not res or "error" in res or "ms" not in res:
        return None
    return res["ms"].get(METRIC)


def _missing(res) -> str:
    """What a cell without a number says: the measurement was skipped (budget), timed out, or failed."""
    why = (res or {}).get("error", "")
    if why.startswith("skipped: --budget-s spent during"):
        return "stopped (budget)"
    if why.startswith("skipped"):
        return "not run (budget)"
    return "timeout" if why.startswith("timeout") else "error"


def _fmt_ms(v, res=None):
    if v is None:
        return _missing(res)
    return f"{v / 1e3:.2f} s" if v >= 1e4 else f"{v:.1f} ms"


def _ratio(torch_v, jax_v, higher_is_better=False):
    if torch_v is None or jax_v is None or not jax_v or not torch_v:
        return "-"
    r = jax_v / torch_v if higher_is_better else torch_v / jax_v
    return f"**{r:.2f}x**"


def table(preset, R: dict) -> list:
    """Rows: (what, PyTorch, this project, speed-up = PyTorch time / our time, notes)."""
    rows = []
    for b in preset.unet_batches:
        t, j = R.get(f"unet_fwd_B{b}_torch"), R.get(f"unet_fwd_B{b}_jax")
        if t is None and j is None:
            continue
        note = f"compile {j['compile_s']} s" if j and "compile_s" in j else ""
        # XLA's FLOP count leaves out cuDNN custom calls (GPU convolutions, fused attention): CPU only.
        if j and "gflop" in j and _ms(j) and "cudnn_fmha_traced" not in j:
            note += f"; {j['gflop']:.0f} GFLOP (XLA count), {j['gflop'] / (_ms(j) / 1e3):.0f} GFLOP/s"
        rows.append((f"U-Net forward B{b}", _fmt_ms(_ms(t), t), _fmt_ms(_ms(j), j), _ratio(_ms(t), _ms(j)), note))
        for key in sorted(k for k in R if k.startswith(f"unet_fwd_B{b}_jax_attn-")):
            att = key.rsplit("-", 1)[1]
            rows.append((f"U-Net forward B{b}, attention_impl={att}", _fmt_ms(_ms(t), t), _fmt_ms(_ms(R[key]), R[key]),
                         _ratio(_ms(t), _ms(R[key])), ""))
    t, j = R.get("train_step_torch"), R.get("train_step_jax")
    if t or j:
        def mem(res):
            if not res or "error" in res:
                return "?"
            if "peak_mem_mb" in res:
                return f"{res['peak_mem_mb'] / 1024:.1f} GB device"
            return f"{res.get('peak_rss_mb', float('nan')) / 1024:.2f} GB RSS"

        def ips(res):
            v = _ms(res)
            return None if not v else round(preset.train_batch / (v / 1e3), 3)

        b = preset.train_batch
        rows.append((f"train step B{b} (fwd+bwd+AdamW), img/s", f"{ips(t)}" if ips(t) else _missing(t),
                     f"{ips(j)}" if ips(j) else _missing(j), _ratio(ips(t), ips(j), higher_is_better=True),
                     f"step {_fmt_ms(_ms(t), t)} vs {_fmt_ms(_ms(j), j)}; peak memory {mem(t)} vs {mem(j)}"
                     + (f"; compile {j['compile_s']} s" if j and 'compile_s' in j else "")))
        for key in sorted(k for k in R if k.startswith(("train_step_jax_conv-", "train_step_jax_attn-"))):
            what = key.rsplit("-", 1)[1]
            label = f"conv gradients impl={what}" if "_conv-" in key else f"attention_impl={what}"
            rows.append((f"train step B{b}, {label}", f"{ips(t)}" if ips(t) else _missing(t),
                         f"{ips(R[key])}" if ips(R[key]) else _missing(R[key]),
                         _ratio(ips(t), ips(R[key]), higher_is_better=True),
                         f"step {_fmt_ms(_ms(R[key]), R[key])}; peak memory {mem(R[key])}"))
    t, j = R.get("txt2img_torch"), R.get("txt2img_jax")
    if t or j:
        size = preset.image_size
        note = "1 prompt + CFG (U-Net B2), DDIM, incl. text encoder and VAE decode"
        if j and "recompiles_on_new_seed_prompt_scale" in j:
            note += f"; recompiles for a new seed/prompt/scale: {j['recompiles_on_new_seed_prompt_scale']}"
        rows.append((f"txt2img {size}x{size}, {preset.txt2img_steps} steps, per image", _fmt_ms(_ms(t), t),
                     _fmt_ms(_ms(j), j), _ratio(_ms(t), _ms(j)), note))
    t, j = R.get("vae_decode_torch"), R.get("vae_decode_jax")
    if t or j:
        rows.append((f"VAE decode B{preset.vae_batch} ({preset.latent}x{preset.latent} -> {preset.image_size}px)",
                     _fmt_ms(_ms(t), t), _fmt_ms(_ms(j), j), _ratio(_ms(t), _ms(j)), ""))
    if "first_image_torch" in R:
        t = R["first_image_torch"]

        def ttfi(res):
            return None if "error" in res else res.get("time_to_first_image_s")

        for key, label in (("first_image_jax_cold", "cold (no cache)"),
                           ("first_image_jax_cache_write", "cold, writing the persistent cache"),
                           ("first_image_jax_cache_warm", "persistent compilation cache warm")):
            j = R.get(key, {})
            tt, jj = ttfi(t), ttfi(j)
            note = ""
            if "error" not in j and j:
                note = (f"process start -> image; JAX: import {j['import_s']} s, load {j['load_s']} s, first call "
                        f"{j['first_call_s']} s (compile ~{j['compile_s']} s)")
            rows.append((f"time to first image, {label}", f"{tt} s" if tt else _missing(t),
                         f"{jj} s" if jj else _missing(j),
                         _ratio(tt, jj), note))
    return rows


def markdown(preset, env, R, rows, loads, args) -> str:
    device = env.get("gpu") or f"{env['cpu']} ({env['cores']} cores)"
    lines = [
        f"# Benchmark results: preset `{preset.name}`", "",
        f"Generated by `python bench/run.py {' '.join(shlex.quote(a) for a in args)}` on {env['date']}.", "",
        f"- Device: {device}; threads: "
        + ("1 per library, one core (`--single-core`)" if METRIC == "cpu_median"
           else f"PyTorch {os.environ.get('BENCH_THREADS', env['cores'])}, XLA all cores"),
        f"- Versions: python {env['python']}, jax {env['jax']} / jaxlib {env['jaxlib']}, flax {env['flax']}, "
        f"optax {env['optax']}, torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}",
        f"- Load average (1/5/15 min) at start {loads[0]}, at end {loads[1]}",
        f"- Model: U-Net block_out_channels={preset.block_out_channels}, layers_per_block={preset.layers_per_block}, "
        f"{preset.heads} heads, context {preset.context_len}x{preset.context_dim}, latent {preset.latent}x"
        f"{preset.latent}x4; VAE {preset.vae_channels}; CLIP text encoder {preset.text_layers} layers; "
        f"compute dtype {preset.dtype}; random weights, one diffusers folder loaded by both sides.",
        ("- Metric: **process CPU time with one thread on one core** for both libraries (`--single-core`; "
         "robust to other load on a shared machine; time-to-first-image rows stay wall-clock)"
         if METRIC == "cpu_median" else "- Metric: wall-clock time, all cores"),
        f"- Times are medians of {preset.reps} (U-Net, VAE), {preset.train_reps} (train) and {preset.txt2img_reps} "
        f"(txt2img) calls after warm-up; each measurement in a fresh process; speed-up = PyTorch time / "
        f"this project's time (> 1: this project is faster).",
        "- This project's main rows use its fast paths: `attention_impl=\"dot_product\"` (cuDNN flash attention "
        "on a CUDA GPU, the blocked recomputing attention of `ldm_jax/models/attention_kernels.py` on CPU) and "
        "convolutions `conv_impl=\"auto\"` (`ldm_jax/models/conv.py`: on CPU per-tap matmul kernel gradients and "
        "matmul forward / input gradients at small spatial sizes; XLA's on GPU/TPU). Rows marked "
        "`impl=xla` / `attention_impl=xla` switch one of them back to the plain XLA "
        "reference path.",
        "",
        "| what | diffusers PyTorch (eager) | this project (JAX) | speed-up | notes |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(str(c) for c in row)} |" for row in rows]
    lines += ["", "Raw results: `" + os.path.basename(args_json_path(args_out(args), preset.name)) + "`.", ""]
    return "\n".join(lines)


def args_out(args):
    for i, a in enumerate(args):
        if a == "--out" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return os.path.join(ROOT, "bench", "RESULTS.md")


def args_json_path(out_md: str, preset_name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(out_md)), f"results_{preset_name}.json")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "RESULTS.md"))
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ldm_jax_bench"),
                    help="where the random-weight model folder is built (reused)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every measurement; the least-disturbed round wins")
    ap.add_argument("--wait-load", type=float, default=None, help="first wait for the 1-min load to drop below this")
    ap.add_argument("--wait-max", type=float, default=1800)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per measurement process")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the whole run (model build included): measurements that would "
                         "start later are skipped, a running one is stopped at the budget; sections run in "
                         "--only's order, so list the important ones first")
    ap.add_argument("--single-core", action="store_true",
                    help="CPU: pin every process to one core with one thread per library and report process "
                         "CPU time (robust on a shared, loaded machine) instead of wall time")
    ap.add_argument("--conv-variants", default=None,
                    help="extra JAX train-step rows with these conv impls (default: xla on cpu, none for the gpu presets)")
    ap.add_argument("--from-json", default=None,
                    help="only re-render the table of a finished run from its results_<preset>.json")
    ap.add_argument("--unet-batches", default=None, help="U-Net forward batches (default: the preset's), e.g. 2")
    ap.add_argument("--attention-variants", default="xla",
                    help="extra JAX U-Net forward / train rows with these attention impls")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown sections {bad}; choose from {SECTIONS}")
    preset = PRESETS[args.preset]
    if args.unet_batches:
        import dataclasses

        preset = dataclasses.replace(preset, unet_batches=tuple(int(b) for b in args.unet_batches.split(",")))
    attention_variants = [a for a in args.attention_variants.split(",") if a]
    conv_variants = args.conv_variants
    if conv_variants is None:
        conv_variants = "" if args.preset.startswith("gpu") else "xla"
    conv_variants = [c for c in conv_variants.split(",") if c]

    t_run = time.time()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    global METRIC
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        METRIC = saved["metric"]
        preset = type(preset)(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["preset"].items()})
        run_args = saved.get("argv", argv)
        md = markdown(preset, saved["env"], saved["results"], table(preset, saved["results"]), saved["loads"],
                      run_args)
        with open(args.out, "w") as f:
            f.write(md)
        log(md)
        return
    if args.wait_load:
        log(f"waiting for load < {args.wait_load}")
        wait_for_quiet(args.wait_load, args.wait_max)
    load_start = load_average()
    env = environment(preset.name)
    log(f"environment: {env}")
    folder = os.path.join(args.workdir, f"sd_{preset.name}")
    t0 = time.time()
    from bench.build import build_folder

    build_folder(preset, folder)
    log(f"model folder {folder} ready ({time.time() - t0:.0f} s)")
    timeout = args.timeout or (1800 if preset.name == "gpu" else 900)
    METRIC = "cpu_median" if args.single_core else "median"
    deadline = t_run + args.budget_s if args.budget_s else None
    runner = Runner(preset.name, folder, timeout, log, single_core=args.single_core, deadline=deadline)
    json_path = args_json_path(args.out, preset.name)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)

    def save(path, results):
        # Same format as the final file, so `--from-json FILE.partial` renders a killed run's table.
        with open(path, "w") as f:
            json.dump({"env": env, "preset": preset.__dict__, "loads": (load_start, load_average()),
                       "metric": METRIC, "argv": argv, "results": results}, f, indent=1, default=str)

    R = run_sections(preset, runner, only, args.rounds, conv_variants, attention_variants,
                     lambda partial: save(json_path + ".partial", partial))
    loads = (load_start, load_average())
    rows = table(preset, R)
    md = markdown(preset, env, R, rows, loads, argv)
    print("\n" + md)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(md)
    save(json_path, R)
    if os.path.exists(json_path + ".partial"):
        os.remove(json_path + ".partial")
    log(f"wrote {args.out} and {args_json_path(args.out, preset.name)}")


if __name__ == "__main__":
    main()
