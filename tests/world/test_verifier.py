"""GenEval-lite verifier: exact on rendered ground truth, rejects wrong prompts, tolerates mild
noise and blur, and follows the documented rules."""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import pytest

from jdpt.world.scenes import (
    CATEGORIES,
    NUMBER_WORDS,
    PALETTE,
    RELATIONS,
    ObjectSpec,
    Prompt,
    ShapesConfig,
    parse_prompt,
    render,
    sample_prompts,
)
from jdpt.world.verifier import Verdict, _components, detect, geneval_lite_reward, verify

CONFIGS = {
    "32px": ShapesConfig(),
    "64px": ShapesConfig(image_size=64),
    "48px-grid4-7colours": ShapesConfig(image_size=48, grid=4, max_objects=6, colors=tuple(PALETTE)),
}
# Perturbations of ground truth that must keep GenEval-lite >= 0.95: Gaussian noise (std on the
# 0-255 scale), Gaussian blur (std in pixels), and both at once at milder levels.
NOISE_STD, BLUR_SIGMA, BOTH = 30.0, 1.2, (0.7, 20.0)


def _ground_truth(config, n=1500, seed=0):
    prompts = sample_prompts(seed, n, config)
    return prompts, render(prompts, seed + 1, config)


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def world(request):
    config = CONFIGS[request.param]
    return (config, *_ground_truth(config))


def test_ground_truth_scores_at_least_99_percent(world):
    config, prompts, images = world
    verdict = verify(images, prompts, config)
    summary = verdict.summary()
    assert set(summary) == {*CATEGORIES, "overall"}
    assert min(summary.values()) >= 0.99, summary
    assert verify(images, prompts, config, strict=True).summary()["overall"] >= 0.99
    # Detections match the scene exactly: as many objects as the prompt names.
    named = np.array([sum(o.count for o in p.objects) for p in prompts])
    assert (np.array([len(o) for o in verdict.objects]) == named).mean() >= 0.99


def _mutate(prompt: Prompt, config: ShapesConfig, rng) -> Prompt:
    """A prompt the scene rendered for ``prompt`` does not satisfy (scenes hold exactly the named
    objects): another shape, colour or count, the opposite or a crossed relation, or swapped
    colours."""
    objects, relation = list(prompt.objects), prompt.relation
    first = objects[0]
    absent_shapes = [s for s in config.shapes if s not in {o.shape for o in objects}]
    if prompt.category == "counting":
        other = [k for k in range(2, config.max_objects + 1) if k != first.count]
        objects[0] = dataclasses.replace(first, count=int(rng.choice(other)))
    elif prompt.category == "position":
        crossed = {"left of": ("above", "below"), "right of": ("above", "below"),
                   "above": ("left of", "right of"), "below": ("left of", "right of")}
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        relation = str(rng.choice([opposite[relation], *crossed[relation]]))
    elif prompt.category == "color_attr":
        objects = [dataclasses.replace(objects[0], color=objects[1].color),
                   dataclasses.replace(objects[1], color=objects[0].color)]
    elif prompt.category == "colors" and rng.random() < 0.5:
        other = [c for c in config.colors if c != first.color]
        objects[0] = dataclasses.replace(first, color=str(rng.choice(other)))
    else:  # single_object, two_object, colors: name a shape that is not in the scene
        k = int(rng.integers(len(objects)))
        objects[k] = dataclasses.replace(objects[k], shape=str(rng.choice(absent_shapes)))
    return Prompt("", prompt.category, tuple(objects), relation)


def test_wrong_prompts_score_at_most_5_percent(world):
    config, prompts, images = world
    rng = np.random.default_rng(0)
    wrong = [_mutate(p, config, rng) for p in prompts]
    summary = verify(images, wrong, config).summary()
    assert max(summary.values()) <= 0.05, summary


def _blur(images, sigma):
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma**2))
    taps /= taps.sum()
    out = images.astype(np.float32)
    size = out.shape[1]
    padded = np.pad(out, ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="edge")
    out = sum(t * padded[:, i : i + size] for i, t in enumerate(taps))
    padded = np.pad(out, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(t * padded[:, :, i : i + size] for i, t in enumerate(taps))


def _uint8(x):
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def test_robust_to_mild_noise_and_blur(world):
    config, prompts, images = world
    prompts, images = prompts[:400], images[:400]
    rng = np.random.default_rng(1)
    noisy = _uint8(images + NOISE_STD * rng.standard_normal(images.shape, np.float32))
    blurred = _uint8(_blur(images, BLUR_SIGMA))
    both = _uint8(_blur(images, BOTH[0]) + BOTH[1] * rng.standard_normal(images.shape, np.float32))
    for name, x in (("noise", noisy), ("blur", blurred), ("blur+noise", both)):
        summary = verify(x, prompts, config).summary()
        assert summary["overall"] >= 0.95, (name, summary)
    # Dimmed colours keep their direction in RGB: still the same colour.
    assert verify(_uint8(images * 0.7), prompts, config).summary()["overall"] >= 0.99


def test_rules_extra_objects_and_strict_mode():
    config = ShapesConfig()
    scene = render(["a red circle and a blue square"] * 20, 0, config)
    assert verify(scene, ["a red circle"] * 20, config).score.tolist() == [1.0] * 20  # GenEval: presence
    assert verify(scene, ["a red circle"] * 20, config, strict=True).score.tolist() == [0.0] * 20
    assert verify(scene, ["a blue square"] * 20, config).score.tolist() == [1.0] * 20
    assert verify(scene, ["a red square"] * 20, config).score.tolist() == [0.0] * 20
    counted = render(["three circles"] * 20, 0, config)
    assert verify(counted, ["two circles"] * 20, config).score.tolist() == [0.0] * 20  # exact count
    assert verify(counted, ["three circles"] * 20, config).score.tolist() == [1.0] * 20
    reward = geneval_lite_reward(scene, ["a red circle and a blue square"] * 20, config)
    assert reward.dtype == np.float32 and reward.tolist() == [1.0] * 20


def test_clutter_of_a_verdict():
    """Two objects drawn for one named: presence passes, strict fails, clutter counts both."""
    config = ShapesConfig()
    scene = render(["a red circle and a blue square"] * 4 + ["a red circle"] * 4, 0, config)
    verdict = verify(scene, ["a red circle"] * 8, config)
    assert verdict.score.tolist() == [1.0] * 8
    assert verdict.strict().score.tolist() == [0.0] * 4 + [1.0] * 4
    assert verdict.clutter() == {"objects_per_image": 1.5, "named_objects_per_prompt": 1.0, "strict_overall": 0.5}
    with pytest.raises(ValueError, match="make it with verify"):
        Verdict(np.ones(1, np.float32), ("colors",), ((),)).strict()


def test_position_uses_the_dominant_axis():
    config = ShapesConfig()
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 2:10, 2:10] = PALETTE["red"]  # a square in the top-left cell
    image[0, 12:20, 23:31] = PALETTE["green"]  # a square in the centre row, right column
    pair = (ObjectSpec("square", "red"), ObjectSpec("square", "green"))
    scores = [verify(image, [Prompt("", "position", pair, r)], config).score[0] for r in RELATIONS]
    assert scores == [1.0, 0.0, 0.0, 0.0]  # left of only: |dx| = 21 > |dy| = 10


def test_detect_merged_and_tiny_blobs():
    config = ShapesConfig()
    image = np.zeros((3, 32, 32, 3), np.uint8)
    image[0, 2:10, 2:18] = PALETTE["red"]  # two touching squares: a 2:1 box is no shape
    image[1, 5, 5] = image[1, 20, 7:9] = PALETTE["blue"]  # specks below the noise area
    image[2, 11:19, 11:19] = (200, 10, 30)  # an off-palette red square still reads as red
    found = detect(image, config)
    assert [(o.shape, o.color) for o in found[0]] == [(None, "red")]
    assert found[1] == []
    assert [(o.shape, o.color, o.center, o.area) for o in found[2]] == [("square", "red", (15.0, 15.0), 64)]


def _flood_fill_components(mask):
    """Reference 8-connected labelling by breadth-first search."""
    label, count = -np.ones(mask.shape, int), 0
    for start in zip(*np.nonzero(mask)):
        if label[start] >= 0:
            continue
        label[start], queue = count, deque([start])
        while queue:
            y, x = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    q = (y + dy, x + dx)
                    inside = 0 <= q[0] < mask.shape[0] and 0 <= q[1] < mask.shape[1]
                    if inside and mask[q] and label[q] < 0:
                        label[q] = count
                        queue.append(q)
        count += 1
    return label


@pytest.mark.parametrize("density", [0.2, 0.45, 0.6])
def test_components_match_flood_fill(density):
    masks = np.random.default_rng(0).random((6, 24, 31)) < density
    labels = _components(masks)
    for mask, label in zip(masks, labels):
        reference = _flood_fill_components(mask)
        pairs = set(zip(label[mask].tolist(), reference[mask].tolist()))
        assert len(pairs) == len(np.unique(label[mask])) == reference.max() + 1  # a bijection
        assert (label[~mask] == masks.size).all()


def test_summary_is_the_mean_of_category_means():
    categories = ("colors", "colors", "counting", "colors")
    verdict = Verdict(np.array([1, 0, 1, 1], np.float32), categories, ((),) * 4)
    summary = verdict.summary()
    assert summary == {"counting": 1.0, "colors": pytest.approx(2 / 3), "overall": pytest.approx(5 / 6)}
    assert list(summary)[:2] == ["counting", "colors"]  # CATEGORIES order


def test_errors_are_actionable():
    config = ShapesConfig()
    images = render(["a circle"], 0, config)
    with pytest.raises(ValueError, match="'hexagon'.*'triangle'"):
        verify(images, ["a hexagon"], config)
    with pytest.raises(ValueError, match="to_uint8"):
        verify(images.astype(np.float32), ["a circle"], config)
    with pytest.raises(ValueError, match="image_size=64"):
        verify(images, ["a circle"], ShapesConfig(image_size=64))
    with pytest.raises(ValueError, match="one prompt per image"):
        verify(images, ["a circle", "a square"], config)
    assert verify(np.zeros((2, 32, 32, 3), np.uint8), ["a circle", f"{NUMBER_WORDS[2]} squares"],
                  config).score.tolist() == [0.0, 0.0]
    assert parse_prompt("a circle", config).category == "single_object"
