"""Training the concat-conditioned LDM families (``diffusion.concat``, ldm_jax/training/concat_conditioning.py):
super-resolution ("low_res", CompVis bsr_sr: the low-res image next to the latents) and inpainting
("inpainting", SD-inpainting: the mask and the masked image's latents next to the latents, text through
cross-attention), from the ``runlocal`` presets of configs/ldm_sr.py and configs/sd_inpainting_finetune.py
(16x16 images, factor-2 KL first stage: 8x8x4 latents; batch 8 on a 2x4 mesh).

For each family: one sharded step's loss equals the loss written out here from the same batch, noise,
timesteps and posterior draws, with the concat channels built independently (torch's area / nearest
``F.interpolate``, the masked image encoded here); a short ``loop.train`` run writes a workdir that
``ldm_jax.load_pipeline`` samples with ``cond_image=`` (SR) / ``init_image=`` + ``mask=`` (inpainting)
exactly as a DDIM loop written here with diffusers' DDIMScheduler, the same U-Net and the training-time
channels; and sample.py samples the workdir. Plus the mask scheme, the SR latent cache and bad input.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import ldm_jax
from ldm_jax.diffusion.losses import sample_training_inputs
from ldm_jax.diffusion.schedule import add_noise
from ldm_jax.training import concat_conditioning as concat_lib
from ldm_jax.training import ldm_step, loop
from ldm_jax.training import sharding as shd
from ldm_jax.training.ldm_task import LDMTask
from test_training import _compilation_cache, host, mesh_of  # noqa: F401  (module-scoped compilation cache)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F = 2  # the runlocal first stage's factor


def load_config(name, arg="runlocal"):
    spec = importlib.util.spec_from_file_location("_cfg_" + name, os.path.join(ROOT, "configs", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def run_config(name, unet=None, **diffusion):
    cfg = load_config(name)
    if unet:
        cfg.model.unet = dict(cfg.model.unet, **unet)
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.train.num_steps = 2
    cfg.train.checkpoint_every = 2
    cfg.train.log_every = 1
    for k, v in diffusion.items():
        cfg.diffusion[k] = v
    return cfg


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


def area(x_bhwc, factor=F):
    """The reference low-res image: torch's area interpolation (OpenCV INTER_AREA semantics)."""
    return nhwc(torch.nn.functional.interpolate(nchw(x_bhwc), scale_factor=1 / factor, mode="area"))


def nearest(mask_bhw1, size):
    """The reference latent-size mask: F.interpolate's default (nearest), as LatentInpaintDiffusion."""
    return nhwc(torch.nn.functional.interpolate(nchw(mask_bhw1), size=size))


def rel(a, b):
    return abs(float(a) - float(b)) / abs(float(b))


def step_draws(task, state, shape):
    """The step's per-example draws for (state.rng, state.step) (see ldm_step.train_step)."""
    key = jax.random.fold_in(state.rng, state.step)
    t, noise = sample_training_inputs(jax.random.fold_in(key, ldm_step._NOISE), jnp.zeros(shape), task.schedule,
                                      task.step_cfg.offset_noise)
    eps = jax.random.normal(jax.random.fold_in(key, ldm_step._POSTERIOR), shape)
    return key, t, noise, eps


def scaled_latents(vae, vae_params, image_float, eps, scale_factor):
    """scale_factor * (mean + std * eps) of the KL first stage's posterior (jitted per module)."""
    fn = _ENCODE.setdefault(id(vae), jax.jit(
        lambda p, x, e, s: (lambda enc: (enc.mean + enc.std * e) * s)(vae.apply({"params": p}, x, method="encode"))))
    return np.asarray(fn(vae_params, image_float, eps, scale_factor))


_ENCODE = {}


def ddim_reference(pipe, x_T, channels, steps, ctx=None, uctx=None, scale=1.0):
    """Images from diffusers' DDIMScheduler (from the workdir's scheduler config) around our U-Net, the
    concat channels given (the same for both guidance branches), decoded by the first stage."""
    import diffusers

    sched = diffusers.DDIMScheduler.from_config(pipe.scheduler_config)
    sched.set_timesteps(steps)
    unet = jax.jit(lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c))
    x = torch.from_numpy(np.asarray(x_T, np.float32))
    for t in sched.timesteps:
        xin = np.concatenate([x.numpy(), channels], axis=-1)
        tt = np.full((x.shape[0],), float(t), np.float32)
        eps = np.asarray(unet(pipe.params["unet"], xin, tt, ctx))
        if scale != 1.0:
            eps_u = np.asarray(unet(pipe.params["unet"], xin, tt, uctx))
            eps = eps_u + scale * (eps - eps_u)
        x = sched.step(torch.from_numpy(eps), t, x).prev_sample
    decoded = pipe.vae.apply({"params": pipe.params["vae"]}, x.numpy() / pipe.scaling_factor, method="decode")
    return np.clip(np.asarray(decoded) / 2 + 0.5, 0.0, 1.0)


def write_png(path, image01):
    Image.fromarray(np.round(np.asarray(image01) * 255).astype(np.uint8)).save(path)
    return str(path)


def first_step(name, unet=None, **diffusion):
    """The family's task on a 2x4 mesh (its step compiled once for the module), its initial state on the
    host, the first synthetic batch, the prepared batch and the first step's metrics (scale_by_std on)."""
    cfg = run_config(name, unet, **diffusion)
    task = LDMTask(cfg, mesh_of(2, 4))
    state = task.init_state(jax.random.PRNGKey(0))
    state0 = host(state)
    host_batch = next(loop.SyntheticDataset(8, image_size=16))
    prepared = task.prepare_batch(host_batch)
    batch = shd.shard_batch(prepared, task.mesh)
    task.on_first_batch(state, batch)
    state1, metrics = task.train_step(state, batch)
    assert int(state1.step) == 1
    return dict(cfg=cfg, task=task, state0=state0, state1=state1, host_batch=host_batch, prepared=prepared,
                metrics=jax.device_get(metrics))


def train_workdir(run, workdir):
    """A 2-step loop.train run with the family's task (its step already compiled) -> a train.py workdir;
    the task's sample grid at step 2 (LDMTask.sample with the family's concat inputs) as well."""
    cfg = run["cfg"].copy_and_resolve_references()
    cfg.train.sample_every = 2
    trained = loop.train(cfg, str(workdir), task=run["task"], mesh=run["task"].mesh, progress=False)
    assert int(trained.step) == 2
    grid = np.asarray(Image.open(workdir / "samples" / "step_0000002.png"))
    assert grid.ndim == 3 and grid.std() > 0
    (workdir / "config.json").write_text(cfg.to_json_best_effort())  # as train.py writes it
    return str(workdir)


# ------------------------------------------------------------------ super-resolution
@pytest.fixture(scope="module")
def sr():
    return first_step("ldm_sr")


def test_super_resolution_step_matches_hand_written_loss(sr):
    task, state0, host_batch = sr["task"], sr["state0"], sr["host_batch"]
    assert task.unet.config.in_channels == 4 + 3 and task.concat == "low_res"
    # Eq. 2 with eps_theta([z_t, low_res], t): the box-filtered image in [-1, 1] at the latent size.
    image = host_batch["image"].astype(np.float32) / 127.5 - 1.0
    shape = (8, 8, 8, 4)
    _, t, noise, eps = step_draws(task, state0, shape)
    vae_params = host(task.frozen["vae"])
    x_t = add_noise(task.schedule, scaled_latents(task.vae, vae_params, image, eps, task.scale_factor), noise, t)
    unet = jax.jit(lambda p, x, t: task.unet.apply({"params": p}, x, t))

    def loss_with(low_res):
        return float(jnp.mean(jnp.square(unet(state0.params, jnp.concatenate([x_t, low_res], -1), t) - noise)))

    expected = loss_with(area(image))
    got = float(sr["metrics"]["loss"])
    strided = loss_with(image[:, ::F, ::F])  # what a wrong (aliased) downsample would give
    print(f"SR step on 2x4: loss {got:.7f}, hand-written {expected:.7f} (rel {rel(got, expected):.1e}); with a "
          f"strided downsample {strided:.7f} (rel {rel(strided, expected):.1e})")
    assert rel(got, expected) < 1e-5


def test_super_resolution_workdir_samples_with_cond_image(sr, tmp_path, capsys):
    """A short run -> workdir -> load_pipeline(workdir)(cond_image=low_res): images f times the condition,
    equal to DDIM around the trained U-Net with the training-time channels; sample.py --cond-img."""
    import sample as sample_cli

    workdir = train_workdir(sr, tmp_path / "run")
    pipe = ldm_jax.load_pipeline(workdir)
    assert (pipe.conditioning_key, pipe.cond_stage, pipe.concat_channels) == ("concat", "identity", 3)
    low_res01 = area(sr["host_batch"]["image"][:2].astype(np.float32) / 255.0)  # (2, 8, 8, 3) in [0, 1]
    x_T = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    # (the call sample.py makes below, so its compilation comes from the persistent cache)
    images = pipe(["", ""], cond_image=low_res01, num_inference_steps=2, guidance_scale=1.0, latents=x_T)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and images.std() > 1e-3
    want = ddim_reference(pipe, x_T, low_res01 * 2.0 - 1.0, 2)
    err = float(np.abs(images - want).max())
    print(f"SR workdir: load_pipeline(cond_image=) vs DDIM with the training channels: max abs image err {err:.2e}")
    assert err < 1e-4

    out = tmp_path / "cli"
    code = sample_cli.main(["--checkpoint", workdir, "--cond-img", write_png(tmp_path / "lr.png", low_res01[0]),
                            "--steps", "2", "--n_samples", "2", "--scale", "1", "--outdir", str(out)])
    assert code == 0, capsys.readouterr().err
    assert np.asarray(Image.open(out / "samples" / "00001.png")).shape == (16, 16, 3)  # 8x8 -> 16x16


# ------------------------------------------------------------------ noise-augmented upscaler (SD 2 x4)
UPSCALER = dict(concat="noise_augmented_low_res", max_noise_level=350, cond_drop_prob=0.5)


@pytest.fixture(scope="module")
def upscaler():
    # SD-inpainting's runlocal text model with the x4 upscaler's input: 4 latents + the 3-channel noised
    # low-res image, and a label table for the 350 noise levels.
    return first_step("sd_inpainting_finetune", dict(in_channels=7, num_class_embeds=350), **UPSCALER)


def test_upscaler_step_matches_hand_written_loss(upscaler):
    import diffusers

    task, state0, host_batch, prepared = (upscaler[k] for k in ("task", "state0", "host_batch", "prepared"))
    assert task.concat == "noise_augmented_low_res" and task.unet.config.in_channels == 7
    image = host_batch["image"].astype(np.float32) / 127.5 - 1.0
    shape = (8, 8, 8, 4)
    key, t, noise, eps = step_draws(task, state0, shape)
    drop = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, ldm_step._COND_DROP), 0.5, (8,)))
    levels = np.asarray(jax.random.randint(jax.random.fold_in(key, ldm_step._NOISE_LEVEL), (8,), 0, 350))
    lr_noise = np.asarray(jax.random.normal(jax.random.fold_in(key, ldm_step._LOW_RES_NOISE), (8, 8, 8, 3)))
    assert 0 < drop.sum() < 8 and len(set(levels.tolist())) > 1 and levels.max() < 350
    # Ho et al. 2021 Sec. 4.1 with the released low_scale_config schedule (diffusers' betas, independent).
    abar = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                   beta_schedule="scaled_linear").alphas_cumprod.numpy()[levels][:, None, None, None]
    low_res = area(image)
    noised = np.sqrt(abar) * low_res + np.sqrt(1.0 - abar) * lr_noise
    frozen = host(task.frozen)
    ids = np.where(drop[:, None], frozen["empty_ids"], prepared["input_ids"])  # only the text is dropped
    ctx = task.text_encoder.apply({"params": frozen["text_encoder"]}, jnp.asarray(ids, jnp.int32))
    x_t = add_noise(task.schedule, scaled_latents(task.vae, frozen["vae"], image, eps, task.scale_factor), noise, t)
    unet = jax.jit(lambda p, x, t, c, y: task.unet.apply({"params": p}, x, t, c, y))

    def loss_with(channels, labels):
        out = unet(state0.params, jnp.concatenate([x_t, channels], -1), t, ctx, jnp.asarray(labels, jnp.int32))
        return float(jnp.mean(jnp.square(out - noise)))

    expected = loss_with(noised, levels)
    got = float(upscaler["metrics"]["loss"])
    # Negative controls: no augmentation (the clean low-res image), and labels other than the levels
    # (the null label 349 for the CFG-dropped examples, as a class-conditional model would give).
    clean = loss_with(low_res, levels)
    null_for_dropped = loss_with(noised, np.where(drop, 349, levels))
    print(f"x4 upscaler step on 2x4: loss {got:.7f}, hand-written {expected:.7f} (rel {rel(got, expected):.1e}); "
          f"no augmentation {clean:.7f} (rel {rel(clean, expected):.1e}); null label for the {int(drop.sum())} "
          f"dropped {null_for_dropped:.7f} (rel {rel(null_for_dropped, expected):.1e}); levels {levels.tolist()}")
    assert rel(got, expected) < 1e-5
    assert rel(clean, expected) > 1e-4 and rel(null_for_dropped, expected) > 1e-4


def test_upscaler_workdir_samples_with_cond_image_and_noise_level(upscaler, tmp_path):
    workdir = train_workdir(upscaler, tmp_path / "run")
    pipe = ldm_jax.load_pipeline(workdir)
    assert pipe.is_upscaler and pipe.conditioning_key == "hybrid-adm" and pipe.max_noise_level == 350
    assert pipe.low_res_scheduler_config["beta_schedule"] == "scaled_linear"
    low_res01 = area(upscaler["host_batch"]["image"][:2].astype(np.float32) / 255.0)  # (2, 8, 8, 3)
    x_T = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    kw = dict(cond_image=low_res01, num_inference_steps=2, guidance_scale=3.0, latents=x_T)
    images = pipe(["a red square", "a blue square"], noise_level=20, **kw)
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and images.std() > 1e-3
    other = pipe(["a red square", "a blue square"], noise_level=300, **kw)
    print(f"x4 upscaler workdir: noise_level 20 vs 300 max abs image diff {np.abs(images - other).max():.2e}")
    assert np.abs(images - other).max() > 1e-4
    with pytest.raises(ValueError, match="noise_level must be in"):
        pipe(["a"], noise_level=350, **dict(kw, cond_image=low_res01[:1], latents=x_T[:1]))


def test_upscaler_configuration_checks():
    with pytest.raises(ValueError, match="num_class_embeds must be >= max_noise_level=350"):
        LDMTask(run_config("sd_inpainting_finetune", dict(in_channels=7, num_class_embeds=100), **UPSCALER),
                mesh_of(2, 4)).init_state(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs diffusion.conditioning='text'"):
        LDMTask(run_config("ldm_sr", dict(num_class_embeds=350), concat="noise_augmented_low_res"), mesh_of(2, 4))
    # Initialising from a released x4 upscaler: tests/test_upscaler.py (test_fine_tuning_from_the_x4_*).


# ------------------------------------------------------------------ inpainting
@pytest.fixture(scope="module")
def inpaint():
    return first_step("sd_inpainting_finetune", cond_drop_prob=0.5)


def test_inpainting_step_matches_hand_written_loss(inpaint, tmp_path):
    task, state0, host_batch, prepared = inpaint["task"], inpaint["state0"], inpaint["host_batch"], inpaint["prepared"]
    assert task.unet.config.in_channels == 4 + 1 + 4 and task.concat == "inpainting"
    # Eq. 2 with eps_theta([z_t, mask, E(masked image)], t, tau(y or "")): SD-inpainting's channels.
    image = host_batch["image"].astype(np.float32) / 127.5 - 1.0
    shape = (8, 8, 8, 4)
    key, t, noise, eps = step_draws(task, state0, shape)
    drop = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, ldm_step._COND_DROP), 0.5, (8,)))
    assert 0 < drop.sum() < 8
    mask = np.asarray(concat_lib.random_masks(jax.random.fold_in(key, ldm_step._MASK), 8, 16, 16,
                                              task.step_cfg.masks))
    masked_eps = jax.random.normal(jax.random.fold_in(key, ldm_step._MASKED_POSTERIOR), shape)
    frozen = host(task.frozen)
    ids = np.where(drop[:, None], frozen["empty_ids"], prepared["input_ids"])
    ctx = task.text_encoder.apply({"params": frozen["text_encoder"]}, jnp.asarray(ids, jnp.int32))
    x_t = add_noise(task.schedule, scaled_latents(task.vae, frozen["vae"], image, eps, task.scale_factor), noise, t)
    unet = jax.jit(lambda p, x, t, c: task.unet.apply({"params": p}, x, t, c))

    def loss_with(masked_image, mask_bhw1):
        masked_latents = scaled_latents(task.vae, frozen["vae"], masked_image, masked_eps, task.scale_factor)
        channels = np.concatenate([nearest(mask_bhw1, (8, 8)), masked_latents], -1)
        return channels, float(jnp.mean(jnp.square(unet(state0.params, jnp.concatenate([x_t, channels], -1), t, ctx)
                                                   - noise)))

    channels, expected = loss_with(image * (1.0 - mask), mask)
    got = float(inpaint["metrics"]["loss"])
    # Negative controls: the test would see the mask not applied to the image, and concat channels that
    # differed for the CFG-dropped examples (here: zeroed).
    _, unmasked = loss_with(image, mask)
    zeroed = channels * (~drop)[:, None, None, None]
    dropped_zero = float(jnp.mean(jnp.square(unet(state0.params, jnp.concatenate([x_t, zeroed], -1), t, ctx) - noise)))
    print(f"inpainting step on 2x4: loss {got:.7f}, hand-written {expected:.7f} (rel {rel(got, expected):.1e}); "
          f"mask not applied {unmasked:.7f} (rel {rel(unmasked, expected):.1e}); concat zeroed for the "
          f"{int(drop.sum())} dropped examples {dropped_zero:.7f} (rel {rel(dropped_zero, expected):.1e}); "
          f"masked fraction {mask.mean():.2f}, {int((mask.mean(axis=(1, 2, 3)) == 1).sum())} of 8 fully masked")
    assert rel(got, expected) < 1e-5
    assert rel(dropped_zero, expected) > 1e-3  # the equality above would have caught it
    assert 0 < mask.mean() < 1

    # Precomputed latents are refused (the masked image is encoded every step), clearly.
    with pytest.raises(ValueError, match="precompute_latents=True cannot train diffusion.concat='inpainting'"):
        task.latent_dataset(inpaint["cfg"], str(tmp_path / "cache"), 0)
    with pytest.raises(ValueError, match="needs the batch's 'image'"):
        task.step_fn(inpaint["state1"], {"latents": jnp.zeros(shape), "input_ids": prepared["input_ids"]},
                     task.frozen)


def test_inpainting_workdir_samples_with_init_image_and_mask(inpaint, tmp_path, capsys):
    """A short run -> workdir -> load_pipeline(workdir)(prompt, init_image=, mask=) with CFG: equal to DDIM
    around the trained U-Net with the training-time channels (mask at latent size, scaled posterior sample
    of the masked image); sample.py --init-img --mask."""
    import sample as sample_cli

    workdir = train_workdir(inpaint, tmp_path / "run")
    pipe = ldm_jax.load_pipeline(workdir)
    assert (pipe.conditioning_key, pipe.cond_stage, pipe.concat_channels) == ("hybrid", "", 5)
    image01 = inpaint["host_batch"]["image"][:2].astype(np.float32) / 255.0
    box = np.zeros((2, 16, 16), np.float32)
    box[:, 3:11, 5:14] = 1.0  # odd edges: the nearest downsample's pixel choice matters
    prompts = ["a red square", "a blue square"]
    x_T = np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32)
    images = pipe(prompts, init_image=image01, mask=box, strength=1.0, num_inference_steps=2, guidance_scale=3.0,
                  latents=x_T)  # the call sample.py makes below
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all() and images.std() > 1e-3
    # The training-time channels, with the Pipeline's posterior draw for the masked image (seed 0, stream 3).
    sample_eps = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), 3), (2, 8, 8, 4))
    masked_latents = scaled_latents(pipe.vae, pipe.params["vae"], (image01 * 2 - 1) * (1 - box[..., None]),
                                    sample_eps, pipe.scaling_factor)
    channels = np.concatenate([nearest(box[..., None], (8, 8)), masked_latents], -1)
    encode = jax.jit(lambda p, ids: pipe.text_encoder.apply({"params": p}, ids))
    ctx, uctx = (encode(pipe.params["text_encoder"], pipe.tokenize(p)) for p in (prompts, ["", ""]))
    want = ddim_reference(pipe, x_T, channels, 2, ctx, uctx, scale=3.0)
    err = float(np.abs(images - want).max())
    print(f"inpainting workdir: load_pipeline(init_image=, mask=, CFG 3) vs DDIM with the training channels: "
          f"max abs image err {err:.2e}")
    assert err < 1e-4

    out = tmp_path / "cli"
    code = sample_cli.main(["--checkpoint", workdir, "--prompt", "a red square",
                            "--init-img", write_png(tmp_path / "img.png", image01[0]),
                            "--mask", write_png(tmp_path / "mask.png", np.repeat(box[0][..., None], 3, -1)),
                            "--strength", "1", "--steps", "2", "--n_samples", "2", "--scale", "3",
                            "--outdir", str(out)])
    assert code == 0, capsys.readouterr().err
    assert np.asarray(Image.open(out / "samples" / "00001.png")).shape == (16, 16, 3)


# ------------------------------------------------------------------ pieces
def test_low_res_condition_is_the_box_filtered_image():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    got = np.asarray(concat_lib.low_res_condition(jnp.asarray(images), 4))
    assert got.shape == (3, 4, 6, 3)
    np.testing.assert_allclose(got, area(images.astype(np.float32) / 127.5 - 1.0, 4), atol=1e-6)
    pil = np.stack([np.asarray(Image.fromarray(im).resize((6, 4), Image.Resampling.BOX)) for im in images])
    np.testing.assert_allclose((got + 1.0) * 127.5, pil, atol=1.0)  # PIL's BOX (fixed-point, uint8 output)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        concat_lib.low_res_condition(jnp.zeros((1, 10, 8, 3), jnp.uint8), 4)


def test_random_mask_scheme():
    key = jax.random.PRNGKey(3)
    fn = jax.jit(concat_lib.random_masks, static_argnums=(1, 2, 3, 4))
    masks = np.asarray(fn(key, 512, 32, 48, concat_lib.MaskConfig()))
    assert masks.shape == (512, 32, 48, 1) and set(np.unique(masks)) <= {0.0, 1.0}
    np.testing.assert_array_equal(masks, np.asarray(fn(key, 512, 32, 48, concat_lib.MaskConfig())))  # a function of key
    cover = masks.mean(axis=(1, 2, 3))
    full = cover == 1.0
    print(f"masks: {full.mean():.3f} fully masked, the others cover {cover[~full].mean():.3f} on average "
          f"({(cover == 0).mean():.3f} empty)")
    assert (cover[~full] > 0).mean() > 0.98 and 0.05 < cover[~full].mean() < 0.6
    many = np.asarray(fn(key, 4096, 8, 8, concat_lib.MaskConfig())).mean(axis=(1, 2, 3)) == 1.0
    assert abs(many.mean() - 0.25) < 0.03                 # full_prob 0.25 (4 sigma: 0.027)
    assert len({m.tobytes() for m in masks[~full]}) == (~full).sum()  # every example its own mask

    def is_box(m):
        ys, xs = np.nonzero(m[..., 0])
        return ys.size > 0 and m[ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()

    one = dict(full_prob=0.0, max_shapes=1)
    boxes = np.asarray(fn(key, 64, 32, 48, concat_lib.MaskConfig(box_prob=1.0, **one)))
    assert all(is_box(m) for m in boxes)
    sides = [(np.nonzero(m[..., 0].any(1))[0].size, np.nonzero(m[..., 0].any(0))[0].size) for m in boxes]
    assert all(0.1 * 32 - 1 <= s <= 0.7 * 32 + 1 for hw in sides for s in hw), sides
    strokes = np.asarray(fn(key, 64, 32, 48, concat_lib.MaskConfig(box_prob=0.0, **one)))
    assert sum(is_box(m) for m in strokes) < 8 and (strokes.mean(axis=(1, 2, 3)) > 0).mean() > 0.95
    assert not np.asarray(fn(key, 8, 16, 16, concat_lib.MaskConfig(full_prob=0.0))).all(axis=(1, 2, 3)).any()
    with pytest.raises(ValueError, match="full_prob must be in"):
        concat_lib.MaskConfig(full_prob=1.5)
    with pytest.raises(ValueError, match="unknown keys"):
        concat_lib.MaskConfig.from_mapping({"full_probability": 0.1})


def test_concat_configuration_checks():
    # Text through cross-attention + the low-res image (CompVis "hybrid"): a workdir samples it so.
    hybrid = load_config("emoji_ldm")
    hybrid.diffusion.concat = "low_res"
    hybrid.model.unet = dict(hybrid.model.unet, in_channels=4 + 3)
    task = LDMTask(hybrid, mesh_of(1, 1))
    assert task.step_cfg.conditioning == "text" and task.step_cfg.concat == "low_res"
    assert task.pipeline_conditioning() == {"conditioning_key": "hybrid", "cond_stage": "identity"}

    bad = run_config("ldm_sr")
    bad.model.unet = dict(bad.model.unet, in_channels=4)
    with pytest.raises(ValueError, match=r"model.unet.in_channels=4, .*low-res image.*4 \+ 3 = 7 channels"):
        LDMTask(bad, mesh_of(1, 1))
    bad = run_config("sd_inpainting_finetune")
    bad.model.unet = dict(bad.model.unet, in_channels=7)
    with pytest.raises(ValueError, match=r"in_channels=7, .*mask.*4 \+ 5 = 9 channels"):
        LDMTask(bad, mesh_of(1, 1))
    bad = run_config("ldm_sr", concat="depth")
    with pytest.raises(ValueError, match="diffusion.concat must be one of"):
        LDMTask(bad, mesh_of(1, 1))
    # init.checkpoint models whose extra channels mean something else (stand-ins for loaded pipelines).
    from types import SimpleNamespace

    def check(concat, **pipe):
        pipe = SimpleNamespace(**{"source": "released.ckpt", "is_upscaler": False, "cond_stage": "", **pipe})
        LDMTask._check_init_concat_layout(SimpleNamespace(init_pipe=pipe, concat=concat))

    with pytest.raises(ValueError, match="CompVis LDM inpainting model"):
        check("inpainting", cond_stage="first_stage")
    with pytest.raises(ValueError, match="noise-augmented upscaler"):
        check("low_res", is_upscaler=True, cond_stage="open_clip")
    check("inpainting", cond_stage="clip")  # SD-inpainting (hybrid): the layout trained here
    check("low_res", cond_stage="identity")  # bsr_sr


# ------------------------------------------------------------------ SR on precomputed latents
def test_super_resolution_on_precomputed_latents(tmp_path):
    """data.precompute_latents with diffusion.concat="low_res": the cache also holds the low-res images
    (flipped ones included), the latent iterator yields them with the image iterator's examples and
    flips, and a step on the cache equals the step on the images."""
    from ldm_jax.data import create_dataset
    from ldm_jax.training import latent_cache

    synth = loop.SyntheticDataset(1, image_size=16)
    for i in range(8):
        Image.fromarray(synth.example(i)["image"]).save(tmp_path / f"img_{i}.png")
    cfg = run_config("ldm_sr")
    cfg.mesh.data = cfg.mesh.fsdp = 1
    cfg.data.name = "folder"
    cfg.data.path = str(tmp_path)
    cfg.data.random_flip = True
    cfg.data.precompute_latents = True
    cfg.first_stage.sample_posterior = False
    task = LDMTask(cfg, mesh_of(1, 1))
    latents = task.latent_dataset(cfg, str(tmp_path / "work"), seed=0)
    images = create_dataset(cfg.data, global_batch_size=8, seed=0, image_size=16)
    lat_batch, img_batch = next(latents), next(images)
    np.testing.assert_array_equal(lat_batch["index"], img_batch["index"])
    assert os.path.isfile(tmp_path / "work" / latent_cache.CACHE_DIRNAME / "low_res_flip.npy")
    np.testing.assert_allclose(lat_batch["low_res"], area(img_batch["image"].astype(np.float32) / 127.5 - 1.0),
                               atol=1e-6)  # flips included: the image iterator's flipped images

    state = task.init_state(jax.random.PRNGKey(0))
    start = host(state)
    task.set_scale_factor(0.7)
    from_cache = task.prepare_batch(lat_batch)
    assert set(from_cache) == {"latents", "low_res"}
    _, m_lat = task.train_step(state, shd.shard_batch(from_cache, task.mesh))
    _, m_img = task.train_step(shd.shard_tree(start, task.state_shardings),
                               shd.shard_batch(task.prepare_batch(img_batch), task.mesh))
    print(f"SR: step on the latent cache {float(m_lat['loss']):.7f} vs on images {float(m_img['loss']):.7f}")
    assert rel(m_lat["loss"], m_img["loss"]) < 1e-5
    np.testing.assert_allclose(m_lat["grad_norm"], m_img["grad_norm"], rtol=1e-4)
