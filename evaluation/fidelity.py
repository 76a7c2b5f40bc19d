"""Fidelity of concept importances: C-Deletion, C-Insertion, C-muFidelity, and a methods x metrics table.

All three metrics perturb the concept coefficients ``u`` of an input (baseline ``u_j = 0``, "concept removed")
through the same :class:`~evaluation.decomposition.ConceptModel` the importances were computed on, and read the
target output ``f`` (a logit; a detector logit for generators). They are the concept-space versions of xplique's
``Deletion`` / ``Insertion`` / ``MuFidelity`` (Holistic-CRAFT):

C-Deletion (lower is better)
    Remove concepts in decreasing order of importance, ``ceil(s k / steps)`` of them after step ``s`` (``s = 0 ..
    steps``; default ``steps = k``: one concept per step), and record ``f`` after each step. The score is the
    trapezoid area under that curve with the x axis scaled to [0, 1]: ``mean((f_s + f_{s+1}) / 2)``. A faithful
    ranking makes ``f`` drop fast.
C-Insertion (higher is better)
    Start from ``u = 0`` and insert concepts in the same order; same area. A faithful ranking makes ``f`` rise fast.
C-muFidelity (higher is better, at most 1)
    For ``n_samples`` random subsets ``S`` (each concept dropped with probability ``drop_prob``), the Spearman
    correlation between ``sum_{j in S} phi_j`` and ``f(u) - f(u_S = 0)``; averaged over inputs (NaN, e.g. a
    constant ``f``, counts as 0). Values closer than ``64 eps`` of the model's output dtype (relative to the largest
    value) are ranked as ties, so round-off does not break exact ties (e.g. a subset drawn twice). For a linear ``h``, Gradient x Input is exactly additive and scores 1.

Defaults follow xplique (``drop_prob=0.2``, ``n_samples=200``); the exact step counts of the Holistic paper were
not verifiable (see ``research/analysis-anchors.md`` section 2.3), so they are parameters.

:func:`compare_methods` runs several importance methods on the same inputs and returns an
:class:`ImportanceComparison` (table of methods x metrics, the importances, plots, report section).

Examples
--------
>>> import torch, torch.nn as nn
>>> from evaluation.decomposition import IdentityDecomposition, LayerConceptModel
>>> net = nn.Sequential(nn.Identity(), nn.Linear(4, 2))
>>> cm = LayerConceptModel(net, IdentityDecomposition().fit(torch.rand(2, 4)), layer="0")
>>> x = torch.rand(8, 4)
>>> res = compare_methods(cm, x, target=0, methods=["gradient_input", "random"])
>>> float(res.table.loc["gradient_input", "c_mufidelity"])
1.0
"""
from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .decomposition import ConceptDecomposition, ConceptModel, ConceptState, as_concept_model
from .importance import METHODS, ConceptAttribution, make_method

logger = logging.getLogger(__name__)

__all__ = [
    "c_deletion",
    "c_insertion",
    "c_mufidelity",
    "deletion_curves",
    "fidelity_scores",
    "compare_methods",
    "ImportanceComparison",
    "DEFAULT_METHODS",
    "METRICS",
]

DEFAULT_METHODS: tuple[str, ...] = (
    "gradient_input", "integrated_gradients", "occlusion", "saliency", "rise", "sobol", "random",
)
"""Methods compared by default in :func:`compare_methods`."""

METRICS: tuple[str, ...] = ("c_deletion", "c_insertion", "c_mufidelity")
"""Metric names (and their direction: deletion lower is better, the others higher)."""


# ---------------------------------------------------------------------------------------------
# plumbing
# ---------------------------------------------------------------------------------------------
def _phi_matrix(phi: Any, n: int, k: int) -> np.ndarray:
    P = phi.detach().cpu().double().numpy() if isinstance(phi, Tensor) else np.asarray(phi, dtype=np.float64)
    if P.shape != (n, k):
        raise ValueError(f"importances have shape {P.shape}, expected [{n}, {k}] (inputs x concepts).")
    if not np.isfinite(P).all():
        raise ValueError("importances contain NaN or infinite values.")
    return P


def _setup(model: Any, inputs: Any, target: Any, decomposition: Any, layer: Any, kwargs: dict) -> tuple[
        ConceptModel, ConceptState, Tensor]:
    cm = as_concept_model(model, decomposition, layer=layer, **kwargs)
    state = inputs if isinstance(inputs, ConceptState) else cm.prepare(inputs)
    return cm, state, cm.resolve_target(target, state)


def _evaluate(cm: ConceptModel, state: ConceptState, masks: Tensor, rows: Tensor, target: Tensor,
              batch_size: int) -> Tensor:
    out = []
    with torch.no_grad():
        for lo in range(0, masks.shape[0], batch_size):
            r = rows[lo:lo + batch_size]
            y = cm.forward_masks(masks[lo:lo + batch_size], r, state)
            out.append(y.gather(1, target[r].to(y.device)[:, None])[:, 0].double().cpu())
    return torch.cat(out)


def _mask_dtype(state: ConceptState) -> torch.dtype:
    return state.u.dtype if state.u is not None and state.u.dtype == torch.float64 else torch.float32


def _check_int(v: Any, name: str, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (numbers.Integral, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}.")
    return int(v)


def _tied_ranks(x: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """Average ranks where values closer than ``rtol * scale`` count as ties."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    scale = max(float(np.abs(x).max()), 1e-300)
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] - xs[j] <= rtol * scale:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _spearman(a: np.ndarray, b: np.ndarray, rtol: float = 1e-9) -> float:
    ra, rb = _tied_ranks(a, rtol), _tied_ranks(b, rtol)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum()) * float((rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def deletion_curves(
    model: Any,
    inputs: Any,
    phi: Any,
    target: Any = None,
    *,
    mode: str = "deletion",
    steps: int | None = None,
    decomposition: ConceptDecomposition | None = None,
    layer: str | None = None,
    batch_size: int | None = None,
    **model_kwargs: Any,
) -> np.ndarray:
    """The curves behind C-Deletion / C-Insertion: ``f`` after each step, ``[n, steps + 1]``.

    Parameters
    ----------
    model, inputs, target, decomposition, layer, **model_kwargs
        As for the importance methods (``inputs`` may be a prepared :class:`ConceptState`).
    phi
        Importances ``[n, k]``.
    mode : {"deletion", "insertion"}
    steps : int, optional
        Number of steps (default ``k``: one concept per step).
    batch_size : int, optional
        Rows per forward pass.

    Returns
    -------
    ndarray ``[n, steps + 1]`` (column 0: nothing removed / nothing inserted).

    Examples
    --------
    >>> # deletion_curves(cm, state, phi, target=3)[:, -1]   # f with every concept removed
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion'; got {mode!r}.")
    cm, state, tgt = _setup(model, inputs, target, decomposition, layer, model_kwargs)
    k = cm.n_concepts
    P = _phi_matrix(phi, state.n, k)
    T = _check_int(steps, "steps") if steps is not None else k
    bs = _check_int(batch_size, "batch_size") if batch_size is not None else int(getattr(cm, "batch_size", 256))
    counts = [math.ceil(s * k / T) for s in range(T + 1)]
    dtype = _mask_dtype(state)
    masks, rows = [], []
    for i in range(state.n):
        order = np.argsort(-P[i], kind="stable")
        for c in counts:
            m = torch.ones(k, dtype=dtype) if mode == "deletion" else torch.zeros(k, dtype=dtype)
            m[torch.as_tensor(order[:c], dtype=torch.long)] = 0.0 if mode == "deletion" else 1.0
            masks.append(m)
            rows.append(i)
    f = _evaluate(cm, state, torch.stack(masks), torch.tensor(rows), tgt, bs)
    return f.numpy().reshape(state.n, T + 1)


def _auc(curves: np.ndarray) -> np.ndarray:
    return ((curves[:, :-1] + curves[:, 1:]) / 2.0).mean(1)


def c_deletion(model: Any, inputs: Any, phi: Any, target: Any = None, *, steps: int | None = None,
               reduce: bool = True, **kwargs: Any) -> float | np.ndarray:
    """C-Deletion: area under the deletion curve (lower is better; module docstring).

    Parameters
    ----------
    model, inputs, phi, target, steps, **kwargs
        See :func:`deletion_curves`.
    reduce : bool, default=True
        Return the mean over inputs (float) or the per-input scores ``[n]``.

    Examples
    --------
    >>> # c_deletion(model, x, phi, target=3, decomposition=dec, layer="fc")
    """
    s = _auc(deletion_curves(model, inputs, phi, target, mode="deletion", steps=steps, **kwargs))
    return float(s.mean()) if reduce else s


def c_insertion(model: Any, inputs: Any, phi: Any, target: Any = None, *, steps: int | None = None,
                reduce: bool = True, **kwargs: Any) -> float | np.ndarray:
    """C-Insertion: area under the insertion curve (higher is better; module docstring).

    Examples
    --------
    >>> # c_insertion(model, x, phi, target=3, decomposition=dec, layer="fc")
    """
    s = _auc(deletion_curves(model, inputs, phi, target, mode="insertion", steps=steps, **kwargs))
    return float(s.mean()) if reduce else s


def c_mufidelity(
    model: Any,
    inputs: Any,
    phi: Any,
    target: Any = None,
    *,
    n_samples: int = 200,
    drop_prob: float = 0.2,
    seed: int = 0,
    reduce: bool = True,
    decomposition: ConceptDecomposition | None = None,
    layer: str | None = None,
    batch_size: int | None = None,
    **model_kwargs: Any,
) -> float | np.ndarray:
    """C-muFidelity: Spearman correlation of summed importances with the effect of removing the concepts.

    Parameters
    ----------
    model, inputs, phi, target, decomposition, layer, batch_size, **model_kwargs
        See :func:`deletion_curves`.
    n_samples : int, default=200
        Random subsets per input (the same subsets for every input).
    drop_prob : float, default=0.2
        Probability that a concept is in the removed subset ``S``.
    seed : int, default=0
    reduce : bool, default=True
        Mean over inputs, or per-input scores ``[n]``.

    Examples
    --------
    >>> # c_mufidelity(model, x, phi, target=3, decomposition=dec, layer="fc")
    """
    n_samples = _check_int(n_samples, "n_samples", lo=2)
    if isinstance(drop_prob, bool) or not isinstance(drop_prob, numbers.Real) or not 0 < drop_prob < 1:
        raise ValueError(f"drop_prob must be a probability in (0, 1); got {drop_prob!r}.")
    cm, state, tgt = _setup(model, inputs, target, decomposition, layer, model_kwargs)
    k = cm.n_concepts
    P = _phi_matrix(phi, state.n, k)
    bs = _check_int(batch_size, "batch_size") if batch_size is not None else int(getattr(cm, "batch_size", 256))
    g = torch.Generator().manual_seed(int(seed))
    S = torch.rand(n_samples, k, generator=g) < drop_prob  # True = removed
    masks = (~S).to(_mask_dtype(state))
    full = torch.ones(1, k, dtype=masks.dtype)
    ref_dtype = state.reference.dtype if state.reference.is_floating_point() else torch.float32
    rtol = 64 * torch.finfo(ref_dtype).eps  # values this close (relative) are ties: round-off of the model's dtype
    scores = np.empty(state.n)
    for i in range(state.n):
        rows = torch.full((n_samples + 1,), i, dtype=torch.long)
        f = _evaluate(cm, state, torch.cat([full, masks]), rows, tgt, bs).numpy()
        effect = f[0] - f[1:]
        summed = S.double().numpy() @ P[i]
        rho = _spearman(summed, effect, rtol)
        scores[i] = 0.0 if not np.isfinite(rho) else rho
    return float(scores.mean()) if reduce else scores


def fidelity_scores(
    model: Any,
    inputs: Any,
    phi: Any,
    target: Any = None,
    *,
    metrics: Sequence[str] = METRICS,
    steps: int | None = None,
    n_samples: int = 200,
    drop_prob: float = 0.2,
    seed: int = 0,
    decomposition: ConceptDecomposition | None = None,
    layer: str | None = None,
    batch_size: int | None = None,
    **model_kwargs: Any,
) -> dict[str, float]:
    """Several fidelity metrics of one set of importances (the concept model is prepared once).

    Returns
    -------
    dict ``metric -> mean score``.

    Examples
    --------
    >>> # fidelity_scores(model, x, phi, target=3, decomposition=dec, layer="fc")
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown fidelity metric(s) {unknown}; available: {list(METRICS)}.")
    cm, state, _ = _setup(model, inputs, target, decomposition, layer, model_kwargs)
    out: dict[str, float] = {}
    for m in metrics:
        if m == "c_deletion":
            out[m] = c_deletion(cm, state, phi, target, steps=steps, batch_size=batch_size)
        elif m == "c_insertion":
            out[m] = c_insertion(cm, state, phi, target, steps=steps, batch_size=batch_size)
        else:
            out[m] = c_mufidelity(cm, state, phi, target, n_samples=n_samples, drop_prob=drop_prob, seed=seed,
                                  batch_size=batch_size)
    return out


# ---------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ImportanceComparison:
    """Result of :func:`compare_methods`.

    Attributes
    ----------
    table : DataFrame
        One row per method (index ``method``): ``c_deletion``, ``c_insertion``, ``c_mufidelity``, ``seconds``
        (attribution time), ``n_images``.
    phi : dict of str to ndarray
        Importances ``[n, k]`` per method.
    concept_names : list of str
    targets : ndarray ``[n]``
        The explained output index of each input.
    output_names : list of str or None
    """

    table: pd.DataFrame
    phi: dict[str, np.ndarray]
    concept_names: list[str]
    targets: np.ndarray
    output_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def local(self, method: str | None = None) -> pd.DataFrame:
        """Per-image importances of one method (default: the first) as a long table."""
        from .importance import local_importance

        m = method or next(iter(self.phi))
        tnames = (None if self.output_names is None else [self.output_names[int(t)] for t in self.targets])
        return local_importance(self.phi[self._check(m)], self.concept_names, method=m,
                                targets=tnames if tnames is not None else self.targets.tolist())

    def global_(self, method: str | None = None, classes: Sequence[Any] | None = None) -> pd.DataFrame:
        """Per-class importances of one method; classes default to the explained targets."""
        from .importance import global_importance

        m = method or next(iter(self.phi))
        cls = self.targets if classes is None else classes
        names = self.output_names if classes is None else None
        return global_importance(self.phi[self._check(m)], self.concept_names, cls, method=m, class_names=names)

    def _check(self, method: str) -> str:
        if method not in self.phi:
            raise KeyError(f"method {method!r} was not compared; available: {list(self.phi)}.")
        return method

    def plot(self, ax: Any = None) -> Any:
        """Bar chart of the metrics per method; returns the Axes."""
        from .cluster_graph import fidelity_bars

        return fidelity_bars(self.table, ax=ax)

    def cluster_graph(self, method: str | None = None, ax: Any = None, **kwargs: Any) -> Any:
        """Strategic cluster graph of one method's importances; returns the Axes."""
        from .cluster_graph import cluster_graph

        m = method or next(iter(self.phi))
        return cluster_graph(self.phi[self._check(m)], self.concept_names, ax=ax, **kwargs)

    def to_report(self, report: Any, **kwargs: Any) -> Any:
        """Add an importance section to an :class:`evaluation.report.Report` (see
        :func:`evaluation.importance_report.add_importance_section`)."""
        from .importance_report import add_importance_section

        return add_importance_section(report, comparison=self, **kwargs)

    def _repr_html_(self) -> str:
        """Notebook view: the methods x metrics table, the fidelity bars and the cluster graph of the first method."""
        import html

        import matplotlib.pyplot as plt

        from .report import figure_png, png_data_uri

        parts = ["<h4>Concept importance: fidelity per method</h4>", self.table.to_html(float_format="{:.4g}".format)]
        try:
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
            self.plot(ax=axes[0])
            m = next(iter(self.phi))
            self.cluster_graph(m, ax=axes[1], min_count=min(10, max(1, len(self.targets) // 10)),
                               title=f"Strategic cluster graph ({m})")
            parts.append(f'<img alt="{html.escape("fidelity and cluster graph")}" src="{png_data_uri(figure_png(fig))}">')
        except Exception as err:  # a plot must never break the table view
            logger.warning("could not draw the importance plots: %s", err)
            plt.close("all")
        return "".join(parts)

    def __repr__(self) -> str:
        return f"ImportanceComparison({len(self.phi)} methods, {len(self.targets)} inputs)\n{self.table}"


def compare_methods(
    model: Any,
    inputs: Any,
    target: Any = None,
    *,
    decomposition: ConceptDecomposition | None = None,
    layer: str | None = None,
    methods: Sequence[str | ConceptAttribution] | Mapping[str, dict] = DEFAULT_METHODS,
    metrics: Sequence[str] = METRICS,
    steps: int | None = None,
    n_samples: int = 200,
    drop_prob: float = 0.2,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
    **model_kwargs: Any,
) -> ImportanceComparison:
    """Compute several importance methods and their fidelity metrics in one call.

    Parameters
    ----------
    model, inputs, target, decomposition, layer, **model_kwargs
        As for the importance methods; the concept model is built and ``inputs`` encoded once.
    methods
        Method names (:data:`~evaluation.importance.METHODS`), method instances built on ``model`` (a ready concept
        model), or a mapping
        ``name -> kwargs`` (e.g. ``{"sobol": {"n_design": 16}, "gradient_input": {}}``). Gradient methods are
        skipped, with a log message, for models without gradients (generators).
    metrics
        Subset of :data:`METRICS`.
    steps, n_samples, drop_prob, seed, batch_size
        Metric settings (see :func:`c_deletion`, :func:`c_mufidelity`).
    progress
        Log progress per method.

    Returns
    -------
    ImportanceComparison

    Examples
    --------
    >>> # res = compare_methods(model, x, target=3, decomposition=dec, layer="layer4")
    >>> # res.table            # methods x metrics;  res.cluster_graph("gradient_input")
    """
    cm = as_concept_model(model, decomposition, layer=layer, **model_kwargs)
    state = inputs if isinstance(inputs, ConceptState) else cm.prepare(inputs)
    tgt = cm.resolve_target(target, state)
    if isinstance(methods, Mapping):
        items = [(name, dict(kw or {})) for name, kw in methods.items()]
    else:
        if isinstance(methods, str):
            methods = [methods]
        items = [(m, {}) for m in methods]
    if not items:
        raise ValueError(f"methods is empty; pass at least one of {list(METHODS)}.")
    rows, phis = [], {}
    for name, kw in items:
        if isinstance(name, ConceptAttribution):
            if name.concept_model is not cm:
                raise ValueError(
                    f"the {type(name).__name__} instance was built on another concept model; pass methods by name, or "
                    "build the instance on the concept model given to compare_methods (Method(cm))."
                )
            method, label = name, name.name
        else:
            if name in METHODS and METHODS[name].requires_gradients and not cm.differentiable:
                logger.info("skipping %s: %s has no gradients", name, type(cm).__name__)
                continue
            if batch_size is not None:
                kw.setdefault("batch_size", batch_size)
            method, label = make_method(name, cm, **kw), str(name)
        t0 = time.perf_counter()
        phi = method.attribute(state, tgt).double().numpy()
        secs = time.perf_counter() - t0
        if progress:
            logger.info("%s: attribution in %.2f s", label, secs)
        scores = fidelity_scores(cm, state, phi, tgt, metrics=metrics, steps=steps, n_samples=n_samples,
                                 drop_prob=drop_prob, seed=seed, batch_size=batch_size)
        phis[label] = phi
        rows.append({"method": label, **scores, "seconds": secs, "n_images": state.n})
    if not rows:
        raise ValueError("no method could run on this model (gradient methods need a differentiable concept model).")
    table = pd.DataFrame(rows).set_index("method")
    return ImportanceComparison(table=table, phi=phis, concept_names=list(cm.concept_names),
                                targets=tgt.numpy(), output_names=cm.output_names,
                                meta={"concept_model": type(cm).__name__, "metrics": list(metrics)})
