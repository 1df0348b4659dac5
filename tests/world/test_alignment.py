"""Shapes-world post-training as a library call (``jdpt.world.post_train``): the differentiable
colour-mass reward against an independent NumPy version and against rendered ground truth, the
settings' and the call's errors, one short LoRA run on a tiny random model, and (slow) ``jdpt demo``
with its post-training stage on the ``ci`` base model."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdpt import cli
from jdpt.world import AlignSettings, WorldConfig, WorldModel, post_train
from jdpt.world.alignment import reward_description
from jdpt.world.alignment_runs import OfflineData, make_offline_data, online_method
from jdpt.world.cache import PRESETS
from jdpt.world.colour_mass import colour_mass_reward, mass_targets, object_areas
from jdpt.world.evaluation import eval_prompts
from jdpt.world.scenes import CATEGORIES, PALETTE, ShapesConfig, parse_prompt, render
from jdpt.world.verifier import verify

SHAPES = ShapesConfig()


# --- the soft colour-mass reward ------------------------------------------------------------

def numpy_colour_mass(images, target, named, total, colors, t_fg=0.05, t_col=0.05):
    """The docstring's formula in float64, written out pixel by pixel per colour."""
    x = np.clip(np.asarray(images, np.float64) / 2 + 0.5, 0, 1)
    fg = 1 / (1 + np.exp(-(x.max(-1) - 0.5) / t_fg))
    dirs = np.array([PALETTE[c] for c in colors], np.float64)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    cos = np.einsum("bhwc,kc->bhwk", x, dirs) / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-6)
    e = np.exp((cos - cos.max(-1, keepdims=True)) / t_col)
    share = e / e.sum(-1, keepdims=True)
    mass = (fg[..., None] * share).sum(axis=(1, 2))
    s = lambda d: np.sqrt(d**2 + 1) - 1  # noqa: E731
    return -((named * s(mass - target)).sum(-1) + s(mass.sum(-1) - total)) / total


def test_colour_mass_reward_matches_numpy():
    """Random images and targets: |jax (fp32) - numpy (fp64)| <= 1e-4 relative."""
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 12, 12, 3)).astype(np.float32)
    k = len(SHAPES.colors)
    targets = {"mass_target": rng.uniform(0, 60, (3, k)).astype(np.float32),
               "mass_named": (rng.random((3, k)) < 0.4).astype(np.float32),
               "mass_total": rng.uniform(30, 90, 3).astype(np.float32)}
    got = colour_mass_reward(jnp.asarray(images), targets, SHAPES.colors)
    want = numpy_colour_mass(images, *targets.values(), SHAPES.colors)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
    grad = jax.grad(lambda im: colour_mass_reward(im, targets, SHAPES.colors).sum())(jnp.asarray(images))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0


def test_mass_targets_closed_form():
    prompts = [parse_prompt(t, SHAPES) for t in ("a red circle and a blue square", "three triangles", "a green square")]
    areas = {"circle": 40.0, "square": 50.0, "triangle": 30.0}
    got = mass_targets(prompts, SHAPES, areas)
    red, blue, green = (SHAPES.colors.index(c) for c in ("red", "blue", "green"))
    np.testing.assert_array_equal(got["mass_total"], [90.0, 90.0, 50.0])
    want_target = np.zeros((3, len(SHAPES.colors)), np.float32)
    want_target[0, red], want_target[0, blue], want_target[2, green] = 40.0, 50.0, 50.0
    np.testing.assert_array_equal(got["mass_target"], want_target)
    np.testing.assert_array_equal(got["mass_named"], (want_target > 0).astype(np.float32))
    with pytest.raises(ValueError, match="no object area for shape 'triangle'"):
        mass_targets(prompts, SHAPES, {"circle": 40.0, "square": 50.0})


def test_colour_mass_reward_prefers_ground_truth_scenes():
    """Rendered scenes of a prompt score higher than scenes of a prompt with another colour or
    count, for each of 5 seeds (the surrogate ranks what the verifier checks for colour/count)."""
    areas = object_areas(SHAPES)
    # 7-8 pixel objects: a square fills its box (49-64 px), a circle ~pi/4 of it, a triangle ~half
    assert 49 <= areas["square"] <= 64 and areas["triangle"] < areas["circle"] < areas["square"]
    pairs = [("a red circle", "a blue circle"), ("a green square", "a green square and a red circle"),
             ("three triangles", "a triangle"), ("two circles", "four circles"),
             ("a red circle and a blue square", "a red circle and a green square")]
    for seed in range(5):
        right = render([p for p, _ in pairs], seed, SHAPES)
        wrong = render([q for _, q in pairs], seed + 100, SHAPES)
        targets = mass_targets([parse_prompt(p, SHAPES) for p, _ in pairs], SHAPES, areas)
        to_float = lambda im: jnp.asarray(im, jnp.float32) / 127.5 - 1  # noqa: E731
        r_right = np.asarray(colour_mass_reward(to_float(right), targets, SHAPES.colors))
        r_wrong = np.asarray(colour_mass_reward(to_float(wrong), targets, SHAPES.colors))
        assert np.all(r_right > r_wrong + 0.2) and np.all(r_right > -0.5), (seed, r_right, r_wrong)


# --- settings and errors --------------------------------------------------------------------

TINY = WorldConfig(width=32, heads=2, text_layers=1, double_layers=1, single_layers=0)
QUICK = AlignSettings(prompts_per_step=1, group_size=2, rollout_steps=2, lora_rank=2, offline_prompts=2,
                      offline_samples=2, probes=1)


def test_settings_and_arguments_are_checked():
    with pytest.raises(ValueError, match="group_size=1 must be >= 2"):
        AlignSettings(group_size=1)
    with pytest.raises(ValueError, match="rollout_steps=0 must be >= 1"):
        AlignSettings(rollout_steps=0)
    AlignSettings(offline_prompts=0, seed=-3)  # no offline data is fine; any seed is
    base = WorldModel(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown method 'grpo'"):
        post_train(base, "grpo", QUICK, steps=1)
    with pytest.raises(ValueError, match="needs budget_seconds or steps"):
        post_train(base, "nft", QUICK)
    with pytest.raises(ValueError, match="steps=0 must be >= 1"):
        post_train(base, "nft", QUICK, steps=0)
    with pytest.raises(ValueError, match="budget_seconds=-1 must be > 0"):
        post_train(base, "nft", QUICK, budget_seconds=-1)
    with pytest.raises(ValueError, match="strict_reward=1 must be True or False"):
        AlignSettings(strict_reward=1)
    strict = dataclasses.replace(QUICK, strict_reward=True)
    with pytest.raises(ValueError, match="reward_backprop optimises the differentiable colour-mass surrogate"):
        post_train(base, "reward_backprop", strict, steps=1)
    data = OfflineData(np.zeros((1, 2, 4, 3)), np.zeros((1, 8), np.int32), None, np.zeros((0, 2)), 0.5, 0.0)
    with pytest.raises(ValueError, match="scored with strict=False but AlignSettings.strict_reward=True"):
        post_train(base, "mapo", strict, steps=1, data=data)


@pytest.mark.parametrize("method", ["mapo", "flow_grpo", "nft", "ddpo"])
def test_strict_reward_scores_training_samples_strictly(monkeypatch, method):
    """strict_reward reaches the verifier that scores the offline data (MaPO) and the rollouts'
    reward (Flow-GRPO, NFT, DDPO), and the reward's name says so; without it the verifier is
    GenEval-lite's."""
    import jdpt.world.evaluation as evaluation
    import jdpt.world.verifier as verifier

    calls = []

    def spy(images, prompts, config, *, strict=False):
        calls.append(strict)
        return verify(images, prompts, config, strict=strict)

    monkeypatch.setattr(evaluation, "verify", spy)  # the offline data's scores
    monkeypatch.setattr(verifier, "verify", spy)  # VerifierReward: the online rewards
    base = WorldModel(TINY, rngs=nnx.Rngs(0))
    prompts = ["a red circle", "two squares"]
    for flag in (True, False):
        calls.clear()
        settings = dataclasses.replace(QUICK, strict_reward=flag)
        if method == "mapo":  # a random model passes nothing: no pairs, after scoring
            with pytest.raises(ValueError, match="gave no preference pair"):
                make_offline_data(base, settings, progress=False)
        else:
            run = online_method(method, base, settings, None)
            scores = run.online["reward"](render(prompts, 0, TINY.shapes), prompts)
            assert scores.shape == (2,) and run.reward_name.startswith("strict verifier" if flag else "verifier")
        assert calls and all(c is flag for c in calls), calls
    assert reward_description(method, True).replace("strict verifier", "verifier") \
        == reward_description(method, False) != reward_description(method, True)


def test_demo_post_training_flags_are_checked(tmp_path, capsys):
    """Bad flags fail before any model is loaded or trained."""
    with pytest.raises(SystemExit, match="--post-train-seconds 0.0 must be > 0"):
        cli.main(["demo", "--cache", str(tmp_path), "--out", str(tmp_path), "--post-train-seconds", "0"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "--post-train", "grpo"])
    assert "invalid choice: 'grpo'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--strict-reward scores training samples with the strict verifier"):
        cli.main(["demo", "--cache", str(tmp_path), "--out", str(tmp_path), "--post-train", "reward_backprop",
                  "--strict-reward"])
    # the default: strict wherever the method's reward is the verifier's
    assert cli.strict_reward("mapo", None) and cli.strict_reward("nft", None)
    assert not cli.strict_reward("reward_backprop", None) and not cli.strict_reward("nft", False)
    assert not (tmp_path / "shapes").exists()


def test_offline_data_of_a_model_that_never_passes_is_an_error():
    """A random model scores 0 everywhere: no sample beats another, so no preference pair."""
    base = WorldModel(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gave no preference pair"):
        make_offline_data(base, QUICK, progress=False)
    with pytest.raises(ValueError, match="offline_prompts=0"):
        make_offline_data(base, AlignSettings(offline_prompts=0), progress=False)


# --- one short run --------------------------------------------------------------------------

def _flat(state) -> dict[tuple, np.ndarray]:
    return {path: np.array(v.get_value() if isinstance(v, nnx.Variable) else v)
            for path, v in nnx.to_flat_state(state)}


def test_post_train_lora_run_on_a_tiny_model():
    """Reward backprop (its colour-mass gradient is nonzero even for a random model) with LoRA:
    the budget stops the run after the first timed step; the base model is untouched; the
    returned model differs from it in the adapters only."""
    base = WorldModel(TINY, rngs=nnx.Rngs(0))
    before = _flat(nnx.state(base))
    probe_set = eval_prompts(1, TINY)
    r = post_train(base, "reward_backprop", QUICK, steps=3, budget_seconds=1e-6, probe_set=probe_set,
                   progress=False)
    # steps 1 (compile, not timed) and 2 (timed: > 1e-6 s): the budget ends the run before step 3
    assert r.steps == 2 and r.train_seconds > 1e-6 and r.mean_iteration_seconds == r.train_seconds
    assert r.train_curve["step"] == [1, 2] and len(r.train_curve["loss"]) == 2
    rewards = np.asarray(r.train_curve["reward"], np.float64)
    assert np.isfinite(rewards).all() and (rewards <= 0).all()  # the colour-mass reward is <= 0
    assert r.probe_curve["step"] == [0, 2] and all(0 <= p <= 1 for p in r.probe_curve["probe"])
    assert r.after is None and r.after_scores is None
    m = r.memory
    assert m["peak_bytes"] == m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"] > 0
    assert r.trainable == "LoRA r2" and r.learning_rate == 1e-3 and r.label == "Reward backprop (AlignProp)"

    after = _flat(nnx.state(base))
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before), \
        "post_train changed the base model"
    lora = nnx.state(r.model, nnx.LoRAParam)
    assert len(jax.tree.leaves(lora)) > 0
    b_weights = [np.asarray(v) for path, v in jax.tree.leaves_with_path(lora) if "lora_b" in jax.tree_util.keystr(path)]
    assert b_weights and max(np.abs(b).max() for b in b_weights) > 0, "LoRA B starts at 0: training moved it"
    # the wrapped layers hold their base weights under ``.base``: the same paths without it
    rest = {tuple(k for k in path if k != "base"): v for path, v in _flat(nnx.state(r.model, nnx.Not(nnx.LoRAParam))).items()}
    assert rest.keys() == before.keys() and all(np.array_equal(rest[k], before[k]) for k in before), \
        "LoRA training changed a base weight"


# --- jdpt demo with its post-training stage (slow) ------------------------------------------

@pytest.mark.slow  # the ci base model (from $JDPT_CACHE, else pretrained: ~1 min) + 10 s of training + compiles
# None: the demo's default (offline MaPO on the strict verifier's pairs); then an online method on
# GenEval-lite's own rewards
@pytest.mark.parametrize("method", [None, "nft"])
def test_demo_post_training_stage(tmp_path, capsys, method):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--preset", "ci", "--out", str(out), "--per-category", "2",
                     *(["--post-train", method, "--no-strict-reward"] if method else []),
                     "--post-train-seconds", "10"]) == 0
    report = json.loads((out / "scores.json").read_text())
    post = report["post_training"]
    keys = set(CATEGORIES) | {"overall"}
    assert set(post["before"]) == set(post["after"]) == set(post["change"]) == keys
    assert post["before"] == report["geneval_lite"]  # the same prompts and seeds as the base grid
    clutter = post["clutter"]
    assert clutter["named_objects_per_prompt"] == pytest.approx(np.mean(
        [sum(o.count for o in p.objects) for p in eval_prompts(2, PRESETS["ci"][0])]))
    for who in ("before", "after"):  # strict scoring can only fail more images
        assert 0 <= clutter[f"strict_overall_{who}"] <= post[who]["overall"]
        assert clutter[f"objects_per_image_{who}"] >= 0
    for k in keys:
        assert post["change"][k] == pytest.approx(post["after"][k] - post["before"][k], abs=1e-12)
    assert post["method"] == (method or "mapo") and post["steps"] >= 2 and post["budget_seconds"] == 10
    assert post["train_seconds"] >= 10 or post["steps"] >= 2
    curve = post["reward_curve"]
    assert len(curve["step"]) == len(curve["reward"]) == post["steps"]
    assert post["strict_reward"] == (method is None)
    if method == "nft":
        assert all(0 <= x <= 1 for x in curve["reward"])  # verifier scores of the rollouts
        assert curve["reward_name"] == "verifier score of the old policy's samples"
    else:
        assert set(curve["reward"]) == {None}  # offline: no training reward

    from PIL import Image

    base_grid, side = Image.open(out / "grid.png"), Image.open(out / "post_trained_grid.png")
    # 2 prompts per category both times: 6 rows of base samples vs 12 rows (base, post-trained)
    assert side.height == 2 * base_grid.height
    text = capsys.readouterr().out
    label = "DiffusionNFT" if method == "nft" else "MaPO"
    assert f"before -> after {label}" in text and "post_trained_grid.png" in text
