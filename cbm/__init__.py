"""Concept-bottleneck heads on frozen features, with one interface and one metric suite.

Every head implements :class:`~cbm.base.ConceptHead`: ``fit(X, y, concepts=None)`` (features, or images
with ``encoder=``), ``predict``, ``predict_proba``, ``score``, ``concept_scores(X) -> [n, k]``,
``intervene(X, {concept: value}, concepts=truth) -> proba``, ``explain(X) -> DataFrame`` and ``bank_``.

Heads
-----
- :class:`LinearProbe`, :class:`LabelFreeCBM`: the baselines (linear probe; cosine-to-text-bank concepts
  + sparse linear layer).
- :class:`SparseCBM`: Sparse-CBM's Concept Bottleneck Layer with the l1 / contrastive / Gumbel objectives.
- :class:`ConceptMatrixSearch`: the training-free concept-matrix classifier; :class:`ZeroShotClassifier`:
  plain CLIP zero-shot.
- :class:`DiscoverThenNameCBM`: SAE concepts, named automatically, with a sparse probe.
- :class:`ConceptBottleneckModel`: a concept-supervised CBM (concept predictor + label head).
- :class:`EnergyCBM`: the energy-based CBM (concept, class and global energies; joint inference,
  propagating interventions, conditional probabilities from the energy).
- :class:`BayesianZeroShot`: the training-free concept-guided Bayesian zero-shot classifier (concept lists
  from JSON, compositional prompts, DPP selection, soft-trim and robust aggregators).

Metrics for all of them: :mod:`cbm.metrics` (:func:`evaluate` gives one DataFrame row per head) and
:mod:`cbm.interventions` (intervention curves with random, uncertainty and group policies).

Examples
--------
>>> import numpy as np
>>> from cbm import LinearProbe, evaluate
>>> X = np.random.default_rng(0).normal(size=(40, 2)); y = (X[:, 0] > 0).astype(int)
>>> bool(evaluate(LinearProbe().fit(X, y), X, y)["accuracy"].iloc[0] > 0.9)
True
"""
from .base import ConceptHead, as_concept_frame
from .bayes import BayesianZeroShot
from .cms import ConceptMatrixSearch
from .dncbm import DiscoverThenNameCBM
from .energy import EnergyCBM
from .interventions import intervention_curve
from .linear import LabelFreeCBM, LinearProbe
from .metrics import evaluate
from .sparse import SparseCBM
from .supervised import ConceptBottleneckModel
from .zeroshot import ZeroShotClassifier

__all__ = [
    "ConceptHead",
    "as_concept_frame",
    "LinearProbe",
    "LabelFreeCBM",
    "SparseCBM",
    "ConceptMatrixSearch",
    "ZeroShotClassifier",
    "DiscoverThenNameCBM",
    "ConceptBottleneckModel",
    "EnergyCBM",
    "BayesianZeroShot",
    "evaluate",
    "intervention_curve",
]
