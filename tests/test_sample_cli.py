"""sample.py: batch jobs on a tiny diffusers pipeline, restarts, metadata, bad input."""
import os

import numpy as np
import pytest
from PIL import Image

import ldm_jax
import sample as sample_cli
from ldm_jax.sampling_job import SamplingJob, run_sampling_job
from tiny_sd import tiny_sd_pipeline

H = W = 16


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd_cli")
    tiny_sd_pipeline(str(folder))
    return str(folder)


def _run(argv, capsys):
    code = sample_cli.main(argv)
    return code, capsys.readouterr()


def test_cli_writes_pngs_with_metadata_and_grid(sd_folder, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\na blue car\n")
    out = tmp_path / "out"
    code, cap = _run(["--checkpoint", sd_folder, "--from-file", str(prompts), "--n_samples", "2",
                      "--steps", "2", "--H", str(H), "--W", str(W), "--sampler", "euler", "--seed", "3",
                      "--outdir", str(out)], capsys)
    assert code == 0, cap.err
    files = sorted(os.listdir(out / "samples"))
    assert files == ["00000.png", "00001.png", "00002.png", "00003.png"]
    meta = Image.open(out / "samples" / "00002.png").text
    assert meta["prompt"] == "a blue car" and meta["seed"] == "4" and meta["sampler"] == "euler"
    assert meta["steps"] == "2" and meta["scale"] == "7.5"
    assert (out / "grid.png").is_file()
    assert "wrote 4 images" in cap.out


class _Interrupted(Exception):
    pass


def test_restarted_job_completes_without_rewriting(sd_folder, tmp_path):
    pipe = ldm_jax.load_pipeline(sd_folder)
    job = SamplingJob(prompts=["a cat", "a dog", "a fish"], n_samples=2, steps=2, height=H, width=W,
                      sampler="ddim", seed=10)
    calls = {"n": 0}

    def dying_pipe(*args, **kwargs):  # killed after two batches
        if calls["n"] == 2:
            raise _Interrupted
        calls["n"] += 1
        return pipe(*args, **kwargs)

    out = str(tmp_path / "job")
    with pytest.raises(_Interrupted):
        run_sampling_job(dying_pipe, job, out, progress=False)
    first = {f: open(os.path.join(out, "samples", f), "rb").read() for f in os.listdir(os.path.join(out, "samples"))}
    assert sorted(first) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert not any(f.endswith(".partial") for f in os.listdir(os.path.join(out, "samples")))

    rendered = []
    run_sampling_job(lambda *a, **k: rendered.append(a[0]) or pipe(*a, **k), job, out, progress=False)
    assert rendered == [["a fish", "a fish"]]  # only the missing batch
    after = {f: open(os.path.join(out, "samples", f), "rb").read() for f in os.listdir(os.path.join(out, "samples"))}
    assert len(after) == 6 and all(after[f] == first[f] for f in first)

    # The completed set equals an uninterrupted run.
    clean = str(tmp_path / "clean")
    run_sampling_job(pipe, job, clean, progress=False)
    for f in after:
        a = np.asarray(Image.open(os.path.join(out, "samples", f)))
        b = np.asarray(Image.open(os.path.join(clean, "samples", f)))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("argv_extra, message", [
    (["--prompt", "x", "--sampler", "heun"], "unknown sampler 'heun'"),
    (["--from-file", "/nonexistent/prompts.txt"], "prompt file not found"),
    (["--prompt", "x", "--H", "15"], "multiples of the autoencoder factor"),
    (["--prompt", "x", "--init-img", "IMG"], "init_image is 8x8 but height x width is 16x16"),
])
def test_bad_input_is_one_line_error(sd_folder, tmp_path, capsys, argv_extra, message):
    img = tmp_path / "small.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    argv_extra = [str(img) if a == "IMG" else a for a in argv_extra]
    out = tmp_path / "bad"
    code, cap = _run(["--checkpoint", sd_folder, "--H", str(H), "--W", str(W), "--steps", "1",
                      "--outdir", str(out)] + argv_extra, capsys)
    assert code != 0
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], cap.err
    assert not (out / "samples").exists() or not os.listdir(out / "samples")


def test_wrong_checkpoint_kind_is_one_line_error(tmp_path, capsys):
    bogus = tmp_path / "model.txt"
    bogus.write_text("not a model")
    code, cap = _run(["--checkpoint", str(bogus), "--prompt", "x"], capsys)
    assert code != 0 and cap.err.startswith("error: ") and len(cap.err.strip().splitlines()) == 1


def test_class_label_sampling_from_original_checkpoint(tmp_path, capsys):
    """A CompVis cin-style checkpoint (ClassEmbedder through cross-attention, VQ first stage)."""
    import torch
    from original_ckpt import first_stage, ldm_state_dict, save_ckpt, unet_model
    from test_original import AE, CIN_UNET, ldm_betas, yaml_path

    unet = unet_model(2, **CIN_UNET)
    first = first_stage(12, {**AE, "double_z": False, "z_channels": 3}, 3, n_embed=16)
    torch.manual_seed(3)
    sd = ldm_state_dict(unet, first, torch.nn.Embedding(11, 32), "cond_stage_model.embedding.",
                        betas=ldm_betas(0.0015, 0.0195))
    path = save_ckpt(str(tmp_path / "cin.ckpt"), sd)
    out = tmp_path / "cls"
    code, cap = _run(["--checkpoint", path, "--config", yaml_path("tiny-cin-ldm-vq.yaml"), "--class_label", "7",
                      "--n_samples", "2", "--steps", "2", "--scale", "3", "--outdir", str(out)], capsys)
    assert code == 0, cap.err
    meta = Image.open(out / "samples" / "00001.png").text
    assert meta["class_label"] == "7"
    code, cap = _run(["--checkpoint", path, "--config", yaml_path("tiny-cin-ldm-vq.yaml"), "--class_label", "11",
                      "--steps", "1", "--outdir", str(tmp_path / "bad")], capsys)
    assert code != 0 and "out of range" in cap.err


def test_png_levels_round_as_diffusers_numpy_to_pil():
    """The PNGs' uint8 levels (to_uint8) are diffusers' numpy_to_pil ones, halves to even: at the float32
    values x whose x * 255 is exactly k + 0.5, and at their neighbours a few ulps away. (The old
    x * 255 + 0.5 rounded the exact halves up, the only values where the two disagree: on AMD EPYC
    machines test_compvis_txt2img_flags saw one CLI pixel at 129 where the API image, rounded the
    diffusers way, had 128.)"""
    from diffusers.image_processor import VaeImageProcessor

    from ldm_jax.image_io import to_uint8

    halves = (np.arange(255, dtype=np.float64) + 0.5) / 255
    x = np.concatenate([halves.astype(np.float32), [-0.1, 0.0, 1.0, 1.1]]).astype(np.float32)
    for _ in range(3):  # neighbours 1-3 ulps away on each side
        x = np.unique(np.concatenate([x, np.nextafter(x, np.float32(2)), np.nextafter(x, np.float32(-1))]))
    x = np.concatenate([x, np.zeros((-len(x)) % 3, np.float32)])
    assert np.sum(x * np.float32(255) % 1 == 0.5) > 100  # the exact halves are there
    images = x.reshape(1, -1, 1, 3)
    want = np.asarray(VaeImageProcessor.numpy_to_pil(np.clip(images, 0, 1))[0])
    np.testing.assert_array_equal(to_uint8(images)[0], want)


def test_compvis_txt2img_flags(sd_folder, tmp_path, capsys):
    """--plms, --fixed_code, --n_rows, --skip_grid, --skip_save as CompVis txt2img.py: with --fixed_code
    every batch starts from the first batch's noise (PLMS is deterministic, so the batches' images are
    equal) and batch 0 is the API's pipe(seed=--seed) image; --n_rows is images per grid row."""
    base = ["--checkpoint", sd_folder, "--prompt", "a red apple", "--n_samples", "2", "--n_iter", "2", "--steps",
            "2", "--H", str(H), "--W", str(W), "--seed", "3", "--plms"]
    out = tmp_path / "fixed"
    code, cap = _run(base + ["--fixed_code", "--n_rows", "1", "--outdir", str(out)], capsys)
    assert code == 0, cap.err
    png = [np.asarray(Image.open(out / "samples" / f"{i:05d}.png")) for i in range(4)]
    np.testing.assert_array_equal(png[2], png[0])
    np.testing.assert_array_equal(png[3], png[1])
    assert np.abs(png[0].astype(int) - png[1]).max() > 0  # two noises within the batch
    meta = Image.open(out / "samples" / "00003.png").text
    assert meta["sampler"] == "plms" and meta["fixed_code"] == "3" and meta["seed"] == "4"
    pipe = ldm_jax.load_pipeline(sd_folder)
    api = pipe(["a red apple"] * 2, num_inference_steps=2, height=H, width=W, seed=3, sampler="plms")
    np.testing.assert_array_equal(png[0], (np.clip(api[0], 0, 1) * 255).round().astype(np.uint8))
    grid = Image.open(out / "grid.png")
    assert grid.size == (W + 4, 4 * (H + 2) + 2)  # one image per row
    # Without --fixed_code batch 1 has its own noise; the same outdir holds the fixed-code job's images.
    code, cap = _run(base + ["--outdir", str(out)], capsys)
    assert code == 2 and "another job (fixed_code" in cap.err
    free = tmp_path / "free"
    code, cap = _run(base + ["--outdir", str(free), "--skip_grid"], capsys)
    assert code == 0 and not (free / "grid.png").exists() and "grid" not in cap.out
    np.testing.assert_array_equal(np.asarray(Image.open(free / "samples" / "00000.png")), png[0])
    assert np.abs(np.asarray(Image.open(free / "samples" / "00002.png")).astype(int) - png[2]).max() > 0
    only_grid = tmp_path / "grid_only"
    code, cap = _run(base + ["--outdir", str(only_grid), "--skip_save"], capsys)
    assert code == 0 and os.listdir(only_grid) == ["grid.png"], cap.err
    assert Image.open(only_grid / "grid.png").size == (2 * (W + 2) + 2, 2 * (H + 2) + 2)
    assert "--skip_save" in cap.out
    nothing = tmp_path / "nothing"  # CompVis' speed-measurement mode
    code, cap = _run(base + ["--outdir", str(nothing), "--skip_save", "--skip_grid"], capsys)
    assert code == 0 and (not nothing.exists() or not os.listdir(nothing)) and "rendered 4 images" in cap.out


@pytest.mark.parametrize("argv_extra, message", [
    (["--fixed_code", "--init-img", "IMG"], "--fixed_code fixes text-to-image's initial noise"),
    (["--n_rows", "-1"], "--n_rows must be >= 0"),
])
def test_compvis_flag_errors(sd_folder, tmp_path, capsys, argv_extra, message):
    img = tmp_path / "in.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(img)
    argv_extra = [str(img) if a == "IMG" else a for a in argv_extra]
    out = tmp_path / "bad"
    code, cap = _run(["--checkpoint", sd_folder, "--prompt", "x", "--steps", "1", "--outdir", str(out)] + argv_extra,
                     capsys)
    assert code == 2 and cap.err.startswith("error: ") and message in cap.err, cap.err
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        sample_cli.parse_args(["--checkpoint", sd_folder, "--plms", "--sampler", "euler"])
    assert e.value.code == 2 and "--plms and --sampler euler disagree" in capsys.readouterr().err
