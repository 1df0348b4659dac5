"""Preference pairs from per-sample scores: winners beat losers, ties skipped, seeded subsets."""

from __future__ import annotations

import numpy as np
import pytest

from jdpt.data import preference_pairs


def _as_set(pairs):
    return set(zip(pairs.prompt.tolist(), pairs.winner.tolist(), pairs.loser.tolist()))


def test_all_pairs_with_different_scores():
    scores = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 1, 1]], np.float32)
    pairs = preference_pairs(scores, 0)
    assert _as_set(pairs) == {(0, 0, 1), (0, 0, 3), (0, 2, 1), (0, 2, 3),
                              (2, 1, 0), (2, 2, 0), (2, 3, 0)}
    assert len(pairs) == 7 and pairs.prompt.dtype == np.int32
    assert (np.diff(pairs.prompt) >= 0).all()
    assert (scores[pairs.prompt, pairs.winner] > scores[pairs.prompt, pairs.loser]).all()


def test_tie_break_orders_equal_scores_only():
    scores = np.array([[1.0, 1.0, 0.0, 1.0]])
    tie_break = np.array([[0.2, 0.5, 9.0, 0.2]])
    pairs = preference_pairs(scores, 0, tie_break=tie_break)
    # The score decides against image 2 despite its tie-break; 0 and 3 tie on both and are skipped.
    assert _as_set(pairs) == {(0, 0, 2), (0, 1, 2), (0, 3, 2), (0, 1, 0), (0, 1, 3)}


def test_subsets_are_seeded_and_bounded():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 2, (50, 8)).astype(np.float32)
    tie_break = rng.random((50, 8))
    full = _as_set(preference_pairs(scores, 0, tie_break=tie_break))
    a = preference_pairs(scores, 3, tie_break=tie_break, max_pairs_per_prompt=2)
    assert _as_set(a) == _as_set(preference_pairs(scores, 3, tie_break=tie_break, max_pairs_per_prompt=2))
    assert _as_set(a) != _as_set(preference_pairs(scores, 4, tie_break=tie_break, max_pairs_per_prompt=2))
    assert _as_set(a) <= full
    assert np.bincount(a.prompt, minlength=50).tolist() == [2] * 50  # all 28 pairs differ by tie-break


def test_take_gathers_images():
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # [P, K, ...]
    pairs = preference_pairs(np.array([[0.0, 1.0, 0.0], [2.0, 2.0, 3.0]]), 0, max_pairs_per_prompt=1)
    winners, losers = pairs.take(images)
    np.testing.assert_array_equal(winners, images[pairs.prompt, pairs.winner])
    assert winners.shape == losers.shape == (2, 4)
    assert pairs.winner.tolist() == [1, 2]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(scores=np.zeros(4)), r"\[P, K\]"),
    (dict(scores=np.zeros((2, 3)), tie_break=np.zeros((2, 2))), "tie_break"),
    (dict(scores=np.zeros((2, 3)), max_pairs_per_prompt=0), "max_pairs_per_prompt=0"),
])
def test_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        preference_pairs(seed=0, **kwargs)
