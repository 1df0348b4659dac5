"""PixelCodec: exact space-to-depth codec, consistent with Flux's latent packing conventions."""

import jax
import numpy as np
import pytest

from jdpt.models.pixels import PixelCodec


@pytest.mark.parametrize("factor,shape", [(1, (2, 8, 6, 3)), (2, (3, 32, 16, 3)), (4, (1, 16, 8, 3))])
def test_round_trip_is_exact(factor, shape):
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    codec = PixelCodec(factor=factor)
    z = codec.encode_latents(x)
    b, h, w, c = shape
    assert z.shape == (b, h // factor, w // factor, c * factor**2)
    np.testing.assert_array_equal(np.asarray(codec.decode_latents(z)), x)


def test_channel_order_is_channel_then_row_then_column():
    # One latent pixel holds the f x f block below it, channels ordered (C, dy, dx).
    x = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3)
    z = np.asarray(PixelCodec(factor=2).encode_latents(x))[0, 0, 0]
    expected = [x[0, dy, dx, c] for c in range(3) for dy in range(2) for dx in range(2)]
    np.testing.assert_array_equal(z, expected)


def test_is_a_leafless_pytree_usable_under_jit():
    codec = PixelCodec(factor=2)
    assert jax.tree.leaves(codec) == []
    out = jax.jit(lambda c, x: c.decode_latents(c.encode_latents(x)))(codec, np.ones((1, 4, 4, 3), np.float32))
    assert out.shape == (1, 4, 4, 3)


def test_errors():
    with pytest.raises(ValueError, match="positive integer"):
        PixelCodec(factor=0)
    with pytest.raises(ValueError, match="multiples of 2"):
        PixelCodec(factor=2).encode_latents(np.zeros((1, 5, 4, 3), np.float32))
    with pytest.raises(ValueError, match="decodes latents with 12 channels"):
        PixelCodec(factor=2).decode_latents(np.zeros((1, 2, 2, 3), np.float32))
