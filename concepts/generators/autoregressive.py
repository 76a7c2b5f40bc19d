"""Autoregressive image generators: a generic sampling loop with CFG, hooks and step maps.

:class:`ARLoopGenerator` owns the parts every token-by-token (LlamaGen, Janus) or
scale-by-scale (VAR) image generator shares -- classifier-free guidance, per-image seeded
sampling (temperature / top-k / top-p), the step counter read by the hooks, decoding to images --
and calls three functions of yours for the model-specific parts.

Recipe for your own loop
------------------------
Write three callables around your model and hand them to :class:`ARLoopGenerator`:

``prefill(prompts: list[str], cfg: bool) -> (logits, state)``
    Build the batch -- with ``cfg`` True, ``2N`` rows in the generator's ``cfg_order``
    (``"cond_uncond"``: conditional rows first, like LlamaGen/VAR/transformers Janus) -- run the
    prompt / class token(s) through the model (filling its KV cache) and return the logits of the
    first image token(s): [R, V] (one token) or [R, n, V] (n tokens at once, VAR stage) plus any
    state object you need later.
``step(tokens: LongTensor [R, n], step: int, state) -> (logits, state)``
    Feed the tokens sampled at the previous step (already duplicated to the ``R`` CFG rows in
    ``cfg_order``) and return the logits of the next token(s).
``decode(tokens: LongTensor [N, T]) -> images``
    Turn all sampled tokens (concatenated over steps) into images [N, 3, H, W] (or
    [N, H, W, 3] with ``channels_last=True``) in ``image_range``.

LlamaGen-style sketch (class-conditional, raster order, KV cache)::

    def prefill(prompts, cfg):
        cond = torch.tensor([classes.index(p) for p in prompts])
        idx = torch.cat([cond, torch.full_like(cond, gpt.num_classes)]) if cfg else cond
        gpt.setup_caches(max_batch_size=len(idx), max_seq_length=gpt.block_size, dtype=torch.float32)
        logits, _ = gpt(None, idx, input_pos=torch.arange(0, 1))
        return logits[:, -1], {"pos": 1}

    def step(tokens, s, state):
        logits, _ = gpt(tokens, None, input_pos=torch.tensor([state["pos"]]))
        state["pos"] += 1
        return logits[:, -1], state

    gen = ARLoopGenerator(gpt, prefill=prefill, step=step,
                          decode=lambda t: vq.decode_code(t, [len(t), 8, 16, 16]),
                          num_steps=256, cfg_order="cond_uncond", settings={"guidance": 4.0})

VAR-style loops return [R, pn^2, V] logits per stage (``num_steps`` = number of stages) and can
ramp the guidance with ``cfg_schedule=lambda s, g: 1 + g * s / (n_stages - 1)`` (VAR's
``(1 + t) cond - t uncond`` with ``t = g * s / (S - 1)``).

Call map
--------
The prefill call is ``phase="prefill"``, ``step=0``; the call feeding the tokens of step
``s - 1`` is ``phase="token"``, ``step=s`` and predicts the token(s) of step ``s``;
``token_offset`` counts the image tokens sampled before the call. The last sampled token(s) are
never fed back. Decoder layers fire in ``phase="decode"``.
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from concepts.generators.base import BaseGenerator, _RunState
from concepts.generators.cfg import CFG_ORDERS

__all__ = ["ARLoopGenerator", "sample_tokens"]

logger = logging.getLogger(__name__)


def sample_tokens(
    logits: Tensor,
    generators: Sequence[torch.Generator],
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Sample one token per row (and position) with one CPU generator per row.

    Parameters
    ----------
    logits : Tensor
        [N, V] or [N, n, V] guided logits.
    generators : sequence of torch.Generator
        N CPU generators (row ``i`` draws from ``generators[i]`` only, so a row's tokens do not
        depend on the other rows).
    temperature : float, default 1.0
        Softmax temperature; 0 means greedy (argmax, generators unused).
    top_k : int, optional
        Keep the k largest logits.
    top_p : float, optional
        Nucleus sampling: keep the smallest set of tokens with cumulative probability >= top_p.

    Returns
    -------
    Tensor
        Long tensor [N] or [N, n] on the logits' device.

    Examples
    --------
    >>> import torch
    >>> g = [torch.Generator().manual_seed(0)]
    >>> sample_tokens(torch.tensor([[0.0, 10.0, 0.0]]), g, temperature=0).tolist()
    [1]
    """
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [N, n, V], got shape {tuple(logits.shape)}.")
    if len(generators) != logits.shape[0]:
        raise ValueError(f"Got {len(generators)} generators for {logits.shape[0]} rows of logits; pass one per row.")
    if not isinstance(temperature, numbers.Real) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}.")
    if temperature == 0:
        return logits.argmax(-1)
    lg = logits.detach().float().cpu() / float(temperature)
    V = lg.shape[-1]
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}.")
        if top_k < V:
            kth = lg.topk(int(top_k), dim=-1).values[..., -1:]
            lg = lg.masked_fill(lg < kth, float("-inf"))
    if top_p is not None:
        if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
        if top_p < 1:
            srt, order = lg.sort(dim=-1, descending=True)
            cum = srt.softmax(-1).cumsum(-1)
            drop = (cum - srt.softmax(-1)) >= float(top_p)  # tokens after the nucleus is complete
            drop[..., 0] = False
            lg = lg.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = lg.softmax(-1)
    out = torch.empty(probs.shape[:-1], dtype=torch.long)
    for i, g in enumerate(generators):
        p = probs[i].reshape(-1, V)
        out[i] = torch.multinomial(p, 1, generator=g).reshape(probs.shape[1:-1])
    return out.to(logits.device)


class ARLoopGenerator(BaseGenerator):
    """A user's autoregressive image loop behind the :class:`Generator` protocol.

    Parameters
    ----------
    model : nn.Module
        The module whose sub-modules can be hooked (usually the transformer plus its heads); it
        is put in eval mode.
    prefill : callable
        ``prefill(prompts, cfg) -> (logits [R, V] or [R, n, V], state)`` (module docstring).
    step : callable
        ``step(tokens [R, n], step_index, state) -> (logits, state)``.
    decode : callable
        ``decode(tokens [N, T]) -> images``.
    num_steps : int
        Sampling steps (raster: number of image tokens; VAR: number of stages).
    cfg_order : str, default "cond_uncond"
        Row order of the CFG batch built by ``prefill`` (see :mod:`concepts.generators.cfg`).
    image_range : (float, float), default (-1.0, 1.0)
        Value range of the decoded images (mapped to [0, 1]).
    channels_last : bool, default False
        ``decode`` returns [N, H, W, 3] instead of [N, 3, H, W].
    cfg_schedule : callable, optional
        ``fn(step, guidance) -> scale`` used at each step instead of the constant ``guidance``.
    conditional : bool, default True
        False for unconditional loops (prompts must be None or "", no CFG).
    model_id : str, default "custom-ar"
    settings : mapping, optional
        Defaults for ``guidance`` (1.0), ``temperature`` (1.0), ``top_k`` (None), ``top_p`` (None).
    verbose : bool, default False
        Progress bar over the steps.

    Examples
    --------
    >>> import torch
    >>> V, T = 5, 4
    >>> head = torch.nn.Linear(1, V)
    >>> def prefill(prompts, cfg):
    ...     x = torch.ones(2 * len(prompts) if cfg else len(prompts), 1)
    ...     return head(x), None
    >>> def step(tokens, s, state):
    ...     return head(tokens.float()), state
    >>> gen = ARLoopGenerator(head, prefill=prefill, step=step, num_steps=T,
    ...                       decode=lambda t: t.float()[:, None, None, :].expand(-1, 3, 1, T) / V,
    ...                       image_range=(0.0, 1.0))
    >>> out = gen.generate(["a", "b"], seeds=[0, 1])
    >>> out.images.shape, out.tokens.shape
    (torch.Size([2, 1, 4, 3]), torch.Size([2, 4]))
    """

    family: ClassVar[str] = "autoregressive"
    cache_layout: ClassVar[str] = "sequence"
    _default_settings: ClassVar[dict[str, Any]] = {
        "guidance": 1.0,
        "temperature": 1.0,
        "top_k": None,
        "top_p": None,
    }

    def __init__(
        self,
        model: nn.Module,
        *,
        prefill: Callable[[list[str], bool], tuple[Tensor, Any]] | None = None,
        step: Callable[[Tensor, int, Any], tuple[Tensor, Any]] | None = None,
        decode: Callable[[Tensor], Tensor] | None = None,
        num_steps: int,
        cfg_order: str = "cond_uncond",
        image_range: tuple[float, float] = (-1.0, 1.0),
        channels_last: bool = False,
        cfg_schedule: Callable[[int, float], float] | None = None,
        conditional: bool = True,
        model_id: str = "custom-ar",
        settings: Mapping[str, Any] | None = None,
        verbose: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (used for hooks), got {type(model).__name__}.")
        for name, fn in (("prefill", prefill), ("step", step), ("decode", decode)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}.")
            if fn is None and getattr(type(self), f"_{name}") is getattr(ARLoopGenerator, f"_{name}"):
                raise TypeError(f"ARLoopGenerator needs a {name} callable (see the module docstring's recipe).")
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}.")
        if cfg_order not in CFG_ORDERS:
            raise ValueError(f"cfg_order must be one of {list(CFG_ORDERS)}, got {cfg_order!r}.")
        lo, hi = (float(v) for v in image_range)
        if not hi > lo:
            raise ValueError(f"image_range must be (low, high) with high > low, got {image_range!r}.")
        if cfg_schedule is not None and not callable(cfg_schedule):
            raise TypeError(f"cfg_schedule must be callable (step, guidance) -> scale, got {type(cfg_schedule).__name__}.")
        self.model = model.eval()  # generation never trains: dropout off
        self._prefill_fn, self._step_fn, self._decode_fn = prefill, step, decode
        self.num_steps = int(num_steps)
        self.cfg_order = cfg_order if conditional else None  # instance attribute shadows the ClassVar
        self.conditional = bool(conditional)
        self.image_range = (lo, hi)
        self.channels_last = bool(channels_last)
        self.cfg_schedule = cfg_schedule
        super().__init__(model_id=model_id, settings=settings, verbose=verbose)

    # -- overridable model-specific parts ----------------------------------------------------
    def _prefill(self, prompts: list[str], cfg: bool, settings: Mapping[str, Any]) -> tuple[Tensor, Any]:
        return self._prefill_fn(list(prompts), cfg)  # type: ignore[misc]

    def _step(self, tokens: Tensor, step: int, state: Any, settings: Mapping[str, Any]) -> tuple[Tensor, Any]:
        return self._step_fn(tokens, step, state)  # type: ignore[misc]

    def _decode(self, tokens: Tensor) -> Tensor:
        return self._decode_fn(tokens)  # type: ignore[misc]

    # -- machinery ------------------------------------------------------------------------------
    def _hook_root(self) -> nn.Module:
        return self.model

    def _uses_cfg(self, settings: Mapping[str, Any]) -> bool:
        if not self.conditional:
            return False
        return self.cfg_schedule is not None or float(settings["guidance"]) != 1.0

    def _scale(self, step: int, guidance: float) -> float:
        return float(self.cfg_schedule(step, guidance)) if self.cfg_schedule is not None else guidance

    def _check_logits(self, logits: Any, rows: int, step: int, use_cfg: bool) -> Tensor:
        if isinstance(logits, (tuple, list)) or not isinstance(logits, Tensor):
            raise TypeError(
                f"At step {step} the loop returned {type(logits).__name__} as logits; prefill/step must return "
                "(logits Tensor [R, V] or [R, n, V], state)."
            )
        if logits.dim() == 2:
            logits = logits[:, None]
        if logits.dim() != 3 or logits.shape[0] != rows:
            raise ValueError(
                f"At step {step} the logits have shape {tuple(logits.shape)}; expected [{rows}, V] or [{rows}, n, V] "
                f"({'2 x N images, CFG on, order ' + str(self.cfg_order) if use_cfg else 'one row per image, CFG off'})."
            )
        return logits

    def _to_images(self, images: Any) -> Tensor:
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(
                f"decode must return images [N, 3, H, W] (or [N, H, W, 3] with channels_last=True), got "
                f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}."
            )
        if not self.channels_last:
            images = images.permute(0, 2, 3, 1)
        if images.shape[-1] != 3:
            raise ValueError(
                f"decoded images have {images.shape[-1]} channels in the channel position; expected 3 "
                f"(check channels_last={self.channels_last})."
            )
        lo, hi = self.image_range
        return ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)

    def _generate_impl(
        self, prompts: list[str], seeds: list[int], settings: dict[str, Any], state: _RunState
    ) -> tuple[Tensor, dict[str, Any]]:
        n = len(seeds)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        use_cfg = self._uses_cfg(settings)
        layout = self.cfg_layout if use_cfg else None
        rows = 2 * n if use_cfg else n
        guidance = float(settings["guidance"])
        sample_kw = {"temperature": settings["temperature"], "top_k": settings["top_k"], "top_p": settings["top_p"]}

        state.phase, state.step, state.token_offset, state.branch = "prefill", 0, 0, None
        logits, loop_state = self._prefill(prompts, use_cfg, settings)
        chunks: list[Tensor] = []
        offset = 0
        for s in tqdm(range(self.num_steps), disable=not self.verbose, desc=f"{self.family} sampling"):
            logits = self._check_logits(logits, rows, s, use_cfg)
            guided = layout.guide(logits, self._scale(s, guidance), dim=0) if layout is not None else logits
            tok = sample_tokens(guided, gens, **sample_kw)  # [N, n]
            chunks.append(tok)
            offset += tok.shape[1]
            if s == self.num_steps - 1:
                break
            fed = layout.merge(tok, tok) if layout is not None else tok
            state.phase, state.step, state.token_offset = "token", s + 1, offset
            logits, loop_state = self._step(fed, s + 1, loop_state, settings)
        tokens = torch.cat(chunks, dim=1)
        state.phase, state.token_offset = "decode", offset
        images = self._to_images(self._decode(tokens))
        return images, {"tokens": tokens, "steps": self.num_steps, "n_tokens": int(tokens.shape[1]),
                        "guidance": guidance if self.conditional else None}
