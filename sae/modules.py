"""Pure-torch sparse-autoencoder modules: activations, dictionaries and the autoencoder itself.

Parametrisation (shared by every variant)::

    xc    = x - b_dec                              # pre-encoder bias
    pre   = xc @ W_enc.T + b_enc                   # [B, n]
    z     = activation(pre)                        # sparse codes, [B, n]
    x_hat = z @ D + b_dec                          # D = dictionary(), [n, d]

``W_enc`` is stored as ``[n_concepts, d_in]`` (one encoder direction per row, the layout of
``nn.Linear.weight``); ``D`` rows are the concept atoms. The SAELens layout
(``W_enc [d_in, d_sae]``) is produced by :mod:`sae.io`.

Activations that *select* latents (TopK, BatchTopK, and any activation at inference) run through
the sparse kernels of :mod:`sae.sparse`; ReLU and JumpReLU train through dense autograd.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sparse import (
    Selection,
    SparseCodes,
    selected_pre_activations,
    selection_from_mask,
    selection_from_topk,
    sparse_decode,
    to_padded,
)

__all__ = [
    "Activation",
    "ReLUActivation",
    "TopKActivation",
    "BatchTopKActivation",
    "JumpReLUActivation",
    "FreeDictionary",
    "ArchetypalDictionary",
    "SparseAutoencoder",
    "LowRankAutoencoder",
    "TrainOutput",
    "jumprelu",
    "step_function",
]


# --------------------------------------------------------------------------------------------
# JumpReLU straight-through functions
# --------------------------------------------------------------------------------------------


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``z = x * H(x - theta)``; d/dx = H, d/dtheta = -(theta/eps) * rect((x - theta)/eps)."""

    @staticmethod
    def forward(ctx, x, theta, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return x * (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_x = (x > theta).to(g.dtype) * g
        g_t = -(theta / eps) * _rectangle((x - theta) / eps) * g
        g_t = g_t.reshape(-1, theta.shape[-1]).sum(0)
        return g_x, g_t, None


class _Step(torch.autograd.Function):
    """``H(x - theta)`` with the pseudo-gradient d/dtheta = -(1/eps) * rect((x - theta)/eps)."""

    @staticmethod
    def forward(ctx, x, theta, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return (x > theta).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        g_t = -(1.0 / eps) * _rectangle((x - theta) / eps) * g
        return torch.zeros_like(x), g_t.reshape(-1, theta.shape[-1]).sum(0), None


def jumprelu(x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU with straight-through pseudo-gradients for the threshold (rectangle kernel)."""
    return _JumpReLU.apply(x, theta, bandwidth)


def step_function(x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
    """Heaviside step ``H(x - theta)`` with a pseudo-gradient for the threshold only."""
    return _Step.apply(x, theta, bandwidth)


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------


class Activation(nn.Module):
    """Maps pre-activations to codes.

    ``selects`` activations produce a :class:`~sae.sparse.Selection` of latents plus the raw
    pre-activation values and are trained through the sparse kernels; the others are trained
    densely through :meth:`dense`. Every activation can produce a selection at inference.
    """

    selects: bool = False
    name: str = "activation"

    def dense(self, pre: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def select(self, pre: Tensor) -> tuple[Selection, Tensor]:
        """Selection of active latents for ``pre`` [B, n] (no gradient)."""
        return selection_from_mask(pre, self.dense(pre) > 0)

    def scale_thresholds_(self, factor: Tensor | float) -> None:
        """Rescale stored thresholds when pre-activations are rescaled by ``factor``."""

    def extra_config(self) -> dict:
        return {}


class ReLUActivation(Activation):
    """``z = ReLU(pre)``."""

    name = "relu"

    def dense(self, pre: Tensor) -> Tensor:
        return F.relu(pre)

    def select(self, pre: Tensor) -> tuple[Selection, Tensor]:
        return selection_from_mask(pre, pre > 0)


class TopKActivation(Activation):
    """Per-sample top-``k`` of the pre-activations, then ReLU."""

    selects = True
    name = "topk"

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = int(k)

    def dense(self, pre: Tensor) -> Tensor:
        k = min(self.k, pre.shape[-1])
        vals, idx = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))

    def select(self, pre: Tensor) -> tuple[Selection, Tensor]:
        return selection_from_topk(pre, min(self.k, pre.shape[-1]), sort=not self.training)

    def extra_config(self) -> dict:
        return {"k": self.k}


class BatchTopKActivation(Activation):
    """BatchTopK: the batch keeps its ``round(k * B)`` largest positive pre-activations in training.

    ``k`` is the *average* number of active latents per sample. In eval mode a calibrated,
    stored ``threshold`` is used instead (``z = pre * (pre > threshold)``), so inference never
    depends on the batch.
    """

    selects = True
    name = "batchtopk"

    def __init__(self, k: float, n_concepts: int) -> None:
        super().__init__()
        self.k = float(k)
        self.register_buffer("threshold", torch.zeros(n_concepts))

    def _train_mask(self, pre: Tensor) -> Tensor:
        flat = F.relu(pre).reshape(-1)
        m = max(1, min(flat.numel(), int(round(self.k * pre.shape[0]))))
        thr = flat.topk(m, sorted=False).values.min()
        return (pre >= thr) & (pre > 0)

    def _eval_mask(self, pre: Tensor) -> Tensor:
        return (pre > self.threshold) & (pre > 0)

    def dense(self, pre: Tensor) -> Tensor:
        mask = self._train_mask(pre) if self.training else self._eval_mask(pre)
        return pre * mask.to(pre.dtype)

    def select(self, pre: Tensor) -> tuple[Selection, Tensor]:
        mask = self._train_mask(pre) if self.training else self._eval_mask(pre)
        return selection_from_mask(pre, mask)

    def scale_thresholds_(self, factor: Tensor | float) -> None:
        self.threshold.mul_(factor)

    def extra_config(self) -> dict:
        return {"k": self.k, "threshold": float(self.threshold.mean())}


class JumpReLUActivation(Activation):
    """JumpReLU ``z = pre * H(pre - theta)`` with a learned per-latent log-threshold."""

    name = "jumprelu"

    def __init__(self, n_concepts: int, init_threshold: float = 1.0, bandwidth: float = 0.2) -> None:
        super().__init__()
        self.bandwidth = float(bandwidth)
        self.log_threshold = nn.Parameter(torch.full((n_concepts,), math.log(init_threshold)))

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def dense(self, pre: Tensor) -> Tensor:
        return jumprelu(pre, self.threshold, self.bandwidth)

    def select(self, pre: Tensor) -> tuple[Selection, Tensor]:
        return selection_from_mask(pre, (pre > self.threshold) & (pre > 0))

    def scale_thresholds_(self, factor: Tensor | float) -> None:
        with torch.no_grad():
            f = torch.as_tensor(factor, dtype=self.log_threshold.dtype, device=self.log_threshold.device)
            self.log_threshold.add_(torch.log(f))

    def extra_config(self) -> dict:
        return {"bandwidth": self.bandwidth}


# --------------------------------------------------------------------------------------------
# dictionaries
# --------------------------------------------------------------------------------------------


class FreeDictionary(nn.Module):
    """A free ``[n, d]`` dictionary (``W_dec``), optionally kept at unit row norm."""

    def __init__(self, n_concepts: int, d_in: int, unit_norm: bool = True) -> None:
        super().__init__()
        self.unit_norm = bool(unit_norm)
        self.W_dec = nn.Parameter(torch.empty(n_concepts, d_in))

    def forward(self) -> Tensor:
        return self.W_dec

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Project out the gradient component parallel to each (unit) atom."""
        if not self.unit_norm or self.W_dec.grad is None:
            return
        w = self.W_dec  # unit rows: projected after every step and at initialisation
        g = self.W_dec.grad
        g.sub_((g * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def project_(self) -> None:
        if self.unit_norm:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


class ArchetypalDictionary(nn.Module):
    """Relaxed archetypal dictionary ``D = (W C + Lambda) * exp(m)`` (RA-SAE).

    ``C`` [n_candidates, d] are fixed candidate points (k-means centroids of the centred data);
    ``W`` is kept row-stochastic (ReLU + row renormalisation after every step) and every
    relaxation row ``Lambda_i`` is clamped to norm ``<= delta``.

    Memory: with ``support=None`` ``W`` is dense ``[n, n_candidates]``. With ``support=m`` each
    atom mixes only ``m`` fixed candidates (``support_idx`` [n, m], the ``m`` candidates nearest
    to its starting candidate), so ``W`` is ``[n, m]`` and ``D`` is built with ``embedding_bag``
    without materialising ``[n, m, d]``.
    """

    def __init__(
        self,
        candidates: Tensor,
        n_concepts: int,
        *,
        delta: float = 1.0,
        support: int | None = None,
        use_multiplier: bool = True,
    ) -> None:
        super().__init__()
        n_c, d = candidates.shape
        self.delta = float(delta)
        self.use_multiplier = bool(use_multiplier)
        self.register_buffer("C", candidates.clone())
        width = n_c if support is None else min(int(support), n_c)
        self.support = None if support is None else width
        self.W = nn.Parameter(torch.zeros(n_concepts, width))
        self.Lambda = nn.Parameter(torch.zeros(n_concepts, d))
        self.log_scale = nn.Parameter(torch.zeros(()), requires_grad=self.use_multiplier)
        if support is not None:
            self.register_buffer("support_idx", torch.zeros(n_concepts, width, dtype=torch.int64))
        else:
            self.support_idx = None

    @torch.no_grad()
    def reset_(self, generator: torch.Generator | None = None, jitter: float = 0.1) -> None:
        """Atom ``i`` starts at candidate ``i mod n_candidates``; duplicates get a random jitter."""
        n, width = self.W.shape
        n_c = self.C.shape[0]
        start = torch.arange(n, device=self.C.device) % n_c
        self.W.zero_()
        self.Lambda.zero_()
        self.log_scale.zero_()
        if self.support_idx is not None:
            # nearest candidates (by cosine) of the starting candidate, itself first
            cn = F.normalize(self.C, dim=1)
            sims = cn[start] @ cn.T
            sims[torch.arange(n), start] = float("inf")
            self.support_idx.copy_(sims.topk(width, dim=1).indices)
            self.W[:, 0] = 1.0
        else:
            self.W[torch.arange(n), start] = 1.0
        if n > n_c:
            noise = torch.rand(n, width, generator=generator, device="cpu").to(self.W.device)
            noise = noise / noise.sum(1, keepdim=True)
            dup = torch.arange(n, device=self.W.device) >= n_c
            self.W[dup] = (1 - jitter) * self.W[dup] + jitter * noise[dup]

    def forward(self) -> Tensor:
        if self.support_idx is not None:
            mix = F.embedding_bag(self.support_idx, self.C, per_sample_weights=self.W, mode="sum")
        else:
            mix = self.W @ self.C
        return (mix + self.Lambda) * self.log_scale.exp()

    def remove_parallel_grad_(self) -> None:
        return None

    @torch.no_grad()
    def project_(self) -> None:
        w = F.relu(self.W)
        self.W.copy_(w / (w.sum(1, keepdim=True) + 1e-8))
        norms = self.Lambda.norm(dim=1, keepdim=True)
        self.Lambda.mul_(torch.clamp(self.delta / norms.clamp_min(1e-12), max=1.0))


# --------------------------------------------------------------------------------------------
# the autoencoder
# --------------------------------------------------------------------------------------------


@dataclass
class TrainOutput:
    """What one training forward pass returns (see :meth:`SparseAutoencoder.forward_train`)."""

    x_hat: Tensor  # [B, d]
    xc: Tensor  # [B, d] centred input (with graph to b_dec)
    pre: Tensor  # [B, n] pre-activations (graph only on the dense path)
    dictionary: Tensor  # [n, d]
    fired: Tensor  # [n] bool: latent active somewhere in the batch
    l0: Tensor  # scalar: mean active latents per sample
    codes: Tensor | None = None  # [B, n] dense codes (dense path)
    sel: Selection | None = None  # selected latents (sparse path)
    values: Tensor | None = None  # [nnz] activated values with graph (sparse path)


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder ``x -> z = act(W_enc (x - b_dec) + b_enc) -> z D + b_dec``.

    Parameters
    ----------
    d_in : int
        Input width ``d``.
    n_concepts : int
        Number of latents ``n``.
    activation : Activation
        Code rule (TopK, BatchTopK, JumpReLU, ReLU).
    dictionary : nn.Module, optional
        Returns ``D`` [n, d] when called; defaults to a unit-norm :class:`FreeDictionary`.
    sparse_backend : {"auto", "sparse", "dense"}
        Kernels for selecting activations: ``"auto"`` uses the CSR kernels when the device and
        dtype support them.

    Examples
    --------
    >>> import torch
    >>> m = SparseAutoencoder(8, 16, TopKActivation(2))
    >>> m.reset_parameters(torch.Generator().manual_seed(0))
    >>> m(torch.randn(4, 8)).shape
    torch.Size([4, 8])
    """

    def __init__(
        self,
        d_in: int,
        n_concepts: int,
        activation: Activation,
        dictionary: nn.Module | None = None,
        sparse_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_in = int(d_in)
        self.n_concepts = int(n_concepts)
        self.activation = activation
        self.dictionary = dictionary if dictionary is not None else FreeDictionary(n_concepts, d_in)
        self.sparse_backend = sparse_backend
        self.W_enc = nn.Parameter(torch.empty(n_concepts, d_in))
        self.b_enc = nn.Parameter(torch.zeros(n_concepts))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    # ---------------------------------------------------------------- init
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, init_dictionary: Tensor | None = None) -> None:
        """Random unit-norm atoms (or ``init_dictionary``), encoder = decoder transpose, zero biases."""
        if isinstance(self.dictionary, FreeDictionary):
            if init_dictionary is None:
                w = torch.randn(self.n_concepts, self.d_in, generator=generator)
            else:
                w = torch.as_tensor(init_dictionary, dtype=torch.float32).clone()
            w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self.dictionary.W_dec.copy_(w.to(self.dictionary.W_dec))
            self.W_enc.copy_(self.dictionary.W_dec)
        else:
            self.dictionary.reset_(generator)
            d = self.dictionary()
            self.W_enc.copy_(d / d.pow(2).sum(1, keepdim=True).clamp_min(1e-12))
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def tied_encoder(self) -> Tensor:
        """The encoder tied to the current dictionary, ``D_i / ||D_i||^2`` per row [n, d].

        For unit-norm atoms this is ``D`` itself (the matched filter, which is also how a free
        dictionary's encoder is initialised); in general a lone atom ``c * D_i`` encodes to ``c``.
        """
        d = self.dictionary().detach()
        if isinstance(self.dictionary, FreeDictionary) and self.dictionary.unit_norm:
            return d  # rows are kept at unit norm (projected after every step)
        return d / d.pow(2).sum(1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def decay_encoder_(self, rate: float) -> None:
        """Pull the encoder toward the tied encoder: ``W_enc += rate * (tied_encoder() - W_enc)``.

        ``rate`` is clipped to [0, 1]; ``rate = 1`` ties the encoder exactly. Used after every
        optimiser step with ``rate = lr * encoder_decay * sqrt(d_in)`` (see :class:`sae.TopKSAE`).

        Examples
        --------
        >>> import torch
        >>> m = SparseAutoencoder(8, 16, TopKActivation(2))
        >>> m.reset_parameters(torch.Generator().manual_seed(0))
        >>> with torch.no_grad():
        ...     _ = m.W_enc.mul_(3.0)
        >>> m.decay_encoder_(1.0)
        >>> torch.allclose(m.W_enc, m.get_dictionary(), atol=1e-6)
        True
        """
        rate = min(max(float(rate), 0.0), 1.0)
        if rate > 0.0:
            self.W_enc.lerp_(self.tied_encoder().to(self.W_enc.dtype), rate)

    # ---------------------------------------------------------------- helpers
    def use_sparse(self) -> bool:
        """Whether selecting activations run through the sparse kernels (``sparse_backend``)."""
        return self.sparse_backend != "dense"

    def get_dictionary(self) -> Tensor:
        """The dictionary ``D`` [n, d]."""
        return self.dictionary()

    def pre_activations(self, x: Tensor) -> Tensor:
        """``(x - b_dec) @ W_enc.T + b_enc`` [B, n]."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t())

    # ---------------------------------------------------------------- inference
    def encode(self, x: Tensor) -> Tensor:
        """Dense codes [B, n]."""
        return self.activation.dense(self.pre_activations(x))

    @torch.no_grad()
    def encode_sparse(self, x: Tensor) -> SparseCodes:
        """Codes as padded (indices, values) [B, m] without materialising [B, n] codes."""
        pre = self.pre_activations(x)
        sel, raw = self.activation.select(pre)
        values = self._activate_selected(raw)
        keep = values != 0
        if not bool(keep.all()):
            sel, values = sel.subset(keep), values[keep]
        return to_padded(sel, values)

    def _activate_selected(self, raw: Tensor) -> Tensor:
        if isinstance(self.activation, JumpReLUActivation):
            return raw  # selection already applied the threshold
        return F.relu(raw)

    def decode(self, codes: Tensor) -> Tensor:
        """``codes @ D + b_dec`` [B, d]."""
        return codes @ self.dictionary() + self.b_dec

    def decode_sparse(self, codes: SparseCodes) -> Tensor:
        """Decode padded sparse codes [B, m] without materialising [B, n]."""
        d = self.dictionary()
        return F.embedding_bag(codes.indices, d, per_sample_weights=codes.values.to(d.dtype), mode="sum") + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``x_hat`` [B, d]."""
        if not self.training:
            with torch.no_grad():
                return self.decode_sparse(self.encode_sparse(x))
        return self.forward_train(x).x_hat

    # ---------------------------------------------------------------- training
    def selected_values(self, xc: Tensor, sel: Selection, raw: Tensor) -> Tensor:
        """Activated values of a selection, with a sparse backward pass to the encoder."""
        v = selected_pre_activations(xc, self.W_enc, self.b_enc, sel, raw, use_sparse=self.use_sparse())
        return F.relu(v)

    def decode_selection(self, values: Tensor, sel: Selection, dictionary: Tensor) -> Tensor:
        """``Z @ D`` for sparse codes ``Z`` given as a selection and its values (no bias)."""
        return sparse_decode(values, sel, dictionary, use_sparse=self.use_sparse())

    def forward_train(self, x: Tensor) -> TrainOutput:
        """Training forward pass (sparse kernels for selecting activations)."""
        xc = x - self.b_dec
        d = self.dictionary()
        b = x.shape[0]
        if self.activation.selects:
            with torch.no_grad():
                pre = torch.addmm(self.b_enc, xc, self.W_enc.t())
                sel, raw = self.activation.select(pre)
            values = self.selected_values(xc, sel, raw)
            x_hat = self.decode_selection(values, sel, d) + self.b_dec
            active = values.detach() > 0
            fired = torch.zeros(self.n_concepts, dtype=torch.bool, device=x.device)
            fired[sel.col[active]] = True
            l0 = active.sum().to(torch.float32) / max(b, 1)
            return TrainOutput(x_hat, xc, pre, d, fired, l0, None, sel, values)
        pre = torch.addmm(self.b_enc, xc, self.W_enc.t())
        codes = self.activation.dense(pre)
        x_hat = codes.to(d.dtype) @ d + self.b_dec
        active = codes.detach() > 0
        return TrainOutput(x_hat, xc, pre, d, active.any(0), active.sum(1).float().mean(), codes)

    # ---------------------------------------------------------------- folding
    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make a model trained on ``scale * x`` act on raw ``x`` (codes are divided by ``scale``)."""
        self.b_dec.div_(scale)
        self.b_enc.div_(scale)
        self.activation.scale_thresholds_(1.0 / scale)

    @torch.no_grad()
    def fold_decoder_norms_(self) -> None:
        """Scale codes by the atom norms so every atom has unit norm (free dictionaries)."""
        if not isinstance(self.dictionary, FreeDictionary):
            return
        norms = self.dictionary.W_dec.norm(dim=1).clamp_min(1e-12)
        self.dictionary.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[:, None])
        self.b_enc.mul_(norms)
        self.activation.scale_thresholds_(norms)


class LowRankAutoencoder(SparseAutoencoder):
    """Structured SAE module: sparse codes plus a dense low-rank latent component.

    ``s = act(pre)`` is the sparse part; the low-rank part of the batch latent matrix is
    ``R = U V`` with ``U = (x - b_dec) P`` [B, r] and ``V`` [r, n]. The reconstruction is
    ``(s + R) D + b_dec``. ``encode`` returns ``s``; :meth:`lowrank` returns ``R``.
    """

    def __init__(self, d_in: int, n_concepts: int, activation: Activation, rank: int, **kw) -> None:
        super().__init__(d_in, n_concepts, activation, **kw)
        self.rank = int(rank)
        self.P = nn.Parameter(torch.zeros(d_in, rank))
        self.V = nn.Parameter(torch.zeros(rank, n_concepts))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None, init_dictionary: Tensor | None = None) -> None:
        super().reset_parameters(generator, init_dictionary)
        p = torch.randn(self.d_in, self.rank, generator=generator) / math.sqrt(self.d_in)
        self.P.copy_(p.to(self.P))
        v = torch.randn(self.rank, self.n_concepts, generator=generator) * 1e-3
        self.V.copy_(v.to(self.V))

    def lowrank_factors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(U [B, r], V [r, n])``."""
        return (x - self.b_dec) @ self.P, self.V

    def lowrank(self, x: Tensor) -> Tensor:
        """Dense low-rank latent component ``R = U V`` [B, n]."""
        u, v = self.lowrank_factors(x)
        return u @ v

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            with torch.no_grad():
                return self.decode(self.encode(x) + self.lowrank(x))
        return self.forward_train(x).x_hat

    def forward_train(self, x: Tensor) -> TrainOutput:
        out = super().forward_train(x)
        u = out.xc @ self.P
        out.x_hat = out.x_hat + (u @ self.V) @ out.dictionary
        return out
