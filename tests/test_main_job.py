"""The main job end to end (tools/demo.sh, the README's first command) at a reduced step count:
the emoji autoencoder, the text-to-image LDM on its precomputed latents with the text encoder
trained, then sample.py over a prompt file: PNGs with their metadata, the grid, the final line."""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_script_end_to_end(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("grinning face\nblue heart\n")
    work = tmp_path / "work"
    env = dict(os.environ, WORK=str(work), AE_STEPS="2", LDM_STEPS="3", SAMPLE_STEPS="2", PROMPTS=str(prompts),
               TFDS_DATA_DIR=str(tmp_path / "tfds"), PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    run = subprocess.run(["bash", "tools/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last == f"done: the images are in {work}/samples/samples/ and the grid is {work}/samples/grid.png"

    # Both stages trained and checkpointed; the LDM trained its text encoder on cached latents.
    assert os.listdir(work / "autoencoder" / "checkpoints") == ["2"]
    assert os.listdir(work / "ldm" / "checkpoints") == ["3"]
    config = json.loads((work / "ldm" / "config.json").read_text())
    assert config["text_encoder"]["trainable"] and config["data"]["precompute_latents"]
    assert (work / "ldm" / "latents" / "meta.json").is_file()
    steps = [json.loads(line)["step"] for line in (work / "ldm" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3

    files = sorted(os.listdir(work / "samples" / "samples"))
    assert files == [f"{i:05d}.png" for i in range(8)]  # 2 prompts x --n_samples 4
    for i, prompt in ((0, "grinning face"), (5, "blue heart")):
        image = Image.open(work / "samples" / "samples" / files[i])
        assert image.size == (32, 32)
        meta = image.text
        assert meta["prompt"] == prompt and meta["sampler"] == "ddim" and meta["steps"] == "2"
        assert meta["scale"] == "4.0" and meta["seed"].isdigit()
        assert np.asarray(image).std() > 0
    assert Image.open(work / "samples" / "grid.png").size[0] > 32
