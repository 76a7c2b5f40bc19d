"""Sparse autoencoders for concept discovery.

sklearn-style estimators over pure-torch modules::

    from sae import TopKSAE
    sae = TopKSAE(n_concepts=2048, top_k=32, n_epochs=4, batch_size=512, lr=2e-3, random_state=0).fit(X)
    codes = sae.transform(X)                 # [n, 2048]; sae.transform(X, sparse=True) -> (indices, values)
    sae.save("my_sae"); sae2 = load("my_sae")

Variants: :class:`ReLUSAE`, :class:`TopKSAE`, :class:`BatchTopKSAE`, :class:`JumpReLUSAE`,
:class:`MatryoshkaSAE`, :class:`ArchetypalSAE`, :class:`StructuredSAE`. Metric formulas in
:mod:`sae.metrics`; protocols (seed stability, supervised-probe upper bound, downstream recovery)
in :mod:`sae.evaluation`; checkpoints (ours and SAELens' layout) in :mod:`sae.io`; synthetic data
with known atoms in :mod:`sae.synthetic`.

Modules: ``base`` (estimator: fit loop, transform, checkpoints), ``modules`` (pure torch),
``sparse`` (sparse autograd kernels), ``training`` (schedules, AuxK, autocast), ``init``
(geometric median, k-means), ``data`` (tensors/arrays/ActivationStore -> batches),
``checkpoint`` (atomic training checkpoints), one module per variant.
"""
from . import evaluation, metrics
from .archetypal import ArchetypalSAE
from .base import BaseSAE
from .batchtopk import BatchTopKSAE
from .io import load, load_saelens, save, save_saelens
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .modules import SparseAutoencoder
from .relu import ReLUSAE
from .sparse import SparseCodes
from .structured import StructuredSAE
from .topk import TopKSAE

__all__ = [
    "BaseSAE",
    "ReLUSAE",
    "TopKSAE",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "MatryoshkaSAE",
    "ArchetypalSAE",
    "StructuredSAE",
    "SparseAutoencoder",
    "SparseCodes",
    "load",
    "save",
    "load_saelens",
    "save_saelens",
    "metrics",
    "evaluation",
]
