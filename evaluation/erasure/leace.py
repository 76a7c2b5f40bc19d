"""Closed-form linear concept erasure: LEACE and the orthogonal-projection variant.

LEACE (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed form") finds the affine map
``x' = x - W^+ U U^T W (x - mu)`` that makes the cross-covariance between the features ``x`` and the concept
``z`` vanish -- so that **no linear classifier** can predict ``z`` from ``x'`` better than a constant -- while
moving ``x`` as little as possible in the whitened least-squares sense. Here ``W = Sigma_xx^{-1/2}`` is the
whitening matrix (pseudo-inverse square root), ``U`` the left singular vectors of ``W Sigma_xz`` with singular
value above ``svd_tol`` and ``mu`` the mean of ``x`` (``affine=True`` keeps the mean of ``x`` unchanged).
The edit ``I - P`` has rank at most ``rank(Sigma_xz) <= k - 1`` for ``k`` one-hot classes, and ``P`` is
idempotent (an oblique projection).

``method="orth"`` replaces ``W`` by the identity: ``x' = x - U U^T (x - mu)`` with ``U`` an orthonormal basis
of the column space of ``Sigma_xz`` -- the orthogonal projection that erases the same linear information with a
larger (Euclidean-orthogonal) change.

Two pieces:

* :class:`LeaceFitter` -- a scikit-learn style estimator that accumulates the first and second moments of
  ``(x, z)`` batch by batch (``partial_fit``; Chan et al.'s pairwise update, numerically stable), so it can
  stream an :class:`~concepts.store.ActivationStore` or per-token generator activations; ``eraser_`` is
  computed from the moments on demand;
* :class:`LeaceEraser` -- the immutable result (a frozen dataclass holding ``proj_left [d, r]``,
  ``proj_right [r, d]`` and ``bias [d]``), callable on any tensor whose feature dimension is ``dim``, so it
  plugs straight into :func:`concepts.hooks.intervene` at any layer of any model (``eraser.hook(dim=1)`` for
  convolutional maps), and saved as one safetensors file.

Choices (documented differences from the reference implementation ``concept-erasure`` 0.2.4)
----------------------------------------------------------------------------------------------
* ``shrinkage=True`` (default, as the reference) estimates ``Sigma_xx`` with the optimal linear shrinkage of
  Bodnar, Gupta & Parolya (2014) toward ``tr(S)/p * I``; with ``shrinkage=False`` the unbiased estimate is used.
* ``constrain_cov_trace=True`` (default, as the reference): never let the erased features' total variance
  ``tr(P Sigma P^T)`` exceed ``tr(Sigma)``, mixing toward the orthogonal projection if it would. With the same
  ``Sigma`` used for whitening, ``tr(P Sigma P^T) = tr(Sigma) - ||W^+ U||_F^2``, so the guard only fires on
  round-off; it is kept for parity. When it fires, the orthogonal projection used here shares the kernel of the
  LEACE map (``span(Sigma_xz)``), so the mixture is still an idempotent eraser with ``P Sigma_xz = 0`` and rank
  ``<= k - 1`` (the reference mixes with ``I - U U^T`` built from the *whitened* singular vectors, which does not
  annihilate ``Sigma_xz`` in general).
* Singular vectors below ``svd_tol`` are dropped (not zeroed), so ``proj_left`` has exactly ``rank`` columns.

Examples
--------
>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> y = torch.randint(0, 2, (500,), generator=g)
>>> X = torch.randn(500, 8, generator=g) + 2.0 * y[:, None] * torch.tensor([1.0] + [0.0] * 7)
>>> eraser = LeaceFitter().fit(X, y).eraser_
>>> Xe = eraser(X)
>>> bool((Xe[y == 1].mean(0) - Xe[y == 0].mean(0)).abs().max() < 1e-5), eraser.rank
(True, 1)
"""
from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import Tensor

from concepts.devices import resolve_device, resolve_dtype

__all__ = ["LeaceEraser", "LeaceFitter", "METHODS", "optimal_linear_shrinkage"]

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("leace", "orth")
"""Erasure methods: ``"leace"`` (whitened, least-squares optimal) and ``"orth"`` (orthogonal projection)."""

_FORMAT = "conceptkit.erasure.leace"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def optimal_linear_shrinkage(S: Tensor, n: int) -> Tensor:
    """Optimal linear shrinkage of a sample covariance toward a scaled identity.

    Returns ``m I + a (S - m I)`` with ``m = tr(S) / p`` and
    ``a = 1 - tr(S)^2 / (n (||S||_F^2 - tr(S)^2 / p))`` (Bodnar, Gupta & Parolya 2014, "On the strong
    convergence of the optimal linear shrinkage estimator for large dimensional covariance matrix"; the
    estimator used by LEACE's reference code). An already isotropic ``S`` is returned unchanged.

    Parameters
    ----------
    S : Tensor
        [p, p] biased sample covariance (co-moment divided by ``n``).
    n : int
        Number of samples.

    Returns
    -------
    Tensor
        [p, p] shrunk covariance.

    Examples
    --------
    >>> import torch
    >>> S = torch.diag(torch.tensor([2.0, 0.0]))
    >>> optimal_linear_shrinkage(S, n=4).diagonal().tolist()
    [1.5, 0.5]
    """
    p = S.shape[-1]
    m = torch.trace(S) / p
    eye = torch.eye(p, dtype=S.dtype, device=S.device)
    spread = (S * S).sum() - torch.trace(S) ** 2 / p  # ||S - m I||_F^2
    if float(spread) <= float(torch.finfo(S.dtype).eps) * max(1.0, float((S * S).sum())):
        return S.clone()
    a = 1.0 - torch.trace(S) ** 2 / (n * spread)
    return m * eye + a * (S - m * eye)


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, np.ndarray) or hasattr(x, "to_numpy"):
        arr = x.to_numpy() if hasattr(x, "to_numpy") else x
        return torch.as_tensor(np.asarray(arr))
    if isinstance(x, (list, tuple)):
        return torch.as_tensor(np.asarray(x))
    raise TypeError(f"{name} must be a torch.Tensor, a numpy array or a pandas object, got {type(x).__name__}.")


def _move_dim(x: Tensor, dim: int) -> tuple[Tensor, int]:
    if x.dim() == 0:
        raise ValueError("the eraser needs an input with a feature dimension, got a scalar tensor.")
    d = dim if dim >= 0 else x.dim() + dim
    if not 0 <= d < x.dim():
        raise ValueError(
            f"dim={dim} is out of range for an input of shape {tuple(x.shape)}; use -1 for features on the last "
            "dimension ([n, d] or [rows, tokens, d]) or 1 for convolutional maps [rows, C, H, W]."
        )
    return x.movedim(d, -1), d


# ---------------------------------------------------------------------------------------------
# the eraser
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeaceEraser:
    """An affine concept eraser ``x' = x - (x - bias) proj_right^T proj_left^T`` (immutable).

    ``I - proj_left @ proj_right`` is the projection matrix ``P``; ``rank = proj_left.shape[1]``.

    Parameters
    ----------
    proj_left : Tensor
        [d, r].
    proj_right : Tensor
        [r, d].
    bias : Tensor or None
        [d] the point kept fixed (the mean of the fitting data for ``affine=True``); None: linear eraser.
    method : str, default "leace"
        How it was fitted (recorded, informational).
    metadata : dict
        JSON-safe facts recorded at fit time (number of samples, trace constraint, ...).

    Examples
    --------
    >>> import torch
    >>> e = LeaceEraser(torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0, 0.0]]), None, "orth")
    >>> e(torch.tensor([[3.0, 4.0]])).tolist(), e.rank
    ([[0.0, 4.0]], 1)
    """

    proj_left: Tensor
    proj_right: Tensor
    bias: Tensor | None = None
    method: str = "leace"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("proj_left", "proj_right"):
            if not isinstance(getattr(self, name), Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}.")
        L, R = self.proj_left, self.proj_right
        if L.dim() != 2 or R.dim() != 2 or L.shape[1] != R.shape[0] or L.shape[0] != R.shape[1]:
            raise ValueError(
                f"proj_left must be [d, r] and proj_right [r, d]; got {tuple(L.shape)} and {tuple(R.shape)}."
            )
        if self.bias is not None and (not isinstance(self.bias, Tensor) or tuple(self.bias.shape) != (L.shape[0],)):
            raise ValueError(
                f"bias must be None or a tensor of shape [{L.shape[0]}], got "
                f"{tuple(self.bias.shape) if isinstance(self.bias, Tensor) else type(self.bias).__name__}."
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}.")
        # private copies: nobody holding the original tensors can change the eraser
        object.__setattr__(self, "proj_left", L.detach().clone())
        object.__setattr__(self, "proj_right", R.detach().clone())
        if self.bias is not None:
            object.__setattr__(self, "bias", self.bias.detach().clone())
        object.__setattr__(self, "metadata", dict(self.metadata))

    # -- properties -----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of features ``d``."""
        return int(self.proj_left.shape[0])

    @property
    def rank(self) -> int:
        """Rank of the edit ``I - P`` (number of erased directions)."""
        return int(self.proj_left.shape[1])

    @property
    def P(self) -> Tensor:
        """The [d, d] projection matrix ``I - proj_left @ proj_right``."""
        eye = torch.eye(self.dim, dtype=self.proj_left.dtype, device=self.proj_left.device)
        return eye - self.proj_left @ self.proj_right

    # -- application ----------------------------------------------------------------------------
    def delta(self, x: Tensor, dim: int = -1, one_sided: Tensor | None = None) -> Tensor:
        """The change ``x' - x`` the eraser makes (at strength 1), same shape and dtype as ``x``.

        Parameters
        ----------
        x : Tensor
            Features on dimension ``dim`` (any number of other dimensions).
        dim : int, default -1
            Feature dimension (1 for convolutional maps [rows, C, H, W]).
        one_sided : Tensor, optional
            [rank] signs ``+-1`` pointing from ``bias`` toward the concept in the erased coordinates
            ``(x - bias) proj_right^T``. Given, only the part of each coordinate on the concept's side is removed
            (``c -> sign * relu(sign * c)``); rows on the other side are left alone (a rectified, non-linear variant:
            the linear guarantee then holds only for rows on the concept side).

        Returns
        -------
        Tensor
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}; use LeaceFitter.transform for arrays.")
        xm, d = _move_dim(x, dim)
        if xm.shape[-1] != self.dim:
            raise ValueError(
                f"x has {xm.shape[-1]} features along dim {dim} (shape {tuple(x.shape)}), but the eraser is expecting "
                f"{self.dim} features. Pass the layer the eraser was fitted on, or set dim."
            )
        ct = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
        L = self.proj_left.to(device=x.device, dtype=ct)
        R = self.proj_right.to(device=x.device, dtype=ct)
        centred = xm.to(ct) if self.bias is None else xm.to(ct) - self.bias.to(device=x.device, dtype=ct)
        coef = centred @ R.T
        if one_sided is not None:
            sign = one_sided.to(device=x.device, dtype=ct)
            coef = sign * torch.relu(sign * coef)
        change = -(coef @ L.T)
        return change.movedim(-1, d).to(x.dtype if x.is_floating_point() else ct)

    def __call__(self, x: Tensor, dim: int = -1, strength: float = 1.0) -> Tensor:
        """Erase: ``x + strength * delta(x)``.

        Parameters
        ----------
        x : Tensor
            Features on dimension ``dim``.
        dim : int, default -1
        strength : float, default 1.0
            0 returns ``x`` unchanged (exactly), 1 erases, values in between interpolate.

        Returns
        -------
        Tensor
            Same shape and dtype as ``x``.
        """
        if not isinstance(strength, numbers.Real) or isinstance(strength, bool):
            raise TypeError(f"strength must be a real number, got {type(strength).__name__}.")
        if float(strength) == 0.0:
            return x
        change = self.delta(x, dim)
        return x + change if float(strength) == 1.0 else x + float(strength) * change

    def hook(self, dim: int = -1, strength: float = 1.0) -> Callable[[Tensor], Tensor]:
        """A function for :func:`concepts.hooks.intervene` that erases a layer's output.

        Examples
        --------
        >>> # with intervene(model, {"encoder.layer.6": eraser.hook()}): model(x)
        >>> # with intervene(unet, {"mid_block": eraser.hook(dim=1)}): ...      # conv map [B, C, H, W]
        """
        if not isinstance(strength, numbers.Real) or isinstance(strength, bool):
            raise TypeError(f"strength must be a real number, got {type(strength).__name__}.")

        def erase(x: Tensor) -> Tensor:
            return self(x, dim=dim, strength=strength)

        return erase

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> LeaceEraser:
        """A copy on another device / in another dtype."""
        kw: dict[str, Any] = {}
        if device is not None:
            kw["device"] = resolve_device(device)
        if dtype is not None:
            kw["dtype"] = resolve_dtype(dtype)
        return LeaceEraser(
            self.proj_left.to(**kw), self.proj_right.to(**kw), None if self.bias is None else self.bias.to(**kw),
            self.method, self.metadata,
        )

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the eraser to one ``.safetensors`` file (tensors + JSON metadata). Returns the path.

        Examples
        --------
        >>> # eraser.save("red.safetensors"); LeaceEraser.load("red.safetensors")
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"proj_left": self.proj_left.contiguous().cpu(), "proj_right": self.proj_right.contiguous().cpu()}
        if self.bias is not None:
            tensors["bias"] = self.bias.contiguous().cpu()
        meta = {"format": _FORMAT, "method": self.method, "metadata": json.dumps(self.metadata)}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> LeaceEraser:
        """Read an eraser written by :meth:`save` (no unpickling).

        Raises
        ------
        FileNotFoundError
            If the file does not exist.
        ValueError
            If the file is not a conceptkit LEACE eraser (the message names the file and the field).
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: eraser file not found (expected a .safetensors file from LeaceEraser.save).")
        try:
            with safe_open(str(path), framework="pt", device=str(resolve_device(device))) as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{path}: not a readable safetensors file ({exc}).") from exc
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: metadata field 'format' is {meta.get('format')!r}, expected {_FORMAT!r}.")
        for key in ("proj_left", "proj_right"):
            if key not in tensors:
                raise ValueError(f"{path}: tensor {key!r} is missing.")
        try:
            extra = json.loads(meta.get("metadata", "{}"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: metadata field 'metadata' is not valid JSON ({exc}).") from exc
        return cls(tensors["proj_left"], tensors["proj_right"], tensors.get("bias"), meta.get("method", "leace"), extra)

    def __repr__(self) -> str:
        return f"LeaceEraser(d={self.dim}, rank={self.rank}, method={self.method!r}, affine={self.bias is not None})"


# ---------------------------------------------------------------------------------------------
# the fitter
# ---------------------------------------------------------------------------------------------
class LeaceFitter(BaseEstimator):
    """Fit a :class:`LeaceEraser` from features and concept labels, in one go or streamed.

    Parameters
    ----------
    method : {"leace", "orth"}, default "leace"
        ``"leace"``: least-squares optimal oblique projection; ``"orth"``: orthogonal projection onto the
        complement of the cross-covariance's column space.
    affine : bool, default True
        Keep the mean of ``x`` fixed (erase around the mean); False gives a linear map.
    shrinkage : bool, default True
        Shrink ``Sigma_xx`` toward a scaled identity (see :func:`optimal_linear_shrinkage`); LEACE only.
    constrain_cov_trace : bool, default True
        Never let the total variance of the erased features exceed the original (module docstring).
    svd_tol : float, default 0.01
        Singular values of the (whitened) cross-covariance at or below this are treated as zero.
    dtype : str or torch.dtype, default "float64"
        Precision of the accumulated moments and of the eraser.
    device : str or torch.device, default "cpu"
        Where the moments are accumulated.

    Attributes
    ----------
    n_samples_seen_ : int
    n_features_in_ : int
    classes_ : ndarray or None
        Class labels when ``z`` was given as categorical labels (one-hot encoded in this order).
    mean_x_ : Tensor [d]
    mean_z_ : Tensor [k]
    eraser_ : LeaceEraser
        Computed from the current moments (cached until the next ``partial_fit``).

    Notes
    -----
    ``z`` may be 1-D categorical labels (int, bool, str: one-hot encoded over ``classes_``), a 1-D float
    array (one continuous concept) or a 2-D float matrix ``[n, k]`` (one-hot, several concepts, ...).
    Features may carry leading dimensions (``X [n, L, d]`` with ``z [n, L]`` or ``[n, L, k]``, e.g. per-token
    activations); they are flattened.

    Examples
    --------
    >>> import torch
    >>> X, y = torch.randn(200, 4), torch.arange(200) % 3
    >>> fitter = LeaceFitter(shrinkage=False)
    >>> for i in range(0, 200, 50):          # streamed
    ...     _ = fitter.partial_fit(X[i:i + 50], y[i:i + 50], classes=[0, 1, 2])
    >>> fitter.eraser_.rank
    2
    """

    def __init__(
        self,
        method: str = "leace",
        *,
        affine: bool = True,
        shrinkage: bool = True,
        constrain_cov_trace: bool = True,
        svd_tol: float = 0.01,
        dtype: str | torch.dtype = "float64",
        device: str | torch.device = "cpu",
    ) -> None:
        self.method = method
        self.affine = affine
        self.shrinkage = shrinkage
        self.constrain_cov_trace = constrain_cov_trace
        self.svd_tol = svd_tol
        self.dtype = dtype
        self.device = device

    # -- validation -----------------------------------------------------------------------------
    def _validate_params(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}.")
        if isinstance(self.svd_tol, bool) or not isinstance(self.svd_tol, numbers.Real) or not self.svd_tol > 0:
            raise ValueError(
                f"svd_tol must be a positive number (singular values at or below it are dropped), got {self.svd_tol!r}."
            )
        dt = resolve_dtype(self.dtype)
        if dt not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64 for the moments, got {dt}.")

    def _labels(self, z: Any, lead: tuple[int, ...], classes: Sequence[Any] | None) -> Tensor:
        dt = resolve_dtype(self.dtype)
        n_rows = int(np.prod(lead))
        if isinstance(z, Tensor):
            arr = z.detach().cpu().numpy()
        else:
            arr = np.asarray(z.to_numpy() if hasattr(z, "to_numpy") else z)
        if tuple(arr.shape[: len(lead)]) != tuple(lead) or arr.ndim > len(lead) + 1:
            raise ValueError(
                f"z has shape {tuple(arr.shape)} but X has {n_rows} rows (leading shape {tuple(lead)}); pass one label "
                f"per row of X (shape {tuple(lead)}) or one row of concept values per row (shape {tuple(lead)} + (k,))."
            )
        categorical = arr.dtype.kind in "USO" or classes is not None or (
            arr.dtype.kind in "biu" and arr.size == n_rows
        )
        if categorical:
            if arr.ndim != len(lead):
                raise ValueError(
                    f"categorical labels must have the leading shape of X {tuple(lead)}, got {tuple(arr.shape)}."
                )
            flat = arr.reshape(-1)
            known = getattr(self, "classes_", None)
            if known is None:
                known = np.asarray(classes) if classes is not None else np.unique(flat)
                if classes is not None and len(np.unique(known)) != len(known):
                    raise ValueError(f"classes has duplicates: {list(known)}.")
                if len(known) < 2 and classes is None:
                    raise ValueError(
                        f"z has a single class ({known.tolist()}); erasure needs at least two. Pass classes=[...] "
                        "to partial_fit when streaming batches that may hold one class."
                    )
                self.classes_ = known
            elif classes is not None and not np.array_equal(np.asarray(classes), known):
                raise ValueError(f"classes {list(classes)} differ from the classes of the first batch {list(known)}.")
            index = {c: i for i, c in enumerate(self.classes_.tolist())}
            try:
                codes = np.array([index[v] for v in flat.tolist()], dtype=np.int64)
            except KeyError as exc:
                raise ValueError(
                    f"z contains the label {exc.args[0]!r}, which is not among classes_ {self.classes_.tolist()}; "
                    "pass every class in classes=[...] on the first partial_fit call."
                ) from None
            out = torch.zeros(n_rows, len(self.classes_), dtype=dt)
            out[torch.arange(n_rows), torch.as_tensor(codes)] = 1.0
            return out
        if arr.dtype.kind not in "fcbiu":
            raise TypeError(f"z must hold numbers or labels, got dtype {arr.dtype}.")
        if getattr(self, "classes_", None) is not None:
            raise ValueError("this fitter was started with categorical labels; keep passing labels, not a float matrix.")
        self.classes_ = None
        return torch.as_tensor(arr.astype(np.float64), dtype=dt).reshape(n_rows, -1)

    # -- fitting --------------------------------------------------------------------------------
    def partial_fit(self, X: Any, z: Any, *, classes: Sequence[Any] | None = None) -> LeaceFitter:
        """Add a batch to the moments (Chan et al.'s pairwise update).

        Parameters
        ----------
        X : Tensor or array
            [n, d] features (or [..., d]: leading dimensions are flattened).
        z : Tensor or array
            Concept labels, one per row of ``X`` (see Notes of the class).
        classes : sequence, optional
            All class labels, on the first call when streaming categorical labels.

        Returns
        -------
        self
        """
        self._validate_params()
        Xt = _as_tensor(X, "X")
        if Xt.dim() < 2:
            raise ValueError(f"X must be [n, d] (or [..., d]), got shape {tuple(Xt.shape)}.")
        dt, dev = resolve_dtype(self.dtype), resolve_device(self.device)
        d = int(Xt.shape[-1])
        first = not hasattr(self, "n_samples_seen_")
        if not first and d != self.n_features_in_:
            raise ValueError(
                f"X has {d} features, but LeaceFitter is expecting {self.n_features_in_} features as input."
            )
        lead = tuple(int(v) for v in Xt.shape[:-1])
        x = Xt.detach().reshape(-1, d).to(device=dev, dtype=dt)
        n_b = int(x.shape[0])
        if n_b == 0:
            raise ValueError("X has no rows: pass at least one sample.")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("X contains NaN or infinite values; clean the features before fitting the eraser.")
        zz = self._labels(z, lead, classes).to(dev)
        k = int(zz.shape[1])
        if first:
            self.n_features_in_ = d
            self.n_concepts_ = k
            self.n_samples_seen_ = 0
            self.mean_x_ = torch.zeros(d, dtype=dt, device=dev)
            self.mean_z_ = torch.zeros(k, dtype=dt, device=dev)
            self._m_xx = torch.zeros(d, d, dtype=dt, device=dev) if self.method == "leace" else None
            self._m_xz = torch.zeros(d, k, dtype=dt, device=dev)
        elif k != self.n_concepts_:
            raise ValueError(f"z has {k} columns in this batch but {self.n_concepts_} before; keep the concept layout fixed.")
        mx_b, mz_b = x.mean(0), zz.mean(0)
        xc, zc = x - mx_b, zz - mz_b
        n_a = self.n_samples_seen_
        n = n_a + n_b
        dx, dz = mx_b - self.mean_x_, mz_b - self.mean_z_
        w = n_a * n_b / n
        if self._m_xx is not None:
            self._m_xx += xc.T @ xc + w * torch.outer(dx, dx)
        self._m_xz += xc.T @ zc + w * torch.outer(dx, dz)
        self.mean_x_ = self.mean_x_ + dx * (n_b / n)
        self.mean_z_ = self.mean_z_ + dz * (n_b / n)
        self.n_samples_seen_ = n
        self._eraser_cache = None
        return self

    def fit(self, X: Any, z: Any, *, classes: Sequence[Any] | None = None) -> LeaceFitter:
        """Fit from scratch on ``(X, z)`` (forgets earlier batches).

        Returns
        -------
        self
        """
        for attr in ("n_samples_seen_", "n_features_in_", "n_concepts_", "mean_x_", "mean_z_", "classes_"):
            self.__dict__.pop(attr, None)
        self._eraser_cache = None
        return self.partial_fit(X, z, classes=classes)

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_samples_seen_"):
            raise NotFittedError(
                "This LeaceFitter instance is not fitted yet. Call 'fit' or 'partial_fit' with features and "
                "concept labels before using the eraser."
            )
        if self.n_samples_seen_ < 2:
            raise ValueError(f"LeaceFitter has seen {self.n_samples_seen_} sample(s); covariances need at least 2.")

    # -- moments --------------------------------------------------------------------------------
    @property
    def cov_xx_(self) -> Tensor:
        """[d, d] covariance of ``X`` (shrunk when ``shrinkage``); LEACE only."""
        self._check_fitted()
        if self._m_xx is None:
            raise AttributeError("method='orth' does not track the covariance of X; use method='leace'.")
        m = (self._m_xx + self._m_xx.T) / 2
        n = self.n_samples_seen_
        if self.shrinkage:
            return optimal_linear_shrinkage(m / n, n)
        return m / (n - 1)

    @property
    def cov_xz_(self) -> Tensor:
        """[d, k] cross-covariance of ``X`` and ``z``."""
        self._check_fitted()
        return self._m_xz / (self.n_samples_seen_ - 1)

    # -- the eraser -----------------------------------------------------------------------------
    @property
    def eraser_(self) -> LeaceEraser:
        """The :class:`LeaceEraser` of the moments seen so far."""
        self._check_fitted()
        cached = getattr(self, "_eraser_cache", None)
        if cached is None:
            cached = self._compute_eraser()
            self._eraser_cache = cached
        return cached

    def _compute_eraser(self) -> LeaceEraser:
        sxz = self.cov_xz_
        d = sxz.shape[0]
        dt, dev = sxz.dtype, sxz.device
        eye = torch.eye(d, dtype=dt, device=dev)
        meta: dict[str, Any] = {"n_samples": int(self.n_samples_seen_), "shrinkage": bool(self.shrinkage),
                                "svd_tol": float(self.svd_tol), "trace_constrained": False}
        if self.method == "leace":
            sigma = self.cov_xx_
            evals, evecs = torch.linalg.eigh(sigma)
            keep = evals > evals[-1].clamp(min=0) * d * torch.finfo(dt).eps
            evals = evals.clamp(min=0)
            inv_sqrt = torch.where(keep, evals.clamp(min=torch.finfo(dt).tiny).rsqrt(), torch.zeros_like(evals))
            sqrt = torch.where(keep, evals.sqrt(), torch.zeros_like(evals))
            W = (evecs * inv_sqrt) @ evecs.T
            W_pinv = (evecs * sqrt) @ evecs.T
        else:
            sigma = None
            W = W_pinv = eye
        u, s, _ = torch.linalg.svd(W @ sxz, full_matrices=False)
        u = u[:, s > self.svd_tol]
        left, right = W_pinv @ u, u.T @ W
        meta["rank"] = int(u.shape[1])
        if self.constrain_cov_trace and sigma is not None and u.shape[1] > 0:
            P = eye - left @ right
            old = torch.trace(sigma)
            new = torch.trace(P @ sigma @ P.T)
            if float(new) > float(old):
                # orthogonal projection with the same kernel span(left) = span(Sigma_xz)
                q_basis, _ = torch.linalg.qr(left)
                Q = eye - q_basis @ q_basis.T
                D = P - Q
                a = torch.trace(D @ sigma @ D.T)
                b = 2 * torch.trace(D @ sigma @ Q.T)
                c = torch.trace(Q @ sigma @ Q.T)
                if float(a) > 0:
                    disc = (b * b - 4 * a * (c - old)).clamp(min=0)
                    alpha = float(((-b + disc.sqrt()) / (2 * a)).clamp(0.0, 1.0))
                else:
                    alpha = 1.0
                # I - (alpha P + (1 - alpha) Q) = q (alpha q^T left right + (1 - alpha) q^T)
                right = alpha * (q_basis.T @ left) @ right + (1 - alpha) * q_basis.T
                left = q_basis
                meta.update(trace_constrained=True, trace_alpha=alpha)
                logger.info("LEACE would raise the covariance trace (%.4g > %.4g); mixed with the orthogonal "
                            "projection (alpha=%.4f).", float(new), float(old), alpha)
        bias = self.mean_x_.clone() if self.affine else None
        return LeaceEraser(left, right, bias, self.method, meta)

    # -- sklearn-style transform ----------------------------------------------------------------
    def transform(self, X: Any) -> Any:
        """Erase the concept from ``X`` ([n, d] or [..., d]); returns the type it was given (tensor/array).

        Examples
        --------
        >>> # Xe = LeaceFitter().fit(X_train, y_train).transform(X_test)
        """
        eraser = self.eraser_
        was_numpy = not isinstance(X, Tensor)
        Xt = _as_tensor(X, "X")
        if Xt.dim() < 1 or Xt.shape[-1] != self.n_features_in_:
            raise ValueError(
                f"X has {Xt.shape[-1] if Xt.dim() else 0} features, but LeaceFitter is expecting "
                f"{self.n_features_in_} features as input."
            )
        if not Xt.is_floating_point():
            Xt = Xt.double()
        out = eraser(Xt)
        return out.cpu().numpy() if was_numpy else out

    def fit_transform(self, X: Any, z: Any, **kwargs: Any) -> Any:
        """``fit(X, z).transform(X)``."""
        return self.fit(X, z, **kwargs).transform(X)
