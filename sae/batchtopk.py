"""BatchTopK sparse autoencoder with a calibrated, stored inference threshold."""
from __future__ import annotations

import numbers
from pathlib import Path

import torch
from torch import Tensor

from .data import BatchSource
from .modules import Activation, BatchTopKActivation, SparseAutoencoder
from .topk import COMMON_ATTRIBUTES_DOC, COMMON_PARAMETERS_DOC, _SelectingFamily

__all__ = ["BatchTopKSAE", "calibrate_threshold"]


@torch.no_grad()
def calibrate_threshold(
    module: SparseAutoencoder, source: BatchSource, k: float, *, n_samples: int = 8192, scale: float = 1.0,
    batch_size: int = 1024,
) -> tuple[float, float, int]:
    """Threshold ``theta`` such that ``pre > theta`` keeps on average exactly ``k`` latents per sample.

    Streams the first ``n_samples`` rows of ``source`` (inputs multiplied by ``scale``), keeps the
    ``m + 1`` largest positive pre-activations (``m = round(k * N)``) in a bounded buffer, and
    returns the midpoint between the m-th and (m+1)-th largest, so that the mean L0 on the
    calibration set is ``k`` (up to ties).

    Returns
    -------
    (threshold, mean L0 on the calibration set, rows used)
    """
    n_rows = 0
    buf: Tensor | None = None
    chunks: list[Tensor] = []
    for x in source.iter_batches(batch_size, shuffle=False):
        x = x[: n_samples - n_rows] * scale
        n_rows += x.shape[0]
        chunks.append(x)
        if n_rows >= n_samples:
            break
    m = max(1, int(round(k * n_rows)))
    for x in chunks:
        pre = torch.relu(module.pre_activations(x)).reshape(-1)
        cand = pre if buf is None else torch.cat([buf, pre])
        buf = cand.topk(min(m + 1, cand.numel()), sorted=False).values
    top = buf.topk(min(m + 1, buf.numel())).values
    if top.numel() > m:
        theta = float((top[m - 1] + top[m]) / 2)
    else:
        theta = float(top[-1]) * 0.5
    theta = max(theta, 0.0)
    l0 = 0.0
    for x in chunks:
        pre = module.pre_activations(x)
        l0 += float(((pre > theta) & (pre > 0)).sum())
    return theta, l0 / max(n_rows, 1), n_rows


class BatchTopKSAE(_SelectingFamily):
    __doc__ = f"""BatchTopK sparse autoencoder (Bussmann et al. 2024).

    In training, a batch of ``B`` samples keeps its ``round(top_k * B)`` largest activations, so
    ``top_k`` is the *average* number of active latents per sample (SAELens' convention; note
    that overcomplete's ``top_k`` counts the whole batch). After training an inference threshold
    is calibrated on ``calibration_samples`` training rows so that the mean L0 is exactly
    ``top_k``, and stored (``threshold_``): inference never depends on the batch.

    Parameters
    ----------
    n_concepts : int, default=1024
    top_k : float, default=32
        Average active latents per sample.
    calibration_samples : int, default=8192
        Training rows used to calibrate the inference threshold.
    auxk_coef, auxk_k, k_anneal, k_anneal_start, encoder_decay, resample_dead
        As in :class:`~sae.TopKSAE` (``encoder_decay`` and ``resample_dead`` default off).
    {COMMON_PARAMETERS_DOC}
    {COMMON_ATTRIBUTES_DOC}
    threshold_ : float
        The calibrated inference threshold (on raw inputs).
    calibration_l0_ : float
        Mean L0 with the threshold on the calibration rows.

    Examples
    --------
    >>> import torch
    >>> X = torch.randn(512, 16)
    >>> sae = BatchTopKSAE(n_concepts=64, top_k=4, batch_size=128, random_state=0).fit(X)
    >>> round(sae.calibration_l0_)
    4
    """

    _architecture = "batchtopk"

    def __init__(
        self,
        n_concepts: int = 1024,
        top_k: float = 32,
        *,
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
        self.n_concepts = n_concepts
        self.top_k = top_k
        self.calibration_samples = calibration_samples
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.auxk_coef = auxk_coef
        self.auxk_k = auxk_k
        self.k_anneal = k_anneal
        self.k_anneal_start = k_anneal_start
        self.encoder_decay = encoder_decay
        self.resample_dead = resample_dead
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
        super()._validate_variant_params(d_in)
        c = self.calibration_samples
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
            raise ValueError(f"{type(self).__name__}: calibration_samples must be a positive integer; got {c!r}.")

    def _make_activation(self) -> Activation:
        return BatchTopKActivation(float(self.top_k), self.n_concepts)

    def _finalize(self, module: SparseAutoencoder, source: BatchSource, scale: float, ctx: dict) -> None:
        super()._finalize(module, source, scale, ctx)
        theta, l0, rows = calibrate_threshold(
            module, source, float(self.top_k), n_samples=self.calibration_samples, scale=scale
        )
        module.activation.threshold.fill_(theta)
        self._extra_stats = {"calibration_l0": l0, "calibration_rows": rows}

    def _set_fitted(self, module, d_in, source_meta, scale, seed) -> None:
        super()._set_fitted(module, d_in, source_meta, scale, seed)
        self.threshold_ = float(module.activation.threshold.mean())
        self.calibration_l0_ = float(getattr(self, "_extra_stats", {}).get("calibration_l0", float("nan")))
