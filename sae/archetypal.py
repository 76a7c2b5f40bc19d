"""Relaxed archetypal SAE (RA-SAE, Fel et al. 2025): atoms are mixtures of data centroids."""
from __future__ import annotations

import numbers
from pathlib import Path

import torch
from torch import Tensor

from .base import BaseSAE
from .batchtopk import BatchTopKSAE, calibrate_threshold
from .data import BatchSource
from .init import kmeans
from .jumprelu import JumpReLUSAE
from .modules import (
    Activation,
    ArchetypalDictionary,
    BatchTopKActivation,
    FreeDictionary,
    JumpReLUActivation,
    ReLUActivation,
    SparseAutoencoder,
    TopKActivation,
    TrainOutput,
    step_function,
)
from .relu import ReLUSAE
from .topk import COMMON_ATTRIBUTES_DOC, COMMON_PARAMETERS_DOC, TopKSAE, _SelectingFamily
from .training import resolve_steps, warmup_factor

__all__ = ["ArchetypalSAE"]

_ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "relu")


class ArchetypalSAE(_SelectingFamily):
    __doc__ = f"""Relaxed archetypal SAE: ``D = (W C + Lambda) * exp(m)`` under any activation.

    ``C`` [n_candidates, d] are k-means centroids of the centred training sample (first 8,192
    rows), fixed during training. ``W`` is kept row-stochastic (ReLU, then rows renormalised after
    every step) so each atom stays in the convex hull of the candidates, up to a relaxation
    ``Lambda_i`` with ``||Lambda_i|| <= relaxation`` and a learned global scale ``exp(m)``.
    Atom ``i`` starts at candidate ``i mod n_candidates`` (duplicates get a small random mixture),
    and the encoder starts as ``d_i / ||d_i||^2``.

    Memory: a dense ``W`` is ``n_concepts x n_candidates``. For large dictionaries use fewer
    candidates (``n_candidates << n_concepts``) and/or ``mixture_support=m``: each atom then mixes
    only its ``m`` nearest candidates (``W`` is ``n_concepts x m``). :meth:`to_fused` (and
    ``save(path, fused=True)``) exports a plain SAE with the fused dictionary.

    Stability caveat ("Ablating Archetypes", 2026): with a deterministic ``C`` all seeds start
    from the same dictionary. Here ``C`` depends on ``init_random_state`` (k-means++ seeding), so
    :func:`sae.evaluation.seed_stability` can compare independent and shared initialisations.

    Parameters
    ----------
    n_concepts : int, default=1024
    activation : {{"topk", "batchtopk", "jumprelu", "relu"}}, default="topk"
    top_k : float, default=32
        k for ``"topk"`` / ``"batchtopk"``.
    n_candidates : int or None, default=None
        Number of k-means candidates (``None``: ``min(n_concepts, sample size)``).
    relaxation : float, default=1.0
        ``delta``, the largest norm of each relaxation row (on normalised inputs).
    mixture_support : int or None, default=None
        Candidates per atom (``None``: all).
    use_multiplier : bool, default=True
        Learn the global scale ``m``.
    kmeans_iters : int, default=20
    sparsity_coef : float, default=1.0
        L1 coefficient (``"relu"``) or step-L0 coefficient (``"jumprelu"``).
    calibration_samples : int, default=8192
        Rows used to calibrate the BatchTopK inference threshold.
    auxk_coef, auxk_k, k_anneal, k_anneal_start
        As in :class:`~sae.TopKSAE` (selecting activations only).
    {COMMON_PARAMETERS_DOC}
    {COMMON_ATTRIBUTES_DOC}
    Examples
    --------
    >>> import torch
    >>> X = torch.randn(512, 16)
    >>> sae = ArchetypalSAE(n_concepts=32, top_k=4, n_candidates=16, batch_size=128, random_state=0).fit(X)
    >>> plain = sae.to_fused()        # a TopKSAE with the fused dictionary
    """

    _architecture = "archetypal"

    def __init__(
        self,
        n_concepts: int = 1024,
        *,
        activation: str = "topk",
        top_k: float = 32,
        n_candidates: int | None = None,
        relaxation: float = 1.0,
        mixture_support: int | None = None,
        use_multiplier: bool = True,
        kmeans_iters: int = 20,
        sparsity_coef: float = 1.0,
        calibration_samples: int = 8192,
        n_epochs: int = 1,
        batch_size: int = 1024,
        lr: float | None = None,
        auxk_coef: float = 1 / 32,
        auxk_k: int | None = None,
        k_anneal: float = 0.0,
        k_anneal_start: int | None = None,
        lr_warmup: float = 0.05,
        lr_decay: float = 0.2,
        grad_clip: float | None = 1.0,
        normalize: str = "expected_norm",
        b_dec_init: str = "geometric_median",
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
        self.activation = activation
        self.top_k = top_k
        self.n_candidates = n_candidates
        self.relaxation = relaxation
        self.mixture_support = mixture_support
        self.use_multiplier = use_multiplier
        self.kmeans_iters = kmeans_iters
        self.sparsity_coef = sparsity_coef
        self.calibration_samples = calibration_samples
        self.n_epochs = n_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.auxk_coef = auxk_coef
        self.auxk_k = auxk_k
        self.k_anneal = k_anneal
        self.k_anneal_start = k_anneal_start
        self.lr_warmup = lr_warmup
        self.lr_decay = lr_decay
        self.grad_clip = grad_clip
        self.normalize = normalize
        self.b_dec_init = b_dec_init
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

    # ------------------------------------------------------------------ validation
    def _validate_variant_params(self, d_in: int | None) -> None:
        name = type(self).__name__
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {_ACTIVATIONS}; got {self.activation!r}.")
        if self.activation in ("topk", "batchtopk"):
            self._validate_k(d_in)
        for attr in ("n_candidates", "mixture_support"):
            v = getattr(self, attr)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{name}: {attr} must be a positive integer or None; got {v!r}.")
        if not isinstance(self.relaxation, numbers.Real) or self.relaxation < 0:
            raise ValueError(f"{name}: relaxation must be a number >= 0; got {self.relaxation!r}.")
        if not isinstance(self.sparsity_coef, numbers.Real) or self.sparsity_coef < 0:
            raise ValueError(f"{name}: sparsity_coef must be a number >= 0; got {self.sparsity_coef!r}.")

    # ------------------------------------------------------------------ module
    def _make_activation(self) -> Activation:
        if self.activation == "topk":
            return TopKActivation(int(round(self.top_k)))
        if self.activation == "batchtopk":
            return BatchTopKActivation(float(self.top_k), self.n_concepts)
        if self.activation == "jumprelu":
            return JumpReLUActivation(self.n_concepts)
        return ReLUActivation()

    def _make_dictionary(self, d_in: int, init_data: Tensor | None, generator: torch.Generator) -> torch.nn.Module:
        if init_data is None:
            n_c = self.n_candidates or self.n_concepts
            cand = torch.zeros(n_c, d_in)
        else:
            n_c = self.n_candidates or min(self.n_concepts, init_data.shape[0])
            if n_c > init_data.shape[0]:
                raise ValueError(
                    f"{type(self).__name__}: n_candidates={n_c} exceeds the {init_data.shape[0]} samples used for "
                    "k-means; lower n_candidates or pass more data."
                )
            cand = kmeans(init_data, n_c, n_iter=self.kmeans_iters, generator=generator)
        return ArchetypalDictionary(
            cand, self.n_concepts, delta=float(self.relaxation), support=self.mixture_support,
            use_multiplier=bool(self.use_multiplier),
        )

    def _module_for_state(self, d_in: int, tensors: dict[str, Tensor]) -> SparseAutoencoder:
        c = tensors.get("module.dictionary.C", tensors.get("dictionary.C"))
        w = tensors.get("module.dictionary.W", tensors.get("dictionary.W"))
        if c is None or w is None:
            raise ValueError("The saved tensors lack 'dictionary.C' / 'dictionary.W' needed by ArchetypalSAE.")
        has_support = "module.dictionary.support_idx" in tensors or "dictionary.support_idx" in tensors
        support = int(w.shape[1]) if has_support else None
        dictionary = ArchetypalDictionary(
            torch.zeros(c.shape), self.n_concepts, delta=float(self.relaxation), support=support,
            use_multiplier=bool(self.use_multiplier),
        )
        return SparseAutoencoder(d_in, self.n_concepts, self._make_activation(), dictionary, self.sparse_backend)

    # ------------------------------------------------------------------ training
    def _penalties(self, module: SparseAutoencoder, x: Tensor, out: TrainOutput, ctx: dict) -> dict[str, Tensor]:
        if self.activation in ("topk", "batchtopk"):
            return super()._penalties(module, x, out, ctx)
        coef = self.sparsity_coef * warmup_factor(ctx["step"], resolve_steps(0.05, ctx["total"]))
        norms = out.dictionary.norm(dim=1)
        if self.activation == "relu":
            return {"l1": coef * (out.codes.to(torch.float32) * norms).sum(-1).mean()}
        act = module.activation
        return {"sparsity": coef * step_function(out.pre.float(), act.threshold, act.bandwidth).sum(-1).mean()}

    def _before_step(self, module: SparseAutoencoder, step: int, total: int) -> None:
        if self.activation in ("topk", "batchtopk"):
            super()._before_step(module, step, total)

    def _finalize(self, module: SparseAutoencoder, source: BatchSource, scale: float, ctx: dict) -> None:
        if self.activation in ("topk", "batchtopk"):
            super()._finalize(module, source, scale, ctx)
        if self.activation == "batchtopk":
            theta, l0, rows = calibrate_threshold(module, source, float(self.top_k), n_samples=self.calibration_samples, scale=scale)
            module.activation.threshold.fill_(theta)
            self._extra_stats = {"calibration_l0": l0, "calibration_rows": rows}

    # ------------------------------------------------------------------ export
    def to_fused(self) -> BaseSAE:
        """A plain fitted SAE of the same activation whose dictionary is the fused ``D``.

        The archetypal parameters ``W``, ``C``, ``Lambda`` and ``m`` are dropped (for a 32k x 32k
        ``W`` this shrinks the checkpoint by more than 20x); reconstructions are identical.
        """
        self._check_fitted()
        cls = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE, "relu": ReLUSAE}[self.activation]
        common = {k: v for k, v in self.get_params().items() if k in cls().get_params()}
        est = cls(**common)
        if self.activation == "topk":
            est.set_params(top_k=int(round(self.top_k)))
        elif self.activation == "jumprelu":
            est.set_params(l0_coef=self.sparsity_coef)
        elif self.activation == "relu":
            est.set_params(l1_coef=self.sparsity_coef)
        old = self.module_
        d = old.get_dictionary().detach()
        dictionary = FreeDictionary(self.n_concepts, self.n_features_in_, unit_norm=False)
        act = est._make_activation()
        module = SparseAutoencoder(self.n_features_in_, self.n_concepts, act, dictionary, self.sparse_backend)
        module.to(device=d.device, dtype=d.dtype)
        with torch.no_grad():
            dictionary.W_dec.copy_(d)
            module.W_enc.copy_(old.W_enc)
            module.b_enc.copy_(old.b_enc)
            module.b_dec.copy_(old.b_dec)
            act.load_state_dict(old.activation.state_dict())
        module.eval()
        est._set_fitted(module, self.n_features_in_, getattr(self, "source_", {}), self.normalization_scale_, getattr(self, "random_state_", None))
        est.history_ = getattr(self, "history_", None)
        est.training_stats_ = dict(getattr(self, "training_stats_", {}), fused_from="archetypal")
        est._fused_from = "archetypal"
        return est

    def _config_extra(self) -> dict:
        d = self.module_.dictionary
        return {"archetypal": {"n_candidates": int(d.C.shape[0]), "mixture_support": d.support}}
