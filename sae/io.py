"""Saving and loading SAEs: our layout and SAELens' layout. Never unpickles.

Our layout (a directory)::

    weights.safetensors   # module tensors: W_enc [n, d], b_enc, b_dec, dictionary.*, activation.*
    config.json           # architecture, class, d_in, n_concepts, params, activation (k/threshold),
                          # normalization, source (model/layer/pooling), library version, stats
    history.csv           # training history (optional)

SAELens layout::

    sae_weights.safetensors   # W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, threshold
    cfg.json                  # architecture ("standard" | "topk" | "jumprelu"), d_in, d_sae, k, ...
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from .archetypal import ArchetypalSAE
from .base import BaseSAE, _json_safe, _library_version, resolve_device
from .batchtopk import BatchTopKSAE
from .checkpoint import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, read_json, read_safetensors
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .relu import ReLUSAE
from .structured import StructuredSAE
from .topk import TopKSAE

__all__ = ["ARCHITECTURES", "save", "load", "save_saelens", "load_saelens"]

logger = logging.getLogger(__name__)

ARCHITECTURES: dict[str, type[BaseSAE]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka": MatryoshkaSAE,
    "jumprelu": JumpReLUSAE,
    "relu": ReLUSAE,
    "archetypal": ArchetypalSAE,
    "structured": StructuredSAE,
}

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
HISTORY = "history.csv"
SL_WEIGHTS = "sae_weights.safetensors"
SL_CONFIG = "cfg.json"


# ============================================================================ our layout
def save(sae: BaseSAE, path: str | Path, *, format: str = "conceptkit", fused: bool = False) -> Path:
    """Save a fitted SAE to the directory ``path``.

    Parameters
    ----------
    sae : BaseSAE
        A fitted estimator.
    path : str or Path
        Directory (created if needed).
    format : {"conceptkit", "saelens"}
    fused : bool
        For :class:`~sae.ArchetypalSAE`: save a plain SAE with the fused dictionary.

    Returns
    -------
    Path of the directory.

    Examples
    --------
    >>> import torch, tempfile
    >>> sae = TopKSAE(n_concepts=32, top_k=2, batch_size=64, random_state=0).fit(torch.randn(128, 8))
    >>> d = save(sae, tempfile.mkdtemp())
    >>> load(d).transform(torch.randn(3, 8)).shape
    torch.Size([3, 32])
    """
    sae._check_fitted()
    if format not in ("conceptkit", "saelens"):
        raise ValueError(f"format must be 'conceptkit' or 'saelens'; got {format!r}.")
    if isinstance(sae, ArchetypalSAE) and (fused or format == "saelens"):
        sae = sae.to_fused()
    if format == "saelens":
        return save_saelens(sae, path)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v for k, v in sae.module_.state_dict().items()}
    cfg = sae.config()
    cfg["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
    if getattr(sae, "_fused_from", None):
        cfg["fused_from"] = sae._fused_from
    atomic_save_safetensors(path / WEIGHTS, tensors, metadata={"format": "conceptkit-sae"})
    atomic_write_json(path / CONFIG, cfg)
    hist = getattr(sae, "history_", None)
    if isinstance(hist, pd.DataFrame) and not hist.empty:
        atomic_write_bytes(path / HISTORY, hist.to_csv(index=False).encode("utf-8"))
    return path


def _require(cfg: dict, field: str, where: Path) -> Any:
    if field not in cfg:
        raise ValueError(f"{where}: missing field '{field}'.")
    return cfg[field]


def _check_tensors(module: torch.nn.Module, tensors: dict[str, Tensor], where: Path) -> dict[str, Tensor]:
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{where}: tensor '{missing[0]}' is missing (expected tensors: {sorted(expected)}).")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        raise ValueError(f"{where}: unexpected tensor '{unexpected[0]}' (expected tensors: {sorted(expected)}).")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{where}: tensor '{k}' has shape {tuple(tensors[k].shape)}, but the config implies {tuple(v.shape)}."
            )
    return tensors


def load(path: str | Path, *, device: str | torch.device | None = None) -> BaseSAE:
    """Load an SAE saved by :func:`save` (or an SAELens directory) as a fitted estimator.

    The class is chosen from ``architecture`` in ``config.json``. A directory with ``cfg.json`` and
    ``sae_weights.safetensors`` is read as SAELens' layout (see :func:`load_saelens`).

    Parameters
    ----------
    path : str or Path
        The directory.
    device : str or torch.device, optional
        Where to put the model (default: the saved ``device`` parameter if available here, else CPU).

    Raises
    ------
    FileNotFoundError
        If neither layout's files are present.
    ValueError
        If a file is corrupt or does not match its config (the message names file and field).
    """
    path = Path(path)
    if (path / CONFIG).is_file():
        return _load_ours(path, device)
    if (path / SL_CONFIG).is_file():
        return load_saelens(path, device=device)
    raise FileNotFoundError(
        f"{path} holds neither '{CONFIG}' + '{WEIGHTS}' (conceptkit) nor '{SL_CONFIG}' + '{SL_WEIGHTS}' (SAELens)."
    )


def _load_ours(path: Path, device: Any) -> BaseSAE:
    cfg_path = path / CONFIG
    cfg = read_json(cfg_path)
    arch = _require(cfg, "architecture", cfg_path)
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{cfg_path}: field 'architecture' is {arch!r}, which this version does not know; known: "
            f"{sorted(ARCHITECTURES)}."
        )
    cls = ARCHITECTURES[arch]
    d_in = _require(cfg, "d_in", cfg_path)
    n_concepts = _require(cfg, "n_concepts", cfg_path)
    params = _require(cfg, "params", cfg_path)
    for field, v in (("d_in", d_in), ("n_concepts", n_concepts)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{cfg_path}: field '{field}' must be a positive integer; got {v!r}.")
    if not isinstance(params, dict):
        raise ValueError(f"{cfg_path}: field 'params' must be an object; got {type(params).__name__}.")
    known = cls().get_params()
    unknown = sorted(set(params) - set(known))
    if unknown:
        warnings.warn(f"{cfg_path}: ignoring unknown parameters {unknown} (saved by another version).", stacklevel=3)
    est = cls(**{k: v for k, v in params.items() if k in known})
    if est.n_concepts != n_concepts:
        raise ValueError(f"{cfg_path}: field 'n_concepts' ({n_concepts}) disagrees with params.n_concepts ({est.n_concepts}).")
    dev = _target_device(device, params.get("device"))
    est.device = str(dev)
    tensors = read_safetensors(path / WEIGHTS)
    try:
        module = est._module_for_state(d_in, tensors)
    except ValueError as exc:
        raise ValueError(f"{path / WEIGHTS}: {exc}") from exc
    _check_tensors(module, tensors, path / WEIGHTS)
    module.load_state_dict(tensors, strict=True)
    module.to(dev)
    module.eval()
    norm = cfg.get("normalization", {}) or {}
    est._set_fitted(module, d_in, cfg.get("source", {}) or {}, float(norm.get("scale", 1.0)), None)
    est.training_stats_ = cfg.get("training_stats", {}) or {}
    if "calibration_l0" in est.training_stats_:
        est.calibration_l0_ = float(est.training_stats_["calibration_l0"])
    if cfg.get("fused_from"):
        est._fused_from = cfg["fused_from"]
    if (path / HISTORY).is_file():
        est.history_ = pd.read_csv(path / HISTORY)
    return est


def _target_device(device: Any, saved: Any) -> torch.device:
    if device is not None:
        return resolve_device(device)
    if saved is not None:
        try:
            return resolve_device(saved)
        except ValueError:
            logger.info("Saved device %r is not available here; loading on the CPU.", saved)
    return torch.device("cpu")


# ============================================================================ SAELens layout
def save_saelens(sae: BaseSAE, path: str | Path) -> Path:
    """Save in SAELens' layout: ``sae_weights.safetensors`` + ``cfg.json``.

    TopK -> ``"topk"`` (with ``k``); ReLU -> ``"standard"``; JumpReLU, BatchTopK and Matryoshka ->
    ``"jumprelu"`` with a per-latent ``threshold`` (SAELens' own convention for BatchTopK);
    archetypal SAEs are fused first. Structured SAEs cannot be represented.
    """
    sae._check_fitted()
    if isinstance(sae, ArchetypalSAE):
        sae = sae.to_fused()
    if isinstance(sae, StructuredSAE):
        raise NotImplementedError(
            "SAELens has no architecture with a low-rank latent part; save a StructuredSAE with format='conceptkit'."
        )
    m = sae.module_
    tensors = {
        "W_enc": m.W_enc.detach().T.contiguous(),
        "W_dec": m.get_dictionary().detach().contiguous(),
        "b_enc": m.b_enc.detach(),
        "b_dec": m.b_dec.detach(),
    }
    cfg: dict[str, Any] = {
        "d_in": sae.n_features_in_,
        "d_sae": sae.n_concepts,
        "dtype": str(m.W_enc.dtype).replace("torch.", ""),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if isinstance(sae, TopKSAE):
        cfg["architecture"] = "topk"
        cfg["k"] = int(sae.top_k)
        cfg["rescale_acts_by_decoder_norm"] = False
    elif isinstance(sae, ReLUSAE):
        cfg["architecture"] = "standard"
    elif isinstance(sae, (JumpReLUSAE, BatchTopKSAE)):
        cfg["architecture"] = "jumprelu"
        thr = m.activation.threshold.detach()
        tensors["threshold"] = thr.expand(sae.n_concepts).contiguous().clone()
    else:  # pragma: no cover - every registered class is handled above
        raise NotImplementedError(f"{type(sae).__name__} has no SAELens equivalent.")
    src = getattr(sae, "source_", {}) or {}
    cfg["metadata"] = {
        "model_name": src.get("model"),
        "hook_name": src.get("layer"),
        "pooling": src.get("pooling"),
        "conceptkit_architecture": sae._architecture,
        "conceptkit_version": _library_version(),
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(path / SL_WEIGHTS, tensors)
    atomic_write_json(path / SL_CONFIG, _json_safe(cfg))
    return path


def load_saelens(path: str | Path, *, device: str | torch.device | None = None) -> BaseSAE:
    """Load an SAE saved in SAELens' layout as a fitted estimator.

    Supported architectures: ``standard`` (-> :class:`~sae.ReLUSAE`), ``topk``
    (-> :class:`~sae.TopKSAE`), ``jumprelu`` (-> :class:`~sae.JumpReLUSAE`), ``batchtopk`` and
    ``matryoshka_batchtopk`` with a ``threshold`` (-> :class:`~sae.BatchTopKSAE`). A config with
    ``apply_b_dec_to_input = false`` is folded into ``b_enc``. Per-sample runtime normalisations
    (``constant_norm_rescale``, ``layer_norm``) cannot be represented and raise.
    """
    path = Path(path)
    cfg_path, w_path = path / SL_CONFIG, path / SL_WEIGHTS
    cfg = read_json(cfg_path)
    arch = _require(cfg, "architecture", cfg_path)
    d_in = _require(cfg, "d_in", cfg_path)
    d_sae = _require(cfg, "d_sae", cfg_path)
    norm = cfg.get("normalize_activations", "none") or "none"
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise NotImplementedError(
            f"{cfg_path}: field 'normalize_activations' is {norm!r}, a per-sample runtime normalisation that this "
            "loader cannot fold into the weights. Normalise inputs yourself before transform()."
        )
    tensors = read_safetensors(w_path)
    for name, shape in (("W_enc", (d_in, d_sae)), ("W_dec", (d_sae, d_in)), ("b_enc", (d_sae,)), ("b_dec", (d_in,))):
        if name not in tensors:
            raise ValueError(f"{w_path}: tensor '{name}' is missing.")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{w_path}: tensor '{name}' has shape {tuple(tensors[name].shape)}, but {SL_CONFIG} (d_in={d_in}, "
                f"d_sae={d_sae}) implies {shape}."
            )
    dev = _target_device(device, None)
    if arch == "standard":
        est: BaseSAE = ReLUSAE(d_sae)
    elif arch == "topk":
        est = TopKSAE(d_sae, int(_require(cfg, "k", cfg_path)))
    elif arch == "jumprelu":
        est = JumpReLUSAE(d_sae)
    elif arch in ("batchtopk", "matryoshka_batchtopk"):
        est = BatchTopKSAE(d_sae, float(cfg.get("k", 1)))
    else:
        raise NotImplementedError(
            f"{cfg_path}: field 'architecture' is {arch!r}; supported: 'standard', 'topk', 'jumprelu', 'batchtopk', "
            "'matryoshka_batchtopk'."
        )
    needs_thr = arch in ("jumprelu", "batchtopk", "matryoshka_batchtopk")
    if needs_thr:
        if "threshold" not in tensors:
            raise ValueError(f"{w_path}: tensor 'threshold' is missing (required for architecture {arch!r}).")
        if tuple(tensors["threshold"].shape) != (d_sae,):
            raise ValueError(f"{w_path}: tensor 'threshold' has shape {tuple(tensors['threshold'].shape)}, expected ({d_sae},).")
    module = est._make_module(d_in, None, torch.Generator().manual_seed(0))
    f32 = {k: v.to(torch.float32) for k, v in tensors.items()}
    b_enc = f32["b_enc"]
    if cfg.get("apply_b_dec_to_input", True) is False:
        b_enc = b_enc + f32["b_dec"] @ f32["W_enc"]
    with torch.no_grad():
        module.W_enc.copy_(f32["W_enc"].T)
        module.b_enc.copy_(b_enc)
        module.b_dec.copy_(f32["b_dec"])
        module.dictionary.W_dec.copy_(f32["W_dec"])
        if arch == "jumprelu":
            module.activation.log_threshold.copy_(torch.log(f32["threshold"].clamp_min(1e-30)))
        elif needs_thr:
            module.activation.threshold.copy_(f32["threshold"])
    module.to(dev).eval()
    est.device = str(dev)
    md = cfg.get("metadata", {}) or {}
    source = {k: v for k, v in (("model", md.get("model_name", cfg.get("model_name"))),
                               ("layer", md.get("hook_name", cfg.get("hook_name")))) if v is not None}
    est._set_fitted(module, d_in, source, 1.0, None)
    est.training_stats_ = {"imported_from": "saelens", "saelens_architecture": arch}
    return est
