"""Advantages: Flow-GRPO's group normalisation and DDPO's per-prompt stat tracker against plain
Python re-implementations of the reference code's formulas; the sharded variant on 8 devices."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from jdpt.objectives.advantages import (PerPromptStatTracker, check_rewards, group_advantages,
                                        sharded_group_advantages)
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
    rng = np.random.default_rng(2)
    batches = [(["a", "b", "a", "c"], rng.normal(size=4) + np.array([0, 5, 0, -3])) for _ in range(5)]
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    want = reference_tracker(batches, 4, 3)
    for (prompts, rewards), expected in zip(batches, want):
        np.testing.assert_allclose(tracker.update(prompts, rewards), expected, rtol=1e-5, atol=1e-6)
    assert len(tracker.buffers["a"]) == 4 and len(tracker.buffers["b"]) == 4  # the buffer's maxlen


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
    with pytest.raises(ValueError, match="prompts .* and rewards .* must both be"):
        PerPromptStatTracker().update(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        PerPromptStatTracker().update(["a", "b"], [1.0, np.inf])
    with pytest.raises(ValueError, match="finite"):
        sharded_group_advantages(jax.numpy.asarray([1.0, np.nan] * 4), 2, make_mesh())
