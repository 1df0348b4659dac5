"""GenEval-lite: an analytic verifier of Shapes-world images against their prompts (no model).

Detection (:func:`detect`), per image:

1. Foreground = pixels whose brightest channel exceeds half of full scale (the background is
   black; this is the 50% level of a blurred edge, so blur moves no boundary).
2. Connected foreground components (8-connectivity, numpy union by label propagation) with fewer
   than ``ceil(s^2 / 4)`` pixels are noise and dropped (``s`` = smallest object side).
3. Colour = majority vote of the pixels' nearest palette colour by RGB *direction* (dimming or
   blurring into black keeps a colour's direction); a pixel more than 35 degrees from every
   configured colour votes for no colour, and a component without a >= 50% majority has colour
   None.
4. Shape from geometry, robust to blur up to sigma ~1 pixel at the smallest (7-pixel) objects:
   a triangle (apex up) has its centroid clearly below its bounding-box centre; otherwise a
   square fills its box (fill ratio 1, vs pi/4 for a circle) and its box corners outside the
   inscribed ellipse. Boxes with aspect ratio above 1.6 (e.g. two merged objects) or fill below
   0.4 have shape None.

Rules (GenEval's, Ghosh et al. 2023), per prompt, score 1 or 0:

- ``single_object`` / ``two_object`` / ``colors`` / ``color_attr``: each named object is present
  (with its colour where one is named). Other objects are ignored.
- ``counting``: exactly ``count`` objects of the named shape (objects of other shapes ignored).
- ``position``: some object of the first shape stands in the relation to some object of the
  second: bounding-box centres differ along the named axis by more than a quarter cell, and more
  than across it (the dominant axis decides, so at most one relation holds).

``strict=True`` additionally requires the number of detected objects to equal the number named,
so extra objects fail every category (use it when a policy might learn to draw everything).
The score summary follows GenEval: the mean within each category, and overall = the mean of the
category means.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jdpt.world.scenes import CATEGORIES, PALETTE, SHAPES, ObjectSpec, Prompt, ShapesConfig, parse_prompt

_MAX_COLOR_ANGLE = math.radians(35.0)
_CORNER_RADIUS = 1.1  # bbox pixels beyond this normalised ellipse radius are "corners"
_MAX_ASPECT = 1.6
_MIN_FILL = 0.4
# Triangle: centroid below the box centre by more than this fraction of the height (1/6 when
# sharp, about 1/20 at 7 pixels blurred with sigma 1.2; 0 for circles and squares).
_TRIANGLE_DROP = 0.033
# Square: fill + _CORNER_WEIGHT * corners above _SQUARE_SCORE (sharp square 1.25; a blurred
# 7-pixel square loses its corner pixels but keeps fill 0.92; circles of 7+ pixels have fill
# at most 0.86 and no corners).
_CORNER_WEIGHT, _SQUARE_SCORE = 0.25, 0.9
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


class Detection(NamedTuple):
    """An object found in an image.

    Attributes:
        shape: a name from :data:`SHAPES`, or None when the geometry fits none.
        color: a name from the config's colours, or None when no colour has a majority.
        center: ``(y, x)`` centre of the bounding box in pixels.
        area: number of pixels.
    """

    shape: str | None
    color: str | None
    center: tuple[float, float]
    area: int


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The verifier's result for ``B`` images.

    Attributes:
        score: float32 ``[B]``: 1.0 where the image satisfies its prompt, else 0.0.
        category: ``[B]`` the prompts' categories.
        objects: ``[B]`` the detections of each image.
        named: ``[B]`` how many objects each prompt names (None when not known).
    """

    score: np.ndarray
    category: tuple[str, ...]
    objects: tuple[tuple[Detection, ...], ...]
    named: tuple[int, ...] | None = None

    def strict(self) -> Verdict:
        """This verdict with images failed that hold objects their prompt does not name: the
        same as ``verify(..., strict=True)``, from the detections already made."""
        if self.named is None:
            raise ValueError("this Verdict does not know how many objects each prompt names; "
                             "make it with verify(), which records them")
        exact = np.array([len(o) == n for o, n in zip(self.objects, self.named)], np.float32)
        return dataclasses.replace(self, score=self.score * exact)

    def clutter(self) -> dict[str, float]:
        """Mean detected objects per image, mean objects the prompts name, and the strict overall
        score: a policy that gains by drawing extra objects shows up here, not in ``summary``."""
        return {"objects_per_image": float(np.mean([len(o) for o in self.objects])),
                "named_objects_per_prompt": float(np.mean(self.named)) if self.named is not None else float("nan"),
                "strict_overall": self.strict().summary()["overall"]}

    def summary(self) -> dict[str, float]:
        """Mean score per category present, in :data:`CATEGORIES` order, and ``"overall"``: the
        mean of the category means (GenEval's headline number)."""
        category = np.asarray(self.category)
        means = {c: float(self.score[category == c].mean()) for c in CATEGORIES if (category == c).any()}
        means["overall"] = float(np.mean(list(means.values()))) if means else float("nan")
        return means


def _check_images(images, config: ShapesConfig) -> np.ndarray:
    images = np.asarray(images)
    size = config.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(
            f"images must be uint8 [B, {size}, {size}, 3] for ShapesConfig(image_size={size}); "
            f"got dtype {images.dtype} and shape {images.shape}. Convert [-1, 1] floats with "
            "jdpt.diffusion.pipeline.to_uint8, or pass a config with the images' size")
    return images


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of ``mask [B, H, W]``: int32 ``[B, H, W]``, each foreground
    pixel labelled with the smallest flat index in its component, background ``mask.size``."""
    if mask.size >= 2**31 - 1:
        raise ValueError(f"{mask.shape[0]} images of {mask.shape[1:]} pixels overflow int32 labels; "
                         "verify them in smaller batches")
    background = np.int32(mask.size)
    label = np.where(mask, np.arange(mask.size, dtype=np.int32).reshape(mask.shape), background)
    inside = np.flatnonzero(mask)
    while True:
        new = label.copy()  # 3x3 minimum filter, separable: along rows, then along columns
        np.minimum(new[:, :, 1:], label[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], label[:, :, 1:], out=new[:, :, :-1])
        across = new.copy()
        np.minimum(new[:, 1:], across[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], across[:, 1:], out=new[:, :-1])
        flat = np.where(mask, new, background).ravel()
        for _ in range(4):  # pointer jumping: a label is a pixel of the same component
            flat[inside] = flat[flat[inside]]
        new = flat.reshape(mask.shape)
        if np.array_equal(new, label):
            return label
        label = new


@functools.lru_cache(maxsize=None)
def _corner_pixels(h: int, w: int) -> int:
    """Number of pixels of an ``h x w`` box outside its inscribed ellipse scaled by
    ``_CORNER_RADIUS``."""
    y, x = np.mgrid[:h, :w] + 0.5
    return int(((2 * y / h - 1) ** 2 + (2 * x / w - 1) ** 2 > _CORNER_RADIUS**2).sum())


def detect(images, config: ShapesConfig = ShapesConfig()) -> list[list[Detection]]:
    """Objects in uint8 ``images [B, H, W, 3]`` (see the module docstring for the method)."""
    images = _check_images(images, config)
    foreground = np.maximum(np.maximum(images[..., 0], images[..., 1]), images[..., 2]) > 127
    label = _components(foreground)
    bi, yi, xi = np.nonzero(foreground)
    pixels = images[bi, yi, xi].astype(np.float32)  # [P, 3] foreground colours
    directions = np.array([PALETTE[c] for c in config.colors], np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    cosine = pixels @ directions.T / np.linalg.norm(pixels, axis=1, keepdims=True)  # [P, K]
    pixel_color = np.where(cosine.max(-1) >= math.cos(_MAX_COLOR_ANGLE), cosine.argmax(-1),
                           len(config.colors))  # len(colors) = no colour

    roots, comp = np.unique(label[bi, yi, xi], return_inverse=True)
    n = len(roots)
    if n == 0:
        return [[] for _ in range(len(images))]
    order = np.argsort(comp, kind="stable")
    area = np.bincount(comp, minlength=n)
    starts = np.concatenate([[0], np.cumsum(area)[:-1]])
    y0, y1 = (f.reduceat(yi[order], starts) for f in (np.minimum, np.maximum))
    x0, x1 = (f.reduceat(xi[order], starts) for f in (np.minimum, np.maximum))
    h, w = y1 - y0 + 1, x1 - x0 + 1
    cy, cx = (y0 + y1 + 1) / 2, (x0 + x1 + 1) / 2  # box centres in pixel units

    # Shape features.
    fill = area / (h * w)
    radius2 = (2 * (yi + 0.5 - cy[comp]) / h[comp]) ** 2 + (2 * (xi + 0.5 - cx[comp]) / w[comp]) ** 2
    corner_on = np.bincount(comp, weights=radius2 > _CORNER_RADIUS**2, minlength=n)
    corner_all = np.array([_corner_pixels(a, b) for a, b in zip(h, w)])
    corners = np.where(corner_all > 0, corner_on / np.maximum(corner_all, 1), fill)
    drop = (np.bincount(comp, weights=yi + 0.5, minlength=n) / area - cy) / h
    shape = np.where(drop > _TRIANGLE_DROP, SHAPES.index("triangle"),
                     np.where(fill + _CORNER_WEIGHT * corners > _SQUARE_SCORE,
                              SHAPES.index("square"), SHAPES.index("circle")))
    shape_ok = (np.maximum(h, w) <= _MAX_ASPECT * np.minimum(h, w)) & (fill >= _MIN_FILL)

    # Colour votes.
    votes = np.bincount(comp * (len(config.colors) + 1) + pixel_color,
                        minlength=n * (len(config.colors) + 1)).reshape(n, -1)
    best_color = votes.argmax(axis=1)
    color_ok = (best_color < len(config.colors)) & (2 * votes.max(axis=1) >= area)

    smallest = config.object_sizes[0]
    keep = area >= math.ceil(smallest**2 / 4)
    image_of = roots // (config.image_size**2)
    found: list[list[Detection]] = [[] for _ in range(len(images))]
    for k in np.nonzero(keep)[0]:
        found[image_of[k]].append(Detection(
            SHAPES[shape[k]] if shape_ok[k] else None,
            config.colors[best_color[k]] if color_ok[k] else None,
            (float(cy[k]), float(cx[k])), int(area[k])))
    return found


def _matches(found: Detection, spec: ObjectSpec) -> bool:
    return found.shape == spec.shape and (spec.color is None or found.color == spec.color)


def _related(a: Detection, b: Detection, relation: str, margin: float) -> bool:
    dy, dx = b.center[0] - a.center[0], b.center[1] - a.center[1]  # b relative to a
    along, across = {"left of": (dx, dy), "right of": (-dx, dy),
                     "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > margin and along > abs(across)


def _satisfied(prompt: Prompt, found: Sequence[Detection], margin: float) -> bool:
    if prompt.category == "counting":
        spec = prompt.objects[0]
        return sum(_matches(f, spec) for f in found) == spec.count
    if prompt.relation is not None:
        first, second = prompt.objects
        return any(_related(a, b, prompt.relation, margin)
                   for a in found if _matches(a, first)
                   for b in found if _matches(b, second) and b is not a)
    return all(any(_matches(f, spec) for f in found) for spec in prompt.objects)


def verify(images, prompts: Sequence[Prompt | str], config: ShapesConfig = ShapesConfig(), *,
           strict: bool = False) -> Verdict:
    """Score uint8 ``images [B, H, W, 3]`` against ``prompts`` (``[B]``, :class:`Prompt` or text).

    Returns a :class:`Verdict`: per-image 0/1 ``score``, categories, detections; ``.summary()``
    gives the per-category and overall GenEval-lite means. ``strict`` fails images with objects
    the prompt does not name.
    """
    images = _check_images(images, config)
    prompts = [parse_prompt(p, config) if isinstance(p, str) else p for p in prompts]
    if len(prompts) != len(images):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt "
                         "per image (repeat a prompt for several samples of it)")
    found = detect(images, config)
    margin = config.image_size / config.grid / 4
    score = np.array([_satisfied(p, f, margin) for p, f in zip(prompts, found)], np.float32)
    named = tuple(sum(spec.count for spec in p.objects) for p in prompts)
    verdict = Verdict(score, tuple(p.category for p in prompts), tuple(tuple(f) for f in found), named)
    return verdict.strict() if strict else verdict


@dataclasses.dataclass(frozen=True)
class VerifierReward:
    """GenEval-lite as a :class:`jdpt.rewards.reward.Reward` of online post-training:
    ``reward(images, prompts) -> [B]`` 0/1 scores (``strict``: extra objects fail)."""

    config: ShapesConfig = ShapesConfig()
    strict: bool = False

    @property
    def name(self) -> str:
        return f"{'strict ' if self.strict else ''}verifier score 0/1"

    def __call__(self, images, prompts: Sequence[Prompt | str]) -> np.ndarray:
        return verify(images, prompts, self.config, strict=self.strict).score


def geneval_lite_reward(images, prompts: Sequence[Prompt | str],
                        config: ShapesConfig = ShapesConfig(), *, strict: bool = False) -> np.ndarray:
    """The verifier's score as a reward: float32 ``[B]`` in {0, 1}."""
    return verify(images, prompts, config, strict=strict).score
