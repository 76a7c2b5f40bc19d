"""Inference-time concept erasure in image generators (diffusion and autoregressive).

Three ways to remove a concept from a generator's activations at one layer, all built on the edits of
:mod:`concepts.generators.edits` (so every restriction -- CFG rows, denoising steps, image tokens, phases --
and the exact identity at zero strength come with them):

``method="leace"`` / ``"orth"``
    A closed-form :class:`~evaluation.erasure.leace.LeaceEraser` fitted on the layer's activations for prompts
    with the concept vs prompts without it, applied as :class:`LeaceEdit` (``x + s * delta(x)``).
``method="direction"``
    :class:`~concepts.generators.ProjectOut` of the unit difference of the class means (``x - s P x``).
``method="sae-ablate"`` / ``"sae-clamp"``
    :class:`~concepts.generators.ClampFeatures` on the SAE features that fire more on the concept's prompts
    (:func:`concept_feature_scores`, SAeUron-style scores), keeping the SAE's reconstruction error:
    ``sae-ablate`` scales the features by ``1 - s`` (``s = 1`` zeroes them, ``s > 1`` flips their sign, the
    SAeUron negative multiplier); ``sae-clamp`` moves each active feature toward
    ``-multiplier * (its mean activation on the concept's prompts)`` by a fraction ``s``.

:func:`fit_inference_erasure` records the activations with ``generator.run_with_cache``, fits the chosen
method and returns an :class:`InferenceErasure` (a frozen recipe: ``edit(strength)``, ``hooks(strength)``,
``apply(generator, strength) -> EditedGenerator``). :class:`EditedGenerator` is a generator with the hooks
always on, so metrics compare it with the original like any other generator.

Examples
--------
>>> # from concepts import zoo
>>> # gen = zoo.load("conceptworld-diffusion")
>>> # er = fit_inference_erasure(gen, "text_encoder", red_prompts, other_prompts, method="leace")
>>> # erased = er.apply(gen)                      # strength 1
>>> # erased.generate(["a large red circle on a plain background"], seeds=[0])
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from concepts.generators import ClampFeatures, Edit, ProjectOut, sae_functions
from concepts.generators.base import CallContext, GenerationResult
from concepts.generators.edits import StepSpec

from .leace import LeaceEraser, LeaceFitter

__all__ = [
    "METHODS",
    "EditedGenerator",
    "InferenceErasure",
    "LeaceEdit",
    "ablate_features",
    "clamp_features",
    "collect_activations",
    "concept_feature_scores",
    "fit_inference_erasure",
    "fit_layer_sae",
    "select_features",
]

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("leace", "orth", "direction", "sae-ablate", "sae-clamp")
"""Inference-time erasure methods of :func:`fit_inference_erasure`."""


def _check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"strength must be a real number, got {type(strength).__name__}.")
    return float(strength)


# ---------------------------------------------------------------------------------------------
# edits
# ---------------------------------------------------------------------------------------------
class LeaceEdit(Edit):
    """A :class:`~evaluation.erasure.leace.LeaceEraser` as a generator edit: ``x + strength * delta(x)``.

    Parameters
    ----------
    eraser : LeaceEraser
        Fitted on the layer's features (``d`` = size of dimension ``dim`` of the layer output).
    strength : float, default 1.0
        0 is the identity (the layer output is returned untouched), 1 erases.
    one_sided : Tensor, optional
        [rank] signs ``+-1``: erase only on the concept's side of the anchor (see :meth:`LeaceEraser.delta`).
    rows, steps, tokens, phases, dim
        See :class:`concepts.generators.Edit`.

    Examples
    --------
    >>> import torch
    >>> e = LeaceEraser(torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0, 0.0]]), None, "orth")
    >>> LeaceEdit(e)(torch.tensor([[3.0, 4.0]])).tolist()
    [[0.0, 4.0]]
    >>> LeaceEdit(e, one_sided=torch.tensor([1.0]))(torch.tensor([[3.0, 4.0], [-3.0, 4.0]])).tolist()
    [[0.0, 4.0], [-3.0, 4.0]]
    """

    def __init__(
        self,
        eraser: LeaceEraser,
        strength: float = 1.0,
        *,
        rows: str = "all",
        steps: StepSpec = None,
        tokens: StepSpec = None,
        phases: str | Sequence[str] | None = None,
        dim: int = -1,
        one_sided: Tensor | None = None,
    ) -> None:
        super().__init__(rows=rows, steps=steps, tokens=tokens, phases=phases, dim=dim)
        if not isinstance(eraser, LeaceEraser):
            raise TypeError(f"eraser must be a LeaceEraser, got {type(eraser).__name__}.")
        if one_sided is not None:
            one_sided = torch.as_tensor(one_sided, dtype=torch.float64).reshape(-1)
            if one_sided.shape[0] != eraser.rank or not bool((one_sided.abs() == 1).all()):
                raise ValueError(
                    f"one_sided must hold {eraser.rank} signs (+1 / -1), one per erased direction; got {one_sided.tolist()}."
                )
        self.eraser = eraser
        self.strength = _check_strength(strength)
        self.one_sided = one_sided

    def __call__(self, x: Tensor, ctx: CallContext | None = None) -> Tensor | None:
        if self.strength == 0.0:
            return None  # exact identity, nothing computed
        return super().__call__(x, ctx)

    def delta(self, x: Tensor, ctx: CallContext | None) -> Tensor:
        change = self.eraser.delta(x, dim=self._feature_dim(x), one_sided=self.one_sided)
        return change if self.strength == 1.0 else self.strength * change

    def __repr__(self) -> str:
        extra = self._restr_repr()
        side = ", one_sided" if self.one_sided is not None else ""
        return f"LeaceEdit(rank={self.eraser.rank}, strength={self.strength}{side}{', ' + extra if extra else ''})"


def ablate_features(
    sae: Any,
    features: int | Sequence[int],
    strength: float = 1.0,
    *,
    only_active: bool = False,
    rows: str = "all",
    steps: StepSpec = None,
    tokens: StepSpec = None,
    phases: str | Sequence[str] | None = None,
    dim: int = -1,
) -> ClampFeatures:
    """Scale SAE features by ``1 - strength`` (error term kept): 0 = identity, 1 = ablation, > 1 = negation.

    Parameters
    ----------
    sae : object
        Sparse autoencoder (``encode``/``decode`` or ``transform``/``inverse_transform``).
    features : int or sequence of int
        The concept's feature indices.
    strength : float, default 1.0
    only_active, rows, steps, tokens, phases, dim
        See :class:`concepts.generators.ClampFeatures`.

    Returns
    -------
    ClampFeatures

    Examples
    --------
    >>> import torch
    >>> class Lin:
    ...     def encode(self, x): return x
    ...     def decode(self, z): return z
    >>> ablate_features(Lin(), [0])(torch.tensor([[2.0, 3.0]])).tolist()
    [[0.0, 3.0]]
    """
    s = _check_strength(strength)
    return ClampFeatures(sae, features, value=1.0 - s, mode="scale", only_active=only_active, rows=rows,
                         steps=steps, tokens=tokens, phases=phases, dim=dim)


def clamp_features(
    sae: Any,
    features: int | Sequence[int],
    value: float | Tensor,
    strength: float = 1.0,
    *,
    only_active: bool = True,
    rows: str = "all",
    steps: StepSpec = None,
    tokens: StepSpec = None,
    phases: str | Sequence[str] | None = None,
    dim: int = -1,
) -> ClampFeatures:
    """Move SAE features toward ``value`` by a fraction ``strength`` (``z + s (value - z)``), error kept.

    With ``only_active`` (default) only where a feature fires (SAeUron clamps active features to a negative
    multiple of their mean concept activation).

    Parameters
    ----------
    sae : object
    features : int or sequence of int
    value : float or Tensor
        A number or one value per feature [len(features)].
    strength : float, default 1.0
        0 is the identity, 1 sets the features to ``value``.
    only_active, rows, steps, tokens, phases, dim
        See :class:`concepts.generators.ClampFeatures`.

    Returns
    -------
    ClampFeatures

    Examples
    --------
    >>> import torch
    >>> class Lin:
    ...     def encode(self, x): return x
    ...     def decode(self, z): return z
    >>> clamp_features(Lin(), [0, 1], value=-1.0, strength=0.5)(torch.tensor([[2.0, 0.0]])).tolist()
    [[0.5, 0.0]]
    """
    s = _check_strength(strength)
    if isinstance(value, (Tensor, np.ndarray)):
        v = torch.as_tensor(value, dtype=torch.float32)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = torch.tensor(float(value))
    else:
        raise TypeError(f"value must be a number or a tensor with one value per feature, got {type(value).__name__}.")

    def toward(sel: Tensor) -> Tensor:
        target = v.to(device=sel.device, dtype=sel.dtype)
        return sel + s * (target - sel)

    return ClampFeatures(sae, features, value=toward, mode="set", only_active=only_active, rows=rows, steps=steps,
                         tokens=tokens, phases=phases, dim=dim)


# ---------------------------------------------------------------------------------------------
# an edited generator
# ---------------------------------------------------------------------------------------------
def _as_list(fn: Any) -> list[Any]:
    return list(fn) if isinstance(fn, (list, tuple)) else [fn]


class EditedGenerator:
    """A generator whose layers are always edited: ``generate`` runs the base's ``run_with_hooks``.

    It follows the :class:`concepts.generators.Generator` protocol, so an inference-time erasure and a
    fine-tuned model are compared with the original by the same metrics.

    Parameters
    ----------
    generator : Generator
        The original generator (not modified).
    hooks : mapping of str to callable or list of callables
        ``{layer: edit}`` applied in every call (before any hooks passed per call).
    name : str, optional
        Appended to the model id (``"<model_id>+<name>"``).

    Examples
    --------
    >>> # erased = EditedGenerator(gen, {"text_encoder": LeaceEdit(eraser)}, name="no-red")
    >>> # erased.generate(["a red circle"], seeds=[0]).images
    """

    def __init__(self, generator: Any, hooks: Mapping[str, Any], *, name: str | None = None) -> None:
        if not callable(getattr(generator, "run_with_hooks", None)):
            raise TypeError(
                f"generator must follow the concepts.generators.Generator protocol (run_with_hooks), got "
                f"{type(generator).__name__}."
            )
        if not isinstance(hooks, Mapping):
            raise TypeError(f"hooks must be a mapping {{layer: edit}}, got {type(hooks).__name__}.")
        self.base = generator
        self.hooks = {k: _as_list(v) for k, v in hooks.items()}
        self.name = name or "edited"
        self.family = generator.family
        self.model_id = f"{generator.model_id}+{self.name}"

    @property
    def cfg_layout(self) -> Any:
        """The base generator's CFG layout."""
        return self.base.cfg_layout

    def split_cfg(self, x: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
        """The base generator's ``split_cfg``."""
        return self.base.split_cfg(x, dim=dim)

    def module_names(self, contains: str | None = None) -> list[str]:
        """The base generator's hookable layers."""
        return self.base.module_names(contains)

    def _merged(self, hooks: Mapping[str, Any] | None) -> dict[str, list[Any]]:
        merged = {k: list(v) for k, v in self.hooks.items()}
        for k, v in (hooks or {}).items():
            merged.setdefault(k, []).extend(_as_list(v))
        return merged

    def generate(self, prompts: Any, seeds: Any, **settings: Any) -> GenerationResult:
        """Generate with the edits on (see :meth:`concepts.generators.BaseGenerator.generate`)."""
        return self.base.run_with_hooks(prompts, seeds, self._merged(None), **settings)

    def run_with_hooks(self, prompts: Any, seeds: Any, hooks: Mapping[str, Any], **settings: Any) -> GenerationResult:
        """Generate with the edits and more hooks (run after the edits on the same layer)."""
        if not isinstance(hooks, Mapping):
            raise TypeError(f"hooks must be a mapping {{layer: fn}}, got {type(hooks).__name__}.")
        return self.base.run_with_hooks(prompts, seeds, self._merged(hooks), **settings)

    def run_with_cache(self, prompts: Any, seeds: Any, layers: Any, *, hooks: Mapping[str, Any] | None = None,
                       **settings: Any) -> Any:
        """Record layers during an edited generation (the cache holds the edited outputs)."""
        return self.base.run_with_cache(prompts, seeds, layers, hooks=self._merged(hooks), **settings)

    def __repr__(self) -> str:
        return f"EditedGenerator({self.base!r}, layers={list(self.hooks)}, name={self.name!r})"


# ---------------------------------------------------------------------------------------------
# activations and feature scores
# ---------------------------------------------------------------------------------------------
class _Restriction(Edit):
    """Carries call restrictions; only :meth:`active` is used."""

    def delta(self, x: Tensor, ctx: CallContext | None) -> Tensor:  # pragma: no cover - never applied
        return torch.zeros_like(x)


def _seed_list(seeds: Any, n: int, what: str) -> list[int]:
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        return list(range(int(seeds), int(seeds) + n))
    out = [int(s) for s in seeds]
    if len(out) != n:
        raise ValueError(f"got {len(out)} seeds for {n} {what} prompts; pass one seed per prompt or one int.")
    return out


def collect_activations(
    generator: Any,
    layer: str,
    prompts: Sequence[str],
    seeds: int | Sequence[int] = 0,
    *,
    dim: int = -1,
    rows: str = "cond",
    steps: StepSpec = None,
    tokens: StepSpec = None,
    phases: str | Sequence[str] | None = None,
    hooks: Mapping[str, Any] | None = None,
    batch_size: int = 16,
    **settings: Any,
) -> Tensor:
    """Record a layer during generation and flatten it to feature rows.

    Every call of ``layer`` allowed by the restrictions contributes its ``rows`` (CFG branch) with the
    feature dimension ``dim`` moved last and every other position (tokens, pixels) as a row.

    Parameters
    ----------
    generator : Generator
    layer : str
        A name from ``generator.module_names()``.
    prompts : sequence of str
    seeds : int or sequence of int, default 0
    dim : int, default -1
        Feature dimension of the layer output (1 for conv maps).
    rows : {"cond", "uncond", "all"}, default "cond"
        CFG rows to keep.
    steps, tokens, phases
        Keep only these calls (as in :class:`concepts.generators.Edit`).
    hooks : mapping, optional
        Edits applied during the recording (e.g. to record an erased generator).
    batch_size : int, default 16
        Prompts per generation call.
    **settings
        Generation settings (``steps=...`` is the number of denoising steps here).

    Returns
    -------
    Tensor
        [m, d] float32 on the CPU.

    Raises
    ------
    ValueError
        If no call of the layer passes the restrictions.

    Examples
    --------
    >>> # X = collect_activations(gen, "unet.mid_block", ["a red circle"] * 4, seeds=0, dim=1, steps=range(5))
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    seed_list = _seed_list(seeds, len(prompts), "")
    restr = _Restriction(rows=rows, steps=steps, tokens=tokens, phases=phases, dim=dim)
    out: list[Tensor] = []
    for i in range(0, len(prompts), batch_size):
        cache = generator.run_with_cache(prompts[i:i + batch_size], seed_list[i:i + batch_size], [layer],
                                         hooks=hooks, **settings)
        for t, ctx in zip(cache.calls[layer], cache.contexts[layer]):
            if not restr.active(ctx):
                continue
            idx = ctx.row_index(rows)
            if idx is not None:
                if idx.numel() == 0:
                    continue
                t = t.index_select(0, idx.to(t.device))
            d = restr._feature_dim(t)
            out.append(t.movedim(d, -1).reshape(-1, t.shape[d]).float().cpu())
    if not out:
        raise ValueError(
            f"No call of layer {layer!r} matched rows={rows!r}, steps={steps!r}, tokens={tokens!r}, phases={phases!r}; "
            "check generator.run_with_cache(...).call_map for the calls this layer makes."
        )
    return torch.cat(out)


def fit_layer_sae(
    generator: Any,
    layer: str,
    prompts: Sequence[str],
    seeds: int | Sequence[int] = 0,
    *,
    n_concepts: int = 256,
    top_k: int = 8,
    n_epochs: int = 10,
    sae_batch_size: int = 256,
    random_state: int = 0,
    dim: int = -1,
    rows: str = "cond",
    steps: StepSpec = None,
    tokens: StepSpec = None,
    phases: str | Sequence[str] | None = None,
    batch_size: int = 16,
    verbose: bool = False,
    **settings: Any,
) -> Any:
    """Train a :class:`sae.TopKSAE` on a generator layer's activations (for the ``sae-*`` erasure methods).

    Parameters
    ----------
    generator, layer, prompts, seeds, dim, rows, steps, tokens, phases, batch_size, **settings
        As in :func:`collect_activations`.
    n_concepts, top_k, n_epochs, sae_batch_size, random_state, verbose
        Passed to ``TopKSAE``.

    Returns
    -------
    sae.TopKSAE
        Fitted; ``metadata`` records nothing about the generator (pass the layer yourself).

    Examples
    --------
    >>> # sae = fit_layer_sae(gen, "model.language_model.layers.1", captions, phases="token")
    >>> # er = fit_inference_erasure(gen, "model.language_model.layers.1", red, others, method="sae-ablate", sae=sae,
    >>> #                            phases="token")
    """
    from sae import TopKSAE

    X = collect_activations(generator, layer, prompts, seeds, dim=dim, rows=rows, steps=steps, tokens=tokens,
                            phases=phases, batch_size=batch_size, **settings)
    return TopKSAE(n_concepts=n_concepts, top_k=top_k, n_epochs=n_epochs, batch_size=sae_batch_size,
                   random_state=random_state, verbose=verbose).fit(X)


def _codes(sae: Any, X: Tensor, batch_size: int = 4096) -> Tensor:
    """SAE codes of feature rows, encoded where the SAE's parameters live."""
    encode, _ = sae_functions(sae)
    dev = None
    params = getattr(sae, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        dev = None if first is None else first.device
    parts = []
    with torch.no_grad():
        for i in range(0, len(X), batch_size):
            xb = X[i:i + batch_size]
            parts.append(encode(xb if dev is None else xb.to(dev)).detach().float().cpu())
    return torch.cat(parts)


def concept_feature_scores(codes_target: Any, codes_other: Any) -> pd.DataFrame:
    """Score SAE features as markers of a concept (SAeUron-style).

    ``share`` = a feature's mean activation divided by the sum over features of their mean activations,
    on the concept's rows (``share_target``) and on the other rows (``share_other``);
    ``score = share_target - share_other``. Also reported: mean activations and firing frequencies.

    Parameters
    ----------
    codes_target : Tensor or array
        [n_t, k] SAE codes of activations recorded with the concept.
    codes_other : Tensor or array
        [n_o, k] codes without it.

    Returns
    -------
    pandas.DataFrame
        One row per feature, sorted by ``score`` (descending): ``feature, score, share_target, share_other,
        mean_target, mean_other, freq_target, freq_other``.

    Examples
    --------
    >>> import torch
    >>> t = torch.tensor([[2.0, 0.0, 1.0]]); o = torch.tensor([[0.0, 1.0, 1.0]])
    >>> concept_feature_scores(t, o).feature.tolist()
    [0, 2, 1]
    """
    zt = torch.as_tensor(np.asarray(codes_target) if not isinstance(codes_target, Tensor) else codes_target).double()
    zo = torch.as_tensor(np.asarray(codes_other) if not isinstance(codes_other, Tensor) else codes_other).double()
    if zt.dim() != 2 or zo.dim() != 2 or zt.shape[1] != zo.shape[1]:
        raise ValueError(
            f"codes must be [n, k] with the same k; got {tuple(zt.shape)} and {tuple(zo.shape)}."
        )
    if len(zt) == 0 or len(zo) == 0:
        raise ValueError("codes_target and codes_other need at least one row each.")
    mt, mo = zt.mean(0), zo.mean(0)
    st = mt / mt.abs().sum().clamp(min=1e-12)
    so = mo / mo.abs().sum().clamp(min=1e-12)
    frame = pd.DataFrame({
        "feature": np.arange(zt.shape[1]),
        "score": (st - so).numpy(),
        "share_target": st.numpy(),
        "share_other": so.numpy(),
        "mean_target": mt.numpy(),
        "mean_other": mo.numpy(),
        "freq_target": (zt > 0).double().mean(0).numpy(),
        "freq_other": (zo > 0).double().mean(0).numpy(),
    })
    return frame.sort_values(["score", "feature"], ascending=[False, True], kind="stable").reset_index(drop=True)


def select_features(scores: pd.DataFrame, n_features: int | None = 8, *, min_score: float = 0.0) -> list[int]:
    """The top features of :func:`concept_feature_scores` with ``score > min_score``.

    Parameters
    ----------
    scores : pandas.DataFrame
        Output of :func:`concept_feature_scores`.
    n_features : int or None, default 8
        At most this many (None: all above ``min_score``).
    min_score : float, default 0.0

    Returns
    -------
    list of int

    Raises
    ------
    ValueError
        If no feature scores above ``min_score``.

    Examples
    --------
    >>> import pandas as pd
    >>> select_features(pd.DataFrame({"feature": [3, 1, 2], "score": [0.5, 0.1, -0.2]}), 5)
    [3, 1]
    """
    if not isinstance(scores, pd.DataFrame) or not {"feature", "score"} <= set(scores.columns):
        raise TypeError("scores must be the DataFrame returned by concept_feature_scores (columns feature, score).")
    if n_features is not None and (isinstance(n_features, bool) or not isinstance(n_features, numbers.Integral)
                                   or n_features < 1):
        raise ValueError(f"n_features must be a positive int or None, got {n_features!r}.")
    top = scores[scores["score"] > min_score].sort_values("score", ascending=False, kind="stable")
    if top.empty:
        raise ValueError(
            f"No SAE feature scores above min_score={min_score}: the concept's activations do not favour any feature. "
            "Use more prompts, another layer, or an SAE trained on this layer."
        )
    if n_features is not None:
        top = top.head(int(n_features))
    return [int(f) for f in top["feature"]]


# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferenceErasure:
    """A fitted inference-time erasure: which layer and which edit for a given strength.

    Attributes
    ----------
    layer : str
    method : str
        One of :data:`METHODS` (or ``"custom"``).
    build : callable
        ``build(strength) -> Edit``.
    info : dict
        What was fitted: the eraser, the direction, the SAE features and their scores, the restrictions.

    Examples
    --------
    >>> # er = InferenceErasure.from_eraser("text_encoder", eraser)
    >>> # er.hooks(0.5)  ->  {"text_encoder": LeaceEdit(rank=1, strength=0.5)}
    >>> # erased = er.apply(gen)
    """

    layer: str
    method: str
    build: Callable[[float], Edit]
    info: dict = field(default_factory=dict)

    def edit(self, strength: float = 1.0) -> Edit:
        """The edit at ``strength`` (0 = identity)."""
        return self.build(_check_strength(strength))

    def hooks(self, strength: float = 1.0) -> dict[str, Edit]:
        """``{layer: edit}`` for :meth:`Generator.run_with_hooks`."""
        return {self.layer: self.edit(strength)}

    def apply(self, generator: Any, strength: float = 1.0) -> EditedGenerator:
        """The generator with the erasure always on."""
        return EditedGenerator(generator, self.hooks(strength), name=f"{self.method}@{_check_strength(strength):g}")

    # -- constructors from fitted pieces ---------------------------------------------------------
    @classmethod
    def from_eraser(cls, layer: str, eraser: LeaceEraser, *, one_sided: Tensor | None = None,
                    **restrictions: Any) -> InferenceErasure:
        """Erase with a :class:`LeaceEraser` (``restrictions``: rows, steps, tokens, phases, dim; ``one_sided``: see
        :class:`LeaceEdit`)."""
        if not isinstance(eraser, LeaceEraser):
            raise TypeError(f"eraser must be a LeaceEraser, got {type(eraser).__name__}.")
        LeaceEdit(eraser, one_sided=one_sided, **restrictions)  # validate now
        return cls(layer, eraser.method, lambda s: LeaceEdit(eraser, s, one_sided=one_sided, **restrictions),
                   {"eraser": eraser, "one_sided": one_sided, "restrictions": dict(restrictions)})

    @classmethod
    def from_direction(cls, layer: str, directions: Tensor, **restrictions: Any) -> InferenceErasure:
        """Project out a direction [d] or subspace [k, d] (:class:`~concepts.generators.ProjectOut`)."""
        ProjectOut(directions, **restrictions)  # validate now
        return cls(layer, "direction", lambda s: ProjectOut(directions, s, **restrictions),
                   {"directions": directions, "restrictions": dict(restrictions)})

    @classmethod
    def from_sae(
        cls, layer: str, sae: Any, features: Sequence[int], *, mode: str = "ablate", value: float | Tensor = 0.0,
        **restrictions: Any,
    ) -> InferenceErasure:
        """Ablate (``mode="ablate"``) or clamp toward ``value`` (``mode="clamp"``) SAE features."""
        if mode not in ("ablate", "clamp"):
            raise ValueError(f"mode must be 'ablate' or 'clamp', got {mode!r}.")
        if mode == "ablate":
            ablate_features(sae, features, **restrictions)  # validate now
            build = lambda s: ablate_features(sae, features, s, **restrictions)  # noqa: E731
        else:
            clamp_features(sae, features, value, **restrictions)
            build = lambda s: clamp_features(sae, features, value, s, **restrictions)  # noqa: E731
        return cls(layer, f"sae-{mode}", build,
                   {"sae": sae, "features": list(features), "value": value, "restrictions": dict(restrictions)})

    def __repr__(self) -> str:
        keys = [k for k in self.info if k != "restrictions"]
        return f"InferenceErasure(layer={self.layer!r}, method={self.method!r}, fitted={keys})"


def fit_inference_erasure(
    generator: Any,
    layer: str,
    target_prompts: Sequence[str],
    other_prompts: Sequence[str],
    *,
    method: str = "leace",
    seeds: int | tuple[Any, Any] = 0,
    sae: Any = None,
    n_features: int | None = 8,
    min_score: float = 0.0,
    multiplier: float = 1.0,
    dim: int = -1,
    rows: str = "all",
    fit_rows: str = "cond",
    steps: StepSpec = None,
    tokens: StepSpec = None,
    phases: str | Sequence[str] | None = None,
    fitter_params: Mapping[str, Any] | None = None,
    anchor: str = "mean",
    one_sided: bool = False,
    batch_size: int = 16,
    **settings: Any,
) -> InferenceErasure:
    """Fit an inference-time erasure of a concept at one layer of a generator.

    Parameters
    ----------
    generator : Generator
    layer : str
        Where to erase (a name from ``generator.module_names()``).
    target_prompts : sequence of str
        Prompts that ask for the concept.
    other_prompts : sequence of str
        Prompts that do not (ideally the same prompts with the concept swapped for its alternatives).
    method : str, default "leace"
        One of :data:`METHODS` (module docstring).
    seeds : int or (seeds_target, seeds_other), default 0
        An int ``s`` gives the target prompts seeds ``s, s+1, ...`` and the other prompts the following ones.
    sae : object, optional
        Sparse autoencoder trained on this layer's features (``sae-*`` methods).
    n_features, min_score
        Feature selection (:func:`select_features`), ``sae-*`` methods.
    multiplier : float, default 1.0
        ``sae-clamp``: features are clamped toward ``-multiplier * mean target activation``.
    dim : int, default -1
        Feature dimension of the layer output.
    rows : {"all", "cond", "uncond"}, default "all"
        CFG rows the edit applies to.
    fit_rows : {"cond", "all"}, default "cond"
        CFG rows the activations are recorded from (the unconditional rows do not see the prompt).
    steps, tokens, phases
        Calls recorded for the fit *and* edited at generation (:class:`concepts.generators.Edit`).
    fitter_params : mapping, optional
        Extra :class:`~evaluation.erasure.leace.LeaceFitter` parameters (``leace``/``orth``).
    anchor : {"mean", "other"}, default "mean"
        ``leace``/``orth``: the point the erased component is set to -- the mean of all recorded rows (LEACE's
        choice, keeps the overall mean) or the mean of the rows *without* the concept (prompts without the
        concept are then left unchanged on average; a larger ``strength`` pushes the concept's rows past the
        other class instead of moving every row). The linear guarantee (equal class means) holds for both.
    batch_size : int, default 16
    **settings
        Generation settings used while recording.

    Returns
    -------
    InferenceErasure

    Raises
    ------
    ValueError
        For an unknown method, missing SAE, or empty prompt lists.

    Examples
    --------
    >>> # er = fit_inference_erasure(gen, "model.language_model.layers.1", red, others, method="sae-ablate",
    >>> #                            sae=sae, phases="token")
    >>> # erased = er.apply(gen, strength=1.0)
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}.")
    target_prompts, other_prompts = list(target_prompts), list(other_prompts)
    if not target_prompts or not other_prompts:
        raise ValueError("target_prompts and other_prompts must both be non-empty (prompts with and without the concept).")
    if method.startswith("sae") and sae is None:
        raise ValueError(f"method={method!r} needs sae=... (a sparse autoencoder trained on layer {layer!r}).")
    if fit_rows not in ("cond", "all"):
        raise ValueError(f"fit_rows must be 'cond' or 'all', got {fit_rows!r}.")
    if anchor not in ("mean", "other"):
        raise ValueError(f"anchor must be 'mean' or 'other', got {anchor!r}.")
    if isinstance(seeds, tuple):
        if len(seeds) != 2:
            raise ValueError("seeds must be an int or a pair (seeds_target, seeds_other).")
        st = _seed_list(seeds[0], len(target_prompts), "target")
        so = _seed_list(seeds[1], len(other_prompts), "other")
    elif isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        st = list(range(int(seeds), int(seeds) + len(target_prompts)))
        so = list(range(st[-1] + 1, st[-1] + 1 + len(other_prompts)))
    else:
        raise TypeError(f"seeds must be an int or a pair (seeds_target, seeds_other), got {type(seeds).__name__}.")
    restr = {"rows": rows, "steps": steps, "tokens": tokens, "phases": phases, "dim": dim}
    _Restriction(**restr)  # validate the restrictions before generating anything
    rec = {"dim": dim, "rows": fit_rows, "steps": steps, "tokens": tokens, "phases": phases, "batch_size": batch_size}
    Xt = collect_activations(generator, layer, target_prompts, st, **rec, **settings)
    Xo = collect_activations(generator, layer, other_prompts, so, **rec, **settings)
    info: dict[str, Any] = {"n_target_rows": int(len(Xt)), "n_other_rows": int(len(Xo)), "restrictions": restr}
    logger.info("fit_inference_erasure: %d target and %d other feature rows of width %d at %s",
                len(Xt), len(Xo), Xt.shape[1], layer)

    if method in ("leace", "orth"):
        fitter = LeaceFitter(method=method, **dict(fitter_params or {}))
        fitter.partial_fit(Xt, np.ones(len(Xt), dtype=np.int64), classes=[0, 1])
        fitter.partial_fit(Xo, np.zeros(len(Xo), dtype=np.int64))
        eraser = fitter.eraser_
        if anchor == "other":
            eraser = LeaceEraser(eraser.proj_left, eraser.proj_right, Xo.to(eraser.proj_left.dtype).mean(0),
                                 eraser.method, {**eraser.metadata, "anchor": "other"})
        sign = None
        if one_sided:
            e = eraser
            centred = Xt.to(e.proj_left.dtype).mean(0) - (e.bias if e.bias is not None else 0.0)
            sign = torch.sign(centred @ e.proj_right.T)
            sign[sign == 0] = 1.0
        er = InferenceErasure.from_eraser(layer, eraser, one_sided=sign, **restr)
        er.info.update(info, anchor=anchor)
        return er
    if method == "direction":
        diff = Xt.double().mean(0) - Xo.double().mean(0)
        if float(diff.norm()) == 0.0:
            raise ValueError("The class means coincide at this layer: there is no concept direction to project out.")
        direction = (diff / diff.norm()).float()
        er = InferenceErasure.from_direction(layer, direction, **restr)
        er.info.update(info, direction=direction)
        return er
    zt, zo = _codes(sae, Xt), _codes(sae, Xo)
    scores = concept_feature_scores(zt, zo)
    feats = select_features(scores, n_features, min_score=min_score)
    if method == "sae-ablate":
        er = InferenceErasure.from_sae(layer, sae, feats, mode="ablate", **restr)
    else:
        mean_t = torch.tensor(scores.set_index("feature").loc[feats, "mean_target"].to_numpy(), dtype=torch.float32)
        er = InferenceErasure.from_sae(layer, sae, feats, mode="clamp", value=-float(multiplier) * mean_t, **restr)
    er.info.update(info, scores=scores)
    return er
