"""The main job on the built-in default (``make demo`` / ``conceptkit demo``).

What it does, end to end and offline:

1. renders a ConceptWorld sample (images, concept labels, captions, classes);
2. extracts activations of the built-in CLIP's image tower (a middle stage, mean-pooled over positions,
   and the final image embedding) into an on-disk :class:`~concepts.store.ActivationStore`;
3. measures what the stored activations encode: per concept, the held-out accuracy and AUROC of a linear
   probe (the ceiling any concept method built on these features can reach);
4. writes a self-contained HTML report with the sample sheet, the tables and the plots.

The full audit (discovered concepts, blindspots, importance, erasure) is ``conceptkit audit``
(:func:`evaluation.audit.audit`), which ``make demo`` runs; this lighter job stays as ``conceptkit demo``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def probe_concepts(features: np.ndarray, concepts: pd.DataFrame, *, seed: int = 0,
                   test_fraction: float = 0.3) -> pd.DataFrame:
    """Held-out linear-probe accuracy and AUROC per concept column.

    Parameters
    ----------
    features
        ``[n, d]`` features.
    concepts
        Boolean concept table ``[n, k]`` (ConceptWorld labels).
    seed
        Seed of the train/test split.
    test_fraction
        Share of rows held out.

    Returns
    -------
    pandas.DataFrame
        One row per concept: ``concept``, ``frequency``, ``accuracy``, ``majority`` (accuracy of always
        predicting the majority value), ``auroc``. Concepts constant in the training split are skipped.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> x = np.r_[np.zeros((50, 2)), np.ones((50, 2))] + np.random.default_rng(0).normal(0, .1, (100, 2))
    >>> df = probe_concepts(x, pd.DataFrame({"on": [False] * 50 + [True] * 50}))
    >>> float(df.loc[0, "accuracy"])
    1.0
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    if len(features) != len(concepts):
        raise ValueError(f"features has {len(features)} rows but concepts has {len(concepts)}; pass one row per image.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(features))
    n_test = max(1, int(round(test_fraction * len(features))))
    test, train = order[:n_test], order[n_test:]
    scaler = StandardScaler().fit(features[train])
    xtr, xte = scaler.transform(features[train]), scaler.transform(features[test])
    rows = []
    for name in concepts.columns:
        y = concepts[name].to_numpy(dtype=bool)
        if y[train].all() or not y[train].any():
            continue
        clf = LogisticRegression(max_iter=300, C=1.0).fit(xtr, y[train])
        p = clf.predict_proba(xte)[:, 1]
        auroc = roc_auc_score(y[test], p) if 0 < y[test].sum() < len(test) else np.nan
        rows.append({
            "concept": name,
            "frequency": float(y.mean()),
            "accuracy": float(((p > 0.5) == y[test]).mean()),
            "majority": float(max(y[test].mean(), 1 - y[test].mean())),
            "auroc": float(auroc),
        })
    return pd.DataFrame(rows)


def run_demo(out: str | Path = "reports/demo", *, n: int = 1024, seed: int = 0, device: str = "cpu",
             progress: bool = True) -> Path:
    """Run the demo job and write ``out/index.html``; returns the report path.

    Examples
    --------
    >>> run_demo("reports/demo", n=256)  # doctest: +SKIP
    PosixPath('reports/demo/index.html')
    """
    import matplotlib.pyplot as plt

    from concepts.extractor import ConceptExtractor
    from concepts.world import ConceptWorld
    from concepts.world.vocabulary import Vocabulary
    from concepts.zoo import load

    from .report import Report

    if n < 64:
        raise ValueError(f"the demo needs at least 64 images to fit and test probes, got n={n}.")
    out = Path(out)
    world = ConceptWorld(seed=seed, image_size=64)
    batch = world.sample(n, seed=seed)
    logger.info("rendered %d ConceptWorld images", n)

    clip = load("conceptworld-clip", device=device)
    model, preprocess = clip.model, clip.preprocess
    mid = _middle_layer(model)
    extractor = ConceptExtractor(
        model, [mid, ""], pooling={mid: "mean", "": "cls"}, preprocess=preprocess,
        forward_fn=lambda m, x: m.encode_image(x), device=device, batch_size=128,
        model_name="conceptworld-clip", progress=progress,
    )
    store = extractor.extract(batch.images, out / "activations", overwrite=True,
                              metadata={"dataset": "ConceptWorld", "seed": seed, "n": n})
    logger.info("stored activations in %s", store.path if hasattr(store, "path") else out / "activations")

    vocab = Vocabulary()
    family_of = {c: vocab.family(c) for c in batch.concepts.columns}
    tables = {}
    for layer, label in ((mid, f"block {mid}"), ("", "image embedding")):
        feats = store.read(layer).float().numpy()
        df = probe_concepts(feats, batch.concepts, seed=seed)
        df.insert(1, "family", df["concept"].map(family_of))
        df.insert(0, "layer", label)
        tables[label] = df
    probes = pd.concat(tables.values(), ignore_index=True)
    by_family = probes.groupby(["layer", "family"], sort=False)[["accuracy", "majority", "auroc"]].mean().reset_index()

    report = Report("conceptkit demo: ConceptWorld through the built-in CLIP",
                    meta={"seed": seed, "images": n, "device": device})
    report.text(
        "This demo renders the ground-truth world, extracts activations from a model into an on-disk "
        "ActivationStore, and measures what those activations encode against the exact concept labels. The full "
        "audit (concepts, blindspots, importance, erasure) is `conceptkit audit` (make demo).", note=True)
    report.heading("ConceptWorld sample")
    fig, ax = plt.subplots(figsize=(10, 2.8))
    batch.sheet(16, 8, ax=ax)
    report.figure(fig, caption="16 images of the sample; captions below")
    report.table(pd.DataFrame({"caption": batch.captions[:16], "class": batch.class_label_names[:16]}))
    freq = batch.concepts.mean().rename("frequency").reset_index().rename(columns={"index": "concept"})
    classes = pd.Series(batch.class_label_names).value_counts().rename_axis("class").reset_index(name="images")
    report.heading("Ground truth").table(classes, name="classes")
    report.table(freq, name="concept_frequency", max_rows=60)

    report.heading("What the stored activations encode")
    report.text(f"Activation store: {len(store)} rows per layer, layers {store.layers}, in {out / 'activations'}.")
    report.table(by_family, name="probe_by_family")
    fig, ax = plt.subplots(figsize=(7, 3))
    pivot = by_family.pivot(index="family", columns="layer", values="accuracy")
    pivot.plot.bar(ax=ax)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("held-out probe accuracy")
    ax.set_title("linear-probe accuracy per concept family")
    report.figure(fig)
    report.table(probes, name="probe_per_concept", max_rows=120)
    path = report.save(out)
    return path


def _middle_layer(model) -> str:
    """A middle layer of an open_clip image tower: the middle transformer block of a ViT, or ``layer3`` of a
    ModifiedResNet (the built-in CLIP's tower)."""
    from concepts.hooks import available_layers

    blocks = [n for n in available_layers(model, contains="visual.transformer.resblocks.") if n.count(".") == 3]
    if blocks:
        return blocks[len(blocks) // 2]
    stages = [n for n in available_layers(model, contains="visual.layer") if n.count(".") == 1]
    if stages:
        return stages[max(0, len(stages) - 2)]
    raise ValueError(
        "the model's image tower has neither visual.transformer.resblocks.* (ViT) nor visual.layerN (ResNet) "
        "layers; the demo expects an open_clip CLIP."
    )
