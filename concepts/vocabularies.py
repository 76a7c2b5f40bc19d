"""Concept vocabularies and concept lists: built-in offline word lists, lists read from files, and filters.

A :class:`ConceptVocabulary` pairs the *names* a concept can be given with the *phrases* a text encoder
embeds for them (``'count=2'`` is embedded as ``'two shapes'``). Three vocabularies ship offline:

- a user list (:func:`user_vocabulary`, or any list of strings / a text file via :func:`get_vocabulary`);
- the ConceptWorld vocabulary with readable phrases (:func:`conceptworld_vocabulary`), the ground truth
  of the built-in world;
- a general English vocabulary (:func:`english_vocabulary`): the 1000 ImageNet class names bundled with
  open_clip (998 distinct), so nothing is downloaded.

Concept lists come from files in two layouts (:func:`read_concept_list`): plain text, one concept per
line, and the JSON layout ``{class: [concepts, ...]}`` of concept-guided zero-shot classifiers (e.g. the
CGBC ``results.json`` files). :func:`filter_concepts` and :func:`filter_class_concepts` drop exact
duplicates, near-duplicates (text-embedding cosine above a threshold to an already kept concept) and
concepts too similar to a class name, and report what was dropped and why.

Examples
--------
>>> from concepts.vocabularies import conceptworld_vocabulary
>>> v = conceptworld_vocabulary()
>>> v.phrase("count=2"), v.phrase("red circle"), v.phrase("stripes")
('two shapes', 'a red circle', 'shapes on stripes')
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import pandas as pd
import torch

from .bank import ConceptBank, Template, embed_texts

logger = logging.getLogger(__name__)

__all__ = [
    "ConceptVocabulary",
    "user_vocabulary",
    "conceptworld_vocabulary",
    "english_vocabulary",
    "get_vocabulary",
    "read_concept_list",
    "read_class_concepts",
    "ConceptFilterResult",
    "filter_concepts",
    "filter_class_concepts",
]

VocabularyLike = Union["ConceptVocabulary", str, os.PathLike, Sequence[str]]

_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}


@dataclass(frozen=True)
class ConceptVocabulary:
    """Candidate concept names and the phrases a text encoder embeds for them.

    Parameters
    ----------
    names
        Unique names ``[V]`` (what a concept is called).
    phrases
        Texts to embed ``[V]`` (default: the names).
    source
        Where the vocabulary comes from (``'user'``, ``'conceptworld'``, ``'english'``, a file path).
    families
        Optional group per name (the ConceptWorld family: ``'colour'``, ``'shape'``, ...).

    Examples
    --------
    >>> v = ConceptVocabulary(["dog", "cat"], phrases=["a dog", "a cat"])
    >>> len(v), v.phrase("cat")
    (2, 'a cat')
    """

    names: tuple[str, ...]
    phrases: tuple[str, ...] | None = None
    source: str = "user"
    families: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.names, str) or not isinstance(self.names, Sequence):
            raise TypeError(f"names must be a list of strings; got {type(self.names).__name__}.")
        names = tuple(self.names)
        if not names:
            raise ValueError("a vocabulary needs at least one name; got an empty list.")
        bad = [n for n in names if not isinstance(n, str) or not n.strip()]
        if bad:
            raise ValueError(f"vocabulary names must be non-empty strings; got {bad[0]!r}.")
        seen: set[str] = set()
        dup = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
        if dup:
            raise ValueError(
                f"vocabulary names must be unique; repeated: {dup[:5]}. Use user_vocabulary(...), which drops "
                "repeats, or deduplicate the list first."
            )
        phrases = names if self.phrases is None else tuple(self.phrases)
        if len(phrases) != len(names):
            raise ValueError(f"got {len(phrases)} phrases for {len(names)} names; pass one phrase per name.")
        badp = [p for p in phrases if not isinstance(p, str) or not p.strip()]
        if badp:
            raise ValueError(f"vocabulary phrases must be non-empty strings; got {badp[0]!r}.")
        families = None if self.families is None else tuple(self.families)
        if families is not None and len(families) != len(names):
            raise ValueError(f"got {len(families)} families for {len(names)} names; pass one per name.")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "phrases", phrases)
        object.__setattr__(self, "families", families)

    def __len__(self) -> int:
        return len(self.names)

    def phrase(self, name: str) -> str:
        """The phrase embedded for ``name``."""
        try:
            return self.phrases[self.names.index(name)]  # type: ignore[index]
        except ValueError:
            raise KeyError(f"{name!r} is not in the {self.source!r} vocabulary ({len(self)} names).") from None

    def family_of(self) -> dict[str, str]:
        """``{name: family}`` (empty when the vocabulary has no families)."""
        if self.families is None:
            return {}
        return dict(zip(self.names, self.families))

    def to_frame(self) -> pd.DataFrame:
        """One row per name: ``name``, ``phrase`` (and ``family``)."""
        df = pd.DataFrame({"name": list(self.names), "phrase": list(self.phrases)})  # type: ignore[arg-type]
        if self.families is not None:
            df["family"] = list(self.families)
        return df

    def embed(
        self,
        encoder: Any,
        templates: Template | Sequence[Template] | None = None,
        *,
        batch_size: int = 256,
        progress: bool = False,
    ) -> ConceptBank:
        """Embed the phrases: a :class:`~concepts.bank.ConceptBank` named by the vocabulary names.

        The result can be passed as ``vocabulary`` to :func:`concepts.naming.name_concepts` to reuse the
        embeddings across calls.

        Examples
        --------
        >>> import torch
        >>> v = ConceptVocabulary(["a", "b"])
        >>> v.embed(lambda ts: torch.eye(2)[[0 if t == "a" else 1 for t in ts]]).names
        ('a', 'b')
        """
        meta: dict[str, Any] = {"vocabulary": self.source}
        if self.families is not None:
            meta["families"] = list(self.families)
        return ConceptBank.from_texts(encoder, list(self.phrases), templates,  # type: ignore[arg-type]
                                      names=list(self.names), batch_size=batch_size, progress=progress,
                                      metadata=meta)


def _unique(items: Sequence[str]) -> tuple[list[str], int]:
    seen: set[str] = set()
    out = []
    for it in items:
        if it not in seen:
            seen.add(it)
            out.append(it)
    return out, len(items) - len(out)


def user_vocabulary(
    names: Sequence[str],
    phrases: Sequence[str] | None = None,
    *,
    source: str = "user",
) -> ConceptVocabulary:
    """A vocabulary from a list; repeated names are dropped (the first one is kept).

    Examples
    --------
    >>> user_vocabulary(["dog", "cat", "dog"]).names
    ('dog', 'cat')
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a list of strings; got {type(names).__name__}.")
    names = [n.strip() if isinstance(n, str) else n for n in names]
    if phrases is None:
        kept, dropped = _unique(names)
        kept_phrases = None
    else:
        if len(phrases) != len(names):
            raise ValueError(f"got {len(phrases)} phrases for {len(names)} names; pass one phrase per name.")
        first: dict[str, str] = {}
        for n, p in zip(names, phrases):
            first.setdefault(n, p)
        kept, kept_phrases = list(first), list(first.values())
        dropped = len(names) - len(kept)
    if dropped:
        logger.info("user_vocabulary: dropped %d repeated names", dropped)
    return ConceptVocabulary(tuple(kept), None if kept_phrases is None else tuple(kept_phrases), source=source)


def conceptworld_vocabulary(
    vocabulary: Any = None,
    *,
    families: Sequence[str] | None = None,
    style: str = "readable",
) -> ConceptVocabulary:
    """The ConceptWorld concept names with phrases in the language of its captions.

    Parameters
    ----------
    vocabulary
        A :class:`concepts.world.Vocabulary` (default: the standard one).
    families
        Restrict to these families (``'colour'``, ``'shape'``, ``'colour_shape'``, ``'size'``,
        ``'count'``, ``'background'``, ``'position'``).
    style
        ``"readable"``: phrases in the caption language the built-in ConceptWorld CLIP is trained on
        (:func:`concepts.zoo.prompts.concept_prompt`): ``'red'`` -> ``'a red shape'``, ``'circle'`` ->
        ``'a circle'``, ``'red circle'`` -> ``'a red circle'``, ``'small'`` -> ``'a small shape'``,
        ``'count=2'`` -> ``'two shapes'``, ``'stripes'`` -> ``'shapes on stripes'``; positions, which that
        language lacks, become ``'on the left'``, ``'at the top'``, ... ``"bare"``: the concept names
        themselves (Discover-then-Name embeds bare words).

    Examples
    --------
    >>> v = conceptworld_vocabulary(families=["colour", "background"])
    >>> v.names[:2], v.phrases[:2]
    (('red', 'green'), ('a red shape', 'a green shape'))
    """
    from .world.vocabulary import Vocabulary
    from .zoo.prompts import concept_prompt

    vocab = Vocabulary() if vocabulary is None else vocabulary
    if style not in ("readable", "bare"):
        raise ValueError(f"style must be 'readable' or 'bare'; got {style!r}.")
    all_families = vocab.families
    if families is None:
        chosen = list(all_families)
    else:
        if isinstance(families, str):
            families = [families]
        unknown = [f for f in families if f not in all_families]
        if unknown:
            raise ValueError(f"unknown ConceptWorld families {unknown}; choose from {list(all_families)}.")
        chosen = list(families)

    def readable(fam: str, name: str) -> str:
        if fam == "position":
            return _POSITION_PHRASES.get(name, name)
        return concept_prompt(name, "{}", vocabulary=vocab)

    names, phrases, fams = [], [], []
    for fam in chosen:
        for name in all_families[fam]:
            names.append(name)
            phrases.append(readable(fam, name) if style == "readable" else name)
            fams.append(fam)
    return ConceptVocabulary(tuple(names), tuple(phrases), source="conceptworld", families=tuple(fams))


def english_vocabulary() -> ConceptVocabulary:
    """A general English vocabulary that ships offline: the ImageNet class names bundled with open_clip.

    The 1000 names contain two repeats (``'crane'``, ``'maillot'``), so the vocabulary has 998 names.

    Examples
    --------
    >>> v = english_vocabulary()
    >>> len(v), v.names[:2]
    (998, ('tench', 'goldfish'))
    """
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names, dropped = _unique(list(IMAGENET_CLASSNAMES))
    logger.debug("english_vocabulary: dropped %d repeated ImageNet names", dropped)
    return ConceptVocabulary(tuple(names), source="english")


_BUILTIN = {"conceptworld": conceptworld_vocabulary, "english": english_vocabulary, "imagenet": english_vocabulary}


def get_vocabulary(spec: VocabularyLike) -> ConceptVocabulary:
    """Resolve a vocabulary spec.

    Parameters
    ----------
    spec
        A :class:`ConceptVocabulary`; ``"conceptworld"``; ``"english"`` (alias ``"imagenet"``); a path to
        a text file (one concept per line) or to a JSON concept list (all concepts of all classes); or a
        list of strings.

    Examples
    --------
    >>> get_vocabulary(["sky", "grass"]).names
    ('sky', 'grass')
    >>> len(get_vocabulary("conceptworld"))
    55
    """
    if isinstance(spec, ConceptVocabulary):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        key = str(spec)
        if key.lower() in _BUILTIN:
            return _BUILTIN[key.lower()]()
        path = Path(spec)
        if path.is_file():
            concepts = read_concept_list(path)
            if isinstance(concepts, dict):
                concepts = [c for cs in concepts.values() for c in cs]
            return user_vocabulary(concepts, source=str(path))
        raise ValueError(
            f"unknown vocabulary {key!r}: not a built-in ({sorted(_BUILTIN)}) and not an existing file. Pass one "
            "of those, a list of strings, or a ConceptVocabulary."
        )
    if isinstance(spec, Sequence):
        return user_vocabulary(list(spec))
    raise TypeError(
        f"vocabulary must be a name ({sorted(_BUILTIN)}), a file path, a list of strings or a ConceptVocabulary; "
        f"got {type(spec).__name__}."
    )


# --------------------------------------------------------------------------------------------------
# concept lists in files
# --------------------------------------------------------------------------------------------------
def read_class_concepts(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read the JSON layout ``{class_name: [concept, ...]}`` (e.g. CGBC's ``results.json``).

    Raises
    ------
    ValueError
        For invalid JSON or a wrong layout; the message names the file and the offending class.

    Examples
    --------
    >>> import json, tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.json"
    >>> _ = p.write_text(json.dumps({"dog": ["floppy ears", "a wet nose"]}))
    >>> read_class_concepts(p)
    {'dog': ['floppy ears', 'a wet nose']}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no concept list at {path}.")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(doc, dict):
        raise ValueError(
            f"{path}: expected a JSON object {{class: [concepts, ...]}}, got a {type(doc).__name__}. A flat list "
            "of concepts belongs in a text file, one per line."
        )
    out: dict[str, list[str]] = {}
    for cls, concepts in doc.items():
        if not isinstance(concepts, list) or not all(isinstance(c, str) for c in concepts):
            raise ValueError(f"{path}: class {cls!r} must map to a list of strings; got {json.dumps(concepts)[:80]}.")
        out[cls] = [c.strip() for c in concepts if c.strip()]
    return out


def read_concept_list(path: str | os.PathLike) -> list[str] | dict[str, list[str]]:
    """Read a concept list: a ``.json`` file as ``{class: [concepts]}``, anything else as plain text.

    Plain text has one concept per line; blank lines and lines starting with ``#`` are skipped and
    surrounding whitespace is stripped.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.txt"
    >>> _ = p.write_text("# colours\\nred\\n\\n  blue \\n")
    >>> read_concept_list(p)
    ['red', 'blue']
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        return read_class_concepts(path)
    if not path.is_file():
        raise FileNotFoundError(f"no concept list at {path}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file ({e}); a concept list has one concept per line.") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


# --------------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConceptFilterResult:
    """What a concept filter kept and what it dropped.

    Attributes
    ----------
    kept
        The kept concepts (a list, or ``{class: [concepts]}`` for :func:`filter_class_concepts`).
    dropped
        One row per dropped concept: ``concept``, ``reason`` (``'duplicate'``, ``'near_duplicate'``,
        ``'class_name'``), ``similar_to``, ``similarity`` (and ``class`` for class lists).
    """

    kept: list[str] | dict[str, list[str]]
    dropped: pd.DataFrame


def _norm_text(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _check_threshold(value: float | None, what: str) -> None:
    if value is not None and not (isinstance(value, (int, float)) and -1.0 <= value <= 1.0):
        raise ValueError(f"{what} must be a cosine in [-1, 1] or None (off); got {value!r}.")


def _filter(
    concepts: list[str],
    emb: torch.Tensor | None,
    class_names: list[str],
    class_emb: torch.Tensor | None,
    near_duplicate_threshold: float | None,
    class_similarity_threshold: float | None,
) -> tuple[list[str], list[dict[str, Any]]]:
    kept_idx: list[int] = []
    seen: dict[str, str] = {}
    dropped: list[dict[str, Any]] = []
    for i, c in enumerate(concepts):
        key = _norm_text(c)
        if key in seen:
            dropped.append({"concept": c, "reason": "duplicate", "similar_to": seen[key], "similarity": 1.0})
            continue
        if class_emb is not None and class_similarity_threshold is not None and emb is not None:
            sims = class_emb @ emb[i]
            j = int(torch.argmax(sims))
            if float(sims[j]) > class_similarity_threshold:
                dropped.append({"concept": c, "reason": "class_name", "similar_to": class_names[j],
                                "similarity": float(sims[j])})
                continue
        if near_duplicate_threshold is not None and emb is not None and kept_idx:
            sims = emb[kept_idx] @ emb[i]
            j = int(torch.argmax(sims))
            if float(sims[j]) > near_duplicate_threshold:
                dropped.append({"concept": c, "reason": "near_duplicate", "similar_to": concepts[kept_idx[j]],
                                "similarity": float(sims[j])})
                continue
        seen[key] = c
        kept_idx.append(i)
    return [concepts[i] for i in kept_idx], dropped


def _check_list(concepts: Any, what: str) -> list[str]:
    if isinstance(concepts, str) or not isinstance(concepts, Sequence):
        raise TypeError(f"{what} must be a list of strings; got {type(concepts).__name__}.")
    bad = [c for c in concepts if not isinstance(c, str)]
    if bad:
        raise TypeError(f"{what} must contain only strings; got {type(bad[0]).__name__} ({bad[0]!r}).")
    return [c.strip() for c in concepts]


_DROP_COLUMNS = ["concept", "reason", "similar_to", "similarity"]


def filter_concepts(
    concepts: Sequence[str],
    encoder: Any = None,
    *,
    class_names: Sequence[str] | None = None,
    near_duplicate_threshold: float | None = 0.95,
    class_similarity_threshold: float | None = 0.85,
    templates: Template | Sequence[Template] | None = None,
    batch_size: int = 256,
) -> ConceptFilterResult:
    """Drop duplicate, near-duplicate and class-name-like concepts from a list, in order.

    Each concept is checked against the concepts kept before it: an exact duplicate (ignoring case and
    whitespace) is dropped; then a concept whose text-embedding cosine to any class name exceeds
    ``class_similarity_threshold`` (Label-free CBM uses 0.85); then one whose cosine to an already kept
    concept exceeds ``near_duplicate_threshold`` (CGBC uses 0.95).

    Parameters
    ----------
    concepts
        Concept texts.
    encoder
        Text encoder (see :func:`concepts.bank.embed_texts`); needed unless both thresholds are None.
    class_names
        Class names to compare with (optional).
    near_duplicate_threshold, class_similarity_threshold
        Cosine thresholds; None switches the check off.
    templates
        Prompt templates for the embeddings (optional).
    batch_size
        Texts per encoder call.

    Returns
    -------
    ConceptFilterResult
        ``kept`` (list) and ``dropped`` (DataFrame with the reason and the concept or class it clashed with).

    Examples
    --------
    >>> r = filter_concepts(["red", "Red", "blue"], near_duplicate_threshold=None, class_similarity_threshold=None)
    >>> r.kept, r.dropped["reason"].tolist()
    (['red', 'blue'], ['duplicate'])
    """
    concepts = _check_list(concepts, "concepts")
    classes = [] if class_names is None else _check_list(class_names, "class_names")
    _check_threshold(near_duplicate_threshold, "near_duplicate_threshold")
    _check_threshold(class_similarity_threshold, "class_similarity_threshold")
    need = near_duplicate_threshold is not None or (class_similarity_threshold is not None and classes)
    if need and encoder is None:
        raise ValueError(
            "filtering near-duplicates or class-name-like concepts needs a text encoder; pass encoder=..., or set "
            "near_duplicate_threshold=None and class_similarity_threshold=None for exact duplicates only."
        )
    emb = cemb = None
    if need and concepts:
        emb = embed_texts(encoder, concepts, templates=templates, batch_size=batch_size)
        if classes and class_similarity_threshold is not None:
            cemb = embed_texts(encoder, classes, templates=templates, batch_size=batch_size)
    kept, dropped = _filter(concepts, emb, classes, cemb, near_duplicate_threshold, class_similarity_threshold)
    return ConceptFilterResult(kept, pd.DataFrame(dropped, columns=_DROP_COLUMNS))


def filter_class_concepts(
    class_concepts: Mapping[str, Sequence[str]],
    encoder: Any = None,
    *,
    class_names: Sequence[str] | None = None,
    near_duplicate_threshold: float | None = 0.95,
    class_similarity_threshold: float | None = 0.85,
    templates: Template | Sequence[Template] | None = None,
    batch_size: int = 256,
) -> ConceptFilterResult:
    """:func:`filter_concepts` for the ``{class: [concepts]}`` layout.

    Duplicates and near-duplicates are judged within each class (as CGBC does); the class-name check
    compares every concept with every class name (``class_names``, default: the keys). All texts are
    embedded once.

    Returns
    -------
    ConceptFilterResult
        ``kept`` is ``{class: [concepts]}``; ``dropped`` has a ``class`` column.

    Examples
    --------
    >>> r = filter_class_concepts({"dog": ["fur", "fur"], "cat": ["fur"]}, near_duplicate_threshold=None,
    ...                           class_similarity_threshold=None)
    >>> r.kept
    {'dog': ['fur'], 'cat': ['fur']}
    """
    if not isinstance(class_concepts, Mapping):
        raise TypeError(
            f"class_concepts must be a dict {{class: [concepts]}}; got {type(class_concepts).__name__}. "
            "Use filter_concepts for a flat list."
        )
    lists = {str(k): _check_list(v, f"class_concepts[{k!r}]") for k, v in class_concepts.items()}
    classes = list(lists) if class_names is None else _check_list(class_names, "class_names")
    _check_threshold(near_duplicate_threshold, "near_duplicate_threshold")
    _check_threshold(class_similarity_threshold, "class_similarity_threshold")
    need = near_duplicate_threshold is not None or (class_similarity_threshold is not None and classes)
    if need and encoder is None:
        raise ValueError(
            "filtering near-duplicates or class-name-like concepts needs a text encoder; pass encoder=..., or set "
            "near_duplicate_threshold=None and class_similarity_threshold=None for exact duplicates only."
        )
    unique_texts = list(dict.fromkeys(c for cs in lists.values() for c in cs))
    table: dict[str, torch.Tensor] = {}
    cemb = None
    if need and unique_texts:
        E = embed_texts(encoder, unique_texts, templates=templates, batch_size=batch_size)
        table = dict(zip(unique_texts, E))
        if classes and class_similarity_threshold is not None:
            cemb = embed_texts(encoder, classes, templates=templates, batch_size=batch_size)
    kept: dict[str, list[str]] = {}
    rows: list[dict[str, Any]] = []
    for cls, concepts in lists.items():
        emb = torch.stack([table[c] for c in concepts]) if (table and concepts) else None
        k, d = _filter(concepts, emb, classes, cemb, near_duplicate_threshold, class_similarity_threshold)
        kept[cls] = k
        rows.extend({"class": cls, **row} for row in d)
    return ConceptFilterResult(kept, pd.DataFrame(rows, columns=["class", *_DROP_COLUMNS]))

