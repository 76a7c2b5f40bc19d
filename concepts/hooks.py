"""Forward hooks on named sub-modules: record activations and edit them.

Three entry points work on any :class:`torch.nn.Module`:

* :func:`available_layers` lists the names that can be hooked (``model.named_modules()`` names);
* :func:`record` collects the output of named layers during the forward calls made inside a
  ``with`` block;
* :func:`intervene` replaces the output of named layers with the result of a user function.

Hooks are registered on entry and always removed on exit, also when the forward pass raises.

"Primary output" of a layer: the tensor a module returns; for a tuple/list, its first element
(recursively); for a dataclass / ``ModelOutput``-like object or a mapping, its first tensor field
(e.g. ``.last_hidden_state`` or ``.sample``). When an edit replaces the primary output, the rest of
the structure is preserved.

The empty name ``""`` denotes the model itself (its output).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LayerNotFoundError",
    "available_layers",
    "resolve_layers",
    "record",
    "intervene",
    "primary_output",
    "replace_primary_output",
]

logger = logging.getLogger(__name__)


class LayerNotFoundError(KeyError, ValueError):
    """A layer name that is not a sub-module of the model (a ``KeyError`` and a ``ValueError``)."""

    def __str__(self) -> str:  # KeyError would repr-quote the message
        return str(self.args[0]) if self.args else ""


def available_layers(model: nn.Module, contains: str | None = None) -> list[str]:
    """List the names of the sub-modules that can be hooked, in registration order.

    Parameters
    ----------
    model : nn.Module
        Any PyTorch module.
    contains : str, optional
        Keep only names containing this substring (case-insensitive).

    Returns
    -------
    list of str
        Dotted names accepted by :func:`record`, :func:`intervene` and ``model.get_submodule``.
        The model itself (name ``""``) is not listed.

    Examples
    --------
    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 2)))
    >>> available_layers(m)
    ['0', '1', '2', '2.0']
    >>> available_layers(m, contains="2.")
    ['2.0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. "
            "Pass the nn.Module whose layers you want to hook."
        )
    names = [name for name, _ in model.named_modules() if name]
    if contains is not None:
        needle = str(contains).lower()
        names = [n for n in names if needle in n.lower()]
    return names


def _suggest(name: str, candidates: Sequence[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if len(close) < n:
        # Names sharing the last dotted component help with "attn" vs "blocks.3.attn" style mistakes.
        tail = name.rsplit(".", 1)[-1].lower()
        if tail:
            for c in candidates:
                if len(close) >= n:
                    break
                if c not in close and c.rsplit(".", 1)[-1].lower() == tail:
                    close.append(c)
    return close


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> dict[str, nn.Module]:
    """Map layer names to sub-modules, with helpful errors for unknown names.

    Parameters
    ----------
    model : nn.Module
        The model whose sub-modules are looked up.
    layers : str or sequence of str
        One dotted name or several (duplicates are dropped, order kept). ``""`` is the model itself.

    Returns
    -------
    dict of str to nn.Module
        ``{name: module}`` in the order given.

    Raises
    ------
    LayerNotFoundError
        (a ``KeyError`` and ``ValueError``) naming the unknown layer and the closest real names.
    TypeError
        If ``layers`` is not a string or a sequence of strings.

    Examples
    --------
    >>> import torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    >>> list(resolve_layers(m, "0"))
    ['0']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}. "
            "Pass the nn.Module whose layers you want to hook."
        )
    if isinstance(layers, str):
        names = [layers]
    elif hasattr(layers, "__iter__") and not isinstance(layers, (bytes, Mapping, Tensor)):
        names = list(layers)
    else:
        raise TypeError(
            f"layers must be a layer name or a sequence of layer names, got {type(layers).__name__}. "
            "Use concepts.hooks.available_layers(model) to list valid names."
        )
    if not names:
        raise ValueError(
            "layers is empty: expected at least one layer name. "
            "Use concepts.hooks.available_layers(model) to list valid names."
        )
    modules = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"layer names must be strings, got {type(name).__name__} ({name!r}). "
                "Use concepts.hooks.available_layers(model) to list valid names."
            )
        if name in out:
            continue
        if name not in modules:
            real = [n for n in modules if n]
            close = _suggest(name, real)
            hint = f" Closest matches: {close}." if close else ""
            raise LayerNotFoundError(
                f"Layer {name!r} not found in {type(model).__name__} ({len(real)} named layers).{hint} "
                f"Use concepts.hooks.available_layers(model, contains=...) to list valid names."
            )
        out[name] = modules[name]
    return out


# ---------------------------------------------------------------------------------------------
# primary output handling
# ---------------------------------------------------------------------------------------------
def _fields(obj: Any) -> list[tuple[str, Any]]:
    if isinstance(obj, Mapping):  # transformers ModelOutput / diffusers BaseOutput are mappings too
        return list(obj.items())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    return []


def _primary_path(output: Any) -> list[Any] | None:
    """Path (indices / field names) to the primary tensor inside ``output``; None when absent."""
    if isinstance(output, Tensor):
        return []
    if isinstance(output, (tuple, list)):
        if not output:
            return None
        sub = _primary_path(output[0])
        return None if sub is None else [0, *sub]
    for key, value in _fields(output):
        if isinstance(value, Tensor):
            return [key]
    return None


def primary_output(output: Any) -> Tensor:
    """Return the primary tensor of a module output (see module docstring).

    Parameters
    ----------
    output : Tensor, tuple, list, dataclass or mapping
        What a module's ``forward`` returned.

    Returns
    -------
    Tensor

    Raises
    ------
    TypeError
        If no tensor can be found.

    Examples
    --------
    >>> import torch
    >>> primary_output((torch.ones(2), "aux")).shape
    torch.Size([2])
    """
    path = _primary_path(output)
    if path is None:
        raise TypeError(
            f"Could not find a tensor in the layer output of type {type(output).__name__}. "
            "Hook a layer that returns a tensor, a tuple/list starting with a tensor, or a "
            "dataclass/ModelOutput with a tensor field."
        )
    obj = output
    for key in path:
        obj = obj[key] if isinstance(obj, (tuple, list, Mapping)) else getattr(obj, key)
    return obj


def _replace_at(obj: Any, path: list[Any], new: Tensor) -> Any:
    if not path:
        return new
    key, rest = path[0], path[1:]
    if isinstance(obj, (tuple, list)):
        items = list(obj)
        items[key] = _replace_at(items[key], rest, new)
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        return type(obj)(items)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, Mapping):
            # ModelOutput-like: shallow copy keeps every other field, then set the one we edit.
            import copy

            clone = copy.copy(obj)
            try:
                clone[key] = new  # keeps the mapping view and the attribute in sync
            except Exception:  # pragma: no cover - exotic mapping dataclasses
                pass
            setattr(clone, key, new)
            return clone
        return dataclasses.replace(obj, **{key: new})
    if isinstance(obj, Mapping):
        clone = dict(obj) if type(obj) is dict else type(obj)(obj)
        clone[key] = new
        return clone
    raise TypeError(f"Cannot replace a field of an output of type {type(obj).__name__}.")  # pragma: no cover


def replace_primary_output(output: Any, new: Tensor) -> Any:
    """Return ``output`` with its primary tensor replaced by ``new``, other parts unchanged.

    Parameters
    ----------
    output : Tensor, tuple, list, dataclass or mapping
        A module output.
    new : Tensor
        The replacement primary tensor.

    Returns
    -------
    Same structure as ``output``.

    Examples
    --------
    >>> import torch
    >>> out = replace_primary_output((torch.zeros(2), "aux"), torch.ones(2))
    >>> out[0].tolist(), out[1]
    ([1.0, 1.0], 'aux')
    """
    path = _primary_path(output)
    if path is None:
        raise TypeError(
            f"Could not find a tensor in the layer output of type {type(output).__name__}; "
            "nothing to replace."
        )
    return _replace_at(output, path, new)


def _version(t: Tensor) -> int | None:
    """Autograd version counter (bumped by in-place ops); None for inference-mode tensors."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


# ---------------------------------------------------------------------------------------------
# context managers
# ---------------------------------------------------------------------------------------------
@contextmanager
def record(
    model: nn.Module,
    layers: str | Sequence[str],
    *,
    detach: bool = True,
    clone: bool = False,
) -> Iterator[dict[str, list[Tensor]]]:
    """Record the primary output of named layers during the forward calls inside the block.

    Parameters
    ----------
    model : nn.Module
        The model to hook.
    layers : str or sequence of str
        Layer names (see :func:`available_layers`). ``""`` records the model's own output.
    detach : bool, default True
        Detach recorded tensors from the autograd graph.
    clone : bool, default False
        Copy each recorded tensor. Needed when a later operation modifies the output in place
        (e.g. ``nn.ReLU(inplace=True)`` after a BatchNorm); without it such a modification is
        detected on exit and reported with a warning.

    Yields
    ------
    dict of str to list of Tensor
        ``{layer: [output of call 0, output of call 1, ...]}``, filled as forward calls happen.
        A layer called several times per forward (weight sharing, diffusion steps) gets one entry
        per call.

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    >>> with record(m, ["0", "1"]) as acts:
    ...     _ = m(torch.randn(2, 4))
    >>> acts["0"][0].shape, len(acts["1"])
    (torch.Size([2, 3]), 1)
    """
    modules = resolve_layers(model, layers)
    store: dict[str, list[Tensor]] = {name: [] for name in modules}
    versions: dict[str, list[int]] = {name: [] for name in modules}
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            t = primary_output(output)
            if detach:
                t = t.detach()
            if clone:
                t = t.clone()
            store[name].append(t)
            versions[name].append(_version(t))

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield store
        if not clone:
            changed = [
                name
                for name, ts in store.items()
                if any(v is not None and _version(t) != v for t, v in zip(ts, versions[name]))
            ]
            if changed:
                warnings.warn(
                    f"The recorded output of layer(s) {changed} was modified in place after it was "
                    "recorded (e.g. by an inplace ReLU), so the recorded values are not the layer's "
                    "output. Pass clone=True to record(...) to keep a copy.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    finally:
        for h in handles:
            h.remove()


@contextmanager
def intervene(
    model: nn.Module,
    edits: Mapping[str, Callable[[Tensor], Tensor | None]],
) -> Iterator[None]:
    """Replace the primary output of named layers during the forward calls inside the block.

    Parameters
    ----------
    model : nn.Module
        The model to hook.
    edits : mapping of str to callable
        ``{layer: fn}``; ``fn(output) -> Tensor | None`` receives the layer's primary output tensor
        and returns a replacement, or ``None`` to leave it unchanged. Tuples, dataclasses and
        ``ModelOutput`` objects keep their other fields.

    Yields
    ------
    None

    Notes
    -----
    Hooks run in registration order, so ``with intervene(...): with record(...):`` records the
    edited output.

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> m = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    >>> with intervene(m, {"0": lambda t: torch.zeros_like(t)}):
    ...     y = m(torch.randn(2, 4))
    >>> float(y.abs().sum())
    0.0
    """
    if not isinstance(edits, Mapping):
        raise TypeError(
            f"edits must be a mapping {{layer_name: fn}}, got {type(edits).__name__}. "
            "Example: intervene(model, {'blocks.3': lambda t: t * 0})."
        )
    modules = resolve_layers(model, list(edits))
    for name in modules:
        if not callable(edits[name]):
            raise TypeError(
                f"The edit for layer {name!r} must be callable (tensor -> tensor or None), "
                f"got {type(edits[name]).__name__}."
            )
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def make_hook(name: str, fn: Callable[[Tensor], Tensor | None]) -> Callable[..., Any]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            new = fn(primary_output(output))
            if new is None:
                return None
            if not isinstance(new, Tensor):
                raise TypeError(
                    f"The edit for layer {name!r} returned {type(new).__name__}; expected a Tensor "
                    "(the replacement output) or None (leave the output unchanged)."
                )
            return replace_primary_output(output, new)

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name, edits[name])))
        yield
    finally:
        for h in handles:
            h.remove()
