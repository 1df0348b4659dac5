"""A differentiable stand-in for GenEval-lite's colour and count checks on the Shapes world.

The analytic verifier (``jdpt.world.verifier``) thresholds, segments and counts: it has no
gradient. Reward backprop (AlignProp, DRaFT) needs one, so this module softens the verifier's two
pixel-level decisions (foreground or not; which palette colour) and compares the resulting soft
pixel mass of each named colour, and of the whole foreground, with what the prompt's objects need.
It is blind to shape and position: a method trained on it is scored by the real verifier.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdpt.world.scenes import PALETTE, Prompt, ShapesConfig, render


def object_areas(config: ShapesConfig, n: int = 64, seed: int = 0) -> dict[str, float]:
    """Mean foreground pixels of one rendered object of each shape (``n`` renders each, sizes and
    offsets random): the per-object pixel mass :func:`mass_targets` multiplies by the count."""
    images = render([f"a {s}" for s in config.shapes for _ in range(n)], seed, config)
    pixels = (images.max(axis=-1) > 127).sum(axis=(1, 2)).reshape(len(config.shapes), n)
    return {s: float(p.mean()) for s, p in zip(config.shapes, pixels)}


def mass_targets(prompts: list[Prompt], config: ShapesConfig, areas: dict[str, float]) -> dict[str, np.ndarray]:
    """What :func:`colour_mass_reward` compares against, per prompt: ``mass_target [B, K]`` (pixels
    of each of the ``K`` colours named), ``mass_named [B, K]`` (1 where named) and
    ``mass_total [B]`` (all foreground pixels), from the objects named: ``count x areas[shape]``."""
    k = len(config.colors)
    target, named = np.zeros((len(prompts), k), np.float32), np.zeros((len(prompts), k), np.float32)
    total = np.zeros(len(prompts), np.float32)
    for i, prompt in enumerate(prompts):
        for spec in prompt.objects:
            if spec.shape not in areas:
                raise ValueError(f"no object area for shape {spec.shape!r} (have {sorted(areas)}): "
                                 "compute areas with object_areas(config) of the prompts' world")
            mass = spec.count * areas[spec.shape]
            total[i] += mass
            if spec.color is not None:
                c = config.colors.index(spec.color)
                target[i, c] += mass
                named[i, c] = 1.0
    return {"mass_target": target, "mass_named": named, "mass_total": total}


def colour_mass_reward(images: jax.Array, targets: dict, colors: tuple[str, ...], *,
                       fg_temperature: float = 0.05, color_temperature: float = 0.05) -> jax.Array:
    """A smooth stand-in for GenEval-lite's colour and count checks: ``[B]`` rewards <= 0.

    ``images [B, H, W, 3]`` in ``[-1, 1]``. A pixel is foreground with weight
    ``sigmoid((max_rgb - 1/2) / fg_temperature)`` (the verifier's threshold, softened) and belongs
    to colour ``k`` with ``softmax_k(cos(rgb, palette_k) / color_temperature)`` (the verifier's
    nearest RGB direction, softened). With soft pixel masses ``m_k`` and ``s(d) = sqrt(d² + 1) - 1``:

        r = -[sum_{k named} s(m_k - target_k) + s(sum_k m_k - total)] / total

    i.e. the pixel-mass error of each named colour and of the whole foreground, relative to the
    foreground the prompt asks for (``targets`` from :func:`mass_targets`). Blind to shape and
    position.
    """
    x = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    fg = jax.nn.sigmoid((x.max(axis=-1) - 0.5) / fg_temperature)  # [B, H, W]
    dirs = np.array([PALETTE[c] for c in colors], np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    unit = x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
    share = jax.nn.softmax(unit @ dirs.T / color_temperature, axis=-1)  # [B, H, W, K]
    mass = jnp.sum(fg[..., None] * share, axis=(1, 2))  # [B, K]
    smooth_abs = lambda d: jnp.sqrt(d * d + 1.0) - 1.0  # noqa: E731
    colour = jnp.sum(targets["mass_named"] * smooth_abs(mass - targets["mass_target"]), axis=-1)
    total = smooth_abs(mass.sum(axis=-1) - targets["mass_total"])
    return -(colour + total) / targets["mass_total"]
