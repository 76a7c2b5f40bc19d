"""Helpers shared by the sae tests: one tiny configuration per variant."""
from __future__ import annotations

from sae import ArchetypalSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, StructuredSAE, TopKSAE

# One tiny, fast configuration per variant (d = 16, 32 latents).
TINY = {
    "topk": (TopKSAE, dict(top_k=3)),
    "batchtopk": (BatchTopKSAE, dict(top_k=3, calibration_samples=128)),
    "matryoshka": (MatryoshkaSAE, dict(top_k=3, widths=[8, 16], calibration_samples=128)),
    "jumprelu": (JumpReLUSAE, dict(target_l0=3, init_threshold=0.5, bandwidth=0.1)),
    "relu": (ReLUSAE, dict(l1_coef=0.1)),
    "archetypal": (ArchetypalSAE, dict(top_k=3, n_candidates=16)),
    "structured": (StructuredSAE, dict(rank=2, l1_coef=0.1)),
}


def make_tiny(name: str, **overrides):
    cls, kw = TINY[name]
    params = dict(n_concepts=32, n_epochs=2, batch_size=32, random_state=0, **kw)
    params.update(overrides)
    return cls(**params)
