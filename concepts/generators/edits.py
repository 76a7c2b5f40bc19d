"""Activation edits for steering and inference-time erasure, usable as generator hooks.

Every edit is an ``x -> x + delta`` map on a layer's output, computed so that a no-op edit
(zero vector, strength 0, clamping SAE features to their current values, an empty feature
list) gives ``delta == 0`` exactly and therefore returns the unedited output bit for bit.

* :class:`AddVector` -- ``x + strength * v`` (steering).
* :class:`ProjectOut` -- ``x - strength * P x`` with ``P`` the orthogonal projector on one
  direction or a subspace (linear erasure of a direction).
* :class:`ClampFeatures` -- clamp sparse-autoencoder features while keeping the SAE's
  reconstruction error: ``x' = x - dec(enc(x)) + dec(clamped(enc(x)))``, evaluated as
  ``x + (dec(clamped(z)) - dec(z))``. Works with any object with ``encode``/``decode`` or
  scikit-learn-style ``transform``/``inverse_transform`` on torch tensors (``sae.TopKSAE`` ...).
* :class:`FunctionEdit` -- any ``fn(x) -> x'`` with the same restrictions.

Restrictions (all edits): ``rows="cond" | "uncond" | "all"`` (classifier-free-guidance branch,
resolved per call with the generator's row order), ``steps`` (denoising / autoregressive steps:
an int, a range, a slice, a sequence or a predicate), ``tokens`` (autoregressive image-token
indices), ``phases`` (``"denoise"``, ``"prefill"``,
``"token"``, ...). Features live on ``dim`` (-1 for transformer tokens [rows, seq, d], 1 for
convolutional maps [rows, C, H, W]).

Edits are called by :meth:`Generator.run_with_hooks` with a :class:`~concepts.generators.base.CallContext`;
without one (e.g. in :func:`concepts.hooks.intervene`) only unrestricted edits work.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from concepts.generators.base import PHASES, CallContext

__all__ = ["AddVector", "ClampFeatures", "Edit", "FunctionEdit", "ProjectOut", "sae_functions"]

StepSpec = int | range | slice | Sequence[int] | Callable[[int], bool] | None


def _step_matcher(steps: StepSpec) -> Callable[[int | None], bool] | None:
    if steps is None:
        return None
    if callable(steps) and not isinstance(steps, (range, slice)):
        return lambda s: s is not None and bool(steps(s))
    if isinstance(steps, bool):
        raise TypeError("steps must be an int, range, slice, sequence of ints or a predicate, got bool.")
    if isinstance(steps, numbers.Integral):
        target = int(steps)
        return lambda s: s == target
    if isinstance(steps, slice):
        start = 0 if steps.start is None else int(steps.start)
        stop = steps.stop
        stride = 1 if steps.step is None else int(steps.step)
        if stride <= 0:
            raise ValueError(f"steps slice must have a positive step, got {steps.step}.")
        return lambda s: s is not None and s >= start and (stop is None or s < stop) and (s - start) % stride == 0
    if isinstance(steps, (range, Sequence, np.ndarray)) and not isinstance(steps, str):
        allowed = set()
        for v in steps:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"steps must contain ints, got {v!r} ({type(v).__name__}).")
            allowed.add(int(v))
        return lambda s: s in allowed
    raise TypeError(
        f"steps must be None, an int, a range, a slice, a sequence of ints or a predicate, got {type(steps).__name__}."
    )


class Edit:
    """Base class of activation edits (``x -> x + delta``) with call restrictions.

    Parameters
    ----------
    rows : {"all", "cond", "uncond"}, default "all"
        Which classifier-free-guidance rows to edit.
    steps : int, range, slice, sequence of int, callable or None
        Denoising / autoregressive steps to edit (None: all).
    tokens : int, range, slice, sequence of int, callable or None
        Autoregressive generators: edit the calls whose first predicted image token
        (``ctx.token_offset``) is in ``tokens`` (raster AR: the same as ``steps``; the prefill
        call predicts token 0). Not valid for diffusion calls.
    phases : str or sequence of str, optional
        Phases to edit (``"encode"``, ``"denoise"``, ``"prefill"``, ``"token"``, ``"decode"``).
    dim : int, default -1
        Feature dimension of the layer output (1 for conv maps [rows, C, H, W]).

    Notes
    -----
    Subclasses implement :meth:`delta` on the selected rows; the edit returns ``x + delta``.

    Examples
    --------
    >>> import torch
    >>> class Double(Edit):
    ...     def delta(self, x, ctx):
    ...         return x
    >>> Double()(torch.ones(2, 3)).tolist()[0]
    [2.0, 2.0, 2.0]
    """

    wants_context = True

    def __init__(
        self,
        *,
        rows: str = "all",
        steps: StepSpec = None,
        tokens: StepSpec = None,
        phases: str | Sequence[str] | None = None,
        dim: int = -1,
    ) -> None:
        if rows not in ("all", "cond", "uncond"):
            raise ValueError(f"rows must be 'all', 'cond' or 'uncond', got {rows!r}.")
        if isinstance(phases, str):
            phases = (phases,)
        if phases is not None:
            phases = tuple(phases)
            bad = [p for p in phases if p not in PHASES]
            if bad:
                raise ValueError(f"Unknown phase(s) {bad}: expected a subset of {list(PHASES)}.")
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"dim must be an int, got {type(dim).__name__}.")
        self.rows = rows
        self.steps = steps
        self.tokens = tokens
        self.phases = phases
        self.dim = int(dim)
        self._match_step = _step_matcher(steps)
        self._match_token = _step_matcher(tokens)

    # -- to implement ---------------------------------------------------------------------------
    def delta(self, x: Tensor, ctx: CallContext | None) -> Tensor:  # pragma: no cover - abstract
        """The change to add to the selected rows ``x`` (same shape as ``x``)."""
        raise NotImplementedError

    # -- machinery ----------------------------------------------------------------------------
    def active(self, ctx: CallContext | None) -> bool:
        """Whether the edit applies to a call (phase and step restrictions).

        Raises
        ------
        ValueError
            When the edit is restricted but no call context is available.
        """
        if ctx is None:
            if self.rows != "all" or self._match_step is not None or self._match_token is not None or (
                self.phases is not None
            ):
                raise ValueError(
                    f"{type(self).__name__} is restricted (rows={self.rows!r}, steps={self.steps!r}, "
                    f"tokens={self.tokens!r}, phases={self.phases!r}) but was called without a CallContext. "
                    "Use it through Generator.run_with_hooks / run_with_cache, or drop the restrictions."
                )
            return True
        if self.phases is not None and ctx.phase not in self.phases:
            return False
        if self._match_step is not None and not self._match_step(ctx.step):
            return False
        if self._match_token is not None:
            if ctx.phase == "denoise":
                raise ValueError(
                    f"tokens={self.tokens!r} restricts autoregressive image tokens, but layer {ctx.layer!r} is "
                    "called by a diffusion denoiser; restrict denoising steps with steps=... instead."
                )
            if ctx.phase not in ("prefill", "token") or not self._match_token(ctx.token_offset):
                return False
        return True

    def _feature_dim(self, x: Tensor) -> int:
        if x.dim() == 0:
            raise ValueError(f"{type(self).__name__} needs a layer output with a feature dimension, got a scalar.")
        d = self.dim if self.dim >= 0 else x.dim() + self.dim
        if not 0 <= d < x.dim():
            raise ValueError(
                f"dim={self.dim} is out of range for a layer output of shape {tuple(x.shape)}; use -1 for "
                "token features [rows, seq, d] or 1 for conv maps [rows, C, H, W]."
            )
        return d

    def __call__(self, x: Tensor, ctx: CallContext | None = None) -> Tensor | None:
        if not self.active(ctx):
            return None
        idx = None if ctx is None else ctx.row_index(self.rows)
        if idx is None:
            return x + self.delta(x, ctx).to(dtype=x.dtype, device=x.device)
        if idx.numel() == 0:
            return None
        idx = idx.to(x.device)
        sub = x.index_select(0, idx)
        out = x.clone()
        out[idx] = sub + self.delta(sub, ctx).to(dtype=x.dtype, device=x.device)
        return out

    def _restr_repr(self) -> str:
        parts = []
        if self.rows != "all":
            parts.append(f"rows={self.rows!r}")
        if self.steps is not None:
            parts.append(f"steps={self.steps!r}")
        if self.tokens is not None:
            parts.append(f"tokens={self.tokens!r}")
        if self.phases is not None:
            parts.append(f"phases={self.phases!r}")
        if self.dim != -1:
            parts.append(f"dim={self.dim}")
        return ", ".join(parts)


def _as_vector(v: Any, name: str) -> Tensor:
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(v).__name__}.")
    if not v.is_floating_point():
        v = v.float()
    return v


def _broadcast_shape(x: Tensor, d: int, size: int) -> list[int]:
    shape = [1] * x.dim()
    shape[d] = size
    return shape


class AddVector(Edit):
    """Steering: add ``strength * vector`` along the feature dimension.

    Parameters
    ----------
    vector : Tensor
        [d] the direction (e.g. an SAE decoder atom, a concept-bank vector).
    strength : float, default 1.0
        Multiplier (negative values subtract).
    normalize : bool, default False
        Scale ``vector`` to unit L2 norm first.
    rows, steps, tokens, phases, dim
        See :class:`Edit`.

    Examples
    --------
    >>> import torch
    >>> AddVector(torch.tensor([1.0, 0.0]), strength=2.0)(torch.zeros(1, 2)).tolist()
    [[2.0, 0.0]]
    """

    def __init__(
        self,
        vector: Tensor,
        strength: float = 1.0,
        *,
        normalize: bool = False,
        rows: str = "all",
        steps: StepSpec = None,
        tokens: StepSpec = None,
        phases: str | Sequence[str] | None = None,
        dim: int = -1,
    ) -> None:
        super().__init__(rows=rows, steps=steps, tokens=tokens, phases=phases, dim=dim)
        v = _as_vector(vector, "vector")
        if v.dim() != 1:
            raise ValueError(f"vector must be 1-D [d], got shape {tuple(v.shape)}.")
        if not isinstance(strength, numbers.Real):
            raise TypeError(f"strength must be a real number, got {type(strength).__name__}.")
        if normalize:
            norm = v.norm()
            if float(norm) == 0.0:
                raise ValueError("Cannot normalize a zero vector; pass normalize=False or a non-zero vector.")
            v = v / norm
        self.vector = v
        self.strength = float(strength)
        self.normalize = normalize

    def delta(self, x: Tensor, ctx: CallContext | None) -> Tensor:
        d = self._feature_dim(x)
        if x.shape[d] != self.vector.shape[0]:
            raise ValueError(
                f"vector has {self.vector.shape[0]} features, but the layer output has {x.shape[d]} features "
                f"along dim {self.dim} (shape {tuple(x.shape)}). Pass a vector of the layer's width, or set dim."
            )
        v = self.vector.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
        return (self.strength * v).reshape(_broadcast_shape(x, d, v.shape[0])).expand_as(x)

    def __repr__(self) -> str:
        extra = self._restr_repr()
        return f"AddVector(d={self.vector.shape[0]}, strength={self.strength}{', ' + extra if extra else ''})"


class ProjectOut(Edit):
    """Remove the component of the features along a direction or subspace.

    ``x' = x - strength * P x`` with ``P = Q Q^T`` the orthogonal projector on the span of
    ``directions`` (``Q`` from a QR decomposition). ``strength=1`` removes the component,
    ``0`` is the identity, ``2`` reflects it.

    Parameters
    ----------
    directions : Tensor
        [d] one direction or [k, d] k directions spanning the subspace.
    strength : float, default 1.0
    rows, steps, tokens, phases, dim
        See :class:`Edit`.

    Examples
    --------
    >>> import torch
    >>> ProjectOut(torch.tensor([1.0, 0.0]))(torch.tensor([[2.0, 3.0]])).tolist()
    [[0.0, 3.0]]
    """

    def __init__(
        self,
        directions: Tensor,
        strength: float = 1.0,
        *,
        rows: str = "all",
        steps: StepSpec = None,
        tokens: StepSpec = None,
        phases: str | Sequence[str] | None = None,
        dim: int = -1,
    ) -> None:
        super().__init__(rows=rows, steps=steps, tokens=tokens, phases=phases, dim=dim)
        u = _as_vector(directions, "directions")
        if u.dim() == 1:
            u = u[None]
        if u.dim() != 2 or u.shape[0] == 0:
            raise ValueError(f"directions must be [d] or [k, d] with k >= 1, got shape {tuple(u.shape)}.")
        if not isinstance(strength, numbers.Real):
            raise TypeError(f"strength must be a real number, got {type(strength).__name__}.")
        q, r = torch.linalg.qr(u.double().T)  # [d, k]
        keep = r.diagonal().abs() > 1e-10 * max(1.0, float(r.abs().max()))
        if not bool(keep.any()):
            raise ValueError("directions are all zero: pass at least one non-zero direction.")
        self.basis = q[:, keep].T.contiguous()  # [k', d] orthonormal rows (float64)
        self.strength = float(strength)

    def delta(self, x: Tensor, ctx: CallContext | None) -> Tensor:
        d = self._feature_dim(x)
        if x.shape[d] != self.basis.shape[1]:
            raise ValueError(
                f"directions have {self.basis.shape[1]} features, but the layer output has {x.shape[d]} "
                f"features along dim {self.dim} (shape {tuple(x.shape)})."
            )
        ct = torch.promote_types(x.dtype, torch.float32)
        xm = x.movedim(d, -1).to(ct)
        q = self.basis.to(device=x.device, dtype=ct)
        proj = (xm @ q.T) @ q
        return (-self.strength * proj).movedim(-1, d)

    def __repr__(self) -> str:
        extra = self._restr_repr()
        return f"ProjectOut(k={self.basis.shape[0]}, strength={self.strength}{', ' + extra if extra else ''})"


def sae_functions(sae: Any) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """``(encode, decode)`` callables of a sparse autoencoder.

    Parameters
    ----------
    sae : object
        Anything with ``encode``/``decode`` or ``transform``/``inverse_transform`` methods
        mapping torch tensors [n, d] <-> codes [n, k] (numpy outputs are converted).

    Returns
    -------
    encode, decode : callable

    Raises
    ------
    TypeError
        If the object offers neither pair of methods.

    Examples
    --------
    >>> import torch
    >>> class Identity:
    ...     def transform(self, x): return x
    ...     def inverse_transform(self, z): return z
    >>> enc, dec = sae_functions(Identity())
    >>> dec(enc(torch.ones(1, 2))).tolist()
    [[1.0, 1.0]]
    """
    if callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None)):
        enc, dec = sae.encode, sae.decode
    elif callable(getattr(sae, "transform", None)) and callable(getattr(sae, "inverse_transform", None)):
        enc, dec = sae.transform, sae.inverse_transform
    else:
        raise TypeError(
            f"{type(sae).__name__} is not usable as a sparse autoencoder: expected encode/decode or "
            "transform/inverse_transform methods (e.g. sae.TopKSAE)."
        )

    def _tensor(fn: Callable[[Any], Any]) -> Callable[[Tensor], Tensor]:
        def call(x: Tensor) -> Tensor:
            out = fn(x)
            if isinstance(out, tuple):  # some SAEs return (codes, extras)
                out = out[0]
            if isinstance(out, np.ndarray):
                out = torch.from_numpy(out)
            if not isinstance(out, Tensor):
                raise TypeError(f"The SAE returned {type(out).__name__}; expected a torch.Tensor or numpy array.")
            return out

        return call

    return _tensor(enc), _tensor(dec)


def _sae_device_dtype(sae: Any) -> tuple[torch.device | None, torch.dtype | None]:
    params = getattr(sae, "parameters", None)
    if callable(params):
        try:
            p = next(iter(params()))
            return p.device, p.dtype
        except (StopIteration, TypeError):
            pass
    for name in ("module_", "model_", "module"):
        sub = getattr(sae, name, None)
        if isinstance(sub, torch.nn.Module):
            try:
                p = next(iter(sub.parameters()))
                return p.device, p.dtype
            except StopIteration:
                pass
    dev = getattr(sae, "device", None)
    dt = getattr(sae, "dtype", None)
    return (torch.device(dev) if isinstance(dev, (str, torch.device)) else None,
            dt if isinstance(dt, torch.dtype) else None)


_MODES = ("set", "scale", "add", "cap", "floor")


class ClampFeatures(Edit):
    """Clamp SAE features at inference, keeping the SAE's reconstruction error.

    With ``z = enc(x)`` and ``z_c`` the clamped codes, the output is
    ``x' = x - dec(z) + dec(z_c)``, computed as ``x + (dec(z_c) - dec(z))`` so that
    ``z_c == z`` returns ``x`` exactly (whatever the SAE's reconstruction error is).

    Parameters
    ----------
    sae : object
        Sparse autoencoder with ``encode``/``decode`` or ``transform``/``inverse_transform``
        (torch tensors [n, d] <-> [n, k]); input normalisation is the SAE's business.
    features : int or sequence of int
        Feature (concept) indices to clamp.
    value : float, Tensor or callable, default 0.0
        The clamp value(s): a number, a [len(features)] tensor, or ``fn(z_sel) -> Tensor``
        receiving the selected codes [n, len(features)].
    mode : {"set", "scale", "add", "cap", "floor"}, default "set"
        ``set``: z = value; ``scale``: z = z * value (SAeUron-style negative multipliers);
        ``add``: z = z + value; ``cap``: z = min(z, value); ``floor``: z = max(z, value).
    only_active : bool, default False
        Change a feature only where it fires (z > 0).
    rows, steps, tokens, phases, dim
        See :class:`Edit`.

    Examples
    --------
    >>> import torch
    >>> class Lin:  # a 2-feature "SAE" that reconstructs only the first coordinate
    ...     W = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    ...     def encode(self, x): return x @ self.W.T
    ...     def decode(self, z): return z @ self.W
    >>> x = torch.tensor([[1.0, 2.0, 3.0]])
    >>> ClampFeatures(Lin(), [0], value=5.0)(x).tolist()  # feature 0 set to 5, error (0, 2, 3) kept
    [[5.0, 2.0, 3.0]]
    """

    def __init__(
        self,
        sae: Any,
        features: int | Sequence[int],
        value: float | Tensor | Callable[[Tensor], Tensor] = 0.0,
        *,
        mode: str = "set",
        only_active: bool = False,
        rows: str = "all",
        steps: StepSpec = None,
        tokens: StepSpec = None,
        phases: str | Sequence[str] | None = None,
        dim: int = -1,
    ) -> None:
        super().__init__(rows=rows, steps=steps, tokens=tokens, phases=phases, dim=dim)
        self._encode, self._decode = sae_functions(sae)
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}.")
        if isinstance(features, numbers.Integral) and not isinstance(features, bool):
            feats = [int(features)]
        elif isinstance(features, (Sequence, np.ndarray, Tensor)) and not isinstance(features, str):
            feats = []
            for f in (features.tolist() if hasattr(features, "tolist") else features):
                if isinstance(f, bool) or not isinstance(f, numbers.Integral) or int(f) < 0:
                    raise ValueError(f"features must be non-negative feature indices, got {f!r}.")
                feats.append(int(f))
        else:
            raise TypeError(f"features must be an int or a sequence of ints, got {type(features).__name__}.")
        if not (callable(value) or isinstance(value, (numbers.Real, Tensor, np.ndarray))):
            raise TypeError(
                f"value must be a number, a tensor [n_features] or a callable, got {type(value).__name__}."
            )
        if isinstance(value, (Tensor, np.ndarray)):
            value = torch.as_tensor(value)
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != len(feats)):
                raise ValueError(
                    f"value has shape {tuple(value.shape)}; expected a scalar or one value per feature ({len(feats)})."
                )
        self.sae = sae
        self.features = feats
        self.value = value
        self.mode = mode
        self.only_active = bool(only_active)
        self._device, self._dtype = _sae_device_dtype(sae)

    def _clamped(self, sel: Tensor) -> Tensor:
        v = self.value(sel) if callable(self.value) and not isinstance(self.value, Tensor) else self.value
        v = torch.as_tensor(v, dtype=sel.dtype, device=sel.device)
        if self.mode == "set":
            new = v.expand_as(sel).clone()
        elif self.mode == "scale":
            new = sel * v
        elif self.mode == "add":
            new = sel + v
        elif self.mode == "cap":
            new = torch.minimum(sel, v.expand_as(sel))
        else:
            new = torch.maximum(sel, v.expand_as(sel))
        if self.only_active:
            new = torch.where(sel > 0, new, sel)
        return new

    def delta(self, x: Tensor, ctx: CallContext | None) -> Tensor:
        d = self._feature_dim(x)
        moved = x.movedim(d, -1)
        shape = moved.shape
        flat = moved.reshape(-1, shape[-1])
        dtype = self._dtype or (torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
        flat = flat.to(device=self._device or x.device, dtype=dtype)
        z = self._encode(flat)
        if z.dim() != 2 or z.shape[0] != flat.shape[0]:
            raise ValueError(
                f"The SAE encoded [{flat.shape[0]}, {flat.shape[1]}] inputs into codes of shape {tuple(z.shape)}; "
                "expected [n, n_concepts]."
            )
        bad = [f for f in self.features if f >= z.shape[1]]
        if bad:
            raise ValueError(f"features {bad} are out of range: the SAE has {z.shape[1]} features.")
        if not self.features:
            return torch.zeros_like(x)
        idx = torch.tensor(self.features, device=z.device)
        zc = z.clone()
        zc[:, idx] = self._clamped(z.index_select(1, idx)).to(z.dtype)
        change = self._decode(zc) - self._decode(z)
        if change.shape != flat.shape:
            raise ValueError(
                f"The SAE decoded codes into shape {tuple(change.shape)}; expected {tuple(flat.shape)} (the layer width)."
            )
        return change.to(device=x.device, dtype=x.dtype).reshape(shape).movedim(-1, d)

    def __repr__(self) -> str:
        extra = self._restr_repr()
        return (
            f"ClampFeatures(features={self.features}, mode={self.mode!r}, "
            f"value={'<fn>' if callable(self.value) and not isinstance(self.value, Tensor) else self.value}"
            f"{', ' + extra if extra else ''})"
        )


class FunctionEdit(Edit):
    """Any ``fn(x) -> x'`` on the selected rows, with the :class:`Edit` restrictions.

    Parameters
    ----------
    fn : callable
        ``fn(x_selected) -> Tensor`` of the same shape (``fn(x, ctx)`` if it has a ``ctx`` parameter).
    rows, steps, tokens, phases, dim
        See :class:`Edit`.

    Examples
    --------
    >>> import torch
    >>> FunctionEdit(lambda x: 2 * x)(torch.ones(1, 2)).tolist()
    [[2.0, 2.0]]
    """

    def __init__(
        self,
        fn: Callable[..., Tensor],
        *,
        rows: str = "all",
        steps: StepSpec = None,
        tokens: StepSpec = None,
        phases: str | Sequence[str] | None = None,
        dim: int = -1,
    ) -> None:
        super().__init__(rows=rows, steps=steps, tokens=tokens, phases=phases, dim=dim)
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
        from concepts.generators.base import _wants_ctx

        self.fn = fn
        self._fn_ctx = _wants_ctx(fn)

    def __call__(self, x: Tensor, ctx: CallContext | None = None) -> Tensor | None:
        # replace instead of x + (fn(x) - x), which is not exact in floating point
        if not self.active(ctx):
            return None
        idx = None if ctx is None else ctx.row_index(self.rows)
        if idx is None:
            return self._replace(x, ctx)
        if idx.numel() == 0:
            return None
        idx = idx.to(x.device)
        out = x.clone()
        out[idx] = self._replace(x.index_select(0, idx), ctx).to(x.dtype)
        return out

    def _replace(self, x: Tensor, ctx: CallContext | None) -> Tensor:
        new = self.fn(x, ctx=ctx) if self._fn_ctx else self.fn(x)
        if not isinstance(new, Tensor) or new.shape != x.shape:
            raise ValueError(
                f"FunctionEdit's fn must return a tensor of shape {tuple(x.shape)}, got "
                f"{tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__}."
            )
        return new
