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
