"""Metrics for every concept-bottleneck head, and one function that reports them all.

Per head (:func:`evaluate` returns them as one DataFrame row):

- **class accuracy**: top-1 and top-5 (:func:`top_k_accuracy`);
- **calibration**: expected calibration error of the top-label confidence (:func:`expected_calibration_error`);
- **concepts** (where labels exist; :func:`concept_metrics`): mean per-concept accuracy (a concept is
  predicted present when its score is above the midpoint of its on / off values), mean per-concept
  ROC AUC of the raw scores, and exact-match accuracy (all matched concepts right, ECBM's "overall");
- **interventions** (:func:`cbm.interventions.intervention_curve`): accuracy vs fraction of concepts set
  to the truth for the random, uncertainty and group policies; the area under each curve and the accuracy
  with every intervenable concept set to the truth;
- **explanation size**: the effective number of concepts of a prediction, ``exp(entropy)`` of its
  normalised absolute contributions (:func:`explanation_size`), and DN-CBM's coverage: concepts needed
  for 90 / 95 / 99 % of the predicted logit (:func:`coverage`);
- **names** (:func:`name_quality`, :func:`unit_alignment`): mean naming similarity and duplicate-name rate;
  for each unit, the ground-truth concept it aligns with best (ROC AUC) and whether its name is that
  concept.

Examples
--------
>>> import numpy as np
>>> expected_calibration_error(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))
0.15
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from .base import ConceptHead, as_concept_frame
from .interventions import POLICIES, intervenable, intervention_curve

__all__ = [
    "top_k_accuracy",
    "subset_accuracy",
    "expected_calibration_error",
    "concept_metrics",
    "auroc_matrix",
    "unit_alignment",
    "explanation_size",
    "coverage",
    "name_quality",
    "evaluate",
]


def top_k_accuracy(y: np.ndarray, proba: np.ndarray, k: int = 1) -> float:
    """Fraction of samples whose class index ``y`` is among the ``k`` most probable.

    Examples
    --------
    >>> top_k_accuracy(np.array([2, 0]), np.array([[0.1, 0.3, 0.6], [0.2, 0.5, 0.3]]), k=2)
    0.5
    """
    k = min(int(k), proba.shape[1])
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return float((top == np.asarray(y)[:, None]).any(1).mean())


def subset_accuracy(head: ConceptHead, X: Any, y: Any, classes: Sequence[Any]) -> float:
    """Accuracy on a subset of the classes: the samples of those classes, predictions restricted to them.

    E.g. the classes defined by concept conjunctions, compared between classifiers without the other
    classes (and their priors) getting in the way.

    Examples
    --------
    >>> import numpy as np
    >>> from cbm import LinearProbe
    >>> X = np.eye(3).repeat(4, 0); y = np.arange(3).repeat(4)
    >>> subset_accuracy(LinearProbe().fit(X, y), X, y, [0, 2])
    1.0
    """
    head._check_fitted()
    cls = list(classes)
    if not cls:
        raise ValueError("classes is empty; pass at least one class label.")
    idx = head._class_index(np.asarray(cls))
    yi = head._class_index(y)
    sel = np.isin(yi, idx)
    if not sel.any():
        raise ValueError(f"no sample has a class in {cls[:5]}; nothing to score.")
    Z = head._features(X)[torch.as_tensor(np.flatnonzero(sel))]
    proba = head.predict_proba(Z)[:, idx]
    return float((idx[proba.argmax(1)] == yi[sel]).mean())


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top-label confidence (equal-width bins, weighted by bin size).

    Examples
    --------
    >>> expected_calibration_error(np.array([0, 0]), np.array([[1.0, 0.0], [1.0, 0.0]]))
    0.0
    """
    conf = proba.max(1)
    correct = proba.argmax(1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(round(ece, 12))


def auroc_matrix(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ROC AUC of every score column against every label column, ``[k, m]``.

    Constant score columns get 0.5; label columns without positives or without negatives get NaN.

    Examples
    --------
    >>> auroc_matrix(np.array([[0.1], [0.4], [0.35], [0.8]]), np.array([[0], [0], [1], [1]])).round(2).tolist()
    [[0.75]]
    """
    S = np.asarray(scores, dtype=np.float64)
    Y = np.asarray(labels, dtype=np.float64)
    R = rankdata(S, axis=0)  # average ranks handle ties
    n_pos = Y.sum(0)
    n_neg = Y.shape[0] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (R.T @ Y - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    const = np.ptp(S, axis=0) == 0
    auc[const, :] = 0.5
    auc[:, (n_pos == 0) | (n_neg == 0)] = np.nan  # undefined without positives and negatives
    return auc


def _matched(head: ConceptHead, truth: pd.DataFrame) -> np.ndarray:
    return intervenable(head, truth)


def concept_metrics(head: ConceptHead, X: Any, concepts: pd.DataFrame, *, S: np.ndarray | None = None) -> dict[str, float]:
    """Concept accuracy, ROC AUC and exact-match accuracy over the head's concepts that have labels.

    A head concept is matched to the label column of its ground-truth name; it is predicted present when
    its score exceeds the midpoint of its on / off values. Returns NaNs when nothing matches.
    """
    head._check_fitted()
    S = head.concept_scores(X) if S is None else S
    truth = as_concept_frame(concepts, S.shape[0])
    J = _matched(head, truth)
    out = {"n_matched_concepts": float(len(J)), "concept_accuracy": math.nan, "concept_auroc": math.nan,
           "exact_match_accuracy": math.nan}
    if len(J) == 0:
        return out
    L = np.stack([truth[head.concept_truth_names_[j]].to_numpy() for j in J], 1)
    mid = (head.concept_on_[J] + head.concept_off_[J]) / 2
    sign = np.where(head.concept_on_[J] >= head.concept_off_[J], 1.0, -1.0)
    pred = (S[:, J] - mid) * sign > 0
    correct = pred == L
    auc = np.diag(auroc_matrix(S[:, J] * sign, L))
    out.update({
        "concept_accuracy": float(correct.mean()),
        "concept_auroc": float(np.nanmean(auc)) if np.isfinite(auc).any() else math.nan,
        "exact_match_accuracy": float(correct.all(1).mean()),
    })
    return out


def unit_alignment(
    head: ConceptHead, X: Any, concepts: pd.DataFrame, *, min_auroc: float = 0.9, S: np.ndarray | None = None
) -> pd.DataFrame:
    """Which ground-truth concept each head concept (unit) aligns with, and whether its name says so.

    Returns
    -------
    pd.DataFrame
        One row per unit: ``unit``, ``name`` (its ground-truth name), ``best_concept`` (label column with the
        highest ROC AUC of the unit's score), ``auroc``, ``aligned`` (``auroc >= min_auroc``) and
        ``named_correctly`` (``name == best_concept``). ``attrs["aligned_named_correctly"]`` is the fraction
        of aligned units named correctly.
    """
    head._check_fitted()
    S = head.concept_scores(X) if S is None else S
    truth = as_concept_frame(concepts, S.shape[0])
    A = auroc_matrix(S, truth.to_numpy())
    A = np.where(np.isfinite(A), A, -np.inf)
    best = A.argmax(1)
    cols = np.asarray(truth.columns, dtype=object)
    table = pd.DataFrame({
        "unit": np.arange(S.shape[1]),
        "name": head.concept_truth_names_,
        "best_concept": cols[best],
        "auroc": A[np.arange(S.shape[1]), best],
    })
    table["aligned"] = table["auroc"] >= min_auroc
    table["named_correctly"] = table["name"] == table["best_concept"]
    aligned = table[table["aligned"]]
    table.attrs["n_aligned"] = int(len(aligned))
    table.attrs["aligned_named_correctly"] = float(aligned["named_correctly"].mean()) if len(aligned) else math.nan
    table.attrs["min_auroc"] = float(min_auroc)
    return table


def explanation_size(head: ConceptHead, X: Any, *, contributions: np.ndarray | None = None) -> float:
    """Mean effective number of concepts per prediction: ``exp(entropy(|c| / sum|c|))`` of its contributions.

    One concept carrying the whole logit gives 1; ``k`` equal contributions give ``k``.
    """
    c = np.abs(head.contributions(X) if contributions is None else contributions)
    tot = c.sum(1, keepdims=True)
    p = np.divide(c, tot, out=np.zeros_like(c), where=tot > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return float(np.exp(h).mean())


def coverage(
    head: ConceptHead,
    X: Any,
    *,
    levels: Sequence[float] = (0.9, 0.95, 0.99),
    mode: str = "positive",
    contributions: np.ndarray | None = None,
) -> dict[float, float]:
    """Mean number of concepts needed to reach each fraction of the predicted class's logit (DN-CBM).

    Contributions to the predicted logit are sorted in decreasing order; ``mode="positive"`` accumulates
    the positive ones towards ``level * (sum of positive contributions)``, ``mode="absolute"`` accumulates
    ``|c|`` towards ``level * sum|c|``. Samples with nothing to cover count 0.

    Examples
    --------
    >>> import numpy as np
    >>> from cbm import LinearProbe
    >>> head = LinearProbe().fit(np.eye(4), [0, 1, 0, 1])
    >>> coverage(head, np.eye(4), levels=[0.5], contributions=np.array([[3.0, 1.0, -2.0, 0.0]]))
    {0.5: 1.0}
    """
    if mode not in ("positive", "absolute"):
        raise ValueError(f"mode must be 'positive' or 'absolute'; got {mode!r}.")
    c = head.contributions(X) if contributions is None else contributions
    v = np.clip(c, 0, None) if mode == "positive" else np.abs(c)
    v = -np.sort(-v, axis=1)
    cum = np.cumsum(v, axis=1)
    total = cum[:, -1:]
    out = {}
    for lv in levels:
        if not 0 < lv <= 1:
            raise ValueError(f"coverage levels must be in (0, 1]; got {lv!r}.")
        need = (cum < lv * total - 1e-12).sum(1) + 1
        need = np.where(total[:, 0] > 0, need, 0)
        out[float(lv)] = float(need.mean())
    return out


def name_quality(head: ConceptHead) -> dict[str, float]:
    """Naming similarity and duplicate-name rate of a head's concepts.

    ``name_similarity`` is the mean rank-1 cosine of an automatic naming (``head.naming_``; NaN for heads
    whose names are given, not inferred); ``duplicate_rate`` is the fraction of concepts whose name is
    shared with another concept; ``low_similarity_rate`` the fraction flagged by the naming threshold.
    """
    head._check_fitted()
    names = pd.Series(head.concept_truth_names_)
    dup = float(names.duplicated(keep=False).mean())
    table = getattr(head, "naming_", None)
    sim = low = math.nan
    if isinstance(table, pd.DataFrame) and len(table):
        top = table[table["rank"] == 1]
        sim = float(top["similarity"].mean())
        low = float(top["low_similarity"].mean()) if "low_similarity" in top else math.nan
    return {"name_similarity": sim, "duplicate_rate": dup, "low_similarity_rate": low}


def evaluate(
    head: ConceptHead,
    X: Any,
    y: Any,
    concepts: pd.DataFrame | None = None,
    *,
    name: str | None = None,
    policies: Sequence[str] = POLICIES,
    fractions: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    intervene_on: Sequence[str] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    min_auroc: float = 0.9,
    seed: int = 0,
    return_curves: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Every metric of a fitted head on one evaluation set, as one DataFrame row.

    Parameters
    ----------
    head
        A fitted :class:`~cbm.base.ConceptHead`.
    X, y
        Evaluation features (or images) and class labels.
    concepts
        Ground-truth concept labels ``[n, m]`` (optional; concept, intervention and alignment metrics
        need them and are NaN without).
    name
        Row label (default: the class name).
    policies, fractions, intervene_on, groups, seed
        Intervention curves (:func:`cbm.interventions.intervention_curve`).
    min_auroc
        Alignment threshold of :func:`unit_alignment`.
    return_curves
        Also return the intervention curves (``policy``, ``fraction``, ``n_intervened``, ``accuracy``).

    Returns
    -------
    pd.DataFrame
        One row, indexed by ``name``: ``n_concepts``, ``fit_time``, ``accuracy``, ``top5_accuracy``,
        ``ece``, ``concept_accuracy``, ``concept_auroc``, ``exact_match_accuracy``,
        ``intervention_accuracy`` (all intervenable concepts set to the truth), ``intervention_auc_<policy>``,
        ``explanation_size``, ``coverage_90`` / ``_95`` / ``_99``, ``name_similarity``, ``duplicate_rate``,
        ``aligned_units``, ``aligned_named_correctly`` (NaN for heads none of whose concept names is a label
        column, e.g. a linear probe); with ``return_curves``, ``(row, curves)``.

    Examples
    --------
    >>> import numpy as np
    >>> from cbm import LinearProbe
    >>> X = np.random.default_rng(0).normal(size=(50, 3)); y = (X[:, 0] > 0).astype(int)
    >>> row = evaluate(LinearProbe().fit(X, y), X, y)
    >>> float(row["accuracy"].iloc[0]) > 0.9
    True
    """
    head._check_fitted()
    Z = head._features(X)
    S = head._chunked(head._scores, Z).cpu().numpy()
    proba = head.predict_proba_from_concepts(S)
    yi = head._class_index(y)
    contrib = head.contributions(Z)
    row: dict[str, Any] = {
        "n_concepts": head.bank_.n_concepts,
        "fit_time": float(getattr(head, "fit_time_", math.nan)),
        "accuracy": top_k_accuracy(yi, proba, 1),
        "top5_accuracy": top_k_accuracy(yi, proba, 5),
        "ece": expected_calibration_error(yi, proba),
        "concept_accuracy": math.nan,
        "concept_auroc": math.nan,
        "exact_match_accuracy": math.nan,
        "intervention_accuracy": math.nan,
    }
    for p in policies:
        row[f"intervention_auc_{p}"] = math.nan
    row["explanation_size"] = explanation_size(head, Z, contributions=contrib)
    for lv, v in coverage(head, Z, contributions=contrib).items():
        row[f"coverage_{round(lv * 100)}"] = v
    row.update(name_quality(head))
    row["aligned_units"] = math.nan
    row["aligned_named_correctly"] = math.nan
    curves = pd.DataFrame(columns=["policy", "fraction", "n_intervened", "accuracy"])
    if concepts is not None:
        truth = as_concept_frame(concepts, S.shape[0])
        cm = concept_metrics(head, Z, truth, S=S)
        row.update({k: v for k, v in cm.items() if k != "n_matched_concepts"})
        if len(intervenable(head, truth, intervene_on)):
            parts = []
            for p in policies:
                cur = intervention_curve(head, Z, y, truth, policy=p, fractions=fractions, intervene_on=intervene_on,
                                         groups=groups, seed=seed)
                parts.append(cur)
                xs, ys = cur["fraction"].to_numpy(), cur["accuracy"].to_numpy()
                row[f"intervention_auc_{p}"] = float(np.trapezoid(ys, xs) / (xs.max() - xs.min())) if len(xs) > 1 \
                    else float(ys[0])
            curves = pd.concat(parts, ignore_index=True)
            full = intervention_curve(head, Z, y, truth, policy="random", fractions=[1.0], intervene_on=intervene_on)
            row["intervention_accuracy"] = float(full["accuracy"].iloc[0])
        if len(intervenable(head, truth)):  # names only mean something when some of them are label columns
            al = unit_alignment(head, Z, truth, min_auroc=min_auroc, S=S)
            row["aligned_units"] = al.attrs["n_aligned"]
            row["aligned_named_correctly"] = al.attrs["aligned_named_correctly"]
    out = pd.DataFrame([row], index=[name or type(head).__name__])
    if return_curves:
        return out, curves.assign(head=out.index[0])
    return out
