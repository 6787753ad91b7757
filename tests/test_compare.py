"""python -m ldm_jax.compare on a tiny random diffusers pipeline."""
import pytest

from ldm_jax import compare
from tiny_sd import tiny_sd_pipeline


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_compare_reports_small_errors(tmp_path, capsys, sampler):
    folder = str(tmp_path / "sd")
    tiny_sd_pipeline(folder)
    code = compare.main(["--checkpoint", folder, "--steps", "3", "--sampler", sampler, "--H", "16", "--W", "16",
                         "--outdir", str(tmp_path / "cmp"), "--negative_prompt", "blurry"])
    out = capsys.readouterr().out
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:3]]
    assert all(float(row[1]) < 2e-3 for row in rows), out
    step_errors = [float(x) for x in out.split("latents: ")[1].splitlines()[0].split()]
    assert len(step_errors) >= 3 and max(step_errors) < 1e-3, out
    assert "images/s" in out and (tmp_path / "cmp" / "side_by_side.png").is_file()


def test_compare_rejects_unknown_sampler(tmp_path, capsys):
    assert compare.main(["--checkpoint", str(tmp_path), "--sampler", "heun"]) == 2
    assert "unknown sampler" in capsys.readouterr().err


def _exit_code(argv):
    try:
        return compare.main(argv)
    except SystemExit as e:  # argparse's errors exit
        return e.code


@pytest.mark.parametrize("argv, fragment", [
    (["--steps", "two"], "--steps"),                 # argparse: was the whole usage, then the error
    (["--nonsense"], "--nonsense"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),  # was a ZeroDivisionError traceback after both runs
    (["--scale", "nan"], "--scale must be a finite"),
])
def test_bad_flags_are_one_line_before_loading(tmp_path, capsys, argv, fragment):
    # The checkpoint does not exist: the flag's error must come first, before anything is loaded.
    code = _exit_code(["--checkpoint", str(tmp_path / "missing"), "--outdir", str(tmp_path / "cmp")] + argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "cmp").exists()
