"""The estimator base: fit loop, transform / inverse_transform / score, checkpoints, validation.

Every variant (``TopKSAE``, ``JumpReLUSAE``, ...) is a thin subclass that says which activation
and dictionary its module uses and which penalties it adds to the reconstruction loss.
"""
from __future__ import annotations

import html
import logging
import math
import numbers
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from torch import Tensor
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .data import BatchSource, as_batch_source, is_store, to_tensor
from .init import expected_norm_scale, geometric_median
from .metrics import ReconstructionAccumulator
from .modules import Activation, FreeDictionary, SparseAutoencoder, TrainOutput
from .sparse import SparseCodes
from .training import DeadLatentTracker, autocast_context, lr_factor, reconstruction_loss, resolve_steps

__all__ = ["BaseSAE", "Callback", "derive_seed", "resolve_device", "resolve_dtype"]

logger = logging.getLogger(__name__)

Callback = Callable[["BaseSAE", int, dict], None]
"""``callback(estimator, step, metrics)`` is called after every optimisation step."""

_INIT_SAMPLES = 8192
_FORMAT_VERSION = 1


def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("conceptkit")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0+unknown"


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one ``purpose`` derived from the user's ``seed``.

    Salting keeps the streams of different purposes (initialisation, data order, training noise)
    independent of each other and of a user's own ``torch.manual_seed(seed)`` streams; e.g. data
    generated with ``randn`` under seed 0 must not coincide with an SAE's initial atoms under
    ``random_state=0``.
    """
    salt = int.from_bytes(purpose.encode("utf-8"), "little")
    return int(np.random.SeedSequence([int(seed), salt]).generate_state(2, dtype=np.uint32).astype(np.uint64)
               .dot(np.array([1, 2**31], dtype=np.uint64)))


def resolve_device(device: Any) -> torch.device:
    """``device`` as a ``torch.device``; unknown or unavailable devices raise ``ValueError``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a valid torch device ({exc}). Use 'cpu', 'cuda', 'cuda:0' or 'mps'."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available here; use device='cpu'.")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} was requested but MPS is not available here; use device='cpu'.")
    return dev


def resolve_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        out = dtype
    else:
        out = getattr(torch, str(dtype), None)
    if out not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype!r} is not supported; use 'float32' or 'float64' (see autocast= for bf16/fp16).")
    return out


def _json_safe(v: Any) -> Any:
    if isinstance(v, (bool, str)) or v is None:
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, torch.device):
        return str(v)
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, Path):
        return str(v)
    return repr(v)


class BaseSAE(BaseEstimator):
    """Common machinery of the sparse-autoencoder estimators.

    Subclasses define ``__init__`` (parameters only), ``_architecture``, ``_make_activation`` and,
    optionally, ``_penalties`` (extra loss terms), ``_make_dictionary``, ``_before_step``,
    ``_finalize`` and ``_validate_variant_params``. See :class:`sae.TopKSAE` for the parameters
    shared by every variant.
    """

    _architecture: ClassVar[str] = "base"
    _fold_decoder_norms: ClassVar[bool] = False
    _unit_norm_decoder: ClassVar[bool] = True
    _sparse_transform: ClassVar[bool] = True

    # ------------------------------------------------------------------ hooks
    def _make_activation(self) -> Activation:  # pragma: no cover - abstract
        raise NotImplementedError

    def _make_dictionary(self, d_in: int, init_data: Tensor | None, generator: torch.Generator) -> torch.nn.Module:
        return FreeDictionary(self.n_concepts, d_in, unit_norm=self._unit_norm_decoder)

    def _make_module(self, d_in: int, init_data: Tensor | None, generator: torch.Generator) -> SparseAutoencoder:
        return SparseAutoencoder(
            d_in, self.n_concepts, self._make_activation(),
            self._make_dictionary(d_in, init_data, generator), sparse_backend=self.sparse_backend,
        )

    def _module_for_state(self, d_in: int, tensors: dict[str, Tensor]) -> SparseAutoencoder:
        """An uninitialised module whose shapes match saved tensors (used by resume and load)."""
        return self._make_module(d_in, None, torch.Generator().manual_seed(0))

    def _penalties(self, module: SparseAutoencoder, x: Tensor, out: TrainOutput, ctx: dict) -> dict[str, Tensor]:
        return {}

    def _before_step(self, module: SparseAutoencoder, step: int, total: int) -> None:
        return None

    def _finalize(self, module: SparseAutoencoder, source: BatchSource, scale: float, ctx: dict) -> None:
        """After training, before folding the input scale (inputs of ``source`` need ``* scale``)."""
        return None

    def _validate_variant_params(self, d_in: int | None) -> None:
        return None

    def _variant_state(self) -> dict:
        """JSON state of variant-specific controllers (saved in training checkpoints)."""
        return {}

    def _load_variant_state(self, state: dict) -> None:
        return None

    def _config_extra(self) -> dict:
        return {}

    # ------------------------------------------------------------------ validation
    def _validate_params(self, d_in: int | None = None) -> None:
        name = type(self).__name__

        def positive_int(attr: str, allow_none: bool = False) -> None:
            v = getattr(self, attr)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}: {attr} must be a positive integer; got {v!r}.")

        positive_int("n_concepts")
        positive_int("n_epochs")
        positive_int("batch_size")
        positive_int("checkpoint_every", allow_none=True)
        positive_int("log_every", allow_none=True)
        positive_int("dead_window")
        if self.lr is not None and (not isinstance(self.lr, numbers.Real) or not self.lr > 0):
            raise ValueError(f"{name}: lr must be a positive number or None (automatic); got {self.lr!r}.")
        for attr in ("lr_warmup", "lr_decay"):
            v = getattr(self, attr)
            if not isinstance(v, numbers.Real) or v < 0:
                raise ValueError(f"{name}: {attr} must be a fraction of the steps in [0, 1] or a step count >= 0; got {v!r}.")
        if self.lr_decay_fraction() + self.lr_warmup_fraction() > 1.0 + 1e-9:
            raise ValueError(
                f"{name}: lr_warmup ({self.lr_warmup}) and lr_decay ({self.lr_decay}) together exceed all the "
                "training steps; lower one of them."
            )
        decay = getattr(self, "encoder_decay", 0.0)
        if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not decay >= 0:
            raise ValueError(
                f"{name}: encoder_decay must be a number >= 0 (0 disables the pull toward the tied encoder); "
                f"got {decay!r}."
            )
        resample = getattr(self, "resample_dead", None)
        if resample is not None and (
            isinstance(resample, bool) or not isinstance(resample, numbers.Real) or not resample >= 0
        ):
            raise ValueError(
                f"{name}: resample_dead must be None, or a number of steps (int) or a fraction of the steps "
                f"(float <= 1) between resamplings; got {resample!r}."
            )
        if self.grad_clip is not None and (not isinstance(self.grad_clip, numbers.Real) or not self.grad_clip > 0):
            raise ValueError(f"{name}: grad_clip must be a positive number or None; got {self.grad_clip!r}.")
        if self.normalize not in ("expected_norm", "none"):
            raise ValueError(f"{name}: normalize must be 'expected_norm' or 'none'; got {self.normalize!r}.")
        if getattr(self, "decoder_init", "random") not in ("data", "random"):
            raise ValueError(f"{name}: decoder_init must be 'data' or 'random'; got {self.decoder_init!r}.")
        if self.b_dec_init not in ("geometric_median", "mean", "zero"):
            raise ValueError(
                f"{name}: b_dec_init must be 'geometric_median', 'mean' or 'zero'; got {self.b_dec_init!r}."
            )
        if self.autocast not in (None, "bfloat16", "float16"):
            raise ValueError(f"{name}: autocast must be None, 'bfloat16' or 'float16'; got {self.autocast!r}.")
        if self.sparse_backend not in ("auto", "sparse", "dense"):
            raise ValueError(f"{name}: sparse_backend must be 'auto', 'sparse' or 'dense'; got {self.sparse_backend!r}.")
        for attr in ("random_state", "init_random_state"):
            v = getattr(self, attr)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0):
                raise ValueError(f"{name}: {attr} must be a non-negative integer or None; got {v!r}.")
        resolve_device(self.device)
        resolve_dtype(self.dtype)
        self._validate_variant_params(d_in)

    def lr_warmup_fraction(self) -> float:
        return float(self.lr_warmup) if self.lr_warmup <= 1 else 0.0

    def lr_decay_fraction(self) -> float:
        return float(self.lr_decay) if self.lr_decay <= 1 else 0.0

    def _check_fitted(self) -> None:
        if not hasattr(self, "module_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with appropriate "
                "arguments before using this estimator."
            )

    def _check_features(self, n_features: int) -> None:
        if n_features != self.n_features_in_:
            raise ValueError(
                f"X has {n_features} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )

    # ------------------------------------------------------------------ fitting
    def _auto_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return min(1e-2, 4e-3 * math.sqrt(2048 / self.n_concepts))

    def fit(
        self,
        X: Any,
        y: None = None,
        *,
        resume: bool = False,
        checkpoint_dir: str | Path | None = None,
        callbacks: Sequence[Callback] | None = None,
        layer: str | None = None,
    ) -> BaseSAE:
        """Train the SAE on ``X``.

        Parameters
        ----------
        X : Tensor, array-like [n_samples, n_features] or ActivationStore
            Training activations. A store is streamed in shuffled batches with bounded memory.
        y : None
            Ignored (sklearn compatibility).
        resume : bool
            Continue from the latest checkpoint in ``checkpoint_dir`` (if there is one). The
            resumed run reproduces the uninterrupted one.
        checkpoint_dir : str or Path, optional
            Overrides the ``checkpoint_dir`` parameter for this call.
        callbacks : sequence of callables, optional
            ``callback(estimator, step, metrics)`` after every step (after any checkpoint of
            that step). Raising inside a callback stops training.
        layer : str, optional
            Which layer of a multi-layer ActivationStore to train on.

        Returns
        -------
        self
        """
        self._validate_params()
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype)
        name = type(self).__name__
        source = as_batch_source(X, device=device, dtype=dtype, layer=layer, name=name)
        d_in, n = source.n_features, source.n_samples
        self._validate_variant_params(d_in)
        ck_dir = Path(checkpoint_dir) if checkpoint_dir is not None else (
            Path(self.checkpoint_dir) if self.checkpoint_dir is not None else None
        )
        if resume and ck_dir is None:
            raise ValueError(f"{name}.fit(resume=True) needs a checkpoint directory: pass checkpoint_dir=... .")

        bs = min(self.batch_size, n)
        drop_last = n >= 4 * bs
        steps_per_epoch = source.n_batches(bs, drop_last)
        total = self.n_epochs * steps_per_epoch
        warmup = resolve_steps(self.lr_warmup, total)
        decay = resolve_steps(self.lr_decay, total)
        base_lr = self._auto_lr()
        resample = getattr(self, "resample_dead", None)
        resample_every = max(1, resolve_steps(resample, total)) if resample else 0

        loaded = ckpt.load_training_state(ck_dir) if (resume and ck_dir is not None) else None
        if resume and loaded is None:
            logger.info("No checkpoint in %s; starting from scratch.", ck_dir)
        if loaded is not None:
            tensors, state = loaded
            self._check_resume_state(state, d_in, total, ck_dir)
            seed = int(state["seed"])
            init_seed = int(state["init_seed"])
            scale = float(state["scale"])
            module = self._module_for_state(d_in, tensors)
            self._load_module_tensors(module, tensors, ck_dir / "latest.json")
            module.to(device=device, dtype=dtype)
            step = int(state["step"])
            history = list(state["history"])
            accum = dict(state["accum"])
            counters = dict(state["counters"])
            self._load_variant_state(state.get("variant", {}))
        else:
            seed = self.random_state if self.random_state is not None else int(np.random.SeedSequence().entropy % (2**31))
            init_seed = self.init_random_state if self.init_random_state is not None else seed
            head = source.head(_INIT_SAMPLES).to(device=device, dtype=dtype)
            scale = expected_norm_scale(head) if self.normalize == "expected_norm" else 1.0
            module = self._init_module(d_in, head * scale, init_seed, device, dtype)
            step = 0
            history = []
            accum = {}
            counters = {"nan_fallbacks": 0, "skipped_steps": 0, "samples": 0}
            self._load_variant_state({})
        module.train()

        params = [p for p in module.parameters() if p.requires_grad]
        opt = self._make_optimizer(params, base_lr, device)
        tracker = DeadLatentTracker(self.n_concepts, self.dead_window, device=device)
        train_gen = torch.Generator().manual_seed(derive_seed(seed, "train"))
        if loaded is not None:
            ckpt.optimizer_from_tensors(opt, tensors, state["optimizer"])
            tracker.since_fired.copy_(tensors["tracker.since_fired"].to(device))
            train_gen.set_state(tensors["rng.train"])

        log_every = self.log_every or max(1, total // 50)
        callbacks = list(callbacks or [])
        ctx = {"total": total, "tracker": tracker, "generator": train_gen, "d_in": d_in}
        t_start = time.perf_counter()
        pbar = tqdm(total=total, initial=step, disable=not self.verbose, desc=name, leave=False)

        def save_checkpoint() -> None:
            tensors_out = {f"module.{k}": v for k, v in module.state_dict().items()}
            opt_t, opt_meta = ckpt.optimizer_to_tensors(opt)
            tensors_out.update(opt_t)
            tensors_out["tracker.since_fired"] = tracker.since_fired
            tensors_out["rng.train"] = train_gen.get_state()
            state_out = {
                "format_version": _FORMAT_VERSION,
                "architecture": self._architecture,
                "class": name,
                "params": _json_safe(self.get_params()),
                "d_in": d_in,
                "n_samples": n,
                "total_steps": total,
                "steps_per_epoch": steps_per_epoch,
                "step": step,
                "seed": seed,
                "init_seed": init_seed,
                "scale": scale,
                "history": history,
                "accum": accum,
                "counters": counters,
                "optimizer": opt_meta,
                "variant": self._variant_state(),
            }
            ckpt.save_training_state(ck_dir, step, tensors_out, _json_safe(state_out))

        try:
            while step < total:
                epoch, pos = divmod(step, steps_per_epoch)
                for x in source.iter_batches(bs, epoch=epoch, seed=seed, shuffle=True, start_batch=pos, drop_last=drop_last):
                    if scale != 1.0:
                        x = x * scale
                    f = lr_factor(step, total, warmup, decay)
                    for group in opt.param_groups:
                        group["lr"] = base_lr * f
                    self._before_step(module, step, total)
                    ctx["step"] = step
                    metrics = self._train_step(module, opt, params, x, tracker, ctx, counters, device)
                    step += 1
                    if resample_every and step % resample_every == 0 and step <= total - decay:
                        counters["resampled"] = counters.get("resampled", 0) + self._resample_dead(
                            module, opt, x, tracker, train_gen
                        )
                    counters["samples"] += int(x.shape[0])
                    metrics["lr"] = base_lr * f
                    for k, v in metrics.items():
                        accum[k] = accum.get(k, 0.0) + v
                    accum["_n"] = accum.get("_n", 0) + 1
                    if step % log_every == 0 or step == total:
                        row = {"step": step, "epoch": step / steps_per_epoch, "samples": counters["samples"]}
                        cnt = accum.pop("_n")
                        row.update({k: v / cnt for k, v in accum.items()})
                        row["dead_fraction"] = tracker.dead_fraction()
                        row["nan_fallbacks"] = counters["nan_fallbacks"]
                        row["skipped_steps"] = counters["skipped_steps"]
                        if resample_every:
                            row["resampled"] = counters.get("resampled", 0)
                        row["time_s"] = time.perf_counter() - t_start
                        history.append(row)
                        accum = {}
                        pbar.set_postfix(fvu=f"{row.get('fvu', float('nan')):.4f}", l0=f"{row.get('l0', float('nan')):.1f}")
                    pbar.update(1)
                    if ck_dir is not None and (
                        step == total or (self.checkpoint_every is not None and step % self.checkpoint_every == 0)
                    ):
                        save_checkpoint()
                    for cb in callbacks:
                        cb(self, step, metrics)
                    if step >= total:
                        break
        finally:
            pbar.close()

        module.eval()
        self._finalize(module, source, scale, ctx)
        if scale != 1.0:
            module.fold_input_scale_(scale)
        if self._fold_decoder_norms:
            module.fold_decoder_norms_()
        self._set_fitted(module, d_in, source.metadata, scale, seed)
        self.history_ = pd.DataFrame(history)
        self.training_stats_ = {
            "n_steps": total,
            "n_samples_seen": counters["samples"],
            "nan_fallbacks": counters["nan_fallbacks"],
            "skipped_steps": counters["skipped_steps"],
            **({"resampled": counters.get("resampled", 0)} if resample_every else {}),
            "train_fvu": float(history[-1].get("fvu", float("nan"))) if history else float("nan"),
            "train_l0": float(history[-1].get("l0", float("nan"))) if history else float("nan"),
            "dead_fraction": tracker.dead_fraction(),
            "fit_time_s": time.perf_counter() - t_start,
            **getattr(self, "_extra_stats", {}),
        }
        return self

    def initial_dictionary(self, X: Any, *, layer: str | None = None) -> Tensor:
        """The dictionary [n_concepts, d] that :meth:`fit` on ``X`` would start from (on the CPU).

        Uses ``init_random_state`` (or ``random_state``); used to separate *stability* from
        *stabilisation* in :func:`sae.evaluation.seed_stability`.
        """
        self._validate_params()
        source = as_batch_source(X, device=torch.device("cpu"), dtype=torch.float32, layer=layer, name=type(self).__name__)
        self._validate_variant_params(source.n_features)
        seed = self.init_random_state if self.init_random_state is not None else self.random_state
        if seed is None:
            raise ValueError(
                f"{type(self).__name__}.initial_dictionary needs random_state or init_random_state to be set, "
                "otherwise the initialisation is not reproducible."
            )
        head = source.head(_INIT_SAMPLES)
        scale = expected_norm_scale(head) if self.normalize == "expected_norm" else 1.0
        module = self._init_module(source.n_features, head * scale, int(seed), torch.device("cpu"), torch.float32)
        return module.get_dictionary().detach()

    def _check_resume_state(self, state: dict, d_in: int, total: int, ck_dir: Path) -> None:
        f = ck_dir / "latest.json"
        for field in ("seed", "init_seed", "scale", "step", "history", "accum", "counters", "optimizer", "d_in", "total_steps"):
            if field not in state:
                raise ValueError(f"Checkpoint {f}: the state is missing the field '{field}'; it cannot be resumed.")
        if state.get("architecture") != self._architecture:
            raise ValueError(
                f"Checkpoint {f}: field 'architecture' is {state.get('architecture')!r}, but this estimator is "
                f"{self._architecture!r}. Use a fresh checkpoint_dir or the matching estimator."
            )
        if int(state["d_in"]) != d_in:
            raise ValueError(f"Checkpoint {f}: field 'd_in' is {state['d_in']}, but X has {d_in} features.")
        if int(state["total_steps"]) != total:
            raise ValueError(
                f"Checkpoint {f}: field 'total_steps' is {state['total_steps']}, but this fit would run {total} "
                "steps (the data size, batch_size or n_epochs changed). Use the same settings to resume."
            )
        saved = state.get("params", {})
        if int(saved.get("n_concepts", self.n_concepts)) != self.n_concepts:
            raise ValueError(
                f"Checkpoint {f}: field 'n_concepts' is {saved.get('n_concepts')}, but this estimator has "
                f"n_concepts={self.n_concepts}."
            )

    def _load_module_tensors(self, module: SparseAutoencoder, tensors: dict[str, Tensor], where: Path) -> None:
        sd = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
        expected = module.state_dict()
        for k, v in expected.items():
            if k not in sd:
                raise ValueError(f"{where}: tensor 'module.{k}' is missing from the checkpoint.")
            if tuple(sd[k].shape) != tuple(v.shape):
                raise ValueError(
                    f"{where}: tensor 'module.{k}' has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}."
                )
        module.load_state_dict(sd, strict=True)

    def _init_module(self, d_in: int, head: Tensor, init_seed: int, device: torch.device, dtype: torch.dtype) -> SparseAutoencoder:
        g = torch.Generator().manual_seed(derive_seed(init_seed, "init"))
        if self.b_dec_init == "geometric_median":
            b_dec = geometric_median(head.cpu())
        elif self.b_dec_init == "mean":
            b_dec = head.mean(0).cpu()
        else:
            b_dec = torch.zeros(d_in)
        centred = (head.cpu().float() - b_dec)
        module = self._make_module(d_in, centred, g)
        module.reset_parameters(g, init_dictionary=self._data_atoms(centred, g))
        with torch.no_grad():
            module.b_dec.copy_(b_dec)
        self._init_extra(module, centred, g)
        return module.to(device=device, dtype=dtype)

    def _data_atoms(self, centred: Tensor, g: torch.Generator) -> Tensor | None:
        """Initial atoms for ``decoder_init="data"``: distinct random centred samples (unit norm).

        Atoms beyond the sample size, and samples with (near) zero norm, get Gaussian directions.
        """
        if getattr(self, "decoder_init", "random") != "data":
            return None
        n = self.n_concepts
        atoms = torch.randn(n, centred.shape[1], generator=g)
        m = min(n, centred.shape[0])
        idx = torch.randperm(centred.shape[0], generator=g)[:m]
        rows = centred[idx].float()
        ok = rows.norm(dim=1) > 1e-6 * max(float(centred.norm(dim=1).mean()), 1e-12)
        atoms[:m][ok] = rows[ok]
        return atoms

    def _init_extra(self, module: SparseAutoencoder, centred: Tensor, g: torch.Generator) -> None:
        return None

    def _make_optimizer(self, params: list, lr: float, device: torch.device) -> torch.optim.Optimizer:
        try:
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
        except (RuntimeError, ValueError):
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))

    def _train_step(
        self, module: SparseAutoencoder, opt: torch.optim.Optimizer, params: list, x: Tensor,
        tracker: DeadLatentTracker, ctx: dict, counters: dict, device: torch.device,
    ) -> dict[str, float]:
        attempts = [self.autocast, None] if self.autocast is not None else [None]
        losses = out = None
        for i, ac in enumerate(attempts):
            with autocast_context(device, ac):
                out = module.forward_train(x)
                mse = reconstruction_loss(x, out.x_hat)
                terms = self._penalties(module, x, out, ctx)
            total_loss = mse + sum(terms.values()) if terms else mse
            if bool(torch.isfinite(total_loss)):
                losses = (total_loss, mse, terms)
                break
            if i + 1 < len(attempts):
                counters["nan_fallbacks"] += 1
                logger.warning("Non-finite loss under autocast=%s at step %d; recomputing in full precision.", ac, ctx["step"])
        if losses is None:
            counters["skipped_steps"] += 1
            logger.warning("Non-finite loss at step %d; the batch is skipped.", ctx["step"])
            if counters["skipped_steps"] > self._max_skipped:
                raise FloatingPointError(
                    f"{type(self).__name__}: the loss was NaN/inf on {counters['skipped_steps']} batches. Lower lr, "
                    "check the input for extreme values, or use normalize='expected_norm'."
                )
            return {"loss": float("nan")}
        total_loss, mse, terms = losses
        opt.zero_grad(set_to_none=True)
        total_loss.backward()
        module.dictionary.remove_parallel_grad_()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        opt.step()
        module.dictionary.project_()
        decay = getattr(self, "encoder_decay", 0.0)
        if decay:
            # decoupled (AdamW-style) decay toward the tied encoder, at the scheduled learning rate;
            # sqrt(d): an Adam step moves a row by about lr * sqrt(d), so this keeps the allowed
            # *relative* deviation of a row from its atom independent of the input width
            module.decay_encoder_(opt.param_groups[0]["lr"] * decay * math.sqrt(module.d_in))
        tracker.update(out.fired, x.shape[0])
        with torch.no_grad():
            xf = x.to(torch.float32)
            denom = (xf - xf.mean(0, keepdim=True)).pow(2).sum(-1).mean().clamp_min(1e-12)
            metrics = {
                "loss": float(total_loss.detach()),
                "mse": float(mse.detach()),
                "fvu": float(mse.detach() / denom),
                "l0": float(out.l0),
            }
            for k, v in terms.items():
                metrics[k] = float(v.detach())
        return metrics

    _max_skipped: ClassVar[int] = 10

    @torch.no_grad()
    def _resample_dead(
        self, module: SparseAutoencoder, opt: torch.optim.Optimizer, x: Tensor, tracker: DeadLatentTracker,
        generator: torch.Generator,
    ) -> int:
        """Re-initialise dead latents toward poorly reconstructed inputs (Anthropic, 2023).

        Rows of the batch ``x`` whose reconstruction loss ``||x - x_hat||^2`` is above the batch
        mean are drawn without replacement with probability proportional to the square of their
        loss (at most one latent per such row). Dead latent ``j`` gets the
        unit-norm residual ``e / ||e||`` of its row as atom, the mean encoder-row norm of the live
        latents times that direction as encoder row (tied, as at initialisation; Anthropic's
        ``0.2 x`` is for ReLU SAEs, where any positive pre-activation fires; under a top-k
        selection it leaves the new latent unable to win), and ``b_enc[j] = 0``. Adam's first
        moment of those entries is zeroed and the second moment set to the live rows' mean per
        column (zeroing it would make the next steps about 3x larger than usual). The resampled
        latents count as just fired. Returns the number of latents resampled.
        """
        dead = tracker.dead
        n_dead = int(dead.sum())
        dic = module.dictionary
        if n_dead == 0 or not isinstance(dic, FreeDictionary):
            return 0
        was_training = module.training
        module.train()
        e = (x - module.forward_train(x).x_hat).to(torch.float32)
        module.train(was_training)
        loss = e.pow(2).sum(1).cpu().double()
        if not bool(torch.isfinite(loss).all()) or float(loss.sum()) <= 0:
            return 0
        w = torch.where(loss > loss.mean(), loss.pow(2), torch.zeros_like(loss))  # poorly reconstructed rows only
        n = min(n_dead, int((w > 0).sum()))
        if n == 0:
            return 0
        rows = torch.multinomial(w, n, replacement=False, generator=generator).to(x.device)
        idx = torch.nonzero(dead).squeeze(1)[:n]
        alive = ~dead
        direction = e[rows]
        direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        enc_norm = float(module.W_enc[alive].norm(dim=1).mean()) if bool(alive.any()) else 1.0
        dic.W_dec[idx] = direction.to(dic.W_dec.dtype)
        module.W_enc[idx] = (enc_norm * direction).to(module.W_enc.dtype)
        module.b_enc[idx] = 0.0
        for p in (dic.W_dec, module.W_enc, module.b_enc):
            state = opt.state.get(p, {})
            if "exp_avg" in state:
                state["exp_avg"][idx] = 0.0
            if "exp_avg_sq" in state:
                sq = state["exp_avg_sq"]
                sq[idx] = sq[alive].mean(0) if bool(alive.any()) else 0.0
        tracker.since_fired[idx] = 0
        logger.info("Resampled %d dead latents.", n)
        return n

    def _set_fitted(self, module: SparseAutoencoder, d_in: int, source_meta: dict, scale: float, seed: int | None) -> None:
        self.module_ = module
        self.n_features_in_ = int(d_in)
        self.dictionary_ = module.get_dictionary().detach()
        self.source_ = dict(source_meta)
        self.normalization_scale_ = float(scale)
        if seed is not None:
            self.random_state_ = int(seed)

    # ------------------------------------------------------------------ inference
    @property
    def _module_device(self) -> torch.device:
        return self.module_.W_enc.device

    def _iter_input(self, X: Any, batch_size: int | None, layer: str | None = None) -> tuple[Iterable[Tensor], str, torch.device | None]:
        """Batches of ``X`` in order; returns (batches, output kind, input device)."""
        self._check_fitted()
        name = type(self).__name__
        dev = self._module_device
        dtype = self.module_.W_enc.dtype
        bs = batch_size or max(self.batch_size, 4096)
        if is_store(X):
            src = as_batch_source(X, device=dev, dtype=dtype, layer=layer, name=name)
            self._check_features(src.n_features)
            return src.iter_batches(bs, shuffle=False), "tensor", torch.device("cpu")
        kind = "tensor" if isinstance(X, Tensor) else "numpy"
        x = to_tensor(X, name=name)
        self._check_features(x.shape[1])
        in_dev = x.device

        def gen() -> Iterable[Tensor]:
            for i in range(0, x.shape[0], bs):
                yield x[i : i + bs].to(device=dev, dtype=dtype)

        return gen(), kind, in_dev

    @staticmethod
    def _out(t: Tensor, kind: str, device: torch.device | None) -> Any:
        if kind == "numpy":
            return t.detach().cpu().numpy()
        return t.detach().to(device) if device is not None else t.detach()

    def transform(self, X: Any, *, sparse: bool = False, batch_size: int | None = None, layer: str | None = None) -> Any:
        """Concept codes of ``X``.

        Parameters
        ----------
        X : Tensor, array-like [n_samples, n_features] or ActivationStore
        sparse : bool
            Return :class:`~sae.sparse.SparseCodes` ``(indices [n, m], values [n, m])`` instead of
            a dense ``[n, n_concepts]`` matrix (``m`` = most active latents of any sample; padding
            has value 0). Use it for large dictionaries.
        batch_size : int, optional
            Rows encoded at a time (memory bound).
        layer : str, optional
            Layer of a multi-layer ActivationStore.

        Returns
        -------
        codes : ndarray or Tensor [n_samples, n_concepts], or SparseCodes
            Same container type as ``X`` (numpy in, numpy out; tensors return on their device).
        """
        batches, kind, in_dev = self._iter_input(X, batch_size, layer)
        self.module_.eval()
        outs: list = []
        with torch.no_grad():
            for xb in batches:
                if sparse:
                    outs.append(self.module_.encode_sparse(xb))
                else:
                    outs.append(self._encode_dense(xb))
        if sparse:
            m = max((o.indices.shape[1] for o in outs), default=0)
            idx = torch.cat([torch.nn.functional.pad(o.indices, (0, m - o.indices.shape[1])) for o in outs])
            val = torch.cat([torch.nn.functional.pad(o.values, (0, m - o.values.shape[1])) for o in outs])
            dev = in_dev if kind == "tensor" else torch.device("cpu")
            return SparseCodes(idx.to(dev), val.to(dev))
        return self._out(torch.cat(outs), kind, in_dev)

    def _encode_dense(self, xb: Tensor) -> Tensor:
        if self._sparse_transform:
            return self.module_.encode_sparse(xb).to_dense(self.n_concepts)
        return self.module_.encode(xb)

    def fit_transform(self, X: Any, y: None = None, **fit_params: Any) -> Any:
        """``fit(X).transform(X)``."""
        return self.fit(X, **fit_params).transform(X, layer=fit_params.get("layer"))

    def inverse_transform(self, codes: Any) -> Any:
        """Reconstruct inputs from codes.

        Parameters
        ----------
        codes : ndarray or Tensor [n_samples, n_concepts], or SparseCodes

        Returns
        -------
        X_hat : ndarray or Tensor [n_samples, n_features]
        """
        self._check_fitted()
        dev, dtype = self._module_device, self.module_.W_enc.dtype
        name = type(self).__name__
        with torch.no_grad():
            if isinstance(codes, SparseCodes):
                if codes.indices.numel() and int(codes.indices.max()) >= self.n_concepts:
                    raise ValueError(
                        f"codes contain latent index {int(codes.indices.max())}, but {name} has "
                        f"{self.n_concepts} concepts (indices 0..{self.n_concepts - 1})."
                    )
                sc = SparseCodes(codes.indices.to(dev), codes.values.to(device=dev, dtype=dtype))
                return self.module_.decode_sparse(sc).to(codes.values.device)
            kind = "tensor" if isinstance(codes, Tensor) else "numpy"
            z = to_tensor(codes, name=f"{name}.inverse_transform")
            if z.shape[1] != self.n_concepts:
                raise ValueError(
                    f"codes have {z.shape[1]} columns, but {name} has {self.n_concepts} concepts; pass the "
                    "output of transform()."
                )
            x_hat = self.module_.decode(z.to(device=dev, dtype=dtype))
            return self._out(x_hat, kind, z.device)

    def reconstruct(self, X: Any, *, batch_size: int | None = None, layer: str | None = None) -> Any:
        """``inverse_transform(transform(X))`` computed batch-wise without dense codes."""
        batches, kind, in_dev = self._iter_input(X, batch_size, layer)
        self.module_.eval()
        with torch.no_grad():
            out = torch.cat([self.module_(xb) for xb in batches])
        return self._out(out, kind, in_dev)

    def score(self, X: Any, y: None = None, *, batch_size: int | None = None, layer: str | None = None) -> float:
        """Explained variance ``1 - FVU`` of the reconstruction over the whole of ``X``.

        FVU uses per-feature means, with numerator and denominator accumulated over all samples
        (see :func:`sae.metrics.fvu`).
        """
        batches, _, _ = self._iter_input(X, batch_size, layer)
        self.module_.eval()
        acc = ReconstructionAccumulator()
        with torch.no_grad():
            for xb in batches:
                acc.update(xb, self.module_(xb))
        return 1.0 - acc.fvu()

    def to(self, device: Any) -> BaseSAE:
        """Move a fitted model to ``device`` (and set the ``device`` parameter)."""
        dev = resolve_device(device)
        self.device = str(dev) if not isinstance(device, torch.device) else device
        if hasattr(self, "module_"):
            self.module_.to(dev)
            self.dictionary_ = self.module_.get_dictionary().detach()
        return self

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        """The JSON configuration written next to the weights by :meth:`save`."""
        self._check_fitted()
        act = self.module_.activation
        return _json_safe({
            "format_version": _FORMAT_VERSION,
            "library": "conceptkit",
            "version": _library_version(),
            "architecture": self._architecture,
            "class": type(self).__name__,
            "d_in": self.n_features_in_,
            "n_concepts": self.n_concepts,
            "activation": {"name": act.name, **act.extra_config()},
            "params": self.get_params(),
            "normalization": {"method": self.normalize, "scale": self.normalization_scale_, "folded": True},
            "source": getattr(self, "source_", {}),
            "training_stats": getattr(self, "training_stats_", {}),
            **self._config_extra(),
        })

    def save(self, path: str | Path, *, format: str = "conceptkit", **kwargs: Any) -> Path:
        """Save to a directory: ``weights.safetensors`` + ``config.json`` (or the SAELens layout).

        Parameters
        ----------
        path : str or Path
            Target directory (created).
        format : {"conceptkit", "saelens"}
            ``"saelens"`` writes ``sae_weights.safetensors`` + ``cfg.json``.
        """
        from . import io

        return io.save(self, path, format=format, **kwargs)

    # ------------------------------------------------------------------ display
    def _repr_html_(self) -> str:
        rows = []
        defaults = {}
        try:
            defaults = type(self)().get_params()  # type: ignore[call-arg]
        except TypeError:
            pass
        for k, v in self.get_params().items():
            changed = k in defaults and defaults[k] != v
            style = " style='font-weight:bold'" if changed else ""
            rows.append(f"<tr{style}><td>{html.escape(k)}</td><td>{html.escape(repr(v))}</td></tr>")
        stats = ""
        if hasattr(self, "module_"):
            s = {"n_features_in_": self.n_features_in_, **getattr(self, "training_stats_", {})}
            stats = "".join(
                f"<tr><td>{html.escape(k)}</td><td>{html.escape(f'{v:.4g}' if isinstance(v, float) else str(v))}</td></tr>"
                for k, v in s.items()
            )
            status = "fitted"
        else:
            status = "not fitted"
        return (
            f"<div class='conceptkit-sae'><b>{html.escape(type(self).__name__)}</b> ({status})"
            "<table><thead><tr><th>parameter</th><th>value</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
            + (f"<table><thead><tr><th>fitted</th><th>value</th></tr></thead><tbody>{stats}</tbody></table>" if stats else "")
            + "</div>"
        )

