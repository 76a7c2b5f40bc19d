"""Adapters for diffusers pipelines: Stable Diffusion, PixArt and unconditional DDPM/DDIM.

Call map
--------
A pre-hook on the denoiser (``pipeline.unet`` / ``pipeline.transformer``) counts its calls: call
``s`` of the denoiser is denoising step ``s`` (``phase="denoise"``), and its timestep argument
is recorded; a layer of the denoiser therefore fires once per step. Text-encoder layers fire in
``phase="encode"`` (first the prompts, ``branch="cond"``, then the negative prompts,
``branch="uncond"``); VAE layers fire after the last step in ``phase="decode"``.

CFG row order (diffusers, all three text-to-image families here)
----------------------------------------------------------------
The pipelines concatenate ``[negative_prompt_embeds, prompt_embeds]`` on the batch dimension, so
with ``guidance > 1`` a denoiser batch has ``2N`` rows: rows ``0..N-1`` unconditional, rows
``N..2N-1`` conditional (``cfg_order = "uncond_cond"``). With ``guidance <= 1`` there is no
unconditional row.

Seeds
-----
Each image gets ``torch.Generator("cpu").manual_seed(seed)``; diffusers draws the initial noise
(and any scheduler noise) row by row from the list of generators, so an image does not depend on
the rest of the batch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from concepts.devices import resolve_device, resolve_dtype
from concepts.generators.base import BaseGenerator, _RunState, _timestep_value

__all__ = [
    "DiffusersGenerator",
    "PixArtGenerator",
    "StableDiffusionGenerator",
    "UnconditionalDiffusionGenerator",
]

logger = logging.getLogger(__name__)

TextEncoderFn = Callable[[list[str]], "Tensor | tuple[Tensor, Tensor | None]"]


class DiffusersGenerator(BaseGenerator):
    """Shared part of the diffusers adapters (use a concrete subclass).

    Parameters
    ----------
    pipeline : diffusers.DiffusionPipeline
        A loaded or hand-built pipeline; its modules are put in eval mode.
    text_encoder_fn : callable, optional
        ``fn(prompts: list[str]) -> embeds [N, L, D]`` or ``(embeds, mask [N, L])``; replaces the
        pipeline's tokenizer + text encoder (e.g. a custom text tower). Called once for the
        prompts and once for the negative prompts.
    extra_modules : mapping of str to nn.Module, optional
        More modules to expose for hooks (e.g. the custom text tower behind ``text_encoder_fn``),
        under their key.
    model_id : str, optional
        Name written in the records (default: the pipeline's ``name_or_path`` or class name).
    device, dtype : optional
        Move/cast the pipeline (default: leave it as it is).
    settings : mapping, optional
        Default generation settings for this generator.
    verbose : bool, default False
        Show the pipeline's progress bar.
    """

    cfg_order: ClassVar[str | None] = "uncond_cond"
    cache_layout: ClassVar[str] = "steps"
    _denoiser_attr: ClassVar[str] = "unet"
    _pipeline_classes: ClassVar[tuple[str, ...]] = ()
    _load_kwargs: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        pipeline: Any,
        *,
        text_encoder_fn: TextEncoderFn | None = None,
        extra_modules: Mapping[str, nn.Module] | None = None,
        model_id: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        settings: Mapping[str, Any] | None = None,
        verbose: bool = False,
    ) -> None:
        den = getattr(pipeline, self._denoiser_attr, None)
        if not isinstance(den, nn.Module) or not callable(pipeline):
            raise TypeError(
                f"{type(self).__name__} expects a diffusers pipeline with a `{self._denoiser_attr}` module "
                f"({', '.join(self._pipeline_classes) or 'diffusers pipeline'}), got {type(pipeline).__name__}. "
                "Use concepts.generators.from_pretrained(path) to pick the adapter automatically."
            )
        if text_encoder_fn is not None and not callable(text_encoder_fn):
            raise TypeError(f"text_encoder_fn must be callable, got {type(text_encoder_fn).__name__}.")
        if device is not None or dtype is not None:
            kw: dict[str, Any] = {}
            if device is not None:
                kw["device"] = resolve_device(device)
            if dtype is not None:
                kw["dtype"] = resolve_dtype(dtype)
            pipeline.to(**kw)
        if model_id is None:
            model_id = getattr(pipeline, "name_or_path", None) or type(pipeline).__name__
        super().__init__(model_id=model_id, settings=settings, verbose=verbose)
        self.pipeline = pipeline
        self.text_encoder_fn = text_encoder_fn
        mods: dict[str, nn.Module] = {}
        comps = getattr(pipeline, "components", {}) or {}
        for name, comp in comps.items():
            if isinstance(comp, nn.Module):
                mods[name] = comp
        mods.setdefault(self._denoiser_attr, den)
        for name, mod in (extra_modules or {}).items():
            if not isinstance(mod, nn.Module):
                raise TypeError(f"extra_modules[{name!r}] must be an nn.Module, got {type(mod).__name__}.")
            if name in mods and mods[name] is not mod:
                raise ValueError(f"extra_modules key {name!r} clashes with the pipeline component of that name.")
            mods[name] = mod
        self._root = nn.ModuleDict(mods)
        self._root.eval()  # generation never trains: dropout off (as DiffusionPipeline.from_pretrained leaves it)
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=not verbose)

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
        text_encoder_fn: TextEncoderFn | None = None,
        settings: Mapping[str, Any] | None = None,
        verbose: bool = False,
        local_files_only: bool | None = None,
        **load_kwargs: Any,
    ) -> DiffusersGenerator:
        """Load a diffusers pipeline (hub id or local folder) and wrap it.

        Parameters
        ----------
        path_or_id : str
            A folder written by ``pipeline.save_pretrained`` or a hub id (downloads only if the
            environment allows; tests run with ``HF_HUB_OFFLINE=1``).
        device, dtype : optional
            Where/what to run (``dtype`` is passed as ``torch_dtype``).
        text_encoder_fn, settings, verbose
            As in the constructor.
        local_files_only : bool, optional
            Passed to diffusers (default: its own, i.e. the ``HF_HUB_OFFLINE`` setting).
        **load_kwargs
            More ``DiffusionPipeline.from_pretrained`` arguments (``variant="fp16"``, ...).

        Returns
        -------
        DiffusersGenerator
            An instance of the class this is called on.

        Examples
        --------
        >>> # gen = StableDiffusionGenerator.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
        >>> #                                               device="cuda", dtype="float16")
        >>> # out = gen.generate(["a red circle"], seeds=[0], steps=30, guidance=7.5)
        """
        from diffusers import DiffusionPipeline

        kw = dict(cls._load_kwargs)
        kw.update(load_kwargs)
        if dtype is not None:
            from diffusers.pipelines import pipeline_utils

            # diffusers >= 0.36 calls it `dtype` (and deprecates `torch_dtype`)
            key = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
            kw[key] = resolve_dtype(dtype)
        if local_files_only is not None:
            kw["local_files_only"] = local_files_only
        pipe = DiffusionPipeline.from_pretrained(path_or_id, **kw)
        name = type(pipe).__name__
        if cls._pipeline_classes and name not in cls._pipeline_classes:
            raise TypeError(
                f"{path_or_id!r} holds a {name}, but {cls.__name__} wraps {list(cls._pipeline_classes)}. "
                "Use concepts.generators.from_pretrained(path) to pick the adapter automatically."
            )
        return cls(pipe, text_encoder_fn=text_encoder_fn, model_id=str(path_or_id), device=device,
                   settings=settings, verbose=verbose)

    # -- machinery ------------------------------------------------------------------------------
    def _hook_root(self) -> nn.Module:
        return self._root

    @property
    def denoiser(self) -> nn.Module:
        """The network called once per denoising step (``unet`` or ``transformer``)."""
        return getattr(self.pipeline, self._denoiser_attr)

    @contextmanager
    def _tracking(self, state: _RunState) -> Any:
        def pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            state.phase = "denoise"
            state.branch = None
            state.step = 0 if state.step is None else state.step + 1
            state.timestep = _timestep_value(t)

        def post(_module: nn.Module, _args: Any, _output: Any) -> None:
            state.phase = "decode"

        handles = [
            self.denoiser.register_forward_pre_hook(pre, with_kwargs=True),
            self.denoiser.register_forward_hook(post),
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

    def _device(self) -> torch.device:
        dev = getattr(self.pipeline, "_execution_device", None)
        return dev if isinstance(dev, torch.device) else self.denoiser.device

    def _negatives(self, negative_prompt: Any, n: int) -> list[str]:
        if negative_prompt is None:
            return [""] * n
        if isinstance(negative_prompt, str):
            return [negative_prompt] * n
        neg = list(negative_prompt)
        if len(neg) != n or not all(isinstance(p, str) for p in neg):
            raise ValueError(
                f"negative_prompt must be a str or a list of {n} strings (one per image), got {negative_prompt!r}."
            )
        return neg

    def _custom_encode(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        out = self.text_encoder_fn(list(prompts))  # type: ignore[misc]
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise ValueError(
                    f"text_encoder_fn must return embeddings or (embeddings, mask), got a {type(out).__name__} "
                    f"of length {len(out)}."
                )
            emb, mask = out
        else:
            emb, mask = out, None
        if not isinstance(emb, Tensor) or emb.dim() != 3 or emb.shape[0] != len(prompts):
            raise ValueError(
                f"text_encoder_fn must return embeddings [N, L, D] with N={len(prompts)} (optionally with a mask "
                f"[N, L]), got {tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__}."
            )
        if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(emb.shape[:2])):
            raise ValueError(
                f"text_encoder_fn's mask must have shape {tuple(emb.shape[:2])}, got "
                f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}."
            )
        return emb, mask

    def _encode_both(
        self, prompts: list[str], settings: Mapping[str, Any], state: _RunState, use_cfg: bool
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        with state.scope(phase="encode", branch="cond", step=None):
            cond, cmask = self._encode(prompts, settings)
        unc = umask = None
        if use_cfg:
            neg = self._negatives(settings.get("negative_prompt"), len(prompts))
            with state.scope(phase="encode", branch="uncond", step=None):
                unc, umask = self._encode(neg, settings)
            if unc.shape != cond.shape:
                raise ValueError(
                    f"Prompt embeddings {tuple(cond.shape)} and negative-prompt embeddings {tuple(unc.shape)} differ "
                    "in shape; make text_encoder_fn pad every prompt to the same length."
                )
        den = self.denoiser
        cast = {"device": self._device(), "dtype": den.dtype}
        cond = cond.to(**cast)
        unc = None if unc is None else unc.to(**cast)
        return cond, cmask, unc, umask

    def _encode(self, prompts: list[str], settings: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError  # pragma: no cover

    def _extras(self, prompts: list[str], settings: Mapping[str, Any], use_cfg: bool) -> dict[str, Any]:
        neg = self._negatives(settings.get("negative_prompt"), len(prompts)) if use_cfg else [None] * len(prompts)
        return {"scheduler": type(self.pipeline.scheduler).__name__, "per_image": {"negative_prompt": neg}}

    def _postprocess(self, images: Any) -> Tensor:
        if not isinstance(images, Tensor):
            images = torch.as_tensor(images)
        if images.dim() != 4:
            raise RuntimeError(f"The pipeline returned images of shape {tuple(images.shape)}; expected [N, 3, H, W].")
        return images.permute(0, 2, 3, 1)


class StableDiffusionGenerator(DiffusersGenerator):
    """Stable Diffusion (``StableDiffusionPipeline``) behind the :class:`Generator` protocol.

    Settings (``generate(..., **settings)``): ``steps`` (50), ``guidance`` (7.5),
    ``negative_prompt`` (""), ``height``/``width`` (None: the UNet's size), ``eta`` (0.0),
    ``clip_skip`` (None), ``pipeline_kwargs`` (dict passed to the pipeline call).

    CFG rows: ``[uncond; cond]`` (``cfg_order="uncond_cond"``); UNet layers fire once per step.

    Parameters
    ----------
    pipeline : diffusers.StableDiffusionPipeline
        With its own tokenizer + text encoder, or built with ``text_encoder=None, tokenizer=None``
        and used with ``text_encoder_fn``.
    **kwargs
        See :class:`DiffusersGenerator`.

    Examples
    --------
    >>> # from diffusers import StableDiffusionPipeline
    >>> # gen = StableDiffusionGenerator.from_pretrained("path/to/sd-folder", device="cuda", dtype="fp16")
    >>> # out = gen.generate(["a photo of a church"], seeds=[0], steps=30)
    >>> # cache = gen.run_with_cache(["a church"], [0], ["unet.up_blocks.1.attentions.1"], steps=30)
    >>> # cond, uncond = cache.split_cfg("unet.up_blocks.1.attentions.1")   # [1, 30, C, H, W] each
    """

    family: ClassVar[str] = "stable-diffusion"
    _denoiser_attr: ClassVar[str] = "unet"
    _pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)
    _load_kwargs: ClassVar[dict[str, Any]] = {"safety_checker": None, "requires_safety_checker": False}
    _default_settings: ClassVar[dict[str, Any]] = {
        "steps": 50,
        "guidance": 7.5,
        "negative_prompt": "",
        "height": None,
        "width": None,
        "eta": 0.0,
        "clip_skip": None,
        "pipeline_kwargs": None,
    }

    def _uses_cfg(self, settings: Mapping[str, Any]) -> bool:
        proj = getattr(self.denoiser.config, "time_cond_proj_dim", None)
        return float(settings["guidance"]) > 1.0 and proj is None

    def _encode(self, prompts: list[str], settings: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
        if self.text_encoder_fn is not None:
            return self._custom_encode(prompts)
        pipe = self.pipeline
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ValueError(
                "This pipeline has no tokenizer/text_encoder; pass text_encoder_fn=fn(prompts) -> embeddings "
                "[N, L, cross_attention_dim] to StableDiffusionGenerator."
            )
        emb, _ = pipe.encode_prompt(list(prompts), self._device(), 1, False, clip_skip=settings.get("clip_skip"))
        return emb, None

    def _generate_impl(
        self, prompts: list[str], seeds: list[int], settings: dict[str, Any], state: _RunState
    ) -> tuple[Tensor, dict[str, Any]]:
        use_cfg = self._uses_cfg(settings)
        cond, _, unc, _ = self._encode_both(prompts, settings, state, use_cfg)
        kwargs: dict[str, Any] = {
            "prompt_embeds": cond,
            "negative_prompt_embeds": unc,
            "num_inference_steps": int(settings["steps"]),
            "guidance_scale": float(settings["guidance"]),
            "generator": self._generators(seeds),
            "output_type": "pt",
            "height": settings["height"],
            "width": settings["width"],
            "eta": float(settings["eta"]),
        }
        kwargs.update(settings.get("pipeline_kwargs") or {})
        out = self.pipeline(**kwargs)
        return self._postprocess(out.images), self._extras(prompts, settings, use_cfg)


class PixArtGenerator(DiffusersGenerator):
    """PixArt-alpha / PixArt-sigma (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``).

    Settings: ``steps`` (20), ``guidance`` (4.5), ``negative_prompt`` (""), ``height``/``width``
    (None), ``eta`` (0.0), ``max_sequence_length`` (120), ``clean_caption`` (False: needs bs4 and
    ftfy), ``resolution_binning`` (False: generate at exactly height x width), ``pipeline_kwargs``.

    CFG rows: ``[uncond; cond]`` (``cfg_order="uncond_cond"``); transformer blocks fire once per
    step. ``text_encoder_fn`` must return ``(embeds, mask)`` (a mask of ones is used if None).

    Examples
    --------
    >>> # gen = PixArtGenerator.from_pretrained("PixArt-alpha/PixArt-XL-2-512x512", device="cuda", dtype="fp16")
    >>> # cache = gen.run_with_cache(["a cat"], [0], ["transformer.transformer_blocks.13"], steps=20)
    """

    family: ClassVar[str] = "pixart"
    _denoiser_attr: ClassVar[str] = "transformer"
    _pipeline_classes: ClassVar[tuple[str, ...]] = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    _default_settings: ClassVar[dict[str, Any]] = {
        "steps": 20,
        "guidance": 4.5,
        "negative_prompt": "",
        "height": None,
        "width": None,
        "eta": 0.0,
        "max_sequence_length": 120,
        "clean_caption": False,
        "resolution_binning": False,
        "pipeline_kwargs": None,
    }

    def _uses_cfg(self, settings: Mapping[str, Any]) -> bool:
        return float(settings["guidance"]) > 1.0

    def _encode(self, prompts: list[str], settings: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
        if self.text_encoder_fn is not None:
            emb, mask = self._custom_encode(prompts)
            if mask is None:
                mask = torch.ones(emb.shape[:2], dtype=torch.long)
            return emb, mask
        pipe = self.pipeline
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ValueError(
                "This pipeline has no tokenizer/text_encoder; pass text_encoder_fn=fn(prompts) -> (embeddings "
                "[N, L, caption_channels], mask [N, L]) to PixArtGenerator."
            )
        emb, mask, _, _ = pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=self._device(),
            clean_caption=bool(settings["clean_caption"]),
            max_sequence_length=int(settings["max_sequence_length"]),
        )
        return emb, mask

    def _generate_impl(
        self, prompts: list[str], seeds: list[int], settings: dict[str, Any], state: _RunState
    ) -> tuple[Tensor, dict[str, Any]]:
        use_cfg = self._uses_cfg(settings)
        cond, cmask, unc, umask = self._encode_both(prompts, settings, state, use_cfg)
        dev = self._device()
        kwargs: dict[str, Any] = {
            "prompt": None,
            "negative_prompt": None,
            "prompt_embeds": cond,
            "prompt_attention_mask": cmask.to(dev),
            "negative_prompt_embeds": unc,
            "negative_prompt_attention_mask": None if umask is None else umask.to(dev),
            "num_inference_steps": int(settings["steps"]),
            "guidance_scale": float(settings["guidance"]),
            "generator": self._generators(seeds),
            "output_type": "pt",
            "height": settings["height"],
            "width": settings["width"],
            "eta": float(settings["eta"]),
            "use_resolution_binning": bool(settings["resolution_binning"]),
            "max_sequence_length": int(settings["max_sequence_length"]),
            "clean_caption": bool(settings["clean_caption"]),
        }
        kwargs.update(settings.get("pipeline_kwargs") or {})
        out = self.pipeline(**kwargs)
        return self._postprocess(out.images), self._extras(prompts, settings, use_cfg)


class UnconditionalDiffusionGenerator(DiffusersGenerator):
    """Unconditional diffusion (``DDPMPipeline``, ``DDIMPipeline``); prompts must be None or "".

    Settings: ``steps`` (50), ``eta`` (0.0, DDIM only), ``pipeline_kwargs``. The records carry
    ``guidance=None``. No CFG rows: every UNet batch has N rows; UNet layers fire once per step.

    Examples
    --------
    >>> # gen = UnconditionalDiffusionGenerator.from_pretrained("google/ddpm-cifar10-32")
    >>> # out = gen.generate(None, seeds=[0, 1, 2, 3], steps=100)
    """

    family: ClassVar[str] = "ddpm"
    cfg_order: ClassVar[str | None] = None
    conditional: ClassVar[bool] = False
    _denoiser_attr: ClassVar[str] = "unet"
    _pipeline_classes: ClassVar[tuple[str, ...]] = ("DDPMPipeline", "DDIMPipeline")
    _default_settings: ClassVar[dict[str, Any]] = {"steps": 50, "eta": 0.0, "pipeline_kwargs": None}

    def _uses_cfg(self, settings: Mapping[str, Any]) -> bool:
        return False

    def _generate_impl(
        self, prompts: list[str], seeds: list[int], settings: dict[str, Any], state: _RunState
    ) -> tuple[Tensor, dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "batch_size": len(seeds),
            "generator": self._generators(seeds),
            "num_inference_steps": int(settings["steps"]),
            "output_type": "pt",
        }
        if type(self.pipeline).__name__ == "DDIMPipeline":
            kwargs["eta"] = float(settings["eta"])
        elif float(settings["eta"]) != 0.0:
            raise ValueError(f"eta is a DDIM setting; {type(self.pipeline).__name__} does not take it. Leave eta=0.")
        kwargs.update(settings.get("pipeline_kwargs") or {})
        out = self.pipeline(**kwargs)
        return self._postprocess(out.images), {"scheduler": type(self.pipeline.scheduler).__name__, "guidance": None}
