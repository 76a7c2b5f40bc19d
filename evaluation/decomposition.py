"""Concept decompositions of a layer's activations, and models seen in concept space.

A *concept decomposition* is a view ``u = encode(a)``, ``a ~ decode(u)`` of the activations ``a [m, d]`` of one
layer as ``k`` concept coefficients ``u [m, k]`` (CRAFT / Holistic: ``A ~ U W``). Four views are provided:

==============================  =================================================================================
:class:`NMFDecomposition`       CRAFT-style non-negative matrix factorisation (sklearn ``NMF``) of non-negative
                                activations, optionally fitted on image crops (:func:`fit_craft`).
:class:`SAEDecomposition`       the codes of a fitted sparse autoencoder (:mod:`sae`): ``encode = transform``,
                                ``decode`` = the SAE decoder (differentiable).
:class:`BankDecomposition`      a projection on the vectors of a :class:`~concepts.bank.ConceptBank` (e.g. CAVs):
                                ``u = a V^T - offset``, ``decode(u) = (u + offset) M`` with ``M`` the ridge
                                pseudo-inverse of ``V^T``.
:class:`IdentityDecomposition`  the layer *is* the concept space (the bottleneck of a concept-bottleneck model).
==============================  =================================================================================

What ``u = 0`` means matters: every importance method of :mod:`evaluation.importance` uses ``u = 0`` as the
"concept removed" baseline. NMF and SAE codes are zero when a concept is absent; for a bank projection pick
``offset="absent"`` (``u_j = 0`` is the mean score of the images that lack concept ``j``), ``"mean"`` or ``"zero"``.

A *concept model* (:class:`ConceptModel`) is a model split ``f = h . g`` at a layer, seen through a decomposition:
``prepare(inputs)`` computes ``u`` (and the reconstruction error ``e = a - decode(u)``, kept fixed, so that the
model is reproduced exactly at the unperturbed ``u``), and ``forward_codes(u')`` returns the model outputs with
the layer's output replaced by ``decode(u') + e``:

* :class:`LayerConceptModel`: any ``nn.Module`` classifier, any layer; ``h`` is run with
  :func:`concepts.hooks.intervene` (or, for an ``nn.Sequential`` split at a child, the remaining children);
* :class:`HeadConceptModel`: a :class:`cbm.ConceptHead` (its concept scores are the concept space);
* :class:`GeneratorConceptModel`: an image generator (:mod:`concepts.generators`); concepts at a generator layer
  are scaled by masks through ``run_with_hooks`` and a scorer (e.g. the ConceptWorld detector) reads the
  generated images. Generation runs without gradients, so only perturbation methods apply.

Examples
--------
>>> import torch
>>> from evaluation.decomposition import NMFDecomposition
>>> A = torch.rand(50, 6)
>>> nmf = NMFDecomposition(n_concepts=3, random_state=0).fit(A)
>>> nmf.encode(A).shape, nmf.decode(nmf.encode(A)).shape
(torch.Size([50, 3]), torch.Size([50, 6]))
"""
from __future__ import annotations

import abc
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import Tensor, nn

from concepts.hooks import intervene, primary_output, record, resolve_layers

logger = logging.getLogger(__name__)

__all__ = [
    "ConceptDecomposition",
    "NMFDecomposition",
    "SAEDecomposition",
    "BankDecomposition",
    "IdentityDecomposition",
    "extract_activations",
    "craft_crops",
    "fit_craft",
    "label_units",
    "ConceptState",
    "ConceptModel",
    "LayerConceptModel",
    "HeadConceptModel",
    "GeneratorConceptModel",
    "as_concept_model",
    "to_rows",
    "from_rows",
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _as_matrix(A: Any, what: str = "activations") -> Tensor:
    """Activations as a detached 2-D tensor ``[m, d]`` (tensor, array or ActivationStore)."""
    if hasattr(A, "read") and hasattr(A, "layers") and not isinstance(A, (Tensor, np.ndarray)):
        A = A.read()  # an ActivationStore
    if isinstance(A, np.ndarray):
        if not (np.issubdtype(A.dtype, np.number) or A.dtype == np.bool_):
            raise TypeError(f"{what} must be numeric; got an array of dtype {A.dtype}.")
        A = torch.from_numpy(np.ascontiguousarray(A))
    if not isinstance(A, Tensor):
        raise TypeError(
            f"{what} must be a tensor, a numpy array [m, d] or an ActivationStore; got {type(A).__name__}."
        )
    A = A.detach()
    if A.ndim != 2:
        raise ValueError(
            f"{what} must have shape [m, d] (one row per sample or position); got shape {tuple(A.shape)}. "
            "Flatten spatial maps first (evaluation.decomposition.to_rows) or extract with pooling='mean'."
        )
    if A.shape[0] == 0:
        raise ValueError(f"{what} has 0 rows; pass at least one activation vector.")
    if not A.is_floating_point():
        A = A.float()
    if not torch.isfinite(A).all():
        raise ValueError(f"{what} contain NaN or infinite values; clean them first.")
    return A


def _default_names(k: int) -> list[str]:
    return [f"concept_{i}" for i in range(k)]


def _check_names(names: Sequence[str] | None, k: int, owner: str) -> list[str]:
    if names is None:
        return _default_names(k)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"names must be a list of {k} strings; got {type(names).__name__}.")
    names = [str(n) for n in names]
    if len(names) != k:
        raise ValueError(f"names has {len(names)} entries, but {owner} has {k} concepts; pass one name per concept.")
    return names


def to_rows(a: Tensor, channel_dim: int | str = "auto") -> tuple[Tensor, dict[str, Any]]:
    """Reshape a layer output to ``[n, P, d]`` (P positions of d channels) and remember how to undo it.

    Parameters
    ----------
    a
        Layer output ``[n, d]`` (vectors), ``[n, C, H, W]`` (conv maps) or ``[n, T, d]`` (tokens).
    channel_dim
        Axis holding the features. ``"auto"``: 1 for 2-D and 4-D outputs (vectors, ``NCHW`` conv maps), -1 for
        3-D outputs (``[n, tokens, d]``) and other ranks.

    Returns
    -------
    rows : Tensor ``[n, P, d]``
    layout : dict
        Passed to :func:`from_rows`.

    Examples
    --------
    >>> import torch
    >>> rows, layout = to_rows(torch.zeros(2, 8, 4, 4))
    >>> rows.shape, from_rows(rows, layout).shape
    (torch.Size([2, 16, 8]), torch.Size([2, 8, 4, 4]))
    """
    if a.ndim < 2:
        raise ValueError(f"a layer output must have a batch axis and a feature axis; got shape {tuple(a.shape)}.")
    if channel_dim == "auto":
        cd = 1 if a.ndim in (2, 4) else a.ndim - 1
    elif isinstance(channel_dim, numbers.Integral) and not isinstance(channel_dim, bool):
        cd = int(channel_dim) % a.ndim
        if cd == 0:
            raise ValueError("channel_dim cannot be the batch axis 0; pass the axis that holds the features.")
    else:
        raise TypeError(f"channel_dim must be 'auto' or an int; got {channel_dim!r}.")
    moved = a.movedim(cd, -1)
    n, d = moved.shape[0], moved.shape[-1]
    rows = moved.reshape(n, -1, d)
    return rows, {"channel_dim": cd, "moved_shape": tuple(moved.shape[1:])}


def from_rows(rows: Tensor, layout: dict[str, Any]) -> Tensor:
    """Inverse of :func:`to_rows` (the batch size may differ from the one :func:`to_rows` saw)."""
    n = rows.shape[0]
    return rows.reshape(n, *layout["moved_shape"]).movedim(-1, layout["channel_dim"])


# ---------------------------------------------------------------------------------------------
# decompositions
# ---------------------------------------------------------------------------------------------
class ConceptDecomposition(BaseEstimator, abc.ABC):
    """Base class: ``u = encode(a)``, ``a ~ decode(u)`` for activations ``a [m, d]`` and codes ``u [m, k]``.

    Subclasses implement ``_fit(A, concepts)`` (set fitted attributes), ``_encode(A)`` and ``_decode(U)``;
    ``decode`` must be differentiable in ``U`` (gradient importance methods need it), ``encode`` need not be.

    Attributes (after fit)
    ----------------------
    n_features_in_ : int
        ``d``.
    n_concepts_ : int
        ``k``.
    """

    _requires_fit_data: bool = True

    # -- subclass hooks -----------------------------------------------------------------------------
    @abc.abstractmethod
    def _fit(self, A: Tensor | None, concepts: pd.DataFrame | None) -> None: ...

    @abc.abstractmethod
    def _encode(self, A: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def _decode(self, U: Tensor) -> Tensor: ...

    # -- public API ---------------------------------------------------------------------------------
    def fit(self, A: Any = None, concepts: pd.DataFrame | None = None) -> ConceptDecomposition:
        """Fit on activations ``A [m, d]`` (tensor, array or ActivationStore).

        Parameters
        ----------
        A
            Activations, one row per sample (or per position of a spatial map).
        concepts
            Optional boolean concept labels ``[m, c]`` aligned with ``A`` (used by
            ``BankDecomposition(offset="absent")``).

        Returns
        -------
        self
        """
        if A is None:
            if self._requires_fit_data:
                raise ValueError(f"{type(self).__name__}.fit needs activations A [m, d]; got None.")
            Am = None
        else:
            Am = _as_matrix(A)
        if concepts is not None and not isinstance(concepts, pd.DataFrame):
            raise TypeError(
                f"concepts must be a pandas DataFrame of boolean concept labels; got {type(concepts).__name__}."
            )
        if concepts is not None and Am is not None and len(concepts) != Am.shape[0]:
            raise ValueError(f"A has {Am.shape[0]} rows but concepts has {len(concepts)}; pass one label row per row of A.")
        self._fit(Am, concepts)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_concepts_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with activations before "
                "using this decomposition."
            )

    def _check_input(self, A: Tensor, what: str) -> None:
        if A.ndim != 2 or A.shape[1] != self._width(what):
            raise ValueError(
                f"{what} has shape {tuple(A.shape)}, but {type(self).__name__} is expecting "
                f"[m, {self._width(what)}]."
            )

    def _width(self, what: str) -> int:
        return self.n_concepts_ if what == "codes" else self.n_features_in_

    def encode(self, A: Any) -> Tensor:
        """Concept coefficients ``u [m, k]`` of activations ``A [m, d]`` (no gradient; dtype/device of ``A``)."""
        self._check_fitted()
        A = _as_matrix(A)
        self._check_input(A, "activations")
        with torch.no_grad():
            return self._encode(A).to(device=A.device, dtype=A.dtype)

    def decode(self, U: Tensor) -> Tensor:
        """Activations ``[m, d]`` rebuilt from codes ``U [m, k]`` (differentiable in ``U``)."""
        self._check_fitted()
        if not isinstance(U, Tensor):
            U = torch.as_tensor(np.asarray(U), dtype=torch.float32)
        self._check_input(U, "codes")
        return self._decode(U)

    @property
    def concept_names_(self) -> list[str]:
        """The concept names (``names`` if given, else ``concept_0 ...``)."""
        self._check_fitted()
        return _check_names(getattr(self, "names", None), self.n_concepts_, type(self).__name__)

    def quality(self, A: Any) -> dict[str, float]:
        """Extraction quality on activations ``A [m, d]``.

        Returns
        -------
        dict
            ``relative_l2`` (``||A - decode(encode(A))||_F / ||A||_F``), ``r2`` (explained variance,
            ``1 - SSE / SST`` with per-feature means), ``l0`` (mean number of non-zero codes per row),
            ``dead`` (fraction of concepts never non-zero).

        Examples
        --------
        >>> import torch
        >>> IdentityDecomposition().fit(torch.rand(10, 3)).quality(torch.rand(10, 3))["relative_l2"]
        0.0
        """
        self._check_fitted()
        A = _as_matrix(A)
        with torch.no_grad():
            U = self.encode(A)
            R = self.decode(U).to(A.dtype)
        A64, R64 = A.double(), R.double()
        sse = float(((A64 - R64) ** 2).sum())
        sst = float(((A64 - A64.mean(0)) ** 2).sum())
        nz = U.abs() > 1e-12
        return {
            "relative_l2": float(math.sqrt(sse) / max(float(A64.norm()), 1e-300)),
            "r2": 1.0 - sse / sst if sst > 0 else float("nan"),
            "l0": float(nz.sum(1).double().mean()),
            "dead": float((~nz.any(0)).double().mean()),
        }

    def __repr__(self) -> str:  # sklearn's repr plus the fitted size
        base = super().__repr__()
        return base if not hasattr(self, "n_concepts_") else f"{base} [k={self.n_concepts_}, d={self.n_features_in_}]"


class NMFDecomposition(ConceptDecomposition):
    """CRAFT's concept extraction: non-negative matrix factorisation ``A ~ U W`` (sklearn ``NMF``).

    Parameters
    ----------
    n_concepts : int, default=10
        ``k`` (CRAFT / Holistic use 10-25).
    init : str, default="nndsvda"
        sklearn ``NMF`` initialisation.
    max_iter : int, default=500
    tol : float, default=1e-4
    alpha_W, alpha_H, l1_ratio : float
        sklearn ``NMF`` regularisation (0 = none).
    random_state : int, default=0
    names : list of str, optional
        Concept names (default ``concept_0 ...``; see :func:`label_units` to name them from labels).

    Attributes
    ----------
    components_ : Tensor ``[k, d]``
        The concept bank ``W`` (float32).
    nmf_ : sklearn.decomposition.NMF
        The fitted sklearn estimator (``encode`` = ``nmf_.transform``).

    Notes
    -----
    ``encode`` solves for ``U >= 0`` with ``W`` fixed (``NMF.transform``); activations must be non-negative (a
    layer after a ReLU). Values down to ``-1e-6`` times the largest activation are clipped to 0 (round-off);
    anything more negative raises.

    Examples
    --------
    >>> import torch
    >>> W = torch.rand(3, 8); U = torch.rand(100, 3)
    >>> nmf = NMFDecomposition(n_concepts=3, max_iter=2000, tol=1e-6, random_state=0).fit(U @ W)
    >>> nmf.quality(U @ W)["relative_l2"] < 0.05
    True
    """

    def __init__(
        self,
        n_concepts: int = 10,
        *,
        init: str = "nndsvda",
        max_iter: int = 500,
        tol: float = 1e-4,
        alpha_W: float = 0.0,
        alpha_H: float | str = "same",
        l1_ratio: float = 0.0,
        random_state: int | None = 0,
        names: Sequence[str] | None = None,
    ) -> None:
        self.n_concepts = n_concepts
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.alpha_W = alpha_W
        self.alpha_H = alpha_H
        self.l1_ratio = l1_ratio
        self.random_state = random_state
        self.names = names

    def _nonneg(self, A: Tensor) -> np.ndarray:
        X = A.detach().cpu().double().numpy()
        lo = float(X.min())
        scale = max(float(np.abs(X).max()), 1e-12)
        if lo < -1e-6 * scale:
            raise ValueError(
                f"NMF needs non-negative activations, but the minimum is {lo:.4g}. Decompose a layer after a "
                "ReLU, or use SAEDecomposition / BankDecomposition for signed activations."
            )
        return np.clip(X, 0.0, None)

    def _fit(self, A: Tensor | None, concepts: pd.DataFrame | None) -> None:
        from sklearn.decomposition import NMF

        k = self.n_concepts
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"n_concepts must be a positive integer; got {k!r}.")
        if A is None:
            raise ValueError(f"{type(self).__name__} learns its concepts from activations; pass the inputs to fit.")
        if k > min(A.shape):
            raise ValueError(
                f"n_concepts={k} exceeds min(m, d)={min(A.shape)} of the activations {tuple(A.shape)}; "
                "use fewer concepts or more data."
            )
        X = self._nonneg(A)
        nmf = NMF(n_components=int(k), init=self.init, max_iter=self.max_iter, tol=self.tol, alpha_W=self.alpha_W,
                  alpha_H=self.alpha_H, l1_ratio=self.l1_ratio, random_state=self.random_state)
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            nmf.fit(X)
        self.nmf_ = nmf
        self.components_ = torch.as_tensor(nmf.components_, dtype=torch.float32)
        self.n_features_in_ = int(A.shape[1])
        self.n_concepts_ = int(k)
        _check_names(self.names, self.n_concepts_, type(self).__name__)

    def _encode(self, A: Tensor) -> Tensor:
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            U = self.nmf_.transform(self._nonneg(A))
        return torch.as_tensor(U)

    def _decode(self, U: Tensor) -> Tensor:
        return U @ self.components_.to(device=U.device, dtype=U.dtype)


class SAEDecomposition(ConceptDecomposition):
    """The codes of a sparse autoencoder from :mod:`sae` (``TopKSAE``, ``BatchTopKSAE``, ...).

    Parameters
    ----------
    sae : sae.BaseSAE
        A fitted SAE (or an unfitted one: :meth:`fit` then fits it on ``A``).
    names : list of str, optional
        Names of the SAE units (see :func:`label_units`).

    Notes
    -----
    ``encode = sae.transform``; ``decode(u) = u D + b_dec`` through the SAE's own decoder module
    (``sae.module_.decode``), which is differentiable. ``u = 0`` decodes to the decoder bias.

    Examples
    --------
    >>> import torch
    >>> from sae import TopKSAE
    >>> X = torch.randn(256, 8)
    >>> dec = SAEDecomposition(TopKSAE(n_concepts=16, top_k=4, n_epochs=2, random_state=0)).fit(X)
    >>> dec.encode(X[:2]).shape
    torch.Size([2, 16])
    """

    def __init__(self, sae: Any, *, names: Sequence[str] | None = None) -> None:
        self.sae = sae
        self.names = names

    @property
    def _requires_fit_data(self) -> bool:  # type: ignore[override]
        return not hasattr(self.sae, "module_")

    def _fit(self, A: Tensor | None, concepts: pd.DataFrame | None) -> None:
        if not (hasattr(self.sae, "transform") and hasattr(self.sae, "fit")):
            raise TypeError(
                f"sae must be an SAE estimator from the sae package (with fit/transform); got {type(self.sae).__name__}."
            )
        if not hasattr(self.sae, "module_"):
            self.sae.fit(A)
        elif A is not None and A.shape[1] != self.sae.n_features_in_:
            raise ValueError(
                f"A has {A.shape[1]} features, but the SAE is expecting {self.sae.n_features_in_} features as input."
            )
        self.n_features_in_ = int(self.sae.n_features_in_)
        self.n_concepts_ = int(self.sae.module_.n_concepts)
        _check_names(self.names, self.n_concepts_, type(self).__name__)

    def _encode(self, A: Tensor) -> Tensor:
        return self.sae.transform(A)

    def _decode(self, U: Tensor) -> Tensor:
        m = self.sae.module_
        w = m.W_enc
        return m.decode(U.to(device=w.device, dtype=w.dtype)).to(device=U.device, dtype=U.dtype)


class BankDecomposition(ConceptDecomposition):
    """Projection on the vectors of a :class:`~concepts.bank.ConceptBank` (e.g. concept activation vectors).

    ``u = a V^T - offset`` (``V [k, d]`` = ``bank.vectors``) and ``decode(u) = (u + offset) M`` with
    ``M = (V V^T + lambda I)^-1 V``: the ridge-regularised inverse of the projection, so that ``decode(encode(a))``
    is the (ridge) least-squares part of ``a`` in the span of the bank. ``lambda = ridge * trace(V V^T) / k``
    (relative to the mean eigenvalue). Without the ridge, correlated concept directions make ``M`` ill-conditioned
    and importance is spread erratically over near-duplicate concepts.

    Parameters
    ----------
    bank : ConceptBank
        Concept vectors in the layer's feature space (``bank.dim == d``).
    offset : {"zero", "mean", "absent"} or array [k], default="zero"
        What ``u_j = 0`` means. ``"zero"``: the raw projection. ``"mean"``: the mean projection over the fit data.
        ``"absent"``: the mean projection of the fit rows whose label for concept ``j`` is False (needs
        ``concepts=`` at fit with a column per bank name), so that ``u_j ~ 0`` when the concept is absent and the
        importance baseline ``u = 0`` means "concepts absent".
    ridge : float, default=1e-2
        Relative ridge ``lambda`` (see above); 0 gives the plain pseudo-inverse.
    names : list of str, optional
        Default: the bank's names.

    Attributes
    ----------
    vectors_ : Tensor ``[k, d]``
    decoder_ : Tensor ``[k, d]``
        ``M``.
    offset_ : Tensor ``[k]``

    Examples
    --------
    >>> import torch
    >>> from concepts.bank import ConceptBank
    >>> dec = BankDecomposition(ConceptBank(torch.eye(3)[:2], names=["x", "y"]), ridge=0.0).fit()
    >>> dec.encode(torch.tensor([[2.0, 3.0, 5.0]])).tolist()
    [[2.0, 3.0]]
    """

    _OFFSETS = ("zero", "mean", "absent")

    def __init__(self, bank: Any, *, offset: str | Any = "zero", ridge: float = 1e-2,
                 names: Sequence[str] | None = None) -> None:
        self.bank = bank
        self.offset = offset
        self.ridge = ridge
        self.names = names

    @property
    def _requires_fit_data(self) -> bool:  # type: ignore[override]
        return isinstance(self.offset, str) and self.offset != "zero"

    def _fit(self, A: Tensor | None, concepts: pd.DataFrame | None) -> None:
        bank = self.bank
        if not (hasattr(bank, "vectors") and hasattr(bank, "names")):
            raise TypeError(f"bank must be a concepts.bank.ConceptBank; got {type(bank).__name__}.")
        V = torch.as_tensor(bank.vectors, dtype=torch.float64)
        k, d = V.shape
        r = self.ridge
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or r < 0 or not math.isfinite(r):
            raise ValueError(f"ridge must be a finite number >= 0; got {r!r}.")
        if A is not None and A.shape[1] != d:
            raise ValueError(f"A has {A.shape[1]} features, but the bank vectors have {d}; use a bank built at this layer.")
        G = V @ V.T
        lam = float(r) * float(torch.trace(G)) / k
        M = torch.linalg.solve(G + lam * torch.eye(k, dtype=G.dtype), V) if lam > 0 else torch.linalg.pinv(V.T)
        off = self.offset
        if isinstance(off, str):
            if off not in self._OFFSETS:
                raise ValueError(f"offset must be one of {self._OFFSETS} or an array of {k} values; got {off!r}.")
            if off == "zero":
                offset = torch.zeros(k, dtype=torch.float64)
            else:
                S = A.double() @ V.T  # type: ignore[union-attr]
                if off == "mean":
                    offset = S.mean(0)
                else:
                    if concepts is None:
                        raise ValueError(
                            "offset='absent' needs concept labels: call fit(A, concepts=DataFrame) with one boolean "
                            "column per bank concept (e.g. batch.concepts of ConceptWorld)."
                        )
                    names = list(bank.names)
                    missing = [n for n in names if n not in concepts.columns]
                    if missing:
                        raise ValueError(
                            f"offset='absent': concepts lacks columns for bank concepts {missing[:5]}; pass labels "
                            "with a column per bank name or use offset='mean'."
                        )
                    lab = torch.as_tensor(concepts[names].to_numpy(dtype=bool, copy=True))
                    offset = torch.empty(k, dtype=torch.float64)
                    for j in range(k):
                        neg = ~lab[:, j]
                        if not bool(neg.any()):
                            raise ValueError(
                                f"offset='absent': concept {names[j]!r} is present in every fit row; its absent level "
                                "is unknown. Fit on data where it is sometimes absent."
                            )
                        offset[j] = S[neg, j].mean()
        else:
            offset = torch.as_tensor(np.asarray(off, dtype=np.float64))
            if offset.shape != (k,):
                raise ValueError(f"offset array has shape {tuple(offset.shape)}; expected [{k}] (one per concept).")
        self.vectors_ = V.float()
        self.decoder_ = M.float()
        self.offset_ = offset.float()
        self._V64, self._M64, self._off64 = V, M, offset
        self.n_features_in_ = int(d)
        self.n_concepts_ = int(k)

    @property
    def concept_names_(self) -> list[str]:
        self._check_fitted()
        names = self.names if self.names is not None else list(self.bank.names)
        return _check_names(names, self.n_concepts_, type(self).__name__)

    def _mats(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if like.dtype == torch.float64:
            V, M, o = self._V64, self._M64, self._off64
        else:
            V, M, o = self.vectors_, self.decoder_, self.offset_
        return (V.to(device=like.device, dtype=like.dtype), M.to(device=like.device, dtype=like.dtype),
                o.to(device=like.device, dtype=like.dtype))

    def _encode(self, A: Tensor) -> Tensor:
        V, _, o = self._mats(A)
        return A @ V.T - o

    def _decode(self, U: Tensor) -> Tensor:
        _, M, o = self._mats(U)
        return (U + o) @ M


class IdentityDecomposition(ConceptDecomposition):
    """The layer's output is already the concept space (``u = a``): the bottleneck of a CBM.

    Parameters
    ----------
    names : list of str, optional
        One name per feature (the concept names of the bottleneck).

    Examples
    --------
    >>> import torch
    >>> dec = IdentityDecomposition(names=["red", "blue"]).fit(torch.rand(4, 2))
    >>> dec.concept_names_
    ['red', 'blue']
    """

    def __init__(self, names: Sequence[str] | None = None) -> None:
        self.names = names

    @property
    def _requires_fit_data(self) -> bool:  # type: ignore[override]
        return self.names is None

    def _fit(self, A: Tensor | None, concepts: pd.DataFrame | None) -> None:
        k = int(A.shape[1]) if A is not None else len(self.names)  # type: ignore[arg-type]
        _check_names(self.names, k, type(self).__name__)
        self.n_features_in_ = k
        self.n_concepts_ = k

    def _encode(self, A: Tensor) -> Tensor:
        return A.clone()

    def _decode(self, U: Tensor) -> Tensor:
        return U


# ---------------------------------------------------------------------------------------------
# fitting helpers: activations through the extractor, CRAFT crops, naming units
# ---------------------------------------------------------------------------------------------
def extract_activations(
    model: nn.Module,
    layer: str,
    inputs: Any,
    *,
    pooling: str = "mean",
    batch_size: int = 64,
    preprocess: Callable[..., Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Tensor:
    """Activations of one layer, through :class:`concepts.extractor.ConceptExtractor` (kept in memory).

    Parameters
    ----------
    model, layer
        Any ``nn.Module`` and a layer name (:func:`concepts.hooks.available_layers`).
    inputs
        Model-ready tensors, images, a DataLoader ... (anything ``ConceptExtractor.extract`` takes).
    pooling
        ``"mean"`` (one row per input), ``"spatial"`` / ``"tokens"`` (one row per position), ``"cls"``.
    batch_size, preprocess, forward_fn, device, progress
        As in :class:`~concepts.extractor.ConceptExtractor`.

    Returns
    -------
    Tensor ``[m, d]`` (float32, CPU)

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    >>> extract_activations(net, "1", torch.rand(2, 3, 8, 8), pooling="spatial").shape
    torch.Size([72, 4])
    """
    from concepts.extractor import ConceptExtractor

    ext = ConceptExtractor(model, [layer], pooling=pooling, batch_size=batch_size, preprocess=preprocess,
                           forward_fn=forward_fn, device=device, progress=progress)
    return ext.extract(inputs).read(layer).float()


def craft_crops(images: Tensor, patch_size: int, *, stride: int | None = None, size: int | None = None) -> Tensor:
    """CRAFT's random-free crops: every ``patch_size`` window at ``stride``, resized back to the input size.

    Parameters
    ----------
    images
        Float images ``[n, C, H, W]``.
    patch_size
        Side of the square crops (CRAFT default 64 on 224-pixel inputs).
    stride
        Default ``int(0.8 * patch_size)`` (CRAFT).
    size
        Side the crops are resized to (bilinear); default ``H``.

    Returns
    -------
    Tensor ``[n * n_windows, C, size, size]``

    Examples
    --------
    >>> import torch
    >>> craft_crops(torch.rand(2, 3, 32, 32), 16).shape
    torch.Size([8, 3, 32, 32])
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(
            f"images must be a float tensor [n, C, H, W]; got {type(images).__name__}"
            f"{'' if not isinstance(images, Tensor) else ' of shape ' + str(tuple(images.shape))}."
        )
    n, c, h, w = images.shape
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral) or not 1 <= patch_size <= min(h, w):
        raise ValueError(f"patch_size must be an integer in [1, {min(h, w)}] for {h}x{w} images; got {patch_size!r}.")
    stride = int(stride) if stride is not None else max(1, int(0.8 * patch_size))
    if stride < 1:
        raise ValueError(f"stride must be >= 1; got {stride}.")
    patches = torch.nn.functional.unfold(images.float(), kernel_size=patch_size, stride=stride)  # [n, C*p*p, L]
    L = patches.shape[-1]
    crops = patches.transpose(1, 2).reshape(n * L, c, patch_size, patch_size)
    out = int(size) if size is not None else h
    if patch_size != out:
        crops = torch.nn.functional.interpolate(crops, size=(out, out), mode="bilinear", align_corners=False)
    return crops


def fit_craft(
    model: nn.Module,
    layer: str,
    images: Tensor,
    *,
    n_concepts: int = 10,
    patch_size: int | None = None,
    stride: int | None = None,
    batch_size: int = 64,
    random_state: int | None = 0,
    progress: bool = False,
    **nmf_kwargs: Any,
) -> NMFDecomposition:
    """Fit a CRAFT concept bank: NMF on the spatially averaged activations of image crops.

    Parameters
    ----------
    model, layer
        The classifier and the (non-negative) layer to decompose.
    images
        Model-ready float images ``[n, C, H, W]`` (CRAFT: images of one class; "at least 500" advised).
    n_concepts
        ``k``.
    patch_size, stride
        Crop side (default ``H // 2``) and stride (default ``0.8 * patch_size``); see :func:`craft_crops`.
    batch_size, random_state, progress, **nmf_kwargs
        Passed on (``nmf_kwargs`` to :class:`NMFDecomposition`).

    Returns
    -------
    NMFDecomposition (fitted)

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    >>> fit_craft(net, "1", torch.rand(6, 3, 16, 16), n_concepts=3).components_.shape
    torch.Size([3, 8])
    """
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError("images must be model-ready float images [n, C, H, W] for CRAFT crops.")
    p = int(patch_size) if patch_size is not None else max(1, images.shape[-1] // 2)
    crops = craft_crops(images, p, stride=stride)
    A = extract_activations(model, layer, crops, pooling="mean", batch_size=batch_size, progress=progress)
    return NMFDecomposition(n_concepts=n_concepts, random_state=random_state, **nmf_kwargs).fit(A)


def label_units(codes: Any, concept_labels: pd.DataFrame, *, min_auc: float = 0.0) -> pd.DataFrame:
    """Name each concept unit (NMF component, SAE latent) by the labelled concept it detects best.

    The score of unit ``j`` for concept ``c`` is the ROC AUC of ``codes[:, j]`` against the boolean labels of ``c``;
    each unit is named by its best concept (ties: first column).

    Parameters
    ----------
    codes
        Codes ``[n, k]`` (e.g. ``decomposition.encode(A)``).
    concept_labels
        Boolean labels ``[n, c]`` (e.g. ``batch.concepts``).
    min_auc
        Units whose best AUC is below this get the name ``unit_<j>`` and concept ``None``.

    Returns
    -------
    DataFrame
        One row per unit: ``unit``, ``concept`` (best concept), ``auc``, ``name`` (the concept name made unique
        with `` (2)``, `` (3)`` ... when several units share it; use it as ``names=``).

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> labels = pd.DataFrame({"a": [True, False, True, False], "b": [False, False, True, True]})
    >>> label_units(np.array([[1.0, 0], [0, 0], [1, 1], [0, 1]]), labels)["concept"].tolist()
    ['a', 'b']
    """
    from sklearn.metrics import roc_auc_score

    U = codes.detach().cpu().double().numpy() if isinstance(codes, Tensor) else np.asarray(codes, dtype=np.float64)
    if U.ndim != 2:
        raise ValueError(f"codes must be [n, k]; got shape {U.shape}.")
    if not isinstance(concept_labels, pd.DataFrame):
        raise TypeError(f"concept_labels must be a DataFrame of booleans; got {type(concept_labels).__name__}.")
    if len(concept_labels) != U.shape[0]:
        raise ValueError(f"codes has {U.shape[0]} rows but concept_labels has {len(concept_labels)}.")
    cols = [c for c in concept_labels.columns if 0 < concept_labels[c].astype(bool).sum() < len(concept_labels)]
    if not cols:
        raise ValueError("no concept column has both positives and negatives; cannot score units.")
    L = concept_labels[cols].to_numpy(dtype=bool)
    rows, seen = [], {}
    for j in range(U.shape[1]):
        aucs = np.array([roc_auc_score(L[:, c], U[:, j]) if np.ptp(U[:, j]) > 0 else 0.5 for c in range(len(cols))])
        best = int(np.argmax(aucs))
        auc = float(aucs[best])
        concept = str(cols[best]) if auc >= min_auc else None
        base = concept if concept is not None else f"unit_{j}"
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base} ({seen[base]})"
        rows.append({"unit": j, "concept": concept, "auc": auc, "name": name})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# models in concept space
# ---------------------------------------------------------------------------------------------
@dataclass
class ConceptState:
    """What :meth:`ConceptModel.prepare` computed for a batch of inputs.

    Attributes
    ----------
    u : Tensor or None
        Concept coefficients ``[n, P, k]`` (``P`` positions of a spatial/token layer; 1 for vectors). None for
        generators (codes are recomputed at every call of the generator's layer).
    n : int
        Number of inputs.
    reference : Tensor
        Unperturbed model outputs ``[n, C]``.
    data : dict
        Model-specific payload (inputs, reconstruction errors, layouts).
    """

    u: Tensor | None
    n: int
    reference: Tensor
    data: dict[str, Any] = field(default_factory=dict)

    def select(self, rows: Any) -> ConceptState:
        """The state of a subset of the inputs (indices, a slice or a boolean mask).

        Per-input entries of ``data`` (tensors and lists with ``n`` rows) are subset; the rest is shared.

        Examples
        --------
        >>> import torch
        >>> st = ConceptState(torch.zeros(4, 1, 2), 4, torch.zeros(4, 3), {"inputs": torch.arange(4)})
        >>> st.select([1, 3]).data["inputs"].tolist()
        [1, 3]
        """
        idx = torch.arange(self.n)[rows] if not isinstance(rows, Tensor) or rows.dtype == torch.bool else rows
        idx = torch.atleast_1d(torch.as_tensor(idx, dtype=torch.long))
        if len(idx) == 0:
            raise ValueError("select needs at least one row.")
        data = {}
        for key, v in self.data.items():
            if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == self.n:
                data[key] = v[idx.to(v.device)]
            elif isinstance(v, list) and len(v) == self.n:
                data[key] = [v[i] for i in idx.tolist()]
            else:
                data[key] = v
        return ConceptState(u=None if self.u is None else self.u[idx.to(self.u.device)], n=int(len(idx)),
                            reference=self.reference[idx.to(self.reference.device)], data=data)


def _output_tensor(out: Any, output: Callable[[Any], Tensor] | None) -> Tensor:
    t = output(out) if output is not None else (out if isinstance(out, Tensor) else primary_output(out))
    if not isinstance(t, Tensor):
        raise TypeError(f"the output function returned {type(t).__name__}; expected a Tensor [b, C].")
    if t.ndim == 1:
        t = t[:, None]
    if t.ndim != 2:
        t = t.reshape(t.shape[0], -1)
    return t


class ConceptModel(abc.ABC):
    """A model seen in concept space: ``f(u) = h(decode(u) + e)`` with outputs ``[b, C]``.

    Attributes
    ----------
    concept_names : list of str
    output_names : list of str or None
        Names of the output columns (class names, detector concepts), used to resolve string targets.
    differentiable : bool
        Whether :meth:`forward_codes` supports gradients (False for generators).
    """

    concept_names: list[str]
    output_names: list[str] | None = None
    differentiable: bool = True
    batch_size: int = 256

    @abc.abstractmethod
    def prepare(self, inputs: Any) -> ConceptState:
        """Encode ``inputs`` in concept space (see :class:`ConceptState`)."""

    def forward_codes(self, u: Tensor, rows: Tensor, state: ConceptState) -> Tensor:
        """Outputs ``[b, C]`` for codes ``u [b, P, k]`` of the inputs ``rows [b]`` (indices into the prepared batch)."""
        raise TypeError(
            f"{type(self).__name__} cannot evaluate arbitrary concept codes with gradients; use a perturbation "
            "method (Occlusion, RISE, Sobol)."
        )

    def forward_masks(self, masks: Tensor, rows: Tensor, state: ConceptState) -> Tensor:
        """Outputs ``[b, C]`` when concept ``j`` of input ``rows[i]`` is scaled by ``masks[i, j]`` (1 = unchanged)."""
        if state.u is None:
            raise ValueError(f"{type(self).__name__}: the state holds no concept codes; encode the inputs first (encode=True).")
        u = state.u[rows] * masks.to(state.u)[:, None, :]
        return self.forward_codes(u, rows, state)

    @property
    def n_concepts(self) -> int:
        return len(self.concept_names)

    def resolve_target(self, target: Any, state: ConceptState) -> Tensor:
        """Target output index per input, ``[n]`` long.

        ``None``: the argmax of the unperturbed outputs (the predicted class). An int: the same column for all
        inputs. A string: a column named in :attr:`output_names`. A sequence / array of ints or names: one per input.
        """
        n = state.n
        C = state.reference.shape[1]
        if target is None:
            return state.reference.argmax(1).long().cpu()

        def one(t: Any) -> int:
            if isinstance(t, str):
                if not self.output_names or t not in self.output_names:
                    import difflib

                    close = difflib.get_close_matches(t, self.output_names or [], n=3)
                    raise ValueError(
                        f"target {t!r} is not an output name of this model"
                        + (f"; closest: {close}" if close else "")
                        + (f" (outputs: {self.output_names[:10]}...)" if self.output_names else
                           "; this model has no output names, pass integer column indices")
                        + "."
                    )
                return self.output_names.index(t)
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (numbers.Integral, np.integer)):
                raise TypeError(f"target must be None, an int, a str or a sequence of them; got {type(t).__name__}.")
            if not 0 <= int(t) < C:
                raise ValueError(f"target {int(t)} is out of range for a model with {C} outputs (0..{C - 1}).")
            return int(t)

        if isinstance(target, (str, numbers.Integral, np.integer)) and not isinstance(target, bool):
            return torch.full((n,), one(target), dtype=torch.long)
        if isinstance(target, Tensor):
            target = target.detach().cpu().tolist()
        if isinstance(target, np.ndarray):
            target = target.tolist()
        if not isinstance(target, Sequence):
            raise TypeError(f"target must be None, an int, a str or a sequence of them; got {type(target).__name__}.")
        if len(target) != n:
            raise ValueError(f"target has {len(target)} entries for {n} inputs; pass one target per input or a single one.")
        return torch.tensor([one(t) for t in target], dtype=torch.long)


def _default_device(model: nn.Module) -> torch.device:
    p = next((p for p in model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


class LayerConceptModel(ConceptModel):
    """A classifier split at a layer and seen through a decomposition: ``f(u) = h(decode(u) + e)``.

    Parameters
    ----------
    model : nn.Module
        Any classifier; ``model(inputs)`` returns logits (or anything ``output`` turns into ``[b, C]``).
    decomposition : ConceptDecomposition
        Fitted on this layer's activations (rows of ``d`` channels).
    layer : str
        Layer name (see :func:`concepts.hooks.available_layers`). It must be called once per forward pass.
    output : callable, optional
        ``output(model_output) -> Tensor [b, C]``; default: the output itself, or its primary tensor
        (first element of a tuple, first tensor field of a ``ModelOutput``).
    output_names : list of str, optional
        Names of the output columns (e.g. class names), so that ``target`` may be a name.
    channel_dim : int or "auto", default="auto"
        Feature axis of the layer output (see :func:`to_rows`); spatial / token positions share one concept
        coefficient vector each, and every method perturbs a concept at all positions together.
    split : {"auto", "hooks", "sequential"}, default="auto"
        How ``h`` is run. ``"hooks"``: the whole model is run with the layer's output replaced through
        :func:`concepts.hooks.intervene` (works for any architecture). ``"sequential"``: ``model`` is an
        ``nn.Sequential`` and ``layer`` one of its children; ``h`` = the children after it (faster, same result).
        ``"auto"``: sequential when possible.
    device : str or torch.device, optional
        Where the model runs (default: where its parameters are).
    batch_size : int, default=256
        Rows per forward pass in the perturbation loops.

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> dec = IdentityDecomposition().fit(torch.rand(2, 6))
    >>> cm = LayerConceptModel(net, dec, layer="1")
    >>> x = torch.randn(5, 4)
    >>> state = cm.prepare(x)
    >>> torch.allclose(cm.forward_codes(state.u, torch.arange(5), state), net(x))
    True
    """

    def __init__(
        self,
        model: nn.Module,
        decomposition: ConceptDecomposition,
        layer: str,
        *,
        output: Callable[[Any], Tensor] | None = None,
        output_names: Sequence[str] | None = None,
        channel_dim: int | str = "auto",
        split: str = "auto",
        device: str | torch.device | None = None,
        batch_size: int = 256,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        if not isinstance(decomposition, ConceptDecomposition):
            raise TypeError(
                "decomposition must be a ConceptDecomposition (NMFDecomposition, SAEDecomposition, BankDecomposition, "
                f"IdentityDecomposition); got {type(decomposition).__name__}."
            )
        decomposition._check_fitted()
        if not isinstance(layer, str) or not layer:
            raise ValueError(
                f"layer must be the name of a sub-module (see concepts.hooks.available_layers(model)); got {layer!r}."
            )
        resolve_layers(model, layer)
        if split not in ("auto", "hooks", "sequential"):
            raise ValueError(f"split must be 'auto', 'hooks' or 'sequential'; got {split!r}.")
        if output is not None and not callable(output):
            raise TypeError(f"output must be a callable model_output -> Tensor [b, C]; got {type(output).__name__}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
        self.model = model
        self.decomposition = decomposition
        self.layer = layer
        self.output = output
        self.output_names = None if output_names is None else [str(n) for n in output_names]
        self.channel_dim = channel_dim
        self.device = torch.device(device) if device is not None else _default_device(model)
        self.batch_size = int(batch_size)
        self.concept_names = list(decomposition.concept_names_)
        self._head: nn.Module | None = None
        children = dict(model.named_children()) if isinstance(model, nn.Sequential) else {}
        if split == "sequential" and layer not in children:
            raise ValueError(
                f"split='sequential' needs an nn.Sequential model and one of its direct children as layer; "
                f"{type(model).__name__} / {layer!r} is not. Use split='hooks'."
            )
        if split != "hooks" and layer in children:
            names = list(children)
            rest = [children[n] for n in names[names.index(layer) + 1:]]
            self._head = nn.Sequential(*rest)
        self.split = "sequential" if self._head is not None else "hooks"

    def _forward(self, x: Tensor) -> Tensor:
        return _output_tensor(self.model(x), self.output)

    def prepare(self, inputs: Any) -> ConceptState:
        if not isinstance(inputs, Tensor):
            raise TypeError(
                f"inputs must be a model-ready tensor [n, ...]; got {type(inputs).__name__}. Preprocess images first."
            )
        if inputs.ndim == 0 or inputs.shape[0] == 0:
            raise ValueError("inputs is empty; pass at least one input.")
        x = inputs.to(self.device)
        was = self.model.training
        self.model.eval()
        us, errs, refs = [], [], []
        layout = None
        try:
            with torch.no_grad():
                for lo in range(0, x.shape[0], self.batch_size):
                    xb = x[lo:lo + self.batch_size]
                    with record(self.model, [self.layer], clone=True) as rec:
                        ref = self._forward(xb)
                    calls = rec[self.layer]
                    if len(calls) != 1:
                        raise ValueError(
                            f"layer {self.layer!r} was called {len(calls)} times in one forward pass; concept "
                            "importance needs a layer that runs once per forward (pick another layer)."
                        )
                    rows, layout = to_rows(calls[0], self.channel_dim)
                    b, P, d = rows.shape
                    if d != self.decomposition.n_features_in_:
                        raise ValueError(
                            f"layer {self.layer!r} has {d} features along channel_dim, but the decomposition is "
                            f"expecting {self.decomposition.n_features_in_}; fit it on this layer (or set channel_dim)."
                        )
                    flat = rows.reshape(b * P, d)
                    u = self.decomposition.encode(flat)
                    err = flat - self.decomposition.decode(u).to(flat.dtype)
                    us.append(u.reshape(b, P, -1))
                    errs.append(err.reshape(b, P, d))
                    refs.append(ref.detach())
        finally:
            self.model.train(was)
        return ConceptState(u=torch.cat(us), n=int(x.shape[0]), reference=torch.cat(refs),
                            data={"inputs": x, "err": torch.cat(errs), "layout": layout})

    def forward_codes(self, u: Tensor, rows: Tensor, state: ConceptState) -> Tensor:
        b, P, k = u.shape
        d = self.decomposition.n_features_in_
        err = state.data["err"][rows.to(state.data["err"].device)]
        a_rows = self.decomposition.decode(u.reshape(b * P, k)).reshape(b, P, d).to(err.dtype) + err
        a = from_rows(a_rows, state.data["layout"])
        was = self.model.training
        self.model.eval()
        try:
            if self._head is not None:
                return _output_tensor(self._head(a), self.output)
            xb = state.data["inputs"][rows.to(state.data["inputs"].device)]

            def replace(t: Tensor) -> Tensor:
                if t.shape != a.shape:
                    raise ValueError(
                        f"layer {self.layer!r} output has shape {tuple(t.shape)} but the prepared activations have "
                        f"{tuple(a.shape)}; the model must be deterministic in shape for the same inputs."
                    )
                return a.to(t.dtype)

            with intervene(self.model, {self.layer: replace}):
                return self._forward(xb)
        finally:
            self.model.train(was)


class HeadConceptModel(ConceptModel):
    """A concept-bottleneck head of :mod:`cbm`: its concept scores are the concept space.

    ``prepare(X)`` computes ``u = head.concept_scores(X)`` (features ``[n, d]``, or images when the head has an
    encoder) and ``forward_codes(u)`` the class logits of the head's label layer. Output names are the head's
    ``classes_`` (as strings).

    Parameters
    ----------
    head : cbm.ConceptHead
        A fitted head.
    batch_size : int, default=256

    Examples
    --------
    >>> import numpy as np
    >>> from cbm import LinearProbe
    >>> X = np.random.default_rng(0).normal(size=(40, 3)); y = (X[:, 0] > 0).astype(int)
    >>> cm = HeadConceptModel(LinearProbe().fit(X, y))
    >>> cm.prepare(X).u.shape
    torch.Size([40, 1, 3])
    """

    def __init__(self, head: Any, *, batch_size: int = 256) -> None:
        if not (hasattr(head, "_scores") and hasattr(head, "_logits") and hasattr(head, "_features")):
            raise TypeError(f"head must be a cbm.ConceptHead; got {type(head).__name__}.")
        head._check_fitted()
        self.head = head
        self.batch_size = int(batch_size)
        self.concept_names = list(head.bank_.names)
        self.output_names = [str(c) for c in head.classes_]

    def prepare(self, inputs: Any) -> ConceptState:
        Z = self.head._features(inputs)
        with torch.no_grad():
            S = torch.cat([self.head._scores(Z[i:i + self.batch_size]) for i in range(0, Z.shape[0], self.batch_size)])
            ref = torch.cat([self.head._logits(S[i:i + self.batch_size]) for i in range(0, S.shape[0], self.batch_size)])
        return ConceptState(u=S[:, None, :].detach(), n=int(Z.shape[0]), reference=ref.detach(), data={})

    def forward_codes(self, u: Tensor, rows: Tensor, state: ConceptState) -> Tensor:
        return self.head._logits(u[:, 0, :])


class GeneratorConceptModel(ConceptModel):
    """Concepts at a generator layer, scored on the generated images.

    At every call of ``layer`` during generation the hook encodes the layer output, scales concept ``j`` by the
    mask value of the image the row belongs to, and decodes with the reconstruction error added back
    (``a' = decode(encode(a) * m) + (a - decode(encode(a)))``; an all-ones mask leaves the output unchanged).
    The generated images are scored by ``score`` (e.g. the ConceptWorld detector's logits), so the importance of
    a generator concept is measured on a *detected concept in the output*.

    Parameters
    ----------
    generator
        An object with ``run_with_hooks(prompts, seeds, hooks, **settings)`` (:mod:`concepts.generators`).
    decomposition : ConceptDecomposition
        Fitted on activations of ``layer`` (rows of ``d`` channels; e.g. from ``run_with_cache``).
    layer : str
        A layer of the denoiser / language model (called once per step or token).
    score : callable or object with ``logits``
        ``score(images [b, H, W, 3] float in [0, 1]) -> Tensor [b, C]``; an object with a ``logits`` method and
        ``concept_names`` (a :class:`~concepts.zoo.detector.ConceptDetector`) is used as ``score.logits`` with
        those output names.
    seeds : int or sequence of int, optional
        Seed of each prompt (default ``0, 1, ...``); an int ``s`` means ``s, s+1, ...``.
    rows : {"all", "cond"}, default="all"
        Scale the concepts in both CFG branches, or in the conditional rows only.
    channel_dim : int or "auto"
    output_names : list of str, optional
    settings : dict, optional
        Generation settings passed to ``run_with_hooks`` (``steps=``, ``guidance=`` ...).
    batch_size : int, default=16
        Images generated per call.

    Examples
    --------
    >>> # det = zoo.load("conceptworld-detector"); gen = zoo.load("conceptworld-diffusion")
    >>> # cm = GeneratorConceptModel(gen, dec, "unet.mid_block", det, settings={"steps": 8})
    >>> # Occlusion(cm).attribute(["a red circle"], target="red")
    """

    differentiable = False

    def __init__(
        self,
        generator: Any,
        decomposition: ConceptDecomposition,
        layer: str,
        score: Any,
        *,
        seeds: int | Sequence[int] | None = None,
        rows: str = "all",
        channel_dim: int | str = "auto",
        output_names: Sequence[str] | None = None,
        settings: dict[str, Any] | None = None,
        batch_size: int = 16,
    ) -> None:
        if not hasattr(generator, "run_with_hooks"):
            raise TypeError(
                f"generator must implement run_with_hooks (concepts.generators); got {type(generator).__name__}."
            )
        if not isinstance(decomposition, ConceptDecomposition):
            raise TypeError(f"decomposition must be a ConceptDecomposition; got {type(decomposition).__name__}.")
        decomposition._check_fitted()
        if rows not in ("all", "cond"):
            raise ValueError(f"rows must be 'all' or 'cond'; got {rows!r}.")
        if hasattr(score, "logits") and callable(score.logits):
            if output_names is None and hasattr(score, "concept_names"):
                output_names = list(score.concept_names)
            score = score.logits
        if not callable(score):
            raise TypeError(
                "score must be a callable images -> Tensor [b, C] or an object with a logits method (a ConceptDetector); "
                f"got {type(score).__name__}."
            )
        self.generator = generator
        self.decomposition = decomposition
        self.layer = layer
        self.score = score
        self.seeds = seeds
        self.rows = rows
        self.channel_dim = channel_dim
        self.output_names = None if output_names is None else [str(n) for n in output_names]
        self.settings = dict(settings or {})
        self.batch_size = int(batch_size)
        self.concept_names = list(decomposition.concept_names_)

    def _seed_list(self, n: int) -> list[int]:
        s = self.seeds
        if s is None:
            return list(range(n))
        if isinstance(s, numbers.Integral) and not isinstance(s, bool):
            return list(range(int(s), int(s) + n))
        s = [int(v) for v in s]
        if len(s) != n:
            raise ValueError(f"seeds has {len(s)} entries for {n} prompts; pass one seed per prompt.")
        return s

    def prepare(self, inputs: Any) -> ConceptState:
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, Sequence) or not inputs or not all(isinstance(p, str) for p in inputs):
            raise TypeError("inputs of a generator concept model must be a non-empty list of prompts (str).")
        prompts = list(inputs)
        state = ConceptState(u=None, n=len(prompts), reference=torch.zeros(len(prompts), 1),
                             data={"prompts": prompts, "seeds": self._seed_list(len(prompts))})
        ones = torch.ones(len(prompts), self.n_concepts)
        state.reference = self.forward_masks(ones, torch.arange(len(prompts)), state)
        return state

    def _hook(self, masks: Tensor) -> Callable[..., Tensor | None]:
        dec = self.decomposition
        n = masks.shape[0]

        def hook(x: Tensor, ctx: Any = None) -> Tensor | None:
            R = int(x.shape[0])
            m = torch.ones(R, masks.shape[1], dtype=x.dtype, device=x.device)
            mm = masks.to(device=x.device, dtype=x.dtype)
            cfg = getattr(ctx, "cfg", None)
            if cfg is not None and R == 2 * n:
                m[cfg.cond_index(R).to(x.device)] = mm
                if self.rows == "all":
                    m[cfg.uncond_index(R).to(x.device)] = mm
            elif R == n:
                m = mm
            else:
                raise ValueError(
                    f"layer {self.layer!r} was called with {R} rows for {n} images; pick a layer of the denoiser or "
                    "language model (one row per image, or two with classifier-free guidance)."
                )
            if bool((m == 1).all()):
                return None
            rows_, layout = to_rows(x, self.channel_dim)
            b, P, d = rows_.shape
            flat = rows_.reshape(b * P, d).float()
            u = dec.encode(flat)
            err = flat - dec.decode(u).to(flat.dtype)
            new = dec.decode((u.reshape(b, P, -1) * m[:, None, :].to(u.dtype)).reshape(b * P, -1)).to(flat.dtype) + err
            return from_rows(new.reshape(b, P, d).to(x.dtype), layout)

        return hook

    def forward_masks(self, masks: Tensor, rows: Tensor, state: ConceptState) -> Tensor:
        prompts, seeds = state.data["prompts"], state.data["seeds"]
        outs = []
        for lo in range(0, masks.shape[0], self.batch_size):
            mb = masks[lo:lo + self.batch_size].detach().float().cpu()
            rb = rows[lo:lo + self.batch_size].tolist()
            res = self.generator.run_with_hooks([prompts[i] for i in rb], [seeds[i] for i in rb],
                                                {self.layer: self._hook(mb)}, **self.settings)
            images = res.images if hasattr(res, "images") else res
            with torch.no_grad():
                outs.append(_output_tensor(self.score(images), None).detach().float().cpu())
        return torch.cat(outs)


def as_concept_model(
    model: Any,
    decomposition: ConceptDecomposition | None = None,
    *,
    layer: str | None = None,
    **kwargs: Any,
) -> ConceptModel:
    """Build the right :class:`ConceptModel` for ``model``.

    * a :class:`ConceptModel`: returned as is (``decomposition`` and ``layer`` must be None);
    * a :class:`cbm.ConceptHead`: :class:`HeadConceptModel` (its concept scores are the concept space);
    * a generator (has ``run_with_hooks``): :class:`GeneratorConceptModel` (``score=`` required);
    * an ``nn.Module``: :class:`LayerConceptModel` (``decomposition`` and ``layer`` required).

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    >>> type(as_concept_model(net, IdentityDecomposition().fit(torch.rand(2, 3)), layer="0")).__name__
    'LayerConceptModel'
    """
    if isinstance(model, ConceptModel):
        if decomposition is not None or layer is not None or kwargs:
            raise ValueError("model is already a ConceptModel; do not pass decomposition, layer or other options.")
        return model
    if hasattr(model, "_scores") and hasattr(model, "_logits") and hasattr(model, "bank_"):
        if decomposition is not None or layer is not None:
            raise ValueError(
                "a cbm head's concept scores are the concept space: do not pass decomposition or layer for a ConceptHead."
            )
        return HeadConceptModel(model, **kwargs)
    if hasattr(model, "run_with_hooks") and not isinstance(model, nn.Module):
        if decomposition is None or layer is None or "score" not in kwargs:
            raise ValueError(
                "a generator needs decomposition=, layer= and score= (e.g. the ConceptWorld detector) to be seen "
                "in concept space."
            )
        score = kwargs.pop("score")
        return GeneratorConceptModel(model, decomposition, layer, score, **kwargs)
    if isinstance(model, nn.Module):
        if decomposition is None or layer is None:
            raise ValueError(
                "an nn.Module classifier needs decomposition= (e.g. NMFDecomposition().fit(acts)) and layer= (the "
                "layer it decomposes); for a cbm head pass the head itself."
            )
        return LayerConceptModel(model, decomposition, layer, **kwargs)
    raise TypeError(
        f"cannot explain a {type(model).__name__}: expected an nn.Module, a cbm ConceptHead, a generator or a ConceptModel."
    )
