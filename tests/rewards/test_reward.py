"""The reward interface: score() calls a reward and names what is wrong with its output."""

import numpy as np
import pytest

from jdpt.rewards import jpeg_compressibility, score


def test_score_checks_shape_and_values():
    images = np.zeros((3, 8, 8, 3), np.uint8)
    images[1] = 255
    got = score(jpeg_compressibility, images, ["a", "b", "c"])
    assert got.dtype == np.float32 and got.shape == (3,)
    np.testing.assert_array_equal(got, jpeg_compressibility(images))
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        score(jpeg_compressibility, images, ["a", "b"])
    with pytest.raises(ValueError, match=r"returned shape \(3, 1\) for 3 images"):
        score(lambda im, p: np.zeros((3, 1)), images, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"non-finite scores \[nan\] at rows \[2\]"):
        score(lambda im, p: np.array([0.0, 1.0, np.nan]), images, ["a", "b", "c"])
