"""The Shapes-world base model: CI's reduced pretraining learns, the cache is reused and guarded,
and the CLI's demo and sample commands work on a cached model."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdpt import cli
from jdpt.models.flux import image_ids, unpack_latents
from jdpt.world.cache import PRESETS, CacheError, base_model, load_model, model_dir, save_model
from jdpt.world.model import WorldConfig, WorldModel
from jdpt.world.evaluation import eval_prompts, evaluate
from jdpt.parallel.step import Frozen
from jdpt.world.pretraining import PretrainConfig, pretraining_objective
from jdpt.world.scenes import render

# GenEval-lite of CI's reduced pretraining (2500 steps of 32 pairs: 47 s alone on 2 cores, 70 s
# inside the suite; measured 0.099 overall and 0.156 on single objects with 32 prompts per
# category, no guidance; standard errors about 0.02 and 0.06). A random model scores 0 (checked
# below), so these floors prove the pipeline learns while leaving room for run-to-run noise.
OVERALL_FLOOR = 0.05
SINGLE_OBJECT_FLOOR = 0.06


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("jdpt-cache")
    model, meta = base_model("ci", cache_dir=root, progress=False)
    return root, model, meta


def test_ci_pretraining_learns(cached):
    _, _, meta = cached
    assert meta["history"]["seconds"] < 120, "CI pretraining must stay under 2 minutes"
    losses = meta["history"]["loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    scores = meta["eval"]
    assert scores["overall"] >= OVERALL_FLOOR, scores
    assert scores["single_object"] >= SINGLE_OBJECT_FLOOR, scores


def test_untrained_model_scores_zero():
    world = PRESETS["ci"][0]
    prompts = eval_prompts(4, world)
    _, verdict = evaluate(WorldModel(world, rngs=nnx.Rngs(0)), prompts, steps=4, batch_size=24, progress=False)
    assert verdict.summary()["overall"] <= 0.05


def test_cache_is_reused_not_retrained(cached):
    root, model, meta = cached
    again, meta2 = base_model("ci", cache_dir=root, progress=False)
    assert meta2["history"] == meta["history"]
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), nnx.state(model, nnx.Param), nnx.state(again, nnx.Param))
    assert all(jax.tree.leaves(same))


def test_cache_of_another_config_is_an_error(cached):
    root, _, _ = cached
    stored = PRESETS["ci"][1]
    other = dataclasses.replace(stored, steps=stored.steps + 1)
    with pytest.raises(CacheError, match=rf"pretrain\.steps: stored {stored.steps}, wanted {stored.steps + 1}"
                                         r"\)\. It is not retrained over"):
        base_model("ci", cache_dir=root, train=other, progress=False)


def test_unwritable_cache_is_an_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CacheError, match="cannot write the model cache.*JDPT_CACHE"):
        base_model("ci", cache_dir=blocker / "cache", progress=False)


def test_folder_without_model_is_an_error(tmp_path):
    directory = model_dir("ci", tmp_path)
    directory.mkdir(parents=True)
    (directory / "stray.txt").write_text("x")
    with pytest.raises(CacheError, match="not empty but holds no world.json"):
        base_model("ci", cache_dir=tmp_path, progress=False)
    with pytest.raises(CacheError, match="world.json is missing"):
        load_model(directory)


def test_save_refuses_an_existing_folder(cached, tmp_path):
    _, model, _ = cached
    (tmp_path / "taken").mkdir()
    with pytest.raises(CacheError, match="exists"):
        save_model(model, tmp_path / "taken", train=PRESETS["ci"][1], info={})


def test_unknown_preset_and_bad_configs():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*'ci', 'default'"):
        base_model("huge")
    with pytest.raises(ValueError, match="head size must be a multiple of 8"):
        WorldConfig(width=100, heads=4)
    with pytest.raises(ValueError, match="multiple of 2 \\* pixel_factor"):
        WorldConfig(pixel_factor=3)
    with pytest.raises(ValueError, match="uncond_prob"):
        PretrainConfig(uncond_prob=1.0)


def test_generation_is_deterministic_and_guided(cached):
    _, model, _ = cached
    ids = model.tokenize(["a red circle", "two squares"])
    key = jax.random.key(3)
    a = np.asarray(model.generate(ids, key, steps=4, cfg_scale=4.0))
    b = np.asarray(model.generate(ids, key, steps=4, cfg_scale=4.0))
    c = np.asarray(model.generate(ids, key, steps=4, cfg_scale=1.0))
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c).max() > 0  # guidance changes the samples
    with pytest.raises(ValueError, match="unknown word.*vocabulary"):
        model.tokenize(["a purple hexagon"])


def test_cli_demo_and_sample(cached, tmp_path, capsys):
    root, _, _ = cached
    out = tmp_path / "demo"
    assert cli.main(["demo", "--preset", "ci", "--cache", str(root), "--out", str(out),
                     "--per-category", "4", "--steps", "8", "--post-train", "none"]) == 0
    report = json.loads((out / "scores.json").read_text())
    assert set(report["geneval_lite"]) == {"single_object", "two_object", "counting", "colors",
                                           "position", "color_attr", "overall"}
    assert (out / "grid.png").stat().st_size > 0
    assert "overall" in capsys.readouterr().out
    png = tmp_path / "one.png"
    assert cli.main(["sample", "--model", str(model_dir("ci", root)), "--prompt", "a blue square",
                     "--out", str(png), "--n", "2", "--steps", "4"]) == 0
    from PIL import Image

    assert Image.open(png).size == (64, 32)


def test_sample_prediction_world_samples_along_its_velocity():
    """A world whose Flux predicts x0: ``generate`` is the Euler ODE over ``model(...)``'s
    velocity (x_t - x0_hat) / sigma, written out step by step here."""
    world = WorldConfig(width=32, heads=2, text_layers=1, double_layers=1, single_layers=0,
                        pixel_factor=4, prediction="sample")
    model = world.build(nnx.Rngs(0))
    ids = model.tokenize(["a red circle", "two squares"])
    latents = jax.random.normal(jax.random.key(1), (2, 16, 4 * 48))  # 8x8 latent pixels, 2x2 per token
    images = np.asarray(model.generate(ids, None, steps=3, latents=latents))
    context, pooled = model.encode_prompts(ids)
    x = latents
    sigmas = np.linspace(1.0, 1 / 3, 3).tolist() + [0.0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0_hat = model.transformer(x, context, pooled, jnp.full((2,), s), image_ids(8, 8), jnp.zeros((9, 3)))
        x = x + (s_next - s) * (x - x0_hat) / s
    pixels = world.codec().decode_latents(unpack_latents(x, 8, 8))
    expected = np.round(np.clip(np.asarray(pixels) / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
    assert np.abs(images.astype(int) - expected).max() <= 1
    with pytest.raises(ValueError, match="prediction='eps'"):
        WorldConfig(prediction="eps")


@pytest.mark.parametrize("noise_mean,sigma", [(40.0, 1.0), (-40.0, 0.0)])
def test_training_noise_levels_follow_noise_mean(noise_mean, sigma):
    """The pretraining objective (SFT through the world's adapter) draws sigma = sigmoid(noise_mean
    + N(0, 1)): a far-off mean pins every level to 1 (pure noise) or 0 (clean), where the loss is
    written out here."""
    world = WorldConfig(width=32, heads=2, text_layers=1, double_layers=1, single_layers=0,
                        pixel_factor=4, prediction="sample", noise_mean=noise_mean)
    model = world.build(nnx.Rngs(0))
    prompts = ["a red circle", "two squares"]
    images = render(prompts, 0, world.shapes)
    ids, key = model.tokenize(prompts), jax.random.key(5)
    x0 = model.latents(images)
    eps = jax.random.normal(jax.random.split(key)[1], x0.shape)
    x_t = (1 - sigma) * x0 + sigma * eps
    context, pooled = model.encode_prompts(ids)
    want = jnp.mean((model(x_t, jnp.full((2,), sigma), context, pooled) - (eps - x0)) ** 2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss, _ = pretraining_objective(world).loss(params, Frozen(graphdef, rest),
                                                {"x0": world.latents(images), "cond": {"input_ids": ids}}, key)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
