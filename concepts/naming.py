"""Discover-then-name: give concept vectors names from a vocabulary, by cosine in a text space.

Following Discover-then-Name (Rao et al., ECCV 2024), each concept vector (e.g. an SAE decoder atom of
a CLIP image encoder, which lives in CLIP's joint space) is compared by cosine similarity with the
L2-normalised text embeddings of every vocabulary entry, and the most similar entries are its names.
Names are chosen per concept independently, so several concepts may share a name; unlike the original
(which reports the argmax only), :func:`name_concepts` returns the top ``m`` names with similarities and
the runner-up margin, and flags duplicate top names and names below a similarity threshold.

Choices made explicit (DN-CBM embeds bare words with no template and does not centre):

- ``templates``: optional prompt templates, averaged per entry (CLIP prompt ensemble).
- ``center``: optionally subtract the mean vocabulary embedding (and renormalise) before the cosine.
  Meant for *difference* vectors (CAVs, class-mean differences), which lack the component all texts
  share: since every entry has unit norm, centring changes the ranking only through the renormalisation,
  which favours entries with a large specific (non-shared) part. Off by default.

:func:`naming_accuracy` scores names against known true names, and :func:`world_naming_accuracy` runs
the whole ground-truth check on ConceptWorld for any image-text encoder: image features -> per-concept
class-mean differences -> names -> accuracy.

Examples
--------
>>> import torch
>>> from concepts.naming import name_concepts, top_names
>>> words = {"sky": [1.0, 0.0, 0.0], "grass": [0.0, 1.0, 0.0], "sun": [0.0, 0.0, 1.0]}
>>> encoder = lambda texts: torch.tensor([words[t] for t in texts])
>>> table = name_concepts(torch.tensor([[0.1, 0.9, 0.0], [0.9, 0.0, 0.3]]), encoder, ["sky", "grass", "sun"])
>>> top_names(table)
['grass', 'sky']
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .bank import ConceptBank, Template, describe_templates
from .vocabularies import ConceptVocabulary, VocabularyLike, conceptworld_vocabulary, get_vocabulary

logger = logging.getLogger(__name__)

__all__ = [
    "name_concepts",
    "top_names",
    "naming_summary",
    "NamingAccuracy",
    "naming_accuracy",
    "world_naming_accuracy",
]

NAMING_COLUMNS = [
    "concept", "concept_name", "rank", "name", "phrase", "similarity", "margin", "duplicate", "low_similarity",
]


def _concept_matrix(concepts: Any) -> tuple[Tensor, list[str]]:
    if isinstance(concepts, ConceptBank):
        return concepts.vectors, list(concepts.names)  # type: ignore[arg-type]
    if isinstance(concepts, np.ndarray):
        concepts = torch.from_numpy(np.asarray(concepts, dtype=np.float32))
    if not isinstance(concepts, Tensor):
        raise TypeError(
            f"concepts must be a ConceptBank or a Tensor/array [k, d] of concept vectors; got {type(concepts).__name__}."
        )
    V = concepts.detach().to("cpu", torch.float32)
    if V.ndim == 1:
        V = V[None]
    if V.ndim != 2 or V.shape[0] == 0:
        raise ValueError(f"concept vectors must have shape [k, d] with k >= 1; got shape {tuple(V.shape)}.")
    if not torch.isfinite(V).all():
        raise ValueError("concept vectors contain NaN or infinite values.")
    return V, [f"concept_{i}" for i in range(V.shape[0])]


def _vocabulary_bank(
    vocabulary: VocabularyLike | ConceptBank,
    encoder: Any,
    templates: Template | Sequence[Template] | None,
    batch_size: int,
    progress: bool,
) -> tuple[ConceptBank, list[str], dict[str, str], str]:
    """(embedded vocabulary, phrases, {name: family}, source)."""
    if isinstance(vocabulary, ConceptBank):
        if templates is not None:
            raise ValueError(
                "templates only apply when the vocabulary is embedded here; the vocabulary is already a "
                "ConceptBank of embeddings. Embed it with the templates instead (ConceptVocabulary.embed(encoder, "
                "templates)), or pass the vocabulary itself."
            )
        meta = vocabulary.metadata
        phrases = list(meta.get("texts", vocabulary.names))
        fams = meta.get("families")
        family = dict(zip(vocabulary.names, fams)) if fams is not None else {}  # type: ignore[arg-type]
        return vocabulary, phrases, family, str(meta.get("vocabulary", "bank"))
    vocab: ConceptVocabulary = get_vocabulary(vocabulary)  # type: ignore[arg-type]
    if encoder is None:
        raise ValueError(
            "naming needs a text encoder to embed the vocabulary; pass encoder=... (an object with encode_texts, "
            "or a callable texts -> Tensor), or pass an embedded vocabulary (ConceptVocabulary.embed(encoder))."
        )
    bank = vocab.embed(encoder, templates, batch_size=batch_size, progress=progress)
    return bank, list(vocab.phrases), vocab.family_of(), vocab.source  # type: ignore[arg-type]


_CHUNK = 2048  # concept rows per similarity block (bounds memory for large banks x large vocabularies)


def _unit_vocabulary(V: Tensor, E: Tensor, center: bool) -> Tensor:
    if V.shape[1] != E.shape[1]:
        raise ValueError(
            f"the concept vectors have {V.shape[1]} features, but the vocabulary embeddings have {E.shape[1]}; "
            "concept vectors must live in the text encoder's embedding space (e.g. SAE atoms trained on that "
            "CLIP model's image embeddings)."
        )
    E = torch.nn.functional.normalize(E, dim=1)
    if center:
        if E.shape[0] < 2:
            raise ValueError("center=True needs a vocabulary of at least 2 entries.")
        E = torch.nn.functional.normalize(E - E.mean(dim=0, keepdim=True), dim=1)
    return E


def _similarity_blocks(V: Tensor, E: Tensor):
    """Yield ``(start, cosine block [rows, n_vocab])`` over chunks of concept rows (E already unit-norm)."""
    Vn = torch.nn.functional.normalize(V, dim=1)
    for start in range(0, Vn.shape[0], _CHUNK):
        yield start, Vn[start:start + _CHUNK] @ E.T


def name_concepts(
    concepts: ConceptBank | Tensor | np.ndarray,
    encoder: Any = None,
    vocabulary: VocabularyLike | ConceptBank = "conceptworld",
    *,
    templates: Template | Sequence[Template] | None = None,
    top_m: int = 5,
    min_similarity: float | None = None,
    center: bool = False,
    batch_size: int = 256,
    progress: bool = False,
) -> pd.DataFrame:
    """Name concept vectors by cosine similarity to the text embeddings of a vocabulary.

    Parameters
    ----------
    concepts
        A :class:`~concepts.bank.ConceptBank` or vectors ``[k, d]`` in the text encoder's space.
    encoder
        Text encoder (``encode_texts`` or a callable ``texts -> [n, d]``); not needed when
        ``vocabulary`` is an embedded ConceptBank.
    vocabulary
        ``"conceptworld"``, ``"english"``, a list of words, a file, a
        :class:`~concepts.vocabularies.ConceptVocabulary`, or an already embedded vocabulary
        (``ConceptVocabulary.embed(encoder)``, reusable across calls).
    templates
        Optional prompt templates (``"a photo of {}."`` or callables), averaged per entry.
    top_m
        Names per concept (capped at the vocabulary size).
    min_similarity
        Flag names whose similarity is below this (``low_similarity``); None flags nothing.
    center
        Subtract the mean vocabulary embedding before the cosine (for difference vectors).
    batch_size, progress
        Text-encoding batch size and progress bar.

    Returns
    -------
    pd.DataFrame
        One row per (concept, rank): ``concept`` (row index), ``concept_name`` (the bank's name),
        ``rank`` (1 = best), ``name``, ``phrase`` (the embedded text), ``similarity`` (cosine), ``margin``
        (similarity minus that of the next rank; at rank 1 the runner-up margin; NaN when there is no next
        entry), ``duplicate`` (rank-1 rows only: this top name is the top name of several concepts) and
        ``low_similarity``. ``attrs`` records the vocabulary, templates, threshold and centring.

    Examples
    --------
    >>> import torch
    >>> enc = lambda ts: torch.tensor([[1.0, 0.0] if t == "dog" else [0.0, 1.0] for t in ts])
    >>> t = name_concepts(torch.tensor([[1.0, 0.1], [2.0, 0.0]]), enc, ["dog", "cat"], top_m=1)
    >>> t[["concept", "name", "duplicate"]].values.tolist()
    [[0, 'dog', True], [1, 'dog', True]]
    """
    if isinstance(top_m, bool) or not isinstance(top_m, (int, np.integer)) or top_m < 1:
        raise ValueError(f"top_m must be a positive integer; got {top_m!r}.")
    if min_similarity is not None and not isinstance(min_similarity, (int, float)):
        raise TypeError(f"min_similarity must be a number or None; got {type(min_similarity).__name__}.")
    V, concept_names = _concept_matrix(concepts)
    vbank, phrases, _, source = _vocabulary_bank(vocabulary, encoder, templates, batch_size, progress)
    E = _unit_vocabulary(V, vbank.vectors, center)
    n_vocab = E.shape[0]
    m = min(int(top_m), n_vocab)
    blocks = [torch.topk(S, k=min(m + 1, n_vocab), dim=1) for _, S in _similarity_blocks(V, E)]
    vals_np = torch.cat([b.values for b in blocks]).numpy().astype(np.float64)
    idx_np = torch.cat([b.indices for b in blocks]).numpy()
    vnames = list(vbank.names)  # type: ignore[arg-type]
    top1 = [vnames[i] for i in idx_np[:, 0]]
    counts = pd.Series(top1).value_counts()
    rows = []
    for c in range(V.shape[0]):
        for r in range(m):
            sim = vals_np[c, r]
            margin = sim - vals_np[c, r + 1] if r + 1 < vals_np.shape[1] else float("nan")
            name = vnames[idx_np[c, r]]
            rows.append((
                c, concept_names[c], r + 1, name, phrases[idx_np[c, r]], sim, margin,
                bool(r == 0 and counts[name] > 1),
                bool(min_similarity is not None and sim < min_similarity),
            ))
    table = pd.DataFrame(rows, columns=NAMING_COLUMNS)
    table.attrs.update({
        "vocabulary": source,
        "vocabulary_size": n_vocab,
        "templates": describe_templates(templates),
        "min_similarity": min_similarity,
        "center": bool(center),
        "top_m": m,
    })
    return table


def _check_table(table: Any) -> pd.DataFrame:
    if not isinstance(table, pd.DataFrame) or not {"concept", "rank", "name", "similarity"} <= set(table.columns):
        raise TypeError("expected the DataFrame returned by name_concepts (columns concept, rank, name, similarity, ...).")
    return table


def top_names(table: pd.DataFrame) -> list[str]:
    """The rank-1 name of every concept, in concept order (use with ``bank.rename(..., deduplicate=True)``).

    Examples
    --------
    >>> import pandas as pd
    >>> top_names(pd.DataFrame({"concept": [1, 0], "rank": [1, 1], "name": ["b", "a"], "similarity": [1.0, 1.0]}))
    ['a', 'b']
    """
    t = _check_table(table)
    return t[t["rank"] == 1].sort_values("concept")["name"].tolist()


def naming_summary(table: pd.DataFrame) -> dict[str, float]:
    """Name-quality statistics of a :func:`name_concepts` table.

    Returns
    -------
    dict
        ``n_concepts``, ``n_unique_names``, ``duplicate_rate`` (fraction of concepts whose top name is
        shared), ``low_similarity_rate``, ``mean_similarity`` and ``median_margin`` (rank 1).

    Examples
    --------
    >>> import torch
    >>> enc = lambda ts: torch.eye(2)[[0 if t == "a" else 1 for t in ts]]
    >>> naming_summary(name_concepts(torch.eye(2), enc, ["a", "b"]))["duplicate_rate"]
    0.0
    """
    t = _check_table(table)
    top = t[t["rank"] == 1]
    return {
        "n_concepts": int(len(top)),
        "n_unique_names": int(top["name"].nunique()),
        "duplicate_rate": float(top["duplicate"].mean()) if "duplicate" in top else float("nan"),
        "low_similarity_rate": float(top["low_similarity"].mean()) if "low_similarity" in top else float("nan"),
        "mean_similarity": float(top["similarity"].mean()),
        "median_margin": float(top["margin"].median()) if "margin" in top else float("nan"),
    }


@dataclass(frozen=True)
class NamingAccuracy:
    """How well automatic names match the true names.

    Attributes
    ----------
    top1
        Fraction of concepts whose rank-1 name is the true name.
    top_m
        Fraction whose true name is among the top ``m``.
    m
        The ``m`` of ``top_m``.
    mean_rank
        Mean rank of the true name in the whole vocabulary (1 = best).
    table
        One row per concept: ``concept``, ``true_name``, ``family``, ``top_name``, ``top_similarity``,
        ``true_similarity``, ``true_rank``, ``correct``.
    by_family
        ``family``, ``n``, ``top1``, ``top_m``, ``mean_rank`` (empty when no families are known).
    naming
        The full :func:`name_concepts` table.
    """

    top1: float
    top_m: float
    m: int
    mean_rank: float
    table: pd.DataFrame
    by_family: pd.DataFrame
    naming: pd.DataFrame

    def to_dict(self) -> dict[str, float]:
        """Headline numbers (for a ``RESULT {json}`` line)."""
        return {"naming_top1": self.top1, f"naming_top{self.m}": self.top_m, "naming_mean_rank": self.mean_rank}


def naming_accuracy(
    concepts: ConceptBank | Tensor | np.ndarray,
    encoder: Any = None,
    vocabulary: VocabularyLike | ConceptBank = "conceptworld",
    *,
    true_names: Sequence[str] | None = None,
    templates: Template | Sequence[Template] | None = None,
    top_m: int = 5,
    center: bool = False,
    batch_size: int = 256,
) -> NamingAccuracy:
    """Name concept vectors and score the names against the true names.

    Parameters
    ----------
    concepts
        A ConceptBank (its names are the truth unless ``true_names`` is given) or vectors ``[k, d]``.
    encoder, vocabulary, templates, top_m, center, batch_size
        As in :func:`name_concepts`.
    true_names
        The true name of each concept; every one must be in the vocabulary.

    Returns
    -------
    NamingAccuracy

    Examples
    --------
    >>> import torch
    >>> enc = lambda ts: torch.eye(3)[[["a", "b", "c"].index(t) for t in ts]]
    >>> bank = ConceptBank(torch.eye(3)[[2, 0]] + 0.1, names=["c", "a"])
    >>> naming_accuracy(bank, enc, ["a", "b", "c"]).top1
    1.0
    """
    V, bank_names = _concept_matrix(concepts)
    if true_names is None:
        if not isinstance(concepts, ConceptBank):
            raise ValueError("pass true_names=[...] (one per concept vector), or a ConceptBank named by the truth.")
        true_names = bank_names
    true_names = list(true_names)
    if len(true_names) != V.shape[0]:
        raise ValueError(f"got {len(true_names)} true names for {V.shape[0]} concept vectors; pass one per concept.")
    vbank, phrases, family, source = _vocabulary_bank(vocabulary, encoder, templates, batch_size, False)
    vnames = list(vbank.names)  # type: ignore[arg-type]
    missing = [n for n in true_names if n not in set(vnames)]
    if missing:
        raise ValueError(
            f"true names {missing[:5]} are not in the {source!r} vocabulary, so they can never be recovered; add them "
            "to the vocabulary or drop those concepts."
        )
    naming = name_concepts(V, vocabulary=vbank, top_m=top_m, center=center)
    pos = {n: i for i, n in enumerate(vnames)}
    true_idx = torch.as_tensor([pos[n] for n in true_names])
    true_sim, true_rank = [], []
    for start, S in _similarity_blocks(V, _unit_vocabulary(V, vbank.vectors, center)):
        t = S.gather(1, true_idx[start:start + S.shape[0], None])
        true_sim.append(t[:, 0])
        true_rank.append((S > t).sum(dim=1) + 1)
    sims_true = torch.cat(true_sim).numpy().astype(np.float64)
    ranks_true = torch.cat(true_rank).numpy()
    m = int(naming.attrs["top_m"])
    top = naming[naming["rank"] == 1].sort_values("concept")
    rows = []
    for c, true in enumerate(true_names):
        s_true, rank = sims_true[c], int(ranks_true[c])
        rows.append({
            "concept": c,
            "true_name": true,
            "family": family.get(true, ""),
            "top_name": top["name"].iloc[c],
            "top_similarity": float(top["similarity"].iloc[c]),
            "true_similarity": float(s_true),
            "true_rank": rank,
            "correct": top["name"].iloc[c] == true,
        })
    table = pd.DataFrame(rows)
    by_family = pd.DataFrame(columns=["family", "n", "top1", f"top{m}", "mean_rank"])
    if family:
        g = table.assign(in_m=table["true_rank"] <= m).groupby("family", sort=False)
        by_family = pd.DataFrame({
            "n": g.size(),
            "top1": g["correct"].mean(),
            f"top{m}": g["in_m"].mean(),
            "mean_rank": g["true_rank"].mean(),
        }).reset_index()
    return NamingAccuracy(
        top1=float(table["correct"].mean()),
        top_m=float((table["true_rank"] <= m).mean()),
        m=m,
        mean_rank=float(table["true_rank"].mean()),
        table=table,
        by_family=by_family,
        naming=naming,
    )


def world_naming_accuracy(
    encoder: Any,
    *,
    world: Any = None,
    n: int = 2000,
    seed: int = 0,
    families: Sequence[str] | None = None,
    method: str = "mean_difference",
    vocabulary: VocabularyLike | ConceptBank | None = None,
    templates: Template | Sequence[Template] | None = None,
    top_m: int = 5,
    center: bool = False,
    min_count: int = 5,
    batch_size: int = 64,
) -> NamingAccuracy:
    """Naming accuracy of image-derived concept vectors on ConceptWorld, for an image-text encoder.

    Renders ``n`` ConceptWorld images, embeds them with ``encoder.encode_images``, builds one vector per
    concept (:meth:`ConceptBank.from_cavs`; by default the class-mean difference: mean feature of images
    with the concept minus mean of those without), names the vectors with the encoder's text embeddings
    of the ConceptWorld vocabulary, and scores the names against the true concepts.

    Parameters
    ----------
    encoder
        An image-text encoder with ``encode_images`` and ``encode_texts`` (the ``Encoder`` protocol), e.g.
        the built-in ConceptWorld CLIP.
    world
        A :class:`~concepts.world.ConceptWorld` (default ``ConceptWorld(seed=0)``).
    n, seed
        Number of images and sample seed.
    families
        Concept families to evaluate (default all).
    method
        ``"mean_difference"`` or ``"logistic"`` (see :meth:`ConceptBank.from_cavs`).
    vocabulary
        Default: :func:`~concepts.vocabularies.conceptworld_vocabulary` of the world, restricted to
        ``families``; a larger vocabulary (e.g. with distractors) makes the test harder.
    templates, top_m
        As in :func:`name_concepts`.
    center
        Centre the vocabulary embeddings (see :func:`name_concepts`; worth comparing for difference vectors).
    min_count
        Concepts with fewer positives or negatives than this in the sample are skipped (logged).
    batch_size
        Images per ``encode_images`` call.

    Returns
    -------
    NamingAccuracy

    Examples
    --------
    >>> from concepts.zoo import load                                   # doctest: +SKIP
    >>> world_naming_accuracy(load("conceptworld-clip")).to_dict()      # doctest: +SKIP
    """
    from .world import ConceptWorld

    if not hasattr(encoder, "encode_images"):
        raise TypeError(
            f"encoder must have encode_images and encode_texts (an image-text Encoder); got {type(encoder).__name__}."
        )
    world = ConceptWorld(seed=0) if world is None else world
    vocab = conceptworld_vocabulary(world.vocabulary, families=families) if vocabulary is None else vocabulary
    wanted = set(world.vocabulary.concept_names) if families is None else {
        name for fam in families for name in world.vocabulary.families[fam]
    }
    batch = world.sample(n, seed=seed)
    labels = batch.concepts[[c for c in batch.concepts.columns if c in wanted]]
    pos = labels.sum(axis=0)
    keep = [c for c in labels.columns if min_count <= pos[c] <= len(labels) - min_count]
    skipped = [c for c in labels.columns if c not in keep]
    if skipped:
        logger.info("world_naming_accuracy: skipping %d concepts with fewer than %d positives or negatives: %s",
                    len(skipped), min_count, skipped)
    if not keep:
        raise ValueError(f"no concept has at least {min_count} positives and negatives in {n} images; raise n.")
    with torch.no_grad():
        feats = encoder.encode_images(batch.images, batch_size=batch_size, normalize=True)
    if isinstance(feats, np.ndarray):
        feats = torch.from_numpy(feats)
    bank = ConceptBank.from_cavs(feats.detach().to("cpu", torch.float32), labels[keep], method=method,
                                 metadata={"world_seed": int(world.seed), "sample_seed": int(seed), "n_images": int(n)})
    result = naming_accuracy(bank, encoder, vocab, templates=templates, top_m=top_m, center=center,
                             batch_size=batch_size)
    return result
