"""Quality of a CLIP-style model on ConceptWorld, measured against the world's exact labels.

Three measurements (used by the training script's monitor, the tests and ``benchmarks/zoo_quality.py``):

* **zero-shot detection**: per concept column, AUROC of ``cosine(image, text(concept_prompt(c)))``
  against the ground truth;
* **caption -> image retrieval**: recall@k of each image's full caption among the images of its group
  (consecutive groups of ``group_size`` images); a hit is the captioned image itself in the top k;
* **linear probe**: per concept column, accuracy of an sklearn ``LogisticRegression`` fitted on the image
  features of one sample and scored on another.

Works with any ``(model, preprocess, tokenizer)`` triple with open_clip's interface.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .prompts import ZERO_SHOT_FAMILIES, concept_prompt

__all__ = ["encode_images", "encode_texts", "zero_shot_auroc", "retrieval_recall", "probe_accuracy", "clip_quality"]


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def encode_images(model, preprocess, images: np.ndarray | Sequence, *, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised ``model.encode_image`` features ``[n, d]`` (float32, CPU) of uint8 images ``[n, H, W, 3]``."""
    device = _model_device(model)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([preprocess(img) for img in images[i: i + batch_size]]).to(device)
        out.append(F.normalize(model.encode_image(x).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], *, batch_size: int = 512) -> torch.Tensor:
    """L2-normalised ``model.encode_text`` features ``[n, d]`` (float32, CPU)."""
    device = _model_device(model)
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i: i + batch_size])).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out)


def _auroc(scores: np.ndarray, truth: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if truth.all() or not truth.any():
        return float("nan")
    return float(roc_auc_score(truth, scores))


def zero_shot_auroc(
    model, tokenizer, image_features: torch.Tensor, concepts: pd.DataFrame, *,
    families: Sequence[str] = ZERO_SHOT_FAMILIES, template: str = "a photo of {}",
) -> pd.Series:
    """AUROC per concept of ``cosine(image, text(prompt))`` against the truth.

    Parameters
    ----------
    model, tokenizer
        open_clip-style text side.
    image_features
        Normalised image features ``[n, d]`` (from :func:`encode_images`).
    concepts
        The ground-truth concept DataFrame ``[n, n_concepts]``.
    families
        Concept families to score (see :func:`~concepts.zoo.prompts.concept_prompt`).
    template
        Prompt template.

    Returns
    -------
    pandas.Series
        AUROC indexed by concept name (NaN where a column is constant).
    """
    from concepts.world.vocabulary import Vocabulary

    v = Vocabulary()
    names = [c for c in concepts.columns if v.family(c) in families]
    text = encode_texts(model, tokenizer, [concept_prompt(c, template) for c in names])
    scores = (image_features @ text.T).numpy()
    return pd.Series(
        {c: _auroc(scores[:, j], concepts[c].to_numpy()) for j, c in enumerate(names)}, name="auroc", dtype=float
    )


def retrieval_recall(
    image_features: torch.Tensor, caption_features: torch.Tensor, *, k: int = 5, group_size: int = 100,
) -> float:
    """Caption -> image recall@k within consecutive groups of ``group_size`` (row i of both is one pair)."""
    n = len(image_features)
    if len(caption_features) != n:
        raise ValueError(f"got {n} image features but {len(caption_features)} caption features; pass one caption per image.")
    hits, total = 0, 0
    for start in range(0, n - group_size + 1, group_size):
        sim = caption_features[start: start + group_size] @ image_features[start: start + group_size].T
        top = sim.topk(min(k, group_size), dim=1).indices
        hits += int((top == torch.arange(group_size)[:, None]).any(dim=1).sum())
        total += group_size
    if total == 0:
        raise ValueError(f"need at least group_size={group_size} images for retrieval, got {n}.")
    return hits / total


def probe_accuracy(
    train_features: torch.Tensor | np.ndarray, train_concepts: pd.DataFrame,
    test_features: torch.Tensor | np.ndarray, test_concepts: pd.DataFrame, *, C: float = 1.0,
) -> pd.Series:
    """Per-concept test accuracy of a standardised ``LogisticRegression`` probe (constant columns: majority)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr = np.asarray(train_features, dtype=np.float64)
    xte = np.asarray(test_features, dtype=np.float64)
    scaler = StandardScaler().fit(xtr)
    xtr, xte = scaler.transform(xtr), scaler.transform(xte)
    acc = {}
    for c in test_concepts.columns:
        y, yt = train_concepts[c].to_numpy(), test_concepts[c].to_numpy()
        if y.all() or not y.any():
            acc[c] = float((yt == y[0]).mean())
            continue
        clf = LogisticRegression(C=C, max_iter=2000).fit(xtr, y)
        acc[c] = float((clf.predict(xte) == yt).mean())
    return pd.Series(acc, name="accuracy", dtype=float)


def clip_quality(
    model, preprocess, tokenizer, *, n: int = 2000, seed: int = 777, probe_seed: int = 778, world_seed: int = 0,
    image_size: int = 64, probe: bool = True,
) -> dict:
    """All three measurements on ``n`` fresh ConceptWorld images (sample seed ``seed``).

    Returns
    -------
    dict
        ``clip_zero_shot_auroc`` (mean over the zero-shot families), ``clip_retrieval_r5``,
        ``clip_probe_accuracy`` (mean over all concept columns; probe fitted on ``n`` images of
        ``probe_seed``), plus per-family means and the per-concept Series under ``"per_concept"``.

    Examples
    --------
    >>> from concepts import zoo
    >>> q = clip_quality(*zoo.load("conceptworld-clip"), n=200, probe=False)
    >>> q["clip_zero_shot_auroc"] > 0.8
    True
    """
    from concepts.world import ConceptWorld
    from concepts.world.vocabulary import Vocabulary

    world = ConceptWorld(seed=world_seed, image_size=image_size)
    batch = world.sample(n, seed=seed)
    feats = encode_images(model, preprocess, batch.images)
    auroc = zero_shot_auroc(model, tokenizer, feats, batch.concepts)
    caps = encode_texts(model, tokenizer, batch.captions)
    result = {
        "clip_zero_shot_auroc": float(auroc.mean()),
        "clip_retrieval_r5": retrieval_recall(feats, caps, k=5, group_size=min(100, n)),
        "clip_retrieval_r1": retrieval_recall(feats, caps, k=1, group_size=min(100, n)),
    }
    v = Vocabulary()
    for fam in ZERO_SHOT_FAMILIES:
        result[f"clip_zero_shot_auroc_{fam}"] = float(auroc[[c for c in auroc.index if v.family(c) == fam]].mean())
    cs = zero_shot_auroc(model, tokenizer, feats, batch.concepts, families=("colour_shape",))
    result["clip_zero_shot_auroc_colour_shape"] = float(cs.mean())
    per_concept = {"auroc": pd.concat([auroc, cs])}
    if probe:
        ptrain = world.sample(n, seed=probe_seed)
        pfeats = encode_images(model, preprocess, ptrain.images)
        acc = probe_accuracy(pfeats, ptrain.concepts, feats, batch.concepts)
        result["clip_probe_accuracy"] = float(acc.mean())
        result["clip_probe_accuracy_min"] = float(acc.min())
        per_concept["probe_accuracy"] = acc
    result["per_concept"] = pd.DataFrame(per_concept)
    return result
