"""The zoo registry: model name -> loader.

Each entry names a loader as ``"module:function"`` (imported only when the model is loaded, so importing
:mod:`concepts.zoo` stays cheap and free of side effects). A loader is called as
``loader(device=device, **kwargs)`` and returns the model's pieces (for a CLIP: ``(model, preprocess,
tokenizer)``).

Adding a built-in model is one line in :data:`_BUILTIN`; user code can add its own with :func:`register`.
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ZooEntry", "available", "entry", "load", "register"]


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    Parameters
    ----------
    name
        Registry name (``"conceptworld-clip"``).
    loader
        ``"package.module:function"`` or a callable ``(device=..., **kwargs) -> model pieces``.
    kind
        ``"clip"``, ``"diffusion"``, ``"autoregressive"``, ...
    description
        One line for listings.
    """

    name: str
    loader: str | Callable[..., Any]
    kind: str
    description: str = ""

    def resolve(self) -> Callable[..., Any]:
        """The loader function (imports its module if given as a string)."""
        if callable(self.loader):
            return self.loader
        module_name, _, func_name = self.loader.partition(":")
        if not func_name:
            raise ValueError(f"zoo entry {self.name!r}: loader {self.loader!r} must look like 'package.module:function'.")
        return getattr(importlib.import_module(module_name), func_name)


_BUILTIN: tuple[ZooEntry, ...] = (
    ZooEntry(
        "conceptworld-clip", "concepts.zoo.clip:load_conceptworld_clip", "clip",
        "open_clip.CLIP dual encoder (ModifiedResNet 64px + word-level text transformer) trained on ConceptWorld",
    ),
    # generator helpers add their entries here, e.g.
    # ZooEntry("conceptworld-diffusion", "concepts.zoo.diffusion:load_conceptworld_diffusion", "diffusion", "..."),
    ZooEntry("conceptworld-diffusion", "concepts.zoo.diffusion:load_conceptworld_diffusion", "diffusion", "latent diffusion (diffusers AutoencoderKL + UNet2DConditionModel, 32px) prompted through the conceptworld-clip text tower"),
    ZooEntry("conceptworld-ar", "concepts.zoo.autoregressive:load_conceptworld_ar", "autoregressive", "Janus (transformers JanusForConditionalGeneration: LLaMA + VQ, 8x8 tokens, 32px) prompted through the conceptworld-clip text tower"),
    ZooEntry("conceptworld-detector", "concepts.zoo.detector:load_conceptworld_detector", "detector", "CNN reading the 55 ConceptWorld concepts of any image, robust to blur, noise and colour drift"),
)

_REGISTRY: dict[str, ZooEntry] = {e.name: e for e in _BUILTIN}


def register(
    name: str, loader: str | Callable[..., Any], *, kind: str, description: str = "", overwrite: bool = False,
) -> ZooEntry:
    """Add a model to the zoo registry (for this process).

    Parameters
    ----------
    name
        Registry name.
    loader
        ``"package.module:function"`` or a callable ``(device=..., **kwargs)``.
    kind
        Model kind (``"clip"``, ``"diffusion"``, ``"autoregressive"``, ...).
    description
        One line for listings.
    overwrite
        Replace an existing entry of the same name (otherwise that is an error).

    Examples
    --------
    >>> from concepts import zoo
    >>> _ = zoo.register("my-clip", lambda device="cpu": "model", kind="clip", overwrite=True)
    >>> zoo.load("my-clip")
    'model'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}.")
    if not (callable(loader) or (isinstance(loader, str) and ":" in loader)):
        raise TypeError(f"loader must be a callable or a 'package.module:function' string, got {loader!r}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"zoo model {name!r} is already registered; pass overwrite=True to replace it.")
    item = ZooEntry(name, loader, kind, description)
    _REGISTRY[name] = item
    return item


def available(kind: str | None = None) -> list[str]:
    """Names of the registered zoo models (optionally only those of one ``kind``), sorted.

    Examples
    --------
    >>> from concepts import zoo
    >>> "conceptworld-clip" in zoo.available()
    True
    """
    return sorted(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def entry(name: str) -> ZooEntry:
    """The :class:`ZooEntry` of ``name``; an unknown name raises ``KeyError`` listing the closest names."""
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.4)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"unknown zoo model {name!r}; available: {available()}.{hint}")
    return _REGISTRY[name]


def load(name: str, device: str | torch.device = "cpu", **kwargs: Any) -> Any:
    """Load a zoo model by name, offline, from the files shipped in the package.

    Parameters
    ----------
    name
        A name from :func:`available` (e.g. ``"conceptworld-clip"``).
    device
        Where the model is put.
    **kwargs
        Passed to the model's loader.

    Returns
    -------
    Any
        The loader's result; for ``"conceptworld-clip"`` a :class:`~concepts.zoo.clip.ZooCLIP`
        ``(model, preprocess, tokenizer)``.

    Examples
    --------
    >>> from concepts import zoo
    >>> model, preprocess, tokenizer = zoo.load("conceptworld-clip")
    >>> model.encode_text(tokenizer(["a photo of a red shape"])).shape
    torch.Size([1, 64])
    """
    return entry(name).resolve()(device=device, **kwargs)
