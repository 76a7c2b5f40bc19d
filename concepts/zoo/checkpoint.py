"""Reading and writing the zoo's shipped files: JSON specs and safetensors weights, verified on load.

Every zoo model ships as a folder ``concepts/zoo/weights/<name>/`` holding safetensors weights and JSON
specs. Loading checks what it reads and fails with an error that names the file and the key: a missing
file, invalid JSON, a missing config key, a tensor that is missing / unexpected / of the wrong shape, or
weights whose SHA-256 differs from the one recorded in the config. Nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "WEIGHTS_ROOT", "weights_dir", "read_json", "require_keys", "sha256_file", "load_state_dict_checked",
    "save_state_dict", "write_json",
]

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
"""Folder of the shipped zoo weights (one sub-folder per model)."""


def weights_dir(name: str) -> Path:
    """Folder of the shipped files of zoo model ``name`` (it may not exist)."""
    return WEIGHTS_ROOT / name


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object; a missing or invalid file raises an error naming it.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.json"
    >>> _ = p.write_text('{"a": 1}')
    >>> read_json(p)
    {'a': 1}
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; the zoo model folder is incomplete (re-export or reinstall it).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); the file is corrupt, re-export or reinstall it.") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}.")
    return data


def require_keys(data: Mapping[str, Any], keys: Iterable[str], *, source: str) -> None:
    """Raise ``ValueError`` naming ``source`` and the first of ``keys`` missing from ``data``."""
    for key in keys:
        if key not in data:
            raise ValueError(f"{source}: missing key {key!r} (found keys {sorted(data)}).")


def write_json(data: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``data`` as indented JSON (atomically: temporary file then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state_dict(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, *, metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Save tensors to safetensors atomically (contiguous CPU copies; optional cast of float tensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    out = {}
    for key, value in tensors.items():
        value = value.detach().to("cpu")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous().clone()
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata=dict(metadata or {}))
    os.replace(tmp, path)


def load_state_dict_checked(
    module: nn.Module, path: str | os.PathLike, *, sha256: str | None = None, device: str | torch.device = "cpu",
) -> None:
    """Load a safetensors file into ``module`` after checking keys, shapes and (optionally) the checksum.

    Parameters
    ----------
    module
        The freshly built module; its ``state_dict()`` defines the expected keys and shapes.
    path
        The ``.safetensors`` file.
    sha256
        Expected hex digest of the file (``None`` skips the check). Checked after the structure, so a
        structural mismatch is reported by key.
    device
        Device the tensors are read to.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not a readable safetensors file, a key is missing or unexpected, a shape differs, or the
        checksum differs. The message names the file and the key.

    Examples
    --------
    >>> import tempfile, pathlib, torch
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
    >>> save_state_dict(torch.nn.Linear(2, 3).state_dict(), p)
    >>> load_state_dict_checked(torch.nn.Linear(2, 3), p)
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found; the zoo model folder is incomplete.")
    expected = module.state_dict()
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            found_keys = set(f.keys())
            missing = [k for k in expected if k not in found_keys]
            if missing:
                raise ValueError(
                    f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all); the weights do not "
                    "match the architecture in the config."
                )
            unexpected = sorted(found_keys - set(expected))
            if unexpected:
                raise ValueError(
                    f"{path}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all); the "
                    "weights do not match the architecture in the config."
                )
            tensors = {}
            for key, ref in expected.items():
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(ref.shape):
                    raise ValueError(
                        f"{path}: tensor {key!r} has shape {list(shape)}, but the config's architecture expects "
                        f"{list(ref.shape)}; the weights and config.json do not belong together."
                    )
                tensors[key] = f.get_tensor(key)
    except ValueError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: cannot read safetensors file ({err}); the file is corrupt, reinstall it.") from err
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256:
            raise ValueError(
                f"{path}: SHA-256 is {digest[:16]}..., but the config records {sha256[:16]}... for key "
                "'weights.sha256'; the weights file was modified or corrupted."
            )
    for key, ref in expected.items():
        if not tensors[key].dtype.is_floating_point and tensors[key].dtype != ref.dtype:
            raise ValueError(f"{path}: tensor {key!r} has dtype {tensors[key].dtype}, expected {ref.dtype}.")
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
