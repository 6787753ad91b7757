"""Does a text-to-image model trained on the built-in emoji follow the colour named in a prompt?

    python tools/prompt_colours.py --checkpoint WORKDIR/ldm [--n_samples 8 --steps 25 --scale 4 --seed 0]

Samples ``--n_samples`` images for each prompt of ``COLOUR_PROMPTS`` (the colour word first:
"blue heart", "green apple", ...), takes the mean RGB of each image's foreground (pixels
not near the white background) and names its colour: the nearest of the colour
prototypes, each the mean foreground RGB of the training emoji whose caption contains
that colour word (skin tones and hair excluded). Prints a table (prompt, mean foreground
RGB, colours named, share named right) and the overall accuracy against chance
(1 / number of colours). A model that ignores its prompt scores about chance.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Sequence

import numpy as np

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")
COLOUR_PROMPTS = ("red apple", "green apple", "blue heart", "green heart", "yellow heart", "purple heart",
                  "orange heart", "large blue circle", "large yellow circle", "large red circle")
FOREGROUND_DISTANCE = 0.15  # RGB distance from white (in [0, 1]) beyond which a pixel is emoji, not background


def foreground_mean_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) in [0, 1] -> (N, 3) mean RGB of the non-white pixels (white if none)."""
    images = np.asarray(images, np.float64)
    fg = np.linalg.norm(1.0 - images, axis=-1) > FOREGROUND_DISTANCE
    out = np.ones((images.shape[0], 3))
    for i in range(images.shape[0]):
        if fg[i].any():
            out[i] = images[i][fg[i]].mean(axis=0)
    return out


def colour_prototypes(colours: Sequence[str] = COLOURS) -> Dict[str, np.ndarray]:
    """Mean foreground RGB of the training emoji whose caption names each colour."""
    from ldm_jax.data.emoji import load_asset

    data = load_asset()
    captions = [str(c) for c in data["captions"]]
    train = ~np.asarray(data["is_validation"], bool)
    protos = {}
    for colour in colours:
        idx = [i for i, c in enumerate(captions) if train[i] and colour in c.split()
               and "skin" not in c and "hair" not in c]
        if not idx:
            raise ValueError(f"no training emoji is named with the colour {colour!r}")
        protos[colour] = foreground_mean_rgb(data["images"][idx] / 255.0).mean(axis=0)
    return protos


def name_colours(rgb: np.ndarray, protos: Dict[str, np.ndarray]) -> List[str]:
    names = list(protos)
    table = np.stack([protos[n] for n in names])
    return [names[int(np.argmin(np.linalg.norm(table - c, axis=-1)))] for c in rgb]


def evaluate(pipe, prompts: Sequence[str] = COLOUR_PROMPTS, n_samples: int = 8, steps: int = 25,
             scale: float = 4.0, seed: int = 0, sampler: str = "ddim"):
    """Rows (prompt, mean foreground RGB, colours named, accuracy) and the overall accuracy."""
    protos = colour_prototypes()
    rows, hits, total = [], 0, 0
    for prompt in prompts:
        wanted = prompt.split()[1] if prompt.startswith("large ") else prompt.split()[0]
        images = np.asarray(pipe([prompt] * n_samples, num_inference_steps=steps, guidance_scale=scale,
                                 seed=seed, sampler=sampler))
        rgb = foreground_mean_rgb(images)
        named = name_colours(rgb, protos)
        right = sum(n == wanted for n in named)
        hits, total = hits + right, total + len(named)
        rows.append((prompt, rgb.mean(axis=0), named, right / len(named)))
    return rows, hits / total, 1.0 / len(protos)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="train.py workdir of a text-to-image emoji LDM")
    parser.add_argument("--n_samples", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="ddim")
    args = parser.parse_args(argv)

    import ldm_jax

    pipe = ldm_jax.load_pipeline(args.checkpoint)
    rows, accuracy, chance = evaluate(pipe, n_samples=args.n_samples, steps=args.steps, scale=args.scale,
                                      seed=args.seed, sampler=args.sampler)
    print(f"| prompt | mean foreground RGB | colours named ({args.n_samples} samples) | right |")
    print("|---|---|---|---|")
    for prompt, rgb, named, acc in rows:
        counts = ", ".join(f"{c} {named.count(c)}" for c in COLOURS if named.count(c))
        print(f"| {prompt} | ({rgb[0]:.2f}, {rgb[1]:.2f}, {rgb[2]:.2f}) | {counts} | {acc:.2f} |")
    print(f"colour named in the prompt: {accuracy:.3f} of the samples (chance {chance:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
