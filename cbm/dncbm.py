"""Discover-then-Name CBM (Rao et al., ECCV 2024): SAE concepts, named automatically, with a sparse probe.

1. **Discover**: a sparse autoencoder (default :class:`sae.TopKSAE`) is trained on the image features;
   its codes ``f(x) >= 0`` are the concept strengths (the bottleneck).
2. **Name**: each dictionary atom (a direction in the image-text space) is named by
   :func:`concepts.naming.name_concepts`: cosine to the text embeddings of a vocabulary, argmax.
   Names do not change the bottleneck (maintainers, Discover-then-Name#3); several units may share a
   name (``bank_`` suffixes repeats: ``'red (2)'``; ``concept_truth_names_`` keeps the plain name, so an
   intervention on ``"red"`` sets every unit named red).
3. **Probe**: a sparse linear layer on ``f(x)``, ``CE + lambda * mean|W|`` (DN-CBM's L1 loss against
   zeros), bias-free by default as in the reference, solved full-batch
   (:func:`cbm.training.fit_sparse_linear`, per-entry ``l1 = lambda / (K * m)``).

Choices made explicit: the reference trains a ReLU SAE with an L1 penalty on CC3M features
(expansion 8, L1 3e-5); we default to a TopK SAE (``top_k`` active units, expansion ``n_concepts / d = 4``)
trained on the ``fit`` features, or use a pre-fitted SAE as is (``fit_sae=False``: the task-agnostic
setting). The explanation baseline of a unit is 0 (not firing), so a sample's contributions are the
``w_{c, j} f_j(x)`` of the reference and sum to its logit (minus the bias when there is one); the
coverage metric (:func:`cbm.metrics.coverage`) counts how many of them reach 90 / 95 / 99 % of it.

Examples
--------
>>> import torch
>>> from cbm import DiscoverThenNameCBM
>>> head = DiscoverThenNameCBM(vocabulary=None, n_concepts=16, top_k=2, sae_epochs=2)
>>> head.get_params()["top_k"]
2
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from sklearn.base import clone
from torch import Tensor

from concepts.bank import ConceptBank, Template
from concepts.naming import name_concepts, top_names

from .base import ConceptHead, LinearLabelMixin
from .training import fit_sparse_linear

logger = logging.getLogger(__name__)

__all__ = ["DiscoverThenNameCBM"]


class DiscoverThenNameCBM(LinearLabelMixin, ConceptHead):
    """SAE on image features -> automatically named concepts -> sparse linear probe on concept strengths.

    Parameters
    ----------
    encoder : object, optional
        Image-text encoder: ``encode_texts`` to name the concepts, ``encode_images`` to accept images.
    vocabulary : vocabulary spec or ConceptBank, default="conceptworld"
        Names to choose from (see :func:`concepts.naming.name_concepts`); an embedded vocabulary
        (``ConceptVocabulary.embed(encoder)``) needs no encoder. None skips naming (``concept_i``).
    templates : str or list, optional
        Prompt templates for the vocabulary.
    center_names : bool, default=False
        Centre the vocabulary embeddings before the cosine (see :func:`concepts.naming.name_concepts`).
    min_similarity : float, optional
        Flag names below this cosine (``naming_["low_similarity"]``).
    sae : estimator, optional
        The SAE (any estimator with ``fit``, ``transform`` and ``dictionary_``). None: ``TopKSAE`` with
        the parameters below.
    fit_sae : bool, default=True
        Fit (a clone of) the SAE on the ``fit`` features; False uses the given, already fitted SAE.
    n_concepts : int, optional
        Dictionary size of the default SAE (None: ``4 * d``).
    top_k : int, default=16
        Active units per sample of the default SAE.
    sae_epochs, sae_batch_size : int, default=30, 256
    sae_lr : float, optional
        Default SAE learning rate (None: the SAE's own default).
    lam : float, default=0.1
        DN-CBM's probe sparsity ``lambda`` (of ``lambda * mean|W|``); 0.1 is the reference's Places365
        setting (1.0 for ImageNet / CIFAR), which keeps the probe within a point of a linear probe on
        ConceptWorld from a few thousand images.
    probe_bias : bool, default=False
        Give the probe a bias (the reference has none).
    max_iter : int, default=3000
        Probe solver iterations.
    device : str, default="cpu"
    random_state : int, default=0
        Seeds the SAE.
    verbose : bool, default=False

    Attributes
    ----------
    sae_ : estimator
        The fitted SAE.
    naming_ : pandas.DataFrame or None
        The :func:`~concepts.naming.name_concepts` table (top 3 names per unit with similarities).
    bank_ : ConceptBank
        The dictionary atoms, named (repeats suffixed).
    coef_, intercept_ : Tensor [K, m], [K]
        The probe.
    """

    def __init__(
        self,
        encoder: Any = None,
        vocabulary: Any = "conceptworld",
        templates: Template | Sequence[Template] | None = None,
        center_names: bool = False,
        min_similarity: float | None = None,
        sae: Any = None,
        fit_sae: bool = True,
        n_concepts: int | None = None,
        top_k: int = 16,
        sae_epochs: int = 30,
        sae_batch_size: int = 256,
        sae_lr: float | None = None,
        lam: float = 0.1,
        probe_bias: bool = False,
        max_iter: int = 3000,
        device: str = "cpu",
        random_state: int | None = 0,
        verbose: bool = False,
    ) -> None:
        self.encoder = encoder
        self.vocabulary = vocabulary
        self.templates = templates
        self.center_names = center_names
        self.min_similarity = min_similarity
        self.sae = sae
        self.fit_sae = fit_sae
        self.n_concepts = n_concepts
        self.top_k = top_k
        self.sae_epochs = sae_epochs
        self.sae_batch_size = sae_batch_size
        self.sae_lr = sae_lr
        self.lam = lam
        self.probe_bias = probe_bias
        self.max_iter = max_iter
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _validate_params(self) -> None:
        for name in ("top_k", "sae_epochs", "sae_batch_size", "max_iter"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        if self.n_concepts is not None and (
            isinstance(self.n_concepts, bool) or not isinstance(self.n_concepts, numbers.Integral) or self.n_concepts < 1
        ):
            raise ValueError(f"n_concepts must be a positive integer or None; got {self.n_concepts!r}.")
        if isinstance(self.lam, bool) or not isinstance(self.lam, numbers.Real) or not self.lam >= 0:
            raise ValueError(f"lam must be a number >= 0; got {self.lam!r}.")
        if self.sae is not None and not (hasattr(self.sae, "fit") and hasattr(self.sae, "transform")):
            raise TypeError(f"sae must be an SAE estimator with fit and transform; got {type(self.sae).__name__}.")
        if not self.fit_sae and self.sae is None:
            raise ValueError("fit_sae=False uses a given, already fitted SAE: pass sae=<fitted SAE> as well.")

    def _make_sae(self, d: int) -> Any:
        if self.sae is not None:
            return clone(self.sae)
        from sae import TopKSAE

        m = int(self.n_concepts) if self.n_concepts is not None else 4 * d
        if self.top_k > m:
            raise ValueError(f"top_k={self.top_k} is larger than n_concepts={m}; lower top_k.")
        return TopKSAE(n_concepts=m, top_k=int(self.top_k), n_epochs=int(self.sae_epochs),
                       batch_size=int(self.sae_batch_size), lr=self.sae_lr, random_state=self._seed,
                       device=str(self._device), verbose=bool(self.verbose))

    def _fit(self, Z: Tensor, y: Tensor, C: pd.DataFrame | None) -> None:
        if self.fit_sae:
            sae = self._make_sae(Z.shape[1]).fit(Z)
        else:
            sae = self.sae
            if not hasattr(sae, "dictionary_"):
                raise ValueError(
                    f"fit_sae=False but the given {type(sae).__name__} is not fitted (no dictionary_); fit it first "
                    "or pass fit_sae=True."
                )
            if getattr(sae, "n_features_in_", Z.shape[1]) != Z.shape[1]:
                raise ValueError(
                    f"X has {Z.shape[1]} features, but the given SAE is expecting {sae.n_features_in_} features as input."
                )
        self.sae_ = sae
        atoms = torch.as_tensor(sae.dictionary_).detach().to("cpu", torch.float32)
        if self.vocabulary is None:
            self.naming_ = None
            names = [f"concept_{i}" for i in range(atoms.shape[0])]
        else:
            self.naming_ = name_concepts(atoms, self.encoder, self.vocabulary, templates=self.templates, top_m=3,
                                         center=bool(self.center_names), min_similarity=self.min_similarity)
            names = top_names(self.naming_)
        self._raw_names = list(names)
        self.bank_ = ConceptBank.from_dictionary(sae).rename(names, deduplicate=True)
        F = self._scores(Z)
        K, m = len(self.classes_), F.shape[1]
        W, b = fit_sparse_linear(F, y, K, l1=float(self.lam) / (K * m), bias=bool(self.probe_bias),
                                 max_iter=self.max_iter, progress=self.verbose)
        self.coef_, self.intercept_ = W.cpu(), b.cpu()
        self.input_mean_ = torch.zeros(m)
        self.input_scale_ = torch.ones(m)

    def _scores(self, Z: Tensor) -> Tensor:
        codes = self.sae_.transform(Z)
        codes = torch.as_tensor(codes) if not isinstance(codes, Tensor) else codes
        return codes.to(Z.device, torch.float32)

    def _logits(self, S: Tensor) -> Tensor:
        return self._linear_logits(S)

    def _baseline(self) -> Tensor:
        return torch.zeros(self.bank_.n_concepts)

    def _truth_names(self) -> list[str]:
        return list(self._raw_names)

    def _summary_html(self) -> str:
        dead = float((self.concept_quantiles_[-1] <= 0).mean())
        return (f"<p>{self.bank_.n_concepts} SAE units ({dead:.1%} never active on the fit data); "
                f"{int((self.coef_ != 0).any(0).sum())} used by the probe</p>" + super()._summary_html())
