"""ReLU sparse autoencoder with a decoder-norm-weighted L1 penalty (Anthropic's April 2024 update)."""
from __future__ import annotations

import numbers
from pathlib import Path

import torch
from torch import Tensor

from .base import BaseSAE
from .modules import Activation, ReLUActivation, SparseAutoencoder, TrainOutput
from .topk import COMMON_ATTRIBUTES_DOC, COMMON_PARAMETERS_DOC
from .training import resolve_steps, warmup_factor

__all__ = ["ReLUSAE"]


class ReLUSAE(BaseSAE):
    __doc__ = f"""ReLU sparse autoencoder trained with ``mse + l1_coef * E[sum_i z_i ||d_i||]``.

    The decoder is unconstrained; its atom norms enter the penalty instead (so the model cannot
    shrink codes by growing atoms). After training the norms are folded into the encoder
    (``z_i <- z_i ||d_i||``, ``d_i <- d_i / ||d_i||``), so ``dictionary_`` has unit rows and the
    penalty becomes a plain L1 on the reported codes. The coefficient warms up linearly over
    ``sparsity_warmup``.

    Parameters
    ----------
    n_concepts : int, default=1024
    l1_coef : float, default=1.0
        L1 coefficient (on inputs normalised to ``E||x|| = sqrt(d)``).
    sparsity_warmup : float or int, default=0.05
    {COMMON_PARAMETERS_DOC}
    {COMMON_ATTRIBUTES_DOC}
    Examples
    --------
    >>> import torch
    >>> X = torch.randn(512, 16)
    >>> sae = ReLUSAE(n_concepts=64, l1_coef=1.0, batch_size=128, random_state=0).fit(X)
    >>> sae.dictionary_.norm(dim=1).allclose(torch.ones(64))
    True
    """

    _architecture = "relu"
    _fold_decoder_norms = True
    _unit_norm_decoder = False

    def __init__(
        self,
        n_concepts: int = 1024,
        *,
        l1_coef: float = 1.0,
        sparsity_warmup: float = 0.05,
        n_epochs: int = 1,
        batch_size: int = 1024,
        lr: float | None = None,
        lr_warmup: float = 0.05,
        lr_decay: float = 0.2,
        grad_clip: float | None = 1.0,
        normalize: str = "expected_norm",
        b_dec_init: str = "geometric_median",
        decoder_init: str = "data",
        dead_window: int = 10_000,
        autocast: str | None = None,
        sparse_backend: str = "auto",
        log_every: int | None = None,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        random_state: int | None = None,
        init_random_state: int | None = None,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        verbose: bool = False,
    ) -> None:
        self.n_concepts = n_concepts
        self.l1_coef = l1_coef
        self.sparsity_warmup = sparsity_warmup
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.lr_warmup = lr_warmup
        self.lr_decay = lr_decay
        self.grad_clip = grad_clip
        self.normalize = normalize
        self.b_dec_init = b_dec_init
        self.decoder_init = decoder_init
        self.dead_window = dead_window
        self.autocast = autocast
        self.sparse_backend = sparse_backend
        self.log_every = log_every
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.random_state = random_state
        self.init_random_state = init_random_state
        self.device = device
        self.dtype = dtype
        self.verbose = verbose

    def _validate_variant_params(self, d_in: int | None) -> None:
        if not isinstance(self.l1_coef, numbers.Real) or self.l1_coef < 0:
            raise ValueError(f"{type(self).__name__}: l1_coef must be a number >= 0; got {self.l1_coef!r}.")

    def _make_activation(self) -> Activation:
        return ReLUActivation()

    def _penalties(self, module: SparseAutoencoder, x: Tensor, out: TrainOutput, ctx: dict) -> dict[str, Tensor]:
        coef = self.l1_coef * warmup_factor(ctx["step"], resolve_steps(self.sparsity_warmup, ctx["total"]))
        norms = out.dictionary.norm(dim=1)
        return {"l1": coef * (out.codes.to(torch.float32) * norms).sum(-1).mean()}
