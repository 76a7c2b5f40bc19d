"""Sharded on-disk activations: written as they are computed, streamed back with bounded memory.

Layout of a store directory::

    index.json                      model, layers, pooling, preprocessing, dtype, counts, shard list
    shard_00000.safetensors         one file per shard (default storage), or
    shard_00000.L0.npy ...          one ``.npy`` file per array (``storage="npy"``, memory-mappable)

Every shard holds a contiguous range of input samples (images). For each layer ``L`` it stores
``L`` (activations ``[rows, d]``) and ``L::image_index`` (``int64 [rows]``: the input sample each
row comes from), and for token/spatial pooling ``L::token_type`` (``uint8 [rows]``, codes in
:data:`TOKEN_TYPES`) and ``L::position`` (``int32 [rows]``: token index, or ``h * W + w``).

Shards are written to a temporary file and moved into place with :func:`os.replace`; ``index.json``
is rewritten the same way after each shard, so after a crash the index lists only complete shards
and an extraction can resume from there. Each shard entry records its byte size and SHA-256; shards
are validated (size, header shapes and dtypes, embedded model/layers, checksum) before their data is
used, and a bad shard raises :class:`StoreCorruptError` naming the file and the field.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import os
import struct
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors.torch import save as st_save
from safetensors import safe_open
from torch import Tensor

from .devices import dtype_name, resolve_device, resolve_dtype

__all__ = [
    "ActivationStore",
    "StoreWriter",
    "StoreError",
    "StoreCorruptError",
    "StoreMismatchError",
    "TOKEN_TYPES",
    "INDEX_FILE",
    "FORMAT_VERSION",
]

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
FORMAT_VERSION = 1
#: Token-type codes stored in ``L::token_type``.
TOKEN_TYPES: dict[str, int] = {"cls": 0, "register": 1, "patch": 2}
META_KEYS = ("image_index", "token_type", "position")
_META_DTYPES = {"image_index": torch.int64, "token_type": torch.uint8, "position": torch.int32}
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NP_DTYPES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16",
              torch.int64: "int64", torch.int32: "int32", torch.uint8: "uint8"}
_MAX_HEADER = 100 * 1024 * 1024


class StoreError(ValueError):
    """Base class of activation-store errors."""


class StoreCorruptError(StoreError):
    """A shard or index file is truncated, malformed or does not match the index."""


class StoreMismatchError(StoreError):
    """An existing store was made with a different model / layers / settings."""


def meta_key(layer: str, key: str) -> str:
    """Tensor name of a per-row metadata array, e.g. ``"blocks.3::image_index"``."""
    return f"{layer}::{key}"


def _sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes, fsync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _canonical(value: Any) -> Any:
    """JSON round trip, so that values compare equal to what was read back from index.json."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------
# shard file validation
# ---------------------------------------------------------------------------------------------
def _read_safetensors_header(path: Path, size: int) -> tuple[dict[str, Any], int]:
    if size < 8:
        raise StoreCorruptError(f"Shard file {path} is corrupt: field 'bytes': only {size} bytes (truncated).")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise StoreCorruptError(
                f"Shard file {path} is corrupt: field 'header': header length {n} does not fit the "
                f"file of {size} bytes (truncated or not a safetensors file)."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise StoreCorruptError(f"Shard file {path} is corrupt: field 'header' is not valid JSON ({exc}).") from exc
    return header, 8 + n


def _expected_arrays(index: dict[str, Any], shard: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    dtype = resolve_dtype(index["dtype"])
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for layer in index["layers"]:
        rows = int(shard["rows"][layer])
        out[layer] = ((rows, int(index["dims"][layer])), dtype)  # type: ignore[assignment]
        for key in shard.get("meta_keys", {}).get(layer, ["image_index"]):
            out[meta_key(layer, key)] = ((rows,), _META_DTYPES[key])
    return out


def _validate_safetensors(path: Path, index: dict[str, Any], shard: dict[str, Any], size: int) -> None:
    header, data_start = _read_safetensors_header(path, size)
    raw = (header.pop("__metadata__", {}) or {}).get("conceptkit", "{}")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StoreCorruptError(f"Shard file {path} is corrupt: field '__metadata__' is not valid JSON ({exc}).") from exc
    for field in ("model_fingerprint", "layers"):
        expected = index["model"]["fingerprint"] if field == "model_fingerprint" else json.dumps(index["layers"])
        if field in meta and meta[field] != expected:
            raise StoreCorruptError(
                f"Shard file {path} does not belong to this store: field '{field}' is {meta[field]!r} in the "
                f"shard but {expected!r} in {INDEX_FILE}."
            )
    for name, (shape, dtype) in _expected_arrays(index, shard).items():
        if name not in header:
            raise StoreCorruptError(f"Shard file {path} is corrupt: field 'tensors': tensor {name!r} is missing.")
        info = header[name]
        got_dtype = _ST_DTYPES.get(info.get("dtype"))
        if got_dtype != dtype:
            raise StoreCorruptError(
                f"Shard file {path} is corrupt: field 'dtype' of {name!r} is {info.get('dtype')} but the index "
                f"says {dtype_name(dtype)}."
            )
        if tuple(info.get("shape", ())) != shape:
            raise StoreCorruptError(
                f"Shard file {path} is corrupt: field 'shape' of {name!r} is {tuple(info.get('shape', ()))} "
                f"but the index says {shape}."
            )
        start, end = info["data_offsets"]
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if end - start != nbytes or data_start + end > size:
            raise StoreCorruptError(
                f"Shard file {path} is corrupt: field 'data_offsets' of {name!r} ({start}, {end}) does not "
                f"match {nbytes} bytes within a file of {size} bytes (truncated?)."
            )


def _validate_npy(path: Path, shape: tuple[int, ...], dtype: torch.dtype, size: int) -> None:
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as exc:
        raise StoreCorruptError(f"Shard file {path} is corrupt: field 'header' could not be read ({exc}).") from exc
    want = _NP_DTYPES[dtype]
    if np.dtype(got_dtype) != np.dtype(want):
        raise StoreCorruptError(
            f"Shard file {path} is corrupt: field 'dtype' is {np.dtype(got_dtype)} but the index says {want}."
        )
    if tuple(got_shape) != tuple(shape) or fortran:
        raise StoreCorruptError(
            f"Shard file {path} is corrupt: field 'shape' is {tuple(got_shape)} but the index says {tuple(shape)}."
        )
    if offset + math.prod(shape) * np.dtype(want).itemsize != size:
        raise StoreCorruptError(
            f"Shard file {path} is corrupt: field 'bytes' is {size} but header and shape need "
            f"{offset + math.prod(shape) * np.dtype(want).itemsize} (truncated?)."
        )


def _npy_name(shard_id: int, array_id: int) -> str:
    return f"shard_{shard_id:05d}.a{array_id}.npy"


# ---------------------------------------------------------------------------------------------
# the store (reading)
# ---------------------------------------------------------------------------------------------
def _require_folder(path: Path | None) -> Path:
    """The store's folder; in-memory stores have none, so file operations on them are refused."""
    if path is None:
        raise StoreError(
            "this store lives in memory and has no folder; write it with a StoreWriter(path) (or open a folder with "
            "ActivationStore.open(path)) to use files."
        )
    return path


class ActivationStore:
    """Read access to sharded activations written by :class:`~concepts.extractor.ConceptExtractor`.

    Use :meth:`open` for a store on disk; an extraction without ``store_path`` returns an in-memory
    store with the same interface.

    Parameters
    ----------
    path : path or None
        Store directory (None for an in-memory store).
    index : dict
        Parsed ``index.json``.
    verify : {"checksum", "size"}, default "checksum"
        ``"checksum"`` checks the SHA-256 of every shard the first time it is read (one extra pass
        over the bytes); ``"size"`` checks sizes, shapes and dtypes only.

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> from concepts.extractor import ConceptExtractor
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    >>> store = ConceptExtractor(model, "1", progress=False).extract(torch.rand(10, 3, 2, 2))
    >>> len(store), store.dim()
    (10, 5)
    >>> next(store.iter_batches(4, seed=0)).shape
    torch.Size([4, 5])
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        index: dict[str, Any],
        *,
        memory_shards: list[dict[str, Tensor]] | None = None,
        verify: Literal["checksum", "size"] = "checksum",
    ) -> None:
        if verify not in ("checksum", "size"):
            raise ValueError(f"verify must be 'checksum' or 'size', got {verify!r}.")
        self.path = None if path is None else Path(path)
        self._index = index
        self._memory = memory_shards
        self._verify = verify
        self._checked: dict[int, str] = {}
        self._lock = threading.Lock()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: Literal["checksum", "size"] = "checksum") -> ActivationStore:
        """Open a store directory (reads ``index.json``; shards are validated lazily on first use).

        Parameters
        ----------
        path : path
            Directory holding ``index.json``.
        verify : {"checksum", "size"}, default "checksum"
            See the class docstring.

        Returns
        -------
        ActivationStore

        Raises
        ------
        FileNotFoundError
            If there is no ``index.json`` in ``path``.
        StoreCorruptError
            If ``index.json`` is malformed.

        Examples
        --------
        >>> store = ActivationStore.open("acts/")  # doctest: +SKIP
        """
        path = Path(path)
        index_path = path / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(
                f"No activation store at {path}: {index_path} does not exist. Create one with "
                "ConceptExtractor(...).extract(..., store_path=...)."
            )
        index = _read_index(index_path)
        return cls(path, index, verify=verify)

    # -- description ----------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Layer names, in extraction order."""
        return list(self._index["layers"])

    @property
    def metadata(self) -> dict[str, Any]:
        """Everything in ``index.json`` except the shard list (a copy)."""
        return {k: copy.deepcopy(v) for k, v in self._index.items() if k != "shards"}

    @property
    def shards(self) -> list[dict[str, Any]]:
        """Shard entries of the index (a copy): sample range, rows per layer, files, sizes, checksums."""
        return copy.deepcopy(self._index["shards"])

    @property
    def complete(self) -> bool:
        """Whether the extraction that wrote this store finished."""
        return bool(self._index.get("complete", False))

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the activations."""
        return resolve_dtype(self._index["dtype"])  # type: ignore[return-value]

    @property
    def skipped(self) -> list[list[Any]]:
        """``[position, source, reason]`` of every input that could not be loaded (``on_error="skip"``)."""
        return [s for shard in self._index["shards"] for s in shard.get("skipped", [])]

    @property
    def num_samples(self) -> int:
        """Number of input samples (images) stored."""
        return int(sum(s["samples"] for s in self._index["shards"]))

    def _layer(self, layer: str | None) -> str:
        if layer is None:
            return self._index["layers"][0]
        if layer not in self._index["layers"]:
            import difflib

            close = difflib.get_close_matches(str(layer), self._index["layers"], n=3, cutoff=0.3)
            raise KeyError(
                f"Layer {layer!r} is not in this store (layers: {self._index['layers']}). "
                + (f"Did you mean {close[0]!r}?" if close else "")
            )
        return layer

    def dim(self, layer: str | None = None) -> int:
        """Feature dimension ``d`` of a layer (default: the first layer).

        Examples
        --------
        >>> store.dim("blocks.3")  # doctest: +SKIP
        768
        """
        layer = self._layer(layer)
        if layer not in self._index.get("dims", {}):
            raise ValueError(f"The store holds no rows yet, so the dimension of layer {layer!r} is unknown.")
        return int(self._index["dims"][layer])

    def num_rows(self, layer: str | None = None) -> int:
        """Number of stored rows for a layer (samples for cls/mean pooling, tokens/positions otherwise).

        Examples
        --------
        >>> store.num_rows("blocks.3")  # doctest: +SKIP
        50000
        """
        layer = self._layer(layer)
        return int(sum(s["rows"][layer] for s in self._index["shards"]))

    def __len__(self) -> int:
        """Rows of the first layer (see :meth:`num_rows` for other layers)."""
        return self.num_rows(None)

    def pooling(self, layer: str | None = None) -> str:
        """Pooling used for a layer."""
        return self._index["pooling"][self._layer(layer)]

    def __repr__(self) -> str:
        where = "in memory" if self.path is None else str(self.path)
        layers = ", ".join(
            f"{l}: {self.num_rows(l)}x{self._index.get('dims', {}).get(l, '?')} ({self._index['pooling'][l]})"
            for l in self.layers
        )
        return (
            f"ActivationStore({where}; {self.num_samples} samples, {len(self._index['shards'])} shards, "
            f"{self._index['dtype']}; {layers})"
        )

    # -- shard access ---------------------------------------------------------------------------
    def _check_shard(self, sid: int, level: str | None = None) -> None:
        """Validate shard ``sid`` (all its files) once per store object."""
        if self._memory is not None:
            return
        level = level or self._verify
        with self._lock:
            if self._checked.get(sid) in (level, "checksum"):
                return
            _require_folder(self.path)
            shard = self._index["shards"][sid]
            storage = self._index["storage"]
            expected = _expected_arrays(self._index, shard)
            for finfo in shard["files"]:
                fpath = self.path / finfo["name"]
                if not fpath.is_file():
                    raise StoreCorruptError(
                        f"Shard file {fpath} is missing: field 'files' of shard {sid} in {INDEX_FILE} lists it."
                    )
                size = fpath.stat().st_size
                if size != int(finfo["bytes"]):
                    raise StoreCorruptError(
                        f"Shard file {fpath} is corrupt: field 'bytes' is {finfo['bytes']} in {INDEX_FILE} but the "
                        f"file has {size} bytes (truncated or overwritten). Delete the store and extract again."
                    )
                if storage == "safetensors":
                    _validate_safetensors(fpath, self._index, shard, size)
                else:
                    shape, dtype = expected[finfo["array"]]
                    _validate_npy(fpath, shape, dtype, size)
                if level == "checksum":
                    digest = _sha256_file(fpath)
                    if digest != finfo["sha256"]:
                        raise StoreCorruptError(
                            f"Shard file {fpath} is corrupt: field 'sha256' is {finfo['sha256'][:16]}... in "
                            f"{INDEX_FILE} but the file hashes to {digest[:16]}.... Delete the store and extract again."
                        )
            self._checked[sid] = level

    def _load(self, sid: int, names: Sequence[str]) -> dict[str, Tensor]:
        if self._memory is not None:
            return {n: self._memory[sid][n] for n in names}
        self._check_shard(sid)
        _require_folder(self.path)
        shard = self._index["shards"][sid]
        if self._index["storage"] == "safetensors":
            fpath = self.path / shard["files"][0]["name"]
            with safe_open(str(fpath), framework="pt") as f:
                return {n: f.get_tensor(n) for n in names}
        out: dict[str, Tensor] = {}
        by_array = {f["array"]: f["name"] for f in shard["files"]}
        for n in names:
            arr = np.load(self.path / by_array[n], mmap_mode="r")
            out[n] = torch.from_numpy(np.array(arr))
        return out

    def _rows_mask(self, sid: int, layer: str, token_types: Sequence[str] | None) -> Tensor | None:
        if token_types is None:
            return None
        codes = _token_codes(token_types)
        key = meta_key(layer, "token_type")
        if "token_type" not in self._index["shards"][sid].get("meta_keys", {}).get(layer, []):
            raise ValueError(
                f"Layer {layer!r} was stored with pooling={self._index['pooling'][layer]!r}, which has no token "
                "types; token_types= needs pooling='tokens'."
            )
        tt = self._load(sid, [key])[key]
        return torch.isin(tt, torch.tensor(codes, dtype=tt.dtype))

    def verify(self) -> None:
        """Check every shard now: presence, byte size, header shapes/dtypes, embedded model and layers,
        SHA-256. Raises :class:`StoreCorruptError` naming the first bad file and field.

        Examples
        --------
        >>> store.verify()  # doctest: +SKIP
        """
        for sid in range(len(self._index["shards"])):
            self._check_shard(sid, "checksum")

    # -- reading ----------------------------------------------------------------------------------
    def read(
        self,
        layer: str | None = None,
        rows: slice | Sequence[int] | np.ndarray | Tensor | None = None,
        *,
        dtype: torch.dtype | str | None = torch.float32,
        token_types: Sequence[str] | None = None,
    ) -> Tensor:
        """Materialise a layer's activations (or a subset of rows) in memory.

        Parameters
        ----------
        layer : str, optional
            Default: the first layer.
        rows : slice or sequence of int, optional
            Global row indices (after the ``token_types`` filter). Default: all rows.
        dtype : torch.dtype or str or None, default float32
            Output dtype; None keeps the storage dtype.
        token_types : sequence of {"cls", "register", "patch"}, optional
            Keep only rows of these token types (``pooling="tokens"`` layers).

        Returns
        -------
        Tensor
            ``[n_rows, d]``.

        Examples
        --------
        >>> X = store.read("blocks.3", rows=slice(0, 100))  # doctest: +SKIP
        """
        layer = self._layer(layer)
        return self._read_key(layer, layer, rows, token_types, resolve_dtype(dtype))

    def read_meta(
        self,
        key: Literal["image_index", "token_type", "position"] = "image_index",
        layer: str | None = None,
        rows: slice | Sequence[int] | np.ndarray | Tensor | None = None,
        *,
        token_types: Sequence[str] | None = None,
    ) -> Tensor:
        """Per-row metadata of a layer: the input sample index, token type code or position.

        Parameters
        ----------
        key : {"image_index", "token_type", "position"}
            ``token_type`` codes are in :data:`TOKEN_TYPES` (cls=0, register=1, patch=2).
        layer, rows, token_types
            As in :meth:`read`.

        Returns
        -------
        Tensor
            ``[n_rows]`` integer tensor.

        Raises
        ------
        KeyError
            If the layer was stored without that metadata (e.g. ``token_type`` for cls pooling).

        Examples
        --------
        >>> store.read_meta("image_index", "blocks.3")  # doctest: +SKIP
        """
        layer = self._layer(layer)
        if key not in META_KEYS:
            raise ValueError(f"key must be one of {META_KEYS}, got {key!r}.")
        shards = self._index["shards"]
        if shards and key not in shards[0].get("meta_keys", {}).get(layer, ["image_index"]):
            raise KeyError(
                f"Layer {layer!r} (pooling={self._index['pooling'][layer]!r}) has no {key!r} metadata; "
                "it is stored for pooling='tokens' and 'spatial' only."
            )
        return self._read_key(layer, meta_key(layer, key), rows, token_types, None)

    def _read_key(
        self, layer: str, name: str, rows: Any, token_types: Sequence[str] | None, dtype: torch.dtype | None
    ) -> Tensor:
        parts: list[Tensor] = []
        for sid in range(len(self._index["shards"])):
            t = self._load(sid, [name])[name]
            offset = int(self._index["shards"][sid].get("image_offset", 0))
            if offset and name.endswith("::image_index"):  # merged distributed stores (concepts.distributed)
                t = t + offset
            mask = self._rows_mask(sid, layer, token_types)
            if mask is not None:
                t = t[mask]
            parts.append(t)
        if not parts:
            d = (self.dim(layer),) if name == layer and layer in self._index.get("dims", {}) else ()
            out = torch.empty((0, *d), dtype=self.dtype if name == layer else _META_DTYPES[name.split("::")[-1]])
        else:
            out = torch.cat(parts)
        if rows is not None:
            if isinstance(rows, slice):
                out = out[rows]
            else:
                idx = torch.as_tensor(np.asarray(rows), dtype=torch.long)
                if idx.numel() and (int(idx.max()) >= len(out) or int(idx.min()) < -len(out)):
                    raise IndexError(f"rows index out of range for {len(out)} rows of layer {layer!r}.")
                out = out[idx]
        if dtype is not None:
            out = out.to(dtype)
        return out

    def iter_batches(
        self,
        batch_size: int,
        *,
        layer: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        start_batch: int = 0,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
        window_shards: int = 4,
        token_types: Sequence[str] | None = None,
    ) -> Iterator[Tensor]:
        """Stream ``[b, d]`` batches with bounded memory.

        Shuffling is shard-wise: the shard order is permuted, then the rows of a window of
        ``window_shards`` consecutive (permuted) shards are permuted together. Batches are
        consecutive chunks of that stream, so peak memory is about ``window_shards`` shards plus
        one batch. The stream depends only on ``seed`` (use a new seed per epoch).

        Parameters
        ----------
        batch_size : int
            Rows per batch.
        layer : str, optional
            Default: the first layer.
        shuffle : bool, default True
            If False, rows come in storage order.
        seed : int, default 0
            Seed of the shuffle.
        drop_last : bool, default False
            Drop a final batch smaller than ``batch_size``.
        start_batch : int, default 0
            Skip that many batches (resume a training run mid-epoch); skipped windows are not read.
        dtype : torch.dtype or str, default float32
            Dtype of the yielded batches.
        device : str or torch.device, default "cpu"
            Device of the yielded batches.
        window_shards : int, default 4
            Shards shuffled together.
        token_types : sequence of {"cls", "register", "patch"}, optional
            Keep only rows of these token types.

        Yields
        ------
        Tensor
            ``[batch_size, d]`` (the last one may be smaller unless ``drop_last``).

        Examples
        --------
        >>> for X in store.iter_batches(4096, seed=epoch):  # doctest: +SKIP
        ...     sae.partial_fit(X)
        """
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        if not isinstance(start_batch, (int, np.integer)) or start_batch < 0:
            raise ValueError(f"start_batch must be a non-negative integer, got {start_batch!r}.")
        if not isinstance(window_shards, (int, np.integer)) or window_shards < 1:
            raise ValueError(f"window_shards must be a positive integer, got {window_shards!r}.")
        layer = self._layer(layer)
        out_dtype = resolve_dtype(dtype)
        dev = resolve_device(device)
        return self._iter(int(batch_size), layer, shuffle, seed, drop_last, int(start_batch), out_dtype, dev,
                          int(window_shards), token_types)

    def _iter(self, bs: int, layer: str, shuffle: bool, seed: int, drop_last: bool, start_batch: int,
              out_dtype: torch.dtype | None, dev: torch.device, window: int,
              token_types: Sequence[str] | None) -> Iterator[Tensor]:
        n_shards = len(self._index["shards"])
        seed = int(seed) & (2**64 - 1)  # numpy seeds must be non-negative
        order = np.random.default_rng(seed).permutation(n_shards) if shuffle else np.arange(n_shards)
        windows = [order[i:i + window] for i in range(0, n_shards, window)]
        skip = start_batch * bs
        carry: Tensor | None = None
        for w, sids in enumerate(windows):
            if token_types is None:
                n_w = sum(int(self._index["shards"][s]["rows"][layer]) for s in sids)
                if skip >= n_w:
                    skip -= n_w
                    continue
            parts = []
            for s in sids:
                t = self._load(int(s), [layer])[layer]
                mask = self._rows_mask(int(s), layer, token_types)
                parts.append(t if mask is None else t[mask])
            data = torch.cat(parts) if len(parts) > 1 else parts[0]
            if skip >= len(data):
                skip -= len(data)
                continue
            if shuffle:
                perm = np.random.default_rng([seed, w]).permutation(len(data))
                data = data[torch.from_numpy(perm)]
            if skip:
                data = data[skip:]
                skip = 0
            if carry is not None and len(carry):
                data = torch.cat([carry, data])
            n_full = len(data) // bs
            for b in range(n_full):
                yield data[b * bs:(b + 1) * bs].to(device=dev, dtype=out_dtype)
            carry = data[n_full * bs:]
        if carry is not None and len(carry) and not drop_last:
            yield carry.to(device=dev, dtype=out_dtype)


def _token_codes(token_types: Sequence[str]) -> list[int]:
    if isinstance(token_types, str):
        token_types = [token_types]
    bad = [t for t in token_types if t not in TOKEN_TYPES]
    if bad:
        raise ValueError(f"Unknown token type(s) {bad}; expected a subset of {list(TOKEN_TYPES)}.")
    return [TOKEN_TYPES[t] for t in token_types]


def _read_index(index_path: Path) -> dict[str, Any]:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreCorruptError(f"Index file {index_path} is corrupt: could not parse JSON ({exc}).") from exc
    for field in ("format_version", "layers", "pooling", "dtype", "storage", "shards", "model"):
        if field not in index:
            raise StoreCorruptError(f"Index file {index_path} is corrupt: field {field!r} is missing.")
    if index["format_version"] != FORMAT_VERSION:
        raise StoreCorruptError(
            f"Index file {index_path}: field 'format_version' is {index['format_version']}, this version of "
            f"conceptkit reads version {FORMAT_VERSION}."
        )
    return index


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
#: Index fields that must agree between an existing store and a new extraction that resumes it.
RESUME_FIELDS = ("model", "layers", "pooling", "preprocessing", "forward_fn", "dtype", "storage",
                 "token_layout", "n_inputs")


def _diff(a: Any, b: Any, prefix: str) -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _diff(a.get(k), b.get(k), f"{prefix}.{k}")
            if d:
                return d
        return None
    return None if a == b else (prefix, a, b)


class StoreWriter:
    """Writes shards of an :class:`ActivationStore`, in a background thread, resumably.

    Used by :class:`~concepts.extractor.ConceptExtractor`; a writer for ``path=None`` keeps the
    shards in memory.

    Parameters
    ----------
    path : path or None
        Store directory (created if needed) or None for an in-memory store.
    header : dict
        Index fields: ``model`` (dict with ``fingerprint``), ``layers``, ``pooling`` (dict),
        ``dtype``, ``storage`` ("safetensors" or "npy"), ``preprocessing``, ``forward_fn``, ...
    overwrite : bool, default False
        Delete an existing store at ``path`` first (only its index and shard files).
    resume : bool, default False
        Continue an existing store at ``path`` whose header matches; see :attr:`samples_done`.
    async_write : bool, default True
        Serialise and write shards in a background thread (at most two shards pending).
    fsync : bool, default False
        ``fsync`` each file before it is moved into place (durability against power loss; a killed
        process never leaves a partial shard either way).

    Raises
    ------
    FileExistsError
        If ``path`` holds a store and neither ``resume`` nor ``overwrite`` is set, or holds other files.
    StoreMismatchError
        If resuming a store written with another model / layers / settings.

    Examples
    --------
    >>> w = StoreWriter(None, header)  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        header: dict[str, Any],
        *,
        overwrite: bool = False,
        resume: bool = False,
        async_write: bool = True,
        fsync: bool = False,
    ) -> None:
        storage = header.get("storage", "safetensors")
        if storage not in ("safetensors", "npy"):
            raise ValueError(f"storage must be 'safetensors' or 'npy', got {storage!r}.")
        dtype = resolve_dtype(header["dtype"])
        if storage == "npy" and dtype == torch.bfloat16:
            raise ValueError(
                "numpy .npy shards cannot hold bfloat16; use storage='safetensors' or store_dtype='float16' "
                "/ 'float32'."
            )
        self.path = None if path is None else Path(path)
        self.fsync = fsync
        self._memory: list[dict[str, Tensor]] | None = [] if self.path is None else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="conceptkit-store") if async_write else None
        self._pending: list[Future] = []
        index = {
            "format_version": FORMAT_VERSION,
            **_canonical(header),
            "dtype": dtype_name(dtype),  # type: ignore[arg-type]
            "storage": storage,
            "complete": False,
            "dims": {},
            "counts": {"samples": 0, "rows": {}},
            "shards": [],
        }
        self.samples_done = 0
        if self.path is not None:
            index = self._prepare_dir(index, overwrite=overwrite, resume=resume)
        self._index = index
        self.samples_done = int(sum(s["samples"] for s in index["shards"]))

    # -- directory handling ---------------------------------------------------------------------
    def _store_files(self) -> list[Path]:
        _require_folder(self.path)
        return [p for p in self.path.iterdir() if p.name == INDEX_FILE or p.name.startswith("shard_")
                or p.name == INDEX_FILE + ".tmp"]

    def _prepare_dir(self, index: dict[str, Any], *, overwrite: bool, resume: bool) -> dict[str, Any]:
        _require_folder(self.path)
        index_path = self.path / INDEX_FILE
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"store_path {self.path} exists and is not a directory.")
        self.path.mkdir(parents=True, exist_ok=True)
        if not index_path.exists():
            others = [p.name for p in self.path.iterdir() if not p.name.startswith("shard_")]
            if others:
                raise FileExistsError(
                    f"store_path {self.path} is not empty and holds no activation store ({others[:3]}...). "
                    "Choose an empty or new directory."
                )
            for p in self._store_files():  # stray shards of a run killed before its first index write
                p.unlink()
            return index
        if overwrite:
            for p in self._store_files():
                p.unlink()
            return index
        old = _read_index(index_path)
        if not resume:
            raise FileExistsError(
                f"An activation store already exists at {self.path} ({sum(s['samples'] for s in old['shards'])} "
                f"samples, complete={old.get('complete', False)}). Pass resume=True to continue it, "
                "overwrite=True to replace it, or choose another store_path."
            )
        for field in RESUME_FIELDS:
            d = _diff(old.get(field), index.get(field), field)
            if d:
                raise StoreMismatchError(
                    f"Cannot resume the store in {index_path}: field {d[0]!r} is {d[1]!r} in the store but "
                    f"{d[2]!r} for this extraction. Use the same model and settings, overwrite=True, or "
                    "another store_path."
                )
        if old.get("shard_size") and index.get("shard_size") and old["shard_size"] != index["shard_size"]:
            raise StoreMismatchError(
                f"Cannot resume the store in {index_path}: field 'shard_size' is {old['shard_size']} in the "
                f"store but {index['shard_size']} for this extraction."
            )
        # validate what is there, then drop files that the index does not list (a partial shard)
        reader = ActivationStore(self.path, old, verify="checksum")
        reader.verify()
        listed = {f["name"] for s in old["shards"] for f in s["files"]} | {INDEX_FILE}
        for p in self._store_files():
            if p.name not in listed:
                logger.info("removing incomplete shard file %s", p)
                p.unlink()
        for key in ("batch_size",):
            if old.get(key) != index.get(key):
                logger.warning(
                    "Resuming %s with %s=%s (the store was started with %s); results may differ in the last "
                    "bits from an uninterrupted run.", self.path, key, index.get(key), old.get(key))
        old["complete"] = False
        logger.info("resuming %s after %d samples in %d shards", self.path, sum(s["samples"] for s in old["shards"]),
                    len(old["shards"]))
        return old

    @property
    def index(self) -> dict[str, Any]:
        """The index as written so far."""
        return self._index

    @property
    def shard_size(self) -> int | None:
        """Samples per shard, once known."""
        return self._index.get("shard_size")

    def set(self, **fields: Any) -> None:
        """Set index fields (e.g. ``shard_size``, ``grid``) before the first shard is written."""
        self._index.update(_canonical(fields))

    # -- writing ------------------------------------------------------------------------------------
    def _write_index(self) -> None:
        _require_folder(self.path)
        data = json.dumps(self._index, indent=1, sort_keys=True).encode()
        _atomic_write(self.path / INDEX_FILE, data, self.fsync)

    def write_shard(
        self,
        tensors: dict[str, Tensor],
        n_samples: int,
        sample_start: int,
        skipped: list[list[Any]] | None = None,
    ) -> None:
        """Queue one complete shard (CPU tensors keyed by layer / ``layer::meta``) for writing.

        Parameters
        ----------
        tensors : dict of str to Tensor
            For each layer ``L``: ``L`` ``[rows, d]`` in the store dtype and ``L::image_index``; optional
            ``L::token_type`` and ``L::position``.
        n_samples : int
            Number of input samples in the shard.
        sample_start : int
            Global index of the shard's first sample.
        skipped : list of [position, source, reason], optional
            Inputs of this shard that could not be loaded.
        """
        self._raise_pending(block=len(self._pending) >= 2)
        if self._pool is None:
            self._write(tensors, n_samples, sample_start, skipped or [])
        else:
            self._pending.append(self._pool.submit(self._write, tensors, n_samples, sample_start, skipped or []))

    def _raise_pending(self, block: bool) -> None:
        if block and self._pending:
            self._pending.pop(0).result()
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()

    def _write(self, tensors: dict[str, Tensor], n_samples: int, sample_start: int, skipped: list[list[Any]]) -> None:
        index = self._index
        sid = len(index["shards"])
        if sample_start != index["counts"]["samples"]:
            raise RuntimeError(f"shard {sid} starts at sample {sample_start}, expected {index['counts']['samples']}")
        layers = index["layers"]
        rows = {l: int(tensors[l].shape[0]) for l in layers}
        meta_keys = {l: [k for k in META_KEYS if meta_key(l, k) in tensors] for l in layers}
        store_dtype = resolve_dtype(index["dtype"])
        for l in layers:
            if tensors[l].dtype != store_dtype or tensors[l].ndim != 2:
                raise ValueError(
                    f"Layer {l!r}: expected a 2-d {index['dtype']} tensor for this store, got "
                    f"{tuple(tensors[l].shape)} {dtype_name(tensors[l].dtype)}."
                )
            d = int(tensors[l].shape[1])
            if index["dims"].get(l, d) != d:
                raise StoreMismatchError(
                    f"Layer {l!r} has dimension {d} in this extraction but {index['dims'][l]} in the store "
                    f"{self.path or '(in memory)'}; field 'dims'."
                )
            index["dims"][l] = d
        entry: dict[str, Any] = {"index": sid, "sample_start": sample_start, "samples": int(n_samples),
                                 "rows": rows, "meta_keys": meta_keys, "files": []}
        if skipped:
            entry["skipped"] = _canonical(skipped)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        if self._memory is not None:
            self._memory.append(tensors)
        elif index["storage"] == "safetensors":
            name = f"shard_{sid:05d}.safetensors"
            # one metadata key holding sorted JSON: safetensors does not keep metadata key order, and
            # identical shards must be identical bytes (resumed == uninterrupted)
            meta = {"model_fingerprint": str(index["model"]["fingerprint"]), "layers": json.dumps(layers),
                    "shard": sid, "sample_start": sample_start}
            data = st_save(tensors, metadata={"conceptkit": json.dumps(meta, sort_keys=True)})
            _atomic_write(self.path / name, data, self.fsync)  # type: ignore[operator]
            entry["files"].append({"name": name, "bytes": len(data), "sha256": _sha256_bytes(data)})
        else:
            names = []
            for l in layers:
                names.append(l)
                names += [meta_key(l, k) for k in meta_keys[l]]
            for a, key in enumerate(names):
                buf = io.BytesIO()
                np.save(buf, tensors[key].numpy(), allow_pickle=False)
                data = buf.getbuffer()
                fname = _npy_name(sid, a)
                _atomic_write(self.path / fname, data, self.fsync)  # type: ignore[operator]
                entry["files"].append({"name": fname, "array": key, "bytes": len(data),
                                       "sha256": _sha256_bytes(data)})
        index["shards"].append(entry)
        index["counts"]["samples"] += int(n_samples)
        for l in layers:
            index["counts"]["rows"][l] = index["counts"]["rows"].get(l, 0) + rows[l]
        if self.path is not None:
            self._write_index()

    def wait(self) -> None:
        """Block until every queued shard is written (re-raises a writer error)."""
        while self._pending:
            self._pending.pop(0).result()

    def finish(self, **fields: Any) -> ActivationStore:
        """Wait for pending writes, mark the store complete and return it for reading.

        Parameters
        ----------
        **fields
            Extra index fields to record (e.g. ``n_inputs``).
        """
        self.wait()
        self._index.update(_canonical(fields))
        self._index["complete"] = True
        if self.path is not None:
            self._write_index()
        self.close()
        return ActivationStore(self.path, self._index, memory_shards=self._memory)

    def close(self) -> None:
        """Wait for queued shards and stop the writer thread (safe to call twice)."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
