"""JumpReLU sparse autoencoder (Rajamanoharan et al. 2024) with step-L0 / tanh sparsity losses."""
from __future__ import annotations

import numbers
from pathlib import Path

import torch
from torch import Tensor

from .base import BaseSAE
from .modules import Activation, JumpReLUActivation, SparseAutoencoder, TrainOutput, step_function
from .topk import COMMON_ATTRIBUTES_DOC, COMMON_PARAMETERS_DOC
from .training import resolve_steps, warmup_factor

__all__ = ["JumpReLUSAE"]


class JumpReLUSAE(BaseSAE):
    __doc__ = f"""JumpReLU sparse autoencoder: ``z = pre * H(pre - theta)`` with learned thresholds.

    The threshold is parametrised as ``log theta`` (one per latent) and trained with the
    straight-through pseudo-gradients of Rajamanoharan et al. (rectangle kernel of width
    ``bandwidth``): ``d z / d theta = -(theta / eps) rect((pre - theta) / eps)`` and
    ``d H / d theta = -(1 / eps) rect((pre - theta) / eps)``.

    Sparsity losses (``sparsity_loss``):

    * ``"step"``: DeepMind's ``l0_coef * E[sum_i H(pre_i - theta_i)]``.
    * ``"tanh"``: Anthropic's ``l0_coef * E[sum_i tanh(tanh_scale * z_i * ||d_i||)]``.

    With ``target_l0`` set, the step-L0 enters as a controller loss
    ``l0_coef * (L0 / target_l0 - 1)^2`` (dictionary_learning) instead, which steers the mean L0
    to the target. ``pre_act_coef > 0`` adds Anthropic's pre-activation loss
    ``sum_i ReLU(theta_i - pre_i) ||d_i||`` on dead latents. The coefficient warms up linearly over
    ``sparsity_warmup``. Atoms are kept at unit norm.

    Parameters
    ----------
    n_concepts : int, default=1024
    l0_coef : float, default=1.0
        Sparsity-loss coefficient (on inputs normalised to ``E||x|| = sqrt(d)``).
    sparsity_loss : {{"step", "tanh"}}, default="step"
    target_l0 : float or None, default=None
        Target mean L0 for the controller loss (overrides ``sparsity_loss``).
    tanh_scale : float, default=4.0
    init_threshold : float, default=1.0
        Initial threshold on inputs normalised to ``E||x|| = sqrt(d)`` (active pre-activations are
        O(1) there).

    bandwidth : float, default=0.2
        Width of the rectangle kernel of the pseudo-gradients.
    sparsity_warmup : float or int, default=0.1
        Linear warm-up of the sparsity coefficient (fraction of steps or steps).
    pre_act_coef : float, default=0.0
    {COMMON_PARAMETERS_DOC}
    {COMMON_ATTRIBUTES_DOC}
    Examples
    --------
    >>> import torch
    >>> X = torch.randn(512, 16)
    >>> sae = JumpReLUSAE(n_concepts=64, target_l0=4, batch_size=128, random_state=0).fit(X)
    >>> sae.module_.activation.threshold.shape
    torch.Size([64])
    """

    _architecture = "jumprelu"
    _fold_decoder_norms = True

    def __init__(
        self,
        n_concepts: int = 1024,
        *,
        l0_coef: float = 1.0,
        sparsity_loss: str = "step",
        target_l0: float | None = None,
        tanh_scale: float = 4.0,
        init_threshold: float = 1.0,
        bandwidth: float = 0.2,
        sparsity_warmup: float = 0.1,
        pre_act_coef: float = 0.0,
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
        self.l0_coef = l0_coef
        self.sparsity_loss = sparsity_loss
        self.target_l0 = target_l0
        self.tanh_scale = tanh_scale
        self.init_threshold = init_threshold
        self.bandwidth = bandwidth
        self.sparsity_warmup = sparsity_warmup
        self.pre_act_coef = pre_act_coef
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
        name = type(self).__name__
        if self.sparsity_loss not in ("step", "tanh"):
            raise ValueError(f"{name}: sparsity_loss must be 'step' or 'tanh'; got {self.sparsity_loss!r}.")
        for attr in ("init_threshold", "bandwidth", "tanh_scale"):
            v = getattr(self, attr)
            if not isinstance(v, numbers.Real) or not v > 0:
                raise ValueError(f"{name}: {attr} must be a positive number; got {v!r}.")
        for attr in ("l0_coef", "pre_act_coef"):
            v = getattr(self, attr)
            if not isinstance(v, numbers.Real) or v < 0:
                raise ValueError(f"{name}: {attr} must be a number >= 0; got {v!r}.")
        if self.target_l0 is not None and (not isinstance(self.target_l0, numbers.Real) or not 0 < self.target_l0 <= self.n_concepts):
            raise ValueError(
                f"{name}: target_l0 must be in (0, n_concepts={self.n_concepts}] or None; got {self.target_l0!r}."
            )

    def _make_activation(self) -> Activation:
        return JumpReLUActivation(self.n_concepts, float(self.init_threshold), float(self.bandwidth))

    def _penalties(self, module: SparseAutoencoder, x: Tensor, out: TrainOutput, ctx: dict) -> dict[str, Tensor]:
        act = module.activation
        theta = act.threshold
        coef = self.l0_coef * warmup_factor(ctx["step"], resolve_steps(self.sparsity_warmup, ctx["total"]))
        norms = out.dictionary.norm(dim=1)
        terms: dict[str, Tensor] = {}
        pre = out.pre.to(torch.float32)
        if self.target_l0 is not None:
            l0 = step_function(pre, theta, act.bandwidth).sum(-1).mean()
            terms["sparsity"] = coef * (l0 / float(self.target_l0) - 1.0) ** 2
        elif self.sparsity_loss == "step":
            terms["sparsity"] = coef * step_function(pre, theta, act.bandwidth).sum(-1).mean()
        else:
            z = out.codes.to(torch.float32)
            terms["sparsity"] = coef * torch.tanh(self.tanh_scale * z * norms).sum(-1).mean()
        if self.pre_act_coef > 0:
            dead = ctx["tracker"].dead
            if bool(dead.any()):
                gap = torch.relu(theta - pre) * dead.to(pre.dtype) * norms
                terms["pre_act"] = self.pre_act_coef * gap.sum(-1).mean()
        return terms
