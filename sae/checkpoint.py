"""Training checkpoints: weights, optimizer, RNG and data position as safetensors + JSON.

Layout of a checkpoint directory::

    state-00000120.safetensors   # module weights, optimizer moments, trackers, RNG state
    state-00000120.json          # step, epoch, data position, schedules, history so far
    latest.json                  # {"step": 120, "tensors": "...safetensors", "state": "...json"}

Each file is written to a temporary name and moved into place with ``os.replace``; ``latest.json``
is replaced last, so a run killed at any moment leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_save_safetensors",
    "save_training_state",
    "load_training_state",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
]

LATEST = "latest.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=True).encode("utf-8"))


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(clean, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict:
    """Read a JSON object; a missing or corrupt file raises with the file name."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}). The file is corrupt; re-create it.") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}.")
    return obj


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Read a safetensors file; a missing or corrupt file raises with the file name."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc}). The file is corrupt; re-create it.") from exc


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer's state dict into tensors (``optim.<param>.<key>``) and JSON."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    """Inverse of :func:`optimizer_to_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    for pid, st in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(st)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(directory: str | os.PathLike, step: int, tensors: dict[str, Tensor], state: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` into ``directory`` and point ``latest.json`` at it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"state-{step:08d}"
    atomic_save_safetensors(directory / f"{stem}.safetensors", tensors)
    atomic_write_json(directory / f"{stem}.json", state)
    atomic_write_json(directory / LATEST, {"step": step, "tensors": f"{stem}.safetensors", "state": f"{stem}.json"})
    old = sorted(p for p in directory.glob("state-*.json") if p.stem != stem)
    for p in old[: max(0, len(old) - (keep - 1))]:
        for q in (p, p.with_suffix(".safetensors")):
            if q.exists():
                q.unlink()
    return directory / f"{stem}.json"


def load_training_state(directory: str | os.PathLike) -> tuple[dict[str, Tensor], dict] | None:
    """Read the checkpoint that ``latest.json`` points to, or ``None`` if there is none."""
    directory = Path(directory)
    latest = directory / LATEST
    if not latest.is_file():
        return None
    pointer = read_json(latest)
    for field in ("tensors", "state"):
        if field not in pointer:
            raise ValueError(f"{latest} is missing the field '{field}'; the checkpoint directory is corrupt.")
    state = read_json(directory / pointer["state"])
    tensors = read_safetensors(directory / pointer["tensors"])
    return tensors, state
