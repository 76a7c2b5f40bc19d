"""Plots of concept importance: the strategic cluster graph, fidelity bars, concept proximity.

The *strategic cluster graph* (Holistic-CRAFT / Lens) embeds the per-image importance vectors ``phi(u)`` in 2-D
and colours each image by its most important concept (``argmax phi``); only concepts that are the most important
one for at least ``min_count`` images get a colour (Lens uses 10), the others are grey. Clusters show the
"strategies" the model uses for a class. The embedding is UMAP when ``umap-learn`` is installed (the reference),
else t-SNE (scikit-learn), or PCA on request.

Every function takes ``ax=None`` and returns the matplotlib Axes.

Examples
--------
>>> import numpy as np
>>> phi = np.random.default_rng(0).normal(size=(40, 4))
>>> ax = cluster_graph(phi, ["a", "b", "c", "d"], embedding="pca", min_count=5)
>>> ax.get_title()
'Strategic cluster graph (pca)'
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = ["cluster_graph", "cluster_assignments", "embed_importances", "fidelity_bars", "concept_proximity"]

_EMBEDDINGS = ("auto", "umap", "tsne", "pca")


def _matrix(phi: Any) -> np.ndarray:
    P = phi.detach().cpu().double().numpy() if isinstance(phi, Tensor) else np.asarray(phi, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] == 0:
        raise ValueError(f"importances must be a non-empty [n, k] matrix; got shape {P.shape}.")
    if not np.isfinite(P).all():
        raise ValueError("importances contain NaN or infinite values.")
    return P


def embed_importances(phi: Any, *, embedding: str = "auto", random_state: int = 0) -> tuple[np.ndarray, str]:
    """2-D embedding of importance vectors ``[n, k]``.

    Parameters
    ----------
    phi
        Importances ``[n, k]``.
    embedding : {"auto", "umap", "tsne", "pca"}
        ``"auto"``: UMAP if ``umap-learn`` is importable, else t-SNE.
    random_state : int

    Returns
    -------
    coords : ndarray ``[n, 2]``
    used : str
        The embedding actually used.

    Examples
    --------
    >>> import numpy as np
    >>> embed_importances(np.eye(3), embedding="pca")[0].shape
    (3, 2)
    """
    if embedding not in _EMBEDDINGS:
        raise ValueError(f"embedding must be one of {_EMBEDDINGS}; got {embedding!r}.")
    P = _matrix(phi)
    n = P.shape[0]
    if embedding in ("auto", "umap"):
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if embedding == "umap":
                raise ImportError("embedding='umap' needs the umap-learn package; use embedding='tsne' or 'pca'.") from None
            embedding = "tsne"
        else:
            if n >= 4:
                reducer = umap.UMAP(n_components=2, random_state=random_state, n_neighbors=min(15, n - 1))
                return np.asarray(reducer.fit_transform(P)), "umap"
            embedding = "pca"
    if embedding == "tsne" and n >= 5:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=random_state).fit_transform(P)
        return np.asarray(coords), "tsne"
    # PCA (also the fallback for very few points)
    X = P - P.mean(0)
    if n < 2 or not np.any(X):
        return np.zeros((n, 2)), "pca"
    _, _, vt = np.linalg.svd(X, full_matrices=False)
    coords = X @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.c_[coords, np.zeros(n)]
    return coords, "pca"


def cluster_assignments(phi: Any, concept_names: Sequence[str], *, min_count: int = 10) -> pd.DataFrame:
    """Which concept is the most important one per image, and which concepts count as strategies.

    Returns
    -------
    DataFrame
        One row per concept with ``concept``, ``n_argmax`` (images where it is the most important concept) and
        ``strategy`` (``n_argmax >= min_count``), sorted by ``n_argmax``.

    Examples
    --------
    >>> import numpy as np
    >>> cluster_assignments(np.array([[1.0, 0.0], [2.0, 0.0]]), ["a", "b"], min_count=2).values.tolist()
    [['a', 2, True], ['b', 0, False]]
    """
    P = _matrix(phi)
    names = [str(c) for c in concept_names]
    if len(names) != P.shape[1]:
        raise ValueError(f"got {len(names)} concept names for importances with {P.shape[1]} columns.")
    counts = np.bincount(P.argmax(1), minlength=P.shape[1])
    df = pd.DataFrame({"concept": names, "n_argmax": counts.astype(int), "strategy": counts >= int(min_count)})
    return df.sort_values("n_argmax", ascending=False, kind="stable").reset_index(drop=True)


def cluster_graph(
    phi: Any,
    concept_names: Sequence[str],
    *,
    min_count: int = 10,
    embedding: str = "auto",
    random_state: int = 0,
    annotate: bool = True,
    ax: Any = None,
    title: str | None = None,
) -> Any:
    """Strategic cluster graph: 2-D embedding of per-image importances, coloured by the top concept.

    Parameters
    ----------
    phi
        Importances ``[n, k]`` (e.g. the images of one class).
    concept_names
        ``k`` names.
    min_count : int, default=10
        A concept gets a colour when it is the top concept of at least this many images (Lens: 10).
    embedding : {"auto", "umap", "tsne", "pca"}, default="auto"
    random_state : int, default=0
    annotate : bool, default=True
        Write each coloured concept's name at the centre of its points.
    ax : matplotlib Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib Axes

    Examples
    --------
    >>> # ax = cluster_graph(res.phi["gradient_input"][labels == c], res.concept_names)
    """
    import matplotlib.pyplot as plt

    P = _matrix(phi)
    names = [str(c) for c in concept_names]
    if len(names) != P.shape[1]:
        raise ValueError(f"got {len(names)} concept names for importances with {P.shape[1]} columns.")
    coords, used = embed_importances(P, embedding=embedding, random_state=random_state)
    top = P.argmax(1)
    counts = np.bincount(top, minlength=P.shape[1])
    strategies = [j for j in np.argsort(-counts, kind="stable") if counts[j] >= min_count]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab10" if len(strategies) <= 10 else "tab20")
    other = ~np.isin(top, strategies)
    if other.any():
        ax.scatter(coords[other, 0], coords[other, 1], s=14, c="#c8c8c8", label=f"other ({int(other.sum())})",
                   edgecolors="none")
    for i, j in enumerate(strategies):
        sel = top == j
        colour = cmap(i % cmap.N)
        ax.scatter(coords[sel, 0], coords[sel, 1], s=18, color=colour, label=f"{names[j]} ({int(sel.sum())})",
                   edgecolors="none")
        if annotate:
            cx, cy = coords[sel].mean(0)
            ax.annotate(names[j], (cx, cy), fontsize=8, ha="center", va="center", weight="bold",
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": colour, "alpha": 0.8})
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else f"Strategic cluster graph ({used})")
    if strategies or other.any():
        ax.legend(fontsize=7, loc="best", frameon=False, title="top concept", title_fontsize=7)
    return ax


def fidelity_bars(table: pd.DataFrame, *, metrics: Sequence[str] | None = None, ax: Any = None) -> Any:
    """Grouped bars of fidelity metrics per method (a :func:`~evaluation.fidelity.compare_methods` table).

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"c_deletion": [0.1, 0.5], "c_mufidelity": [1.0, 0.0]}, index=["gxi", "random"])
    >>> len(fidelity_bars(t).patches)
    4
    """
    import matplotlib.pyplot as plt

    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"table must be a DataFrame (ImportanceComparison.table); got {type(table).__name__}.")
    cols = list(metrics) if metrics is not None else [c for c in ("c_deletion", "c_insertion", "c_mufidelity")
                                                       if c in table.columns]
    missing = [c for c in cols if c not in table.columns]
    if missing or not cols:
        raise ValueError(f"table lacks metric columns {missing or ['c_deletion', 'c_insertion', 'c_mufidelity']}.")
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.9 * len(table) * len(cols) / 2, 3.2))
    x = np.arange(len(cols))
    w = 0.8 / max(1, len(table))
    for i, (method, row) in enumerate(table[cols].iterrows()):
        ax.bar(x + i * w - 0.4 + w / 2, row.to_numpy(dtype=float), width=w, label=str(method))
    labels = {"c_deletion": "C-Deletion (lower better)", "c_insertion": "C-Insertion (higher better)",
              "c_mufidelity": "C-muFidelity (higher better)"}
    ax.set_xticks(x)
    ax.set_xticklabels([labels.get(c, c) for c in cols], fontsize=8)
    ax.axhline(0, color="k", lw=0.6)
    ax.legend(fontsize=7, frameon=False, ncol=2)
    ax.set_title("Fidelity of concept importance")
    return ax


def concept_proximity(vectors: Any, concept_names: Sequence[str], *, ax: Any = None) -> Any:
    """Cosine similarity of concept vectors (a bank, NMF components, SAE atoms) as a heatmap.

    Examples
    --------
    >>> import numpy as np
    >>> ax = concept_proximity(np.eye(3), ["a", "b", "c"])
    >>> ax.get_title()
    'Concept proximity (cosine)'
    """
    import matplotlib.pyplot as plt

    V = _matrix(vectors)
    names = [str(c) for c in concept_names]
    if len(names) != V.shape[0]:
        raise ValueError(f"got {len(names)} names for {V.shape[0]} concept vectors.")
    Vn = V / np.maximum(np.linalg.norm(V, axis=1, keepdims=True), 1e-12)
    S = Vn @ Vn.T
    if ax is None:
        side = 2.5 + 0.22 * len(names)
        _, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(S, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)))
    ax.set_yticks(range(len(names)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_yticklabels(names, fontsize=6)
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title("Concept proximity (cosine)")
    return ax
