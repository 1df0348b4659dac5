"""JPEG (in)compressibility: DDPO's definition, recomputed independently through a file."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from jdpt.rewards import jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb
from jdpt.world.scenes import render, sample_prompts


def test_flat_images_are_more_compressible_than_noise():
    rng = np.random.default_rng(0)
    flat = np.full((2, 64, 64, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    scenes = render(sample_prompts(0, 2), 0)
    assert (jpeg_compressibility(flat) > jpeg_compressibility(noise)).all()
    assert (jpeg_incompressibility(noise) > jpeg_incompressibility(flat)).all()
    assert jpeg_compressibility(scenes).dtype == np.float32


def test_sizes_equal_pil_bytes_over_1000(tmp_path):
    rng = np.random.default_rng(1)
    images = np.concatenate([rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8),
                             np.zeros((1, 32, 48, 3), np.uint8)])
    expected = []
    for i, image in enumerate(images):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(image, mode="RGB").save(path, "JPEG", quality=95)
        expected.append(os.path.getsize(path) / 1000)
    np.testing.assert_allclose(jpeg_size_kb(images), expected, rtol=1e-6)
    np.testing.assert_allclose(jpeg_incompressibility(images), expected, rtol=1e-6)
    np.testing.assert_allclose(jpeg_compressibility(images), -np.array(expected), rtol=1e-6)
    assert jpeg_size_kb(images, quality=50)[0] < expected[0]


def test_rejects_float_images():
    with pytest.raises(ValueError, match="to_uint8"):
        jpeg_compressibility(np.zeros((1, 8, 8, 3), np.float32))
