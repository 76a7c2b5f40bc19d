"""Concept Matrix Search (Semenov et al. 2024): a training-free classifier over image-concept similarities.

Two matrices over the same ``|D|`` concepts of a text bank:

- the image-concept matrix ``V[i, j] = cos(img_i, concept_j)``,
- the class-concept matrix ``T[k, j] = cos(class_k, concept_j)`` (class texts without a template by
  default, as in the reference notebooks),

both normalised the same way (``normalize``), then one of two rules:

``"similarity"``
    ``y_i = argmax_k cos(V[i, :], T[k, :])``: the class whose concept profile looks most like the image's.
``"max"``
    ``j* = argmax_j V[i, j]``, ``y_i = argmax_k T[k, j*]``: the class closest to the image's top concept.

Normalisations (``normalize``):

``"row"``
    divide each row by its L1 norm (+1e-8). With positive cosines (real CLIPs) this is the reference's
    ``get_dot_prods_matrix`` (divide by the row sum); unlike the plain sum it keeps the sign of rows whose
    cosines are mostly negative, as in models with a large image-text modality gap, where dividing by
    the sum flips whole rows and makes the classifier worse than chance. For the similarity rule it
    changes nothing (cosine is scale-invariant per row); it matters for ``"max"``.
``"column"``
    divide each concept column by its L1 norm: over the images seen by ``fit`` for ``V`` (so predictions
    do not depend on the test batch; labels are not used) and over the classes for ``T`` (the notebooks'
    column-normalised variant).
``"center"`` (default)
    subtract from each concept column of ``V`` its mean over the ``fit`` images, and leave ``T`` as it
    is. The image profile then says which concepts an image shows *more than usual*, instead of being
    dominated by the similarity every image has with a concept text (the concept texts' own offsets);
    ``T`` is not centred because its column means would come from a handful of class texts and cancel
    what distinguishes them. Our addition. On ConceptWorld with the built-in CLIP it is the variant that
    beats plain zero-shot on the classes defined by concept conjunctions, for bare class names and for
    rule descriptions alike (see ``benchmarks/cbm_conceptworld.py``); the reference normalisations do
    with class names only.
``"none"``
    raw cosines.

Probabilities are ``softmax(t * score)``; ``t`` is fitted by log-likelihood on the ``fit`` data when
``temperature=None`` (it never changes a prediction). Concept scores (the bottleneck, for interventions and
explanations) are the normalised image-concept similarities ``V'``.

Examples
--------
>>> import torch
>>> vecs = {"red": [1.0, 0.0, 0.0], "round": [0.0, 1.0, 0.0], "apple": [0.7, 0.7, 0.1], "sky": [0.0, 0.1, 1.0]}
>>> enc = lambda texts: torch.tensor([vecs[t] for t in texts])
>>> head = ConceptMatrixSearch(bank=["red", "round"], class_names=["apple", "sky"], encoder=enc, normalize="none")
>>> head.fit(torch.tensor([[0.8, 0.6, 0.0], [0.0, 0.05, 1.0]]), [0, 1]).predict(torch.tensor([[0.7, 0.7, 0.0]])).tolist()
[0]
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from concepts.bank import ConceptBank, Template

from .base import ConceptHead
from .concept_sets import class_bank as embed_class_prompts
from .concept_sets import class_texts, text_bank
from .training import fit_temperature

__all__ = ["ConceptMatrixSearch", "NORMALIZATIONS", "RULES"]

NORMALIZATIONS = ("row", "column", "center", "none")
RULES = ("similarity", "max")
_EPS = 1e-8


class ConceptMatrixSearch(ConceptHead):
    """Training-free classification by matching image-concept and class-concept similarity profiles.

    Parameters
    ----------
    bank : ConceptBank or vocabulary spec, default="conceptworld"
        The concept set ``D`` (embedded bank, or texts embedded with ``encoder``).
    class_names : list or dict, optional
        Class texts (list indexed by integer label, dict ``{label: text}``, or None: the labels).
    encoder : object, optional
        Image-text encoder (``encode_texts``; ``encode_images`` to accept images).
    templates : str or list, optional
        Prompt templates for the concept texts.
    class_templates : str or list, optional
        Prompt templates for the class texts (None: raw class names, as the reference).
    class_bank : ConceptBank, optional
        Already embedded class texts, one per fitted class in ``classes_`` order.
    normalize : {"row", "column", "center", "none"}, default="center"
        Matrix normalisation (see the module docstring).
    rule : {"similarity", "max"}, default="similarity"
    temperature : float, optional
        Softmax scale; None fits it on the ``fit`` data.
    device : str, default="cpu"
    random_state : int, default=0
        Unused (deterministic).
    verbose : bool, default=False

    Attributes
    ----------
    bank_ : ConceptBank
        The concepts.
    class_concept_ : Tensor [K, |D|]
        The normalised class-concept matrix ``T'``.
    temperature_ : float

    Examples
    --------
    >>> ConceptMatrixSearch(rule="max").get_params()["rule"]
    'max'
    """

    def __init__(
        self,
        bank: Any = "conceptworld",
        class_names: Sequence[str] | Mapping[Any, str] | None = None,
        encoder: Any = None,
        templates: Template | Sequence[Template] | None = None,
        class_templates: Template | Sequence[Template] | None = None,
        class_bank: ConceptBank | None = None,
        normalize: str = "center",
        rule: str = "similarity",
        temperature: float | None = None,
        device: str = "cpu",
        random_state: int | None = 0,
        verbose: bool = False,
    ) -> None:
        self.bank = bank
        self.class_names = class_names
        self.encoder = encoder
        self.templates = templates
        self.class_templates = class_templates
        self.class_bank = class_bank
        self.normalize = normalize
        self.rule = rule
        self.temperature = temperature
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    def _validate_params(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}; got {self.normalize!r}.")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}; got {self.rule!r}.")
        t = self.temperature
        if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Real) or not t > 0):
            raise ValueError(f"temperature must be a number > 0 or None; got {t!r}.")
        if self.class_bank is not None and not isinstance(self.class_bank, ConceptBank):
            raise TypeError(f"class_bank must be a ConceptBank or None; got {type(self.class_bank).__name__}.")

    def _norm(self, M: Tensor, col_stat: Tensor | None, *, images: bool) -> Tensor:
        if self.normalize == "row":
            return M / (M.abs().sum(1, keepdim=True) + _EPS)
        if self.normalize == "column":
            return M / (col_stat.to(M.device) + _EPS)  # type: ignore[union-attr]
        if self.normalize == "center" and images:
            return M - col_stat.to(M.device)  # type: ignore[union-attr]
        return M

    def _col_stat(self, M: Tensor) -> Tensor:
        return (M.abs().sum(0) if self.normalize == "column" else M.mean(0)).cpu()

    def _fit(self, Z: Tensor, y: Tensor, C: pd.DataFrame | None) -> None:
        concepts = text_bank(self.bank, self.encoder, templates=self.templates)
        K = len(self.classes_)
        if self.class_bank is not None:
            classes = self.class_bank
            if classes.n_concepts != K:
                raise ValueError(
                    f"class_bank has {classes.n_concepts} texts but y has {K} classes; pass one per class in sorted "
                    "label order."
                )
        else:
            classes = embed_class_prompts(class_texts(self.classes_, self.class_names), self.encoder,
                                          templates=self.class_templates)
        for what, b in (("concept bank", concepts), ("class texts", classes)):
            if b.dim != Z.shape[1]:
                raise ValueError(
                    f"X has {Z.shape[1]} features, but the {what} are {b.dim}-dimensional; embed them with the same "
                    "image-text model that made the features."
                )
        self.bank_ = concepts
        self._unit_ = torch.nn.functional.normalize(concepts.vectors, dim=1)
        self.class_bank_ = classes
        T = torch.nn.functional.normalize(classes.vectors, dim=1) @ self._unit_.T
        self.class_concept_ = self._norm(T, self._col_stat(T), images=False)
        V = self._raw(Z)
        self.image_col_stat_ = self._col_stat(V)
        S = self._scores(Z)
        raw_logits = self._rule_scores(S)
        self.temperature_ = float(self.temperature) if self.temperature is not None else fit_temperature(raw_logits, y)

    def _raw(self, Z: Tensor) -> Tensor:
        return torch.nn.functional.normalize(Z, dim=1) @ self._unit_.to(Z.device).T

    def _scores(self, Z: Tensor) -> Tensor:
        return self._norm(self._raw(Z), getattr(self, "image_col_stat_", None), images=True)

    def _rule_scores(self, S: Tensor) -> Tensor:
        T = self.class_concept_.to(S.device)
        if self.rule == "similarity":
            return torch.nn.functional.normalize(S, dim=1) @ torch.nn.functional.normalize(T, dim=1).T
        return T[:, S.argmax(1)].T

    def _logits(self, S: Tensor) -> Tensor:
        return self.temperature_ * self._rule_scores(S)

    def _summary_html(self) -> str:
        return f"<p>normalize: {self.normalize}; rule: {self.rule}; temperature: {self.temperature_:.3g}</p>"
