"""Plain CLIP zero-shot classification as a head: one "concept" per class prompt.

``logits = t * cos(img(x), txt(template(class)))`` with the prompt template ``"a photo of {}"``. The
class prompts form the head's bank, so the interface (interventions, explanations, metrics) applies
unchanged; the classifier uses no labels except to order the classes and to fit the softmax
temperature ``t`` (by log-likelihood, which never changes a prediction) when ``temperature=None``.
This is the baseline of training-free concept classifiers (:class:`~cbm.cms.ConceptMatrixSearch`,
Bayesian zero-shot heads).

Examples
--------
>>> import torch
>>> words = {"a photo of cat": [1.0, 0.0], "a photo of dog": [0.0, 1.0]}
>>> enc = lambda texts: torch.tensor([words[t] for t in texts])
>>> head = ZeroShotClassifier(["cat", "dog"], encoder=enc).fit(torch.tensor([[0.9, 0.2], [0.1, 1.0]]), [0, 1])
>>> head.predict(torch.tensor([[0.0, 1.0]])).tolist()
[1]
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from concepts.bank import ConceptBank, Template

from .base import ConceptHead, LinearLabelMixin
from .concept_sets import class_bank as embed_class_prompts
from .concept_sets import class_texts
from .training import fit_temperature

__all__ = ["ZeroShotClassifier"]


class ZeroShotClassifier(LinearLabelMixin, ConceptHead):
    """CLIP zero-shot classifier ``argmax_k cos(img, txt("a photo of {class_k}"))``.

    Parameters
    ----------
    class_names : list or dict, optional
        Class texts: a list indexed by integer label (ConceptWorld's ``batch.class_names``), a dict
        ``{label: text}``, or None when the labels are the texts.
    encoder : object, optional
        Image-text encoder (``encode_texts``; ``encode_images`` to accept images).
    templates : str or list, default="a photo of {}"
        Prompt template(s) (averaged when several).
    class_bank : ConceptBank, optional
        Already embedded class prompts, one per fitted class in ``classes_`` order (skips ``encoder``).
    temperature : float, optional
        Softmax scale; None fits it on the training data by log-likelihood.
    device : str, default="cpu"
    random_state : int, default=0
        Unused (the head is deterministic).
    verbose : bool, default=False

    Attributes
    ----------
    bank_ : ConceptBank
        The class prompts (names = class texts; their ground-truth names are ``"class: <text>"`` so they are
        never matched to concept label columns).
    temperature_ : float

    Examples
    --------
    >>> ZeroShotClassifier(["cat", "dog"]).get_params()["templates"]
    'a photo of {}'
    """

    def __init__(
        self,
        class_names: Sequence[str] | Mapping[Any, str] | None = None,
        encoder: Any = None,
        templates: Template | Sequence[Template] | None = "a photo of {}",
        class_bank: ConceptBank | None = None,
        temperature: float | None = None,
        device: str = "cpu",
        random_state: int | None = 0,
        verbose: bool = False,
    ) -> None:
        self.class_names = class_names
        self.encoder = encoder
        self.templates = templates
        self.class_bank = class_bank
        self.temperature = temperature
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _validate_params(self) -> None:
        t = self.temperature
        if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Real) or not t > 0):
            raise ValueError(f"temperature must be a number > 0 or None; got {t!r}.")
        if self.class_bank is not None and not isinstance(self.class_bank, ConceptBank):
            raise TypeError(f"class_bank must be a ConceptBank or None; got {type(self.class_bank).__name__}.")

    def _fit(self, Z: Tensor, y: Tensor, C: pd.DataFrame | None) -> None:
        K = len(self.classes_)
        if self.class_bank is not None:
            bank = self.class_bank
            if bank.n_concepts != K:
                raise ValueError(
                    f"class_bank has {bank.n_concepts} prompts but y has {K} classes; pass one prompt per class in "
                    "sorted label order."
                )
        else:
            bank = embed_class_prompts(class_texts(self.classes_, self.class_names), self.encoder, templates=self.templates)
        if bank.dim != Z.shape[1]:
            raise ValueError(
                f"X has {Z.shape[1]} features, but the class prompts are {bank.dim}-dimensional; embed them with "
                "the same image-text model that made the features."
            )
        self.bank_ = bank
        self._unit_ = torch.nn.functional.normalize(bank.vectors, dim=1)
        S = self._scores(Z)
        self.temperature_ = float(self.temperature) if self.temperature is not None else fit_temperature(S, y)
        self.coef_ = self.temperature_ * torch.eye(K)
        self.intercept_ = torch.zeros(K)
        self.input_mean_ = torch.zeros(K)
        self.input_scale_ = torch.ones(K)

    def _scores(self, Z: Tensor) -> Tensor:
        return torch.nn.functional.normalize(Z, dim=1) @ self._unit_.to(Z.device).T

    def _truth_names(self) -> list[str]:
        # the "concepts" are class prompts: never match them to ground-truth concept columns by accident
        return [f"class: {n}" for n in self.bank_.names]  # type: ignore[union-attr]

    def _logits(self, S: Tensor) -> Tensor:
        return self._linear_logits(S)
