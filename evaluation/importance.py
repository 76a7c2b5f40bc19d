"""Concept importance: attribution methods in concept space (CRAFT / Holistic), captum-shaped.

A model ``f = h . g`` is split at a layer; a :class:`~evaluation.decomposition.ConceptDecomposition` turns the
layer's activations into concept coefficients ``u`` (``a ~ decode(u)``), and importance is attribution on the
function ``u -> h(decode(u) + e)`` (``e`` = the fixed reconstruction error, so ``f`` is reproduced exactly at the
unperturbed ``u``). Every method has the same shape as a captum attribution class::

    GradientXInput(model, decomposition, layer="features").attribute(inputs, target=3)   # -> Tensor [n, k]

``model`` may be an ``nn.Module`` classifier (with ``decomposition`` and ``layer``), a :class:`cbm.ConceptHead`
(its concept scores are the concept space), a generator (``score=`` reads the generated images; perturbation
methods only) or a ready :class:`~evaluation.decomposition.ConceptModel`. ``inputs`` may also be the
:class:`~evaluation.decomposition.ConceptState` returned by ``explainer.concept_model.prepare(inputs)`` (to share
the encoding between methods).

Methods (``u = 0`` is the baseline everywhere: "concept removed"):

=======================  ============================================================================================
``GradientXInput``       ``u_j * d f / d u_j`` (captum ``InputXGradient``); the default of Holistic-CRAFT.
``IntegratedGradients``  path integral from ``u = 0`` (captum ``IntegratedGradients``, 32 steps, Gauss-Legendre).
``Saliency``             ``|d f / d u_j|`` (captum ``Saliency``): unsigned, ignores how much of the concept is there.
``Occlusion``            ``f(u) - f(u with u_j = 0)`` (captum ``FeatureAblation`` on concept masks).
``RISE``                 ``E[f(u * M) M_j] / p`` over Bernoulli(``p``) concept masks ``M`` (Petsiuk et al. 2018).
``Sobol``                total Sobol index of concept ``j`` (Jansen estimator) over QMC masks ``u * M``,
                         ``M ~ U[0, 1]^k`` from ``scipy.stats.qmc`` (CRAFT's estimator; unsigned).
``RandomImportance``     seeded Gaussian noise: the floor of every fidelity metric.
=======================  ============================================================================================

When ``h`` is linear in ``u`` (a linear head on a linear decoder: a last-layer decomposition), Gradient x Input,
Integrated Gradients and Occlusion coincide exactly (each equals ``u_j * (W w)_j``, the exact additive share of
concept ``j`` in the logit) and have C-muFidelity 1 (:mod:`evaluation.fidelity`); the tests assert it.

Spatial or token layers: a concept is one coefficient per position (``u [n, P, k]``); gradient methods sum their
attributions over positions, perturbation methods scale a concept at all positions together (CRAFT's 4-D case).

Tables: :func:`local_importance` (one row per image x concept) and :func:`global_importance` (per class: mean
importance and share of the class logit).

Examples
--------
>>> import torch, torch.nn as nn
>>> from evaluation.decomposition import IdentityDecomposition
>>> net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
>>> dec = IdentityDecomposition().fit(torch.rand(3, 4))
>>> x = torch.randn(6, 5)
>>> gxi = GradientXInput(net, dec, layer="1").attribute(x, target=0)
>>> occ = Occlusion(net, dec, layer="1").attribute(x, target=0)
>>> gxi.shape, bool(torch.allclose(gxi, occ, atol=1e-5))
(torch.Size([6, 4]), True)
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .decomposition import ConceptDecomposition, ConceptModel, ConceptState, as_concept_model

logger = logging.getLogger(__name__)

__all__ = [
    "ConceptAttribution",
    "GradientXInput",
    "IntegratedGradients",
    "Saliency",
    "Occlusion",
    "RISE",
    "Sobol",
    "RandomImportance",
    "METHODS",
    "make_method",
    "local_importance",
    "global_importance",
    "top_concepts",
]


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")
    return int(value)


class ConceptAttribution:
    """Base class of the concept-importance methods (captum-shaped).

    Parameters
    ----------
    model
        An ``nn.Module`` classifier, a ``cbm`` head, a generator or a :class:`ConceptModel` (see
        :func:`~evaluation.decomposition.as_concept_model`).
    decomposition
        The concept view of ``layer`` (not for heads / ready concept models).
    layer
        Layer name of ``model`` the decomposition describes.
    batch_size
        Inputs per call of the underlying attribution (gradient methods) or rows per forward (perturbation
        methods); default: the concept model's.
    progress
        Show a progress bar.
    **model_kwargs
        Passed to the concept model (``output=``, ``output_names=``, ``channel_dim=``, ``split=``, ``score=``,
        ``seeds=``, ``settings=`` ...).

    Attributes
    ----------
    concept_model : ConceptModel
    name : str
        Short name used in tables (``"gradient_input"`` ...).
    """

    name: str = "attribution"
    requires_gradients: bool = False

    def __init__(
        self,
        model: Any,
        decomposition: ConceptDecomposition | None = None,
        *,
        layer: str | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        **model_kwargs: Any,
    ) -> None:
        self.concept_model = as_concept_model(model, decomposition, layer=layer, **model_kwargs)
        if self.requires_gradients and not self.concept_model.differentiable:
            raise TypeError(
                f"{type(self).__name__} needs gradients in concept space, but {type(self.concept_model).__name__} "
                "runs without them (generators sample under torch.no_grad). Use Occlusion, RISE or Sobol."
            )
        self.batch_size = (_check_positive_int(batch_size, "batch_size") if batch_size is not None
                           else int(getattr(self.concept_model, "batch_size", 256)))
        self.progress = bool(progress)

    @property
    def concept_names(self) -> list[str]:
        """Names of the ``k`` concepts (columns of the attributions)."""
        return list(self.concept_model.concept_names)

    def prepare(self, inputs: Any) -> ConceptState:
        """Encode ``inputs`` (or return a ready :class:`ConceptState` unchanged)."""
        return inputs if isinstance(inputs, ConceptState) else self.concept_model.prepare(inputs)

    def attribute(self, inputs: Any, target: Any = None) -> Tensor:
        """Importance of each concept for each input.

        Parameters
        ----------
        inputs
            Model-ready inputs ``[n, ...]`` (features for a head, prompts for a generator) or a
            :class:`ConceptState`.
        target
            Output column(s) to explain: None (the predicted class), an int, an output name, or one per input.

        Returns
        -------
        Tensor ``[n, k]`` (float32, CPU)
        """
        state = self.prepare(inputs)
        tgt = self.concept_model.resolve_target(target, state)
        return self._attribute(state, tgt).detach().float().cpu()

    def _attribute(self, state: ConceptState, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.concept_model).__name__}, k={self.concept_model.n_concepts})"

    # -- helpers shared by the methods ----------------------------------------------------------------
    def _chunks(self, n: int, size: int) -> Any:
        starts = range(0, n, size)
        return tqdm(starts, disable=not self.progress, desc=self.name, leave=False)

    def _eval_masks(self, state: ConceptState, masks: Tensor, rows: Tensor, target: Tensor) -> Tensor:
        """``f_target(u[rows] * masks)`` for many masks, in batches: ``[b]``."""
        out = []
        with torch.no_grad():
            for lo in range(0, masks.shape[0], self.batch_size):
                r = rows[lo:lo + self.batch_size]
                y = self.concept_model.forward_masks(masks[lo:lo + self.batch_size], r, state)
                out.append(y.gather(1, target[r].to(y.device)[:, None])[:, 0].double().cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


class _CaptumGradient(ConceptAttribution):
    """Gradient methods: captum on ``u -> f(u)``; attributions summed over positions."""

    requires_gradients = True

    def _captum(self, forward: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _call(self, method: Any, u: Tensor, target: Tensor, rows: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def _attribute(self, state: ConceptState, target: Tensor) -> Tensor:
        cm = self.concept_model

        def forward(u: Tensor, rows: Tensor) -> Tensor:
            return cm.forward_codes(u, rows, state)

        method = self._captum(forward)
        out = []
        if state.u is None:
            raise ValueError(f"{type(self).__name__} needs concept codes in the state; the concept model gave none (encode the inputs first).")
        for lo in self._chunks(state.n, self.batch_size):
            rows = torch.arange(lo, min(lo + self.batch_size, state.n))
            u = state.u[rows].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                attr = self._call(method, u, target[rows].to(u.device), rows.to(u.device))
            out.append(attr.detach().sum(1))
        return torch.cat(out)


class GradientXInput(_CaptumGradient):
    """Gradient x Input in concept space: ``phi_j = u_j * d f / d u_j`` (captum ``InputXGradient``).

    Examples
    --------
    >>> # GradientXInput(model, decomposition, layer="layer4").attribute(images, target=class_id)
    """

    name = "gradient_input"

    def _captum(self, forward: Any) -> Any:
        from captum.attr import InputXGradient

        return InputXGradient(forward)

    def _call(self, method: Any, u: Tensor, target: Tensor, rows: Tensor) -> Tensor:
        return method.attribute(u, target=target, additional_forward_args=(rows,))


class IntegratedGradients(_CaptumGradient):
    """Integrated gradients from the baseline ``u = 0`` (captum ``IntegratedGradients``).

    Parameters
    ----------
    n_steps : int, default=32
        Integration steps (Holistic default 32).
    method : str, default="gausslegendre"
        captum's integration rule (``"riemann_trapezoid"`` ...).
    (other parameters: see :class:`ConceptAttribution`)

    Examples
    --------
    >>> # IntegratedGradients(head).attribute(X, target=2)
    """

    name = "integrated_gradients"

    def __init__(self, model: Any, decomposition: ConceptDecomposition | None = None, *, layer: str | None = None,
                 n_steps: int = 32, method: str = "gausslegendre", **kwargs: Any) -> None:
        self.n_steps = _check_positive_int(n_steps, "n_steps")
        self.method = method
        super().__init__(model, decomposition, layer=layer, **kwargs)

    def _captum(self, forward: Any) -> Any:
        from captum.attr import IntegratedGradients as _IG

        return _IG(forward)

    def _call(self, method: Any, u: Tensor, target: Tensor, rows: Tensor) -> Tensor:
        return method.attribute(u, baselines=torch.zeros_like(u), target=target, additional_forward_args=(rows,),
                                n_steps=self.n_steps, method=self.method,
                                internal_batch_size=max(u.shape[0], self.batch_size))


class Saliency(_CaptumGradient):
    """Absolute gradient ``|d f / d u_j|`` (captum ``Saliency``), summed over positions.

    Examples
    --------
    >>> # Saliency(model, decomposition, layer="layer4").attribute(images)
    """

    name = "saliency"

    def _captum(self, forward: Any) -> Any:
        from captum.attr import Saliency as _Saliency

        return _Saliency(forward)

    def _call(self, method: Any, u: Tensor, target: Tensor, rows: Tensor) -> Tensor:
        return method.attribute(u, target=target, abs=True, additional_forward_args=(rows,))


class Occlusion(ConceptAttribution):
    """Occlusion of one concept at a time: ``phi_j = f(u) - f(u with u_j = 0)``.

    Computed by captum ``FeatureAblation`` on concept masks (all ones, baseline 0), so it also runs through
    generators. Costs ``k + 1`` forward passes per input.

    Examples
    --------
    >>> # Occlusion(generator_concept_model).attribute(prompts, target="red")
    """

    name = "occlusion"

    def _attribute(self, state: ConceptState, target: Tensor) -> Tensor:
        from captum.attr import FeatureAblation

        cm = self.concept_model

        def forward(m: Tensor, rows: Tensor) -> Tensor:
            return cm.forward_masks(m, rows, state)

        fa = FeatureAblation(forward)
        k = cm.n_concepts
        out = []
        per_eval = max(1, self.batch_size // max(1, min(self.batch_size, state.n)))
        for lo in self._chunks(state.n, self.batch_size):
            rows = torch.arange(lo, min(lo + self.batch_size, state.n))
            m = torch.ones(len(rows), k, dtype=torch.float64 if self._double(state) else torch.float32)
            with torch.no_grad():
                attr = fa.attribute(m, baselines=0.0, target=target[rows], additional_forward_args=(rows,),
                                    perturbations_per_eval=min(per_eval, k))
            out.append(attr.detach())
        return torch.cat(out)

    @staticmethod
    def _double(state: ConceptState) -> bool:
        return state.u is not None and state.u.dtype == torch.float64


class RISE(ConceptAttribution):
    """RISE in concept space: random binary concept masks ``M_i ~ Bernoulli(p)^k`` applied as ``u * M_i``.

    The original estimator (Petsiuk et al. 2018, ``centered=False``) is ``phi_j = sum_i f(u * M_i) M_ij / (N p)``,
    i.e. ``E[f | M_j = 1]``. The default (``centered=True``) subtracts ``E[f | M_j = 0]``, the mean output of the
    masks without concept ``j``. For a linear ``f`` the uncentred value is ``(1 - p)`` times the exact contribution
    of concept ``j`` plus a constant shared by all concepts (same ranking, not additive); the centred one estimates
    the exact contribution.

    Parameters
    ----------
    n_masks : int, default=1000
        ``N`` (the same masks for every input).
    p_keep : float, default=0.5
        Probability ``p`` that a concept is kept.
    centered : bool, default=True
        Subtract ``E[f | M_j = 0]`` (see above).
    seed : int, default=0
    (other parameters: see :class:`ConceptAttribution`)

    Examples
    --------
    >>> # RISE(model, decomposition, layer="fc", n_masks=500).attribute(x)
    """

    name = "rise"

    def __init__(self, model: Any, decomposition: ConceptDecomposition | None = None, *, layer: str | None = None,
                 n_masks: int = 1000, p_keep: float = 0.5, centered: bool = True, seed: int = 0,
                 **kwargs: Any) -> None:
        self.n_masks = _check_positive_int(n_masks, "n_masks")
        self.centered = bool(centered)
        if isinstance(p_keep, bool) or not isinstance(p_keep, numbers.Real) or not 0 < p_keep < 1:
            raise ValueError(f"p_keep must be a probability in (0, 1); got {p_keep!r}.")
        self.p_keep = float(p_keep)
        self.seed = int(seed)
        super().__init__(model, decomposition, layer=layer, **kwargs)

    def _attribute(self, state: ConceptState, target: Tensor) -> Tensor:
        k = self.concept_model.n_concepts
        g = torch.Generator().manual_seed(self.seed)
        M = (torch.rand(self.n_masks, k, generator=g) < self.p_keep).double()
        out = torch.empty(state.n, k, dtype=torch.float64)
        for i in self._chunks(state.n, 1):
            rows = torch.full((self.n_masks,), i, dtype=torch.long)
            f = self._eval_masks(state, M, rows, target)
            if self.centered:
                on = M.sum(0)
                off = self.n_masks - on
                mean_on = (f[:, None] * M).sum(0) / on.clamp_min(1)
                mean_off = (f[:, None] * (1 - M)).sum(0) / off.clamp_min(1)
                out[i] = torch.where((on > 0) & (off > 0), mean_on - mean_off, torch.zeros_like(mean_on))
            else:
                out[i] = (f[:, None] * M).sum(0) / (self.n_masks * self.p_keep)
        return out


class Sobol(ConceptAttribution):
    """Total Sobol indices of the concepts (CRAFT): variance of ``f(u * M)`` explained by each mask coordinate.

    Masks ``A, B`` ``[N, k]`` come from a ``2k``-dimensional quasi-Monte-Carlo design (``scipy.stats.qmc``);
    ``C_j`` is ``A`` with column ``j`` taken from ``B``. Jansen's estimator:
    ``ST_j = mean((f(A) - f(C_j))^2) / (2 Var[f(A), f(B)])``. Costs ``N (k + 2)`` forward passes per input.

    Parameters
    ----------
    n_design : int, default=32
        ``N`` (CRAFT's ``nb_design``; a power of two for the Sobol sequence).
    sampler : {"sobol", "halton", "lhs"}, default="sobol"
        ``qmc.Sobol``, ``qmc.Halton`` or ``qmc.LatinHypercube``.
    scramble : bool, default=True
        Scramble the sequence (seeded by ``seed``).
    seed : int, default=0
    (other parameters: see :class:`ConceptAttribution`)

    Notes
    -----
    Total indices are non-negative: they rank how much a concept matters, not in which direction.

    Examples
    --------
    >>> # Sobol(model, decomposition, layer="fc", n_design=32).attribute(x)
    """

    name = "sobol"
    _SAMPLERS = ("sobol", "halton", "lhs")

    def __init__(self, model: Any, decomposition: ConceptDecomposition | None = None, *, layer: str | None = None,
                 n_design: int = 32, sampler: str = "sobol", scramble: bool = True, seed: int = 0,
                 **kwargs: Any) -> None:
        self.n_design = _check_positive_int(n_design, "n_design")
        if sampler not in self._SAMPLERS:
            raise ValueError(f"sampler must be one of {self._SAMPLERS}; got {sampler!r}.")
        self.sampler = sampler
        self.scramble = bool(scramble)
        self.seed = int(seed)
        super().__init__(model, decomposition, layer=layer, **kwargs)

    def design(self, k: int) -> tuple[Tensor, Tensor]:
        """The masks ``[N (k + 2), k]`` (A, B, C_1 ... C_k stacked) and ``(A, B)``-free layout info.

        Returns
        -------
        masks : Tensor ``[N (k + 2), k]``
        A : Tensor ``[N, k]``
        """
        import warnings

        from scipy.stats import qmc

        d = 2 * k
        if self.sampler == "sobol":
            eng = qmc.Sobol(d, scramble=self.scramble, seed=self.seed)
        elif self.sampler == "halton":
            eng = qmc.Halton(d, scramble=self.scramble, seed=self.seed)
        else:
            eng = qmc.LatinHypercube(d, seed=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Sobol balance warning for non powers of 2
            X = torch.as_tensor(eng.random(self.n_design), dtype=torch.float64)
        A, B = X[:, :k], X[:, k:]
        Cs = []
        for j in range(k):
            C = A.clone()
            C[:, j] = B[:, j]
            Cs.append(C)
        return torch.cat([A, B, *Cs]), A

    def _attribute(self, state: ConceptState, target: Tensor) -> Tensor:
        k = self.concept_model.n_concepts
        N = self.n_design
        masks, _ = self.design(k)
        out = torch.empty(state.n, k, dtype=torch.float64)
        for i in self._chunks(state.n, 1):
            rows = torch.full((masks.shape[0],), i, dtype=torch.long)
            f = self._eval_masks(state, masks, rows, target)
            fA, fB, fC = f[:N], f[N:2 * N], f[2 * N:].reshape(k, N)
            var = torch.cat([fA, fB]).var(unbiased=False)
            st = ((fA[None, :] - fC) ** 2).mean(1) / (2 * var) if var > 0 else torch.zeros(k, dtype=torch.float64)
            out[i] = st
        return out


class RandomImportance(ConceptAttribution):
    """Seeded standard-normal importances: the chance level of every fidelity metric.

    Examples
    --------
    >>> # RandomImportance(model, decomposition, layer="fc", seed=0).attribute(x)
    """

    name = "random"

    def __init__(self, model: Any, decomposition: ConceptDecomposition | None = None, *, layer: str | None = None,
                 seed: int = 0, **kwargs: Any) -> None:
        self.seed = int(seed)
        super().__init__(model, decomposition, layer=layer, **kwargs)

    def _attribute(self, state: ConceptState, target: Tensor) -> Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(state.n, self.concept_model.n_concepts, generator=g)


METHODS: dict[str, type[ConceptAttribution]] = {
    cls.name: cls
    for cls in (GradientXInput, IntegratedGradients, Occlusion, Saliency, RISE, Sobol, RandomImportance)
}
"""Registry ``name -> class`` (``"gradient_input"``, ``"integrated_gradients"``, ``"occlusion"``, ``"saliency"``,
``"rise"``, ``"sobol"``, ``"random"``)."""


def make_method(name: str | ConceptAttribution, concept_model: ConceptModel, **kwargs: Any) -> ConceptAttribution:
    """Instantiate a method by name on a ready concept model.

    Examples
    --------
    >>> # make_method("sobol", cm, n_design=16).attribute(state)
    """
    if isinstance(name, ConceptAttribution):
        return name
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(str(name), list(METHODS), n=3)
        raise ValueError(f"unknown importance method {name!r}; available: {list(METHODS)}."
                         + (f" Did you mean {close}?" if close else ""))
    return METHODS[name](concept_model, **kwargs)


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def _as_phi(phi: Any, concept_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    P = phi.detach().cpu().double().numpy() if isinstance(phi, Tensor) else np.asarray(phi, dtype=np.float64)
    if P.ndim != 2:
        raise ValueError(f"importances must be [n, k]; got shape {P.shape}.")
    names = [f"concept_{j}" for j in range(P.shape[1])] if concept_names is None else [str(c) for c in concept_names]
    if len(names) != P.shape[1]:
        raise ValueError(f"importances have {P.shape[1]} columns but {len(names)} concept names were given.")
    return P, names


def local_importance(
    phi: Any,
    concept_names: Sequence[str] | None = None,
    *,
    method: str | None = None,
    image_ids: Sequence[Any] | None = None,
    targets: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """Per-image importance table (long format).

    Parameters
    ----------
    phi
        Importances ``[n, k]`` (from ``attribute``).
    concept_names
        ``k`` names.
    method
        Method name recorded in the ``method`` column.
    image_ids
        ``n`` identifiers (default ``0 .. n-1``).
    targets
        Optional ``n`` explained targets (recorded in a ``target`` column).

    Returns
    -------
    DataFrame
        Columns ``image_id, concept, method, phi, rank`` (rank 1 = most important concept of that image) and
        ``target`` when given; ``n * k`` rows.

    Examples
    --------
    >>> local_importance([[0.1, 0.5]], ["a", "b"], method="gxi")[["concept", "rank"]].values.tolist()
    [['a', 2], ['b', 1]]
    """
    P, names = _as_phi(phi, concept_names)
    n, k = P.shape
    ids = list(range(n)) if image_ids is None else list(image_ids)
    if len(ids) != n:
        raise ValueError(f"image_ids has {len(ids)} entries for {n} rows of importances.")
    ranks = (-P).argsort(1, kind="stable").argsort(1, kind="stable") + 1
    df = pd.DataFrame({
        "image_id": np.repeat(np.asarray(ids, dtype=object), k),
        "concept": np.tile(np.asarray(names, dtype=object), n),
        "method": method if method is not None else "",
        "phi": P.reshape(-1),
        "rank": ranks.reshape(-1).astype(int),
    })
    if targets is not None:
        t = list(targets)
        if len(t) != n:
            raise ValueError(f"targets has {len(t)} entries for {n} rows of importances.")
        df.insert(1, "target", np.repeat(np.asarray(t, dtype=object), k))
    return df


def global_importance(
    phi: Any,
    concept_names: Sequence[str] | None = None,
    classes: Sequence[Any] | None = None,
    *,
    method: str | None = None,
    class_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per-class importance: the mean over the images of a class, and its share of the explained logit.

    Parameters
    ----------
    phi
        Importances ``[n, k]``.
    concept_names
        ``k`` names.
    classes
        Class of each image ``[n]`` (true or predicted, or the explained target); None puts every image in
        one class ``"all"``.
    method
        Recorded in the ``method`` column.
    class_names
        Names for integer classes (``class_names[c]``).

    Returns
    -------
    DataFrame
        Columns ``class, concept, method, mean_phi, share_of_logit, rank, n_images``. ``share_of_logit`` is
        ``mean_phi / sum_j mean_phi_j`` over the concepts of that class: for additive methods (Gradient x Input,
        Integrated Gradients, Occlusion on a linear ``h``) the ``phi`` of an image sum to the part of its logit
        carried by the concepts, so this is the concept's share of it (Lens: "0.30 = 30 % of the logit").

    Examples
    --------
    >>> g = global_importance([[1.0, 3.0], [1.0, 1.0]], ["a", "b"], classes=[0, 0])
    >>> g[["concept", "mean_phi", "share_of_logit"]].values.tolist()
    [['b', 2.0, 0.6666666666666666], ['a', 1.0, 0.3333333333333333]]
    """
    P, names = _as_phi(phi, concept_names)
    n = P.shape[0]
    cls = np.array(["all"] * n, dtype=object) if classes is None else np.asarray(
        classes.detach().cpu().numpy() if isinstance(classes, Tensor) else classes, dtype=object)
    if len(cls) != n:
        raise ValueError(f"classes has {len(cls)} entries for {n} rows of importances.")
    if class_names is not None:
        cn = list(class_names)
        cls = np.array([cn[int(c)] if isinstance(c, (int, np.integer)) else c for c in cls], dtype=object)
    rows = []
    for c in pd.unique(cls):
        sel = cls == c
        mean = P[sel].mean(0)
        total = mean.sum()
        share = mean / total if total != 0 else np.full_like(mean, np.nan)
        order = np.argsort(-mean, kind="stable")
        for rank, j in enumerate(order, 1):
            rows.append({"class": c, "concept": names[j], "method": method if method is not None else "",
                         "mean_phi": float(mean[j]), "share_of_logit": float(share[j]), "rank": rank,
                         "n_images": int(sel.sum())})
    return pd.DataFrame(rows)


def top_concepts(global_table: pd.DataFrame, k: int | dict[Any, int] = 5) -> dict[Any, list[str]]:
    """The ``k`` most important concepts of each class of a :func:`global_importance` table.

    Parameters
    ----------
    global_table
        Output of :func:`global_importance`.
    k
        Number per class, or a dict ``class -> k``.

    Examples
    --------
    >>> g = global_importance([[1.0, 3.0]], ["a", "b"], classes=["x"])
    >>> top_concepts(g, 1)
    {'x': ['b']}
    """
    need = {"class", "concept", "rank"}
    if not need <= set(global_table.columns):
        raise ValueError(f"global_table must come from global_importance (columns {sorted(need)}).")
    out = {}
    for c, grp in global_table.groupby("class", sort=False):
        kk = k.get(c, 0) if isinstance(k, dict) else int(k)
        out[c] = grp.sort_values("rank")["concept"].head(kk).tolist()
    return out
