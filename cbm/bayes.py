"""Concept-guided Bayesian zero-shot classification (after CGBC, CVPR 2026), training-free.

Each class ``k`` comes with a list of concepts (a ``{class: [concepts]}`` JSON file, e.g. written once by
an LLM or by hand; nothing is generated at run time). Concepts are treated as latent variables and the
class score marginalises over them:

1. **Compositional prompts.** Random combinations of ``concepts_per_prompt`` distinct concepts of the
   class are joined with ``" or "`` and put into a template, ``"a photo of a {cls} with {concepts}."``
   (at most ``max_combinations`` candidates per class, seeded).
2. **Diversity.** ``n_prompts`` of the candidates are kept per class with a determinantal point process on
   their text embeddings (:mod:`concepts.selection`): deterministic greedy MAP (``selection="greedy"``, what
   CGBC runs) or an exact k-DPP sample through dppy (``"sample"``); ``"random"`` and ``"all"`` are the
   ablations.
3. **Likelihood and marginalisation.** With ``s_kc = cos(img(x), txt(prompt_kc))``, the class score is the
   expectation of the prompt scores under a posterior over the class's prompts,
   ``score_k(x) = sum_c q_kc s_kc``, ``q_kc ∝ pi_kc w_kc(x)``: a prior ``pi_kc`` (uniform, or from
   ``concept_priors``) times a likelihood weight ``w_kc(x)``. The default weight is CGBC's adaptive
   soft-trim: with ``m_k`` the median and ``MAD_k`` the median absolute deviation of ``s_k.``,
   ``rho_k = mean_c 1[|s_kc - m_k| > lambda MAD_k]`` (the estimated outlier rate),
   ``kappa_k = clip(log((1 - rho_k) / rho_k), kappa_min, kappa_max)`` and
   ``w_kc = sigmoid(kappa_k (s_kc - m_k) / MAD_k)``: prompts far below the median (outlier concepts, which
   match no image of the class) are switched off, the more sharply the fewer outliers there seem to be.
   The class logits are ``temperature * score_k + log p(k)``.

Aggregator baselines of the paper (``aggregator=``): ``"average"`` (mean of the prompt scores: uniform
weights), ``"prompt_ensemble"`` (cosine to the renormalised mean prompt embedding, CuPL-style; CGBC's
``concept_avg``), ``"max"``, ``"median"``, ``"trimmed_mean"`` (symmetric, ``trim`` per side), ``"huber"`` and
``"cauchy"`` (M-estimates of location by iteratively reweighted means from the median, scale
``1.4826 MAD``, tuning constants ``huber_delta`` and ``cauchy_c``). Everything is vectorised over images,
classes and prompts; the prompt embeddings are computed once in ``fit`` and cached in ``bank_``, so
classifying an image costs one image embedding and one ``[d, K * n_prompts]`` product, like plain
zero-shot with more columns.

Documented choices. CGBC multiplies scores by CLIP's logit scale and divides by ``tau``; the soft-trim
weights are invariant to that scale, so we only keep a softmax ``temperature`` (fitted by log-likelihood
when None, which never changes a prediction). The soft-trim formula above is the reference code's
(``concept_mad_noise``); the paper's equations were not verifiable. Classes may have different numbers
of prompts (short concept lists); the aggregators ignore the missing ones.

Examples
--------
>>> import torch
>>> vocab = {"cat": [1.0, 0.0], "dog": [0.0, 1.0], "whiskers": [0.9, 0.1], "tail": [0.5, 0.5],
...          "bark": [0.1, 0.9], "zzz": [-1.0, 0.0]}
>>> def enc(texts):  # a toy text encoder: sum of the word vectors
...     return torch.tensor([[sum(vocab.get(w, [0, 0])[i] for w in t.split()) for i in range(2)] for t in texts])
>>> head = BayesianZeroShot({"cat": ["whiskers", "tail", "zzz"], "dog": ["bark", "tail"]}, ["cat", "dog"],
...                         encoder=enc, concepts_per_prompt=1, template="{cls} {concepts}")
>>> head = head.fit(torch.tensor([[1.0, 0.1], [0.1, 1.0]]), [0, 1])
>>> head.predict(torch.tensor([[0.9, 0.2], [0.2, 0.9]])).tolist()
[0, 1]
"""
from __future__ import annotations

import itertools
import logging
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from concepts.bank import ConceptBank, embed_texts
from concepts.selection import dpp_select
from concepts.vocabularies import read_class_concepts

from .base import ConceptHead
from .concept_sets import class_texts
from .training import fit_temperature

logger = logging.getLogger(__name__)

__all__ = [
    "BayesianZeroShot",
    "AGGREGATORS",
    "aggregate",
    "soft_trim_weights",
    "corrupt_class_concepts",
    "CONCEPT_LISTS",
    "class_concept_file",
]

AGGREGATORS = ("soft_trim", "average", "prompt_ensemble", "max", "median", "trimmed_mean", "huber", "cauchy")
"""Aggregators of the prompt scores of a class (module docstring)."""

SELECTIONS = ("greedy", "sample", "random", "all")

CONCEPT_LISTS = {"conceptworld": "conceptworld.json"}
"""Concept lists shipped with conceptkit (``cbm/concept_lists/``), by name."""

_MAD_SCALE = 1.4826  # MAD -> standard deviation of a normal
_IRLS_STEPS = 10
_CHUNK = 4096

NONSENSE: tuple[str, ...] = (
    "a spaceship", "a violin", "quantum soup", "an elephant", "the number seven", "a tax form", "a volcano",
    "a saxophone", "the letter q", "a sandwich",
)
"""Default nonsense concepts for :func:`corrupt_class_concepts`."""


def class_concept_file(name: str) -> Path:
    """Path of a shipped concept list (``{class: [concepts]}`` JSON), e.g. ``"conceptworld"``.

    The ConceptWorld list describes the classes of :data:`concepts.world.DEFAULT_RULES` in the caption
    language of the built-in ConceptWorld CLIP (colours, shapes, counts as ``"three shapes"``, sizes,
    backgrounds as ``"on stripes"``), 15 concepts per class.

    Examples
    --------
    >>> class_concept_file("conceptworld").name
    'conceptworld.json'
    """
    if name not in CONCEPT_LISTS:
        raise ValueError(f"no shipped concept list named {name!r}; available: {sorted(CONCEPT_LISTS)}.")
    return Path(__file__).resolve().parent / "concept_lists" / CONCEPT_LISTS[name]


def corrupt_class_concepts(
    class_concepts: Mapping[str, Sequence[str]],
    rate: float = 0.2,
    *,
    nonsense: Sequence[str] = NONSENSE,
    nonsense_fraction: float = 0.5,
    random_state: int | None = 0,
) -> dict[str, list[str]]:
    """Replace a fraction of every class's concepts by outliers (the robustness protocol).

    Each class keeps ``len - round(rate * len)`` of its concepts; the replaced ones become, each with
    probability ``nonsense_fraction``, a nonsense concept, otherwise a concept of another class that is not
    in this class's list.

    Parameters
    ----------
    class_concepts
        ``{class: [concepts]}``.
    rate
        Fraction of each list to replace, in [0, 1].
    nonsense
        Pool of nonsense concepts.
    nonsense_fraction
        Probability that an outlier is nonsense rather than another class's concept.
    random_state
        Seed.

    Returns
    -------
    dict
        ``{class: [concepts]}`` with the same lengths.

    Examples
    --------
    >>> lists = {"a": ["x1", "x2", "x3", "x4", "x5"], "b": ["y1", "y2", "y3", "y4", "y5"]}
    >>> out = corrupt_class_concepts(lists, 0.2, nonsense_fraction=0.0, random_state=0)
    >>> sum(c.startswith("y") for c in out["a"]), len(out["a"])
    (1, 5)
    """
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0 <= rate <= 1:
        raise ValueError(f"rate must be a fraction in [0, 1]; got {rate!r}.")
    if not isinstance(nonsense_fraction, numbers.Real) or not 0 <= nonsense_fraction <= 1:
        raise ValueError(f"nonsense_fraction must be a probability in [0, 1]; got {nonsense_fraction!r}.")
    lists = _check_class_concepts(class_concepts, "class_concepts")
    if nonsense_fraction > 0 and not list(nonsense):
        raise ValueError("nonsense is empty; give nonsense concepts or set nonsense_fraction=0.")
    rng = np.random.default_rng(random_state)
    out: dict[str, list[str]] = {}
    for cls, concepts in lists.items():
        concepts = list(concepts)
        m = int(round(rate * len(concepts)))
        own = set(concepts)
        others = sorted({c for k, v in lists.items() if k != cls for c in v if c not in own})
        for i in rng.choice(len(concepts), size=m, replace=False):
            use_nonsense = rng.random() < nonsense_fraction or not others
            if use_nonsense:
                if not list(nonsense):
                    raise ValueError(f"class {cls!r} has no other-class concepts to borrow and nonsense is empty.")
                concepts[int(i)] = str(nonsense[int(rng.integers(len(nonsense)))])
            else:
                concepts[int(i)] = others[int(rng.integers(len(others)))]
        out[cls] = concepts
    return out


def _check_class_concepts(value: Any, what: str) -> dict[str, list[str]]:
    if isinstance(value, (str, os.PathLike)):
        key = str(value)
        path = class_concept_file(key) if key in CONCEPT_LISTS else Path(value)
        return read_class_concepts(path)
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{what} must be a mapping {{class: [concepts]}}, the path of such a JSON file, or a shipped list name "
            f"({sorted(CONCEPT_LISTS)}); got {type(value).__name__}."
        )
    out: dict[str, list[str]] = {}
    for cls, concepts in value.items():
        if isinstance(concepts, str) or not isinstance(concepts, Sequence):
            raise TypeError(f"{what}[{cls!r}] must be a list of concept strings; got {type(concepts).__name__}.")
        items = [c.strip() for c in concepts if isinstance(c, str) and c.strip()]
        if len(items) != len(concepts):
            raise ValueError(f"{what}[{cls!r}] must contain non-empty strings only; got {list(concepts)[:5]}.")
        out[str(cls)] = items
    return out


# ----------------------------------------------------------------------------------------------------
# aggregators (vectorised over leading dimensions; NaN marks a missing prompt)
# ----------------------------------------------------------------------------------------------------
def _median_mad(s: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    m = torch.nanmedian(s, dim=-1, keepdim=True).values
    mad = torch.nanmedian((s - m).abs(), dim=-1, keepdim=True).values + eps
    return m, mad


def soft_trim_weights(
    s: Tensor,
    *,
    lambda_threshold: float = 2.5,
    kappa_range: tuple[float, float] = (0.1, 4.0),
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """CGBC's adaptive soft-trim weights of scores ``s [..., C]`` and the estimated outlier rates ``[...]``.

    ``rho = mean 1[|s - median| > lambda MAD]``, ``kappa = clip(log((1 - rho) / rho), *kappa_range)``,
    ``w = sigmoid(kappa (s - median) / MAD)``; NaN entries (missing prompts) get weight 0 and are not
    counted.

    Examples
    --------
    >>> s = torch.tensor([[1.0, 1.1, 0.9, 1.05, -3.0]])
    >>> w, rho = soft_trim_weights(s)
    >>> round(float(rho), 2), bool(w[0, -1] < 1e-3)
    (0.2, True)
    """
    valid = ~torch.isnan(s)
    m, mad = _median_mad(s, eps)
    dev = (s - m).abs()
    count = valid.sum(-1).clamp_min(1).to(s.dtype)
    rho = ((dev > lambda_threshold * mad) & valid).sum(-1).to(s.dtype) / count   # in the scores' precision
    lo, hi = kappa_range
    kappa = torch.log((1 - rho).clamp_min(1e-12) / rho.clamp_min(1e-12)).clamp(lo, hi)
    w = torch.sigmoid(kappa[..., None] * (s - m) / mad)
    return torch.where(valid, w, torch.zeros_like(w)), rho


def _weighted_mean(s: Tensor, w: Tensor) -> Tensor:
    s0 = torch.nan_to_num(s, nan=0.0)
    return (w * s0).sum(-1) / w.sum(-1).clamp_min(1e-12)


def aggregate(
    s: Tensor,
    aggregator: str = "soft_trim",
    *,
    prior: Tensor | None = None,
    lambda_threshold: float = 2.5,
    kappa_range: tuple[float, float] = (0.1, 4.0),
    trim: float = 0.2,
    huber_delta: float = 1.345,
    cauchy_c: float = 2.385,
    mad_eps: float = 1e-6,
) -> Tensor:
    """Aggregate the prompt scores of each class, ``s [..., C] -> [...]`` (NaN = missing prompt).

    Parameters
    ----------
    s
        Scores, prompts on the last dimension.
    aggregator
        One of :data:`AGGREGATORS` except ``"prompt_ensemble"`` (which needs the embeddings; see
        :class:`BayesianZeroShot`).
    prior
        Optional prior weights of the prompts, broadcastable to ``s`` (used by ``soft_trim`` and ``average``;
        the other aggregators ignore it).
    lambda_threshold, kappa_range, mad_eps
        Soft-trim settings.
    trim
        Fraction trimmed from each side by ``"trimmed_mean"``.
    huber_delta, cauchy_c
        Tuning constants (in units of ``1.4826 MAD``) of the Huber and Cauchy M-estimates.

    Examples
    --------
    >>> s = torch.tensor([1.0, 2.0, 3.0, 100.0])
    >>> [round(float(aggregate(s, a)), 2) for a in ("average", "median", "max")]
    [26.5, 2.0, 100.0]
    """
    valid = ~torch.isnan(s)
    if aggregator == "soft_trim":
        w, _ = soft_trim_weights(s, lambda_threshold=lambda_threshold, kappa_range=kappa_range, eps=mad_eps)
        if prior is not None:
            w = w * prior
        return _weighted_mean(s, w)
    if aggregator == "average":
        w = valid.to(s.dtype) if prior is None else valid.to(s.dtype) * prior
        return _weighted_mean(s, w)
    if aggregator == "max":
        return torch.where(valid, s, torch.full_like(s, -math.inf)).max(-1).values
    if aggregator == "median":
        return torch.nanmedian(s, dim=-1).values
    if aggregator == "trimmed_mean":
        ordered = torch.sort(torch.where(valid, s, torch.full_like(s, math.inf)), dim=-1).values
        n = valid.sum(-1, keepdim=True)
        g = torch.floor(trim * n)
        pos = torch.arange(s.shape[-1], device=s.device)
        keep = (pos >= g) & (pos < n - g)
        return _weighted_mean(torch.where(keep, ordered, torch.zeros_like(ordered)), keep.to(s.dtype))
    if aggregator in ("huber", "cauchy"):
        m, mad = _median_mad(s, mad_eps)
        scale = _MAD_SCALE * mad
        mu = m
        for _ in range(_IRLS_STEPS):
            r = ((s - mu) / scale).abs()
            if aggregator == "huber":
                w = (huber_delta / r.clamp_min(1e-12)).clamp(max=1.0)
            else:
                w = 1.0 / (1.0 + (r / cauchy_c) ** 2)
            w = torch.where(valid, w, torch.zeros_like(w))
            mu = _weighted_mean(s, w)[..., None]
        return mu[..., 0]
    raise ValueError(f"aggregator must be one of {AGGREGATORS}; got {aggregator!r}.")


# ----------------------------------------------------------------------------------------------------
# the head
# ----------------------------------------------------------------------------------------------------
class BayesianZeroShot(ConceptHead):
    """Training-free concept-guided Bayesian zero-shot classifier (CGBC; module docstring).

    Parameters
    ----------
    class_concepts : dict, str or path
        ``{class: [concepts]}``, a JSON file of that layout, or a shipped list name (``"conceptworld"``).
        Keys are class texts (matched to ``class_names``) or labels.
    class_names : list or dict, optional
        Class texts: a list indexed by integer label, a dict ``{label: text}``, or None when the labels are
        the texts.
    encoder : object, optional
        Image-text encoder (``encode_texts``; ``encode_images`` to accept images).
    template : str, default="a photo of a {cls} with {concepts}."
        Prompt template with ``{cls}`` and ``{concepts}`` placeholders.
    combine_op : str, default="or"
        Word joining the concepts of one prompt.
    concepts_per_prompt : int, default=3
        Concepts per compositional prompt (fewer when a class has fewer concepts).
    max_combinations : int, default=500
        Candidate prompts per class (random combinations; all of them when there are fewer).
    n_prompts : int, default=50
        Prompts kept per class.
    selection : {"greedy", "sample", "random", "all"}, default="greedy"
        DPP greedy MAP, exact k-DPP sample (dppy), uniform random subset, or every candidate.
    aggregator : str, default="soft_trim"
        One of :data:`AGGREGATORS`.
    lambda_threshold : float, default=2.5
        Outlier threshold in MADs for the outlier rate.
    kappa_range : (float, float), default=(0.1, 4.0)
        Clip range of the soft-trim steepness.
    trim : float, default=0.2
        Fraction trimmed per side by ``"trimmed_mean"``.
    huber_delta, cauchy_c : float, default=1.345, 2.385
        Tuning constants of the M-estimators.
    concept_priors : dict, optional
        ``{class: {concept: weight}}``; a prompt's prior is the mean weight of its concepts (default 1).
    class_prior : array or dict, optional
        Class prior ``p(k)`` (added as ``log p(k)`` to the logits); default uniform.
    temperature : float, optional
        Softmax scale of the class scores; None fits it on the training data by log-likelihood.
    device : str, default="cpu"
    random_state : int, default=0
        Seeds the combinations and the ``"sample"`` / ``"random"`` selections.
    verbose : bool, default=False
        Progress bar while embedding the candidate prompts.

    Attributes
    ----------
    bank_ : ConceptBank
        The selected prompts of every class (names: the prompt texts), class after class.
    prompt_class_ : ndarray [P]
        Class index of each prompt.
    prompts_ : pd.DataFrame
        ``class``, ``prompt``, ``concepts`` (tuple), ``prior`` for each selected prompt.
    outlier_rate_ : pd.Series
        Estimated outlier rate ``rho_k`` of each class's prompts, averaged over the fitting images of that
        class (on images of other classes every prompt of the class is off, and the rate says nothing about
        its concept list); :meth:`outlier_rates` gives it per image and class.
    temperature_ : float
    n_candidates_ : dict
        Candidate prompts per class before selection.

    Examples
    --------
    >>> BayesianZeroShot({"a": ["x"]}, aggregator="median").get_params()["aggregator"]
    'median'
    """

    def __init__(
        self,
        class_concepts: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
        class_names: Sequence[str] | Mapping[Any, str] | None = None,
        encoder: Any = None,
        template: str = "a photo of a {cls} with {concepts}.",
        combine_op: str = "or",
        concepts_per_prompt: int = 3,
        max_combinations: int = 500,
        n_prompts: int = 50,
        selection: str = "greedy",
        aggregator: str = "soft_trim",
        lambda_threshold: float = 2.5,
        kappa_range: tuple[float, float] = (0.1, 4.0),
        trim: float = 0.2,
        huber_delta: float = 1.345,
        cauchy_c: float = 2.385,
        concept_priors: Mapping[str, Mapping[str, float]] | None = None,
        class_prior: Any = None,
        temperature: float | None = None,
        device: str = "cpu",
        random_state: int | None = 0,
        verbose: bool = False,
    ) -> None:
        self.class_concepts = class_concepts
        self.class_names = class_names
        self.encoder = encoder
        self.template = template
        self.combine_op = combine_op
        self.concepts_per_prompt = concepts_per_prompt
        self.max_combinations = max_combinations
        self.n_prompts = n_prompts
        self.selection = selection
        self.aggregator = aggregator
        self.lambda_threshold = lambda_threshold
        self.kappa_range = kappa_range
        self.trim = trim
        self.huber_delta = huber_delta
        self.cauchy_c = cauchy_c
        self.concept_priors = concept_priors
        self.class_prior = class_prior
        self.temperature = temperature
        self.device = device
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ validation
    def _validate_params(self) -> None:
        if self.class_concepts is None:
            raise ValueError(
                "BayesianZeroShot needs class_concepts: a {class: [concepts]} dict, the path of such a JSON file, "
                f"or a shipped list name ({sorted(CONCEPT_LISTS)})."
            )
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator must be one of {AGGREGATORS}; got {self.aggregator!r}.")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}; got {self.selection!r}.")
        if not isinstance(self.template, str) or "{concepts}" not in self.template:
            raise ValueError(
                f"template must be a string with a {{concepts}} placeholder (and optionally {{cls}}), e.g. "
                f"'a photo of a {{cls}} with {{concepts}}.'; got {self.template!r}."
            )
        try:
            self.template.format(cls="x", concepts="y")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"template {self.template!r} has placeholders other than {{cls}} and {{concepts}} ({exc}); escape "
                "literal braces as {{{{ }}}}."
            ) from None
        if not isinstance(self.combine_op, str) or not self.combine_op.strip():
            raise ValueError(f"combine_op must be a non-empty word such as 'or'; got {self.combine_op!r}.")
        for name in ("concepts_per_prompt", "max_combinations", "n_prompts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        for name in ("lambda_threshold", "huber_delta", "cauchy_c"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0; got {v!r}.")
        t = self.trim
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 <= t < 0.5:
            raise ValueError(f"trim must be a fraction in [0, 0.5) (trimmed from each side); got {t!r}.")
        try:
            lo, hi = (float(v) for v in self.kappa_range)
        except (TypeError, ValueError):
            raise TypeError(f"kappa_range must be two numbers (low, high); got {self.kappa_range!r}.") from None
        if not 0 < lo <= hi:
            raise ValueError(f"kappa_range must satisfy 0 < low <= high; got {self.kappa_range!r}.")
        t = self.temperature
        if t is not None and (isinstance(t, bool) or not isinstance(t, numbers.Real) or not t > 0):
            raise ValueError(f"temperature must be a number > 0 or None; got {t!r}.")

    # ------------------------------------------------------------------ fitting: prompts
    def _class_lists(self, texts: list[str]) -> list[list[str]]:
        lists = _check_class_concepts(self.class_concepts, "class_concepts")
        out = []
        for label, text in zip(self.classes_, texts):
            key = text if text in lists else str(label.item() if hasattr(label, "item") else label)
            if key not in lists:
                raise KeyError(
                    f"class_concepts has no concepts for class {text!r} (label {label!r}); its classes are "
                    f"{list(lists)[:8]}. Give one list per class, keyed by the class text or label."
                )
            if not lists[key]:
                raise ValueError(f"class_concepts[{key!r}] is empty; give at least one concept per class.")
            out.append(lists[key])
        return out

    def _prompt_prior(self, cls_text: str, combo: Sequence[str]) -> float:
        if self.concept_priors is None:
            return 1.0
        table = self.concept_priors.get(cls_text, {})
        vals = [float(table.get(c, 1.0)) for c in combo]
        if any(not (math.isfinite(v) and v >= 0) for v in vals):
            raise ValueError(f"concept_priors for class {cls_text!r} must be finite and >= 0; got {vals}.")
        return float(np.mean(vals))

    def _fit(self, Z: Tensor, y: Tensor, C: pd.DataFrame | None) -> None:
        if self.encoder is None:
            raise ValueError(
                "BayesianZeroShot needs a text encoder to embed its prompts: pass encoder=OpenCLIPEncoder(model, "
                "preprocess, tokenizer) or any object with encode_texts."
            )
        texts = class_texts(self.classes_, self.class_names)
        lists = self._class_lists(texts)
        rng = np.random.default_rng(self._seed)
        op = f" {self.combine_op.strip()} "
        candidates: list[list[tuple[str, ...]]] = []
        for concepts in lists:
            concepts = list(dict.fromkeys(concepts))
            r = min(int(self.concepts_per_prompt), len(concepts))
            n_all = math.comb(len(concepts), r)
            if n_all <= int(self.max_combinations):
                combos = list(itertools.combinations(concepts, r))
                order = rng.permutation(len(combos))
                combos = [combos[i] for i in order]
            else:  # random distinct combinations without listing them all
                seen: set[tuple[int, ...]] = set()
                combos = []
                while len(combos) < int(self.max_combinations):
                    pick = tuple(sorted(rng.choice(len(concepts), size=r, replace=False).tolist()))
                    if pick not in seen:
                        seen.add(pick)
                        combos.append(tuple(concepts[i] for i in pick))
            candidates.append(combos)
        prompt_texts = [self.template.format(cls=t, concepts=op.join(c)) for t, combos in zip(texts, candidates)
                        for c in combos]
        emb = embed_texts(self.encoder, prompt_texts, progress=bool(self.verbose))
        if emb.shape[1] != Z.shape[1]:
            raise ValueError(
                f"X has {Z.shape[1]} features, but the prompts are {emb.shape[1]}-dimensional; embed them with the "
                "same image-text model that made the features."
            )
        rows, vectors, prompt_class = [], [], []
        offset = 0
        self.n_candidates_ = {}
        for k, (text, combos) in enumerate(zip(texts, candidates)):
            E = emb[offset:offset + len(combos)]
            offset += len(combos)
            self.n_candidates_[text] = len(combos)
            n_keep = min(int(self.n_prompts), len(combos))
            if self.selection == "all" or n_keep == len(combos):
                keep = np.arange(len(combos))
            elif self.selection == "random":
                keep = np.sort(rng.choice(len(combos), size=n_keep, replace=False))
            else:
                try:
                    keep = dpp_select(E, n_keep, method=self.selection, random_state=int(rng.integers(2**31)))
                except ValueError as exc:  # fewer distinct prompt directions than n_keep
                    logger.warning("class %r: DPP selection failed (%s); keeping the first %d candidates.",
                                   text, exc, n_keep)
                    keep = np.arange(n_keep)
            for i in keep.tolist():
                rows.append({"class": text, "prompt": prompt_texts[offset - len(combos) + i],
                             "concepts": tuple(combos[i]), "prior": self._prompt_prior(text, combos[i])})
                vectors.append(E[i])
                prompt_class.append(k)
        names = [r["prompt"] for r in rows]
        dup = pd.Series(names).duplicated(keep=False).to_numpy()
        if dup.any():  # the same prompt text in two classes (shared concepts, template without {cls})
            names = [f"{n} [{r['class']}]" if d else n for n, r, d in zip(names, rows, dup)]
        self.bank_ = ConceptBank(torch.stack(vectors), names=names,
                                 metadata={"how": "bayesian zero-shot prompts", "template": self.template,
                                           "selection": self.selection})
        self.prompts_ = pd.DataFrame(rows, columns=["class", "prompt", "concepts", "prior"])
        self.prompt_class_ = np.asarray(prompt_class, dtype=np.int64)
        K = len(self.classes_)
        counts = np.bincount(self.prompt_class_, minlength=K)
        width = int(counts.max())
        index = np.full((K, width), -1, dtype=np.int64)
        for k in range(K):
            idx = np.flatnonzero(self.prompt_class_ == k)
            index[k, :len(idx)] = idx
        self._index_ = torch.as_tensor(index)
        self._unit_ = torch.nn.functional.normalize(self.bank_.vectors, dim=1)
        prior = torch.zeros(K, width)
        prior_vals = torch.tensor(self.prompts_["prior"].to_numpy(np.float32))
        prior[index >= 0] = prior_vals[torch.as_tensor(index[index >= 0])]
        self._prior_ = prior
        # prompt-ensemble scale: ||mean of the class's unit prompt embeddings||
        self._ensemble_norm_ = torch.stack([
            self._unit_[torch.as_tensor(np.flatnonzero(self.prompt_class_ == k))].mean(0).norm() for k in range(K)
        ]).clamp_min(1e-12)
        self._log_class_prior_ = self._class_log_prior(K)
        self.temperature_ = 1.0
        S = self._scores(Z)
        scores = self._class_scores(S)
        self.temperature_ = float(self.temperature) if self.temperature is not None else fit_temperature(scores, y)
        rho = self._outlier_rates(S)                                     # [n, K]
        yi = y.to(rho.device)
        own = torch.stack([rho[yi == k, k].mean() for k in range(K)])    # every fitted class has images
        self.outlier_rate_ = pd.Series(own.cpu().numpy(), index=pd.Index(texts, name="class"), name="outlier_rate")

    def _class_log_prior(self, K: int) -> Tensor:
        cp = self.class_prior
        if cp is None:
            return torch.zeros(K)
        if isinstance(cp, Mapping):
            try:
                vals = [float(cp[c.item() if hasattr(c, "item") else c]) for c in self.classes_]
            except KeyError as exc:
                raise ValueError(f"class_prior has no entry for class {exc.args[0]!r}; give one per class.") from None
        else:
            vals = [float(v) for v in np.asarray(cp, dtype=np.float64).ravel()]
            if len(vals) != K:
                raise ValueError(f"class_prior has {len(vals)} entries but there are {K} classes; give one per class.")
        arr = np.asarray(vals)
        if not np.isfinite(arr).all() or (arr <= 0).any():
            raise ValueError(f"class_prior must be positive and finite; got {vals[:5]}.")
        return torch.tensor(np.log(arr / arr.sum()), dtype=torch.float32)

    # ------------------------------------------------------------------ scores and logits
    def _scores(self, Z: Tensor) -> Tensor:
        return torch.nn.functional.normalize(Z, dim=1) @ self._unit_.to(Z.device).T

    def _padded(self, S: Tensor) -> Tensor:
        """``[n, K, C]`` prompt scores per class (NaN where a class has fewer prompts)."""
        idx = self._index_.to(S.device)
        out = S[:, idx.clamp_min(0)]
        return torch.where(idx >= 0, out, torch.full_like(out, math.nan))

    def _aggregate(self, s: Tensor, prior: Tensor | None) -> Tensor:
        agg = "average" if self.aggregator == "prompt_ensemble" else self.aggregator  # ensemble: rescaled later
        return aggregate(s, agg, prior=prior, lambda_threshold=float(self.lambda_threshold),
                         kappa_range=(float(self.kappa_range[0]), float(self.kappa_range[1])), trim=float(self.trim),
                         huber_delta=float(self.huber_delta), cauchy_c=float(self.cauchy_c))

    def _class_scores(self, S: Tensor) -> Tensor:
        """``[n, K]`` aggregated scores (before temperature and class prior)."""
        P = self._padded(S)
        prior = self._prior_.to(S.device)
        out = self._aggregate(P, prior[None])
        if self.aggregator == "prompt_ensemble":
            out = out / self._ensemble_norm_.to(S.device)
        return out

    def _logits(self, S: Tensor) -> Tensor:
        return self.temperature_ * self._class_scores(S) + self._log_class_prior_.to(S.device)

    def _outlier_rates(self, S: Tensor) -> Tensor:
        _, rho = soft_trim_weights(self._padded(S), lambda_threshold=float(self.lambda_threshold),
                                   kappa_range=tuple(float(v) for v in self.kappa_range))  # type: ignore[arg-type]
        return rho

    def _truth_names(self) -> list[str]:
        return [f"prompt: {n}" for n in self.bank_.names]

    def _contributions(self, S: Tensor, target: Tensor) -> Tensor:
        """Occlusion within the target class's prompts (the other prompts do not enter its logit)."""
        base = self._baseline().to(S.device)
        idx = self._index_.to(S.device)[target]                      # [n, C]
        valid = idx >= 0
        safe = idx.clamp_min(0)
        s = torch.where(valid, S.gather(1, safe), torch.full(safe.shape, math.nan, device=S.device))
        prior = self._prior_.to(S.device)[target]                     # [n, C]
        ref = self._aggregate(s, prior)                              # [n]
        C = s.shape[1]
        occ = s[:, None, :].repeat(1, C, 1)                          # [n, C, C]
        eye = torch.eye(C, dtype=torch.bool, device=S.device)[None]
        occ = torch.where(eye & valid[:, None, :], base[safe][:, None, :].expand_as(occ), occ)
        drop = ref[:, None] - self._aggregate(occ, prior[:, None, :])
        if self.aggregator == "prompt_ensemble":
            drop = drop / self._ensemble_norm_.to(S.device)[target][:, None]
        out = torch.zeros_like(S)
        out.scatter_(1, safe, torch.where(valid, self.temperature_ * drop, torch.zeros_like(drop)))
        return out

    # ------------------------------------------------------------------ public extras
    def outlier_rates(self, X: Any) -> pd.DataFrame:
        """Estimated outlier rate ``rho_k`` of every class's prompts for every image, ``[n, K]``.

        The fraction of a class's prompt scores further than ``lambda_threshold`` MADs from their median;
        it sets the steepness of the soft-trim weights (module docstring).
        """
        self._check_fitted()
        Z = self._features(X)
        with torch.no_grad():
            rho = self._chunked(lambda z: self._outlier_rates(self._scores(z)), Z)
        return pd.DataFrame(rho.cpu().numpy(), columns=list(self.outlier_rate_.index))

    def prompt_weights(self, X: Any) -> pd.DataFrame:
        """Posterior weights ``q_kc`` of every prompt of the predicted class, one row per (image, prompt).

        Returns
        -------
        pd.DataFrame
            ``sample``, ``class``, ``prompt``, ``score`` (cosine), ``weight`` (normalised within the class).
        """
        self._check_fitted()
        Z = self._features(X)
        with torch.no_grad():
            S = self._chunked(self._scores, Z)
            pred = self._chunked(self._logits, S).argmax(1)
            P = self._padded(S)
            prior = self._prior_.to(S.device)
            if self.aggregator == "soft_trim":
                w, _ = soft_trim_weights(P, lambda_threshold=float(self.lambda_threshold),
                                         kappa_range=tuple(float(v) for v in self.kappa_range))  # type: ignore[arg-type]
                w = w * prior[None]
            else:
                w = (~torch.isnan(P)).to(P.dtype) * prior[None]
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
        rows = []
        idx = self._index_.numpy()
        names = list(self.bank_.names)
        texts = list(self.outlier_rate_.index)
        Pn, wn, pr = P.cpu().numpy(), w.cpu().numpy(), pred.cpu().numpy()
        for i in range(len(Pn)):
            k = int(pr[i])
            for c in range(idx.shape[1]):
                if idx[k, c] >= 0:
                    rows.append({"sample": i, "class": texts[k], "prompt": names[idx[k, c]],
                                 "score": float(Pn[i, k, c]), "weight": float(wn[i, k, c])})
        return pd.DataFrame(rows, columns=["sample", "class", "prompt", "score", "weight"])

    def _summary_html(self) -> str:
        counts = self.prompts_.groupby("class", sort=False).size()
        return (f"<p>aggregator: {self.aggregator}; selection: {self.selection}; "
                f"{int(counts.min())}-{int(counts.max())} prompts per class</p>")
