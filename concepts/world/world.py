"""ConceptWorld: a seeded, parametric procedural image world with exact concept ground truth."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .captions import caption
from .render import GRID, Layout, backgrounds, stamps
from .rules import DEFAULT_FALLBACK, DEFAULT_RULES, Rule, assign_classes
from .vocabulary import Vocabulary

logger = logging.getLogger(__name__)

MAX_OBJECTS = 4
_OBJECT_FAMILIES = ("colour", "shape", "size")


@dataclass(frozen=True)
class Correlation:
    """A planted co-occurrence: when an image shows ``if_concept``, with probability ``p`` it also shows
    ``then_concept`` (an object is recoloured / reshaped / resized, or the background is changed).

    Parameters
    ----------
    if_concept
        Any concept column name (``'red'``, ``'red circle'``, ``'count=3'``, ``'stripes'``, ...).
    then_concept
        A colour, shape, size or background name.
    p
        Probability in [0, 1].
    """

    if_concept: str
    then_concept: str
    p: float = 1.0


@dataclass(frozen=True, eq=False)
class ConceptBatch:
    """A sample of ConceptWorld images with their ground truth.

    Attributes
    ----------
    images
        uint8 ``[n, H, W, 3]``.
    concepts
        DataFrame of bools ``[n, n_concepts]``, one column per concept name.
    masks
        bool ``[n, 4, H, W]``: instance mask of object slot ``j`` (all False for unused slots).
    captions
        One caption per image.
    labels
        int ``[n]``: class index under the world's rules.
    class_names
        Class names, indexed by label.
    objects
        One row per object: ``image``, ``slot``, ``shape``, ``colour``, ``size``, ``cell``, ``row``, ``col``,
        ``y0``, ``x0``, ``side``.
    backgrounds
        Background name per image.
    seeds
        ``(world_seed, sample_seed, index)`` per image: enough to re-render any single image.
    """

    images: np.ndarray
    concepts: pd.DataFrame
    masks: np.ndarray
    captions: list[str]
    labels: np.ndarray
    class_names: list[str]
    objects: pd.DataFrame
    backgrounds: list[str]
    seeds: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def concept_names(self) -> list[str]:
        return list(self.concepts.columns)

    @property
    def class_label_names(self) -> list[str]:
        """Class name per image."""
        return [self.class_names[i] for i in self.labels]

    def __getitem__(self, idx: Any) -> ConceptBatch:
        """Select images (int, slice, boolean mask or index array) and return a new batch."""
        index = np.arange(len(self))[idx]
        index = np.atleast_1d(index)
        objects = self.objects[self.objects["image"].isin(index)].copy()
        remap = {old: new for new, old in enumerate(index)}
        objects["image"] = objects["image"].map(remap)
        return ConceptBatch(
            images=self.images[index],
            concepts=self.concepts.iloc[index].reset_index(drop=True),
            masks=self.masks[index],
            captions=[self.captions[i] for i in index],
            labels=self.labels[index],
            class_names=list(self.class_names),
            objects=objects.reset_index(drop=True),
            backgrounds=[self.backgrounds[i] for i in index],
            seeds=self.seeds[index],
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per image: caption, label, class name, background and the concept columns."""
        head = pd.DataFrame(
            {
                "caption": self.captions,
                "label": self.labels,
                "class_name": self.class_label_names,
                "background": self.backgrounds,
            }
        )
        return pd.concat([head, self.concepts], axis=1)

    def sheet(self, n: int = 16, ncols: int = 8, ax=None, captions: bool = False):
        """Plot a contact sheet of the first ``n`` images; returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        n = min(n, len(self))
        nrows = int(np.ceil(n / ncols))
        h, w = self.images.shape[1:3]
        pad = 2
        canvas = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
        for i in range(n):
            r, c = divmod(i, ncols)
            canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = (
                self.images[i]
            )
        if ax is None:
            _, ax = plt.subplots(figsize=(ncols * 1.2, nrows * 1.3))
        ax.imshow(canvas, interpolation="nearest")
        ax.set_axis_off()
        if captions:
            ax.set_title("\n".join(f"{i}: {self.captions[i]}" for i in range(n)), fontsize=6, loc="left")
        return ax


def _weights(default: Sequence[str], override: Mapping[str, float] | None, what: str) -> np.ndarray:
    w = np.ones(len(default), dtype=float)
    if override:
        for name, value in override.items():
            if name not in default:
                raise ValueError(f"unknown {what} {name!r} in {what}_probs; expected one of {list(default)}.")
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{what}_probs[{name!r}] must be a finite weight >= 0, got {value!r}.")
            w[list(default).index(name)] = float(value)
    if w.sum() <= 0:
        raise ValueError(f"all {what} weights are zero; at least one {what} must have a positive weight.")
    return w / w.sum()


class ConceptWorld:
    """The built-in ground-truth image world.

    Images show 1-4 flat-coloured objects (shape x colour x size) placed in the cells of a 3x3 grid on a
    textured background. Every concept of every image is known exactly (see
    :mod:`concepts.world.vocabulary`), together with per-object instance masks, a caption and a class
    from a decision list of concept rules (:mod:`concepts.world.rules`).

    Frequencies and co-occurrences are parameters, so a test can plant biases: a missing concept
    (weight 0), a rare or over-frequent one, or a correlation between two concepts.

    Parameters
    ----------
    seed
        World seed; with the sample seed and the image index it determines every image.
    image_size
        Side of the square RGB images (>= 24; 32, 64 and 128 are tested).
    shape_probs, colour_probs, size_probs, count_probs, background_probs
        Relative weights per attribute value; values not named keep weight 1 (so ``{"red": 0}`` removes
        red and ``{"red": 4}`` makes it four times as likely as any other colour). ``count_probs`` is
        keyed by the integer count.
    colour_shape_weights
        Multipliers on the joint (colour, shape) weight of each object, e.g. ``{("red", "circle"): 0}``
        (red circles never appear) or ``{("blue", "star"): 10}``.
    correlations
        Planted co-occurrences (:class:`Correlation` or ``(if_concept, then_concept, p)`` tuples), applied
        in order after the attributes are drawn.
    rules
        Class decision list (default :data:`~concepts.world.rules.DEFAULT_RULES`).
    fallback_class
        Name of the class for images that match no rule (``None`` to require a match).
    vocabulary
        The attribute values (default: 5 shapes, 6 colours, 2 sizes, 4 backgrounds, counts 1-4).

    Examples
    --------
    >>> world = ConceptWorld(seed=0, image_size=64)
    >>> batch = world.sample(8, seed=1)
    >>> batch.images.shape
    (8, 64, 64, 3)
    >>> bool(batch.concepts.loc[0, "count=1"]) == (batch.objects.query("image == 0").shape[0] == 1)
    True
    """

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 64,
        *,
        shape_probs: Mapping[str, float] | None = None,
        colour_probs: Mapping[str, float] | None = None,
        size_probs: Mapping[str, float] | None = None,
        count_probs: Mapping[int, float] | None = None,
        background_probs: Mapping[str, float] | None = None,
        colour_shape_weights: Mapping[tuple[str, str], float] | None = None,
        correlations: Sequence[Correlation | tuple[str, str, float]] = (),
        rules: Sequence[Rule] = DEFAULT_RULES,
        fallback_class: str | None = DEFAULT_FALLBACK,
        vocabulary: Vocabulary | None = None,
    ) -> None:
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
        self.seed = int(seed)
        self.layout = Layout.for_size(image_size)
        self.image_size = int(image_size)
        self.vocabulary = vocabulary or Vocabulary()
        v = self.vocabulary
        self._shapes = list(v.shapes)
        self._colours = v.colour_names
        self._sizes = list(v.sizes)
        self._backgrounds = list(v.backgrounds)
        self._counts = list(v.counts)
        if max(self._counts) > MAX_OBJECTS or min(self._counts) < 1:
            raise ValueError(f"counts must lie in 1..{MAX_OBJECTS}, got {self._counts}.")
        for name in self._backgrounds:
            if name not in backgrounds(self.image_size):
                raise ValueError(f"unknown background {name!r}; available: {list(backgrounds(self.image_size))}.")

        self.shape_p = _weights(self._shapes, shape_probs, "shape")
        self.colour_p = _weights(self._colours, colour_probs, "colour")
        self.size_p = _weights(self._sizes, size_probs, "size")
        self.background_p = _weights(self._backgrounds, background_probs, "background")
        count_override = {str(k): v for k, v in (count_probs or {}).items()}
        self.count_p = _weights([str(c) for c in self._counts], count_override, "count")

        joint = np.outer(self.colour_p, self.shape_p)
        for key, mult in (colour_shape_weights or {}).items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise ValueError(
                    f"colour_shape_weights keys must be (colour, shape) tuples, got {key!r}; "
                    "e.g. {('red', 'circle'): 0}."
                )
            colour, shape = key
            if colour not in self._colours or shape not in self._shapes:
                raise ValueError(
                    f"unknown (colour, shape) {key!r}; colours are {self._colours}, shapes are {self._shapes}."
                )
            if not np.isfinite(mult) or mult < 0:
                raise ValueError(f"colour_shape_weights[{key!r}] must be a finite multiplier >= 0, got {mult!r}.")
            joint[self._colours.index(colour), self._shapes.index(shape)] *= mult
        if joint.sum() <= 0:
            raise ValueError("colour_shape_weights remove every (colour, shape) pair; keep at least one positive.")
        self.colour_shape_p = (joint / joint.sum()).ravel()

        self.concept_names: list[str] = v.concept_names
        self._col = {name: i for i, name in enumerate(self.concept_names)}
        self.correlations = tuple(self._check_correlation(c) for c in correlations)

        self.rules = tuple(rules)
        for rule in self.rules:
            unknown = [c for c in rule.concepts if c not in self._col]
            if unknown:
                raise ValueError(
                    f"class rule {rule.name!r} reads unknown concepts {unknown}; "
                    f"valid concept names include {self.concept_names[:6]} ... (ConceptWorld.concept_names)."
                )
        self.fallback_class = fallback_class
        self.class_names: list[str] = [r.name for r in self.rules] + (
            [fallback_class] if fallback_class is not None else []
        )
        self._stamps = stamps(self.image_size, tuple(self._shapes))
        self._backgrounds_px = backgrounds(self.image_size)
        self._next_seed = 0

    # ------------------------------------------------------------------ configuration helpers
    def _check_correlation(self, c: Correlation | tuple) -> Correlation:
        if not isinstance(c, Correlation):
            if not (isinstance(c, tuple) and len(c) in (2, 3)):
                raise ValueError(
                    f"a correlation must be Correlation(if_concept, then_concept, p) or a tuple of that form, got {c!r}."
                )
            c = Correlation(*c)
        if c.if_concept not in self._col:
            raise ValueError(f"correlation reads unknown concept {c.if_concept!r}; see ConceptWorld.concept_names.")
        fam = self.vocabulary.family(c.then_concept) if c.then_concept in self._col else None
        if fam not in ("colour", "shape", "size", "background"):
            raise ValueError(
                f"correlation target {c.then_concept!r} must be a colour, shape, size or background name "
                "(object attributes and backgrounds can be planted; counts and positions cannot)."
            )
        if not 0.0 <= float(c.p) <= 1.0:
            raise ValueError(f"correlation probability must lie in [0, 1], got {c.p!r}.")
        return c

    def get_params(self) -> dict[str, Any]:
        """The world's configuration (JSON-friendly), recorded with saved samples."""
        return {
            "seed": self.seed,
            "image_size": self.image_size,
            "shape_p": dict(zip(self._shapes, self.shape_p.round(6).tolist())),
            "colour_p": dict(zip(self._colours, self.colour_p.round(6).tolist())),
            "size_p": dict(zip(self._sizes, self.size_p.round(6).tolist())),
            "count_p": dict(zip(map(str, self._counts), self.count_p.round(6).tolist())),
            "background_p": dict(zip(self._backgrounds, self.background_p.round(6).tolist())),
            "correlations": [[c.if_concept, c.then_concept, c.p] for c in self.correlations],
            "rules": [
                {"name": r.name, "all_of": list(r.all_of), "any_of": list(r.any_of), "none_of": list(r.none_of)}
                for r in self.rules
            ],
            "fallback_class": self.fallback_class,
        }

    def __repr__(self) -> str:
        return (
            f"ConceptWorld(seed={self.seed}, image_size={self.image_size}, "
            f"{len(self.concept_names)} concepts, {len(self.class_names)} classes)"
        )

    # ------------------------------------------------------------------ sampling
    def _draw(self, rng: np.random.Generator) -> tuple[list[list], str]:
        """Draw the attributes of one image: objects ``[cell, shape, colour, size]`` and the background."""
        count = self._counts[rng.choice(len(self._counts), p=self.count_p)]
        cells = np.sort(rng.choice(GRID * GRID, size=count, replace=False))
        pairs = rng.choice(len(self.colour_shape_p), size=count, p=self.colour_shape_p)
        sizes = rng.choice(len(self._sizes), size=count, p=self.size_p)
        n_shapes = len(self._shapes)
        objects = [
            [int(cell), self._shapes[pair % n_shapes], self._colours[pair // n_shapes], self._sizes[size]]
            for cell, pair, size in zip(cells, pairs, sizes)
        ]
        background = self._backgrounds[rng.choice(len(self._backgrounds), p=self.background_p)]
        for corr in self.correlations:
            present = self._present(objects, background)
            if corr.if_concept in present and corr.then_concept not in present and rng.random() < corr.p:
                background = self._plant(objects, background, corr, rng)
        return objects, background

    def _object_concepts(self, obj: list) -> set[str]:
        cell, shape, colour, size = obj
        r, c = divmod(cell, GRID)
        out = {shape, colour, f"{colour} {shape}", size}
        if c == 0:
            out.add("left")
        if c == GRID - 1:
            out.add("right")
        if r == 0:
            out.add("top")
        if r == GRID - 1:
            out.add("bottom")
        return out

    def _present(self, objects: list[list], background: str) -> set[str]:
        present = {background, f"count={len(objects)}"}
        for obj in objects:
            present |= self._object_concepts(obj)
        return present

    def _plant(self, objects: list[list], background: str, corr: Correlation, rng: np.random.Generator) -> str:
        fam = self.vocabulary.family(corr.then_concept)
        if fam == "background":
            return corr.then_concept
        slot = {"shape": 1, "colour": 2, "size": 3}[fam]
        carriers = [o for o in objects if corr.if_concept in self._object_concepts(o)]
        # editing the carrier itself must not destroy the condition (e.g. red -> blue on the red object)
        if carriers and corr.if_concept not in self._object_concepts(
            [carriers[0][0]] + [corr.then_concept if i + 1 == slot else v for i, v in enumerate(carriers[0][1:])]
        ):
            carriers = [o for o in objects if o not in carriers]
        target = carriers if carriers else objects
        obj = target[int(rng.integers(len(target)))]
        obj[slot] = corr.then_concept
        return background

    def render_one(self, sample_seed: int, index: int) -> tuple[np.ndarray, np.ndarray, list[list], str]:
        """Render image ``index`` of sample ``sample_seed``: ``(image [H,W,3], masks [4,H,W], objects, background)``.

        ``objects`` rows are ``[cell, shape, colour, size, y0, x0, side]``.
        """
        rng = np.random.default_rng([self.seed, int(sample_seed), int(index)])
        objects, background = self._draw(rng)
        s = self.image_size
        image = self._backgrounds_px[background].copy()
        masks = np.zeros((MAX_OBJECTS, s, s), dtype=bool)
        jitter = rng.random((len(objects), 2))
        rows = []
        for j, (cell, shape, colour, size) in enumerate(objects):
            stamp = self._stamps[(shape, size)]
            side = stamp.shape[0]
            y0, x0 = self.layout.origin(cell, side, jitter[j])
            masks[j, y0:y0 + side, x0:x0 + side] = stamp
            image[y0:y0 + side, x0:x0 + side][stamp] = self.vocabulary.colours[colour]
            rows.append([cell, shape, colour, size, y0, x0, side])
        return image, masks, rows, background

    def sample(self, n: int, seed: int | None = None, *, start: int = 0) -> ConceptBatch:
        """Render ``n`` images with their ground truth.

        Parameters
        ----------
        n
            Number of images (>= 1).
        seed
            Sample seed. Image ``i`` depends only on ``(world seed, seed, start + i)``, so a sample is
            reproducible and its images do not depend on ``n``. ``None`` uses a counter that advances with
            each call (successive calls give new images).
        start
            Index of the first image (take disjoint slices of one large sample with ``start``).

        Returns
        -------
        ConceptBatch
        """
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer number of images, got {n!r}.")
        if seed is None:
            seed = 1_000_003 + self._next_seed
            self._next_seed += 1
        s = self.image_size
        images = np.empty((n, s, s, 3), dtype=np.uint8)
        masks = np.zeros((n, MAX_OBJECTS, s, s), dtype=bool)
        truth = np.zeros((n, len(self.concept_names)), dtype=bool)
        captions: list[str] = []
        bgs: list[str] = []
        object_rows: list[list] = []
        for i in range(n):
            image, m, rows, background = self.render_one(seed, start + i)
            images[i] = image
            masks[i] = m
            present = self._present([r[:4] for r in rows], background)
            truth[i, [self._col[c] for c in present]] = True
            captions.append(caption([(r[3], r[2], r[1]) for r in rows], background))
            bgs.append(background)
            for j, r in enumerate(rows):
                object_rows.append([i, j, r[1], r[2], r[3], r[0], r[0] // GRID, r[0] % GRID, r[4], r[5], r[6]])
        concepts = pd.DataFrame(truth, columns=self.concept_names)
        objects = pd.DataFrame(
            object_rows,
            columns=["image", "slot", "shape", "colour", "size", "cell", "row", "col", "y0", "x0", "side"],
        )
        labels = assign_classes(concepts, self.rules, self.fallback_class)
        seeds = np.stack(
            [np.full(n, self.seed), np.full(n, seed), np.arange(start, start + n)], axis=1
        ).astype(np.int64)
        return ConceptBatch(
            images=images,
            concepts=concepts,
            masks=masks,
            captions=captions,
            labels=labels,
            class_names=list(self.class_names),
            objects=objects,
            backgrounds=bgs,
            seeds=seeds,
        )

    def dataset(self, n: int, seed: int = 0, *, start: int = 0, transform=None, target: str = "label"):
        """A torch ``Dataset`` view of ``sample(n, seed, start=start)`` that renders items lazily.

        See :class:`concepts.world.dataset.ConceptWorldDataset`.
        """
        from .dataset import ConceptWorldDataset

        return ConceptWorldDataset(self, n, seed, start=start, transform=transform, target=target)
