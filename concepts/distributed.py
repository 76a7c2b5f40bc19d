"""Sharded extraction with ``torch.distributed``: every rank extracts a slice into its own sub-store.

Layout of a distributed store directory::

    index.json          merged index: every rank's shards in global sample order (no data copied)
    rank-00000/         an ordinary store (index.json + shards) holding samples [0, n_0)
    rank-00001/         samples [n_0, n_0 + n_1) ...

Each rank runs :meth:`~concepts.extractor.ConceptExtractor.extract` on a contiguous slice of the
inputs into ``rank-<r>/`` with the existing :class:`~concepts.store.StoreWriter`, so a rank that dies
is restarted with ``resume=True`` and continues from its last complete shard. When every sub-store is
complete, the merged ``index.json`` is written (by rank 0 after a barrier when a process group is up;
otherwise by whichever rank finds all sub-stores complete — the content is deterministic, so a race
writes the same bytes). :meth:`ActivationStore.open` reads the merged store like any other: file names
in the merged index are relative (``rank-00001/shard_00000.safetensors``) and each shard entry carries
an ``image_offset`` added to its stored ``image_index``, so the merged store reads back exactly what a
single-process extraction of the same inputs stores.

Run it under ``torchrun``::

    torchrun --nproc-per-node 4 -m evaluation.cli extract --n 100000 --out acts/
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from .store import INDEX_FILE, ActivationStore, StoreError, _read_index

__all__ = [
    "DistInfo",
    "dist_info",
    "init_distributed",
    "barrier",
    "rank_range",
    "rank_store_path",
    "merge_rank_stores",
    "extract_distributed",
]

logger = logging.getLogger(__name__)

RANK_DIR = "rank-{:05d}"


@dataclass(frozen=True)
class DistInfo:
    """Rank of this process and number of processes (``world_size``); ``initialized`` if a group is up."""

    rank: int
    world_size: int
    local_rank: int
    initialized: bool

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size from the process group, else from torchrun's environment, else ``(0, 1)``.

    Examples
    --------
    >>> dist_info().world_size  # doctest: +SKIP
    1
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                    int(os.environ.get("LOCAL_RANK", 0)), False)


def init_distributed(backend: str | None = None) -> DistInfo:
    """Initialise the default process group from torchrun's environment when ``WORLD_SIZE > 1``.

    Parameters
    ----------
    backend : str, optional
        ``"gloo"`` (CPU) or ``"nccl"`` (GPU); default: nccl when CUDA is available, else gloo.

    Returns
    -------
    DistInfo
        Unchanged (rank 0 of 1) when not launched by torchrun.

    Examples
    --------
    >>> info = init_distributed()  # under torchrun --nproc-per-node 2  # doctest: +SKIP
    """
    info = dist_info()
    if info.initialized or info.world_size <= 1:
        return info
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return dist_info()


def barrier() -> None:
    """``dist.barrier()`` when a process group is up; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank_range(n: int, rank: int, world_size: int) -> range:
    """Contiguous slice of ``range(n)`` for ``rank`` (sizes differ by at most one; earlier ranks larger).

    Raises
    ------
    ValueError
        If ``world_size < 1`` or ``rank`` is not in ``[0, world_size)``.

    Examples
    --------
    >>> rank_range(10, 1, 3)
    range(4, 7)
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}) for world_size={world_size}, got {rank}.")
    q, r = divmod(int(n), world_size)
    start = rank * q + min(rank, r)
    return range(start, start + q + (1 if rank < r else 0))


def rank_store_path(store_path: str | os.PathLike, rank: int) -> Path:
    """Sub-store directory of ``rank`` inside a distributed store, ``store_path/rank-<rank:05d>``."""
    return Path(store_path) / RANK_DIR.format(rank)


def _slice_inputs(inputs: Any, r: range) -> Any:
    if isinstance(inputs, (torch.Tensor, list, tuple, _LazyWorld)) or (
            hasattr(inputs, "__array__") and hasattr(inputs, "shape")):
        return inputs[r.start:r.stop]
    if isinstance(inputs, torch.utils.data.Dataset) and hasattr(inputs, "__len__"):
        return torch.utils.data.Subset(inputs, list(r))
    raise TypeError(
        f"extract_distributed needs inputs it can split by position (a tensor, numpy array, list of images "
        f"or paths, or a map-style Dataset with __len__); got {type(inputs).__name__}. Wrap a DataLoader's "
        "dataset instead of the loader."
    )


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def merge_rank_stores(
    store_path: str | os.PathLike, world_size: int, *, sizes: list[int] | None = None
) -> ActivationStore | None:
    """Write the merged ``index.json`` of a distributed store once every rank's sub-store is complete.

    Parameters
    ----------
    store_path : path
        The distributed store directory.
    world_size : int
        Number of ranks that wrote ``rank-00000`` ... ``rank-<world_size-1>``.
    sizes : list of int, optional
        Expected samples per rank (a rank with 0 has no sub-store). Default: every rank has one.

    Returns
    -------
    ActivationStore or None
        The merged store, or None while some sub-store is missing or incomplete.

    Raises
    ------
    concepts.store.StoreMismatchError
        If the sub-stores were made with different models, layers or settings.

    Examples
    --------
    >>> merge_rank_stores("acts/", 2)  # doctest: +SKIP
    """
    from .store import StoreMismatchError

    root = Path(store_path)
    subs: list[tuple[int, dict[str, Any]]] = []
    for rank in range(world_size):
        if sizes is not None and sizes[rank] == 0:
            continue
        ip = rank_store_path(root, rank) / INDEX_FILE
        if not ip.is_file():
            return None
        idx = _read_index(ip)
        if not idx.get("complete", False):
            return None
        subs.append((rank, idx))
    if not subs:
        raise StoreError(f"No rank sub-stores to merge in {root}.")
    merged = copy.deepcopy(subs[0][1])
    merged["shards"] = []
    merged["counts"] = {"samples": 0, "rows": {}}
    merged["ranks"] = []
    offset = 0
    for rank, idx in subs:
        for field in ("model", "layers", "pooling", "dtype", "storage", "preprocessing"):
            if idx.get(field) != merged.get(field):
                raise StoreMismatchError(
                    f"Cannot merge {rank_store_path(root, rank)}: field {field!r} differs from rank "
                    f"{subs[0][0]}'s sub-store. Re-extract every rank with the same model and settings."
                )
        sub = RANK_DIR.format(rank)
        for shard in idx["shards"]:
            entry = copy.deepcopy(shard)
            entry["index"] = len(merged["shards"])
            entry["sample_start"] = int(shard["sample_start"]) + offset
            entry["image_offset"] = offset
            entry["rank"] = rank
            for f in entry["files"]:
                f["name"] = f"{sub}/{f['name']}"
            if entry.get("skipped"):
                entry["skipped"] = [[int(s[0]) + offset, *s[1:]] for s in entry["skipped"]]
            merged["shards"].append(entry)
        merged["dims"].update(idx.get("dims", {}))
        for layer, rows in idx["counts"]["rows"].items():
            merged["counts"]["rows"][layer] = merged["counts"]["rows"].get(layer, 0) + int(rows)
        merged["counts"]["samples"] += int(idx["counts"]["samples"])
        merged["ranks"].append({"rank": rank, "path": sub, "sample_start": offset,
                                "samples": int(idx["counts"]["samples"])})
        offset += int(idx["counts"]["samples"])
    for key in ("rank", "world_size", "sample_start"):
        (merged.get("extra") or {}).pop(key, None)
    merged["n_inputs"] = offset
    merged["world_size"] = int(world_size)
    merged["complete"] = True
    _atomic_json(root / INDEX_FILE, merged)
    logger.info("merged %d rank sub-stores (%d samples) into %s", len(subs), offset, root)
    return ActivationStore.open(root)


def extract_distributed(
    extractor: Any,
    inputs: Any,
    store_path: str | os.PathLike,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    on_error: Literal["raise", "skip"] = "raise",
    metadata: dict[str, Any] | None = None,
) -> ActivationStore:
    """Extract ``inputs`` with ``extractor`` split over ranks into one merged ActivationStore.

    Rank ``r`` of ``world_size`` extracts the contiguous slice :func:`rank_range` of the inputs into
    ``store_path/rank-<r>/``; then (after a barrier when a process group is up) rank 0 writes the
    merged index. With ``world_size == 1`` and no process group this is a plain extraction into the
    same layout.

    Parameters
    ----------
    extractor : ConceptExtractor
        The configured extractor (same model and settings on every rank).
    inputs : tensor, array, list of images/paths or map-style Dataset
        The full input set; every rank passes the same one.
    store_path : path
        The distributed store directory (shared file system for several nodes).
    rank, world_size : int, optional
        Default: from the process group or torchrun's ``RANK`` / ``WORLD_SIZE``.
    overwrite, resume, on_error, metadata
        As in :meth:`ConceptExtractor.extract`, applied to this rank's sub-store. After a rank dies,
        restart it (or the whole job) with ``resume=True``.

    Returns
    -------
    ActivationStore
        The merged store; without a process group, a rank that finishes before the others returns
        its own sub-store (call :func:`merge_rank_stores` once all are done).

    Raises
    ------
    TypeError
        If ``inputs`` cannot be split by position (e.g. a DataLoader).
    ValueError
        If ``rank`` / ``world_size`` are inconsistent.

    Examples
    --------
    >>> store = extract_distributed(ext, images, "acts/")  # under torchrun  # doctest: +SKIP
    >>> len(store) == len(images)  # doctest: +SKIP
    True
    """
    info = dist_info()
    rank = info.rank if rank is None else int(rank)
    world_size = info.world_size if world_size is None else int(world_size)
    try:
        n = len(inputs)
    except TypeError:
        n = None
    if n is None:
        _slice_inputs(inputs, range(0))  # raises the TypeError with guidance
    r = rank_range(n, rank, world_size)  # type: ignore[arg-type]
    sizes = [len(rank_range(n, k, world_size)) for k in range(world_size)]  # type: ignore[arg-type]
    root = Path(store_path)
    root.mkdir(parents=True, exist_ok=True)
    own = None
    if len(r):
        meta = dict(metadata or {})
        meta.update({"rank": rank, "world_size": world_size, "sample_start": r.start})
        logger.info("rank %d/%d extracting inputs [%d, %d)", rank, world_size, r.start, r.stop)
        own = extractor.extract(_slice_inputs(inputs, r), rank_store_path(root, rank), overwrite=overwrite,
                                resume=resume, on_error=on_error, metadata=meta)
    if info.initialized:
        barrier()
        if rank == 0:
            merge_rank_stores(root, world_size, sizes=sizes)
        barrier()
        return ActivationStore.open(root)
    merged = merge_rank_stores(root, world_size, sizes=sizes)
    if merged is not None:
        return merged
    if own is None:
        raise StoreError(f"Rank {rank} had no inputs and the other ranks of {root} have not finished yet.")
    return own


def _encode_image(m: Any, x: Any) -> Any:
    return m.encode_image(x)


def run_extract_job(
    out: str | os.PathLike,
    *,
    n: int = 1000,
    images: str | os.PathLike | None = None,
    model: str = "conceptworld-clip",
    layers: list[str] | None = None,
    pooling: str = "mean",
    seed: int = 0,
    image_size: int = 64,
    batch_size: int = 64,
    shard_size: int | None = None,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """The ``conceptkit extract`` job: a zoo model over ConceptWorld (or an image folder), split over ranks.

    Under ``torchrun`` every rank extracts its slice (see :func:`extract_distributed`); alone it is a
    one-rank run writing the same layout. ``layers=None`` stores the image embedding (``""``, cls).

    Parameters
    ----------
    out : path
        Store directory.
    n, seed, image_size : int
        ConceptWorld sample (ignored with ``images``).
    images : path, optional
        Folder of image files (sorted by path, recursively) instead of ConceptWorld.
    model : str
        Zoo model name (``concepts.zoo.available()``).
    layers : list of str, optional
        Module names to store (``pooling`` for each; ``""`` is the image embedding); default ``[""]``.
    batch_size, shard_size, device, resume, overwrite, progress
        As in :class:`~concepts.extractor.ConceptExtractor` / :meth:`~ConceptExtractor.extract`.

    Returns
    -------
    Path
        The store directory.

    Raises
    ------
    ValueError
        If ``images`` holds no image files, or ``n < 1``.

    Examples
    --------
    >>> run_extract_job("acts/", n=256, progress=False)  # doctest: +SKIP
    PosixPath('acts')
    """
    from .extractor import IMAGE_EXTENSIONS, ConceptExtractor

    info = init_distributed()
    if images is not None:
        inputs: Any = sorted(str(p) for p in Path(images).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not inputs:
            raise ValueError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) under {images}; pass a folder of images.")
        meta: dict[str, Any] = {"dataset": str(images)}
    else:
        if n < 1:
            raise ValueError(f"n must be a positive number of ConceptWorld images, got {n}.")
        from .world import ConceptWorld

        world = ConceptWorld(seed=seed, image_size=image_size)
        inputs = _LazyWorld(world, n, seed)  # each rank renders only its own slice
        meta = {"dataset": "ConceptWorld", "seed": seed, "n": n, "image_size": image_size}
    if device == "cuda" and info.world_size > 1:
        device = f"cuda:{info.local_rank}"
    from .zoo import load

    clip = load(model, device=device)
    names = layers or [""]
    ext = ConceptExtractor(
        clip.model, names, pooling={k: ("cls" if k == "" else pooling) for k in names}, preprocess=clip.preprocess,
        forward_fn=_encode_image, device=device, batch_size=batch_size, shard_size=shard_size,
        model_name=model, progress=progress and info.is_main,
    )
    extract_distributed(ext, inputs, out, resume=resume, overwrite=overwrite, metadata=meta)
    return Path(out)


class _LazyWorld:
    """Length-``n`` view of ``world.sample(n, seed)`` that renders only the slice it is cut to."""

    def __init__(self, world: Any, n: int, seed: int) -> None:
        self.world, self.n, self.seed = world, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item: slice) -> Any:
        start, stop, _ = item.indices(self.n)
        # image i depends only on (world seed, seed, i): a slice renders exactly those images
        return self.world.sample(max(stop - start, 0), seed=self.seed, start=start).images
