"""The concept vocabulary of ConceptWorld: attribute values, their colours, and concept column names.

Every image in ConceptWorld is described by a fixed set of *attributes* (per object: shape, colour,
size, grid cell; per image: background texture and object count). The *concepts* are the binary facts a
model could know about an image; their column names are stable and readable:

====================  ==============================================================
family                columns
====================  ==============================================================
``colour``            ``red``, ``green``, ``blue``, ``yellow``, ``purple``, ``orange``
``shape``             ``circle``, ``square``, ``triangle``, ``star``, ``cross``
``colour_shape``      ``red circle``, ``red square``, ... (every colour x shape)
``size``              ``small``, ``large``
``count``             ``count=1`` ... ``count=4``
``background``        ``plain``, ``stripes``, ``dots``, ``grid``
``position``          ``left``, ``right``, ``top``, ``bottom``
====================  ==============================================================

A concept is true for an image when *any* object carries it (``red``: some object is red;
``left``: some object sits in the left column of the 3x3 layout grid), except ``count=n`` (exactly n
objects) and the backgrounds (exactly one per image).
"""
from __future__ import annotations

from dataclasses import dataclass, field

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
"""Object shapes."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 20),
}
"""Object colours (flat RGB fills)."""

SIZES: tuple[str, ...] = ("small", "large")
"""Object sizes (fractions of a layout cell: see :data:`SIZE_FRACTION`)."""

SIZE_FRACTION: dict[str, float] = {"small": 0.5, "large": 0.9}
"""Object side length as a fraction of one cell of the 3x3 layout grid."""

COUNTS: tuple[int, ...] = (1, 2, 3, 4)
"""Possible numbers of objects per image."""

BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "dots", "grid")
"""Background textures."""

BACKGROUND_BASE: tuple[int, int, int] = (28, 28, 28)
"""Base colour of every background (dark grey, so every object colour contrasts with it)."""

BACKGROUND_PATTERN: tuple[int, int, int] = (78, 78, 78)
"""Colour of the texture pattern drawn on the base (stripes, dots, grid lines)."""

POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
"""Position concepts: an object in the left/right column or top/bottom row of the 3x3 layout grid."""

NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}

PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}

BACKGROUND_PHRASES: dict[str, str] = {
    "plain": "on a plain background",
    "stripes": "on stripes",
    "dots": "on dots",
    "grid": "on a grid",
}


@dataclass(frozen=True)
class Vocabulary:
    """The attribute values one :class:`~concepts.world.ConceptWorld` draws from.

    Parameters
    ----------
    shapes, colours, sizes, counts, backgrounds
        Attribute values. ``colours`` maps a colour name to its RGB fill.

    Examples
    --------
    >>> from concepts.world.vocabulary import Vocabulary
    >>> v = Vocabulary()
    >>> v.concept_names[:3]
    ['red', 'green', 'blue']
    >>> v.family("red circle")
    'colour_shape'
    """

    shapes: tuple[str, ...] = SHAPES
    colours: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(COLOURS))
    sizes: tuple[str, ...] = SIZES
    counts: tuple[int, ...] = COUNTS
    backgrounds: tuple[str, ...] = BACKGROUNDS
    positions: tuple[str, ...] = POSITIONS

    @property
    def colour_names(self) -> list[str]:
        return list(self.colours)

    @property
    def families(self) -> dict[str, list[str]]:
        """Concept columns grouped by family, in column order."""
        return {
            "colour": self.colour_names,
            "shape": list(self.shapes),
            "colour_shape": [f"{c} {s}" for c in self.colours for s in self.shapes],
            "size": list(self.sizes),
            "count": [f"count={n}" for n in self.counts],
            "background": list(self.backgrounds),
            "position": list(self.positions),
        }

    @property
    def concept_names(self) -> list[str]:
        """All concept column names, in the column order of ``batch.concepts``."""
        return [name for names in self.families.values() for name in names]

    def family(self, concept: str) -> str:
        """Return the family of a concept column name (``'colour'``, ``'shape'``, ...)."""
        for fam, names in self.families.items():
            if concept in names:
                return fam
        raise KeyError(
            f"unknown concept {concept!r}; expected one of the ConceptWorld concept names "
            f"(e.g. {self.concept_names[:4]} ...). See Vocabulary.concept_names."
        )
