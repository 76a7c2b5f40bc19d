"""One-call loading of a user's generator: ``from_pretrained(path_or_id)`` picks the adapter.

* a diffusers pipeline folder / hub id (``model_index.json``): ``StableDiffusionPipeline`` ->
  :class:`StableDiffusionGenerator`, ``PixArtAlphaPipeline``/``PixArtSigmaPipeline`` ->
  :class:`PixArtGenerator`, ``DDPMPipeline``/``DDIMPipeline`` -> :class:`UnconditionalDiffusionGenerator`;
* a transformers checkpoint whose ``config.json`` has ``model_type == "janus"`` ->
  :class:`JanusGenerator`.
"""
from __future__ import annotations

import json
import os
from typing import Any

from concepts.generators.base import BaseGenerator
from concepts.generators.diffusion import (
    DiffusersGenerator,
    PixArtGenerator,
    StableDiffusionGenerator,
    UnconditionalDiffusionGenerator,
)
from concepts.generators.janus import JanusGenerator

__all__ = ["from_pretrained", "DIFFUSERS_ADAPTERS"]

DIFFUSERS_ADAPTERS: dict[str, type[DiffusersGenerator]] = {
    name: cls
    for cls in (StableDiffusionGenerator, PixArtGenerator, UnconditionalDiffusionGenerator)
    for name in cls._pipeline_classes
}


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); cannot tell which {what} it describes.") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}.")
    return data


def _detect(path_or_id: str, local_files_only: bool | None) -> tuple[str, str]:
    """``("diffusers", pipeline class name)`` or ``("transformers", model_type)``."""
    if os.path.isdir(path_or_id):
        index = os.path.join(path_or_id, "model_index.json")
        config = os.path.join(path_or_id, "config.json")
        if os.path.exists(index):
            return "diffusers", str(_read_json(index, "pipeline").get("_class_name", ""))
        if os.path.exists(config):
            return "transformers", str(_read_json(config, "model").get("model_type", ""))
        raise ValueError(
            f"{path_or_id!r} has neither model_index.json (a diffusers pipeline) nor config.json (a transformers "
            "model). Point to the folder written by save_pretrained."
        )
    if os.path.exists(path_or_id):
        raise ValueError(f"{path_or_id!r} is a file; pass the folder written by save_pretrained.")
    kw = {} if local_files_only is None else {"local_files_only": local_files_only}
    errors = []
    try:
        from diffusers import DiffusionPipeline

        cfg = DiffusionPipeline.load_config(path_or_id, **kw)
        return "diffusers", str(cfg.get("_class_name", ""))
    except Exception as exc:  # noqa: BLE001 - try the next library, report both below
        errors.append(f"diffusers: {exc}")
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path_or_id, **kw)
        return "transformers", str(getattr(cfg, "model_type", ""))
    except Exception as exc:  # noqa: BLE001
        errors.append(f"transformers: {exc}")
    raise ValueError(
        f"Could not load {path_or_id!r} as a diffusers pipeline or a transformers model "
        f"({'; '.join(errors)}). Pass a local folder written by save_pretrained, or a hub id that is "
        "cached / downloadable."
    )


def from_pretrained(
    path_or_id: str,
    *,
    device: Any = "cpu",
    dtype: Any = None,
    local_files_only: bool | None = None,
    **kwargs: Any,
) -> BaseGenerator:
    """Load a user's generator in one call and wrap it in the right adapter.

    Parameters
    ----------
    path_or_id : str
        A local folder (``pipeline.save_pretrained(...)`` for diffusers; ``model.save_pretrained``
        + ``processor.save_pretrained`` for Janus) or a hub id.
    device, dtype : optional
        Where/what to run (e.g. ``device="cuda", dtype="float16"``).
    local_files_only : bool, optional
        Never download (default: the libraries' own setting, i.e. ``HF_HUB_OFFLINE``).
    **kwargs
        Passed to the adapter's ``from_pretrained`` (``text_encoder_fn``, ``settings``,
        ``processor``, ``tokenize_fn``, library loading arguments ...).

    Returns
    -------
    Generator
        :class:`StableDiffusionGenerator`, :class:`PixArtGenerator`,
        :class:`UnconditionalDiffusionGenerator` or :class:`JanusGenerator`.

    Raises
    ------
    ValueError
        If the folder / id is not a supported pipeline or model.

    Examples
    --------
    >>> # from concepts.generators import from_pretrained
    >>> # sd = from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda", dtype="fp16")
    >>> # janus = from_pretrained("/models/Janus-Pro-1B", device="cuda", dtype="bf16")
    >>> # out = sd.generate(["a red circle on stripes"], seeds=[0], steps=30, guidance=7.5)
    >>> # out.to_frame()   # prompt, seed, steps, guidance, model_id, ...
    """
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise TypeError(f"path_or_id must be a str or path, got {type(path_or_id).__name__}.")
    path_or_id = os.fspath(path_or_id)
    library, kind = _detect(path_or_id, local_files_only)
    if library == "diffusers":
        cls = DIFFUSERS_ADAPTERS.get(kind)
        if cls is None:
            raise ValueError(
                f"{path_or_id!r} holds a {kind or 'unnamed'} pipeline; supported pipelines are "
                f"{sorted(DIFFUSERS_ADAPTERS)}. Wrap other pipelines by subclassing DiffusersGenerator."
            )
        return cls.from_pretrained(path_or_id, device=device, dtype=dtype, local_files_only=local_files_only, **kwargs)
    if kind == "janus":
        return JanusGenerator.from_pretrained(path_or_id, device=device, dtype=dtype,
                                              local_files_only=local_files_only, **kwargs)
    raise ValueError(
        f"{path_or_id!r} holds a transformers model of type {kind!r}; the only supported autoregressive image "
        "generator is 'janus'. Wrap other loops with ARLoopGenerator."
    )
