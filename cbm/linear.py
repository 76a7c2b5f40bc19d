"""The baselines every concept-bottleneck paper compares to: a linear probe and a label-free vanilla CBM.

* :class:`LinearProbe`: multinomial logistic regression on the features. Its "concepts" are the
  feature dimensions themselves (an identity bank ``feature_0 ... feature_{d-1}``), so interventions,
  explanations and metrics work on it like on any head.
* :class:`LabelFreeCBM`: concept scores are cosine similarities of the image features to a text concept
  bank (the post-hoc / label-free CBM bottleneck, Oikarinen et al. 2023, without LF-CBM's learned
  projection), standardised with the training mean and standard deviation (LF-CBM step 4), followed by
  a sparse (elastic-net) linear layer. LF-CBM fits that layer with ``glm_saga`` (``alpha=0.99``,
  ``lam=0.0007``); we use the same penalty split (``l1 = 0.99 * 0.0007``, ``l2 = 0.01 * 0.0007``) with a
  full-batch FISTA solver (:func:`cbm.training.fit_sparse_linear`).

Examples
--------
>>> import numpy as np
>>> from cbm import LinearProbe
>>> X = np.random.default_rng(0).normal(size=(100, 4)); y = (X[:, 1] > 0).astype(int)
>>> LinearProbe().fit(X, y).score(X, y) > 0.95
True
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from concepts.bank import ConceptBank, Template

from .base import ConceptHead, LinearLabelMixin, feature_standardizer
from .concept_sets import text_bank
from .training import fit_sparse_linear

logger = logging.getLogger(__name__)

__all__ = ["LinearProbe", "LabelFreeCBM"]


def _check_nonneg(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"{what} must be a number >= 0; got {value!r}.")


def _check_pos_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer; got {value!r}.")


class LinearProbe(LinearLabelMixin, ConceptHead):
    """Multinomial logistic regression on frozen features (the standard upper-bound baseline).

    Parameters
    ----------
    l2 : float, default=1e-4
        L2 penalty on the weights (per ``mean`` cross-entropy; sklearn's ``C`` is ``1 / (l2 * n)``).
    l1 : float, default=0.0
        L1 penalty (a sparse probe).
    standardize : bool, default=True
        Standardise features with the training mean and standard deviation.
    max_iter : int, default=2000
        FISTA iterations.
    encoder : object, optional
        Image encoder (``encode_images``) so that ``X`` may be images.
    device : str, default="cpu"
    random_state : int, default=0
        Unused by the deterministic solver; kept for a uniform interface.
    verbose : bool, default=False

    Attributes
    ----------
    coef_ : Tensor [K, d]
    intercept_ : Tensor [K]
    bank_ : ConceptBank
        Identity bank: concept ``feature_i`` is feature dimension ``i``.

    Examples
    --------
    >>> import numpy as np
    >>> X = np.array([[0.0, 1.0], [1.0, 0.0]] * 5); y = [1, 0] * 5
    >>> LinearProbe().fit(X, y).predict(X[:2]).tolist()
    [1, 0]
    """

    def __init__(
        self,
        l2: float = 1e-4,
        l1: float = 0.0,
        standardize: bool = True,
        max_iter: int = 2000,
        encoder: Any = None,
        device: str = "cpu",
        random_state: int | None = 0,
        verbose: bool = False,
    ) -> None:
        self.l2 = l2
        self.l1 = l1
        self.standardize = standardize
        self.max_iter = max_iter
        self.encoder = encoder
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _validate_params(self) -> None:
        _check_nonneg(self.l2, "l2")
        _check_nonneg(self.l1, "l1")
        _check_pos_int(self.max_iter, "max_iter")

    def _fit(self, Z: Tensor, y: Tensor, C: pd.DataFrame | None) -> None:
        d = Z.shape[1]
        self.bank_ = ConceptBank(torch.eye(d), names=[f"feature_{i}" for i in range(d)], metadata={"how": "identity"})
        self.input_mean_, self.input_scale_ = feature_standardizer(Z, self.standardize)
        Zs = (Z - self.input_mean_.to(Z.device)) / self.input_scale_.to(Z.device)
        W, b = fit_sparse_linear(Zs, y, len(self.classes_), l1=self.l1, l2=self.l2, max_iter=self.max_iter,
                                 progress=self.verbose)
        self.coef_, self.intercept_ = W.cpu(), b.cpu()

    def _scores(self, Z: Tensor) -> Tensor:
        return Z

    def _logits(self, S: Tensor) -> Tensor:
        return self._linear_logits(S)


class LabelFreeCBM(LinearLabelMixin, ConceptHead):
    """Label-free vanilla CBM: cosine similarity to a text concept bank, then a sparse linear layer.

    Parameters
    ----------
    bank : ConceptBank or vocabulary spec, default="conceptworld"
        The concepts: an embedded :class:`~concepts.bank.ConceptBank` in the image encoder's space, or a
        vocabulary (``"conceptworld"``, ``"english"``, a list of texts, a file) embedded with ``encoder``.
    encoder : object, optional
        Image-text encoder (``encode_texts``; ``encode_images`` to accept images).
    templates : str or list, optional
        Prompt templates for the concept texts.
    l1, l2 : float, default=0.99 * 7e-4, 0.01 * 7e-4
        Elastic-net penalty of the final layer (LF-CBM's ``lam = 0.0007``, ``alpha = 0.99``).
    standardize : bool, default=True
        Standardise concept scores with their training mean and standard deviation (LF-CBM).
    max_iter : int, default=2000
    device, random_state, verbose
        As in :class:`LinearProbe`.

    Attributes
    ----------
    bank_ : ConceptBank
        The text concepts (names = vocabulary names).
    coef_ : Tensor [K, k]
        Final layer (per standardised concept score); mostly zeros.

    Examples
    --------
    >>> import torch
    >>> words = {"red": [1.0, 0.0], "blue": [0.0, 1.0]}
    >>> enc = lambda texts: torch.tensor([words[t] for t in texts])
    >>> X = torch.tensor([[1.0, 0.1], [0.1, 1.0]] * 10); y = [0, 1] * 10
    >>> head = LabelFreeCBM(bank=["red", "blue"], encoder=enc, l1=0.0).fit(X, y)
    >>> head.explain(X[:1], top=1)["concept"].tolist()
    ['red']
    """

    def __init__(
        self,
        bank: Any = "conceptworld",
        encoder: Any = None,
        templates: Template | Sequence[Template] | None = None,
        l1: float = 0.99 * 7e-4,
        l2: float = 0.01 * 7e-4,
        standardize: bool = True,
        max_iter: int = 2000,
        device: str = "cpu",
        random_state: int | None = 0,
        verbose: bool = False,
    ) -> None:
        self.bank = bank
        self.encoder = encoder
        self.templates = templates
        self.l1 = l1
        self.l2 = l2
        self.standardize = standardize
        self.max_iter = max_iter
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _validate_params(self) -> None:
        _check_nonneg(self.l2, "l2")
        _check_nonneg(self.l1, "l1")
        _check_pos_int(self.max_iter, "max_iter")

    def _fit(self, Z: Tensor, y: Tensor, C: pd.DataFrame | None) -> None:
        self.bank_ = text_bank(self.bank, self.encoder, templates=self.templates)
        if self.bank_.dim != Z.shape[1]:
            raise ValueError(
                f"X has {Z.shape[1]} features, but the concept bank has {self.bank_.dim}-dimensional vectors; the "
                "bank must be embedded by the same image-text model that made the features."
            )
        self._unit_ = torch.nn.functional.normalize(self.bank_.vectors, dim=1)
        S = self._scores(Z)
        self.input_mean_, self.input_scale_ = feature_standardizer(S, self.standardize)
        Ss = (S - self.input_mean_.to(S.device)) / self.input_scale_.to(S.device)
        W, b = fit_sparse_linear(Ss, y, len(self.classes_), l1=self.l1, l2=self.l2, max_iter=self.max_iter,
                                 progress=self.verbose)
        self.coef_, self.intercept_ = W.cpu(), b.cpu()

    def _scores(self, Z: Tensor) -> Tensor:
        return torch.nn.functional.normalize(Z, dim=1) @ self._unit_.to(Z.device).T

    def _logits(self, S: Tensor) -> Tensor:
        return self._linear_logits(S)
