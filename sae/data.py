"""Turn tensors, arrays or an ActivationStore into a deterministic, resumable batch stream.

An ``ActivationStore`` is duck-typed: anything with ``iter_batches(batch_size, ...)``, ``dim()``
and ``len()`` (see ``concepts.store``). In-memory data is shuffled per epoch with a permutation
that depends only on ``(seed, epoch)``, so a resumed run sees the same batches.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

__all__ = ["BatchSource", "TensorSource", "StoreSource", "as_batch_source", "is_store"]


@runtime_checkable
class _StoreLike(Protocol):
    def iter_batches(self, batch_size: int, **kwargs: Any) -> Iterator[Tensor]: ...

    def dim(self, layer: str | None = None) -> int: ...

    def __len__(self) -> int: ...


def is_store(x: object) -> bool:
    """Whether ``x`` looks like an ActivationStore (``iter_batches``, ``dim``, ``len``)."""
    return all(hasattr(x, a) for a in ("iter_batches", "dim", "__len__")) and not isinstance(
        x, (np.ndarray, Tensor)
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    """Shuffle seed of one epoch, salted so it never equals a user's raw seed."""
    return int(np.random.SeedSequence([int(seed), int(epoch), 0x5EED]).generate_state(1, dtype=np.uint32)[0])


class BatchSource:
    """A finite data set that can be streamed in batches."""

    n_samples: int
    n_features: int
    metadata: dict

    def iter_batches(
        self, batch_size: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = True,
        start_batch: int = 0, drop_last: bool = False,
    ) -> Iterator[Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def head(self, n: int) -> Tensor:
        """The first (at most) ``n`` rows in storage order, float32 on the CPU."""
        rows = []
        got = 0
        for b in self.iter_batches(min(n, 4096) or 1, shuffle=False):
            rows.append(b)
            got += b.shape[0]
            if got >= n:
                break
        if not rows:
            return torch.zeros(0, self.n_features)
        return torch.cat(rows)[:n]

    def n_batches(self, batch_size: int, drop_last: bool) -> int:
        if drop_last:
            return self.n_samples // batch_size
        return -(-self.n_samples // batch_size)


class TensorSource(BatchSource):
    """Batches from an in-memory tensor [n, d]."""

    def __init__(self, x: Tensor, *, device: torch.device, dtype: torch.dtype) -> None:
        self.x = x
        self.n_samples, self.n_features = int(x.shape[0]), int(x.shape[1])
        self.device, self.dtype = device, dtype
        self.metadata = {}

    def iter_batches(
        self, batch_size: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = True,
        start_batch: int = 0, drop_last: bool = False,
    ) -> Iterator[Tensor]:
        n = self.n_samples
        if shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = None
        for i in range(start_batch, self.n_batches(batch_size, drop_last)):
            sl = slice(i * batch_size, min(n, (i + 1) * batch_size))
            b = self.x[order[sl]] if order is not None else self.x[sl]
            yield b.to(device=self.device, dtype=self.dtype, non_blocking=True)


class StoreSource(BatchSource):
    """Batches streamed from an ActivationStore (bounded memory)."""

    def __init__(self, store: Any, *, layer: str | None, device: torch.device, dtype: torch.dtype) -> None:
        self.store = store
        self.layer = layer
        if hasattr(store, "num_rows"):
            self.n_samples = int(store.num_rows(layer))
        else:
            self.n_samples = int(len(store))
        self.n_features = int(store.dim(layer) if layer is not None else store.dim())
        self.device, self.dtype = device, dtype
        self.metadata = _store_metadata(store, layer)

    def iter_batches(
        self, batch_size: int, *, epoch: int = 0, seed: int = 0, shuffle: bool = True,
        start_batch: int = 0, drop_last: bool = False,
    ) -> Iterator[Tensor]:
        kw = dict(shuffle=shuffle, seed=_epoch_seed(seed, epoch), drop_last=drop_last,
                  start_batch=start_batch, dtype=self.dtype, device=self.device)
        if self.layer is not None:
            kw["layer"] = self.layer
        for b in self.store.iter_batches(batch_size, **kw):
            yield torch.as_tensor(b).to(device=self.device, dtype=self.dtype)


def _store_metadata(store: Any, layer: str | None) -> dict:
    """Model / layer / pooling / preprocessing of the training data, for checkpoint configs."""
    md = dict(getattr(store, "metadata", {}) or {})
    out = {k: md[k] for k in ("model", "preprocessing") if md.get(k) is not None}
    layers = list(getattr(store, "layers", []) or [])
    name = layer if layer is not None else (layers[0] if layers else md.get("layer"))
    if name is not None:
        out["layer"] = name
    pooling = md.get("pooling")
    if isinstance(pooling, dict) and name in pooling:
        out["pooling"] = pooling[name]
    elif isinstance(pooling, str):
        out["pooling"] = pooling
    return out


def as_batch_source(
    X: Any, *, device: torch.device, dtype: torch.dtype, layer: str | None = None, name: str = "SAE"
) -> BatchSource:
    """Wrap ``X`` (tensor, array-like [n, d], or ActivationStore) as a :class:`BatchSource`.

    Raises
    ------
    TypeError
        If ``X`` is not array-like or a store.
    ValueError
        If ``X`` is not 2-D, is empty, or contains NaN/inf.
    """
    if is_store(X):
        return StoreSource(X, layer=layer, device=device, dtype=dtype)
    x = to_tensor(X, name=name)
    return TensorSource(x, device=device, dtype=dtype)


def to_tensor(X: Any, *, name: str = "SAE") -> Tensor:
    """Validate array-like input and return a float CPU/device tensor [n, d] (not copied if possible)."""
    if isinstance(X, Tensor):
        x = X.detach()
    else:
        try:
            arr = np.asarray(X)
        except Exception as exc:  # noqa: BLE001 - re-raised with context
            raise TypeError(
                f"{name} expects a 2-D array-like, a torch.Tensor or an ActivationStore; got "
                f"{type(X).__name__}."
            ) from exc
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(
                f"{name} expects numeric data; got an array of dtype {arr.dtype} from {type(X).__name__}. "
                "Convert it to floats first."
            )
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if x.ndim != 2:
        raise ValueError(
            f"{name} expects a 2-D array [n_samples, n_features]; got shape {tuple(x.shape)}. "
            "Flatten token or spatial dimensions first, e.g. X.reshape(-1, X.shape[-1])."
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} got an empty array with shape {tuple(x.shape)}; it needs at least one sample.")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} got input containing NaN or infinity; remove or impute those values first.")
    return x
