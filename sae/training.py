"""Training ingredients shared by every SAE variant.

Schedules (learning rate, sparsity coefficient, k annealing), the dead-latent tracker, the AuxK
loss on dead latents, the reconstruction loss, and autocast with a full-precision fallback.
Every schedule is a pure function of the step, so a resumed run reproduces the original one.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .modules import SparseAutoencoder, TrainOutput
from .sparse import selection_from_topk

__all__ = [
    "resolve_steps",
    "lr_factor",
    "warmup_factor",
    "annealed_k",
    "DeadLatentTracker",
    "reconstruction_loss",
    "auxk_loss",
    "autocast_context",
]


def resolve_steps(value: float | int, total: int) -> int:
    """A step count given as an int (steps) or a float in [0, 1] (fraction of ``total``)."""
    if isinstance(value, float) and value <= 1.0:
        return int(round(value * total))
    return int(value)


def lr_factor(step: int, total: int, warmup: int, decay: int) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then linear decay to 0 over ``decay`` steps."""
    f = 1.0
    if warmup > 0:
        f = min(f, (step + 1) / warmup)
    if decay > 0:
        start = total - decay
        if step >= start:
            f = min(f, max(0.0, (total - step) / decay))
    return f


def warmup_factor(step: int, warmup: int) -> float:
    """Linear ramp from 0 to 1 over ``warmup`` steps (sparsity-coefficient warm-up)."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup)


def annealed_k(step: int, k: int, k_start: int, anneal_steps: int) -> int:
    """k decays linearly from ``k_start`` to ``k`` over ``anneal_steps`` steps, then stays at k."""
    if anneal_steps <= 0 or k_start <= k:
        return k
    frac = min(1.0, step / anneal_steps)
    return int(round(k_start + (k - k_start) * frac))


class DeadLatentTracker:
    """Counts, per latent, the training samples seen since it last fired.

    A latent is *dead* when that count exceeds ``window`` samples.
    """

    def __init__(self, n_concepts: int, window: int, device: torch.device | str = "cpu") -> None:
        self.window = int(window)
        self.since_fired = torch.zeros(n_concepts, dtype=torch.int64, device=device)

    def update(self, fired: Tensor, n_samples: int) -> None:
        self.since_fired += n_samples
        self.since_fired[fired] = 0

    @property
    def dead(self) -> Tensor:
        return self.since_fired > self.window

    def dead_fraction(self) -> float:
        return float(self.dead.float().mean())


def reconstruction_loss(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean over the batch of the squared error summed over features."""
    return (x_hat.to(torch.float32) - x.to(torch.float32)).pow(2).sum(-1).mean()


def auxk_loss(module: SparseAutoencoder, x: Tensor, out: TrainOutput, dead: Tensor, k_aux: int) -> Tensor:
    """AuxK (Gao et al.): reconstruct the *detached* residual with the top ``k_aux`` dead latents.

    Only latents flagged ``dead`` compete; the residual ``e = x - x_hat`` is detached so the aux
    loss trains only the dead latents' encoder rows and atoms. The loss is normalised by the
    residual's variance and scaled by ``min(n_dead / k_aux, 1)``. Returns 0 without dead latents.
    """
    n_dead = int(dead.sum())
    if n_dead == 0 or k_aux <= 0:
        return torch.zeros((), device=x.device)
    k = min(k_aux, n_dead)
    e = (x - out.x_hat).detach().to(torch.float32)
    pre = out.pre.detach().masked_fill(~dead, float("-inf"))
    sel, raw = selection_from_topk(pre, k, sort=False)
    values = module.selected_values(out.xc, sel, raw)
    e_hat = module.decode_selection(values, sel, out.dictionary).to(torch.float32)
    denom = (e - e.mean(0, keepdim=True)).pow(2).sum().clamp_min(1e-12)
    scale = min(n_dead / k_aux, 1.0)
    return scale * (e - e_hat).pow(2).sum() / denom


def autocast_context(device: torch.device, dtype: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` in {"bfloat16", "float16"}, or a null context."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))
