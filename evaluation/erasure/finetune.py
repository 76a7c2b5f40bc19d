"""Fine-tuning erasure: ESD for diffusion generators and EAR for autoregressive (Janus-style) generators.

Both methods fine-tune a selectable subset of the generator's network so that, for prompts with the concept,
the network behaves as if guided *away* from the concept toward an anchor (ESD-style target, frozen teacher):

``target = f(anchor) - eta * (f(concept) - f(anchor))``

ESD (Gandikota et al., ICCV 2023) -- :class:`ESD`
    ``f`` is the denoiser's noise prediction ``eps(x_t, c, t)`` of the frozen model; ``x_t`` comes from a partial
    DDIM denoising of the concept prompt to a random step (guidance ``guidance``; by default with the weights
    being trained, "on policy"); the anchor defaults to the empty prompt (ESD's unconditional ``eps(x_t, {}, t)``)
    and may be a prompt without the concept. Loss ``MSE(eps_theta(x_t, c, t), target)``; one Adam step per
    iteration. Parameter sets of the UNet: ``"xattn"`` (ESD-x: cross-attention ``attn2``), ``"xattn-kv"``
    (ESD-x-strict: ``attn2.to_k/to_v``), ``"noxattn"`` (ESD-u: everything but ``attn2``), ``"attn"``,
    ``"mlp"``, ``"all"``.
EAR (Fan et al. 2025) -- :class:`EAR`
    ``f`` is the language model's ``last_hidden_state`` at the image-token positions. Per prompt pair
    (concept prompt, anchor prompt) the image tokens are sampled once (from the concept prompt, on policy), then
    both prompts' sequences are teacher-forced through the frozen model (``P`` = concept, ``N`` = anchor) and
    the trained model (``H``, concept prompt); ``loss = MSE(H, N - eta (P - N))``. **Windowed gradient
    accumulation**: the token positions are split into windows of ``window`` tokens; each window's loss is
    back-propagated and followed by its own optimizer step (later windows see the updated model, as in EAR's
    token-by-token loop). **Thresholded loss masking**: a window whose loss is at or below ``loss_threshold``
    triggers no update (EAR: 0.05). Parameter sets of the LLaMA: ``"attn"`` (``self_attn``; EAR's choice),
    ``"mlp"``, ``"all"``, restricted to ``layers`` (e.g. ``range(0, 5)``).

Documented choices: EAR's released loop feeds each next token without a KV cache; here the sampled tokens are
teacher-forced over the full causal sequence (what an incremental decoder with a cache computes). Both CFG rows
are trained: the unconditional rows of the concept and anchor prompts coincide, so their target is the frozen
model itself (a preservation term). Windows are averaged (mean squared error per window), so the TLM threshold
does not depend on the window length.

The result is :class:`FinetunedWeights` -- the new values of the trained parameters only -- with
``apply(generator, strength)`` (interpolates ``theta_0 + s (theta_1 - theta_0)``; ``s = 0`` leaves the
generator untouched), ``save``/``load`` (safetensors + JSON + CSV history) and periodic checkpoints that a killed
run resumes from.

Examples
--------
>>> # from concepts import zoo
>>> # gen = zoo.load("conceptworld-diffusion")
>>> # esd = ESD(["a large red circle on stripes", ...], params="xattn", iterations=100).fit(gen)
>>> # erased = esd.weights_.apply(gen)
>>> # ar = zoo.load("conceptworld-ar")
>>> # ear = EAR([("a large red circle on dots", "a large circle on dots"), ...], layers=range(0, 2)).fit(ar)
"""
from __future__ import annotations

import json
import logging
import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import Tensor, nn
from tqdm.auto import tqdm

from .steering import EditedGenerator

__all__ = [
    "EAR",
    "ESD",
    "FinetunedWeights",
    "PARAMETER_SETS",
    "WeightEditedGenerator",
    "network_of",
    "select_parameters",
]

logger = logging.getLogger(__name__)

_FORMAT = "conceptkit.erasure.finetuned"

PARAMETER_SETS: dict[str, dict[str, str]] = {
    "denoiser": {
        "xattn": r"\.attn2\.",
        "xattn-kv": r"\.attn2\.to_[kv]\.",
        "noxattn": r"^(?!.*\.attn2\.)",
        "attn": r"\.attn[12]\.",
        "mlp": r"\.ff\.",
        "all": r"",
    },
    "language_model": {
        "attn": r"\.self_attn\.",
        "mlp": r"\.mlp\.",
        "all": r"",
    },
}
"""Named trainable parameter sets (regular expressions over parameter names) per network kind."""


# ---------------------------------------------------------------------------------------------
# networks and parameter selection
# ---------------------------------------------------------------------------------------------
def network_of(generator: Any) -> tuple[str, nn.Module]:
    """The network a fine-tuning erasure trains: ``("denoiser", unet)`` or ``("language_model", llama)``.

    Parameters
    ----------
    generator : Generator
        A diffusers adapter (``.denoiser``) or a Janus-style adapter (``.language_model``).

    Returns
    -------
    (str, nn.Module)

    Raises
    ------
    TypeError
        If the generator exposes neither.
    """
    base = getattr(generator, "base", None)
    if base is not None and not isinstance(generator, nn.Module):  # an EditedGenerator
        generator = base
    den = getattr(generator, "denoiser", None)
    if isinstance(den, nn.Module):
        return "denoiser", den
    lm = getattr(generator, "language_model", None)
    if isinstance(lm, nn.Module):
        return "language_model", lm
    raise TypeError(
        f"{type(generator).__name__} exposes neither a diffusion denoiser (.denoiser) nor a language model "
        "(.language_model); fine-tuning erasure supports the diffusers and Janus adapters of concepts.generators."
    )


def _layer_filter(layers: Any) -> Callable[[str], bool] | None:
    if layers is None:
        return None
    if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):
        layers = [int(layers)]
    try:
        wanted = {int(i) for i in layers}
    except (TypeError, ValueError):
        raise TypeError(f"layers must be an int, a range or a sequence of ints, got {layers!r}.") from None
    pat = re.compile(r"(?:^|\.)layers\.(\d+)\.")

    def keep(name: str) -> bool:
        m = pat.search(name)
        return m is not None and int(m.group(1)) in wanted

    return keep


def select_parameters(
    module: nn.Module,
    params: str | Sequence[str] | Callable[[str], bool] = "xattn",
    *,
    kind: str = "denoiser",
    layers: int | Sequence[int] | None = None,
) -> list[str]:
    """Names of the parameters a fine-tuning erasure trains.

    Parameters
    ----------
    module : nn.Module
        The network (UNet / transformer denoiser, or the LLaMA language model).
    params : str, sequence of str or callable, default "xattn"
        A named set of :data:`PARAMETER_SETS` for ``kind``, a list of regular expressions (a name matching any
        is kept), or a predicate ``name -> bool``.
    kind : {"denoiser", "language_model"}
    layers : int, range or sequence of int, optional
        Keep only parameters under ``layers.<i>.`` for these ``i`` (language models; EAR trains the first 5).

    Returns
    -------
    list of str

    Raises
    ------
    ValueError
        For an unknown set name, or a selection that matches no parameter.

    Examples
    --------
    >>> import torch.nn as nn
    >>> m = nn.ModuleDict({"layers": nn.ModuleList([nn.ModuleDict({"self_attn": nn.Linear(2, 2)})] * 1)})
    >>> select_parameters(m, "attn", kind="language_model", layers=[0])
    ['layers.0.self_attn.weight', 'layers.0.self_attn.bias']
    """
    if kind not in PARAMETER_SETS:
        raise ValueError(f"kind must be one of {list(PARAMETER_SETS)}, got {kind!r}.")
    names = [n for n, _ in module.named_parameters()]
    if callable(params) and not isinstance(params, str):
        keep = [n for n in names if params(n)]
        how = "the predicate"
    else:
        if isinstance(params, str):
            if params not in PARAMETER_SETS[kind]:
                raise ValueError(
                    f"unknown parameter set {params!r} for a {kind}; named sets are {list(PARAMETER_SETS[kind])} "
                    "(or pass a list of regular expressions, or a predicate)."
                )
            patterns = [PARAMETER_SETS[kind][params]]
        else:
            patterns = list(params)
            if not patterns or not all(isinstance(p, str) for p in patterns):
                raise TypeError("params must be a set name, a non-empty list of regular expressions or a predicate.")
        regs = [re.compile(p) for p in patterns]
        keep = [n for n in names if any(r.search(n) for r in regs)]
        how = f"{params!r}"
    layer_ok = _layer_filter(layers)
    if layer_ok is not None:
        keep = [n for n in keep if layer_ok(n)]
    if not keep:
        raise ValueError(
            f"The parameter selection {how} (layers={layers!r}) matches no parameter of this {type(module).__name__}; "
            f"example names: {names[:4]}."
        )
    return keep


# ---------------------------------------------------------------------------------------------
# the result: fine-tuned values of a parameter subset
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetunedWeights:
    """New values of a subset of a generator network's parameters (a fine-tuning erasure's result).

    Attributes
    ----------
    kind : str
        ``"denoiser"`` or ``"language_model"`` (:func:`network_of`).
    tensors : dict of str to Tensor
        ``{parameter name: fine-tuned value}`` (CPU).
    config : dict
        Method, hyper-parameters, prompts, iterations (JSON-safe).
    history : pandas.DataFrame
        Training log (one row per update or skipped window).

    Examples
    --------
    >>> # erased = weights.apply(gen, strength=1.0); weights.save("esd-red"); FinetunedWeights.load("esd-red")
    """

    kind: str
    tensors: dict
    config: dict = field(default_factory=dict)
    history: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    def _network(self, generator: Any) -> nn.Module:
        kind, net = network_of(generator)
        if kind != self.kind:
            raise ValueError(
                f"These weights fine-tune a {self.kind}, but {type(generator).__name__} has a {kind}; apply them to "
                "the kind of generator they were trained on."
            )
        params = dict(net.named_parameters())
        missing = [n for n in self.tensors if n not in params]
        if missing:
            raise ValueError(f"The generator's {kind} has no parameter(s) {missing[:3]}; these weights belong to "
                             "another architecture.")
        for n, t in self.tensors.items():
            if tuple(params[n].shape) != tuple(t.shape):
                raise ValueError(f"Parameter {n!r} has shape {tuple(params[n].shape)} in the generator but "
                                 f"{tuple(t.shape)} in these weights.")
        return net

    @contextmanager
    def applied(self, generator: Any, strength: float = 1.0) -> Iterator[Any]:
        """Temporarily write ``theta_0 + strength * (theta_1 - theta_0)`` into the generator (restored on exit).

        ``strength=0`` changes nothing.
        """
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
            raise TypeError(f"strength must be a real number, got {type(strength).__name__}.")
        s = float(strength)
        if s == 0.0:
            yield generator
            return
        net = self._network(generator)
        params = dict(net.named_parameters())
        saved = {}
        try:
            with torch.no_grad():
                for n, new in self.tensors.items():
                    p = params[n]
                    saved[n] = p.detach().clone()
                    new = new.to(device=p.device, dtype=p.dtype)
                    p.copy_(new if s == 1.0 else saved[n] + s * (new - saved[n]))
            yield generator
        finally:
            with torch.no_grad():
                for n, old in saved.items():
                    params[n].copy_(old)

    def apply(self, generator: Any, strength: float = 1.0) -> WeightEditedGenerator:
        """The generator with these weights swapped in for every call (the original object is not modified)."""
        self._network(generator)
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
            raise TypeError(f"strength must be a real number, got {type(strength).__name__}.")
        return WeightEditedGenerator(generator, self, float(strength))

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``weights.safetensors``, ``config.json`` and ``history.csv`` into the folder ``path``."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}, str(folder / "weights.safetensors"),
                  metadata={"format": _FORMAT, "kind": self.kind})
        (folder / "config.json").write_text(json.dumps({"format": _FORMAT, "kind": self.kind, **self.config}, indent=2,
                                                       default=str))
        self.history.to_csv(folder / "history.csv", index=False)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> FinetunedWeights:
        """Read a folder written by :meth:`save` (no unpickling).

        Raises
        ------
        FileNotFoundError
            If the folder or its weights are missing.
        ValueError
            If ``config.json`` is not a conceptkit fine-tuning result (names the file and the field).
        """
        from safetensors.torch import load_file

        folder = Path(path)
        weights, cfg_path = folder / "weights.safetensors", folder / "config.json"
        if not weights.is_file() or not cfg_path.is_file():
            raise FileNotFoundError(f"{folder}: expected weights.safetensors and config.json (FinetunedWeights.save).")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_path}: not valid JSON ({exc}).") from exc
        if config.get("format") != _FORMAT:
            raise ValueError(f"{cfg_path}: field 'format' is {config.get('format')!r}, expected {_FORMAT!r}.")
        kind = config.pop("kind", None)
        if kind not in PARAMETER_SETS:
            raise ValueError(f"{cfg_path}: field 'kind' is {kind!r}, expected one of {list(PARAMETER_SETS)}.")
        config.pop("format")
        hist_path = folder / "history.csv"
        history = pd.read_csv(hist_path) if hist_path.is_file() and hist_path.stat().st_size > 1 else pd.DataFrame()
        return cls(kind, load_file(str(weights)), config, history)

    def __repr__(self) -> str:
        return (f"FinetunedWeights(kind={self.kind!r}, n_tensors={len(self.tensors)}, "
                f"method={self.config.get('method')!r})")


class WeightEditedGenerator(EditedGenerator):
    """A generator whose network runs with :class:`FinetunedWeights` swapped in during each call.

    Examples
    --------
    >>> # erased = weights.apply(gen); erased.generate(["a red circle"], seeds=[0])
    """

    def __init__(self, generator: Any, weights: FinetunedWeights, strength: float = 1.0) -> None:
        super().__init__(generator, {}, name=f"{weights.config.get('method', 'finetuned')}@{strength:g}")
        self.weights = weights
        self.strength = float(strength)

    def generate(self, prompts: Any, seeds: Any, **settings: Any) -> Any:
        with self.weights.applied(self.base, self.strength):
            return super().generate(prompts, seeds, **settings)

    def run_with_hooks(self, prompts: Any, seeds: Any, hooks: Mapping[str, Any], **settings: Any) -> Any:
        with self.weights.applied(self.base, self.strength):
            return super().run_with_hooks(prompts, seeds, hooks, **settings)

    def run_with_cache(self, prompts: Any, seeds: Any, layers: Any, *, hooks: Mapping[str, Any] | None = None,
                       **settings: Any) -> Any:
        with self.weights.applied(self.base, self.strength):
            return super().run_with_cache(prompts, seeds, layers, hooks=hooks, **settings)


# ---------------------------------------------------------------------------------------------
# shared training machinery
# ---------------------------------------------------------------------------------------------
class _Stop(Exception):
    """Raised inside a pre-hook to end a generation once the wanted call has been captured."""


def _detach(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detach(v) for v in obj)
    return obj


def _capture(module: nn.Module, run: Callable[[], Any], index: int, *, stop: bool) -> tuple[tuple, dict, Any]:
    """Run ``run()`` and capture the arguments of ``module``'s call number ``index``."""
    state: dict[str, Any] = {"calls": 0, "got": None}

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if state["calls"] == index and state["got"] is None:
            state["got"] = (_detach(args), _detach(kwargs))
            if stop:
                raise _Stop
        state["calls"] += 1

    handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    out = None
    try:
        out = run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if state["got"] is None:
        raise RuntimeError(
            f"{type(module).__name__} was called {state['calls']} times during the generation; call {index} was "
            "requested. Check the number of sampling steps."
        )
    return state["got"][0], state["got"][1], out


@contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Turn off requires_grad of every parameter (restored on exit) and keep eval mode."""
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    was_training = module.training
    try:
        for p in module.parameters():
            p.requires_grad_(False)
        module.eval()
        yield
    finally:
        for n, p in module.named_parameters():
            p.requires_grad_(flags[n])
        module.train(was_training)


def _rows(obj: Any, idx: Tensor, n_rows: int) -> Any:
    """Select batch rows of every tensor with ``n_rows`` rows inside ``obj`` (recursively)."""
    if isinstance(obj, Tensor):
        return obj.index_select(0, idx.to(obj.device)) if obj.dim() and obj.shape[0] == n_rows else obj
    if isinstance(obj, dict):
        return {k: _rows(v, idx, n_rows) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rows(v, idx, n_rows) for v in obj)
    return obj


def _check_positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}.")
    return int(v)


def _check_positive(name: str, v: Any, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not (v >= 0 if allow_zero else v > 0):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {v!r}.")
    return float(v)


class _FinetuneBase(BaseEstimator):
    """Parameter handling, optimizer, checkpoints and results shared by ESD and EAR."""

    _kind = "denoiser"
    _method = "finetune"

    def _check_common(self) -> None:
        _check_positive_int("iterations", self.iterations)
        _check_positive("lr", self.lr)
        _check_positive("negative_guidance", self.negative_guidance, allow_zero=True)
        _check_positive_int("batch_size", self.batch_size)
        if self.checkpoint_every is not None:
            _check_positive_int("checkpoint_every", self.checkpoint_every)
            if self.checkpoint_dir is None:
                raise ValueError("checkpoint_every needs checkpoint_dir=... (where checkpoints are written).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}.")

    def _check_kind(self, generator: Any) -> tuple[str, nn.Module]:
        kind, net = network_of(generator)
        if kind != self._kind:
            raise TypeError(
                f"{type(self).__name__} fine-tunes a {self._kind}, but {type(generator).__name__} has a {kind}; use "
                f"{'ESD' if kind == 'denoiser' else 'EAR'} for this generator."
            )
        return kind, net

    def _setup(self, generator: Any) -> tuple[nn.Module, dict[str, Tensor], torch.optim.Optimizer, int, list[dict]]:
        kind, net = self._check_kind(generator)
        names = select_parameters(net, self.params, kind=kind, layers=getattr(self, "layers", None))
        current = dict(net.named_parameters())
        trainable = {n: current[n].detach().clone().float().requires_grad_(True) for n in names}
        opt = torch.optim.Adam(list(trainable.values()), lr=float(self.lr))
        start, history = 0, []
        ck = self._checkpoint_path()
        if ck is not None and (ck / "weights.safetensors").is_file():
            start, history = self._resume(ck, trainable, opt)
            logger.info("%s: resumed from %s at iteration %d", type(self).__name__, ck, start)
        return net, trainable, opt, start, history

    def _seeds(self, rng: np.random.Generator, it: int) -> list[int]:
        drawn = [int(s) for s in rng.integers(0, 2**31 - 1, self.batch_size)]
        if self.seeds is None:
            return drawn
        fixed = [int(s) for s in self.seeds]
        if not fixed or any(s < 0 for s in fixed):
            raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {self.seeds!r}.")
        return [fixed[(it * self.batch_size + j) % len(fixed)] for j in range(self.batch_size)]

    def _checkpoint_path(self) -> Path | None:
        return None if self.checkpoint_dir is None else Path(self.checkpoint_dir)

    def _config(self, names: Sequence[str]) -> dict:
        params = {}
        for k, v in self.get_params(deep=False).items():
            if isinstance(v, range):
                v = list(v)
            params[k] = v if isinstance(v, (str, int, float, bool, type(None), list, tuple)) else repr(v)
        return {"method": self._method, "params_selected": list(names), **params}

    def _save_checkpoint(self, trainable: dict[str, Tensor], opt: torch.optim.Optimizer, it: int,
                         history: list[dict]) -> None:
        from safetensors.torch import save_file

        folder = self._checkpoint_path()
        if folder is None:
            raise RuntimeError("no checkpoint folder is set; pass checkpoint_dir=... to checkpoint the fine-tuning.")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{n}": t.detach().cpu().contiguous() for n, t in trainable.items()}
        for i, (n, t) in enumerate(trainable.items()):
            st = opt.state.get(t, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    tensors[f"adam.{key}.{n}"] = st[key].detach().cpu().contiguous()
            if "step" in st:
                tensors[f"adam.step.{n}"] = torch.as_tensor(st["step"]).detach().cpu().reshape(1).float()
        tmp = folder / "weights.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": _FORMAT + ".checkpoint"})
        tmp.replace(folder / "weights.safetensors")
        state = {"format": _FORMAT + ".checkpoint", "iteration": it, "config": self._config(list(trainable))}
        (folder / "state.json.tmp").write_text(json.dumps(state, default=str))
        (folder / "state.json.tmp").replace(folder / "state.json")
        pd.DataFrame(history).to_csv(folder / "history.csv", index=False)

    def _resume(self, folder: Path, trainable: dict[str, Tensor], opt: torch.optim.Optimizer) -> tuple[int, list[dict]]:
        from safetensors.torch import load_file

        state_path = folder / "state.json"
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{state_path}: unreadable checkpoint state ({exc}); delete the folder to restart.") from exc
        if state.get("format") != _FORMAT + ".checkpoint":
            raise ValueError(f"{state_path}: field 'format' is {state.get('format')!r}; not a fine-tuning checkpoint.")
        saved = state.get("config", {}).get("params_selected")
        if saved != list(trainable):
            raise ValueError(
                f"{state_path}: field 'config.params_selected' lists other parameters than this run trains; use "
                "another checkpoint_dir or the same parameter selection."
            )
        tensors = load_file(str(folder / "weights.safetensors"))
        with torch.no_grad():
            for n, t in trainable.items():
                t.copy_(tensors[f"param.{n}"])
        for n, t in trainable.items():
            if f"adam.exp_avg.{n}" in tensors:
                opt.state[t] = {
                    "step": torch.tensor(float(tensors[f"adam.step.{n}"][0])),
                    "exp_avg": tensors[f"adam.exp_avg.{n}"].to(t.device),
                    "exp_avg_sq": tensors[f"adam.exp_avg_sq.{n}"].to(t.device),
                }
        hist_path = folder / "history.csv"
        history = pd.read_csv(hist_path).to_dict("records") if hist_path.is_file() and hist_path.stat().st_size > 1 else []
        return int(state["iteration"]), history

    def _finish(self, trainable: dict[str, Tensor], history: list[dict]) -> None:
        self.history_ = pd.DataFrame(history)
        self.weights_ = FinetunedWeights(
            self._kind, {n: t.detach().cpu().clone() for n, t in trainable.items()}, self._config(list(trainable)),
            self.history_,
        )

    def apply(self, generator: Any, strength: float = 1.0) -> WeightEditedGenerator:
        """``weights_.apply(generator, strength)``."""
        if not hasattr(self, "weights_"):
            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet; call fit(generator) first.")
        return self.weights_.apply(generator, strength)


def _prompt_list(prompts: Any, what: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    out = list(prompts)
    if not out or not all(isinstance(p, str) for p in out):
        raise TypeError(f"{what} must be a non-empty list of strings.")
    return out


# ---------------------------------------------------------------------------------------------
# ESD (diffusion)
# ---------------------------------------------------------------------------------------------
class ESD(_FinetuneBase):
    """Erased Stable Diffusion: fine-tune a diffusion denoiser away from a concept.

    Parameters
    ----------
    prompts : str or sequence of str
        Prompts with the concept (one is drawn per iteration and batch row).
    anchors : str or sequence of str, default ""
        The anchor of each prompt (``""``: ESD's unconditional anchor; or the prompt without the concept). One
        string is used for every prompt.
    params : str, sequence of str or callable, default "xattn"
        Trainable parameters of the denoiser (:data:`PARAMETER_SETS`: ``xattn`` = ESD-x, ``noxattn`` = ESD-u,
        ``xattn-kv``, ``attn``, ``mlp``, ``all``; or regular expressions / a predicate).
    negative_guidance : float, default 1.0
        ``eta`` of the target (the reference code's default is 2.0 for Stable Diffusion).
    iterations : int, default 200
    lr : float, default 5e-5
    batch_size : int, default 1
        Prompts per iteration.
    sample_steps : int, optional
        DDIM steps of the partial denoising that produces ``x_t`` (default: the generator's ``steps``).
    guidance : float, default 3.0
        Guidance of that partial denoising.
    on_policy : bool, default True
        Produce ``x_t`` with the weights being trained (False: with the frozen model).
    preserve_prompts : sequence of str, optional
        Prompts whose predictions are kept equal to the frozen model's (weight ``preserve_weight``).
    preserve_weight : float, default 0.0
    seeds : sequence of int, optional
        Generation seeds cycled over the iterations (default: drawn from ``seed``).
    seed : int, default 0
    checkpoint_dir : str or Path, optional
        Where checkpoints are written (and resumed from when present).
    checkpoint_every : int, optional
        Iterations between checkpoints.
    progress : bool, default True
        tqdm progress bar.

    Attributes
    ----------
    weights_ : FinetunedWeights
    history_ : pandas.DataFrame
        ``iteration, loss, preserve_loss, step_index, timestep``.

    Examples
    --------
    >>> # esd = ESD(["a red circle", "a red star on dots"], params="xattn", iterations=50).fit(gen)
    >>> # erased = esd.weights_.apply(gen)
    """

    _kind = "denoiser"
    _method = "esd"

    def __init__(
        self,
        prompts: str | Sequence[str],
        anchors: str | Sequence[str] = "",
        *,
        params: str | Sequence[str] | Callable[[str], bool] = "xattn",
        negative_guidance: float = 1.0,
        iterations: int = 200,
        lr: float = 5e-5,
        batch_size: int = 1,
        sample_steps: int | None = None,
        guidance: float = 3.0,
        on_policy: bool = True,
        preserve_prompts: Sequence[str] | None = None,
        preserve_weight: float = 0.0,
        seeds: Sequence[int] | None = None,
        seed: int = 0,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        progress: bool = True,
    ) -> None:
        self.prompts = prompts
        self.anchors = anchors
        self.params = params
        self.negative_guidance = negative_guidance
        self.iterations = iterations
        self.lr = lr
        self.batch_size = batch_size
        self.sample_steps = sample_steps
        self.guidance = guidance
        self.on_policy = on_policy
        self.preserve_prompts = preserve_prompts
        self.preserve_weight = preserve_weight
        self.seeds = seeds
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.progress = progress

    def _pairs(self) -> list[tuple[str, str]]:
        prompts = _prompt_list(self.prompts, "prompts")
        if isinstance(self.anchors, str):
            anchors = [self.anchors] * len(prompts)
        else:
            anchors = list(self.anchors)
            if len(anchors) != len(prompts) or not all(isinstance(a, str) for a in anchors):
                raise ValueError(f"anchors must be one string or one string per prompt ({len(prompts)}), got {self.anchors!r}.")
        return list(zip(prompts, anchors))

    def fit(self, generator: Any) -> ESD:
        """Fine-tune ``generator``'s denoiser (the generator itself is restored afterwards).

        Returns
        -------
        self
        """
        self._check_common()
        self._check_kind(generator)
        pairs = self._pairs()
        preserve = _prompt_list(self.preserve_prompts, "preserve_prompts") if self.preserve_prompts else []
        pw = _check_positive("preserve_weight", self.preserve_weight, allow_zero=True)
        steps = int(self.sample_steps if self.sample_steps is not None else generator.settings.get("steps", 50))
        _check_positive_int("sample_steps", steps)
        net, trainable, opt, start, history = self._setup(generator)
        eta = float(self.negative_guidance)
        layout = generator.cfg_layout
        bar = tqdm(range(start, self.iterations), disable=not self.progress, desc="ESD", initial=start,
                   total=self.iterations)
        for it in bar:
            rng = np.random.default_rng([int(self.seed), it])
            rows = [pairs[i] for i in rng.integers(0, len(pairs), self.batch_size)]
            k = int(rng.integers(0, steps))
            seeds = self._seeds(rng, it)
            prompts = [p for p, _ in rows]
            weights = FinetunedWeights(self._kind, {n: t.detach() for n, t in trainable.items()})
            ctx = weights.applied(generator) if self.on_policy else _null()
            with ctx:
                args, kwargs, _ = _capture(net, lambda: generator.generate(prompts, seeds, steps=steps,
                                                                            guidance=float(self.guidance)), k, stop=True)
            call = _denoiser_inputs(args, kwargs)
            n_rows = call["sample"].shape[0]
            cond = layout.cond_index(n_rows) if n_rows == 2 * len(prompts) else torch.arange(n_rows)
            base = _rows(call, cond, n_rows)
            anchors = [a for _, a in rows]
            emb_c = base["encoder_hidden_states"]
            emb_a = self._embeddings(generator, net, anchors, seeds)
            with _frozen(net), torch.no_grad():
                eps_c = _eps(net, base, emb_c)
                eps_a = _eps(net, base, emb_a)
                target = eps_a - eta * (eps_c - eps_a)
            with _frozen(net):
                pred = _eps(net, base, emb_c, trainable)
                loss = torch.nn.functional.mse_loss(pred.float(), target.float())
                ploss = torch.zeros(())
                if preserve and pw > 0:
                    pp = [preserve[i] for i in rng.integers(0, len(preserve), self.batch_size)]
                    emb_p = self._embeddings(generator, net, pp, seeds)
                    with torch.no_grad():
                        keep = _eps(net, base, emb_p)
                    ploss = torch.nn.functional.mse_loss(_eps(net, base, emb_p, trainable).float(), keep.float())
                opt.zero_grad(set_to_none=True)
                (loss + pw * ploss).backward()
                opt.step()
            t_val = base.get("timestep")
            t_val = float(t_val.flatten()[0]) if isinstance(t_val, Tensor) else float(t_val)
            history.append({"iteration": it, "loss": loss.item(), "preserve_loss": ploss.item(), "step_index": k,
                            "timestep": t_val})
            bar.set_postfix(loss=f"{loss.item():.4g}")
            if self.checkpoint_every and (it + 1) % int(self.checkpoint_every) == 0:
                self._save_checkpoint(trainable, opt, it + 1, history)
        self._finish(trainable, history)
        return self

    @staticmethod
    def _embeddings(generator: Any, net: nn.Module, prompts: list[str], seeds: list[int]) -> Tensor:
        """Conditional text embeddings the denoiser receives for ``prompts`` (captured at step 0)."""
        args, kwargs, _ = _capture(net, lambda: generator.generate(prompts, seeds, steps=1, guidance=1.0), 0, stop=True)
        return _denoiser_inputs(args, kwargs)["encoder_hidden_states"]


@contextmanager
def _null() -> Iterator[None]:
    yield


def _denoiser_inputs(args: tuple, kwargs: dict) -> dict:
    """Normalise a denoiser call to keyword arguments (``sample``, ``timestep``, ``encoder_hidden_states``, ...)."""
    call = dict(kwargs)
    names = ["sample", "timestep", "encoder_hidden_states"]
    for name, value in zip(names, args):
        call[name] = value
    if "sample" not in call and "hidden_states" in call:  # transformer denoisers (PixArt)
        call["sample"] = call["hidden_states"]
    for key in ("sample", "encoder_hidden_states"):
        if not isinstance(call.get(key), Tensor):
            raise TypeError(f"could not find the denoiser's {key!r} argument; ESD supports UNet2DConditionModel-style "
                            "denoisers called with sample, timestep and encoder_hidden_states.")
    call["return_dict"] = False
    return call


def _eps(net: nn.Module, call: dict, emb: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
    kw = dict(call)
    kw["encoder_hidden_states"] = emb
    sample = kw.pop("sample")
    if "hidden_states" in kw:
        kw.pop("hidden_states")
        kw["hidden_states"] = sample
        args: tuple = ()
    else:
        args = (sample,)
    if params is None:
        out = net(*args, **kw)
    else:
        out = torch.func.functional_call(net, dict(params), args, kw, strict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------
# EAR (autoregressive)
# ---------------------------------------------------------------------------------------------
class EAR(_FinetuneBase):
    """Erasure for autoregressive (Janus-style) image generators, with WGA and TLM.

    Parameters
    ----------
    pairs : sequence of (str, str)
        ``(concept prompt, anchor prompt)`` pairs (EAR: unsafe -> safe, e.g. ``"a large red circle on dots"`` ->
        ``"a large circle on dots"``). A bare string means ``(prompt, "")``.
    params : str, sequence of str or callable, default "attn"
        Trainable parameters of the language model (``attn`` = ``self_attn`` as in EAR, ``mlp``, ``all``, regular
        expressions or a predicate).
    layers : int, range or sequence of int, optional
        Restrict ``params`` to these decoder layers (EAR: ``range(0, 5)`` of 30). None: every layer.
    negative_guidance : float, default 1.0
        ``eta`` of the target.
    iterations : int, default 50
        Prompt pairs used (EAR: 49-50).
    lr : float, default 1e-4
    window : int, default 16
        Tokens per gradient-accumulation window (EAR: 12-100 of 576).
    loss_threshold : float, default 0.05
        Thresholded loss masking: windows with a loss at or below it trigger no update.
    batch_size : int, default 1
        Pairs per iteration.
    on_policy : bool, default True
        Sample the image tokens with the weights being trained (False: the frozen model).
    guidance : float, optional
        CFG of that sampling (default: the generator's).
    seeds, seed, checkpoint_dir, checkpoint_every, progress
        As in :class:`ESD`.

    Attributes
    ----------
    weights_ : FinetunedWeights
    history_ : pandas.DataFrame
        ``iteration, window, loss, updated`` (``updated`` False = masked by TLM).

    Examples
    --------
    >>> # ear = EAR([("a large red star on dots", "a large star on dots")], layers=range(0, 2), iterations=20)
    >>> # erased = ear.fit(ar_gen).weights_.apply(ar_gen)
    """

    _kind = "language_model"
    _method = "ear"

    def __init__(
        self,
        pairs: Sequence[tuple[str, str] | str],
        *,
        params: str | Sequence[str] | Callable[[str], bool] = "attn",
        layers: int | Sequence[int] | None = None,
        negative_guidance: float = 1.0,
        iterations: int = 50,
        lr: float = 1e-4,
        window: int = 16,
        loss_threshold: float = 0.05,
        batch_size: int = 1,
        on_policy: bool = True,
        guidance: float | None = None,
        seeds: Sequence[int] | None = None,
        seed: int = 0,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        progress: bool = True,
    ) -> None:
        self.pairs = pairs
        self.params = params
        self.layers = layers
        self.negative_guidance = negative_guidance
        self.iterations = iterations
        self.lr = lr
        self.window = window
        self.loss_threshold = loss_threshold
        self.batch_size = batch_size
        self.on_policy = on_policy
        self.guidance = guidance
        self.seeds = seeds
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.progress = progress

    def _pair_list(self) -> list[tuple[str, str]]:
        if isinstance(self.pairs, str):
            raise TypeError("pairs must be a list of (concept prompt, anchor prompt) tuples, got a string.")
        out = []
        for p in self.pairs:
            if isinstance(p, str):
                out.append((p, ""))
            elif isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(x, str) for x in p):
                out.append((p[0], p[1]))
            else:
                raise TypeError(f"each pair must be (concept prompt, anchor prompt) or a prompt string, got {p!r}.")
        if not out:
            raise ValueError("pairs is empty: pass at least one (concept prompt, anchor prompt) pair.")
        return out

    def fit(self, generator: Any) -> EAR:
        """Fine-tune ``generator``'s language model (the generator itself is restored afterwards).

        Returns
        -------
        self
        """
        self._check_common()
        self._check_kind(generator)
        pairs = self._pair_list()
        window = _check_positive_int("window", self.window)
        threshold = _check_positive("loss_threshold", self.loss_threshold, allow_zero=True)
        embed = getattr(getattr(generator, "model", None), "prepare_embeddings_for_image_generation", None)
        if not callable(embed):
            raise TypeError(
                f"{type(generator).__name__} has no model.prepare_embeddings_for_image_generation; EAR supports the "
                "Janus adapters (transformers JanusForConditionalGeneration)."
            )
        lm, trainable, opt, start, history = self._setup(generator)
        eta = float(self.negative_guidance)
        settings = {} if self.guidance is None else {"guidance": float(self.guidance)}
        bar = tqdm(range(start, self.iterations), disable=not self.progress, desc="EAR", initial=start,
                   total=self.iterations)
        for it in bar:
            rng = np.random.default_rng([int(self.seed), it])
            rows = [pairs[i] for i in rng.integers(0, len(pairs), self.batch_size)]
            seeds = self._seeds(rng, it)
            prompts, anchors = [p for p, _ in rows], [a for _, a in rows]
            weights = FinetunedWeights(self._kind, {n: t.detach() for n, t in trainable.items()})
            with (weights.applied(generator) if self.on_policy else _null()):
                _, kw_c, out = _capture(lm, lambda: generator.generate(prompts, seeds, **settings), 0, stop=False)
            _, kw_a, _ = _capture(lm, lambda: generator.generate(anchors, seeds, **settings), 0, stop=True)
            tokens = out.tokens.to(kw_c["inputs_embeds"].device)
            with torch.no_grad():
                seq_c = _teacher_forced(kw_c, tokens, embed, generator)
                seq_a = _teacher_forced(kw_a, tokens, embed, generator)
            n_tok = tokens.shape[1]
            with _frozen(lm), torch.no_grad():
                h_c = _last_hidden(lm, seq_c)[:, -n_tok:]
                h_a = _last_hidden(lm, seq_a)[:, -n_tok:]
                target = h_a - eta * (h_c - h_a)
            prefix = seq_c["inputs_embeds"].shape[1] - (n_tok - 1)
            for w0 in range(0, n_tok, window):
                w1 = min(n_tok, w0 + window)
                with _frozen(lm):
                    cut = {k: (v[:, : prefix - 1 + w1] if isinstance(v, Tensor) and v.dim() >= 2 else v)
                           for k, v in seq_c.items()}
                    h = _last_hidden(lm, cut, trainable)[:, prefix - 1 + w0: prefix - 1 + w1]
                    loss = torch.nn.functional.mse_loss(h.float(), target[:, w0:w1].float())
                    updated = loss.item() > threshold
                    if updated:
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                history.append({"iteration": it, "window": w0 // window, "loss": loss.item(), "updated": updated})
            recent = [h["loss"] for h in history[-((n_tok + window - 1) // window):]]
            bar.set_postfix(loss=f"{np.mean(recent):.4g}")
            if self.checkpoint_every and (it + 1) % int(self.checkpoint_every) == 0:
                self._save_checkpoint(trainable, opt, it + 1, history)
        self._finish(trainable, history)
        return self


def _teacher_forced(prefill: dict, tokens: Tensor, embed: Callable[[Tensor], Tensor], generator: Any) -> dict:
    """Full-sequence LM inputs: the captured prefill (CFG rows) followed by the sampled image tokens but the last."""
    emb = prefill["inputs_embeds"]
    mask = prefill.get("attention_mask")
    rows = emb.shape[0]
    n = tokens.shape[0]
    layout = generator.cfg_layout
    fed = tokens[:, :-1]
    if rows == 2 * n and layout is not None:
        fed = layout.merge(fed, fed)
    elif rows != n:
        raise ValueError(f"the prefill call has {rows} rows for {n} images; cannot align the CFG rows.")
    tok_emb = embed(fed).to(emb.dtype)
    full = torch.cat([emb, tok_emb], dim=1)
    if mask is None:
        mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
    pos0 = prefill.get("position_ids")
    if pos0 is None:
        pos0 = (mask.cumsum(-1) - 1).clamp(min=0)
    nxt = mask.sum(-1, keepdim=True) + torch.arange(fed.shape[1], device=emb.device)[None]
    return {
        "inputs_embeds": full,
        "attention_mask": torch.cat([mask, mask.new_ones(rows, fed.shape[1])], dim=1),
        "position_ids": torch.cat([pos0, nxt.to(pos0.dtype)], dim=1),
    }


def _last_hidden(lm: nn.Module, seq: dict, params: Mapping[str, Tensor] | None = None) -> Tensor:
    kw = dict(seq, use_cache=False)
    out = lm(**kw) if params is None else torch.func.functional_call(lm, dict(params), (), kw, strict=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
