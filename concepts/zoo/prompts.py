"""The text side of the ConceptWorld CLIP: zero-shot prompts, partial captions, and their exact truth.

Besides the full ConceptWorld captions (``"two small red circles and a large blue star on stripes"``) the
CLIP is trained on *partial* captions that mention only some of what an image shows (``"a red shape"``,
``"a star"``, ``"three shapes"``, ``"shapes on stripes"``, ``"a large blue star on stripes"``). A caption is
held as a :class:`CaptionSpec`, whose truth on *any* image can be computed exactly from the image's
objects, so a training batch gets an exact image x caption truth matrix (many positives per caption)
instead of the single diagonal of plain CLIP.

Semantics (documented choice):

* an object phrase ``"<n> [size] [colour] <shape|shape(s)>"`` is true when **at least** ``n`` objects carry
  all the named attributes (``"a red shape"``: some object is red);
* a total-count phrase ``"one shape"`` / ``"three shapes"`` is true when the image shows **exactly** that
  many objects (matching the ``count=n`` concept columns);
* ``"shapes on stripes"`` is true when the background is stripes;
* a full caption (``complete``) is true when the image shows exactly the same objects (as a multiset of
  size x colour x shape) on the same background.

Position concepts (``left``, ``right``, ``top``, ``bottom``) are not part of this language.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from concepts.world.captions import caption, join_phrases, object_phrase
from concepts.world.vocabulary import BACKGROUND_PHRASES, PLURALS, Vocabulary

__all__ = [
    "Phrase", "CaptionSpec", "SceneTable", "TEMPLATES", "ZERO_SHOT_FAMILIES", "concept_prompt", "caption_words",
    "sample_spec", "truth_matrix", "DEFAULT_MIX", "type_count", "type_index",
]

TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}", "an image of {}", "a picture of {}", "a rendering of {}")
"""Prompt templates seen in training (``"{}"`` is the bare caption)."""

ZERO_SHOT_FAMILIES: tuple[str, ...] = ("colour", "shape", "count", "background", "size")
"""Concept families the zero-shot benchmark scores with :func:`concept_prompt`."""

_TOTAL_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
_EXTRA_WORDS = ("the", "with", "in", "left", "right", "top", "bottom", "and", ",")

DEFAULT_MIX: dict[str, float] = {
    "full": 0.20, "partial": 0.25, "colour": 0.08, "shape": 0.10, "colour_shape": 0.07, "size": 0.08,
    "count": 0.12, "background": 0.10,
}
"""Default mixture of caption kinds drawn by :func:`sample_spec`."""


@dataclass(frozen=True)
class Phrase:
    """``"at least count objects with these attributes"`` (``None`` = any)."""

    count: int
    size: str | None = None
    colour: str | None = None
    shape: str | None = None

    def text(self) -> str:
        return object_phrase(self.count, self.size, self.colour, self.shape)


@dataclass(frozen=True)
class CaptionSpec:
    """A caption with exact semantics (see the module docstring).

    Parameters
    ----------
    phrases
        Object phrases (at-least semantics).
    total
        Exact number of objects, or ``None``.
    background
        Background name, or ``None``.
    objects
        For a full caption: every object as ``(size, colour, shape)`` in reading order (exact semantics).
    template
        Format string wrapped around the caption (one of :data:`TEMPLATES`).

    Examples
    --------
    >>> CaptionSpec(phrases=(Phrase(1, colour="red"),), background="stripes").text()
    'a red shape on stripes'
    >>> CaptionSpec(total=3, template="a photo of {}").text()
    'a photo of three shapes'
    """

    phrases: tuple[Phrase, ...] = ()
    total: int | None = None
    background: str | None = None
    objects: tuple[tuple[str, str, str], ...] | None = None
    template: str = "{}"

    def text(self) -> str:
        if self.objects is not None:
            body = caption(list(self.objects), self.background or "plain")
        else:
            parts = []
            if self.phrases:
                parts.append(join_phrases([p.text() for p in self.phrases]))
            if self.total is not None:
                parts.append(f"{_TOTAL_WORDS.get(self.total, str(self.total))} {'shape' if self.total == 1 else 'shapes'}")
            if self.background is not None:
                if not parts:
                    parts.append("shapes")
                parts.append(BACKGROUND_PHRASES.get(self.background, "on " + self.background))
            body = " ".join(parts) if parts else "shapes"
        return self.template.format(body)


@dataclass
class SceneTable:
    """Per-image object counts by (size, colour, shape) type and background index, for truth evaluation.

    Attributes
    ----------
    counts
        int ``[n, n_sizes * n_colours * n_shapes]``.
    background
        int ``[n]``, index into ``vocabulary.backgrounds``.
    """

    counts: np.ndarray
    background: np.ndarray
    vocabulary: Vocabulary = field(default_factory=Vocabulary)

    @classmethod
    def from_batch(cls, batch, vocabulary: Vocabulary | None = None) -> SceneTable:
        """Build from a :class:`~concepts.world.ConceptBatch` (its ``objects`` and ``backgrounds``)."""
        v = vocabulary or Vocabulary()
        n = len(batch)
        counts = np.zeros((n, type_count(v)), dtype=np.int64)
        obj = batch.objects
        if len(obj):
            idx = type_index(v, obj["size"].to_numpy(), obj["colour"].to_numpy(), obj["shape"].to_numpy())
            np.add.at(counts, (obj["image"].to_numpy(), idx), 1)
        bg = np.array([list(v.backgrounds).index(b) for b in batch.backgrounds], dtype=np.int64)
        return cls(counts=counts, background=bg, vocabulary=v)


def type_count(v: Vocabulary) -> int:
    return len(v.sizes) * len(v.colours) * len(v.shapes)


def type_index(v: Vocabulary, sizes, colours, shapes) -> np.ndarray:
    """Flat (size, colour, shape) type index, vectorised over arrays of names."""
    s = {name: i for i, name in enumerate(v.sizes)}
    c = {name: i for i, name in enumerate(v.colour_names)}
    h = {name: i for i, name in enumerate(v.shapes)}
    si = np.array([s[x] for x in sizes], dtype=np.int64)
    ci = np.array([c[x] for x in colours], dtype=np.int64)
    hi = np.array([h[x] for x in shapes], dtype=np.int64)
    return (si * len(c) + ci) * len(h) + hi


def _phrase_mask(v: Vocabulary, p: Phrase) -> np.ndarray:
    sizes = [p.size] if p.size else list(v.sizes)
    colours = [p.colour] if p.colour else v.colour_names
    shapes = [p.shape] if p.shape else list(v.shapes)
    mask = np.zeros(type_count(v), dtype=bool)
    for s in sizes:
        for c in colours:
            mask[type_index(v, [s] * len(shapes), [c] * len(shapes), shapes)] = True
    return mask


def truth_matrix(specs: Sequence[CaptionSpec], scenes: SceneTable) -> np.ndarray:
    """Exact truth of every caption on every image: bool ``[n_images, n_captions]``.

    Examples
    --------
    >>> from concepts.world import ConceptWorld
    >>> b = ConceptWorld(seed=0).sample(50, seed=0)
    >>> t = truth_matrix([CaptionSpec(phrases=(Phrase(1, colour="red"),))], SceneTable.from_batch(b))
    >>> bool((t[:, 0] == b.concepts["red"].to_numpy()).all())
    True
    """
    v = scenes.vocabulary
    counts = scenes.counts
    n, m = len(counts), len(specs)
    out = np.ones((n, m), dtype=bool)
    bg_index = {name: i for i, name in enumerate(v.backgrounds)}
    totals = counts.sum(axis=1)
    for j, spec in enumerate(specs):
        col = out[:, j]
        if spec.background is not None:
            col &= scenes.background == bg_index[spec.background]
        if spec.total is not None:
            col &= totals == spec.total
        if spec.objects is not None:
            ref = np.zeros(type_count(v), dtype=np.int64)
            sizes, colours, shapes = zip(*spec.objects) if spec.objects else ((), (), ())
            np.add.at(ref, type_index(v, sizes, colours, shapes), 1)
            col &= (counts == ref).all(axis=1)
        for p in spec.phrases:
            col &= counts[:, _phrase_mask(v, p)].sum(axis=1) >= p.count
    return out


def concept_prompt(concept: str, template: str = "a photo of {}", vocabulary: Vocabulary | None = None) -> str:
    """Zero-shot prompt for one concept column.

    Parameters
    ----------
    concept
        A ConceptWorld concept name of the colour, shape, colour_shape, size, count or background family.
    template
        Format string (``"{}"`` for the bare phrase).

    Examples
    --------
    >>> [concept_prompt(c) for c in ("red", "star", "count=3", "stripes", "small", "red star")]
    ['a photo of a red shape', 'a photo of a star', 'a photo of three shapes', 'a photo of shapes on stripes', \
'a photo of a small shape', 'a photo of a red star']
    """
    v = vocabulary or Vocabulary()
    fam = v.family(concept)
    if fam == "colour":
        spec = CaptionSpec(phrases=(Phrase(1, colour=concept),))
    elif fam == "shape":
        spec = CaptionSpec(phrases=(Phrase(1, shape=concept),))
    elif fam == "colour_shape":
        colour, shape = concept.split(" ", 1)
        spec = CaptionSpec(phrases=(Phrase(1, colour=colour, shape=shape),))
    elif fam == "size":
        spec = CaptionSpec(phrases=(Phrase(1, size=concept),))
    elif fam == "count":
        spec = CaptionSpec(total=int(concept.split("=")[1]))
    elif fam == "background":
        spec = CaptionSpec(background=concept)
    else:
        raise ValueError(
            f"concept {concept!r} (family {fam!r}) has no prompt: the ConceptWorld CLIP language covers colours, "
            "shapes, colour-shape pairs, sizes, counts and backgrounds; use a linear probe for positions."
        )
    return template.format(spec.text())


def caption_words(vocabulary: Vocabulary | None = None) -> list[str]:
    """Every word the caption language can produce (the tokenizer vocabulary), in a stable order."""
    v = vocabulary or Vocabulary()
    words: list[str] = ["a", "an", *[_TOTAL_WORDS[k] for k in sorted(_TOTAL_WORDS)], "shape", "shapes"]
    words += list(v.sizes) + v.colour_names
    for s in v.shapes:
        words += [s, PLURALS.get(s, s + "s")]
    for b in v.backgrounds:
        words += BACKGROUND_PHRASES.get(b, "on " + b).split()
    for t in TEMPLATES:
        words += t.replace("{}", " ").split()
    words += list(_EXTRA_WORDS)
    return list(dict.fromkeys(words))


def _draw(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def sample_spec(
    objects: Sequence[tuple[str, str, str]],
    background: str,
    rng: np.random.Generator,
    *,
    mix: dict[str, float] | None = None,
    p_template: float = 0.3,
) -> CaptionSpec:
    """Draw a random caption that is true of one image.

    Parameters
    ----------
    objects
        ``(size, colour, shape)`` per object, in reading order.
    background
        Background name.
    rng
        Source of randomness.
    mix
        Probabilities of the caption kinds (keys of :data:`DEFAULT_MIX`).
    p_template
        Probability of wrapping the caption in a non-trivial template from :data:`TEMPLATES`.

    Examples
    --------
    >>> spec = sample_spec([("small", "red", "circle")], "dots", np.random.default_rng(0))
    >>> isinstance(spec.text(), str)
    True
    """
    mix = DEFAULT_MIX if mix is None else mix
    kinds = list(mix)
    p = np.array([mix[k] for k in kinds], dtype=float)
    kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    template = _draw(rng, TEMPLATES[1:]) if rng.random() < p_template else "{}"
    objects = [tuple(o) for o in objects]

    def at_least(match) -> int:
        n = sum(1 for o in objects if match(o))
        return 1 if rng.random() < 0.75 else int(rng.integers(1, n + 1))

    if kind == "full" or not objects:
        return CaptionSpec(objects=tuple(objects), background=background, template=template)
    size, colour, shape = _draw(rng, objects)
    if kind == "colour":
        return CaptionSpec(phrases=(Phrase(at_least(lambda o: o[1] == colour), colour=colour),), template=template)
    if kind == "shape":
        return CaptionSpec(phrases=(Phrase(at_least(lambda o: o[2] == shape), shape=shape),), template=template)
    if kind == "colour_shape":
        k = at_least(lambda o: o[1:] == (colour, shape))
        return CaptionSpec(phrases=(Phrase(k, colour=colour, shape=shape),), template=template)
    if kind == "size":
        return CaptionSpec(phrases=(Phrase(at_least(lambda o: o[0] == size), size=size),), template=template)
    if kind == "count":
        bg = background if rng.random() < 0.3 else None
        return CaptionSpec(total=len(objects), background=bg, template=template)
    if kind == "background":
        return CaptionSpec(background=background, template=template)
    if kind != "partial":
        raise ValueError(f"unknown caption kind {kind!r} in mix; expected keys of DEFAULT_MIX {list(DEFAULT_MIX)}.")
    groups: dict[tuple[str, str, str], int] = {}
    for o in objects:
        groups[o] = groups.get(o, 0) + 1
    keys = list(groups)
    keep = [k for k in keys if rng.random() < 0.6] or [_draw(rng, keys)]
    merged: dict[tuple, int] = {}
    for key in keep:
        attrs = [a if rng.random() >= 0.3 else None for a in key]
        if all(a is None for a in attrs):
            j = int(rng.integers(3))
            attrs[j] = key[j]
        merged[tuple(attrs)] = merged.get(tuple(attrs), 0) + groups[key]
    phrases = tuple(Phrase(n, *attrs) for attrs, n in merged.items())
    bg = background if rng.random() < 0.5 else None
    return CaptionSpec(phrases=phrases, background=bg, template=template)
