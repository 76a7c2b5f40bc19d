"""Every invalid hyperparameter raises a ValueError that names it and says what is expected."""
from __future__ import annotations

import pytest
import torch

from sae import ArchetypalSAE, BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE, ReLUSAE, StructuredSAE, TopKSAE

X = torch.randn(64, 8)

CASES = [
    (TopKSAE, dict(n_concepts=0), "n_concepts must be a positive integer; got 0"),
    (TopKSAE, dict(n_epochs=1.5), "n_epochs must be a positive integer"),
    (TopKSAE, dict(batch_size=-1), "batch_size must be a positive integer"),
    (TopKSAE, dict(checkpoint_every=0), "checkpoint_every must be a positive integer"),
    (TopKSAE, dict(log_every=True), "log_every must be a positive integer"),
    (TopKSAE, dict(dead_window=0), "dead_window must be a positive integer"),
    (TopKSAE, dict(lr=0), r"lr must be a positive number or None"),
    (TopKSAE, dict(lr_warmup=-0.1), "lr_warmup must be a fraction"),
    (TopKSAE, dict(lr_warmup=0.6, lr_decay=0.6), "together exceed all the training steps"),
    (TopKSAE, dict(grad_clip=0), "grad_clip must be a positive number or None"),
    (TopKSAE, dict(normalize="l2"), "normalize must be 'expected_norm' or 'none'"),
    (TopKSAE, dict(b_dec_init="median"), "b_dec_init must be 'geometric_median', 'mean' or 'zero'"),
    (TopKSAE, dict(decoder_init="kmeans"), "decoder_init must be 'data' or 'random'"),
    (TopKSAE, dict(autocast="float8"), "autocast must be None, 'bfloat16' or 'float16'"),
    (TopKSAE, dict(sparse_backend="triton"), "sparse_backend must be 'auto', 'sparse' or 'dense'"),
    (TopKSAE, dict(random_state=-3), "random_state must be a non-negative integer or None"),
    (TopKSAE, dict(init_random_state="a"), "init_random_state must be a non-negative integer or None"),
    (TopKSAE, dict(dtype="float16"), "dtype='float16' is not supported"),
    (TopKSAE, dict(top_k=0), "top_k must be a positive number"),
    (TopKSAE, dict(top_k=2.5), "top_k must be an integer"),
    (TopKSAE, dict(n_concepts=4, top_k=5), "top_k=5 exceeds n_concepts=4"),
    (TopKSAE, dict(auxk_coef=-1), "auxk_coef must be >= 0"),
    (TopKSAE, dict(auxk_k=0), "auxk_k must be a positive integer or None"),
    (TopKSAE, dict(k_anneal=-1), "k_anneal must be a fraction"),
    (BatchTopKSAE, dict(calibration_samples=0), "calibration_samples must be a positive integer"),
    (MatryoshkaSAE, dict(n_concepts=16, top_k=2, widths=[8, 4]), r"widths must be strictly increasing integers in \[1, n_concepts=16\)"),
    (MatryoshkaSAE, dict(n_concepts=16, top_k=2, widths=[4, 16]), "widths must be strictly increasing"),
    (MatryoshkaSAE, dict(n_concepts=16, top_k=2, widths=[4.0, 8]), "widths must be integers"),
    (MatryoshkaSAE, dict(n_concepts=16, top_k=2, widths=[4, 8], width_weights=[1.0]), "width_weights has 1 entries but there are 2 widths"),
    (JumpReLUSAE, dict(sparsity_loss="l1"), "sparsity_loss must be 'step' or 'tanh'"),
    (JumpReLUSAE, dict(bandwidth=0), "bandwidth must be a positive number"),
    (JumpReLUSAE, dict(l0_coef=-1), "l0_coef must be a number >= 0"),
    (JumpReLUSAE, dict(n_concepts=8, target_l0=9), r"target_l0 must be in \(0, n_concepts=8\]"),
    (ReLUSAE, dict(l1_coef=-0.1), "l1_coef must be a number >= 0"),
    (ArchetypalSAE, dict(activation="gelu"), "activation must be one of"),
    (ArchetypalSAE, dict(n_candidates=0), "n_candidates must be a positive integer or None"),
    (ArchetypalSAE, dict(relaxation=-1), "relaxation must be a number >= 0"),
    (ArchetypalSAE, dict(sparsity_coef=-1), "sparsity_coef must be a number >= 0"),
    (ArchetypalSAE, dict(n_concepts=32, top_k=2, n_candidates=100), "n_candidates=100 exceeds the 64 samples"),
    (StructuredSAE, dict(rank=0), "rank must be a positive integer"),
    (StructuredSAE, dict(n_concepts=16, rank=9), r"rank=9 must not exceed n_concepts=16 or the number of features \(8\)"),
    (StructuredSAE, dict(nuclear_coef=-1), "nuclear_coef must be a number >= 0"),
    (StructuredSAE, dict(p_end=0), r"p_end must be in \(0, 1\]"),
    (StructuredSAE, dict(n_p_updates=0), "n_p_updates must be a positive integer"),
]


@pytest.mark.parametrize("cls,params,msg", CASES, ids=[f"{c.__name__}-{next(iter(p))}" for c, p, _ in CASES])
def test_invalid_parameters_raise(cls, params, msg):
    base = dict(n_concepts=16, batch_size=16, n_epochs=1)
    if "top_k" in cls().get_params() and "top_k" not in params:
        base["top_k"] = 2
    base.update(params)
    with pytest.raises(ValueError, match=msg):
        cls(**base).fit(X)


def test_initial_dictionary_needs_a_seed():
    with pytest.raises(ValueError, match="needs random_state or init_random_state"):
        TopKSAE(n_concepts=16, top_k=2).initial_dictionary(X)
