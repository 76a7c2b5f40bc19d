"""Device and dtype resolution shared by the extractor, the store and the encoders.

``device="auto"`` resolves to CUDA, then Apple MPS, then CPU. Dtypes are accepted as a
:class:`torch.dtype` or a string (``"float32"``, ``"fp16"``, ``"torch.bfloat16"``, ``"half"``, ...).
"""
from __future__ import annotations

import torch

__all__ = ["resolve_device", "resolve_dtype", "dtype_name"]

_DTYPE_ALIASES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "single": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn a device spec into a :class:`torch.device`.

    Parameters
    ----------
    device : str, torch.device or None, default "auto"
        ``"auto"`` (or None) picks ``cuda`` if available, else ``mps`` if available, else ``cpu``.
        Anything else is passed to :class:`torch.device` (``"cpu"``, ``"cuda:1"``, ...).

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        For a string torch does not understand, or a CUDA/MPS device that is not available.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or (isinstance(device, str) and device.lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"Unknown device {device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
            ) from exc
    else:
        raise TypeError(
            f"device must be a string or torch.device, got {type(device).__name__}. "
            "Use 'auto', 'cpu', 'cuda' or 'mps'."
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {str(dev)!r} was requested but CUDA is not available on this machine. "
            "Use device='cpu' or device='auto'."
        )
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                "device 'mps' was requested but Apple MPS is not available on this machine. "
                "Use device='cpu' or device='auto'."
            )
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype | None = None) -> torch.dtype | None:
    """Turn a dtype spec (string or :class:`torch.dtype`) into a floating :class:`torch.dtype`.

    Parameters
    ----------
    dtype : str, torch.dtype or None
        ``"float32"``/``"fp32"``, ``"float16"``/``"fp16"``/``"half"``, ``"bfloat16"``/``"bf16"``,
        ``"float64"``, with or without a ``"torch."`` prefix; or a floating ``torch.dtype``.
    default : torch.dtype, optional
        Returned when ``dtype`` is None.

    Returns
    -------
    torch.dtype or None

    Raises
    ------
    ValueError
        For an unknown string or a non-floating dtype.

    Examples
    --------
    >>> resolve_dtype("bf16")
    torch.bfloat16
    >>> resolve_dtype(torch.float16)
    torch.float16
    """
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        out = dtype
    elif isinstance(dtype, str):
        key = dtype.lower().strip()
        if key.startswith("torch."):
            key = key[len("torch."):]
        if key not in _DTYPE_ALIASES:
            raise ValueError(
                f"Unknown dtype {dtype!r}: expected one of {sorted(_DTYPE_ALIASES)} "
                "(optionally prefixed with 'torch.') or a torch.dtype."
            )
        out = _DTYPE_ALIASES[key]
    else:
        raise TypeError(
            f"dtype must be a string or torch.dtype, got {type(dtype).__name__}. "
            "Use e.g. 'float32', 'float16' or torch.bfloat16."
        )
    if not out.is_floating_point:
        raise ValueError(
            f"dtype {out} is not a floating-point type; activations need float32, float16, "
            "bfloat16 or float64."
        )
    return out


def dtype_name(dtype: torch.dtype) -> str:
    """Canonical string for a dtype, e.g. ``torch.float16 -> "float16"``.

    Examples
    --------
    >>> dtype_name(torch.bfloat16)
    'bfloat16'
    """
    return str(dtype).replace("torch.", "")
