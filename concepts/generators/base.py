"""The :class:`Generator` protocol shared by diffusion and autoregressive image generators.

Every adapter (diffusers pipelines, transformers Janus, a user's own autoregressive loop) offers

* ``generate(prompts, seeds, **settings) -> GenerationResult``: images [N, H, W, 3] float32 in
  [0, 1] plus one record per image (prompt, seed, steps, guidance, model id, ...). Each image has
  its own CPU :class:`torch.Generator` seeded with its seed, so an image depends on its prompt and
  seed only, not on what else is in the batch (up to float rounding of batched kernels);
* ``module_names()``: the dotted names that can be hooked;
* ``run_with_hooks(prompts, seeds, {layer: fn})``: generation with edited layer outputs;
* ``run_with_cache(prompts, seeds, layers)``: generation that also returns the layers' outputs
  (:class:`ActivationCache`), with a call map from each hook call to its phase and step;
* ``cfg_layout`` / ``split_cfg``: the family's classifier-free-guidance row order (see
  :mod:`concepts.generators.cfg`).

Hook calls and steps
--------------------
A layer fires once per network call. Each call gets a :class:`CallContext`:

=============  ==================================================================================
``phase``      diffusion: ``"encode"`` (text encoder), ``"denoise"`` (one denoiser call per step),
               ``"decode"`` (VAE). Autoregressive: ``"encode"``, ``"prefill"`` (the prompt,
               predicts image token 0), ``"token"`` (step ``s`` feeds the token(s) sampled at step
               ``s - 1`` and predicts those of step ``s``), ``"decode"`` (VQ decoder).
``step``       denoising step ``0..steps-1`` / AR step ``0..n_steps-1`` (raster AR: step = index
               of the image token predicted by the call; VAR-style: the scale stage)
``timestep``   the scheduler timestep of the denoiser call (diffusion only)
``rows``       the call's batch size; with CFG ``2 * n_images`` rows in the family's order
=============  ==================================================================================

Hook functions follow :func:`concepts.hooks.intervene` (``fn(output) -> Tensor | None``); a
function with a parameter named ``ctx`` (and every :class:`~concepts.generators.edits.Edit`)
also receives the :class:`CallContext`.
"""
from __future__ import annotations

import abc
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from concepts.generators.cfg import CFGLayout
from concepts.hooks import available_layers, intervene, resolve_layers

__all__ = [
    "ActivationCache",
    "BaseGenerator",
    "CallContext",
    "GenerationResult",
    "Generator",
    "HookFn",
    "PHASES",
]

logger = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("encode", "denoise", "prefill", "token", "decode")

HookFn = Callable[..., "Tensor | None"]


# ---------------------------------------------------------------------------------------------
# call contexts
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallContext:
    """Where a hooked layer call happens during a generation.

    Attributes
    ----------
    layer : str
        The hooked layer.
    call : int
        Index of this call among the calls of ``layer`` in the run (0-based).
    phase : str
        ``"encode"``, ``"denoise"``, ``"prefill"``, ``"token"`` or ``"decode"`` (module docstring).
    step : int or None
        Denoising step or autoregressive step (None in the encode phase).
    timestep : float or None
        Scheduler timestep of the current denoiser call (diffusion only).
    token_offset : int or None
        Autoregressive only: number of image tokens generated before this call (= index of the
        first image token the call predicts).
    n_images : int
        Number of images being generated.
    rows : int
        Batch size of this call.
    cfg : CFGLayout or None
        The CFG row layout when this run uses classifier-free guidance.
    branch : str or None
        ``"cond"`` / ``"uncond"`` when the whole call belongs to one branch (text-encoder calls
        of the encode phase); None otherwise.

    Examples
    --------
    >>> ctx = CallContext("unet.mid_block", 0, "denoise", 0, 981.0, None, 2, 4, CFGLayout("uncond_cond"), None)
    >>> ctx.row_index("cond").tolist()
    [2, 3]
    """

    layer: str
    call: int
    phase: str
    step: int | None
    timestep: float | None
    token_offset: int | None
    n_images: int
    rows: int
    cfg: CFGLayout | None
    branch: str | None

    def row_index(self, which: str) -> Tensor | None:
        """Rows of this call that belong to a branch.

        Parameters
        ----------
        which : {"all", "cond", "uncond"}
            ``"cond"``: conditional rows; ``"uncond"``: unconditional rows.

        Returns
        -------
        Tensor or None
            Long tensor of row indices, or None meaning "every row".

        Raises
        ------
        ValueError
            For an unknown ``which`` or when the call's rows cannot be attributed to branches.

        Examples
        --------
        >>> ctx = CallContext("l", 0, "token", 1, None, 1, 2, 4, CFGLayout("cond_uncond"), None)
        >>> ctx.row_index("uncond").tolist()
        [2, 3]
        """
        if which not in ("all", "cond", "uncond"):
            raise ValueError(f"rows must be 'all', 'cond' or 'uncond', got {which!r}.")
        if which == "all":
            return None
        if self.branch is not None:  # the whole call is one branch
            return None if self.branch == which else torch.zeros(0, dtype=torch.long)
        if self.cfg is not None and self.rows == 2 * self.n_images:
            return self.cfg.cond_index(self.rows) if which == "cond" else self.cfg.uncond_index(self.rows)
        if self.rows == self.n_images:  # no CFG batch: every row is conditional
            return None if which == "cond" else torch.zeros(0, dtype=torch.long)
        raise ValueError(
            f"Cannot tell conditional from unconditional rows in the call of layer {self.layer!r} "
            f"(phase {self.phase!r}): it has {self.rows} rows for {self.n_images} images. "
            "Restrict the edit with rows='all', or hook a layer of the denoiser / language model."
        )

    def as_dict(self) -> dict[str, Any]:
        """The context as a flat dict (``cfg`` as its order string), as used by call maps.

        Examples
        --------
        >>> CallContext("l", 0, "prefill", 0, None, 0, 1, 2, CFGLayout("cond_uncond"), None).as_dict()["cfg"]
        'cond_uncond'
        """
        return {
            "layer": self.layer,
            "call": self.call,
            "phase": self.phase,
            "step": self.step,
            "timestep": self.timestep,
            "token_offset": self.token_offset,
            "rows": self.rows,
            "n_images": self.n_images,
            "cfg": None if self.cfg is None else self.cfg.order,
            "branch": self.branch,
        }


class _RunState:
    """Mutable generation state read by the hooks (phase, step, ...), set by the adapters."""

    def __init__(self, n_images: int, cfg: CFGLayout | None) -> None:
        self.n_images = n_images
        self.cfg = cfg
        self.phase = "encode"
        self.step: int | None = None
        self.timestep: float | None = None
        self.token_offset: int | None = None
        self.branch: str | None = None
        self.counts: dict[str, int] = {}
        self.contexts: list[CallContext] = []

    def context(self, layer: str, rows: int) -> CallContext:
        call = self.counts.get(layer, 0)
        self.counts[layer] = call + 1
        ctx = CallContext(
            layer=layer,
            call=call,
            phase=self.phase,
            step=self.step,
            timestep=self.timestep,
            token_offset=self.token_offset,
            n_images=self.n_images,
            rows=rows,
            cfg=self.cfg,
            branch=self.branch,
        )
        self.contexts.append(ctx)
        return ctx

    @contextmanager
    def scope(self, **fields: Any) -> Iterator[None]:
        """Temporarily set state fields (restored on exit)."""
        old = {k: getattr(self, k) for k in fields}
        for k, v in fields.items():
            setattr(self, k, v)
        try:
            yield
        finally:
            for k, v in old.items():
                setattr(self, k, v)

    def frame(self) -> pd.DataFrame:
        cols = ["layer", "call", "phase", "step", "timestep", "token_offset", "rows", "n_images", "cfg", "branch"]
        return pd.DataFrame([c.as_dict() for c in self.contexts], columns=cols)


def _wants_ctx(fn: Callable[..., Any]) -> bool:
    if getattr(fn, "wants_context", False):
        return True
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "ctx" in params


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationResult:
    """Images and their generation records.

    Attributes
    ----------
    images : Tensor
        [N, H, W, 3] float32 in [0, 1], on the CPU.
    records : list of dict
        One dict per image: ``index, prompt, seed, family, model_id, steps, guidance, height,
        width, edited_layers`` plus the family's other settings. ``pd.DataFrame(records)`` works.
    tokens : Tensor or None
        Autoregressive generators: [N, T] sampled image-token ids.
    call_map : pandas.DataFrame or None
        One row per hooked layer call (columns of :meth:`CallContext.as_dict`); None without hooks.

    Examples
    --------
    >>> import torch
    >>> r = GenerationResult(torch.zeros(1, 2, 2, 3), [{"prompt": "a", "seed": 0}])
    >>> r.to_frame().seed.tolist(), r.to_uint8().dtype.name
    ([0], 'uint8')
    """

    images: Tensor
    records: list[dict[str, Any]]
    tokens: Tensor | None = None
    call_map: pd.DataFrame | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to_frame(self) -> pd.DataFrame:
        """The per-image records as a DataFrame (one row per image)."""
        return pd.DataFrame(self.records)

    def to_uint8(self) -> np.ndarray:
        """Images as uint8 numpy [N, H, W, 3] (the format of ConceptWorld and the encoders)."""
        return (self.images.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()

    def to_pil(self) -> list[Any]:
        """Images as a list of ``PIL.Image.Image``."""
        from PIL import Image

        return [Image.fromarray(a) for a in self.to_uint8()]


class ActivationCache(Mapping[str, Tensor]):
    """Layer outputs recorded during a generation, with the call map.

    ``cache[layer]`` assembles the layer's calls rows-first, so CFG rows are always on dim 0:

    * diffusion (``layout="steps"``): calls stacked on dim 1 -> [rows, calls, ...]; call ``i`` is
      the denoising step in ``call_map`` (one call per step for layers of the denoiser);
    * autoregressive (``layout="sequence"``): outputs with a sequence dimension ([rows, len, ...])
      are concatenated along it -> [rows, prompt_len + n_fed_tokens, ...], i.e. the prefill
      positions followed by one position per fed image token (the last sampled token is never
      fed); 2-D outputs are stacked on dim 1 -> [rows, calls, d];
    * encode-phase calls made once per branch (text encoders) are merged into one CFG batch in the
      family's row order -> [rows, ...].

    The raw per-call tensors are in :attr:`calls` and their contexts in :attr:`contexts`.

    Attributes
    ----------
    calls : dict of str to list of Tensor
    contexts : dict of str to list of CallContext
    result : GenerationResult
    layout : str
    cfg : CFGLayout or None

    Examples
    --------
    >>> import torch
    >>> ctx = [CallContext("l", i, "denoise", i, None, None, 1, 2, CFGLayout("uncond_cond"), None) for i in range(3)]
    >>> cache = ActivationCache({"l": [torch.full((2, 4), float(i)) for i in range(3)]}, {"l": ctx},
    ...                         result=None, layout="steps", cfg=CFGLayout("uncond_cond"))
    >>> cache["l"].shape
    torch.Size([2, 3, 4])
    >>> cond, uncond = cache.split_cfg("l")
    >>> cond.shape
    torch.Size([1, 3, 4])
    """

    def __init__(
        self,
        calls: dict[str, list[Tensor]],
        contexts: dict[str, list[CallContext]],
        *,
        result: GenerationResult | None,
        layout: str,
        cfg: CFGLayout | None,
    ) -> None:
        if layout not in ("steps", "sequence"):
            raise ValueError(f"layout must be 'steps' or 'sequence', got {layout!r}.")
        self.calls = calls
        self.contexts = contexts
        self.result = result
        self.layout = layout
        self.cfg = cfg
        self._assembled: dict[str, Tensor] = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self.calls)

    def __len__(self) -> int:
        return len(self.calls)

    def __getitem__(self, layer: str) -> Tensor:
        if layer not in self.calls:
            raise KeyError(f"Layer {layer!r} was not cached; cached layers: {list(self.calls)}.")
        if layer not in self._assembled:
            self._assembled[layer] = self._assemble(layer)
        return self._assembled[layer]

    @property
    def images(self) -> Tensor | None:
        """The generated images [N, H, W, 3] (shortcut for ``result.images``)."""
        return None if self.result is None else self.result.images

    @property
    def call_map(self) -> pd.DataFrame:
        """One row per cached call: layer, call, phase, step, timestep, token_offset, rows, ..."""
        rows = [c.as_dict() for layer in self.contexts for c in self.contexts[layer]]
        cols = ["layer", "call", "phase", "step", "timestep", "token_offset", "rows", "n_images", "cfg", "branch"]
        return pd.DataFrame(rows, columns=cols)

    def _assemble(self, layer: str) -> Tensor:
        ts, cs = self.calls[layer], self.contexts[layer]
        if not ts:
            raise ValueError(
                f"Layer {layer!r} was never called during the generation, so nothing was cached. "
                "Check call_map / module_names(): the layer may belong to an unused component."
            )
        hint = (
            f"The {len(ts)} calls of layer {layer!r} have shapes {sorted({tuple(t.shape) for t in ts})} "
            f"in phases {sorted({c.phase for c in cs})} and cannot be assembled into one tensor; use "
            f"cache.calls[{layer!r}] and cache.contexts[{layer!r}] instead."
        )
        if all(c.branch is not None for c in cs):  # per-branch encoder calls -> one CFG batch
            cond = [t for t, c in zip(ts, cs) if c.branch == "cond"]
            uncond = [t for t, c in zip(ts, cs) if c.branch == "uncond"]
            try:
                if self.cfg is None or not uncond:
                    return torch.cat(cond, 0)
                return self.cfg.merge(torch.cat(cond, 0), torch.cat(uncond, 0))
            except (RuntimeError, ValueError) as exc:
                raise ValueError(hint) from exc
        try:
            if self.layout == "sequence" and ts[0].dim() >= 3:
                return torch.cat(ts, dim=1)
            return torch.stack(ts, dim=1)
        except RuntimeError as exc:
            raise ValueError(hint) from exc

    def split_cfg(self, layer: str) -> tuple[Tensor, Tensor]:
        """``(cond, uncond)`` rows of ``cache[layer]`` (each [n_images, ...]).

        Raises
        ------
        ValueError
            If the run did not use classifier-free guidance.
        """
        if self.cfg is None:
            raise ValueError(
                "This generation did not use classifier-free guidance (guidance == 1 or an unconditional "
                "model), so there are no unconditional rows to split. Generate with guidance != 1."
            )
        return self.cfg.split(self[layer], dim=0)


# ---------------------------------------------------------------------------------------------
# protocol
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class Generator(Protocol):
    """What every image generator adapter offers (see module docstring).

    Examples
    --------
    >>> # from concepts.generators import Generator, from_pretrained
    >>> # isinstance(from_pretrained("path/to/pipeline"), Generator)  -> True
    """

    family: str
    model_id: str

    def split_cfg(self, x: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]: ...

    def generate(self, prompts: Any, seeds: Any, **settings: Any) -> GenerationResult: ...

    def module_names(self, contains: str | None = None) -> list[str]: ...

    def run_with_hooks(self, prompts: Any, seeds: Any, hooks: Mapping[str, Any], **settings: Any) -> GenerationResult: ...

    def run_with_cache(self, prompts: Any, seeds: Any, layers: Any, **settings: Any) -> ActivationCache: ...

    @property
    def cfg_layout(self) -> CFGLayout | None: ...


def _check_seed(s: Any) -> int:
    if isinstance(s, bool) or not isinstance(s, numbers.Integral) or int(s) < 0:
        raise ValueError(
            f"Seeds must be non-negative integers, got {s!r} ({type(s).__name__}). "
            "Pass one int per image, e.g. seeds=[0, 1, 2]."
        )
    return int(s)


class BaseGenerator(abc.ABC):
    """Shared machinery of the adapters: input checks, settings, hooks, caches and records.

    Subclasses set ``family``, ``cfg_order``, ``cache_layout`` and ``_default_settings`` and
    implement :meth:`_hook_root`, :meth:`_generate_impl` and :meth:`_uses_cfg`; they may override
    :meth:`_tracking` to update the run state (phase, step) from module pre-hooks.
    """

    family: ClassVar[str] = "generator"
    cfg_order: ClassVar[str | None] = None
    cache_layout: ClassVar[str] = "steps"
    conditional: ClassVar[bool] = True
    _default_settings: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, model_id: str, settings: Mapping[str, Any] | None = None, verbose: bool = False) -> None:
        self.model_id = str(model_id)
        self.verbose = bool(verbose)
        self.settings: dict[str, Any] = dict(self._default_settings)
        if settings:
            self.settings.update(self._resolve_settings(settings))

    # -- to implement -----------------------------------------------------------------------------
    @abc.abstractmethod
    def _hook_root(self) -> nn.Module:
        """The module whose dotted sub-module names are the hookable layers."""

    @abc.abstractmethod
    def _generate_impl(
        self, prompts: list[str], seeds: list[int], settings: dict[str, Any], state: _RunState
    ) -> tuple[Tensor, dict[str, Any]]:
        """Generate; return images [N, H, W, 3] in [0, 1] and extras (``tokens``, record fields)."""

    @abc.abstractmethod
    def _uses_cfg(self, settings: Mapping[str, Any]) -> bool:
        """Whether a generation with these settings runs conditional and unconditional rows."""

    def _tracking(self, state: _RunState) -> Any:  # pragma: no cover - default: nothing to track
        return nullcontext()

    # -- public API ----------------------------------------------------------------------------
    @property
    def cfg_layout(self) -> CFGLayout | None:
        """The family's classifier-free-guidance row order (None for unconditional models)."""
        return None if self.cfg_order is None else CFGLayout(self.cfg_order)

    def split_cfg(self, x: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
        """Split a CFG batch of this family into ``(cond, uncond)`` (see :class:`CFGLayout`).

        Raises
        ------
        ValueError
            For an unconditional generator (no CFG rows).
        """
        layout = self.cfg_layout
        if layout is None:
            raise ValueError(
                f"{type(self).__name__} is unconditional: its batches have no conditional/unconditional rows."
            )
        return layout.split(x, dim=dim)

    def module_names(self, contains: str | None = None) -> list[str]:
        """Dotted names of the hookable layers (optionally those containing ``contains``).

        Examples
        --------
        >>> # gen.module_names("attn2")[:2]  ->  ['unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2', ...]
        """
        return available_layers(self._hook_root(), contains=contains)

    def generate(self, prompts: str | Sequence[str] | None, seeds: int | Sequence[int], **settings: Any) -> GenerationResult:
        """Generate one image per prompt and seed.

        Parameters
        ----------
        prompts : str, sequence of str or None
            One prompt per image (None for unconditional models).
        seeds : int or sequence of int
            One non-negative seed per image; an int ``s`` means ``s, s+1, ..., s+N-1``.
        **settings
            Generation settings of the family (``steps``, ``guidance``, ...); see the adapter.

        Returns
        -------
        GenerationResult

        Examples
        --------
        >>> # out = gen.generate(["a red circle", "a blue star"], seeds=[0, 1], steps=30, guidance=7.5)
        >>> # out.images.shape -> torch.Size([2, H, W, 3]); out.to_frame()[["prompt", "seed", "steps"]]
        """
        return self._run(prompts, seeds, settings)

    def run_with_hooks(
        self,
        prompts: str | Sequence[str] | None,
        seeds: int | Sequence[int],
        hooks: Mapping[str, HookFn | Sequence[HookFn]],
        **settings: Any,
    ) -> GenerationResult:
        """Generate while editing layer outputs.

        Parameters
        ----------
        prompts, seeds, **settings
            As in :meth:`generate`.
        hooks : mapping of str to callable or list of callables
            ``{layer: fn}``; ``fn(output) -> Tensor | None`` (None keeps the output). A function
            with a ``ctx`` parameter, and every :class:`~concepts.generators.edits.Edit`, also gets
            the :class:`CallContext`. Several functions per layer run in order.

        Returns
        -------
        GenerationResult
            With ``call_map`` listing every hooked call.

        Examples
        --------
        >>> # from concepts.generators import AddVector, ClampFeatures
        >>> # out = gen.run_with_hooks(prompts, seeds, {
        >>> #     "unet.up_blocks.1.attentions.1": ClampFeatures(sae, [412], value=0.0, dim=1, rows="cond"),
        >>> #     "unet.mid_block": AddVector(direction, strength=-4.0, dim=1, steps=range(0, 10)),
        >>> # })
        """
        if not isinstance(hooks, Mapping):
            raise TypeError(
                f"hooks must be a mapping {{layer: fn}}, got {type(hooks).__name__}. "
                "Example: gen.run_with_hooks(prompts, seeds, {'unet.mid_block': AddVector(v)})."
            )
        return self._run(prompts, seeds, settings, hooks=hooks)

    def run_with_cache(
        self,
        prompts: str | Sequence[str] | None,
        seeds: int | Sequence[int],
        layers: str | Sequence[str],
        *,
        hooks: Mapping[str, HookFn | Sequence[HookFn]] | None = None,
        device: str | torch.device | None = "cpu",
        **settings: Any,
    ) -> ActivationCache:
        """Generate and record the outputs of ``layers`` at every call.

        Parameters
        ----------
        prompts, seeds, **settings
            As in :meth:`generate`.
        layers : str or sequence of str
            Layers to record (after any edit of ``hooks`` on the same layer).
        hooks : mapping, optional
            Edits applied during the same generation (as in :meth:`run_with_hooks`).
        device : str or torch.device or None, default "cpu"
            Where recorded tensors are kept (None: where they were computed).

        Returns
        -------
        ActivationCache

        Examples
        --------
        >>> # cache = gen.run_with_cache(["a church"], [0], ["unet.mid_block"], steps=30)
        >>> # cache["unet.mid_block"].shape      -> [2, 30, C, H, W]  ([uncond; cond] rows, steps)
        >>> # cond, uncond = cache.split_cfg("unet.mid_block")
        >>> # cache.call_map[["call", "phase", "step", "timestep"]]
        """
        names = [layers] if isinstance(layers, str) else list(layers)
        if not names:
            raise ValueError("layers is empty: pass at least one layer name (see module_names()).")
        if hooks is not None and not isinstance(hooks, Mapping):
            raise TypeError(f"hooks must be a mapping {{layer: fn}} or None, got {type(hooks).__name__}.")
        store: dict[str, list[Tensor]] = {n: [] for n in dict.fromkeys(names)}
        result, state = self._run(prompts, seeds, settings, hooks=hooks or {}, store=store, store_device=device,
                                  return_state=True)
        contexts: dict[str, list[CallContext]] = {n: [] for n in store}
        for c in state.contexts:
            if c.layer in contexts:
                contexts[c.layer].append(c)
        for n, ts in store.items():
            if not ts:
                logger.warning("Layer %r was never called during generation; its cache is empty.", n)
        return ActivationCache(store, contexts, result=result, layout=self.cache_layout, cfg=state.cfg)

    # -- machinery -----------------------------------------------------------------------------
    def _resolve_settings(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(settings) - set(self._default_settings))
        if unknown:
            hint = (
                " Pipeline-specific arguments go in pipeline_kwargs={...}."
                if "pipeline_kwargs" in self._default_settings
                else ""
            )
            raise TypeError(
                f"{type(self).__name__} got unknown setting(s) {unknown}; valid settings are "
                f"{sorted(self._default_settings)}.{hint}"
            )
        return dict(settings)

    def _check_inputs(self, prompts: Any, seeds: Any) -> tuple[list[str], list[int]]:
        if prompts is None:
            plist = None
        elif isinstance(prompts, str):
            plist = [prompts]
        elif isinstance(prompts, Sequence) or (hasattr(prompts, "__iter__") and not isinstance(prompts, (bytes, Mapping))):
            plist = list(prompts)
            bad = [p for p in plist if not (isinstance(p, str) or (p is None and not self.conditional))]
            if bad:
                raise TypeError(
                    f"prompts must be strings, got {type(bad[0]).__name__} ({bad[0]!r}). Pass a list of str."
                )
        else:
            raise TypeError(f"prompts must be a str, a sequence of str or None, got {type(prompts).__name__}.")

        if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
            if plist is None:
                raise ValueError(
                    "With prompts=None (unconditional generation) pass one seed per image as a sequence, "
                    "e.g. seeds=[0, 1, 2, 3]."
                )
            start = _check_seed(seeds)
            slist = list(range(start, start + len(plist)))
        elif isinstance(seeds, (Sequence, np.ndarray, Tensor)) and not isinstance(seeds, str):
            slist = [_check_seed(s.item() if hasattr(s, "item") else s) for s in seeds]
        else:
            raise TypeError(
                f"seeds must be an int or a sequence of ints (one per image), got {type(seeds).__name__}."
            )
        if not slist:
            raise ValueError("No images requested: pass at least one prompt/seed.")

        if not self.conditional:
            if plist is not None:
                if len(plist) != len(slist):
                    raise ValueError(
                        f"Got {len(plist)} prompts and {len(slist)} seeds; pass one seed per image "
                        "(prompts are ignored by unconditional models; prompts=None is simplest)."
                    )
                if any(p not in (None, "") for p in plist):
                    raise ValueError(
                        f"{type(self).__name__} is unconditional and cannot follow prompts; got "
                        f"{[p for p in plist if p][:3]}. Pass prompts=None (or empty strings)."
                    )
            return [""] * len(slist), slist
        if plist is None:
            raise ValueError(
                f"{type(self).__name__} is text-conditional: pass one prompt per image "
                "(use '' for an unconditional sample)."
            )
        if not plist:
            raise ValueError("prompts is empty: pass at least one prompt.")
        if len(plist) != len(slist):
            raise ValueError(
                f"Got {len(plist)} prompts but {len(slist)} seeds; pass exactly one seed per prompt "
                "(or one int, expanded to consecutive seeds)."
            )
        return plist, slist

    def _make_hook(
        self,
        name: str,
        fns: list[HookFn],
        state: _RunState,
        store: list[Tensor] | None,
        store_device: str | torch.device | None,
    ) -> Callable[[Tensor], Tensor | None]:
        wants = [_wants_ctx(fn) for fn in fns]

        def hook(x: Tensor) -> Tensor | None:
            ctx = state.context(name, int(x.shape[0]) if x.dim() else 1)
            cur, changed = x, False
            for fn, w in zip(fns, wants):
                new = fn(cur, ctx=ctx) if w else fn(cur)
                if new is None:
                    continue
                if not isinstance(new, Tensor):
                    raise TypeError(
                        f"The hook for layer {name!r} returned {type(new).__name__}; expected a Tensor "
                        "(the replacement output) or None (keep the output)."
                    )
                if new.shape != x.shape:
                    raise ValueError(
                        f"The hook for layer {name!r} returned shape {tuple(new.shape)} but the layer output "
                        f"has shape {tuple(x.shape)}; edits must keep the shape."
                    )
                cur, changed = new, True
            if store is not None:
                t = cur.detach()
                store.append(t.to(store_device, copy=True) if store_device is not None else t.clone())
            return cur if changed else None

        return hook

    def _run(
        self,
        prompts: Any,
        seeds: Any,
        settings: Mapping[str, Any],
        *,
        hooks: Mapping[str, Any] | None = None,
        store: dict[str, list[Tensor]] | None = None,
        store_device: str | torch.device | None = "cpu",
        return_state: bool = False,
    ) -> Any:
        plist, slist = self._check_inputs(prompts, seeds)
        resolved = dict(self.settings)
        resolved.update(self._resolve_settings(settings))
        use_cfg = self._uses_cfg(resolved)
        state = _RunState(n_images=len(slist), cfg=self.cfg_layout if use_cfg else None)

        fns: dict[str, list[HookFn]] = {}
        for name, fn in (hooks or {}).items():
            items = list(fn) if isinstance(fn, (list, tuple)) else [fn]
            for f in items:
                if not callable(f):
                    raise TypeError(
                        f"The hook for layer {name!r} must be callable (or a list of callables), got {type(f).__name__}."
                    )
            fns[name] = items
        names = list(dict.fromkeys([*fns, *(store or {})]))
        root = self._hook_root()
        if names:
            resolve_layers(root, names)  # early, helpful error for misspelt layers
        layer_hooks = {
            n: self._make_hook(n, fns.get(n, []), state, None if store is None else store.get(n), store_device)
            for n in names
        }
        with torch.no_grad(), self._tracking(state), (intervene(root, layer_hooks) if layer_hooks else nullcontext()):
            images, extras = self._generate_impl(plist, slist, resolved, state)

        images = images.detach().float().cpu().clamp_(0.0, 1.0)
        tokens = extras.pop("tokens", None)
        per_image = extras.pop("per_image", {})
        edited = ",".join(sorted(fns))
        records = []
        base = self._record_settings(resolved)
        base.update(extras)
        for i, (p, s) in enumerate(zip(plist, slist)):
            rec = {"index": i, "prompt": p, "seed": s, "family": self.family, "model_id": self.model_id}
            rec.update(base)
            rec.update({k: v[i] for k, v in per_image.items()})
            rec.update({"height": int(images.shape[1]), "width": int(images.shape[2]), "edited_layers": edited})
            records.append(rec)
        result = GenerationResult(
            images=images,
            records=records,
            tokens=None if tokens is None else tokens.detach().cpu(),
            call_map=state.frame() if names else None,
        )
        return (result, state) if return_state else result

    def _record_settings(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in settings.items():
            if k == "pipeline_kwargs":
                continue
            if v is None or isinstance(v, (str, bool, numbers.Number)):
                out[k] = v
            elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, numbers.Number)) for x in v):
                out[k] = list(v)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, family={self.family!r})"


def _timestep_value(t: Any) -> float | None:
    """A scalar timestep from a denoiser argument (tensor of shape [] or [B], or a number)."""
    if t is None:
        return None
    if isinstance(t, Tensor):
        if t.numel() == 0:
            return None
        return float(t.flatten()[0].item())
    if isinstance(t, numbers.Number):
        v = float(t)
        return v if math.isfinite(v) else None
    return None
