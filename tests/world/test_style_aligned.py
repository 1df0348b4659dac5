"""StyleAligned on the Shapes-world model (jdpt.world.style_aligned)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdpt.world.scenes import render
from jdpt.world.style_aligned import world_style_aligned
from tests.objectives.fixtures_offline import tiny_world


@pytest.fixture(scope="module")
def world():
    return tiny_world(0)


def test_world_style_aligned_with_reference_image(world):
    """End to end on the tiny world: the reference row decodes the inverted scene itself."""
    model = world
    ids = jnp.asarray(model.tokenize(["a red circle", "a blue square", "a green triangle"]))
    scene = render(["a red circle"], 0, model.config.shapes)[0]
    run = jax.jit(lambda ids, key, scene: world_style_aligned(model, ids, key, reference=scene, steps=2))
    images = run(ids, jax.random.key(0), jnp.asarray(scene))
    assert images.shape == (3, *scene.shape) and images.dtype == jnp.uint8
    assert np.abs(np.asarray(images[0], np.int32) - scene.astype(np.int32)).max() <= 1
