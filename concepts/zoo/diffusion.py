"""The built-in ConceptWorld text-to-image diffusion model (``"conceptworld-diffusion"``).

A tiny latent diffusion model made only of diffusers classes and run by diffusers' own
``StableDiffusionPipeline`` behind :class:`~concepts.generators.StableDiffusionGenerator`, so every tool of
:mod:`concepts.generators` (``run_with_hooks``, ``run_with_cache``, edits, CFG splitting) works on it:

* ``vae``: ``AutoencoderKL`` 32x32x3 pixels <-> 8x8x4 latents (trained first, on images only);
* ``unet``: ``UNet2DConditionModel`` on the 8x8x4 latents with cross-attention in every block; its
  ``encoder_hid_proj`` projects the CLIP text states (96 -> 64) and ``addition_embed_type="text"`` adds an
  attention-pooled text vector to the time embedding;
* text: the frozen text tower of ``conceptworld-clip`` (:class:`~concepts.zoo.conditioning.CLIPTextConditioner`),
  passed to the adapter as ``text_encoder_fn`` and exposed for hooks as ``text_encoder``;
* ``scheduler``: ``DDIMScheduler`` (trained with the 1000-step linear-beta DDPM schedule, sampled with 20
  DDIM steps and guidance 3 by default).

The shipped folder ``concepts/zoo/weights/conceptworld-diffusion/`` holds ``config.json`` (component configs,
checksums, training record, measured quality), ``vae.safetensors`` and ``unet.safetensors``; it is produced by
:mod:`concepts.zoo.train_diffusion`.

Examples
--------
>>> from concepts import zoo
>>> gen = zoo.load("conceptworld-diffusion")
>>> out = gen.generate(["a large red circle on a plain background"], seeds=[0])
>>> out.images.shape
torch.Size([1, 32, 32, 3])
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_state_dict_checked, read_json, require_keys, weights_dir

logger = logging.getLogger(__name__)

__all__ = [
    "DIFFUSION_NAME", "CONFIG_FORMAT", "DEFAULT_SETTINGS", "build_vae", "build_unet", "build_scheduler",
    "build_pipeline", "load_diffusion", "load_conceptworld_diffusion", "check_clip_match",
]

DIFFUSION_NAME = "conceptworld-diffusion"
CONFIG_FORMAT = "conceptkit.zoo.diffusion"
DEFAULT_SETTINGS: dict[str, Any] = {"steps": 20, "guidance": 3.0}
"""Default generation settings of the shipped model (overridable per call)."""


def _build(cls: Any, cfg: dict, source: str) -> nn.Module:
    if not isinstance(cfg, dict):
        raise ValueError(f"{source}: expected a dict of {cls.__name__} arguments, got {type(cfg).__name__}.")
    try:
        return cls(**cfg)
    except TypeError as err:
        raise ValueError(f"{source}: not a valid {cls.__name__} config ({err}).") from err


def build_vae(cfg: dict, *, source: str = "vae config") -> nn.Module:
    """``diffusers.AutoencoderKL(**cfg)`` (untrained).

    Examples
    --------
    >>> vae = build_vae({"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
    ...                  "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8, "sample_size": 16})
    >>> vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mean.shape
    torch.Size([1, 4, 8, 8])
    """
    from diffusers import AutoencoderKL

    return _build(AutoencoderKL, cfg, source)


def build_unet(cfg: dict, *, source: str = "unet config") -> nn.Module:
    """``diffusers.UNet2DConditionModel(**cfg)`` (untrained)."""
    from diffusers import UNet2DConditionModel

    return _build(UNet2DConditionModel, cfg, source)


def build_scheduler(cfg: dict, *, source: str = "scheduler config") -> Any:
    """``diffusers.DDIMScheduler(**cfg)``."""
    from diffusers import DDIMScheduler

    if isinstance(cfg, dict) and cfg.get("timestep_spacing") == "trailing":
        cfg = {**cfg, "steps_offset": 1}  # unused by "trailing"; 1 keeps StableDiffusionPipeline from rewriting it
    return _build(DDIMScheduler, cfg, source)


def build_pipeline(vae: nn.Module, unet: nn.Module, scheduler: Any) -> Any:
    """A ``StableDiffusionPipeline`` without tokenizer / text encoder (prompts come as embeddings)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_clip_match(conditioning: dict, conditioner: Any, *, source: str) -> None:
    """Raise if the CLIP text tower differs from the one a generator was trained with (by weight checksum)."""
    want = conditioning.get("clip_sha256")
    have = getattr(conditioner, "sha256", None)
    if want and have and want != have:
        raise ValueError(
            f"{source}: key 'conditioning.clip_sha256' is {want[:16]}..., but the installed "
            f"{conditioning.get('clip', 'conceptworld-clip')!r} weights have {have[:16]}...; the generator was "
            "trained on another CLIP text tower. Retrain the generator on the installed CLIP (see its training "
            "command in config.json['training']) or reinstall the matching CLIP weights."
        )


def load_diffusion(
    path: str | Path, device: str | torch.device = "cpu", *, conditioner: Any = None, verify_checksum: bool = True,
    settings: dict | None = None,
) -> Any:
    """Load a zoo diffusion folder as a :class:`~concepts.generators.StableDiffusionGenerator`.

    Parameters
    ----------
    path
        Folder with ``config.json``, ``vae.safetensors`` and ``unet.safetensors``.
    device
        Where the model runs.
    conditioner
        The text conditioner (default: the one named in the config, loaded from the zoo).
    verify_checksum
        Check the weights' SHA-256 against the config.
    settings
        Default generation settings (merged over the config's ``settings``).

    Returns
    -------
    StableDiffusionGenerator
        With ``text_encoder_fn`` = the CLIP text tower and the tower exposed as ``text_encoder`` for hooks;
        ``.conditioner`` is the tower and ``.config`` the parsed ``config.json``.

    Raises
    ------
    FileNotFoundError
        A file of the folder is missing.
    ValueError
        A file is corrupt or does not match the config (the message names the file and the key).
    """
    from concepts.devices import resolve_device
    from concepts.generators import StableDiffusionGenerator

    from .conditioning import CLIPTextConditioner

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: diffusion model folder not found (expected config.json, vae.safetensors, unet.safetensors)."
        )
    cfg_path = folder / "config.json"
    config = read_json(cfg_path)
    src = str(cfg_path)
    require_keys(config, ("format", "vae", "unet", "scheduler", "weights", "conditioning"), source=src)
    if config["format"] != CONFIG_FORMAT:
        raise ValueError(f"{src}: key 'format' is {config['format']!r}, expected {CONFIG_FORMAT!r}.")
    require_keys(config["weights"], ("vae", "unet"), source=f"{src} ['weights']")
    vae = build_vae(config["vae"], source=f"{src} ['vae']")
    unet = build_unet(config["unet"], source=f"{src} ['unet']")
    scheduler = build_scheduler(config["scheduler"], source=f"{src} ['scheduler']")
    for name, module in (("vae", vae), ("unet", unet)):
        entry = config["weights"][name]
        require_keys(entry, ("file",), source=f"{src} ['weights']['{name}']")
        load_state_dict_checked(module, folder / entry["file"], sha256=entry.get("sha256") if verify_checksum else None)
    dev = resolve_device(device)
    if conditioner is None:
        conditioner = CLIPTextConditioner.from_zoo(config["conditioning"].get("clip", "conceptworld-clip"), device=dev)
    check_clip_match(config["conditioning"], conditioner, source=src)
    width = config["unet"].get("encoder_hid_dim")
    if width is not None and int(width) != conditioner.width:
        raise ValueError(
            f"{src}: key 'unet.encoder_hid_dim' is {width}, but the text conditioner gives {conditioner.width}-d states."
        )
    pipe = build_pipeline(vae.eval(), unet.eval(), scheduler)
    merged = dict(DEFAULT_SETTINGS)
    merged.update(config.get("settings", {}))
    merged.update(settings or {})
    gen = StableDiffusionGenerator(
        pipe, text_encoder_fn=conditioner.encode, extra_modules={"text_encoder": conditioner},
        model_id=config.get("name", DIFFUSION_NAME), device=dev, settings=merged,
    )
    gen.conditioner = conditioner  # the text tower (also hookable as "text_encoder.*")
    gen.config = config
    return gen


def load_conceptworld_diffusion(device: str | torch.device = "cpu", path: str | Path | None = None, **kwargs: Any) -> Any:
    """Registry loader of ``"conceptworld-diffusion"``: :func:`load_diffusion` on the shipped folder (or ``path``)."""
    return load_diffusion(weights_dir(DIFFUSION_NAME) if path is None else path, device=device, **kwargs)
