"""Evaluation protocols that train or run models: seed stability, the supervised-probe upper
bound, and downstream performance recovered when a model runs on SAE reconstructions.

The formulas they rely on live in :mod:`sae.metrics`.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from .base import BaseSAE
from .metrics import auroc_per_latent, hungarian_mcc

__all__ = ["seed_stability", "probe_upper_bound", "downstream_recovery"]


# ============================================================================ seed stability
def seed_stability(
    estimator: BaseSAE,
    X: Any,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    shared_init: bool = False,
    return_models: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, list[BaseSAE]]:
    """Agreement of dictionaries trained with different seeds (Hungarian MCC of every pair).

    With ``shared_init=False`` every run has its own initialisation (``init_random_state = seed``):
    this measures *stability*. With ``shared_init=True`` all runs start from the initialisation
    of ``seeds[0]`` and differ only in data order: this measures how much training keeps a
    common start (*stabilisation*, the confound raised by "Ablating Archetypes"). For both, the
    MCC of the initial dictionaries is reported next to the final one.

    Parameters
    ----------
    estimator : BaseSAE
        Unfitted template (cloned for every seed).
    X : array-like, Tensor or ActivationStore
    seeds : sequence of int
    shared_init : bool
    return_models : bool
        Also return the fitted models.

    Returns
    -------
    DataFrame with one row per pair: ``seed_a``, ``seed_b``, ``mcc_init``, ``mcc_final``.

    Examples
    --------
    >>> import torch
    >>> from sae import TopKSAE
    >>> X = torch.randn(256, 8)
    >>> df = seed_stability(TopKSAE(n_concepts=16, top_k=2, batch_size=64), X, seeds=(0, 1))
    >>> list(df.columns)
    ['seed_a', 'seed_b', 'mcc_init', 'mcc_final']
    """
    if len(seeds) < 2:
        raise ValueError(f"seed_stability needs at least two seeds; got {list(seeds)}.")
    models, inits = [], []
    for s in seeds:
        est = clone(estimator).set_params(random_state=int(s), init_random_state=int(seeds[0] if shared_init else s))
        inits.append(est.initial_dictionary(X))
        models.append(est.fit(X))
    rows = []
    for (i, a), (j, b) in itertools.combinations(enumerate(seeds), 2):
        rows.append({
            "seed_a": a, "seed_b": b,
            "mcc_init": hungarian_mcc(inits[i], inits[j]),
            "mcc_final": hungarian_mcc(models[i].dictionary_.cpu(), models[j].dictionary_.cpu()),
        })
    df = pd.DataFrame(rows)
    df.attrs["shared_init"] = shared_init
    return (df, models) if return_models else df


# ============================================================================ probe upper bound
def _labels_frame(concepts: Any, n: int) -> pd.DataFrame:
    if isinstance(concepts, pd.DataFrame):
        df = concepts.reset_index(drop=True)
    else:
        arr = np.asarray(concepts)
        if arr.ndim == 1:
            arr = arr[:, None]
        df = pd.DataFrame(arr, columns=[f"concept_{i}" for i in range(arr.shape[1])])
    if len(df) != n:
        raise ValueError(f"concepts have {len(df)} rows but X has {n}; pass one label row per sample.")
    return df


def probe_upper_bound(
    sae: BaseSAE,
    X: Any,
    concepts: Any,
    *,
    test_size: float = 0.3,
    random_state: int = 0,
    C: float = 1.0,
    min_positives: int = 5,
) -> pd.DataFrame:
    """Per labelled concept: the best SAE latent against a supervised linear probe (upper bound).

    Protocol (after Liu et al., "I Predict Therefore I Am"): split the samples (stratified per
    concept); on the training part pick the latent with the highest AUROC for the concept and fit a
    logistic-regression probe on the (standardised) activations; on the held-out part report the
    latent's AUROC and Pearson correlation with the label, the probe's AUROC, and the Pearson
    correlation between the latent and the probe's logit (the paper's alignment measure).
    A monosemantic latent for the concept gets close to the probe; the probe is the ceiling.

    Parameters
    ----------
    sae : BaseSAE
        A fitted SAE.
    X : array-like or Tensor [n, d]
        Activations the SAE was trained for.
    concepts : DataFrame of bools or array [n, c]
        Binary concept labels (column names are used as concept names).
    test_size : float
    random_state : int
    C : float
        Inverse regularisation of the probe.
    min_positives : int
        Concepts with fewer positives (or negatives) in either split are skipped.

    Returns
    -------
    DataFrame indexed by concept with columns ``n_pos``, ``best_latent``, ``latent_auroc``,
    ``latent_corr``, ``probe_auroc``, ``latent_probe_corr``, ``auroc_gap``
    (``probe_auroc - latent_auroc``).

    Examples
    --------
    >>> df = probe_upper_bound(sae, feats, batch.concepts)  # doctest: +SKIP
    >>> df[["latent_auroc", "probe_auroc"]]  # doctest: +SKIP
    """
    x = X.detach().cpu().numpy() if isinstance(X, Tensor) else np.asarray(X)
    labels = _labels_frame(concepts, x.shape[0])
    codes = sae.transform(torch.as_tensor(x, dtype=torch.float32)).cpu().numpy()
    rows = []
    idx = np.arange(x.shape[0])
    for name in labels.columns:
        y = labels[name].to_numpy().astype(bool)
        if y.sum() < 2 * min_positives or (~y).sum() < 2 * min_positives:
            continue
        tr, te = train_test_split(idx, test_size=test_size, random_state=random_state, stratify=y)
        if min(y[tr].sum(), (~y[tr]).sum(), y[te].sum(), (~y[te]).sum()) < min_positives:
            continue
        au_tr = auroc_per_latent(codes[tr], y[tr])
        j = int(np.argmax(au_tr))
        z_te = codes[te, j]
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
        probe.fit(x[tr], y[tr])
        logit = probe.decision_function(x[te])
        latent_auroc = float(roc_auc_score(y[te], z_te))
        rows.append({
            "concept": name,
            "n_pos": int(y.sum()),
            "best_latent": j,
            "latent_auroc": latent_auroc,
            "latent_corr": _pearson(z_te, y[te].astype(float)),
            "probe_auroc": float(roc_auc_score(y[te], logit)),
            "latent_probe_corr": _pearson(z_te, logit),
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["n_pos", "best_latent", "latent_auroc", "latent_corr", "probe_auroc",
                                     "latent_probe_corr", "auroc_gap"])
    df["auroc_gap"] = df["probe_auroc"] - df["latent_auroc"]
    return df.set_index("concept")


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sa, sb = a.std(), b.std()
    if sa == 0 or sb == 0:
        return 0.0
    return float(((a - a.mean()) * (b - b.mean())).mean() / (sa * sb))


# ============================================================================ downstream recovery
def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, dict):
        return batch.get("inputs", batch.get("pixel_values", batch.get("images"))), batch.get("labels", batch.get("targets"))
    return batch, None


def _logits(out: Any) -> Tensor:
    from concepts.hooks import primary_output

    return out if isinstance(out, Tensor) else primary_output(out)


def downstream_recovery(
    model: torch.nn.Module,
    layer: str,
    sae: BaseSAE,
    data: Iterable[Any],
    *,
    metric: str | Callable[[Tensor, Any], float] = "kl",
    ablation: str = "zero",
    channel_dim: int = -1,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Downstream performance recovered when ``layer``'s output is replaced by SAE reconstructions.

    The model runs three times on every batch: clean, with the layer's output replaced by
    ``sae`` reconstructions (through :func:`concepts.hooks.intervene`), and with the output ablated
    (zeros, or the mean activation over ``data`` for ``ablation="mean"``). Then

    * ``metric="kl"`` (no labels needed): ``recovered = (KL_abl - KL_sae) / KL_abl`` with
      ``KL = E[KL(softmax(clean) || softmax(edited))]`` over samples (SAELens' ``kl_div_score``);
    * ``metric="accuracy"`` or a callable ``metric(outputs, targets) -> float`` (higher is
      better, averaged over batches weighted by size): ``recovered = (m_sae - m_abl) /
      (m_clean - m_abl)`` ("CE loss recovered" with the sign flipped for a score).

    Parameters
    ----------
    model : nn.Module
    layer : str
        Name of the submodule whose (primary) output the SAE was trained on.
    sae : BaseSAE
        A fitted SAE whose ``n_features_in_`` matches the layer's channel count.
    data : iterable
        Batches: a Tensor of inputs, ``(inputs, targets)`` or a dict with ``inputs``/``labels``.
    metric : {"kl", "accuracy"} or callable
    ablation : {"zero", "mean"}
    channel_dim : int
        Axis of the layer output that holds the SAE's features (``1`` for conv maps [B, C, H, W]).
    device : str or torch.device, optional
        Where to run the model (default: where its parameters are).

    Returns
    -------
    dict with ``clean``, ``sae``, ``ablated`` (the metric in each condition; for ``"kl"`` the
    divergence from clean) and ``recovered``.

    Examples
    --------
    >>> downstream_recovery(clf, "encoder.layer3", sae, loader, metric="accuracy")  # doctest: +SKIP
    """
    from concepts.hooks import intervene, record

    if metric not in ("kl", "accuracy") and not callable(metric):
        raise ValueError(f"metric must be 'kl', 'accuracy' or a callable(outputs, targets) -> float; got {metric!r}.")
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation must be 'zero' or 'mean'; got {ablation!r}.")
    sae._check_fitted()
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu")
    )
    batches = list(data)
    was_training = model.training
    model.eval()
    d = sae.n_features_in_

    def to_rows(t: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        moved = t.movedim(channel_dim, -1)
        if moved.shape[-1] != d:
            raise ValueError(
                f"Layer {layer!r} outputs {moved.shape[-1]} features along channel_dim={channel_dim}, but the SAE "
                f"expects {d}. Check layer and channel_dim."
            )
        return moved.reshape(-1, d), moved.shape

    def from_rows(rows: Tensor, shape: tuple[int, ...], like: Tensor) -> Tensor:
        return rows.reshape(shape).movedim(-1, channel_dim).to(dtype=like.dtype, device=like.device)

    mean_act: Tensor | None = None
    with torch.no_grad():
        if ablation == "mean":
            total, count = None, 0
            for batch in batches:
                inputs, _ = _split_batch(batch)
                with record(model, [layer]) as rec:
                    model(inputs.to(dev))
                for out in rec[layer]:
                    rows, _ = to_rows(out)
                    s = rows.double().sum(0)
                    total = s if total is None else total + s
                    count += rows.shape[0]
            mean_act = (total / max(count, 1)).float()

        def sae_edit(t: Tensor) -> Tensor:
            rows, shape = to_rows(t)
            m = sae.module_
            rec_rows = m(rows.to(device=m.W_enc.device, dtype=m.W_enc.dtype))
            return from_rows(rec_rows, shape, t)

        def ablate_edit(t: Tensor) -> Tensor:
            if mean_act is None:
                return torch.zeros_like(t)
            rows, shape = to_rows(t)
            return from_rows(mean_act.to(rows.device).expand_as(rows), shape, t)

        sae._check_fitted()
        sae.module_.eval()
        sums = {"clean": 0.0, "sae": 0.0, "ablated": 0.0}
        n_total = 0
        for batch in batches:
            inputs, targets = _split_batch(batch)
            inputs = inputs.to(dev)
            clean = _logits(model(inputs)).float()
            with intervene(model, {layer: sae_edit}):
                recon = _logits(model(inputs)).float()
            with intervene(model, {layer: ablate_edit}):
                abl = _logits(model(inputs)).float()
            b = clean.shape[0]
            n_total += b
            if metric == "kl":
                logp = torch.log_softmax(clean, -1)
                for key, out in (("sae", recon), ("ablated", abl)):
                    kl = (logp.exp() * (logp - torch.log_softmax(out, -1))).sum(-1)
                    sums[key] += float(kl.reshape(b, -1).mean(-1).sum())
            else:
                if targets is None and metric == "accuracy":
                    raise ValueError("metric='accuracy' needs targets: pass batches of (inputs, targets).")
                fn = _accuracy if metric == "accuracy" else metric
                for key, out in (("clean", clean), ("sae", recon), ("ablated", abl)):
                    sums[key] += float(fn(out, targets)) * b
    model.train(was_training)
    res = {k: v / max(n_total, 1) for k, v in sums.items()}
    if metric == "kl":
        res["recovered"] = (res["ablated"] - res["sae"]) / res["ablated"] if res["ablated"] > 0 else float("nan")
    else:
        den = res["clean"] - res["ablated"]
        res["recovered"] = (res["sae"] - res["ablated"]) / den if den != 0 else float("nan")
    return res


def _accuracy(out: Tensor, targets: Any) -> float:
    t = torch.as_tensor(targets, device=out.device)
    return float((out.argmax(-1) == t).float().mean())
