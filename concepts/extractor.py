"""Plug any ``nn.Module`` in, get pooled activations of chosen layers out, sharded on disk.

:class:`ConceptExtractor` runs a model over images (arrays, tensors, PIL images, file paths, a
directory) or over the batches of a ``DataLoader``, records the outputs of named layers with forward
hooks, pools them (``cls``, ``mean``, ``tokens``, ``spatial``) inside the hook, checks they are finite,
and streams them into an :class:`~concepts.store.ActivationStore` whose shards are written in a
background thread. A killed extraction resumes from its last complete shard.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from .devices import dtype_name, resolve_device, resolve_dtype
from .hooks import primary_output, resolve_layers
from .images import ImageLoadError, describe_source, images_to_tensor, load_image
from .store import TOKEN_TYPES, ActivationStore, StoreWriter, meta_key

__all__ = [
    "ConceptExtractor",
    "NonFiniteActivationError",
    "POOLINGS",
    "infer_token_layout",
    "model_fingerprint",
]

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "tokens", "spatial")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_FP16_MAX = 65504.0


class NonFiniteActivationError(ValueError):
    """A layer produced NaN/Inf activations, or values that overflow the storage dtype."""


# ---------------------------------------------------------------------------------------------
# helpers: descriptions, fingerprints, token layouts
# ---------------------------------------------------------------------------------------------
def _describe_callable(fn: Any) -> str | None:
    """Stable description of a callable (no memory addresses), recorded in the store index."""
    if fn is None:
        return None
    if hasattr(fn, "__qualname__") and hasattr(fn, "__module__") and not isinstance(fn, nn.Module):
        return f"{fn.__module__}.{fn.__qualname__}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(fn))


def model_fingerprint(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """Identify a model cheaply: class, parameter count and a hash of a few values of every tensor.

    Parameters
    ----------
    model : nn.Module
        The model.
    name : str, optional
        A user-facing name (e.g. ``"ViT-B-32/laion2b"``), recorded as is.

    Returns
    -------
    dict
        ``{"name", "class", "n_params", "fingerprint"}``. Two models with the same architecture but
        different weights get different fingerprints.

    Examples
    --------
    >>> import torch.nn as nn
    >>> model_fingerprint(nn.Linear(2, 3))["n_params"]
    9
    """
    h = hashlib.sha256()
    n_params = 0
    for pname, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None:
            continue
        if isinstance(t, nn.Parameter):
            n_params += t.numel()
        flat = t.detach().reshape(-1)
        sample = torch.cat([flat[:16], flat[-16:]]) if flat.numel() > 32 else flat
        h.update(f"{pname}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(sample.to("cpu", torch.float64).numpy().tobytes())
    cls = type(model)
    return {
        "name": name if name is not None else cls.__name__,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "n_params": int(n_params),
        "fingerprint": h.hexdigest()[:32],
    }


def infer_token_layout(model: nn.Module) -> dict[str, int]:
    """Guess how many cls and register tokens precede the patch tokens of a ViT.

    Recognises open_clip ``VisionTransformer`` (``class_embedding``), transformers ViT/DINOv2/CLIP
    (``cls_token`` / ``class_embedding``, ``register_tokens``), and timm ViTs (``num_prefix_tokens``,
    ``reg_token``). Models without these attributes get ``{"cls": 0, "register": 0}`` (all patch).

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    dict
        ``{"cls": int, "register": int}``.

    Examples
    --------
    >>> import torch.nn as nn
    >>> infer_token_layout(nn.Linear(2, 2))
    {'cls': 0, 'register': 0}
    """
    n_cls = 0
    n_reg = 0
    for module in model.modules():
        if hasattr(module, "num_prefix_tokens") and isinstance(module.num_prefix_tokens, int):  # timm
            c = 1 if getattr(module, "cls_token", None) is not None else 0
            return {"cls": c, "register": int(module.num_prefix_tokens) - c}
        if n_cls == 0 and (
            isinstance(getattr(module, "class_embedding", None), (Tensor, nn.Parameter))
            or isinstance(getattr(module, "cls_token", None), (Tensor, nn.Parameter))
        ):
            n_cls = 1
        reg = getattr(module, "register_tokens", None)
        if isinstance(reg, (Tensor, nn.Parameter)) and reg.ndim >= 2 and n_reg == 0:
            n_reg = int(reg.shape[-2])
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "num_register_tokens", None):
        n_reg = int(cfg.num_register_tokens)
    return {"cls": n_cls, "register": n_reg}


# ---------------------------------------------------------------------------------------------
# input sources
# ---------------------------------------------------------------------------------------------
@dataclass
class _Batch:
    x: Tensor  # model-ready input [b, ...]
    positions: Tensor  # int64 [b] global input positions of the rows of x
    start: int  # first input position covered
    end: int  # input position after this batch
    index: int  # batch number in the input stream
    skipped: list[list[Any]] = field(default_factory=list)


def _first_tensor(item: Any) -> Tensor:
    if isinstance(item, Tensor):
        return item
    if isinstance(item, Mapping):
        for key in ("pixel_values", "images", "image", "x", "input"):
            if isinstance(item.get(key), Tensor):
                return item[key]
        for v in item.values():
            if isinstance(v, Tensor):
                return v
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0]
    raise TypeError(
        f"A batch from the loader is a {type(item).__name__}; expected a tensor, a (tensor, ...) tuple or a "
        "dict with a 'pixel_values' tensor."
    )


def _is_batch_item(item: Any) -> bool:
    if isinstance(item, Tensor):
        return True
    if isinstance(item, Mapping):
        return any(isinstance(v, Tensor) for v in item.values())
    return isinstance(item, (tuple, list)) and bool(item) and isinstance(item[0], Tensor)


class _Source:
    """Turns user inputs into model-ready batches with global positions."""

    def __init__(self, inputs: Any, ext: ConceptExtractor, on_error: str) -> None:
        self.ext = ext
        self.on_error = on_error
        self.n: int | None = None
        self.kind: str
        self._items: Any = None
        self._iterable: Iterable[Any] | None = None
        self._peeked: list[Any] = []
        if isinstance(inputs, (str, os.PathLike)) and Path(inputs).is_dir():
            files = sorted(p for p in Path(inputs).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
            self._set_images(files)
        elif isinstance(inputs, (str, os.PathLike, Image.Image, bytes)):
            self._set_images([inputs])
        elif isinstance(inputs, Tensor):
            if inputs.ndim == 0:
                raise ValueError("inputs is a 0-d tensor; expected a batch [n, ...].")
            if inputs.dtype == torch.uint8 or (ext.preprocess is not None and inputs.is_floating_point()):
                self._set_images(inputs)
            else:
                self.kind, self._items, self.n = "tensor", inputs, int(inputs.shape[0])
        elif isinstance(inputs, np.ndarray):
            if inputs.ndim >= 3 or inputs.dtype in (np.uint8, np.uint16, np.bool_):
                if inputs.ndim not in (3, 4):
                    raise ValueError(
                        f"An image batch array must be [n, H, W] or [n, H, W, C], got shape {inputs.shape}."
                    )
                self._set_images(inputs)
            else:
                self.kind, self._items, self.n = "tensor", torch.from_numpy(np.ascontiguousarray(inputs)), len(inputs)
        elif isinstance(inputs, Sequence):
            self._set_images(inputs)
        elif _is_map_dataset(inputs):
            if len(inputs) == 0:
                raise ValueError("No inputs: the dataset is empty. Pass at least one item.")
            first = inputs[0]
            if _is_batch_item(first):  # tensor items: collated into model-ready batches
                self.kind, self._items, self.n = "dataset", inputs, len(inputs)
            else:  # PIL images / arrays / paths, possibly as (image, label) tuples
                self._set_images(_DatasetImages(inputs))
        elif isinstance(inputs, Iterable):
            it = iter(inputs)
            try:
                first = next(it)
            except StopIteration:
                first = None
            self._peeked = [] if first is None else [first]
            self._iterable = it
            if first is None or _is_batch_item(first):
                self.kind = "loader"
                try:
                    self.n = len(inputs.dataset)  # type: ignore[attr-defined]
                except (AttributeError, TypeError):
                    self.n = None
            else:
                self.kind = "image_stream"
        else:
            raise TypeError(
                f"Unsupported inputs of type {type(inputs).__name__}: expected images (uint8 array [n, H, W, 3], "
                "tensor, list of PIL images / file paths, a directory) or a DataLoader / iterable of batches."
            )
        if self.n == 0:
            raise ValueError("No inputs: the input is empty. Pass at least one image or batch.")

    def _set_images(self, items: Any) -> None:
        self.kind, self._items, self.n = "images", items, len(items)

    @property
    def n_batches(self) -> int | None:
        if self.n is None or self.kind == "loader":  # a loader's batch size is its own
            return None
        return math.ceil(self.n / self.ext.batch_size)

    def describe_preprocessing(self) -> str | None:
        if self.kind in ("tensor", "loader", "dataset"):
            return "none (model-ready tensors)"
        if self.ext.preprocess is None:
            return "concepts.images.load_image -> float [0, 1] [n, 3, H, W]"
        return "concepts.images.load_image -> PIL -> " + str(_describe_callable(self.ext.preprocess))

    def _convert_images(self, items: Sequence[Any], lo: int) -> tuple[Tensor | None, Tensor, list[list[Any]]]:
        """Load/preprocess a chunk of images; returns (x, positions, skipped)."""
        ext = self.ext
        if (
            ext.preprocess is None
            and isinstance(items, np.ndarray)
            and items.dtype == np.uint8
            and items.ndim == 4
            and items.shape[-1] == 3
        ):  # fast path: one vectorised conversion
            x = torch.from_numpy(np.ascontiguousarray(items)).permute(0, 3, 1, 2).float().div_(255.0)
            return x, torch.arange(lo, lo + len(items)), []
        arrays: list[np.ndarray] = []
        positions: list[int] = []
        skipped: list[list[Any]] = []
        for i, src in enumerate(items):
            if isinstance(src, tuple) and src:  # (image, label, ...) items
                src = src[0]
            try:
                arrays.append(load_image(src, **ext.image_kwargs))
                positions.append(lo + i)
            except ImageLoadError as exc:
                if self.on_error == "raise":
                    raise
                skipped.append([lo + i, describe_source(src), str(exc)])
                logger.warning("skipping input %d: %s", lo + i, exc)
        if not arrays:
            return None, torch.zeros(0, dtype=torch.long), skipped
        if ext.preprocess is None:
            x = images_to_tensor(np.stack(arrays) if all(a.shape == arrays[0].shape for a in arrays) else arrays)
        else:
            outs = [ext.preprocess(Image.fromarray(a)) for a in arrays]
            if not all(isinstance(o, Tensor) for o in outs):
                raise TypeError(
                    f"preprocess returned {type(outs[0]).__name__}; expected a tensor [C, H, W] per image "
                    "(e.g. a torchvision / open_clip transform ending in ToTensor/Normalize)."
                )
            x = torch.stack(outs)
        return x, torch.tensor(positions, dtype=torch.long), skipped

    def batches(self, start: int) -> Iterator[_Batch]:
        bs = self.ext.batch_size
        if self.kind in ("images", "tensor"):
            if self.n is None:
                raise RuntimeError(f"the {self.kind} source has no length; pass a sized collection of images or a tensor.")
            for k in range(start // bs, math.ceil(self.n / bs)):
                lo, hi = k * bs, min(self.n, (k + 1) * bs)
                if self.kind == "tensor":
                    yield _Batch(self._items[lo:hi], torch.arange(lo, hi), lo, hi, k)
                else:
                    x, pos, skipped = self._convert_images(self._items[lo:hi], lo)
                    yield _Batch(x, pos, lo, hi, k, skipped)  # type: ignore[arg-type]
            return
        if self.kind == "dataset":
            from torch.utils.data import DataLoader, Subset

            if self.n is None:
                raise RuntimeError("the dataset source has no length; pass a map-style Dataset with __len__.")
            k0 = start // bs
            loader = DataLoader(Subset(self._items, range(k0 * bs, self.n)), batch_size=bs, shuffle=False)
            for j, item in enumerate(loader):
                x = _first_tensor(item)
                lo = (k0 + j) * bs
                yield _Batch(x, torch.arange(lo, lo + len(x)), lo, lo + len(x), k0 + j)
            return
        if self._iterable is None:
            raise RuntimeError("this stream of images was already consumed; an iterable source can be extracted once -- pass a list or a Dataset to extract again.")
        stream = _chain(self._peeked, self._iterable)
        self._iterable = None  # one pass only
        pos = 0
        if self.kind == "loader":
            for k, item in enumerate(stream):
                x = _first_tensor(item)
                b = int(x.shape[0])
                if pos + b <= start:
                    pos += b
                    continue
                yield _Batch(x, torch.arange(pos, pos + b), pos, pos + b, k)
                pos += b
            return
        chunk: list[Any] = []
        k = 0
        for item in stream:
            chunk.append(item)
            if len(chunk) == bs:
                if pos + bs > start:
                    x, p, sk = self._convert_images(chunk, pos)
                    yield _Batch(x, p, pos, pos + bs, k, sk)  # type: ignore[arg-type]
                pos, k, chunk = pos + bs, k + 1, []
        if chunk and pos + len(chunk) > start:
            x, p, sk = self._convert_images(chunk, pos)
            yield _Batch(x, p, pos, pos + len(chunk), k, sk)  # type: ignore[arg-type]


def _is_map_dataset(obj: Any) -> bool:
    from torch.utils.data import Dataset, IterableDataset

    return isinstance(obj, Dataset) and not isinstance(obj, IterableDataset) and hasattr(obj, "__len__")


class _DatasetImages(Sequence):
    """A map-style dataset of images (or ``(image, ...)`` tuples) seen as a sequence of images."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        item = self.dataset[i]
        return item[0] if isinstance(item, tuple) else item


def _chain(first: list[Any], rest: Iterable[Any]) -> Iterator[Any]:
    yield from first
    yield from rest


# ---------------------------------------------------------------------------------------------
# the extractor
# ---------------------------------------------------------------------------------------------
class ConceptExtractor:
    """Record, pool and store the activations of named layers of any ``nn.Module``.

    Parameters
    ----------
    model : nn.Module
        Any PyTorch model. It is put in eval mode during extraction (restored afterwards) and moved
        to ``device`` / ``dtype`` in place when those are given.
    layers : str or sequence of str
        Layer names (see :func:`concepts.hooks.available_layers`); all are recorded in one pass.
        ``""`` is the return value of ``forward_fn`` itself (e.g. the embedding returned by
        ``encode_image``).
    pooling : {"cls", "mean", "tokens", "spatial"} or dict of layer to pooling, default "mean"
        How a layer output becomes rows (``[B, D]`` outputs are kept as they are for cls/mean):

        * ``"cls"``: token 0 of a ``[B, T, D]`` token sequence -> one row per sample.
        * ``"mean"``: mean over the *patch* tokens of ``[B, T, D]`` (cls and register tokens are
          excluded), or over ``H, W`` of a conv map ``[B, C, H, W]`` -> one row per sample.
        * ``"tokens"``: every token of ``[B, T, D]`` -> ``B*T`` rows, with per-row ``token_type``
          (cls / register / patch), ``position`` (token index) and ``image_index``.
          On a conv map it behaves like ``"spatial"``.
        * ``"spatial"``: every position of a conv map ``[B, C, H, W]`` -> ``B*H*W`` rows of ``C``
          values, with ``position = h * W + w`` and ``image_index``; the grid ``(H, W)`` is recorded
          in the index.
    preprocess : callable, optional
        Per-image transform applied to a PIL image (torchvision / open_clip style), returning a
        tensor ``[C, H, W]``. Without it, images become float tensors in ``[0, 1]`` (same size
        required). Model-ready inputs (float tensors without ``preprocess``, DataLoader batches)
        are never preprocessed.
    forward_fn : callable, optional
        ``forward_fn(model, x)`` runs the model; default ``model(x)``. E.g.
        ``lambda m, x: m.encode_image(x)`` for open_clip models.
    device : str or torch.device, optional
        ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``; default: where the model already is.
    dtype : str or torch.dtype, optional
        Run the model in this dtype (the model is cast); default: the model's dtype.
    batch_size : int, default 64
        Images per forward pass (loader batches keep their own size).
    store_dtype : str or torch.dtype, default "float32"
        Storage dtype. ``float16``/``bfloat16`` are used only after a finite and range check.
    storage : {"safetensors", "npy"}, default "safetensors"
        Shard format (``npy`` shards are memory-mappable numpy files).
    shard_size : int, optional
        Input samples per shard; default: about ``shard_bytes`` per shard, rounded to batches.
    shard_bytes : int, default 128 MiB
        Target shard size when ``shard_size`` is None.
    token_layout : "auto" or dict, default "auto"
        ``{"cls": n, "register": m}``: the first ``n`` tokens are cls, the next ``m`` registers, the
        rest patches. ``"auto"`` uses :func:`infer_token_layout`.
    check_finite : bool, default True
        Raise :class:`NonFiniteActivationError` (naming the batch and the layer) on NaN/Inf.
    model_name : str, optional
        Name recorded in the index (default: the model class name).
    image_kwargs : dict, optional
        Passed to :func:`concepts.images.load_image` (``background``, ``max_pixels``, ...).
    progress : bool, default True
        Show a tqdm progress bar.

    Examples
    --------
    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> ext = ConceptExtractor(model, ["layer3", "layer4"], pooling={"layer3": "mean", "layer4": "spatial"},
    ...                        progress=False)
    >>> store = ext.extract(torch.rand(8, 3, 64, 64))
    >>> store.read("layer3").shape, store.read("layer4").shape
    (torch.Size([8, 256]), torch.Size([32, 512]))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        *,
        pooling: str | Mapping[str, str] = "mean",
        preprocess: Callable[[Image.Image], Tensor] | None = None,
        forward_fn: Callable[[nn.Module, Tensor], Any] | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 64,
        store_dtype: str | torch.dtype = "float32",
        storage: Literal["safetensors", "npy"] = "safetensors",
        shard_size: int | None = None,
        shard_bytes: int = 128 * 2**20,
        token_layout: Literal["auto"] | Mapping[str, int] = "auto",
        check_finite: bool = True,
        model_name: str | None = None,
        image_kwargs: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}. Wrap plain callables with "
                "concepts.encoders.CallableEncoder or an nn.Module."
            )
        self.model = model
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        resolve_layers(model, self.layers)  # fail fast on misspelt names
        self.pooling = self._check_pooling(pooling)
        if preprocess is not None and not callable(preprocess):
            raise TypeError(f"preprocess must be callable (PIL image -> tensor), got {type(preprocess).__name__}.")
        if forward_fn is not None and not callable(forward_fn):
            raise TypeError(f"forward_fn must be callable (model, x) -> output, got {type(forward_fn).__name__}.")
        self.preprocess = preprocess
        self.forward_fn = forward_fn
        self.device = None if device is None else resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size = int(batch_size)
        self.store_dtype = resolve_dtype(store_dtype)
        if storage not in ("safetensors", "npy"):
            raise ValueError(f"storage must be 'safetensors' or 'npy', got {storage!r}.")
        if storage == "npy" and self.store_dtype == torch.bfloat16:
            raise ValueError(
                "numpy .npy shards cannot hold bfloat16; use storage='safetensors' or store_dtype='float16' / "
                "'float32'."
            )
        self.storage = storage
        if shard_size is not None and (not isinstance(shard_size, (int, np.integer)) or shard_size < 1):
            raise ValueError(f"shard_size must be a positive integer (samples per shard), got {shard_size!r}.")
        self.shard_size = None if shard_size is None else int(shard_size)
        self.shard_bytes = int(shard_bytes)
        if token_layout != "auto":
            if not isinstance(token_layout, Mapping) or set(token_layout) - {"cls", "register"}:
                raise ValueError(
                    f"token_layout must be 'auto' or a dict like {{'cls': 1, 'register': 4}}, got {token_layout!r}."
                )
            token_layout = {"cls": int(token_layout.get("cls", 0)), "register": int(token_layout.get("register", 0))}
        self.token_layout = token_layout
        self.check_finite = bool(check_finite)
        self.model_name = model_name
        self.image_kwargs = dict(image_kwargs or {})
        self.progress = progress

    def _check_pooling(self, pooling: str | Mapping[str, str]) -> dict[str, str]:
        if isinstance(pooling, str):
            per_layer = {layer: pooling for layer in self.layers}
        elif isinstance(pooling, Mapping):
            unknown = set(pooling) - set(self.layers)
            if unknown:
                raise ValueError(f"pooling names layers {sorted(unknown)} that are not in layers={self.layers}.")
            missing = [layer for layer in self.layers if layer not in pooling]
            if missing:
                raise ValueError(f"pooling has no entry for layers {missing}; give one pooling per layer.")
            per_layer = dict(pooling)
        else:
            raise TypeError(f"pooling must be a string or a dict {{layer: pooling}}, got {type(pooling).__name__}.")
        for layer, p in per_layer.items():
            if p not in POOLINGS:
                raise ValueError(f"Unknown pooling {p!r} for layer {layer!r}; expected one of {POOLINGS}.")
        return per_layer

    def __repr__(self) -> str:
        return (
            f"ConceptExtractor({type(self.model).__name__}, layers={self.layers}, pooling={self.pooling}, "
            f"batch_size={self.batch_size}, store_dtype={dtype_name(self.store_dtype)})"  # type: ignore[arg-type]
        )

    # -- pooling ---------------------------------------------------------------------------------
    def _pool(self, layer: str, out: Tensor, batch: int, layout: dict[str, int]) -> tuple[dict[str, Tensor], Any]:
        """Turn a layer output into rows; returns ({"": rows [r, d], meta...}, grid)."""
        mode = self.pooling[layer]
        shape = tuple(out.shape)
        if out.ndim == 2:
            if out.shape[0] != batch:
                raise ValueError(
                    f"Layer {layer!r} returned shape {shape}, whose first dimension is not the batch size {batch}."
                )
            if mode in ("tokens", "spatial"):
                raise ValueError(
                    f"Layer {layer!r} returns one vector per sample {shape}; pooling={mode!r} needs tokens "
                    "[B, T, D] or a conv map [B, C, H, W]. Use pooling='mean' (or 'cls') for this layer."
                )
            return {"": out}, None
        if out.ndim == 3:
            if out.shape[0] != batch and out.shape[1] == batch:
                out = out.transpose(0, 1)  # sequence-first [T, B, D]
            elif out.shape[0] != batch:
                raise ValueError(
                    f"Layer {layer!r} returned shape {shape} with no batch dimension of size {batch}."
                )
            n_tok = out.shape[1]
            n_prefix = layout["cls"] + layout["register"]
            if mode == "cls":
                if layout["cls"] < 1:
                    raise ValueError(
                        f"pooling='cls' for layer {layer!r}, but the model has no cls token (token_layout="
                        f"{layout}). Use pooling='mean' or pass token_layout={{'cls': 1, 'register': 0}}."
                    )
                return {"": out[:, 0]}, None
            if mode == "mean":
                if n_tok <= n_prefix:
                    raise ValueError(
                        f"Layer {layer!r} has {n_tok} tokens but token_layout {layout} leaves no patch tokens to average."
                    )
                return {"": out[:, n_prefix:].mean(dim=1)}, None
            if mode == "spatial":
                raise ValueError(
                    f"Layer {layer!r} returns tokens {shape}; pooling='spatial' is for conv maps [B, C, H, W]. "
                    "Use pooling='tokens'."
                )
            if n_tok < n_prefix:
                raise ValueError(f"Layer {layer!r} has {n_tok} tokens, fewer than token_layout {layout} prefixes.")
            types = torch.full((n_tok,), TOKEN_TYPES["patch"], dtype=torch.uint8)
            types[: layout["cls"]] = TOKEN_TYPES["cls"]
            types[layout["cls"]: n_prefix] = TOKEN_TYPES["register"]
            rows = out.reshape(batch * n_tok, out.shape[2])
            meta = {
                "token_type": types.repeat(batch),
                "position": torch.arange(n_tok, dtype=torch.int32).repeat(batch),
                "repeat": n_tok,
            }
            return {"": rows, **meta}, None
        if out.ndim == 4:
            if out.shape[0] != batch:
                raise ValueError(f"Layer {layer!r} returned shape {shape}; expected [B={batch}, C, H, W].")
            if mode == "cls":
                raise ValueError(
                    f"Layer {layer!r} returns a conv map {shape}, which has no cls token; use pooling='mean' or "
                    "'spatial'."
                )
            if mode == "mean":
                return {"": out.mean(dim=(2, 3))}, None
            _, c, h, w = out.shape
            rows = out.permute(0, 2, 3, 1).reshape(batch * h * w, c)
            meta = {
                "token_type": torch.full((batch * h * w,), TOKEN_TYPES["patch"], dtype=torch.uint8),
                "position": torch.arange(h * w, dtype=torch.int32).repeat(batch),
                "repeat": h * w,
            }
            return {"": rows, **meta}, [int(h), int(w)]
        raise ValueError(
            f"Layer {layer!r} returned a {out.ndim}-d output {shape}; supported are [B, D], [B, T, D] and "
            "[B, C, H, W]."
        )

    # -- extraction ------------------------------------------------------------------------------
    def _header(self, source: _Source, layout: dict[str, int]) -> dict[str, Any]:
        return {
            "model": model_fingerprint(self.model, self.model_name),
            "layers": self.layers,
            "pooling": self.pooling,
            "preprocessing": source.describe_preprocessing(),
            "forward_fn": _describe_callable(self.forward_fn) or "model(x)",
            "dtype": dtype_name(self.store_dtype),  # type: ignore[arg-type]
            "model_dtype": None,
            "storage": self.storage,
            "token_layout": layout,
            "token_type_codes": TOKEN_TYPES,
            "n_inputs": source.n if source.kind != "loader" else None,
            "batch_size": self.batch_size if source.kind != "loader" else None,
            "input_kind": source.kind,
            "torch": torch.__version__,
            **({"shard_size": self.shard_size} if self.shard_size else {}),
        }

    def extract(
        self,
        inputs: Any,
        store_path: str | os.PathLike | None = None,
        *,
        overwrite: bool = False,
        resume: bool = False,
        on_error: Literal["raise", "skip"] = "raise",
        metadata: Mapping[str, Any] | None = None,
    ) -> ActivationStore:
        """Run the model over ``inputs`` and store the pooled activations.

        Parameters
        ----------
        inputs : images, tensor, DataLoader or iterable
            ``uint8 [n, H, W, 3]`` arrays, tensors (float tensors are model-ready unless
            ``preprocess`` is set; uint8 tensors are images), a list of PIL images / file paths /
            arrays, a directory of image files, or a DataLoader / iterable of batches (a tensor, a
            ``(tensor, ...)`` tuple or a dict with ``pixel_values``), or a map-style ``Dataset`` (tensor items
            are collated into batches of ``batch_size``; image items are loaded like a list of images).
        store_path : path, optional
            Directory of the store. None keeps the activations in memory.
        overwrite : bool, default False
            Replace an existing store at ``store_path``.
        resume : bool, default False
            Continue an existing store made with the same model and settings, skipping the inputs
            already stored (pass the same inputs in the same order).
        on_error : {"raise", "skip"}, default "raise"
            Unreadable image files raise, or are skipped and listed in ``store.metadata['skipped']``.
        metadata : dict, optional
            Extra JSON-serialisable fields recorded in the index under ``"extra"``.

        Returns
        -------
        ActivationStore

        Raises
        ------
        ValueError
            For empty inputs, unsupported layer shapes for the pooling, or a bad ``on_error``.
        NonFiniteActivationError
            When a layer produces NaN/Inf (or values beyond the float16 range when storing float16).
        FileExistsError, concepts.store.StoreMismatchError
            When ``store_path`` holds another store (see ``resume`` / ``overwrite``).

        Examples
        --------
        >>> store = ext.extract(images, "acts/", resume=True)  # doctest: +SKIP
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        model = self.model
        if self.device is not None or self.dtype is not None:
            model.to(device=self.device, dtype=self.dtype)
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        device = self.device or (param.device if param is not None else torch.device("cpu"))
        model_dtype = self.dtype or (param.dtype if param is not None else torch.float32)
        layout = infer_token_layout(model) if self.token_layout == "auto" else dict(self.token_layout)
        source = _Source(inputs, self, on_error)
        header = self._header(source, layout)
        header["model_dtype"] = dtype_name(model_dtype)
        if metadata is not None:
            header["extra"] = dict(metadata)
        writer = StoreWriter(store_path, header, overwrite=overwrite, resume=resume)
        done = writer.samples_done
        if writer.index.get("complete") or (source.n is not None and done >= source.n):
            logger.info("store %s is complete (%d inputs); nothing to extract", store_path, done)
            return writer.finish()
        if done:
            logger.info("resuming extraction after %d stored inputs", done)
        # "" is the return value of forward_fn (e.g. encode_image), captured without a hook
        modules = {k: v for k, v in resolve_layers(model, self.layers).items() if k != ""}
        shard_size = writer.shard_size
        forward = self.forward_fn or (lambda m, x: m(x))

        captured: dict[str, Any] = {}
        state: dict[str, Any] = {"batch": 0}

        def make_hook(name: str) -> Callable[..., None]:
            def hook(_m: nn.Module, _args: Any, output: Any) -> None:
                if name in captured:
                    raise RuntimeError(
                        f"Layer {name!r} was called more than once in one forward pass; the extractor expects one "
                        "call per forward. Use concepts.hooks.record for layers that are called repeatedly."
                    )
                capture(name, output)

            return hook

        def capture(name: str, output: Any) -> None:
            out = primary_output(output)
            pooled, grid = self._pool(name, out, state["batch"], layout)
            rows = pooled[""].detach()
            if rows.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
                rows = rows.clone()  # a view: later in-place ops (e.g. ReLU(inplace=True)) would change it
            pooled[""] = rows
            captured[name] = (pooled, grid)

        state["capture_output"] = capture if "" in self.layers else None

        buffers: dict[str, list[Tensor]] = {}
        buf_start = done  # first input position of the current (unflushed) shard
        buf_end = done
        grids: dict[str, Any] = {}
        skipped_buf: list[list[Any]] = []

        def flush(boundary: int) -> None:
            nonlocal buffers, skipped_buf, buf_start
            tensors = {k: (torch.cat(v) if len(v) > 1 else v[0]) for k, v in buffers.items() if v}
            shard: dict[str, Tensor] = {}
            rest: dict[str, list[Tensor]] = {}
            for layer in self.layers:
                idx = tensors.get(meta_key(layer, "image_index"))
                if idx is None:  # every input of this shard was skipped
                    if layer not in writer.index["dims"]:
                        raise ValueError(
                            f"None of the inputs {buf_start}-{boundary - 1} could be loaded, so the shape of layer "
                            f"{layer!r} is unknown; nothing to store. See the logged skipped files."
                        )
                    shard[layer] = torch.zeros(0, writer.index["dims"][layer], dtype=self.store_dtype)
                    shard[meta_key(layer, "image_index")] = torch.zeros(0, dtype=torch.int64)
                    if self.pooling[layer] in ("tokens", "spatial"):
                        shard[meta_key(layer, "token_type")] = torch.zeros(0, dtype=torch.uint8)
                        shard[meta_key(layer, "position")] = torch.zeros(0, dtype=torch.int32)
                    continue
                cut = int(torch.searchsorted(idx, torch.tensor(boundary)).item())
                for key in [layer] + [meta_key(layer, k) for k in ("image_index", "token_type", "position")]:
                    if key not in tensors:
                        continue
                    t = tensors[key]
                    shard[key] = t[:cut]
                    rest[key] = [t[cut:]] if cut < len(t) else []
            sk = [s for s in skipped_buf if s[0] < boundary]
            skipped_buf = [s for s in skipped_buf if s[0] >= boundary]
            writer.write_shard(shard, boundary - buf_start, buf_start, skipped=sk)
            buffers = rest
            buf_start = boundary

        was_training = model.training
        handles = [module.register_forward_hook(make_hook(name)) for name, module in modules.items()]
        n_batches = source.n_batches
        first_batch = done // self.batch_size if source.kind in ("images", "tensor", "dataset") else 0
        bar = tqdm(total=None if n_batches is None else n_batches - first_batch, disable=not self.progress,
                   desc="extracting", unit="batch")
        try:
            model.eval()
            with torch.no_grad():
                for batch in source.batches(done):
                    skipped_buf.extend(batch.skipped)
                    buf_end = batch.end
                    if batch.x is not None and len(batch.positions):
                        self._run_batch(model, forward, batch, device, model_dtype, captured, state, done,
                                        buffers, grids)
                    bar.update(1)
                    if shard_size is None:
                        shard_size = self._auto_shard_size(buffers, buf_end - buf_start, source)
                        if shard_size is not None:
                            writer.set(shard_size=shard_size)
                    while shard_size is not None and buf_end - buf_start >= shard_size:
                        if grids and "grid" not in writer.index:
                            writer.set(grid=grids)
                        flush(buf_start + shard_size)
            if buf_end == 0 and done == 0:
                raise ValueError("No inputs: the loader / iterable yielded no batches.")
            if buf_end > buf_start or (not writer.index["shards"] and buf_end > 0):
                if grids and "grid" not in writer.index:
                    writer.set(grid=grids)
                if shard_size is None:
                    writer.set(shard_size=max(buf_end - buf_start, 1))
                flush(buf_end)
            return writer.finish()
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
            bar.close()
            writer.close()

    def _auto_shard_size(self, buffers: dict[str, list[Tensor]], n_samples: int, source: _Source) -> int | None:
        if self.shard_size is not None:
            return self.shard_size
        if not buffers or n_samples == 0:
            return None
        nbytes = sum(t.numel() * t.element_size() for v in buffers.values() for t in v)
        per_sample = max(1.0, nbytes / n_samples)
        size = int(self.shard_bytes // per_sample)
        step = self.batch_size if source.kind != "loader" else max(1, n_samples)
        return max(step, (size // step) * step)

    def _run_batch(
        self,
        model: nn.Module,
        forward: Callable[[nn.Module, Tensor], Any],
        batch: _Batch,
        device: torch.device,
        model_dtype: torch.dtype,
        captured: dict[str, Any],
        state: dict[str, Any],
        done: int,
        buffers: dict[str, list[Tensor]],
        grids: dict[str, Any],
    ) -> None:
        x = batch.x
        x = x.to(device=device, dtype=model_dtype if x.is_floating_point() else None, non_blocking=True)
        state["batch"] = int(x.shape[0])
        captured.clear()
        result = forward(model, x)
        if state.get("capture_output") is not None:
            state["capture_output"]("", result)
        missing = [layer for layer in self.layers if layer not in captured]
        if missing:
            raise RuntimeError(
                f"Layer(s) {missing} were not called during the forward pass of batch {batch.index}; check "
                "forward_fn (e.g. lambda m, x: m.encode_image(x)) and the layer names."
            )
        if self.check_finite:
            flags = torch.stack([torch.isfinite(captured[layer][0][""]).all() for layer in self.layers])
            if not bool(flags.all()):
                bad = [layer for layer, ok in zip(self.layers, flags.tolist()) if not ok]
                rows = captured[bad[0]][0][""]
                raise NonFiniteActivationError(
                    f"Layer {bad[0]!r} produced non-finite activations in batch {batch.index} (inputs "
                    f"{batch.start}-{batch.end - 1}): {int(torch.isnan(rows).sum())} NaN and "
                    f"{int(torch.isinf(rows).sum())} Inf values"
                    + (f"; also layers {bad[1:]}" if len(bad) > 1 else "")
                    + ". Check the inputs and the model dtype (fp16 overflows above 65504), or pass "
                    "check_finite=False to store them anyway."
                )
        if self.store_dtype == torch.float16:
            for layer in self.layers:
                rows = captured[layer][0][""]
                peak = float(rows.abs().max()) if rows.numel() else 0.0
                if peak > _FP16_MAX:
                    raise NonFiniteActivationError(
                        f"Layer {layer!r} has values up to {peak:.4g} in batch {batch.index}, beyond the float16 "
                        f"range ({_FP16_MAX:g}); they would be stored as Inf. Use store_dtype='bfloat16' or "
                        "'float32'."
                    )
        positions = batch.positions
        keep = None
        if int(positions[0]) < done:  # resumed mid-batch: drop rows already stored
            keep = positions >= done
        for layer in self.layers:
            pooled, grid = captured[layer]
            if grid is not None:
                grids[layer] = grid
            rows = pooled[""].to(dtype=self.store_dtype)
            rep = pooled.get("repeat")
            index = positions if rep is None else positions.repeat_interleave(rep)
            parts = {layer: rows, meta_key(layer, "image_index"): index}
            if rep is not None:
                parts[meta_key(layer, "token_type")] = pooled["token_type"]
                parts[meta_key(layer, "position")] = pooled["position"]
            if keep is not None:
                row_keep = keep if rep is None else keep.repeat_interleave(rep)
                parts = {k: v[row_keep.to(v.device)] for k, v in parts.items()}
            for key, t in parts.items():
                buffers.setdefault(key, []).append(t.to("cpu", non_blocking=False))
        captured.clear()
