"""sample.py against the Python API: the CLI must write exactly what ``pipe(...)`` returns for the same
arguments (seeds advancing per batch, prompts read from a file, images and masks read from files), and
every bad input must be one ``error:`` line naming the flag or file, exit code 2, nothing written."""
import os

import numpy as np
import pytest
from PIL import Image

import ldm_jax
import sample as sample_cli
from ldm_jax import sampling_job
from ldm_jax.image_io import to_uint8
from tiny_sd import tiny_sd_pipeline

_STEPS = ["--steps", "2", "--sampler", "euler_a", "--n_samples", "2"]  # one compiled program for the file


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny_sd_sweep"))
    tiny_sd_pipeline(folder)
    return folder, ldm_jax.load_pipeline(folder)


@pytest.fixture
def cli(sd, monkeypatch, capsys):
    """Run sample.py in-process on the module's loaded pipeline (no reload, shared compilations);
    returns (exit code, stdout, stderr, the dtype the CLI asked for)."""
    folder, pipe = sd
    asked = {}

    def load(path, config=None, dtype="float32", **kw):
        asked["dtype"] = dtype
        return pipe

    monkeypatch.setattr(ldm_jax, "load_pipeline", load)

    def run(argv):
        try:
            code = sample_cli.main(["--checkpoint", folder] + argv)
        except SystemExit as e:  # argparse's errors (sys.exit(2) after one line, see sample._Parser)
            code = e.code
        cap = capsys.readouterr()
        return code, cap.out, cap.err, asked.get("dtype")

    return run


def _png(outdir, n):
    return np.asarray(Image.open(os.path.join(outdir, "samples", f"{n:05d}.png")))


def _one_line_error(code, err, fragment):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err


def test_help_documents_every_flag():
    parser_actions = []
    orig = sample_cli.argparse.ArgumentParser.parse_args
    try:  # collect the parser's actions through the CLI's own parse_args
        def grab(self, args=None, namespace=None):
            parser_actions.extend(self._actions)
            return orig(self, args, namespace)
        sample_cli.argparse.ArgumentParser.parse_args = grab
        sample_cli.parse_args(["--checkpoint", "x"])
    finally:
        sample_cli.argparse.ArgumentParser.parse_args = orig
    assert sample_cli.parse_args(["--checkpoint", "x", "--precision", "autocast"]).dtype == "bfloat16"
    assert sample_cli.parse_args(["--checkpoint", "x", "--precision", "full"]).dtype == "float32"
    assert sample_cli.parse_args(["--checkpoint", "x"]).dtype == "float32"
    undocumented = [a.option_strings for a in parser_actions if a.help in (None, "") and a.dest != "help"]
    assert not undocumented
    flags = {s for a in parser_actions for s in a.option_strings}
    assert {"--checkpoint", "--prompt", "--from-file", "--steps", "--sampler", "--seed", "--scale", "--n_samples",
            "--n_iter", "--outdir", "--H", "--W", "--init-img", "--mask", "--strength", "--eta",
            "--negative_prompt", "--dtype", "--precision"} <= flags


def test_prompt_file_seeds_and_batches_equal_the_api(sd, cli, tmp_path):
    """Batch b (prompt b // n_iter) is pipe([prompt] * n_samples, seed=seed + b); the file is UTF-8 with a
    byte-order mark, blank and indented lines, unicode and an over-long prompt (truncated as the API does)."""
    _, pipe = sd
    long = " ".join(["word"] * 120)
    prompts = ["a red apple", "ünïcødé 猫", long]
    path = tmp_path / "prompts.txt"
    path.write_bytes(("a red apple\r\n\n   \n  ünïcødé 猫  \n" + long + "\n").encode("utf-8-sig"))
    out = str(tmp_path / "out")
    code, stdout, err, dtype = cli(["--from-file", str(path), "--n_iter", "2", "--seed", "5", "--scale", "3",
                                    "--negative_prompt", "blurry", "--H", "16", "--W", "16", "--eta", "0.5",
                                    "--outdir", out] + _STEPS)
    assert code == 0, err
    for b in range(6):
        prompt = prompts[b // 2]
        want = to_uint8(pipe([prompt] * 2, negative_prompt="blurry", num_inference_steps=2, guidance_scale=3.0,
                             height=16, width=16, seed=5 + b, sampler="euler_a", eta=0.5))
        for k in range(2):
            np.testing.assert_array_equal(_png(out, 2 * b + k), want[k], err_msg=f"batch {b} image {k}")
            meta = Image.open(os.path.join(out, "samples", f"{2 * b + k:05d}.png")).text
            assert (meta["prompt"], meta["seed"], meta["index_in_batch"]) == (prompt, str(5 + b), str(k))
    grid = np.asarray(Image.open(os.path.join(out, "grid.png")))
    assert grid.shape == (6 * 18 + 2, 2 * 18 + 2, 3)
    np.testing.assert_array_equal(grid[2 + 18:2 + 18 + 16, 2 + 18:2 + 18 + 16], _png(out, 3))
    assert sorted(os.listdir(os.path.join(out, "samples"))) == [f"{n:05d}.png" for n in range(12)]


def test_inpainting_files_read_as_the_api_reads_them(sd, cli, tmp_path):
    """An RGBA PNG init image (alpha dropped), non-square, and an RGB JPEG mask (grayscale, binarised)."""
    _, pipe = sd
    rng = np.random.default_rng(0)
    init = tmp_path / "init.png"
    Image.fromarray(rng.integers(0, 256, (16, 24, 4), dtype=np.uint8), "RGBA").save(init)
    mask = np.zeros((16, 24), np.uint8)
    mask[4:12, 6:18] = 255
    mask_path = tmp_path / "mask.jpg"
    Image.fromarray(mask).convert("RGB").save(mask_path)
    out = str(tmp_path / "out")
    code, _, err, _ = cli(["--prompt", "a cat", "--init-img", str(init), "--mask", str(mask_path),
                           "--strength", "0.9", "--seed", "2", "--outdir", out] + _STEPS)
    assert code == 0, err
    want = to_uint8(pipe(["a cat"] * 2, num_inference_steps=2, sampler="euler_a", seed=2, init_image=str(init),
                         mask=str(mask_path), strength=0.9))
    assert want.shape == (2, 16, 24, 3)
    for k in range(2):
        np.testing.assert_array_equal(_png(out, k), want[k])


def _files(outdir):
    folder = os.path.join(outdir, "samples")
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


@pytest.mark.parametrize("change, key", [
    (["--prompt", "a dog"], "prompt"), (["--seed", "1"], "seed"), (["--n_samples", "1"], "batch_size"),
    (["--scale", "2"], "scale"), (["--negative_prompt", "x"], "negative_prompt"), (["--H", "8"], "--H"),
])
def test_rerun_completes_the_same_job_and_refuses_another(cli, tmp_path, change, key):
    out = str(tmp_path / "out")
    job = ["--prompt", "a cat", "--H", "16", "--W", "16", "--outdir", out] + _STEPS
    assert cli(job)[0] == 0
    first = _files(out)
    code, out_text, err, _ = cli(job + ["--n_iter", "2"])  # the same job, one more batch: only that one is rendered
    assert code == 0, err
    assert "wrote 2 images (2 more from an earlier run of this job)" in out_text
    assert len(_files(out)) == 4 and all(_files(out)[f] == first[f] for f in first)
    # Another job in the same folder: its images would silently be the first job's.
    code, _, err, _ = cli(job + change)
    _one_line_error(code, err, "was written by another job")
    assert key in err and len(_files(out)) == 4


def test_interrupt_and_write_failure_leave_only_complete_files(sd, cli, tmp_path, monkeypatch):
    _, pipe = sd
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return pipe(*args, **kwargs)

    monkeypatch.setattr(ldm_jax, "load_pipeline", lambda *a, **k: dying)
    out = str(tmp_path / "out")
    job = ["--prompt", "a cat", "--H", "16", "--W", "16", "--n_iter", "2", "--outdir", out] + _STEPS
    try:
        code, _, err, _ = cli(job)
    except KeyboardInterrupt:  # (uncaught, it would also stop pytest)
        pytest.fail("sample.py let KeyboardInterrupt escape (a traceback)")
    assert code == 130 and err.strip().splitlines()[-1].startswith("error: interrupted"), err
    assert sorted(_files(out)) == ["00000.png", "00001.png"]

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sampling_job.os, "replace", full_disk)
    code, _, err, _ = cli(job)
    _one_line_error(code, err, "No space left on device")
    assert sorted(os.listdir(os.path.join(out, "samples"))) == ["00000.png", "00001.png"]  # no .partial


def test_error_raised_by_the_pipeline_is_the_only_output(sd, cli, tmp_path, monkeypatch):
    """No progress bar before the first batch: a refusal by the API stays one line."""
    def refusing(*args, **kwargs):
        raise ValueError("refused by the pipeline")

    monkeypatch.setattr(ldm_jax, "load_pipeline", lambda *a, **k: refusing)
    out = tmp_path / "out"
    code, _, err, _ = cli(["--prompt", "x", "--outdir", str(out)] + _STEPS)
    _one_line_error(code, err, "refused by the pipeline")
    assert not out.exists()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    files = {"DIR": str(d)}
    for name, shape in (("small", (8, 8, 3)), ("odd", (15, 16, 3)), ("good", (16, 16, 3))):
        files[name.upper()] = str(d / f"{name}.png")
        Image.fromarray(np.zeros(shape, np.uint8)).save(files[name.upper()])
    files["NOTIMG"] = str(d / "notimg.png")
    open(files["NOTIMG"], "w").write("not a png")
    files["LATIN1"] = str(d / "latin1.txt")
    open(files["LATIN1"], "wb").write("caf\xe9\n".encode("latin-1"))
    files["PROMPTS"] = str(d / "prompts.txt")
    open(files["PROMPTS"], "w").write("a\n")
    files["AFILE"] = str(d / "afile")
    open(files["AFILE"], "w").write("x")
    return files


@pytest.mark.parametrize("argv, fragment", [
    (["--init-img", "NOTIMG"], "--init-img NOTIMG"),                       # was a PIL traceback
    (["--init-img", "GOOD", "--mask", "NOTIMG"], "--mask NOTIMG"),         # was a PIL traceback
    (["--init-img", "SMALL", "--H", "16"], "--init-img SMALL"),
    (["--init-img", "ODD"], "--init-img ODD"),                             # was "height and width must be ..."
    (["--init-img", "GOOD", "--mask", "SMALL"], "--mask SMALL"),
    (["--init-img", "/nonexistent.png"], "--init-img file not found"),     # was "--init-image"
    (["--init-img", "GOOD", "--strength", "0.4"], "--strength"),           # int(2 * 0.4) = 0 steps
    (["--strength", "0.5"], "--strength is the img2img"),                  # was silently ignored
    (["NOPROMPT", "--from-file", "LATIN1"], "--from-file LATIN1"),
    (["--from-file", "PROMPTS"], "not both"),                              # --prompt was silently ignored
    (["--H", "-2"], "--H"),
    (["--scale", "nan"], "--scale"),
    (["--eta", "nan"], "--eta"),
    (["--seed", str(2 ** 64 - 1), "--n_iter", "2"], "--seed"),
    (["--sampler", "heun"], "--sampler"),
    (["--class_label", "3"], "--class_label"),
    (["--steps", "two"], "--steps"),                                       # argparse: usage + error, 2+ lines
    (["--precision", "full", "--dtype", "bfloat16"], "--precision"),
    (["--outdir", "AFILE"], "--outdir"),                                   # was NotADirectoryError traceback
    (["--outdir", "AFILE/sub"], "--outdir"),
    (["--outdir", "/proc/self/none/out"], "--outdir"),
])
def test_bad_input_is_one_line_naming_the_flag(cli, bad_files, tmp_path, argv, fragment):
    prompt = [] if "NOPROMPT" in argv else ["--prompt", "a cat"]
    argv = prompt + ["--outdir", str(tmp_path / "out")] + _STEPS + [a for a in argv if a != "NOPROMPT"]
    for name, path in bad_files.items():
        argv = [a.replace(name, path) if a.startswith(name) else a for a in argv]
        fragment = fragment.replace(name, path)
    code, _, err, _ = cli(argv)
    _one_line_error(code, err, fragment)
    assert not (tmp_path / "out").exists()


def test_inpainting_model_needs_init_and_mask(tmp_path, capsys):
    folder = str(tmp_path / "inpaint")
    tiny_sd_pipeline(folder, unet_in_channels=9)
    capsys.readouterr()  # (diffusers' own messages while saving)
    code = sample_cli.main(["--checkpoint", folder, "--prompt", "x", "--outdir", str(tmp_path / "out")] + _STEPS)
    _one_line_error(code, capsys.readouterr().err, "inpainting model: give --init-img and --mask")
    assert not (tmp_path / "out").exists()
