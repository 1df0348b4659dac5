"""Host-side randomness: one numpy ``Generator`` from whatever seed a caller holds."""

from __future__ import annotations

import jax
import numpy as np


def as_rng(seed) -> np.random.Generator:
    """A numpy Generator from an int seed, a Generator (returned as is) or a JAX PRNG key."""
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.default_rng(int(seed))
    if isinstance(seed, jax.Array):
        data = jax.random.key_data(seed) if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key) else seed
        return np.random.default_rng(np.asarray(data, dtype=np.uint32).ravel())
    raise ValueError(f"seed={seed!r}: pass an int, a numpy Generator or a JAX PRNG key")
