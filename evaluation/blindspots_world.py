"""Ground truth for the blindspot analysis: planted-bias generators, unit-to-concept maps and recovery scores.

* :class:`WorldGenerator` is a ``Generator`` (``generate(prompts, seeds) -> GenerationResult``) that reads a
  ConceptWorld caption and draws exactly what it says -- the same objects (size, colour, shape, count) on the
  same background, at seeded random positions -- except for **planted biases**: ``suppress={"red": 1.0}``
  never draws red (each red object gets another colour, drawn uniformly), ``exaggerate={"dots": 0.6}``
  puts 60 % of the images on dots, ``copies={caption: image}`` returns a stored image for that caption
  (planted memorization). It knows the concepts it drew (:meth:`WorldGenerator.concepts`), so the truth of
  every generated image is exact.
* :func:`unit_concept_map` maps each SAE unit to the ConceptWorld concept its energy predicts best (AUROC on
  labelled real images; a unit is *mapped* when that AUROC reaches ``min_auroc``, default 0.9).
* :func:`label_changes` is the truth of a planted comparison: per concept, how its label frequency changed
  between the real and the generated set.
* :func:`planted_recovery` scores the flagged units against that truth (precision and recall at the concept
  level, defined in its docstring).
* :func:`detector_comparison` and :func:`detector_agreement` compare the flags with what the ConceptWorld
  detector reads in the real and generated images (for generators whose truth is not known).

Examples
--------
>>> gen = WorldGenerator(image_size=32, suppress={"red": 1.0})
>>> out = gen.generate(["two small red circles and a large blue star on stripes"], seeds=[0])
>>> gen.concepts(out)[["red", "blue star", "stripes", "count=3"]].values.tolist()
[[False, True, True, True]]
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "parse_caption",
    "WorldGenerator",
    "scene_concepts",
    "unit_concept_map",
    "label_changes",
    "planted_recovery",
    "detector_comparison",
    "detector_agreement",
]


# ---------------------------------------------------------------------------------------------
# captions -> scenes
# ---------------------------------------------------------------------------------------------
def _vocab() -> Any:
    from concepts.world import Vocabulary

    return Vocabulary()


def parse_caption(caption: str) -> tuple[list[tuple[str, str, str]], str]:
    """Parse a full ConceptWorld caption into its objects and background.

    Parameters
    ----------
    caption
        A caption in the language of :func:`concepts.world.caption`
        (``"two small red circles and a large blue star on stripes"``), optionally wrapped in a prompt template
        such as ``"a photo of {}"``.

    Returns
    -------
    objects : list of (size, colour, shape)
        One entry per object (a phrase with count n gives n entries).
    background : str

    Raises
    ------
    ValueError
        When the caption is not a full ConceptWorld caption (every object needs a size, a colour and a shape).

    Examples
    --------
    >>> parse_caption("two small red circles and a large blue star on stripes")
    ([('small', 'red', 'circle'), ('small', 'red', 'circle'), ('large', 'blue', 'star')], 'stripes')
    """
    from concepts.world.vocabulary import BACKGROUND_PHRASES, NUMBER_WORDS, PLURALS

    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string; got {type(caption).__name__}.")
    v = _vocab()
    text = " ".join(caption.strip().lower().split())
    background = None
    for name, phrase in sorted(BACKGROUND_PHRASES.items(), key=lambda kv: -len(kv[1])):
        pos = text.rfind(" " + phrase)
        if pos >= 0:
            background, text = name, text[:pos]
            break
    if background is None:
        raise ValueError(
            f"cannot read a background in caption {caption!r}; expected it to end with one of "
            f"{list(BACKGROUND_PHRASES.values())} (a full ConceptWorld caption)."
        )
    numbers = {w: n for n, w in NUMBER_WORDS.items()} | {"an": 1, "one": 1}
    singular = {p: s for s, p in PLURALS.items()} | {s: s for s in PLURALS}
    objects: list[tuple[str, str, str]] = []
    words = text.split()
    # skip a leading template ("a photo of ..."): start at the first number word followed by a size
    start = next((i for i in range(len(words) - 1) if words[i] in numbers and words[i + 1] in v.sizes), None)
    if start is None:
        raise ValueError(f"cannot read objects in caption {caption!r}; expected '<number> <size> <colour> <shape>'.")
    phrases = re.split(r",\s*|\s+and\s+", " ".join(words[start:]))
    for phrase in phrases:
        toks = phrase.split()
        if len(toks) != 4 or toks[0] not in numbers or toks[1] not in v.sizes or toks[2] not in v.colours or (
            toks[3] not in singular
        ):
            raise ValueError(
                f"cannot read object phrase {phrase!r} in caption {caption!r}; expected '<number> <size> <colour> "
                f"<shape>' with sizes {list(v.sizes)}, colours {v.colour_names}, shapes {list(v.shapes)}."
            )
        objects += [(toks[1], toks[2], singular[toks[3]])] * numbers[toks[0]]
    if not 1 <= len(objects) <= 9:
        raise ValueError(f"caption {caption!r} describes {len(objects)} objects; ConceptWorld draws 1 to 9.")
    return objects, background


def scene_concepts(scenes: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """ConceptWorld concept labels of drawn scenes.

    Parameters
    ----------
    scenes
        One dict per image with ``objects`` (list of ``(size, colour, shape, cell)``) and ``background``.

    Returns
    -------
    pandas.DataFrame
        Booleans, one column per ConceptWorld concept (``Vocabulary().concept_names``), with the semantics of
        :mod:`concepts.world.vocabulary` (any object carries it; exact count; one background).

    Examples
    --------
    >>> lab = scene_concepts([{"objects": [("small", "red", "circle", 0)], "background": "dots"}])
    >>> lab.loc[0, ["red", "left", "count=1"]].tolist()
    [True, True, True]
    """
    from concepts.world.render import GRID

    v = _vocab()
    names = v.concept_names
    col = {c: i for i, c in enumerate(names)}
    truth = np.zeros((len(scenes), len(names)), dtype=bool)
    for i, scene in enumerate(scenes):
        present = {scene["background"], f"count={len(scene['objects'])}"}
        for size, colour, shape, cell in scene["objects"]:
            r, c = divmod(int(cell), GRID)
            present |= {size, colour, shape, f"{colour} {shape}"}
            present |= {"left"} if c == 0 else set()
            present |= {"right"} if c == GRID - 1 else set()
            present |= {"top"} if r == 0 else set()
            present |= {"bottom"} if r == GRID - 1 else set()
        truth[i, [col[c] for c in present if c in col]] = True
    return pd.DataFrame(truth, columns=names)


class WorldGenerator:
    """A planted-bias "generator" that draws ConceptWorld captions faithfully except for chosen concepts.

    Parameters
    ----------
    image_size
        Side of the drawn images (the built-in generators draw 32 pixels).
    suppress
        ``{concept: p}``: each object (or the background) carrying ``concept`` is changed with probability
        ``p`` -- a colour, shape or size is replaced by another value of its family drawn uniformly among the
        values that are not suppressed themselves; a colour-shape pair (``"blue star"``) gets another colour; a
        background another background.
    exaggerate
        ``{concept: p}``: each object gets ``concept`` with probability ``p`` (colour, shape, size, or both
        for a pair); for a background, the image gets it with probability ``p``. Applied after ``suppress``.
    copies
        ``{caption: image}`` returned as is for that caption (uint8 ``[H, W, 3]``; resized to ``image_size``).
    world_seed
        Mixed into every image's seed.
    model_id
        Recorded in the generation records.

    Examples
    --------
    >>> gen = WorldGenerator(exaggerate={"dots": 1.0})
    >>> gen.concepts(gen.generate(["a large red circle on stripes"], seeds=[1]))["dots"].tolist()
    [True]
    """

    family = "world"

    def __init__(
        self,
        image_size: int = 32,
        *,
        suppress: Mapping[str, float] | None = None,
        exaggerate: Mapping[str, float] | None = None,
        copies: Mapping[str, np.ndarray] | None = None,
        world_seed: int = 0,
        model_id: str = "world-generator",
    ) -> None:
        from concepts.world.render import Layout, backgrounds, stamps

        v = _vocab()
        self.image_size = int(image_size)
        self._layout = Layout.for_size(self.image_size)
        self._stamps = stamps(self.image_size, tuple(v.shapes))
        self._bg = backgrounds(self.image_size)
        self._v = v
        self.suppress = self._check_edits(suppress, "suppress")
        self.exaggerate = self._check_edits(exaggerate, "exaggerate")
        self.copies = dict(copies or {})
        self.world_seed = int(world_seed)
        self.model_id = str(model_id)

    def _family(self, concept: str) -> str:
        try:
            fam = self._v.family(concept)
        except KeyError as exc:
            raise ValueError(str(exc).strip('"')) from exc
        if fam not in ("colour", "shape", "size", "colour_shape", "background"):
            raise ValueError(
                f"cannot plant a bias on {concept!r} (family {fam!r}); plant colours, shapes, sizes, colour-shape "
                "pairs or backgrounds."
            )
        return fam

    def _check_edits(self, edits: Mapping[str, float] | None, what: str) -> dict[str, float]:
        out = {}
        for concept, p in (edits or {}).items():
            self._family(concept)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{what}[{concept!r}] must be a probability in [0, 1]; got {p!r}.")
            out[concept] = float(p)
        return out

    @property
    def planted(self) -> dict[str, str]:
        """``{concept: "suppressed" | "exaggerated"}`` for every planted concept with p > 0."""
        out = {c: "suppressed" for c, p in self.suppress.items() if p > 0}
        out.update({c: "exaggerated" for c, p in self.exaggerate.items() if p > 0})
        return out

    def _other(self, rng: np.random.Generator, values: Sequence[str], current: str) -> str:
        """A value other than ``current`` and other than any suppressed value, drawn uniformly."""
        choices = [x for x in values if x != current and self.suppress.get(x, 0.0) <= 0]
        if not choices:
            raise ValueError(
                f"cannot replace {current!r}: every other value of its family {list(values)} is suppressed too; "
                "leave at least one value unsuppressed."
            )
        return choices[int(rng.integers(len(choices)))]

    def _scene(self, caption: str, rng: np.random.Generator) -> dict[str, Any]:
        from concepts.world.render import GRID

        v = self._v
        objects, background = parse_caption(caption)
        objs = [list(o) for o in objects]  # [size, colour, shape]
        for concept, p in self.suppress.items():
            fam = self._family(concept)
            if fam == "background":
                if background == concept and rng.random() < p:
                    background = self._other(rng, v.backgrounds, background)
                continue
            for o in objs:
                if fam == "colour_shape":
                    if f"{o[1]} {o[2]}" == concept and rng.random() < p:
                        o[1] = self._other(rng, v.colour_names, o[1])
                    continue
                slot = {"size": 0, "colour": 1, "shape": 2}[fam]
                if o[slot] == concept and rng.random() < p:
                    o[slot] = self._other(rng, {0: v.sizes, 1: v.colour_names, 2: v.shapes}[slot], o[slot])
        for concept, p in self.exaggerate.items():
            fam = self._family(concept)
            if fam == "background":
                if rng.random() < p:
                    background = concept
                continue
            for o in objs:
                if rng.random() < p:
                    if fam == "colour_shape":
                        o[1], o[2] = concept.split(" ", 1)
                    else:
                        o[{"size": 0, "colour": 1, "shape": 2}[fam]] = concept
        cells = np.sort(rng.choice(GRID * GRID, size=len(objs), replace=False))
        return {"objects": [(o[0], o[1], o[2], int(c)) for o, c in zip(objs, cells)], "background": background,
                "jitter": rng.random((len(objs), 2)).tolist()}

    def _draw(self, scene: Mapping[str, Any]) -> np.ndarray:
        image = self._bg[scene["background"]].copy()
        for (size, colour, shape, cell), jit in zip(scene["objects"], scene["jitter"]):
            stamp = self._stamps[(shape, size)]
            side = stamp.shape[0]
            y0, x0 = self._layout.origin(cell, side, jit)
            image[y0:y0 + side, x0:x0 + side][stamp] = self._v.colours[colour]
        return image

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], **settings: Any) -> Any:
        """Draw one image per caption.

        Parameters
        ----------
        prompts
            Full ConceptWorld captions.
        seeds
            One non-negative int per caption (positions, jitter and the planted coin flips).
        **settings
            Accepted and ignored (the protocol passes generation settings).

        Returns
        -------
        concepts.generators.GenerationResult
            Images float ``[N, H, W, 3]`` in [0, 1]; each record holds ``prompt``, ``seed``, ``family``,
            ``model_id``, ``scene`` (objects and background as drawn) and ``copied``.
        """
        import torch

        from concepts.generators import GenerationResult

        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        seeds = [seeds] if isinstance(seeds, (int, np.integer)) else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds; pass one seed per prompt.")
        images, records = [], []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
                raise ValueError(f"seeds must be non-negative integers; got {seed!r}.")
            rng = np.random.default_rng([self.world_seed, int(seed)])
            scene = self._scene(prompt, rng)
            copied = prompt in self.copies
            if copied:
                img = np.asarray(self.copies[prompt])
                if img.shape[:2] != (self.image_size, self.image_size):
                    from PIL import Image

                    img = np.asarray(Image.fromarray(img).resize((self.image_size, self.image_size), Image.NEAREST))
            else:
                img = self._draw(scene)
            images.append(img)
            records.append({"index": i, "prompt": prompt, "seed": int(seed), "family": self.family,
                            "model_id": self.model_id, "scene": scene, "copied": copied})
        x = torch.from_numpy(np.stack(images).astype(np.float32) / 255.0)
        return GenerationResult(x, records)

    def concepts(self, result: Any) -> pd.DataFrame:
        """Exact concept labels of images made by :meth:`generate` (copies get the labels of the caption's scene)."""
        records = result.records if hasattr(result, "records") else result
        return scene_concepts([r["scene"] for r in records])

    def __repr__(self) -> str:
        return f"WorldGenerator(image_size={self.image_size}, suppress={self.suppress}, exaggerate={self.exaggerate})"


# ---------------------------------------------------------------------------------------------
# units <-> ground-truth concepts
# ---------------------------------------------------------------------------------------------
def _auroc_matrix(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every score column for every label column: ``[K, C]`` (NaN for constant labels)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=0)  # average ranks for ties
    y = labels.astype(np.float64)
    n_pos = y.sum(0)
    n_neg = len(y) - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (ranks.T @ y - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[:, (n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def unit_concept_map(energy: Any, concepts: pd.DataFrame, *, min_auroc: float = 0.9) -> pd.DataFrame:
    """Map each unit to the labelled concept its energy predicts best.

    Parameters
    ----------
    energy
        ``[n, K]`` per-image energies of labelled images (``ConceptEnergies`` or array).
    concepts
        ``[n, C]`` boolean labels (ConceptWorld ``batch.concepts``).
    min_auroc
        A unit is ``mapped`` when its best AUROC reaches this.

    Returns
    -------
    pandas.DataFrame
        One row per unit: ``concept`` (unit), ``truth`` (best label column), ``auroc``, ``mapped``.

    Examples
    --------
    >>> lab = pd.DataFrame({"a": [True, False, True, False], "b": [False, False, True, True]})
    >>> unit_concept_map(np.array([[1.0], [0], [2], [0]]), lab)[["truth", "auroc", "mapped"]].values.tolist()
    [['a', 1.0, True]]
    """
    E = np.asarray(energy.energy if hasattr(energy, "energy") else energy, dtype=np.float64)
    if not isinstance(concepts, pd.DataFrame):
        raise TypeError(f"concepts must be a DataFrame of boolean labels; got {type(concepts).__name__}.")
    if E.ndim != 2 or len(E) != len(concepts):
        raise ValueError(f"energy has shape {E.shape} but concepts has {len(concepts)} rows; pass one row per image.")
    auc = _auroc_matrix(E, concepts.to_numpy(dtype=bool))
    filled = np.where(np.isnan(auc), -np.inf, auc)
    best = filled.argmax(1)
    best_auc = filled[np.arange(len(best)), best]
    dead = E.max(0) <= 0
    best_auc = np.where(dead | ~np.isfinite(best_auc), np.nan, best_auc)
    cols = list(concepts.columns)
    return pd.DataFrame({
        "concept": np.arange(E.shape[1]),
        "truth": [cols[b] if np.isfinite(a) else "" for b, a in zip(best, best_auc)],
        "auroc": best_auc,
        "mapped": np.nan_to_num(best_auc, nan=0.0) >= min_auroc,
    })


def label_changes(real_concepts: pd.DataFrame, gen_concepts: pd.DataFrame, *, fold: float = 2.0) -> pd.DataFrame:
    """How each labelled concept's frequency changed from the real to the generated set (the planted truth).

    Parameters
    ----------
    real_concepts, gen_concepts
        Boolean labels of the real and the generated images (same columns).
    fold
        A concept ``changed`` when its frequency changed at least this many fold (``delta_label`` outside
        ``[1 / (1 + fold), fold / (1 + fold)]``).

    Returns
    -------
    pandas.DataFrame
        ``truth`` (concept), ``freq_real``, ``freq_gen``, ``delta_label = f_gen / (f_real + f_gen)``,
        ``change`` in {``"suppressed"``, ``"exaggerated"``, ``""``}.

    Examples
    --------
    >>> r = pd.DataFrame({"a": [True, True, False, False]}); g = pd.DataFrame({"a": [False, False, False, True]})
    >>> label_changes(r, g)["change"].tolist()
    ['suppressed']
    """
    if list(real_concepts.columns) != list(gen_concepts.columns):
        raise ValueError("real_concepts and gen_concepts must have the same concept columns in the same order.")
    if fold <= 1:
        raise ValueError(f"fold must be > 1; got {fold}.")
    fr = real_concepts.to_numpy(dtype=float).mean(0)
    fg = gen_concepts.to_numpy(dtype=float).mean(0)
    tot = fr + fg
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(tot > 0, fg / np.where(tot > 0, tot, 1.0), np.nan)
    lo, hi = 1.0 / (1.0 + fold), fold / (1.0 + fold)
    eps = 1e-12  # "at least fold-fold": the boundary counts as changed
    change = np.where(d <= lo + eps, "suppressed", np.where(d >= hi - eps, "exaggerated", ""))
    return pd.DataFrame({"truth": list(real_concepts.columns), "freq_real": fr, "freq_gen": fg, "delta_label": d,
                         "change": change})


def _involves(concept: str, planted: str) -> bool:
    """Whether ``concept`` is ``planted`` or a composition containing it (``"red circle"`` involves ``"red"``)."""
    return concept == planted or planted in concept.split(" ")


def planted_recovery(
    concept_table: pd.DataFrame,
    unit_map: pd.DataFrame,
    truth: pd.DataFrame,
    planted: Mapping[str, str],
) -> dict[str, Any]:
    """Precision and recall of the flags against planted biases, at the concept level.

    Definitions (documented choice):

    * **units of a concept**: the units whose energy predicts that ConceptWorld concept best, with AUROC >= 0.9
      on a labelled reference sample (:func:`unit_concept_map`); a concept with at least one unit is *visible*;
    * a concept is **flagged** in a direction when at least one of its units has that status (suppressed /
      exaggerated);
    * a flagged concept is **correct** when its label frequency really changed at least two-fold in that
      direction between the real and the generated images (:func:`label_changes`): the planted concepts and the
      compositions they imply (suppressing ``red`` also suppresses ``red circle``);
    * **precision** = correct flagged concepts / flagged concepts;
    * **recall** = planted concepts found / planted concepts; a planted concept is found when a flagged concept
      involves it (itself or a composition containing it, e.g. ``red circle`` for ``red``) in the planted
      direction.

    Flagged units that map to no concept (best AUROC below 0.9) are not concepts and stay out of these two
    numbers; they are counted in ``n_unmapped_flagged`` (in ConceptWorld they are typically weak units that
    fire on combinations the planted generator made common, e.g. objects on an exaggerated background).

    Parameters
    ----------
    concept_table
        ``BlindspotResult.concepts``.
    unit_map
        :func:`unit_concept_map` on a labelled reference sample.
    truth
        :func:`label_changes` of the real vs the generated labels.
    planted
        ``{concept: "suppressed" | "exaggerated"}`` (e.g. ``WorldGenerator.planted``).

    Returns
    -------
    dict
        ``precision``, ``recall``, ``unit_precision`` (mapped flagged units whose concept changed in their
        direction / mapped flagged units), ``n_flagged_units``, ``n_unmapped_flagged``, ``n_flagged_concepts``,
        ``n_correct``, ``found`` (planted concept -> bool), ``visible`` (planted concept -> has units),
        ``table`` (one row per flagged concept: ``truth``, ``status``, ``units``, ``correct``).

    Examples
    --------
    >>> ct = pd.DataFrame({"concept": [0, 1], "status": ["suppressed", "aligned"], "delta": [0.01, 0.5]})
    >>> um = pd.DataFrame({"concept": [0, 1], "truth": ["red", "blue"], "auroc": [0.99, 0.95], "mapped": [True, True]})
    >>> tr = pd.DataFrame({"truth": ["red", "blue"], "change": ["suppressed", ""]})
    >>> r = planted_recovery(ct, um, tr, {"red": "suppressed"}); (r["precision"], r["recall"])
    (1.0, 1.0)
    """
    if not planted:
        raise ValueError("planted is empty; pass {concept: 'suppressed' | 'exaggerated'} for the planted biases.")
    bad = {c: s for c, s in planted.items() if s not in ("suppressed", "exaggerated")}
    if bad:
        raise ValueError(f"planted directions must be 'suppressed' or 'exaggerated'; got {bad}.")
    if len(unit_map) != len(concept_table):
        raise ValueError(
            f"unit_map has {len(unit_map)} units but concept_table has {len(concept_table)}; map the same SAE."
        )
    change = dict(zip(truth["truth"], truth["change"]))
    m = unit_map.set_index("concept")
    flagged = concept_table[concept_table["status"].isin(("suppressed", "exaggerated"))]
    mapped = flagged[m.loc[flagged["concept"], "mapped"].to_numpy(dtype=bool)]
    entries: dict[tuple[str, str], list[int]] = {}
    for unit, status in zip(mapped["concept"], mapped["status"]):
        entries.setdefault((str(m.loc[unit, "truth"]), status), []).append(int(unit))
    rows = [{"truth": c, "status": s, "units": ", ".join(map(str, u)), "correct": change.get(c, "") == s}
            for (c, s), u in entries.items()]
    table = pd.DataFrame(rows, columns=["truth", "status", "units", "correct"])
    found = {p: any(r["status"] == d and r["correct"] and _involves(r["truth"], p) for r in rows)
             for p, d in planted.items()}
    visible_concepts = set(unit_map.loc[unit_map["mapped"], "truth"])
    visible = {p: any(_involves(c, p) for c in visible_concepts) for p in planted}
    unit_ok = [change.get(str(m.loc[u, "truth"]), "") == s for u, s in zip(mapped["concept"], mapped["status"])]
    n_correct = int(table["correct"].sum()) if len(table) else 0
    return {
        "precision": n_correct / len(table) if len(table) else float("nan"),
        "recall": float(np.mean(list(found.values()))),
        "unit_precision": float(np.mean(unit_ok)) if unit_ok else float("nan"),
        "n_flagged_units": int(len(flagged)),
        "n_unmapped_flagged": int(len(flagged) - len(mapped)),
        "n_flagged_concepts": int(len(table)),
        "n_correct": n_correct,
        "found": found,
        "visible": visible,
        "table": table,
    }


# ---------------------------------------------------------------------------------------------
# agreement with the ConceptWorld detector
# ---------------------------------------------------------------------------------------------
def detector_comparison(detector: Any, real_images: Any, gen_images: Any, **compare_kwargs: Any) -> pd.DataFrame:
    """What the ConceptWorld detector reads in paired real and generated images, tested like the units.

    The detector's 0/1 detections are compared with :func:`evaluation.blindspots.compare_energies` (paired
    sign-flip test, BH-FDR, the same delta and thresholds), so ``delta = rate_gen / (rate_real + rate_gen)``.

    Returns
    -------
    pandas.DataFrame
        ``truth`` (concept), ``rate_real``, ``rate_gen``, ``delta``, ``q_value``, ``status``.
    """
    from .blindspots import compare_energies

    dr = detector.detect(real_images)
    dg = detector.detect(gen_images)
    res = compare_energies(dr.to_numpy(dtype=float), dg.to_numpy(dtype=float), names=list(dr.columns), pairs=False,
                           **compare_kwargs)
    c = res.concepts
    return pd.DataFrame({"truth": c["name"], "rate_real": c["E_real"], "rate_gen": c["E_gen"], "delta": c["delta"],
                         "q_value": c["q_value"], "status": c["status"]})


def detector_agreement(
    concept_table: pd.DataFrame, unit_map: pd.DataFrame, detector_table: pd.DataFrame
) -> dict[str, Any]:
    """Agreement between flagged units and the detector's flags on the concepts the units can see.

    Only concepts with at least one mapped unit are compared (the others are invisible to the SAE).

    Returns
    -------
    dict
        ``precision`` (flagged mapped concepts the detector flags in the same direction / flagged mapped
        concepts), ``recall`` (detector-flagged visible concepts that some unit flags in the same direction /
        detector-flagged visible concepts), ``delta_spearman`` (rank correlation between the detector's delta
        and the delta of each visible concept's best unit), ``n_visible``, and ``table`` (one row per visible
        concept: ``truth``, ``unit``, ``unit_status``, ``unit_delta``, ``detector_status``, ``detector_delta``,
        ``agree``).
    """
    from scipy.stats import spearmanr

    merged = concept_table.merge(unit_map, on="concept")
    merged = merged[merged["mapped"]]
    det = detector_table.set_index("truth")
    rows = []
    for truth, grp in merged.groupby("truth", sort=True):
        if truth not in det.index:
            continue
        flagged = grp[grp["status"].isin(("suppressed", "exaggerated"))]
        best = grp.sort_values("auroc", ascending=False).iloc[0]
        unit_status = flagged["status"].mode().iloc[0] if len(flagged) else (
            "aligned" if (grp["status"] != "insufficient_support").any() else "insufficient_support")
        ds = det.loc[truth, "status"]
        rows.append({"truth": truth, "unit": int(best["concept"]), "unit_status": unit_status,
                     "unit_delta": float(best["delta"]), "detector_status": ds,
                     "detector_delta": float(det.loc[truth, "delta"]),
                     "agree": (unit_status == ds) or (unit_status not in ("suppressed", "exaggerated")
                                                      and ds not in ("suppressed", "exaggerated"))})
    table = pd.DataFrame(rows, columns=["truth", "unit", "unit_status", "unit_delta", "detector_status",
                                        "detector_delta", "agree"])
    flag = ("suppressed", "exaggerated")
    uf = table[table["unit_status"].isin(flag)]
    dfl = table[table["detector_status"].isin(flag)]
    ok = table[["unit_delta", "detector_delta"]].dropna()
    return {
        "precision": float((uf["unit_status"] == uf["detector_status"]).mean()) if len(uf) else float("nan"),
        "recall": float((dfl["unit_status"] == dfl["detector_status"]).mean()) if len(dfl) else float("nan"),
        "delta_spearman": float(spearmanr(ok["unit_delta"], ok["detector_delta"])[0]) if len(ok) >= 3 else float("nan"),
        "n_visible": int(len(table)),
        "n_unit_flagged": int(len(uf)),
        "n_detector_flagged": int(len(dfl)),
        "table": table,
    }
