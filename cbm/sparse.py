"""Sparse Concept Bottleneck Models (Semenov et al. 2024): a Concept Bottleneck Layer over CLIP similarities.

The input of the Concept Bottleneck Layer (CBL) is the image-concept similarity vector of a CLIP-style
model, ``psi(x) = s * cos(img(x), txt(d_j))`` for the ``|D|`` concepts of a text bank (``s``: the model's
logit scale). The CBL is a square bias-free linear map ``|D| -> |D|``; a linear head maps its output to
the classes, ``logits = W_F W_CBL psi``. The CBL is trained with one of three objectives on its output
``cbl = W_CBL psi`` plus the cross-entropy of the head, which flows into both layers:

``"l1"``
    ``l1_lambda * ||W_CBL||_1 / |D|`` (as the reference code).
``"contrastive"``
    A symmetric (over concepts per image, and over images per concept) cross-entropy between the CBL
    logits and *targets*: ``0.5 * [H(T_rows, softmax_rows(cbl)) + H(T_cols, softmax_cols(cbl))]``.
``"gumbel"`` (Sparse-CBM)
    The same with the CBL logits perturbed by Gumbel noise and divided by ``gumbel_tau`` before the
    softmax, i.e. the cross-entropy against Gumbel-softmax samples: the paper's
    ``(log alpha<w, phi> + g) / tau`` form on the CBL logits, which makes the concept assignment sparse.

Choices that differ from the reference code (Andron00e/SparseCBM), made explicit:

- **Contrastive pairing.** The reference applies CLIP's loss to the ``B x |D|`` matrix with
  ``torch.diag``, i.e. it treats "image *i* and concept *i*" as the positive pair, which means nothing
  when the batch is not aligned with the concept list. Here the targets are *the concepts an image
  shows*: the concept labels when ``fit`` gets them for every bank concept (multi-positive targets,
  rows/columns normalised to sum 1; rows or columns without positives are skipped), otherwise the
  CLIP model's own soft assignment ``softmax(psi_c)`` (row-wise and column-wise), which keeps CBL unit
  ``j`` meaning concept ``j`` while the cross-entropy reshapes the rest (``targets=`` chooses).
- **Gumbel objective.** The reference computes ``mean(-log GumbelSoftmax(cbl))`` over *all* entries,
  which is minimised by a uniform distribution (it rewards spreading mass over every concept); here the
  Gumbel-softmax log-probabilities are taken at the targets, as in the paper's description.
- **Centring.** ``psi`` is centred with its training mean per concept (``psi_mean_``), so the bias-free
  CBL does not spend capacity on the offset that every CLIP similarity shares; the head has a bias
  (class priors) unless ``head_bias=False``.
- **Initialisation.** The CBL starts at the identity (unit ``j`` = concept ``j``) and the head at zero,
  not at PyTorch's random init, so that the concept names stay meaningful under every objective and
  the fitted model does not depend on the order of the concept list.
- **Optimisation.** One backward pass of ``CE + cbl_weight * L_CBL`` with two Adam parameter groups
  (``cbl_lr`` for the CBL, ``head_lr`` for the head); the reference's two backward passes accumulate the
  same gradients.

Examples
--------
>>> import torch
>>> words = {"red": [1.0, 0.0, 0.0], "blue": [0.0, 1.0, 0.0], "big": [0.0, 0.0, 1.0]}
>>> enc = lambda texts: torch.tensor([words[t] for t in texts])
>>> X = torch.tensor([[1.0, 0.1, 0.3], [0.1, 1.0, 0.3]] * 20); y = [0, 1] * 20
>>> head = SparseCBM(bank=["red", "blue", "big"], encoder=enc, n_epochs=30).fit(X, y)
>>> head.score(X, y)
1.0
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from concepts.bank import ConceptBank, Template

from .base import ConceptHead, LinearLabelMixin
from .concept_sets import text_bank
from .training import seeded_generator, train_minibatch

logger = logging.getLogger(__name__)

__all__ = ["SparseCBM", "OBJECTIVES"]

OBJECTIVES = ("gumbel", "contrastive", "l1")


def _soft_ce(logits: Tensor, targets: Tensor, dim: int) -> Tensor:
    """Mean over the other dimension of ``-sum targets * log_softmax(logits, dim)``, skipping empty targets."""
    mass = targets.sum(dim)
    keep = mass > 0
    if not keep.any():
        return logits.sum() * 0.0
    ce = -(targets * torch.log_softmax(logits, dim=dim)).sum(dim)
    return ce[keep].mean()


def _logit_scale(encoder: Any) -> float:
    model = getattr(encoder, "model", None)
    ls = getattr(model, "logit_scale", None)
    if isinstance(ls, Tensor) and ls.numel() == 1:
        return float(ls.detach().exp().clamp(max=100.0))
    return 100.0


class SparseCBM(LinearLabelMixin, ConceptHead):
    """Sparse-CBM: a square Concept Bottleneck Layer over CLIP image-concept similarities + a linear head.

    Parameters
    ----------
    bank : ConceptBank or vocabulary spec, default="conceptworld"
        The concept set ``D`` (an embedded bank or texts embedded with ``encoder``).
    encoder : object, optional
        Image-text encoder (``encode_texts``; ``encode_images`` to accept images).
    templates : str or list, optional
        Prompt templates for the concept texts.
    objective : {"gumbel", "contrastive", "l1"}, default="gumbel"
        CBL objective (see the module docstring).
    targets : {"auto", "labels", "clip"}, default="auto"
        Targets of the contrastive / Gumbel objectives: concept labels (needs ``fit(..., concepts=...)``
        with a column for every bank concept), CLIP's soft assignment, or labels when available.
    logit_scale : float, optional
        ``s`` in ``psi = s * cos``; default: the encoder model's ``logit_scale.exp()`` (capped at 100),
        else 100.
    gumbel_tau : float, default=1.0
        Gumbel-softmax temperature.
    l1_lambda : float, default=1e-3
        Weight of ``||W_CBL||_1 / |D|`` for ``objective="l1"``.
    cbl_weight : float, default=1.0
        Weight of the contrastive / Gumbel loss relative to the cross-entropy.
    head_bias : bool, default=True
        Give the class head a bias.
    n_epochs : int, default=30
    batch_size : int, default=256
    cbl_lr, head_lr : float, default=1e-3
        Adam learning rates of the CBL and the head.
    device : str, default="cpu"
    random_state : int, default=0
        Seeds the batch order and the Gumbel noise.
    verbose : bool, default=False

    Attributes
    ----------
    bank_ : ConceptBank
        Concept names of the text bank; vectors are the CBL units' effective directions in feature space
        (``s * W_CBL @ unit text embeddings``).
    cbl_ : Tensor [|D|, |D|]
        The Concept Bottleneck Layer.
    coef_, intercept_ : Tensor [K, |D|], [K]
        The head.
    psi_mean_ : Tensor [|D|]
    logit_scale_ : float
    targets_ : str
        ``"labels"`` or ``"clip"``.
    history_ : list of float
        Mean training loss per epoch.

    Examples
    --------
    >>> head = SparseCBM(objective="l1")
    >>> head.get_params()["objective"]
    'l1'
    """

    def __init__(
        self,
        bank: Any = "conceptworld",
        encoder: Any = None,
        templates: Template | Sequence[Template] | None = None,
        objective: str = "gumbel",
        targets: str = "auto",
        logit_scale: float | None = None,
        gumbel_tau: float = 1.0,
        l1_lambda: float = 1e-3,
        cbl_weight: float = 1.0,
        head_bias: bool = True,
        n_epochs: int = 30,
        batch_size: int = 256,
        cbl_lr: float = 1e-3,
        head_lr: float = 1e-3,
        device: str = "cpu",
        random_state: int | None = 0,
        verbose: bool = False,
    ) -> None:
        self.bank = bank
        self.encoder = encoder
        self.templates = templates
        self.objective = objective
        self.targets = targets
        self.logit_scale = logit_scale
        self.gumbel_tau = gumbel_tau
        self.l1_lambda = l1_lambda
        self.cbl_weight = cbl_weight
        self.head_bias = head_bias
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.cbl_lr = cbl_lr
        self.head_lr = head_lr
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _validate_params(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {self.objective!r}.")
        if self.targets not in ("auto", "labels", "clip"):
            raise ValueError(f"targets must be 'auto', 'labels' or 'clip'; got {self.targets!r}.")
        for name in ("gumbel_tau", "cbl_lr", "head_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0:
                raise ValueError(f"{name} must be a number > 0; got {v!r}.")
        for name in ("l1_lambda", "cbl_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0; got {v!r}.")
        if self.logit_scale is not None and (not isinstance(self.logit_scale, numbers.Real) or not self.logit_scale > 0):
            raise ValueError(f"logit_scale must be a number > 0 or None; got {self.logit_scale!r}.")
        for name in ("n_epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")

    # ------------------------------------------------------------------ model
    def _psi(self, Z: Tensor) -> Tensor:
        cos = torch.nn.functional.normalize(Z, dim=1) @ self._unit_.to(Z.device).T
        return self.logit_scale_ * cos - self.psi_mean_.to(Z.device)

    def _label_targets(self, C: pd.DataFrame | None, names: list[str]) -> Tensor | None:
        if C is None:
            if self.targets == "labels":
                raise ValueError("targets='labels' needs concept labels: pass concepts=DataFrame to fit.")
            return None
        missing = [n for n in names if n not in C.columns]
        if missing:
            if self.targets == "labels":
                raise ValueError(
                    f"targets='labels' needs a label column for every bank concept; missing {missing[:5]}. Pass "
                    "targets='clip' or a bank whose names are label columns."
                )
            return None
        if self.targets == "clip":
            return None
        return torch.from_numpy(C[names].to_numpy(dtype=np.float32, copy=True))

    def _fit(self, Z: Tensor, y: Tensor, C: pd.DataFrame | None) -> None:
        text = text_bank(self.bank, self.encoder, templates=self.templates)
        if text.dim != Z.shape[1]:
            raise ValueError(
                f"X has {Z.shape[1]} features, but the concept bank has {text.dim}-dimensional vectors; the bank "
                "must be embedded by the same image-text model that made the features."
            )
        dev = Z.device
        names = list(text.names)  # type: ignore[arg-type]
        k, K = text.n_concepts, len(self.classes_)
        self._unit_ = torch.nn.functional.normalize(text.vectors, dim=1)
        self.logit_scale_ = float(self.logit_scale) if self.logit_scale is not None else _logit_scale(self.encoder)
        self.psi_mean_ = torch.zeros(k)
        psi_raw = self._psi(Z)
        self.psi_mean_ = psi_raw.mean(0).cpu()
        psi = psi_raw - self.psi_mean_.to(dev)
        labels = self._label_targets(C, names)
        self.targets_ = "labels" if labels is not None else "clip"
        if labels is not None:
            labels = labels.to(dev)
        cbl = nn.Linear(k, k, bias=False).to(dev)
        with torch.no_grad():
            cbl.weight.copy_(torch.eye(k, device=dev))
        head = nn.Linear(k, K, bias=bool(self.head_bias)).to(dev)
        with torch.no_grad():  # a zero start: no concept is preferred before the data says so
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
        gen = seeded_generator(self._seed + 1, dev)
        obj = self.objective

        def loss_fn(idx: Tensor) -> Tensor:
            x = psi[idx]
            out = cbl(x)
            loss = torch.nn.functional.cross_entropy(head(out), y[idx])
            if obj == "l1":
                return loss + self.l1_lambda * cbl.weight.abs().sum() / k
            if labels is not None:
                t_rows = labels[idx]
                t_cols = t_rows
            else:
                t_rows = torch.softmax(x, dim=1)
                t_cols = torch.softmax(x, dim=0)
            logits = out
            if obj == "gumbel":
                u = torch.rand(out.shape, generator=gen, device=dev).clamp(1e-10, 1 - 1e-10)
                logits = (out - torch.log(-torch.log(u))) / self.gumbel_tau
            if labels is not None:
                t_rows = t_rows / t_rows.sum(1, keepdim=True).clamp(min=1e-12)
                t_cols = t_cols / t_cols.sum(0, keepdim=True).clamp(min=1e-12)
            cbl_loss = 0.5 * (_soft_ce(logits, t_rows, 1) + _soft_ce(logits, t_cols, 0))
            return loss + self.cbl_weight * cbl_loss

        self.history_ = train_minibatch(
            loss_fn,
            [{"params": list(cbl.parameters()), "lr": self.cbl_lr}, {"params": list(head.parameters()), "lr": self.head_lr}],
            Z.shape[0], n_epochs=self.n_epochs, batch_size=self.batch_size, lr=self.head_lr, seed=self._seed,
            device=dev, progress=self.verbose, desc=f"SparseCBM ({obj})",
        )
        W = cbl.weight.detach()
        self.cbl_ = W.cpu()
        self.coef_ = head.weight.detach().cpu()
        self.intercept_ = head.bias.detach().cpu() if head.bias is not None else torch.zeros(K)
        self.input_mean_ = torch.zeros(k)
        self.input_scale_ = torch.ones(k)
        directions = self.logit_scale_ * (self.cbl_ @ self._unit_)
        meta = {"how": "sparse-cbm", "objective": obj, "vectors": "s * W_CBL @ unit text embeddings",
                "vocabulary": str(text.metadata.get("vocabulary", "bank"))}
        self.bank_ = ConceptBank(directions, names=names, metadata=meta)
        if self.verbose:
            logger.info("SparseCBM: CBL near-zero fraction %.3f", self.cbl_sparsity())

    def cbl_sparsity(self, tol: float = 1e-3) -> float:
        """Fraction of CBL weights with ``|w| <= tol * max|w|``."""
        self._check_fitted()
        W = self.cbl_.abs()
        return float((W <= tol * W.max()).float().mean())

    def _scores(self, Z: Tensor) -> Tensor:
        return self._psi(Z) @ self.cbl_.to(Z.device).T

    def _logits(self, S: Tensor) -> Tensor:
        return self._linear_logits(S)

    def _summary_html(self) -> str:
        return (f"<p>objective: {self.objective}; targets: {self.targets_}; CBL near-zero fraction: "
                f"{self.cbl_sparsity():.3f}</p>" + super()._summary_html())

