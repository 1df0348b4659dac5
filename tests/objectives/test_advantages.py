"""Advantages: Flow-GRPO's group normalisation and DDPO's per-prompt stat tracker against plain
Python re-implementations of the reference code's formulas; the sharded variant on 8 devices."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from jdpt.objectives.advantages import (PerPromptStatTracker, check_rewards, device_group_advantages,
                                        group_advantages, prompt_ids, sharded_group_advantages)
from jdpt.parallel import make_mesh


def reference_group_advantages(rewards, labels, global_std, eps=1e-4):
    """flow_grpo stat_tracking.py's formula, one prompt at a time (population std)."""
    rewards = np.asarray(rewards, np.float64)
    out = np.zeros_like(rewards)
    for label in set(labels):
        rows = np.array([lab == label for lab in labels])
        group = rewards[rows]
        std = np.std(rewards) if global_std else np.std(group)
        out[rows] = (group - group.mean()) / (std + eps)
    return out


@pytest.mark.parametrize("global_std", [True, False])
def test_group_advantages_match_reference(global_std):
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=12)
    labels = ["a red circle"] * 4 + ["two squares"] * 4 + ["a blue square"] * 4
    got = group_advantages(rewards, 4, global_std=global_std)
    np.testing.assert_allclose(got, reference_group_advantages(rewards, labels, global_std), rtol=1e-5, atol=1e-6)
    # labels instead of a group size (interleaved prompts): same numbers, per label
    order = rng.permutation(12)
    shuffled = group_advantages(rewards[order], [labels[i] for i in order], global_std=global_std)
    np.testing.assert_allclose(shuffled, got[order], rtol=1e-5, atol=1e-6)
    # zero mean within every group (tolerance 1e-5)
    np.testing.assert_allclose(got.reshape(3, 4).sum(axis=1), 0.0, atol=1e-5)


def test_equal_rewards_give_zero_advantages():
    adv = group_advantages([1.0, 1.0, 0.0, 2.0], 2, global_std=False)
    np.testing.assert_allclose(adv[:2], 0.0)
    np.testing.assert_allclose(adv[2:], [-1 / (1 + 1e-4), 1 / (1 + 1e-4)], rtol=1e-6)


@pytest.mark.parametrize("global_std", [True, False])
def test_sharded_group_advantages_equal_host(global_std):
    mesh = make_mesh()  # 8 simulated devices: each group of 4 spans several devices
    rewards = np.random.default_rng(1).normal(size=16).astype(np.float32)
    got = sharded_group_advantages(jax.numpy.asarray(rewards), 4, mesh, global_std=global_std)
    np.testing.assert_allclose(np.asarray(got), group_advantages(rewards, 4, global_std=global_std),
                               rtol=1e-5, atol=1e-5)
    ids = np.repeat(np.arange(4), 4)[::-1].copy()
    by_id = sharded_group_advantages(jax.numpy.asarray(rewards), ids, mesh, global_std=global_std)
    np.testing.assert_allclose(np.asarray(by_id), np.asarray(got), rtol=1e-5, atol=1e-5)


def reference_tracker(batches, buffer_size, min_count):
    """ddpo-pytorch stat_tracking.py: per-prompt deque, batch stats until min_count."""
    stats, outs = {}, []
    for prompts, rewards in batches:
        rewards = np.asarray(rewards, np.float64)
        out = np.empty_like(rewards)
        for prompt in sorted(set(prompts)):
            rows = np.array([p == prompt for p in prompts])
            buf = stats.setdefault(prompt, collections.deque(maxlen=buffer_size))
            buf.extend(rewards[rows].tolist())
            if len(buf) < min_count:
                mean, std = rewards.mean(), rewards.std() + 1e-6
            else:
                mean, std = np.mean(buf), np.std(buf) + 1e-6
            out[rows] = (rewards[rows] - mean) / std
        outs.append(out)
    return outs


def test_per_prompt_stat_tracker_matches_reference():
    """The on-device table (jitted, its state threaded through) against the deque reference, on
    batches with a repeated prompt, more rewards than the buffer holds and prompts new mid-way."""
    rng = np.random.default_rng(2)
    prompts = [["a", "b", "a", "c"], ["a", "b", "a", "c"], ["d", "a", "a", "a", "a", "a"], ["b", "d"], ["a", "c", "d", "b"]]
    batches = [(p, rng.normal(size=len(p)) + rng.normal(size=len(p)) * 3) for p in prompts]
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3, capacity=8)
    want = reference_tracker(batches, 4, 3)
    state = tracker.init()
    update = jax.jit(tracker.update)
    for (texts, rewards), expected in zip(batches, want):
        state, got = update(state, prompt_ids(texts), np.asarray(rewards, np.float32))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    ids = prompt_ids(["a", "b"])
    slots = [int(np.flatnonzero(np.asarray(state["keys"]) == i)[0]) for i in ids]
    assert [int(state["count"][s]) for s in slots] == [10, 4]  # rewards ever added (a's buffer keeps 4)
    assert int(state["overflow"]) == 0


def test_per_prompt_stat_tracker_overflow_falls_back_to_the_batch():
    """A full table: new prompts are normalised by the batch and counted; known ones still tracked."""
    tracker = PerPromptStatTracker(buffer_size=2, min_count=1, capacity=2)
    state = tracker.init()
    state, _ = tracker.update(state, prompt_ids(["a", "b"]), np.array([1.0, 2.0], np.float32))
    rewards = np.array([5.0, 3.0, 0.0], np.float32)
    state, adv = tracker.update(state, prompt_ids(["a", "c", "b"]), rewards)
    assert int(state["overflow"]) == 1
    batch = (3.0 - rewards.mean()) / (rewards.std() + 1e-6)
    np.testing.assert_allclose(np.asarray(adv), [(5 - 3) / (2 + 1e-6), batch, (0 - 1) / (1 + 1e-6)], rtol=1e-5)


def test_prompt_ids_are_stable_and_non_negative():
    ids = prompt_ids(["a red circle", "two squares", "a red circle"])
    assert ids.dtype == np.int32 and (ids >= 0).all() and ids[0] == ids[2] != ids[1]
    np.testing.assert_array_equal(prompt_ids(["a red circle"]), ids[:1])


@pytest.mark.parametrize("global_std", [True, False])
def test_device_group_advantages_equal_host(global_std):
    rewards = np.random.default_rng(3).normal(size=12).astype(np.float32)
    labels = ["x"] * 4 + ["y"] * 4 + ["z"] * 4
    order = np.random.default_rng(4).permutation(12)
    got = jax.jit(lambda r, i: device_group_advantages(r, i, global_std=global_std))(
        rewards[order], prompt_ids([labels[i] for i in order]))
    want = reference_group_advantages(rewards[order], [labels[i] for i in order], global_std)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bad_rewards_are_errors():
    with pytest.raises(ValueError, match="finite.*nan"):
        group_advantages([1.0, np.nan, 0.0, 1.0], 2)
    with pytest.raises(ValueError, match="non-empty"):
        check_rewards([])
    with pytest.raises(ValueError, match="group size 3 must be >= 1 and divide the batch size 4"):
        group_advantages([1.0, 2.0, 3.0, 4.0], 3)
    with pytest.raises(ValueError, match="group size 0"):
        group_advantages([1.0, 2.0], 0)
    with pytest.raises(ValueError, match=r"group labels must be \[B\] = \[4\]"):
        group_advantages([1.0, 2.0, 3.0, 4.0], ["a", "b"])
    with pytest.raises(ValueError, match="buffer_size, min_count and capacity >= 1"):
        PerPromptStatTracker(capacity=0)
    with pytest.raises(ValueError, match="finite"):
        sharded_group_advantages(jax.numpy.asarray([1.0, np.nan] * 4), 2, make_mesh())
