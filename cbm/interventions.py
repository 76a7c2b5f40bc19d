"""Test-time intervention policies and intervention curves, for any :class:`~cbm.base.ConceptHead`.

An intervention curve is the class accuracy as a growing fraction of the *intervenable* concepts is set
to its ground truth (:meth:`~cbm.base.ConceptHead.concept_values`: the on / off value of each concept).
A head concept is intervenable when its ground-truth name (``concept_truth_names_``) is a column of the
truth table (and in ``intervene_on`` when that is given). Policies decide which concepts go first, per
sample:

``"random"``
    a random order of the intervenable concepts (seeded).
``"uncertainty"``
    the concepts whose score is closest to the midpoint between their on and off values first
    (``|S - (on + off) / 2| / (|on - off| / 2)`` ascending), the uncertainty policy of Koh et al. / CEM.
``"group"``
    a random order of concept *groups* (e.g. ConceptWorld families: all colours, all shapes, ...);
    the fraction counts groups, and a group's concepts are set together (CUB-style group intervention).

Examples
--------
>>> import numpy as np, pandas as pd
>>> from cbm import ConceptBottleneckModel
>>> rng = np.random.default_rng(0)
>>> C = pd.DataFrame({"a": rng.random(300) < 0.5, "b": rng.random(300) < 0.5})
>>> X = C.to_numpy(float) + rng.normal(scale=0.8, size=(300, 2))
>>> y = (C["a"] & C["b"]).to_numpy().astype(int)
>>> head = ConceptBottleneckModel(n_epochs=30).fit(X, y, C)
>>> curve = intervention_curve(head, X, y, C, fractions=[0.0, 1.0])
>>> float(curve["accuracy"].iloc[-1])
1.0
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .base import ConceptHead, as_concept_frame

__all__ = ["POLICIES", "intervenable", "intervention_order", "intervention_curve", "conceptworld_groups"]

POLICIES = ("random", "uncertainty", "group")


def conceptworld_groups(names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """ConceptWorld concept families as intervention groups (restricted to ``names`` when given).

    Examples
    --------
    >>> conceptworld_groups(["red", "blue", "circle"])
    {'colour': ['red', 'blue'], 'shape': ['circle']}
    """
    from concepts.world.vocabulary import Vocabulary

    fams = Vocabulary().families
    keep = None if names is None else set(names)
    out = {}
    for fam, members in fams.items():
        chosen = [m for m in members if keep is None or m in keep]
        if chosen:
            out[fam] = chosen
    return out


def intervenable(head: ConceptHead, truth: pd.DataFrame, intervene_on: Sequence[str] | None = None) -> np.ndarray:
    """Indices of the head's concepts whose ground-truth name is a column of ``truth`` (and in ``intervene_on``)."""
    head._check_fitted()
    cols = set(truth.columns)
    if intervene_on is not None:
        wanted = set(intervene_on)
        unknown = sorted(wanted - cols)
        if unknown:
            raise KeyError(f"intervene_on names {unknown[:5]} that are not columns of the ground truth.")
        cols &= wanted
    return np.array([j for j, t in enumerate(head.concept_truth_names_) if t in cols], dtype=int)


def intervention_order(
    head: ConceptHead,
    S: np.ndarray,
    J: np.ndarray,
    policy: str,
    *,
    groups: Mapping[str, Sequence[str]] | None = None,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Per-sample intervention order.

    Returns
    -------
    list of ndarray
        For ``"random"`` / ``"uncertainty"``: one entry, ``[n, |J|]`` concept indices in order. For
        ``"group"``: one ``[n, G]`` array of group numbers in order, followed by the ``G`` arrays of
        concept indices of each group.
    """
    n = S.shape[0]
    if policy == "random":
        keys = rng.random((n, len(J)))
        return [J[np.argsort(keys, axis=1)]]
    if policy == "uncertainty":
        on, off = head.concept_on_[J], head.concept_off_[J]
        mid, half = (on + off) / 2, np.maximum(np.abs(on - off) / 2, 1e-12)
        certainty = np.abs(S[:, J] - mid) / half
        return [J[np.argsort(certainty, axis=1, kind="stable")]]
    if policy == "group":
        names = [head.concept_truth_names_[j] for j in J]
        if groups is None:
            groups = conceptworld_groups(names)
            missing = [n_ for n_ in names if not any(n_ in g for g in groups.values())]
            for n_ in dict.fromkeys(missing):
                groups[n_] = [n_]
        members = []
        for g in groups.values():
            idx = np.array([j for j, t in zip(J, names) if t in set(g)], dtype=int)
            if len(idx):
                members.append(idx)
        if not members:
            raise ValueError("no intervention group contains an intervenable concept; check groups=.")
        keys = rng.random((n, len(members)))
        return [np.argsort(keys, axis=1), *members]
    raise ValueError(f"policy must be one of {POLICIES}; got {policy!r}.")


def intervention_curve(
    head: ConceptHead,
    X: Any,
    y: Any,
    concepts: pd.DataFrame,
    *,
    policy: str = "random",
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    intervene_on: Sequence[str] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Class accuracy as a growing fraction of the intervenable concepts is set to the truth.

    Parameters
    ----------
    head
        A fitted head.
    X, y
        Features (or images) and class labels.
    concepts
        Ground-truth concept labels ``[n, m]``.
    policy
        ``"random"``, ``"uncertainty"`` or ``"group"`` (module docstring).
    fractions
        Fractions of intervenable concepts (of groups for ``"group"``) to set, in [0, 1].
    intervene_on
        Restrict interventions to these ground-truth names (e.g. the concepts of the class rules).
    groups
        ``{group: [truth names]}`` for ``"group"`` (default: ConceptWorld families, singletons otherwise).
    seed
        Seeds the random orders.

    Returns
    -------
    pd.DataFrame
        ``policy``, ``fraction``, ``n_intervened`` (mean concepts set per sample), ``accuracy``.
    """
    head._check_fitted()
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}; got {policy!r}.")
    fr = [float(f) for f in fractions]
    if not fr or any(not (0.0 <= f <= 1.0) for f in fr):
        raise ValueError(f"fractions must be a non-empty list of numbers in [0, 1]; got {list(fractions)!r}.")
    Z = head._features(X)
    S = head._chunked(head._scores, Z).cpu().numpy().astype(np.float64)
    n = S.shape[0]
    truth = as_concept_frame(concepts, n)
    yi = head._class_index(y)
    J = intervenable(head, truth, intervene_on)
    if len(J) == 0:
        raise ValueError(
            f"none of the {type(head).__name__}'s concepts has a ground-truth column in concepts (its truth names: "
            f"{head.concept_truth_names_[:5]}...); nothing can be intervened on."
        )
    T = head.concept_values(truth)
    rng = np.random.default_rng(seed)
    order = intervention_order(head, S, J, policy, groups=groups, rng=rng)
    rows = []
    for f in fr:
        mask = np.zeros_like(S, dtype=bool)
        if policy == "group":
            g_order, members = order[0], order[1:]
            m = int(math.floor(f * len(members) + 0.5))
            for g in range(len(members)):
                chosen = (g_order[:, :m] == g).any(1)
                mask[np.ix_(chosen, members[g])] = True
        else:
            m = int(math.floor(f * len(J) + 0.5))
            if m:
                mask[np.arange(n)[:, None], order[0][:, :m]] = True
        S2 = np.where(mask, T, S)
        proba = head.predict_proba_from_concepts(S2, intervened=mask)
        rows.append({
            "policy": policy,
            "fraction": f,
            "n_intervened": float(mask.sum(1).mean()),
            "accuracy": float((proba.argmax(1) == yi).mean()),
        })
    return pd.DataFrame(rows)
