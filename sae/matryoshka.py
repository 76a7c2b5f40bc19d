"""Matryoshka BatchTopK SAE: nested prefixes of the dictionary must each reconstruct the input."""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .batchtopk import BatchTopKSAE
from .modules import SparseAutoencoder, TrainOutput
from .topk import COMMON_ATTRIBUTES_DOC, COMMON_PARAMETERS_DOC
from .training import reconstruction_loss

__all__ = ["MatryoshkaSAE"]


class MatryoshkaSAE(BatchTopKSAE):
    __doc__ = f"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024).

    The loss adds, for every prefix width ``w`` in ``widths``, the reconstruction error of the
    codes restricted to the first ``w`` latents: ``L = mse(x, x_hat) + sum_w weight_w *
    mse(x, z[:, :w] D[:w] + b_dec)``. Early latents are thus pushed towards general, coarse
    concepts and later ones towards refinements. Codes use BatchTopK with a calibrated inference
    threshold (see :class:`~sae.BatchTopKSAE`).

    Parameters
    ----------
    n_concepts : int, default=1024
    top_k : float, default=32
    widths : sequence of int or None, default=None
        Strictly increasing prefix widths below ``n_concepts`` (``None``: ``n/16, n/8, n/4, n/2``,
        dropping duplicates and zeros).
    width_weights : sequence of float or None, default=None
        Weight of each prefix loss (``None``: 1 each).
    calibration_samples, auxk_coef, auxk_k, k_anneal, k_anneal_start, encoder_decay, resample_dead
        As in :class:`~sae.BatchTopKSAE`.
    {COMMON_PARAMETERS_DOC}
    {COMMON_ATTRIBUTES_DOC}
    Examples
    --------
    >>> import torch
    >>> X = torch.randn(512, 16)
    >>> sae = MatryoshkaSAE(n_concepts=64, top_k=4, widths=[8, 32], batch_size=128, random_state=0).fit(X)
    >>> sae.dictionary_.shape
    torch.Size([64, 16])
    """

    _architecture = "matryoshka"

    def __init__(
        self,
        n_concepts: int = 1024,
        top_k: float = 32,
        *,
        widths: Sequence[int] | None = None,
        width_weights: Sequence[float] | None = None,
        calibration_samples: int = 8192,
        n_epochs: int = 1,
        batch_size: int = 1024,
        lr: float | None = None,
        auxk_coef: float = 1 / 32,
        auxk_k: int | None = None,
        k_anneal: float = 0.0,
        k_anneal_start: int | None = None,
        encoder_decay: float = 0.0,
        resample_dead: float | int | None = None,
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
        super().__init__(
            n_concepts, top_k, calibration_samples=calibration_samples, n_epochs=n_epochs,
            batch_size=batch_size, lr=lr, auxk_coef=auxk_coef, auxk_k=auxk_k, k_anneal=k_anneal,
            k_anneal_start=k_anneal_start, encoder_decay=encoder_decay, resample_dead=resample_dead,
            lr_warmup=lr_warmup, lr_decay=lr_decay,
            grad_clip=grad_clip,
            normalize=normalize, b_dec_init=b_dec_init, decoder_init=decoder_init, dead_window=dead_window, autocast=autocast,
            sparse_backend=sparse_backend, log_every=log_every, checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every, random_state=random_state,
            init_random_state=init_random_state, device=device, dtype=dtype, verbose=verbose,
        )
        self.widths = widths
        self.width_weights = width_weights

    def resolved_widths(self) -> list[int]:
        """Prefix widths actually used (below ``n_concepts``, increasing)."""
        if self.widths is not None:
            return [int(w) for w in self.widths]
        n = self.n_concepts
        out = sorted({n // f for f in (16, 8, 4, 2) if 0 < n // f < n})
        return out

    def _validate_variant_params(self, d_in: int | None) -> None:
        super()._validate_variant_params(d_in)
        name = type(self).__name__
        ws = self.resolved_widths()
        if any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in (self.widths or [])):
            raise ValueError(f"{name}: widths must be integers; got {self.widths!r}.")
        if any(b <= a for a, b in zip(ws, ws[1:])) or any(w < 1 or w >= self.n_concepts for w in ws):
            raise ValueError(
                f"{name}: widths must be strictly increasing integers in [1, n_concepts={self.n_concepts}); "
                f"got {list(ws)}."
            )
        if self.width_weights is not None and len(self.width_weights) != len(ws):
            raise ValueError(
                f"{name}: width_weights has {len(self.width_weights)} entries but there are {len(ws)} widths; "
                "give one weight per width."
            )

    def _penalties(self, module: SparseAutoencoder, x: Tensor, out: TrainOutput, ctx: dict) -> dict[str, Tensor]:
        terms = super()._penalties(module, x, out, ctx)
        ws = self.resolved_widths()
        weights = list(self.width_weights) if self.width_weights is not None else [1.0] * len(ws)
        total = torch.zeros((), device=x.device)
        for w, wt in zip(ws, weights):
            keep = out.sel.col < w
            x_hat = module.decode_selection(out.values[keep], out.sel.subset(keep), out.dictionary) + module.b_dec
            total = total + float(wt) * reconstruction_loss(x, x_hat)
        terms["matryoshka"] = total
        return terms
