"""Rasterisation for ConceptWorld: shape stamps, background textures and the layout grid.

Rendering is stamp-based: every (shape, size) pair is rasterised once into a boolean stamp for the
current image size, and an image is a background copy with the stamps' pixels set to flat colours. No
anti-aliasing is applied, so every object pixel has exactly its object's colour and every background pixel
is either :data:`~concepts.world.vocabulary.BACKGROUND_BASE` or
:data:`~concepts.world.vocabulary.BACKGROUND_PATTERN` — the property the ground-truth tests rely on.

Layout: the image is split into a 3x3 grid of cells; each object occupies one cell (at most one object per
cell, so objects never overlap) with a seeded jitter inside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .vocabulary import BACKGROUND_BASE, BACKGROUND_PATTERN, SIZE_FRACTION

GRID = 3
"""The layout grid is GRID x GRID cells."""

MIN_IMAGE_SIZE = 24


def _pixel_centres(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a ``side x side`` stamp, in units of the side (0..1)."""
    c = (np.arange(side) + 0.5) / side
    return np.meshgrid(c, c, indexing="xy")  # x varies along columns, y along rows


def _star_polygon(points: int = 5, inner: float = 0.42) -> np.ndarray:
    angles = np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 0.5, 0.5 * inner)
    # y grows downwards in images: the first point is at the top
    return np.stack([0.5 + radii * np.cos(angles), 0.5 - radii * np.sin(angles) + 0.04], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test on arrays of points."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < x_at)
    return inside


def shape_stamp(shape: str, side: int) -> np.ndarray:
    """Rasterise one shape into a boolean stamp ``[side, side]``.

    Parameters
    ----------
    shape
        One of ``circle``, ``square``, ``triangle``, ``star``, ``cross``.
    side
        Stamp side length in pixels (>= 3).

    Examples
    --------
    >>> shape_stamp("square", 10).sum() > shape_stamp("circle", 10).sum()
    True
    """
    if side < 3:
        raise ValueError(f"shape stamps need a side of at least 3 pixels, got {side}; use a larger image_size.")
    x, y = _pixel_centres(side)
    if shape == "circle":
        stamp = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.5**2
    elif shape == "square":
        stamp = (np.abs(x - 0.5) <= 0.42) & (np.abs(y - 0.5) <= 0.42)
    elif shape == "triangle":
        # apex at the top centre, base along the bottom
        stamp = (y >= 0.04) & (y <= 0.96) & (np.abs(x - 0.5) <= 0.5 * (y - 0.04) / 0.92)
    elif shape == "star":
        stamp = _inside_polygon(x, y, _star_polygon())
    elif shape == "cross":
        stamp = (np.abs(x - 0.5) <= 0.17) | (np.abs(y - 0.5) <= 0.17)
    else:
        raise ValueError(
            f"unknown shape {shape!r}; expected one of circle, square, triangle, star, cross."
        )
    if not stamp.any():  # pragma: no cover - guarded by the side check
        raise ValueError(f"shape {shape!r} rasterised to an empty stamp at side {side}")
    return stamp


@dataclass(frozen=True)
class Layout:
    """Pixel geometry of the 3x3 layout grid for one image size.

    Attributes
    ----------
    image_size
        Side of the square image in pixels.
    cell
        Integer cell side (``image_size // 3``); cell ``(r, c)`` starts at pixel ``(r * cell, c * cell)``
        plus an offset that centres the grid.
    sides
        Stamp side per size name.
    """

    image_size: int
    cell: int
    offset: int
    sides: dict[str, int]

    @classmethod
    def for_size(cls, image_size: int) -> Layout:
        if not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be an integer >= {MIN_IMAGE_SIZE} (32, 64 and 128 are tested), "
                f"got {image_size!r}."
            )
        cell = int(image_size) // GRID
        offset = (int(image_size) - GRID * cell) // 2
        sides = {name: max(3, int(round(frac * cell))) for name, frac in SIZE_FRACTION.items()}
        return cls(int(image_size), cell, offset, sides)

    def origin(self, cell_index: int, side: int, jitter: tuple[float, float]) -> tuple[int, int]:
        """Top-left pixel ``(y0, x0)`` of a stamp of ``side`` in cell ``cell_index`` (0..8, row-major).

        ``jitter`` in [0, 1)^2 places the stamp within the free space of the cell.
        """
        r, c = divmod(int(cell_index), GRID)
        free = self.cell - side
        y0 = self.offset + r * self.cell + int(jitter[0] * (free + 1))
        x0 = self.offset + c * self.cell + int(jitter[1] * (free + 1))
        return y0, x0


@lru_cache(maxsize=64)
def stamps(image_size: int, shapes: tuple[str, ...]) -> dict[tuple[str, str], np.ndarray]:
    """All (shape, size) stamps for an image size (cached)."""
    layout = Layout.for_size(image_size)
    return {(s, z): shape_stamp(s, side) for s in shapes for z, side in layout.sides.items()}


@lru_cache(maxsize=16)
def backgrounds(image_size: int) -> dict[str, np.ndarray]:
    """The four background textures as uint8 arrays ``[H, W, 3]`` (cached, read-only)."""
    s = int(image_size)
    y, x = np.mgrid[0:s, 0:s]
    period = max(4, s // 16)
    spacing = max(4, s // 8)
    patterns = {
        "plain": np.zeros((s, s), dtype=bool),
        "stripes": ((x + y) // (period // 2)) % 2 == 0,
        "dots": ((x % spacing) < max(1, spacing // 4)) & ((y % spacing) < max(1, spacing // 4)),
        "grid": (x % spacing == 0) | (y % spacing == 0),
    }
    out = {}
    for name, mask in patterns.items():
        img = np.empty((s, s, 3), dtype=np.uint8)
        img[:] = BACKGROUND_BASE
        img[mask] = BACKGROUND_PATTERN
        img.setflags(write=False)
        out[name] = img
    return out
