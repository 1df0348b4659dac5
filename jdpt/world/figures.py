"""Figures of Shapes-world samples: captioned image grids with pass/fail frames."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

PASS, FAIL = (40, 200, 90), (220, 50, 50)


def image_grid(images: np.ndarray, captions: Sequence[str], *, columns: int,
               passed: Sequence[bool] | None = None, scale: int = 4, row_labels: Sequence[str] | None = None
               ) -> Image.Image:
    """A grid of uint8 ``images [N, H, W, 3]`` scaled by ``scale`` (nearest), each with its
    caption below and, when ``passed`` is given, a green (pass) or red (fail) frame.

    ``row_labels`` (one per row) are written in a column on the left.
    """
    images = np.asarray(images)
    n, h, w, _ = images.shape
    if len(captions) != n or (passed is not None and len(passed) != n):
        raise ValueError(f"{n} images need {n} captions (and pass flags); got {len(captions)}")
    rows = -(-n // columns)
    cw, ch = w * scale, h * scale
    frame = 3
    chars = max(8, (cw + 2 * frame) // 6)
    lines = max(len(textwrap.wrap(c, chars)) or 1 for c in captions)
    cell_w, cell_h = cw + 2 * frame + 6, ch + 2 * frame + 12 * lines + 8
    label_w = 0 if row_labels is None else 8 + 6 * max(len(s) for s in row_labels)
    canvas = Image.new("RGB", (label_w + columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, columns)
        x, y = label_w + c * cell_w + 3, r * cell_h + 3
        if passed is not None:
            draw.rectangle([x, y, x + cw + 2 * frame - 1, y + ch + 2 * frame - 1], fill=PASS if passed[i] else FAIL)
        tile = Image.fromarray(images[i]).resize((cw, ch), Image.NEAREST)
        canvas.paste(tile, (x + frame, y + frame))
        for k, line in enumerate(textwrap.wrap(captions[i], chars)):
            draw.text((x, y + ch + 2 * frame + 2 + 12 * k), line, fill=(0, 0, 0))
    for r, label in enumerate(row_labels or []):
        draw.text((4, r * cell_h + cell_h // 2 - 6), label, fill=(0, 0, 0))
    return canvas
