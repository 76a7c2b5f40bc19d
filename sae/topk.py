"""TopK sparse autoencoder (Gao et al. 2024) with AuxK and k-annealing."""
from __future__ import annotations

import numbers
from pathlib import Path

import torch
from torch import Tensor

from .base import BaseSAE
from .modules import Activation, SparseAutoencoder, TopKActivation, TrainOutput
from .training import annealed_k, auxk_loss, resolve_steps

__all__ = ["TopKSAE", "COMMON_PARAMETERS_DOC"]

COMMON_PARAMETERS_DOC = """
    n_epochs : int, default=1
        Passes over the training data.
    batch_size : int, default=1024
        Samples per optimisation step.
    lr : float or None, default=None
        Adam learning rate; ``None`` picks ``min(1e-2, 4e-3 * sqrt(2048 / n_concepts))``.
    lr_warmup, lr_decay : float or int, default=0.05, 0.2
        Linear warm-up at the start and linear decay to 0 at the end, as a fraction of the steps
        (float <= 1) or a number of steps (int).
    grad_clip : float or None, default=1.0
        Global gradient-norm clipping.
    normalize : {"expected_norm", "none"}, default="expected_norm"
        Train on ``s * x`` with ``E||s x|| = sqrt(d)`` (estimated on the first 8,192 samples); the
        scale is folded into the weights after training, so the fitted model acts on raw inputs.
    b_dec_init : {"geometric_median", "mean", "zero"}, default="geometric_median"
        Initial pre-encoder / decoder bias (computed on the first 8,192 samples).
    decoder_init : {"data", "random"}, default="data"
        Initial atoms: ``"data"`` uses distinct random samples of the first 8,192 (centred by
        ``b_dec``, unit norm; Gaussian directions for any atoms beyond the sample),
        ``"random"`` unit Gaussian directions. The encoder starts as the decoder transpose. (Not
        a parameter of :class:`~sae.ArchetypalSAE`, whose atoms start at k-means candidates.)
    dead_window : int, default=10_000
        A latent is dead when it has not fired for this many training samples.
    autocast : {None, "bfloat16", "float16"}, default=None
        Mixed precision for the forward pass; a step whose loss is not finite is recomputed in
        full precision (counted in ``history_["nan_fallbacks"]``).
    sparse_backend : {"auto", "sparse", "dense"}, default="auto"
        Sparse CSR kernels for the decoder and the backward pass of selecting activations.
    log_every : int or None, default=None
        Steps per row of ``history_`` (``None``: about 50 rows).
    checkpoint_dir : str or None, default=None
        Directory for training checkpoints (``fit(..., resume=True)`` continues from it).
    checkpoint_every : int or None, default=None
        Steps between checkpoints (the final state is always saved when a directory is given).
    random_state : int or None, default=None
        Seed for the data order and everything random in training; ``None`` draws one (stored
        in ``random_state_``).
    init_random_state : int or None, default=None
        Separate seed for the initial dictionary (``None``: ``random_state``). Fixing it while
        varying ``random_state`` gives runs with a *shared* initialisation.
    device : str or torch.device, default="cpu"
    dtype : {"float32", "float64"}, default="float32"
    verbose : bool, default=False
        Show a progress bar.
"""

COMMON_ATTRIBUTES_DOC = """
    Attributes
    ----------
    module_ : SparseAutoencoder
        The trained torch module (input scale folded in).
    dictionary_ : Tensor [n_concepts, n_features_in_]
        Concept atoms (rows).
    n_features_in_ : int
    history_ : pandas.DataFrame
        Per-interval training metrics (step, epoch, samples, lr, loss, mse, fvu, l0,
        dead_fraction, penalties, nan_fallbacks, skipped_steps, time_s = wall time since this
        ``fit`` call started).
    training_stats_ : dict
        Summary of the run (steps, final train FVU and L0, dead fraction, time).
    normalization_scale_ : float
    random_state_ : int
        The seed actually used.
"""


class _SelectingFamily(BaseSAE):
    """Shared training behaviour of TopK-style SAEs: AuxK on dead latents and k-annealing."""

    def _validate_k(self, d_in: int | None) -> None:
        name = type(self).__name__
        k = self.top_k
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or k <= 0:
            raise ValueError(f"{name}: top_k must be a positive number; got {k!r}.")
        if k > self.n_concepts:
            raise ValueError(
                f"{name}: top_k={k} exceeds n_concepts={self.n_concepts}; choose top_k <= n_concepts."
            )
        if self.auxk_coef < 0:
            raise ValueError(f"{name}: auxk_coef must be >= 0; got {self.auxk_coef!r}.")
        if self.auxk_k is not None and (not isinstance(self.auxk_k, numbers.Integral) or self.auxk_k < 1):
            raise ValueError(f"{name}: auxk_k must be a positive integer or None (d_in // 2); got {self.auxk_k!r}.")
        if not isinstance(self.k_anneal, numbers.Real) or self.k_anneal < 0:
            raise ValueError(f"{name}: k_anneal must be a fraction of the steps or a step count >= 0; got {self.k_anneal!r}.")

    def _validate_variant_params(self, d_in: int | None) -> None:
        self._validate_k(d_in)

    def _k_aux(self, d_in: int) -> int:
        return int(self.auxk_k) if self.auxk_k is not None else max(1, d_in // 2)

    def _penalties(self, module: SparseAutoencoder, x: Tensor, out: TrainOutput, ctx: dict) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        if self.auxk_coef > 0 and module.activation.selects:
            dead = ctx["tracker"].dead
            if bool(dead.any()):
                terms["auxk"] = self.auxk_coef * auxk_loss(module, x, out, dead, self._k_aux(ctx["d_in"]))
        return terms

    def _before_step(self, module: SparseAutoencoder, step: int, total: int) -> None:
        steps = resolve_steps(self.k_anneal, total)
        if steps <= 0 or not hasattr(module.activation, "k"):
            return
        k0 = self.k_anneal_start if self.k_anneal_start is not None else min(self.n_concepts, 4 * int(round(self.top_k)))
        k = annealed_k(step, int(round(self.top_k)), int(k0), steps)
        module.activation.k = k if isinstance(module.activation, TopKActivation) else float(k)

    def _finalize(self, module, source, scale, ctx) -> None:
        if hasattr(module.activation, "k"):
            module.activation.k = type(module.activation.k)(self.top_k)


class TopKSAE(_SelectingFamily):
    __doc__ = f"""TopK sparse autoencoder: each sample keeps its ``top_k`` largest pre-activations.

    Training follows the recipe of Gao et al. (2024) and dictionary_learning: encoder initialised
    as the decoder transpose, pre-encoder bias at the geometric median, unit-norm atoms with the
    gradient component parallel to each atom removed, AuxK on dead latents, optional k-annealing,
    and, optionally, a decoupled decay of the encoder toward the tied encoder (``encoder_decay``).
    The decoder product and the whole backward pass run through sparse kernels over the
    selected latents only (:mod:`sae.sparse`).

    Parameters
    ----------
    n_concepts : int, default=1024
        Number of latents (dictionary atoms).
    top_k : int, default=32
        Active latents per sample.
    auxk_coef : float, default=1/32
        Weight of the AuxK loss (dead latents reconstruct the detached residual).
    auxk_k : int or None, default=None
        Dead latents used by AuxK (``None``: ``d_in // 2``).
    k_anneal : float or int, default=0.0
        Steps (int) or fraction of steps (float) over which k decays linearly from
        ``k_anneal_start`` to ``top_k``; 0 disables annealing.
    k_anneal_start : int or None, default=None
        Starting k for annealing (``None``: ``min(n_concepts, 4 * top_k)``).
    encoder_decay : float, default=0.0
        Decoupled decay of the encoder toward the *tied* encoder (the decoder transpose, where
        training starts): after every optimiser step
        ``W_enc <- W_enc + r * (D - W_enc)`` with ``r = lr_t * encoder_decay * sqrt(d_in)``
        (``lr_t`` the scheduled learning rate; ``D_i / ||D_i||^2`` for atoms that are not
        unit-norm), like AdamW's decay but centred on the matched filter instead of 0; ``0``
        (default) leaves the encoder free, as in Gao et al. Why: each encoder row is a regression
        fitted only from the samples where its latent is selected (about
        ``top_k / n_concepts`` of them), so it is noisy and over-fits small or repeated data (on
        the benchmark below the free encoder's FVU is 0.040 on training rows but 0.083 held
        out, while a least-squares refit of the codes on the same selected atoms gives 0.023 /
        0.029: the atoms generalise, the encoder does not). The pull is a ridge prior on the
        deviation from the tied encoder. An Adam step moves a row by about ``lr_t * sqrt(d_in)``
        whatever the scale, so a consistent gradient can still hold a row at a relative
        deviation of about ``1 / encoder_decay`` from its atom (the ``sqrt(d_in)`` keeps that
        independent of the width); mostly the noise is damped. Measured with ``0.125``:
        ``benchmarks/sae_vs_overcomplete.py`` (d = 512, 2,048 atoms, 448 steps, seeds 0-2)
        held-out FVU 0.083-0.086 -> 0.064-0.067, recovered atoms 94.3-95.1 % -> 95.4-96.7 %;
        same data with fresh samples every step 0.083 -> 0.066; d = 256 (1,024 atoms, 432
        steps) 0.119 -> 0.109. It slows early learning, so it can hurt a short run far from
        convergence: d = 128 (512 atoms, 432 steps, 67 % of the atoms recovered without it)
        0.160 -> 0.165 and 67 % -> 59 % recovered (with 3x the steps it helps again: 0.120 ->
        0.113). Try ``0.125`` when the data are small or repeated over epochs and the held-out
        FVU trails the training FVU.
    resample_dead : int, float or None, default=None
        Dead-latent resampling (after Anthropic's "Towards Monosemanticity" recipe): every
        ``resample_dead`` steps (int) or fraction of the steps (float <= 1), until the final
        learning-rate decay starts, each latent that has not fired for ``dead_window`` samples
        is re-initialised from the current batch. Rows whose loss ``||x - x_hat||^2`` is above
        the batch mean are drawn without replacement with probability proportional to the
        squared loss (one latent per row at most); the latent's atom becomes the unit-norm
        residual of its row, its encoder row that direction times the live rows' mean encoder
        norm (tied, as at initialisation; Anthropic's 0.2 x suits ReLU SAEs, but under a top-k
        selection the new latent could then never win), its encoder bias 0, and its Adam state
        is reset (first moment 0, second moment the live rows' mean, since a zero second moment
        would make its next steps about 3x larger). ``history_["resampled"]`` counts resampled
        latents. Complements AuxK, which trains dead latents on the residual without moving
        them. It helps when latents die for lack of a direction to take (measured: uncentred
        data, zero bias init, random atoms: held-out dead fraction 0.40-0.48 -> 0.02-0.04, true
        atoms recovered 0-2 % -> 13-40 %); when the dictionary is much larger than the data's
        directions (256 latents, 24 atoms) dead latents are expected, and resampling with a
        short ``dead_window`` only churns them (there it lowered the explained variance by up
        to 0.02). Not supported by ``fit_distributed``.
    {COMMON_PARAMETERS_DOC}
    {COMMON_ATTRIBUTES_DOC}
    Examples
    --------
    >>> import torch
    >>> X = torch.randn(512, 16)
    >>> sae = TopKSAE(n_concepts=64, top_k=4, n_epochs=1, batch_size=128, random_state=0).fit(X)
    >>> sae.transform(X).shape
    torch.Size([512, 64])
    >>> codes = sae.transform(X, sparse=True)   # (indices, values), [512, 4] each
    """

    _architecture = "topk"

    def __init__(
        self,
        n_concepts: int = 1024,
        top_k: int = 32,
        *,
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
        if not isinstance(self.top_k, numbers.Integral):
            raise ValueError(f"TopKSAE: top_k must be an integer; got {self.top_k!r}.")

    def _make_activation(self) -> Activation:
        return TopKActivation(int(self.top_k))
