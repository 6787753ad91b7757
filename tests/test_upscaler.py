"""The SD 2 x4 upscaler family (original ``LatentUpscaleDiffusion``, ``conditioning_key: hybrid-adm``)
against stable-diffusion-sdkit's ``ldm`` and diffusers' ``StableDiffusionUpscalePipeline``.

The reference is instantiated from a tiny YAML in the schema of x4-upscaling.yaml by the original
class (its ``ImageConcatWithNoiseAugmentation`` low-scale model included), saved as a ``.ckpt`` and
loaded with ``ldm_jax.load_pipeline(file, config=yaml)``. Both sample with DDIM and classifier-free
guidance from the same initial latents and the same augmentation noise: the low-res image noised
to the level l by the low-scale model's ``q_sample`` and concatenated to the latents, l as the
U-Net's class label, in both guidance branches.
"""
import os

import jax
import numpy as np
import pytest
import torch
import yaml

import ldm_jax
from ldm_jax.convert.errors import CheckpointError
from ldm_jax.convert.original_config import read_original_yaml, spec_from_original_config
from ldm_jax.convert.original_pipeline import load_original_pipeline
from ldm_jax.diffusion.schedule import NoiseSchedule
from original_ckpt import (
    CONFIGS, ddim_sample, latent_diffusion, one_torch_thread, open_clip_context, open_clip_text_model, save_ckpt,
)
from tiny_sd import nchw, nhwc

LATENT_TOL = 1e-4  # issue 4: final latents, float32
IMAGE_TOL = 2e-3   # decoded images in [0, 1]
STEPS = 4
SCALE = 5.0
LEVEL = 100        # noise level (diffusers' default is 20; any level < max_noise_level)
PROMPTS = ["a red apple on a table", "a blue car"]
YAML = os.path.join(CONFIGS, "tiny-x4-upscaling.yaml")


def max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def x4(tmp_path_factory):
    # FrozenOpenCLIPEmbedder would download OpenCLIP: the reference takes the context precomputed
    # (cond stage Identity) from an open_clip text tower stored under the original prefix.
    model = latent_diffusion(YAML, seed=60, cond_stage_config={"target": "torch.nn.Identity"})
    text = open_clip_text_model(61)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    assert "low_scale_model.sqrt_alphas_cumprod" in sd  # the low-scale model's schedule buffers
    sd.update({"cond_stage_model.model." + k: v.detach().numpy().copy() for k, v in text.state_dict().items()})
    path = save_ckpt(str(tmp_path_factory.mktemp("x4") / "x4.ckpt"), sd)
    pipe = ldm_jax.load_pipeline(path, config=YAML)
    rng = np.random.default_rng(62)
    data = dict(low_res=rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32),  # latent size: 32x32 output
                x_T=rng.standard_normal((2, 8, 8, 4)).astype(np.float32),
                eps=rng.standard_normal((2, 8, 8, 3)).astype(np.float32))  # the augmentation noise
    return dict(model=model, text=text, path=path, pipe=pipe, **data)


def run(pipe, data, **kw):
    """(images, final latents) with DDIM + CFG from the fixture's latents / low-res image / noise."""
    args = dict(num_inference_steps=STEPS, guidance_scale=SCALE, sampler="ddim", latents=data["x_T"],
                cond_image=data["low_res"], noise_level=LEVEL, cond_noise=data["eps"], return_intermediates=True)
    images, steps = pipe(PROMPTS, **{**args, **kw})
    return images, steps[-1]


def test_x4_upscaler_matches_latent_upscale_diffusion(x4):
    model, pipe = x4["model"], x4["pipe"]
    assert type(model).__name__ == "LatentUpscaleDiffusion" and model.model.conditioning_key == "hybrid-adm"
    assert (pipe.conditioning_key, pipe.cond_stage, pipe.concat_channels, pipe.vae_scale_factor) == (
        "hybrid-adm", "open_clip", 3, 4)
    assert pipe.is_upscaler and pipe.max_noise_level == model.low_scale_model.max_noise_level == 350
    # the low-res schedule from the YAML is the low-scale model's (float64 cast to float32, as its buffers)
    low = NoiseSchedule.from_diffusers_config(pipe.low_res_scheduler_config)
    for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        np.testing.assert_array_equal(np.asarray(getattr(low, name)), getattr(model.low_scale_model, name).numpy())

    ids = pipe.tokenize(PROMPTS)
    ctx = torch.from_numpy(open_clip_context(x4["text"], ids, "penultimate"))
    uc = torch.from_numpy(open_clip_context(x4["text"], pipe.tokenize(["", ""]), "penultimate"))
    level = torch.full((2,), LEVEL, dtype=torch.long)
    with torch.no_grad():  # ImageConcatWithNoiseAugmentation.forward with the given noise
        c_concat = model.low_scale_model.q_sample(nchw(x4["low_res"] * 2 - 1), level, noise=nchw(x4["eps"]))
    # LatentUpscaleDiffusion: unconditional branch = empty text, the same noised image and level
    z_ref = ddim_sample(model, nchw(x4["x_T"]), STEPS,
                        cond={"c_concat": [c_concat], "c_crossattn": [ctx], "c_adm": level},
                        uncond={"c_concat": [c_concat], "c_crossattn": [uc], "c_adm": level}, scale=SCALE)
    images, z = run(pipe, x4)
    with torch.no_grad(), one_torch_thread():
        want = nhwc(torch.clamp((model.decode_first_stage(z_ref) + 1.0) / 2.0, 0.0, 1.0).numpy())
    print(f"x4 upscaler (hybrid-adm, noise level {LEVEL}, CFG {SCALE}): final latents max abs err "
          f"{max_err(z, nhwc(z_ref)):.2e}, images {max_err(images, want):.2e}")
    assert images.shape == (2, 32, 32, 3)  # the low-res size times the autoencoder factor
    assert max_err(z, nhwc(z_ref)) < LATENT_TOL
    assert max_err(images, want) < IMAGE_TOL and images.std() > 1e-3

    # The noise level is traced: another level reuses the compiled program, and changes the result.
    fns = [fn for key, fn in pipe._jit_cache.items() if key[0] == "generate"]
    sizes = [fn._cache_size() for fn in fns]
    _, other = run(pipe, x4, noise_level=LEVEL + 150)
    assert [fn._cache_size() for fn in fns] == sizes
    assert max_err(other, z) > 1e-2
    # Without cond_noise the augmentation noise is the seed's stream 4.
    _, seeded = run(pipe, x4, cond_noise=None, seed=7)
    stream = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(7), 4), (2, 8, 8, 3)))
    _, explicit = run(pipe, x4, cond_noise=stream, seed=0)
    assert max_err(seeded, explicit) < 1e-6 and max_err(seeded, z) > 1e-2


def test_x4_upscaler_input_errors(x4):
    pipe = x4["pipe"]
    kw = dict(num_inference_steps=2, cond_image=x4["low_res"])
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 350\).*got 350"):
        pipe(PROMPTS, noise_level=350, **kw)
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 350\)"):
        pipe(PROMPTS, noise_level=-1, **kw)
    with pytest.raises(ValueError, match="noise_level must be an int"):
        pipe(PROMPTS, noise_level=20.5, **kw)
    with pytest.raises(ValueError, match="upscaler: pass cond_image="):
        pipe(PROMPTS, num_inference_steps=2)
    with pytest.raises(ValueError, match="upscaler: give it cond_image="):
        pipe(PROMPTS, num_inference_steps=2, image_conditioning=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="pass noise_level= instead of class_labels="):
        pipe(PROMPTS, class_labels=[3, 4], **kw)
    with pytest.raises(ValueError, match=r"cond_noise must have the shape .*\(2, 8, 8, 3\)"):
        pipe(PROMPTS, cond_noise=np.zeros((2, 8, 8, 4), np.float32), **kw)
    with pytest.raises(CheckpointError, match="LatentUpscaleDiffusion checkpoint.*x4-upscaling.yaml"):
        load_original_pipeline(x4["path"])  # no YAML: max_noise_level etc. are not in the weights


def test_x4_yaml_low_scale_config():
    """The released x4-upscaling.yaml: its low-res schedule (CompVis linear = diffusers scaled_linear, as
    diffusers' low_res_scheduler) and max_noise_level; a low_scale_config elsewhere is refused."""
    released = read_original_yaml(os.path.join(CONFIGS, "x4-upscaling.yaml"))
    spec = spec_from_original_config(released, "x4-upscaling.yaml")
    assert spec.max_noise_level == 350
    assert {k: spec.low_res_scheduler[k] for k in ("beta_schedule", "beta_start", "beta_end",
                                                   "num_train_timesteps")} == {
        "beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 1000}
    params = released["model"]["params"]
    too_high = {**params["low_scale_config"]["params"], "max_noise_level": 1001}
    for change, match in (({"conditioning_key": "hybrid"}, "low_scale_config with conditioning_key 'hybrid'"),
                          ({"low_scale_config": {"params": too_high,
                                                 "target": params["low_scale_config"]["target"]}},
                           "max_noise_level=1001 exceeds"),
                          ({"low_scale_config": {"target": "ldm.modules.diffusionmodules.upscaling."
                                                           "SimpleImageConcat"}}, "SimpleImageConcat")):
        with pytest.raises(CheckpointError, match=match):
            spec_from_original_config({"model": {"params": {**params, **change}}}, "x4-upscaling.yaml")


def test_x4_export_runs_in_diffusers_upscale_pipeline(x4, tmp_path):
    """save_diffusers -> diffusers.StableDiffusionUpscalePipeline (low_res_scheduler/, max_noise_level): the same
    images from the same latents and augmentation noise; the folder loads back as the same upscaler."""
    import json

    import diffusers

    from ldm_jax.convert.export import save_diffusers

    pipe = x4["pipe"]
    folder = save_diffusers(pipe, str(tmp_path / "x4"))
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    assert (index["_class_name"], index["max_noise_level"]) == ("StableDiffusionUpscalePipeline", 350)
    ref_pipe = diffusers.StableDiffusionUpscalePipeline.from_pretrained(folder)
    ref_pipe.set_progress_bar_config(disable=True)
    # its augmentation noise: randn_tensor(image.shape, generator), drawn before anything else
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), one_torch_thread():
        ref = ref_pipe(PROMPTS, image=nchw(x4["low_res"]), noise_level=LEVEL, num_inference_steps=STEPS,
                       guidance_scale=SCALE, latents=nchw(x4["x_T"]), generator=torch.Generator().manual_seed(5),
                       output_type="np").images
    got, _ = run(pipe, x4, cond_noise=nhwc(noise))  # the program compiled by the parity test
    print(f"x4 upscaler -> diffusers StableDiffusionUpscalePipeline: max abs image error {max_err(got, ref):.2e}")
    assert max_err(got, ref) < IMAGE_TOL and got.std() > 1e-3

    back = ldm_jax.load_pipeline(folder)
    assert back.is_upscaler and (back.conditioning_key, back.max_noise_level) == ("hybrid-adm", 350)
    ours, theirs = (NoiseSchedule.from_diffusers_config(p.low_res_scheduler_config) for p in (pipe, back))
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), np.asarray(theirs.alphas_cumprod))
    for a, b in zip(jax.tree_util.tree_leaves(pipe.params["unet"]), jax.tree_util.tree_leaves(back.params["unet"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sample_cli_noise_level(x4, tmp_path, capsys):
    """sample.py --cond-img low_res.png --noise-level N on an x4 upscaler checkpoint; a level out of range
    is a one-line error."""
    from PIL import Image

    import sample as sample_cli

    low_res = tmp_path / "low_res.png"
    Image.fromarray((x4["low_res"][0] * 255).astype(np.uint8)).save(low_res)
    argv = ["--checkpoint", x4["path"], "--config", YAML, "--prompt", PROMPTS[0], "--steps", "2", "--n_samples", "1",
            "--cond-img", str(low_res)]
    assert sample_cli.main(argv + ["--noise-level", "30", "--outdir", str(tmp_path / "out")]) == 0, \
        capsys.readouterr().err
    assert np.asarray(Image.open(tmp_path / "out" / "samples" / "00000.png")).shape == (32, 32, 3)
    capsys.readouterr()
    assert sample_cli.main(argv + ["--noise-level", "350", "--outdir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    errors = [line[line.index("error: "):] for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "noise_level must be in [0, 350)" in errors[0], err


# ------------------------------------------------------------------ fine-tuning from the x4 file (init.checkpoint)
def _x4_training_config(path, yaml_file=YAML, **diffusion):
    """configs/sd2_x4_upscaler.py (the released architecture's settings: v-prediction, CompVis linear
    1e-4..0.02, the low-res schedule and max_noise_level 350, scale factor 0.08333) on emoji_ldm's
    runlocal data / mesh / optimiser, model.unet={} and init.checkpoint = the tiny x4 file."""
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def config(name, arg=""):
        spec = importlib.util.spec_from_file_location("_cfg_" + name, os.path.join(root, "configs", name + ".py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg)

    cfg, local = config("sd2_x4_upscaler"), config("emoji_ldm", "runlocal")
    for key in ("data", "mesh", "train", "model"):
        cfg[key] = local[key]
    cfg.model.unet = {}
    cfg.data.image_size = 16  # 4x4 latents (KL-f4)
    cfg.data.precompute_latents = False
    cfg.mesh.min_fsdp_size = 2 ** 10
    cfg.init.checkpoint = path
    cfg.init.original_config = yaml_file
    for k, v in diffusion.items():
        cfg.diffusion[k] = v
    return cfg


def test_fine_tuning_from_the_x4_upscaler_file(x4):
    """init.checkpoint = an original x4-upscaler .ckpt with diffusion.concat="noise_augmented_low_res" (the
    sd2_x4_upscaler config): the first state's U-Net (params and EMA, 2x4 FSDP mesh) is the file's; the
    frozen autoencoder (scale 0.08333), OpenCLIP text encoder and tokenizer are the file's; the step
    noises the low-res image with the file's schedule and max_noise_level; one sharded step runs."""
    from jax.sharding import PartitionSpec as P

    from ldm_jax.training import loop
    from ldm_jax.training import sharding as shd
    from ldm_jax.training.ldm_task import LDMTask

    pipe = x4["pipe"]
    task = LDMTask(_x4_training_config(x4["path"]), shd.make_mesh(2, 4))
    assert task.unet.config.in_channels == 7 and task.unet.config.num_class_embeds == 1000
    assert task.step_cfg.max_noise_level == 350
    assert dict(task.step_cfg.low_res_schedule) == {k: v for k, v in pipe.low_res_scheduler_config.items()
                                                    if v is not None}
    assert task.scale_factor == np.float32(0.08333) and task.step_cfg.prediction_type == "v_prediction"
    host = shd.gather_to_host
    assert_same = lambda a, b: jax.tree_util.tree_map(np.testing.assert_array_equal, host(a), host(b))  # noqa: E731
    assert_same(task.frozen["vae"], pipe.params["vae"])
    assert_same(task.frozen["text_encoder"], pipe.params["text_encoder"])
    np.testing.assert_array_equal(task.tokenizer(PROMPTS), pipe.tokenize(PROMPTS))
    state = task.init_state(jax.random.PRNGKey(0))
    assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(pipe.params["unet"])
    assert_same(state.params, pipe.params["unet"])
    assert_same(state.ema_params, pipe.params["unet"])
    kernel = state.params["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]
    assert kernel.shape == (3, 3, 64, 128) and kernel.sharding.spec == P(None, None, None, "fsdp")

    batch = next(loop.SyntheticDataset(8, image_size=16))
    before = np.asarray(host(state.params)["conv_in"]["kernel"])
    state1, metrics = task.train_step(state, shd.shard_batch(task.prepare_batch(batch), task.mesh))
    print(f"x4 fine-tuning step on 2x4: loss {float(metrics['loss']):.5f}")
    assert np.isfinite(float(metrics["loss"])) and int(state1.step) == 1
    assert np.abs(np.asarray(host(state1.params)["conv_in"]["kernel"]) - before).max() > 0
    # Its sample pipeline is an upscaler with the file's noise schedule and bound.
    conditioning = task.pipeline_conditioning()
    assert conditioning["max_noise_level"] == 350 and conditioning["conditioning_key"] == "hybrid-adm"


def test_fine_tuning_from_the_x4_file_takes_or_checks_its_low_res_schedule(x4, tmp_path):
    """The file's low_scale_config (here another one: linear_end 0.03, max_noise_level 250) is used when
    diffusion.low_res_schedule / max_noise_level are unset, and a setting that disagrees is a clear error;
    so are a concat other than noise_augmented_low_res and a fixed scale factor other than the file's."""
    from ldm_jax.diffusion.schedule import NoiseSchedule
    from ldm_jax.training import sharding as shd
    from ldm_jax.training.ldm_task import LDMTask

    original = read_original_yaml(YAML)
    low = original["model"]["params"]["low_scale_config"]["params"]
    low["noise_schedule_config"]["linear_end"] = 0.03
    low["max_noise_level"] = 250
    other = str(tmp_path / "x4-other-low-scale.yaml")
    with open(other, "w") as f:
        yaml.safe_dump(original, f)
    mesh = shd.make_mesh(1, 1, devices=jax.devices()[:1])

    task = LDMTask(_x4_training_config(x4["path"], other, low_res_schedule=None, max_noise_level=None), mesh)
    assert task.step_cfg.max_noise_level == 250 and task.pipeline_conditioning()["max_noise_level"] == 250
    used = NoiseSchedule.from_diffusers_config(dict(task.step_cfg.low_res_schedule))
    assert used.betas64[-1] == pytest.approx(0.03) and dict(task.step_cfg.low_res_schedule)["beta_end"] == 0.03

    # the config's released values (0.02, 350) against this file
    with pytest.raises(ValueError, match=r"diffusion.max_noise_level=350 but init.checkpoint=.*x4.ckpt was trained "
                                         r"with max_noise_level=250 .*set diffusion.max_noise_level=250 or None"):
        LDMTask(_x4_training_config(x4["path"], other, low_res_schedule=None), mesh)
    with pytest.raises(ValueError, match=r"diffusion.low_res_schedule=.*'beta_end': 0.02.* does not describe "
                                         r"init.checkpoint=.*x4.ckpt's low-res noise schedule .*'beta_end': 0.03"):
        LDMTask(_x4_training_config(x4["path"], other, max_noise_level=None), mesh)
    with pytest.raises(ValueError, match=r"x4.ckpt is a noise-augmented upscaler .*train it with diffusion.concat="
                                         r"'noise_augmented_low_res', got 'low_res'"):
        LDMTask(_x4_training_config(x4["path"], concat="low_res", conditioning="text"), mesh)
    bad = _x4_training_config(x4["path"])
    bad.first_stage.scale_factor = 0.18215
    with pytest.raises(ValueError, match=r"first_stage.scale_factor=0.18215 but init.checkpoint=.*x4.ckpt's "
                                         r"autoencoder .* scales its latents by 0.0833"):
        LDMTask(bad, mesh)
