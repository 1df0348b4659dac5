"""The Shapes world: seeded scenes of flat shapes on a grid, the prompt grammar and its tokenizer.

A scene is a black ``image_size``-square image divided into a ``grid x grid`` array of cells.
Every object sits inside its own cell, at least one pixel from the cell border, so objects never
touch (at least two background pixels apart) and left/right/above/below are well defined. An
object is a flat, fully saturated circle, square or upward triangle (width = height) whose colour
comes from :data:`PALETTE`. The background is black so that a colour keeps its direction in RGB
when it is dimmed or blurred into the background, which is what the verifier
(``jdpt.world.verifier``) relies on.

The grammar covers GenEval's six categories (Ghosh et al., 2023, "GenEval: An Object-Focused
Framework for Evaluating Text-to-Image Alignment"); each line gives an example prompt and the
scene rendered for it:

- ``single_object``: "a circle": one circle, random colour.
- ``two_object``: "a circle and a square": one of each, random colours.
- ``counting``: "three triangles": exactly three triangles, random colours.
- ``colors``: "a blue square": one blue square.
- ``position``: "a circle left of a square": both, the circle's cell left of the square's.
- ``color_attr``: "a red circle and a green triangle": both, in these colours.

Scenes hold exactly the objects a prompt mentions: nothing else is added, and attributes the
prompt leaves open (colour, cell, size within :attr:`ShapesConfig.object_sizes`) are random.
Prompts naming two objects always name two different shapes (and, for ``color_attr``, two
different colours). Counts run from 2 to ``max_objects``. ``position`` scenes put the pair
along the named axis with a smaller offset across it, so exactly one relation holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np

from jdpt.data.rng import as_rng

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
}
"""Every colour the world knows (RGB). Directions in RGB are at least 35 degrees apart."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CATEGORIES: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {
    2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
"""Special token ids. EOS is deliberately not 2: ``CLIPTextConfig(eos_token_id=2)`` selects
transformers' legacy pooling (position of the largest id), any other id pools at the first EOS,
so configure the text encoder with ``pad_token_id=PAD_ID, bos_token_id=BOS_ID,
eos_token_id=EOS_ID``."""
PROMPT_TOKENS = 9
"""Every grammar prompt tokenizes to at most this many ids: BOS + 7 words + EOS."""

_SPECIALS = ("<pad>", "<eos>", "<bos>")
_FUNCTION_WORDS = ("a", "and", "of", "left", "right", "above", "below")
_CELL_MARGIN = 1  # background pixels kept between an object and its cell border
_MIN_OBJECT_PX = 7  # smaller shapes cannot be told apart by their geometry once blurred


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """The Shapes world: image size, grid, vocabulary and how often each category is sampled
    (uniformly by default; GenEval's prompt set is close to uniform over its six categories).

    The defaults give 32-pixel images with 7-8 pixel objects (64-pixel images: 17-19 pixels).

    Attributes:
        image_size: side of the square RGB images in pixels.
        grid: cells per side; objects sit one per cell.
        colors: names from :data:`PALETTE` used by prompts and scenes.
        shapes: names from :data:`SHAPES`.
        max_objects: largest count in ``counting`` prompts (2 to min(grid**2, 9)).
        object_scale: ``(low, high)`` object side as a fraction of the free cell side (the cell
            minus a one-pixel margin on each side); sizes are drawn uniformly in between.
        category_weights: sampling weight of each of :data:`CATEGORIES`, in that order.
    """

    image_size: int = 32
    grid: int = 3
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
    shapes: tuple[str, ...] = SHAPES
    max_objects: int = 4
    object_scale: tuple[float, float] = (0.85, 1.0)
    category_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)

    def __post_init__(self):
        if self.grid < 2:
            raise ValueError(f"grid={self.grid}: position prompts need at least 2 cells per side; "
                             "use grid >= 2")
        for field, names, known in (("colors", self.colors, PALETTE), ("shapes", self.shapes, SHAPES)):
            bad = [n for n in names if n not in known]
            if bad or len(set(names)) != len(names) or len(names) < 2:
                raise ValueError(
                    f"{field}={names!r}: need at least two distinct names from {tuple(known)} "
                    f"(unknown: {bad}); pick them from that list")
        if not 2 <= self.max_objects <= min(self.grid**2, max(NUMBER_WORDS)):
            raise ValueError(
                f"max_objects={self.max_objects}: counting prompts need 2 <= max_objects <= "
                f"min(grid**2, {max(NUMBER_WORDS)}) = {min(self.grid**2, max(NUMBER_WORDS))}; "
                "lower max_objects or raise grid")
        low, high = self.object_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"object_scale={self.object_scale}: need 0 < low <= high <= 1, e.g. "
                             "(0.85, 1.0)")
        smallest = self.object_sizes[0]
        if smallest < _MIN_OBJECT_PX:
            raise ValueError(
                f"image_size={self.image_size}, grid={self.grid}, object_scale={self.object_scale}"
                f" give {smallest}-pixel objects; shapes need >= {_MIN_OBJECT_PX} pixels to be "
                "told apart: raise image_size or object_scale[0], or lower grid")
        weights = self.category_weights
        if len(weights) != len(CATEGORIES) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"category_weights={weights}: need {len(CATEGORIES)} non-negative weights with a "
                f"positive sum, one per category in the order {CATEGORIES}")

    @property
    def cell_edges(self) -> np.ndarray:
        """``[grid + 1]`` int pixel coordinates of the cell borders (same along both axes)."""
        return np.arange(self.grid + 1) * self.image_size // self.grid

    @property
    def object_sizes(self) -> tuple[int, int]:
        """Smallest and largest object side in pixels."""
        free = int(np.diff(self.cell_edges).min()) - 2 * _CELL_MARGIN
        smallest = math.ceil(round(self.object_scale[0] * free, 6))
        return smallest, max(smallest, math.floor(round(self.object_scale[1] * free, 6)))


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of ``shape``; ``color`` None means any colour."""

    shape: str
    color: str | None = None
    count: int = 1


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt and what it asks for.

    Attributes:
        text: the words, e.g. ``"a circle left of a square"``.
        category: one of :data:`CATEGORIES`.
        objects: the objects named, in order (one, or two for the two-object categories).
        relation: for ``position``, one of :data:`RELATIONS` relating ``objects[0]`` to
            ``objects[1]``; None otherwise.
    """

    text: str
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


def _noun(spec: ObjectSpec) -> str:
    if spec.count > 1:
        return f"{NUMBER_WORDS[spec.count]} {spec.shape}s"
    return f"a {spec.color} {spec.shape}" if spec.color else f"a {spec.shape}"


def _make_prompt(category: str, objects: tuple[ObjectSpec, ...], relation: str | None) -> Prompt:
    joiner = f" {relation} " if relation else " and "
    return Prompt(joiner.join(_noun(o) for o in objects), category, objects, relation)


def sample_prompts(seed, n: int, config: ShapesConfig = ShapesConfig(),
                   categories: Sequence[str] | None = None) -> list[Prompt]:
    """``n`` random prompts from the grammar.

    Args:
        seed: int, numpy Generator or JAX key.
        n: number of prompts.
        config: the world.
        categories: restrict to these categories, drawn uniformly; None draws every category
            with ``config.category_weights``.
    """
    if categories is None:
        cats = CATEGORIES
        p = np.asarray(config.category_weights, np.float64)
    else:
        cats = tuple(categories)
        unknown = [c for c in cats if c not in CATEGORIES]
        if unknown or not cats:
            raise ValueError(f"categories={categories!r}: pick one or more of {CATEGORIES}")
        p = np.ones(len(cats))
    rng = as_rng(seed)
    n_shapes, n_colors = len(config.shapes), len(config.colors)
    cat = rng.choice(len(cats), size=n, p=p / p.sum())
    s0 = rng.integers(n_shapes, size=n)
    s1 = (s0 + rng.integers(1, n_shapes, size=n)) % n_shapes  # a different shape
    c0 = rng.integers(n_colors, size=n)
    c1 = (c0 + rng.integers(1, n_colors, size=n)) % n_colors  # a different colour
    count = rng.integers(2, config.max_objects + 1, size=n)
    rel = rng.integers(len(RELATIONS), size=n)
    prompts = []
    for i in range(n):
        category = cats[cat[i]]
        a, b = config.shapes[s0[i]], config.shapes[s1[i]]
        ca, cb = config.colors[c0[i]], config.colors[c1[i]]
        relation = None
        if category == "single_object":
            objects = (ObjectSpec(a),)
        elif category == "two_object":
            objects = (ObjectSpec(a), ObjectSpec(b))
        elif category == "counting":
            objects = (ObjectSpec(a, count=int(count[i])),)
        elif category == "colors":
            objects = (ObjectSpec(a, ca),)
        elif category == "position":
            objects, relation = (ObjectSpec(a), ObjectSpec(b)), RELATIONS[rel[i]]
        else:
            objects = (ObjectSpec(a, ca), ObjectSpec(b, cb))
        prompts.append(_make_prompt(category, objects, relation))
    return prompts


def vocabulary(config: ShapesConfig = ShapesConfig()) -> list[str]:
    """Every token of the grammar; a token's id is its index (specials first: pad, eos, bos)."""
    numbers = [NUMBER_WORDS[k] for k in range(2, config.max_objects + 1)]
    plurals = [s + "s" for s in config.shapes]
    return [*_SPECIALS, *_FUNCTION_WORDS, *numbers, *config.colors, *config.shapes, *plurals]


def _unknown_words_error(words, text: str, config: ShapesConfig) -> ValueError:
    return ValueError(
        f"unknown word(s) {words} in {text!r}; the Shapes vocabulary of this config is "
        f"{vocabulary(config)[len(_SPECIALS):]} (colours and shapes come from "
        "ShapesConfig.colors / .shapes, numbers from 'two' to max_objects)")


def tokenize(texts: str | Sequence[str], config: ShapesConfig = ShapesConfig(),
             length: int = PROMPT_TOKENS) -> np.ndarray:
    """Word-level token ids ``int32 [B, length]``: BOS, the words, EOS, then PAD.

    Words are lower-cased and split on whitespace; an unknown word raises a ValueError listing
    the vocabulary. ``ids != PAD_ID`` is the attention mask.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    index = {w: i for i, w in enumerate(vocabulary(config))}
    ids = np.full((len(texts), length), PAD_ID, np.int32)
    for row, text in enumerate(texts):
        words = text.lower().split()
        unknown = [w for w in words if w not in index or w in _SPECIALS]
        if unknown:
            raise _unknown_words_error(unknown, text, config)
        if len(words) + 2 > length:
            raise ValueError(f"{text!r} needs {len(words) + 2} tokens with BOS and EOS but "
                             f"length={length}; pass length >= {len(words) + 2}")
        ids[row, : len(words) + 2] = [BOS_ID, *(index[w] for w in words), EOS_ID]
    return ids


_FORMS = ("'a SHAPE'", "'a COLOR SHAPE'", "'NUMBER SHAPEs'", "'a SHAPE and a SHAPE'",
          "'a COLOR SHAPE and a COLOR SHAPE'", "'a SHAPE RELATION a SHAPE'")


def _grammar_error(text: str, why: str) -> ValueError:
    return ValueError(f"{text!r} {why}; the grammar's forms are {', '.join(_FORMS)} with "
                      f"RELATION in {RELATIONS} and two different shapes (colours) in a pair")


def _parse_noun(words: list[str], text: str, config: ShapesConfig) -> ObjectSpec:
    counts = {w: k for k, w in NUMBER_WORDS.items() if k <= config.max_objects}
    plurals = {s + "s": s for s in config.shapes}
    if len(words) == 2 and words[0] in counts and words[1] in plurals:
        return ObjectSpec(plurals[words[1]], count=counts[words[0]])
    if len(words) == 2 and words[0] == "a" and words[1] in config.shapes:
        return ObjectSpec(words[1])
    if len(words) == 3 and words[0] == "a" and words[1] in config.colors and words[2] in config.shapes:
        return ObjectSpec(words[2], words[1])
    raise _grammar_error(text, f"has no object phrase {' '.join(words)!r}")


def parse_prompt(text: str, config: ShapesConfig = ShapesConfig()) -> Prompt:
    """The :class:`Prompt` of a grammar sentence (lower-cased, whitespace-normalised).

    Raises:
        ValueError: listing the vocabulary for unknown words, or the grammar's forms for
            sentences that do not follow it.
    """
    words = text.lower().split()
    known = set(vocabulary(config)[len(_SPECIALS):])
    unknown = [w for w in words if w not in known]
    if unknown:
        raise _unknown_words_error(unknown, text, config)
    relation, split = None, None
    for i in range(len(words)):
        for rel in RELATIONS:
            if words[i : i + len(rel.split())] == rel.split():
                relation, split = rel, (i, i + len(rel.split()))
        if words[i] == "and" and split is None:
            split = (i, i + 1)
    if split is None:
        spec = _parse_noun(words, text, config)
        category = "counting" if spec.count > 1 else "colors" if spec.color else "single_object"
        return _make_prompt(category, (spec,), None)
    first = _parse_noun(words[: split[0]], text, config)
    second = _parse_noun(words[split[1] :], text, config)
    if first.count > 1 or second.count > 1 or first.shape == second.shape:
        raise _grammar_error(text, "does not name two single objects of different shapes")
    if relation is not None:
        if first.color or second.color:
            raise _grammar_error(text, "gives colours in a position prompt")
        return _make_prompt("position", (first, second), relation)
    if (first.color is None) != (second.color is None) or (first.color and first.color == second.color):
        raise _grammar_error(text, "needs both objects coloured, in different colours, or neither")
    return _make_prompt("color_attr" if first.color else "two_object", (first, second), None)


@functools.lru_cache(maxsize=None)
def _stamp(shape: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column offsets of the pixels of a ``size``-pixel shape (filled bbox = size^2)."""
    y, x = np.mgrid[:size, :size] + 0.5
    if shape == "square":
        mask = np.ones((size, size), bool)
    elif shape == "circle":
        mask = (y - size / 2) ** 2 + (x - size / 2) ** 2 <= (size / 2) ** 2
    else:  # upward triangle: half width at a row's lower edge is half of its depth from the apex
        mask = np.abs(x - size / 2) <= (y + 0.5) / 2
    return np.nonzero(mask)


@functools.lru_cache(maxsize=None)
def _relation_cells(grid: int, relation: str) -> np.ndarray:
    """``[N, 2]`` cell index pairs (a, b) with a ``relation`` b: offset along the axis at least
    one cell, offset across it strictly smaller."""
    row, col = np.divmod(np.arange(grid * grid), grid)
    a, b = np.meshgrid(np.arange(grid * grid), np.arange(grid * grid), indexing="ij")
    along = {"left of": col[b] - col[a], "right of": col[a] - col[b],
             "above": row[b] - row[a], "below": row[a] - row[b]}[relation]
    across = np.abs(row[a] - row[b]) if relation in ("left of", "right of") else np.abs(col[a] - col[b])
    ok = (along >= 1) & (across < along)
    return np.stack([a[ok], b[ok]], axis=1)


def render(prompts: Sequence[Prompt | str], seed, config: ShapesConfig = ShapesConfig()) -> np.ndarray:
    """Scenes satisfying ``prompts``: uint8 ``[B, image_size, image_size, 3]``.

    Each scene holds exactly the objects its prompt names, in random distinct cells (constrained
    for ``position``), with random sizes, in-cell offsets and unnamed colours. Deterministic given
    ``seed`` (int, numpy Generator or JAX key). Strings are parsed with :func:`parse_prompt`.
    """
    rng = as_rng(seed)
    prompts = [parse_prompt(p, config) if isinstance(p, str) else p for p in prompts]
    n, m, cells = len(prompts), config.max_objects, config.grid**2
    shape_index = {s: i for i, s in enumerate(config.shapes)}
    color_index = {c: i for i, c in enumerate(config.colors)}
    shape = np.full((n, m), -1)
    color = np.full((n, m), -1)
    relation = np.full(n, -1)
    for i, prompt in enumerate(prompts):
        slot = 0
        for spec in prompt.objects:
            if spec.shape not in shape_index or (spec.color and spec.color not in color_index):
                raise ValueError(f"prompt {prompt.text!r} names {spec}, outside config shapes "
                                 f"{config.shapes} / colors {config.colors}; use a matching config")
            if slot + spec.count > m:
                raise ValueError(f"prompt {prompt.text!r} has more than max_objects={m} objects; "
                                 "raise ShapesConfig.max_objects")
            shape[i, slot : slot + spec.count] = shape_index[spec.shape]
            color[i, slot : slot + spec.count] = color_index.get(spec.color, -1)
            slot += spec.count
        if prompt.relation is not None:
            relation[i] = RELATIONS.index(prompt.relation)
    color = np.where(color < 0, rng.integers(len(config.colors), size=(n, m)), color)
    cell = np.argsort(rng.random((n, cells)), axis=1)[:, :m]
    for r, name in enumerate(RELATIONS):
        rows = np.nonzero(relation == r)[0]
        pairs = _relation_cells(config.grid, name)
        cell[rows, :2] = pairs[rng.integers(len(pairs), size=len(rows))]
    low, high = config.object_sizes
    size = rng.integers(low, high + 1, size=(n, m))
    edges = config.cell_edges
    row, col = np.divmod(cell, config.grid)
    origin = []
    for index in (row, col):  # uniform offset inside the free part of the cell
        free = edges[index + 1] - edges[index] - 2 * _CELL_MARGIN - size
        origin.append(edges[index] + _CELL_MARGIN + (rng.random((n, m)) * (free + 1)).astype(int))
    images = np.zeros((n, config.image_size, config.image_size, 3), np.uint8)
    images[:] = BACKGROUND
    palette = np.array([PALETTE[c] for c in config.colors], np.uint8)
    for s, name in enumerate(config.shapes):
        for px in range(low, high + 1):
            b, k = np.nonzero((shape == s) & (size == px))
            dy, dx = _stamp(name, px)
            images[b[:, None], origin[0][b, k][:, None] + dy, origin[1][b, k][:, None] + dx] = \
                palette[color[b, k]][:, None, :]
    return images


def sample_pairs(seed, n: int, config: ShapesConfig = ShapesConfig(),
                 categories: Sequence[str] | None = None) -> tuple[list[Prompt], np.ndarray]:
    """``n`` random prompts and scenes satisfying them (uint8 ``[n, H, W, 3]``), from one seed."""
    rng = as_rng(seed)
    prompts = sample_prompts(rng, n, config, categories)
    return prompts, render(prompts, rng, config)
