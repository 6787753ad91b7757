"""tools/prompt_colours.py (the main job's prompt-following measure): foreground colour and naming."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import prompt_colours as pc  # noqa: E402


def _emoji(colour, background=(1.0, 1.0, 1.0)):
    image = np.ones((16, 16, 3)) * np.asarray(background)
    image[4:12, 4:12] = colour
    return image


def test_foreground_ignores_the_white_background():
    rgb = pc.foreground_mean_rgb(np.stack([_emoji((0.2, 0.4, 0.9)), np.ones((16, 16, 3))]))
    np.testing.assert_allclose(rgb[0], (0.2, 0.4, 0.9), atol=1e-12)
    np.testing.assert_allclose(rgb[1], (1.0, 1.0, 1.0))  # nothing but background: white


def test_prototypes_name_pure_colours():
    protos = pc.colour_prototypes()
    assert set(protos) == set(pc.COLOURS)
    named = pc.name_colours(np.array([[0.95, 0.15, 0.1], [0.2, 0.75, 0.2], [0.15, 0.45, 0.95], [1.0, 0.85, 0.1],
                                      [0.6, 0.2, 0.8]]), protos)
    assert named == ["red", "green", "blue", "yellow", "purple"]


def test_evaluate_scores_a_model_that_ignores_its_prompt_at_chance_level():
    """A stand-in pipeline that paints every sample blue: right only for the blue prompts."""
    class AlwaysBlue:
        def __call__(self, prompts, **kw):
            return np.stack([_emoji((0.2, 0.55, 0.9)) for _ in prompts])

    rows, accuracy, chance = pc.evaluate(AlwaysBlue(), n_samples=2)
    blue = [acc for prompt, _, _, acc in rows if "blue" in prompt]
    assert blue == [1.0, 1.0] and all(acc == 0.0 for prompt, _, _, acc in rows if "blue" not in prompt)
    assert accuracy == 2 / len(pc.COLOUR_PROMPTS) and chance == 1 / 6
