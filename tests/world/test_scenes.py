"""The Shapes world: config validation, prompt grammar, tokenizer and renderer."""

from __future__ import annotations

import time

import jax
import numpy as np
import pytest

from jdpt.world.scenes import (
    BOS_ID,
    CATEGORIES,
    EOS_ID,
    PAD_ID,
    PALETTE,
    PROMPT_TOKENS,
    ObjectSpec,
    Prompt,
    ShapesConfig,
    parse_prompt,
    render,
    sample_pairs,
    sample_prompts,
    tokenize,
    vocabulary,
)

CONFIGS = [
    ShapesConfig(),
    ShapesConfig(image_size=64),
    ShapesConfig(image_size=48, grid=4, max_objects=6, colors=tuple(PALETTE)),
]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(colors=("red", "pink")), "'pink'"),
    (dict(colors=("red",)), "at least two"),
    (dict(shapes=("circle", "hexagon")), "'hexagon'"),
    (dict(grid=1), "grid=1"),
    (dict(max_objects=10, grid=4), "max_objects=10"),
    (dict(image_size=16), "image_size=16"),
    (dict(object_scale=(0.9, 0.5)), "object_scale"),
    (dict(category_weights=(1.0, 1.0)), "category_weights"),
])
def test_config_errors_name_the_bad_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        ShapesConfig(**kwargs)


def test_derived_geometry():
    assert ShapesConfig().cell_edges.tolist() == [0, 10, 21, 32]
    assert ShapesConfig().object_sizes == (7, 8)
    assert ShapesConfig(image_size=64).object_sizes == (17, 19)


def test_sample_prompts_deterministic_and_covers_categories():
    a = sample_prompts(3, 600)
    assert a == sample_prompts(3, 600)
    assert a != sample_prompts(4, 600)
    assert {p.category for p in a} == set(CATEGORIES)
    assert sample_prompts(jax.random.key(0), 50) == sample_prompts(jax.random.key(0), 50)
    only = sample_prompts(0, 200, categories=["counting", "position"])
    assert {p.category for p in only} == {"counting", "position"}
    weighted = sample_prompts(0, 200, ShapesConfig(category_weights=(0, 0, 0, 1, 0, 0)))
    assert {p.category for p in weighted} == {"colors"}
    with pytest.raises(ValueError, match="'shapes'"):
        sample_prompts(0, 5, categories=["shapes"])


def test_prompts_follow_the_grammar_rules():
    config = ShapesConfig()
    for p in sample_prompts(1, 2000, config):
        if len(p.objects) == 2:
            assert p.objects[0].shape != p.objects[1].shape, p
        if p.category == "color_attr":
            assert p.objects[0].color != p.objects[1].color, p
        if p.category == "counting":
            assert 2 <= p.objects[0].count <= config.max_objects
        assert (p.relation is not None) == (p.category == "position")
        assert (p.category in ("colors", "color_attr")) == all(o.color for o in p.objects)


@pytest.mark.parametrize("config", CONFIGS)
def test_parse_round_trips_every_sampled_prompt(config):
    for p in sample_prompts(0, 1000, config):
        assert parse_prompt(p.text, config) == p
        assert parse_prompt("  " + p.text.upper() + " ", config) == p


def test_parse_examples():
    assert parse_prompt("three triangles") == Prompt(
        "three triangles", "counting", (ObjectSpec("triangle", count=3),))
    assert parse_prompt("a circle left of a square") == Prompt(
        "a circle left of a square", "position", (ObjectSpec("circle"), ObjectSpec("square")), "left of")
    assert parse_prompt("a red circle and a green triangle").category == "color_attr"


@pytest.mark.parametrize("text,bad", [
    ("a pink circle", "pink"), ("a hexagon", "hexagon"), ("five circles", "five"),
    ("a white square", "white"),
])
def test_unknown_words_list_the_vocabulary(text, bad):
    with pytest.raises(ValueError) as info:
        parse_prompt(text)
    message = str(info.value)
    assert bad in message
    for word in ("red", "magenta", "circle", "triangles", "four", "left", "below"):
        assert f"'{word}'" in message


@pytest.mark.parametrize("text", [
    "circle a", "a circle and a circle", "a red circle and a square",
    "a red circle left of a blue square", "a red circle and a red square", "two circles and a square",
    "a circle left a square", "",
])
def test_ungrammatical_prompts_show_the_forms(text):
    with pytest.raises(ValueError, match="grammar's forms"):
        parse_prompt(text)


def test_tokenize_layout_and_vocabulary():
    config = ShapesConfig()
    vocab = vocabulary(config)
    assert len(set(vocab)) == len(vocab)
    assert (vocab[PAD_ID], vocab[EOS_ID], vocab[BOS_ID]) == ("<pad>", "<eos>", "<bos>")
    ids = tokenize(["a red circle and a green triangle", "two squares"], config)
    assert ids.dtype == np.int32 and ids.shape == (2, PROMPT_TOKENS)
    assert [vocab[i] for i in ids[0]] == ["<bos>", "a", "red", "circle", "and", "a", "green",
                                          "triangle", "<eos>"]
    assert ids[1].tolist() == [BOS_ID, vocab.index("two"), vocab.index("squares"), EOS_ID] + [PAD_ID] * 5
    assert tokenize("two squares", config, length=16).shape == (1, 16)
    texts = [p.text for p in sample_prompts(0, 2000, config)]
    ids = tokenize(texts, config)  # every grammar prompt fits in PROMPT_TOKENS
    assert ((ids == EOS_ID).sum(axis=1) == 1).all()
    assert (ids[:, 0] == BOS_ID).all()
    with pytest.raises(ValueError, match="'pink'.*'magenta'"):
        tokenize(["a pink circle"], config)
    with pytest.raises(ValueError, match="length >= 9"):
        tokenize(["a red circle and a green triangle"], config, length=8)
    with pytest.raises(ValueError, match="<eos>"):
        tokenize(["a <eos> circle"], config)


@pytest.mark.parametrize("config", CONFIGS)
def test_render_is_deterministic_and_stays_inside_cells(config):
    prompts = sample_prompts(0, 500, config)
    images = render(prompts, 7, config)
    size = config.image_size
    assert images.dtype == np.uint8 and images.shape == (500, size, size, 3)
    np.testing.assert_array_equal(images, render(prompts, 7, config))
    assert not np.array_equal(images, render(prompts, 8, config))
    np.testing.assert_array_equal(render(prompts, jax.random.key(1), config),
                                  render(prompts, jax.random.key(1), config))
    edges = config.cell_edges
    border = np.unique(np.concatenate([edges[:-1], edges[1:] - 1]))  # the one-pixel cell margins
    assert images[:, border].max() == 0 and images[:, :, border].max() == 0
    codes = images.astype(np.int32) @ np.array([65536, 256, 1])  # one int per RGB colour
    allowed = [(0, 0, 0), *(PALETTE[c] for c in config.colors)]
    assert np.isin(codes, np.array(allowed) @ np.array([65536, 256, 1])).all()


def _mask(image, colour):
    return (image == np.array(PALETTE[colour], np.uint8)).all(-1)


def _fill(mask):
    ys, xs = np.nonzero(mask)
    return len(ys) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def test_render_follows_the_spec():
    config = ShapesConfig()
    low, high = config.object_sizes
    prompts = [parse_prompt("a blue square", config)] * 50
    for image in render(prompts, 0, config):
        ys, xs = np.nonzero(image.any(-1))
        side = ys.max() - ys.min() + 1
        assert low <= side <= high and xs.max() - xs.min() + 1 == side
        assert len(ys) == side * side and _mask(image, "blue").sum() == len(ys)
    attributed = [parse_prompt("a red circle and a green triangle", config)] * 50
    for image in render(attributed, 0, config):
        red, green = _mask(image, "red"), _mask(image, "green")
        assert red.any() and green.any() and red.sum() + green.sum() == image.any(-1).sum()
        assert 0.5 < _fill(green) < 0.7 and 0.7 < _fill(red) < 0.9  # triangle ~1/2, circle ~pi/4
    # Position with colours (the spec allows them) to locate each object independently.
    for relation, axis, sign in [("left of", 1, 1), ("right of", 1, -1), ("above", 0, 1), ("below", 0, -1)]:
        spec = Prompt("", "position", (ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), relation)
        for image in render([spec] * 50, 1, config):
            a = np.array(np.nonzero(_mask(image, "red"))).mean(1)
            b = np.array(np.nonzero(_mask(image, "blue"))).mean(1)
            along, across = sign * (b - a)[axis], abs((b - a)[1 - axis])
            assert along > 5 and along > across


def test_counting_scenes_hold_exactly_the_count():
    config = ShapesConfig(colors=("red", "green"))
    for count in (2, 3, 4):
        prompt = parse_prompt(f"{['two', 'three', 'four'][count - 2]} squares", config)
        images = render([prompt] * 30, 0, config)
        low, high = config.object_sizes
        pixels = images.any(-1).sum(axis=(1, 2))
        assert (pixels >= count * low**2).all() and (pixels <= count * high**2).all()


def test_render_rejects_specs_outside_the_config():
    with pytest.raises(ValueError, match="max_objects"):
        render([Prompt("", "counting", (ObjectSpec("circle", count=5),))], 0)
    with pytest.raises(ValueError, match="white"):
        render([Prompt("", "colors", (ObjectSpec("circle", "white"),))], 0)


def test_sample_pairs_and_speed():
    prompts, images = sample_pairs(0, 100)
    rng = np.random.default_rng(0)
    assert prompts == sample_prompts(rng, 100)
    np.testing.assert_array_equal(images, render(prompts, rng))
    start = time.perf_counter()
    sample_pairs(1, 5000)
    assert time.perf_counter() - start < 5.0  # >= 1000 images/s even on a slow shared CPU
