"""Concept-to-pixel checks: are concepts read from the right pixels?

For a model that maps pixels to concept scores (the concept predictor of a CBM, the ConceptWorld detector, any
``nn.Module`` ``images [n, 3, H, W] -> [n, k]``), :func:`concept_input_attribution` computes per-concept input
attributions with captum (integrated gradients, by default inside a SmoothGrad noise tunnel, or plain saliency) and
:func:`pixel_check` scores them against ConceptWorld's ground-truth object masks:

* **pointing game** (Zhang et al. 2016): a hit when the pixel of largest attribution lies inside the concept's mask
  (dilated by ``tolerance`` pixels);
* **mass in mask**: the fraction of the (positive, channel-summed) attribution that falls inside the mask, to be
  read against ``mask_area`` (the fraction of the image the mask covers: the chance level).

Baselines matter for integrated gradients: with a black baseline every textured background pixel differs from the
baseline; a baseline equal to the plain background colour of ConceptWorld (``28 / 255``, an "empty scene") puts
attribution only on what differs from an empty scene (objects and texture).

The mask of a concept in an image (:func:`concept_masks`) is the union of the instance masks of the objects that
carry it: colours, shapes, colour-shape pairs, sizes and positions (an object in the left column carries ``left``).
Backgrounds are scored on the pixels outside every object and ``count=n`` on the union of all objects. Only images
where the concept is present are scored.

Examples
--------
>>> import torch, torch.nn as nn
>>> from concepts.world import ConceptWorld
>>> batch = ConceptWorld(seed=0, image_size=32).sample(4, seed=0)
>>> net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
>>> df = pixel_check(net, batch, concepts=["red", "blue"], concept_names=["red", "blue"], method="saliency")
>>> sorted(df.columns)[:4]
['concept', 'family', 'hit', 'image']
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "concept_input_attribution",
    "concept_masks",
    "mask_scores",
    "pixel_check",
    "summarize_pixel_checks",
    "PIXEL_METHODS",
    "OBJECT_FAMILIES",
]

PIXEL_METHODS: tuple[str, ...] = ("integrated_gradients", "saliency")
"""Input-attribution methods (``noise_tunnel=True`` wraps either in captum's SmoothGrad ``NoiseTunnel``)."""

OBJECT_FAMILIES: tuple[str, ...] = ("colour", "shape", "colour_shape", "size", "position")
"""Concept families whose mask is a set of objects."""


def _images_tensor(images: Any) -> Tensor:
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3:
            return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise TypeError(
            "images must be float tensors [n, C, H, W] (model-ready) or uint8 arrays [n, H, W, 3]; got "
            f"{type(images).__name__}{'' if not hasattr(images, 'shape') else ' of shape ' + str(tuple(images.shape))}."
        )
    return images


def concept_input_attribution(
    concept_model: nn.Module | Callable[[Tensor], Tensor],
    images: Any,
    concept: int | Sequence[int] | Tensor,
    *,
    method: str = "integrated_gradients",
    noise_tunnel: bool = True,
    baseline: float | Tensor = 0.0,
    n_steps: int = 32,
    nt_samples: int = 8,
    stdevs: float = 0.1,
    seed: int = 0,
    batch_size: int = 32,
    aggregate: str = "positive",
) -> Tensor:
    """Per-pixel attribution of one concept score per image (captum), summed over colour channels.

    Parameters
    ----------
    concept_model
        ``images [b, C, H, W] -> concept scores [b, k]`` (an ``nn.Module`` or a differentiable callable).
    images
        Model-ready float images ``[n, C, H, W]`` (or uint8 ``[n, H, W, 3]``, scaled to [0, 1]).
    concept
        Concept column explained: one index for all images or one per image ``[n]``.
    method : {"integrated_gradients", "saliency"}
        captum ``IntegratedGradients`` (from ``baseline``) or ``Saliency``.
    noise_tunnel : bool, default=True
        Wrap the method in captum's ``NoiseTunnel`` (SmoothGrad: average over ``nt_samples`` copies with Gaussian
        noise of std ``stdevs``), seeded by ``seed``.
    baseline : float or Tensor, default=0.0
        Integrated-gradients baseline (0 = black image).
    n_steps, nt_samples, stdevs, seed, batch_size
        Method settings; ``batch_size`` images per captum call.
    aggregate : {"positive", "abs", "signed"}, default="positive"
        How channels are combined: sum of positive parts (evidence *for* the concept), of absolute values, or signed
        sum. Saliency is already an absolute gradient.

    Returns
    -------
    Tensor ``[n, H, W]`` (float32, CPU)

    Examples
    --------
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    >>> concept_input_attribution(net, torch.rand(2, 3, 4, 4), 1, method="saliency", noise_tunnel=False).shape
    torch.Size([2, 4, 4])
    """
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    if method not in PIXEL_METHODS:
        raise ValueError(f"method must be one of {PIXEL_METHODS}; got {method!r}.")
    if aggregate not in ("abs", "positive", "signed"):
        raise ValueError(f"aggregate must be 'abs', 'positive' or 'signed'; got {aggregate!r}.")
    if not callable(concept_model):
        raise TypeError(f"concept_model must be an nn.Module or callable images -> [b, k]; got {type(concept_model).__name__}.")
    for name, v in (("n_steps", n_steps), ("nt_samples", nt_samples), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}.")
    x = _images_tensor(images)
    n = x.shape[0]
    if isinstance(concept, Tensor):
        concept = concept.tolist()
    tgt = torch.full((n,), int(concept), dtype=torch.long) if isinstance(concept, (int, np.integer)) else \
        torch.as_tensor(list(concept), dtype=torch.long)
    if tgt.shape != (n,):
        raise ValueError(f"concept must be one index or one per image ({n}); got {tgt.numel()} values.")
    dev = next((p.device for p in concept_model.parameters()), x.device) if isinstance(concept_model, nn.Module) \
        else x.device
    was = concept_model.training if isinstance(concept_model, nn.Module) else None
    if isinstance(concept_model, nn.Module):
        concept_model.eval()
    base = Saliency(concept_model) if method == "saliency" else IntegratedGradients(concept_model)
    explainer = NoiseTunnel(base) if noise_tunnel else base
    out = []
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(int(seed))
            for lo in range(0, n, batch_size):
                xb = x[lo:lo + batch_size].to(dev).detach().clone().requires_grad_(True)
                tb = tgt[lo:lo + batch_size].to(dev)
                kw: dict[str, Any] = {"target": tb}
                if method == "integrated_gradients":
                    b = baseline if isinstance(baseline, Tensor) else torch.full_like(xb, float(baseline))
                    rows = len(xb) * (nt_samples if noise_tunnel else 1)  # examples IG sees per call
                    kw.update(baselines=b.to(xb) if b.shape == xb.shape else b.to(xb).expand_as(xb), n_steps=n_steps,
                              internal_batch_size=max(rows, 8 * batch_size))
                else:
                    kw.update(abs=aggregate != "signed")
                if noise_tunnel:
                    kw.update(nt_type="smoothgrad", nt_samples=nt_samples, stdevs=float(stdevs),
                              nt_samples_batch_size=nt_samples)
                with torch.enable_grad():
                    a = explainer.attribute(xb, **kw)
                a = a.detach()
                if aggregate == "abs":
                    a = a.abs().sum(1)
                elif aggregate == "positive":
                    a = a.clamp_min(0).sum(1)
                else:
                    a = a.sum(1)
                out.append(a.float().cpu())
    finally:
        if isinstance(concept_model, nn.Module) and was:
            concept_model.train()
    return torch.cat(out)


def concept_masks(batch: Any, concept: str, *, size: int | None = None) -> np.ndarray:
    """Ground-truth pixel mask of a concept in every image of a ConceptWorld batch.

    Parameters
    ----------
    batch : concepts.world.ConceptBatch
    concept : str
        A concept column (``"red"``, ``"circle"``, ``"red circle"``, ``"small"``, ``"left"``, ``"stripes"``,
        ``"count=2"``).
    size : int, optional
        Resize the masks to ``size x size`` (a pixel is in the mask when at least half of it is covered).

    Returns
    -------
    ndarray bool ``[n, H, W]`` (all False in images without the concept).

    Examples
    --------
    >>> from concepts.world import ConceptWorld
    >>> b = ConceptWorld(seed=0, image_size=32).sample(3, seed=0)
    >>> m = concept_masks(b, b.objects.colour[0])
    >>> bool(m[0].any())
    True
    """
    from concepts.world.render import GRID
    from concepts.world.vocabulary import Vocabulary

    if concept not in batch.concepts.columns:
        raise ValueError(f"unknown concept {concept!r}; expected one of the batch's concept columns "
                         f"({list(batch.concepts.columns[:6])} ...).")
    fam = Vocabulary().family(concept)
    n, _, H, W = batch.masks.shape
    obj = batch.objects
    out = np.zeros((n, H, W), dtype=bool)
    if fam in OBJECT_FAMILIES:
        if fam == "colour":
            sel = obj["colour"] == concept
        elif fam == "shape":
            sel = obj["shape"] == concept
        elif fam == "colour_shape":
            sel = (obj["colour"] + " " + obj["shape"]) == concept
        elif fam == "size":
            sel = obj["size"] == concept
        else:
            sel = {"left": obj["col"] == 0, "right": obj["col"] == GRID - 1, "top": obj["row"] == 0,
                   "bottom": obj["row"] == GRID - 1}[concept]
        for i, j in obj.loc[sel, ["image", "slot"]].itertuples(index=False):
            out[i] |= batch.masks[i, j]
    else:
        any_obj = batch.masks.any(1)
        present = batch.concepts[concept].to_numpy(dtype=bool)
        region = ~any_obj if fam == "background" else any_obj
        out[present] = region[present]
    if size is not None and (H, W) != (size, size):
        t = torch.from_numpy(out).float()[:, None]
        out = (F.interpolate(t, size=(size, size), mode="area")[:, 0] >= 0.5).numpy()
    return out


def mask_scores(attributions: Any, masks: Any, *, tolerance: int = 1) -> pd.DataFrame:
    """Pointing-game hit and attribution mass inside a mask, per image.

    Parameters
    ----------
    attributions
        Non-negative attribution maps ``[n, H, W]`` (e.g. from :func:`concept_input_attribution`).
    masks
        Boolean masks ``[n, H, W]`` (resized to the maps with area interpolation when the sizes differ).
    tolerance : int, default=1
        The pointing game counts a hit when the maximum lies within this many pixels of the mask (max-pool
        dilation; 0 = inside).

    Returns
    -------
    DataFrame
        Columns ``hit`` (bool), ``mass_in_mask`` (share of the total attribution inside the mask), ``mask_area``
        (share of the image the mask covers; the chance level of ``mass_in_mask``).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((1, 4, 4)); a[0, 1, 1] = 1.0
    >>> m = np.zeros((1, 4, 4), bool); m[0, 1, 1] = True
    >>> mask_scores(a, m, tolerance=0).values.tolist()
    [[True, 1.0, 0.0625]]
    """
    A = torch.as_tensor(np.asarray(attributions.detach().cpu() if isinstance(attributions, Tensor) else attributions),
                        dtype=torch.float64)
    M = torch.as_tensor(np.asarray(masks.cpu() if isinstance(masks, Tensor) else masks)).bool()
    if A.ndim != 3 or M.ndim != 3 or A.shape[0] != M.shape[0]:
        raise ValueError(f"attributions and masks must be [n, H, W] with the same n; got {tuple(A.shape)} and "
                         f"{tuple(M.shape)}.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Integral) or tolerance < 0:
        raise ValueError(f"tolerance must be an integer >= 0; got {tolerance!r}.")
    if (A < 0).any():
        raise ValueError("attributions must be non-negative maps (aggregate='positive' or 'abs').")
    if M.shape[1:] != A.shape[1:]:
        M = F.interpolate(M.float()[:, None], size=tuple(A.shape[1:]), mode="area")[:, 0] >= 0.5
    n, H, W = A.shape
    dil = M.float()[:, None]
    if tolerance:
        dil = F.max_pool2d(dil, kernel_size=2 * tolerance + 1, stride=1, padding=tolerance)
    dil = dil[:, 0].bool()
    flat = A.reshape(n, -1)
    top = flat.argmax(1)
    hit = dil.reshape(n, -1)[torch.arange(n), top]
    total = flat.sum(1)
    inside = (A * M).reshape(n, -1).sum(1)
    mass = torch.where(total > 0, inside / total.clamp_min(1e-300), torch.full_like(total, float("nan")))
    hit = hit & (total > 0)
    return pd.DataFrame({"hit": hit.numpy(), "mass_in_mask": mass.numpy(),
                         "mask_area": M.reshape(n, -1).double().mean(1).numpy()})


def pixel_check(
    concept_model: nn.Module | Callable[[Tensor], Tensor],
    batch: Any,
    concepts: Sequence[str] | None = None,
    *,
    concept_names: Sequence[str],
    images: Any = None,
    method: str = "integrated_gradients",
    noise_tunnel: bool = True,
    tolerance: int = 1,
    max_images: int | None = None,
    progress: bool = False,
    **attribution_kwargs: Any,
) -> pd.DataFrame:
    """Score per-concept input attributions against ConceptWorld masks.

    Parameters
    ----------
    concept_model
        ``images -> concept scores [b, k]``.
    batch : concepts.world.ConceptBatch
        Images with their ground truth (masks, objects, concept labels).
    concepts
        Concept names to check (default: every name of ``concept_names`` that is a batch column of an object,
        background or count family).
    concept_names
        Names of the ``k`` output columns of ``concept_model``.
    images
        Model-ready images ``[n, C, H, W]`` for the batch (default: ``batch.images / 255``). Masks are resized to
        their size.
    method, noise_tunnel, **attribution_kwargs
        See :func:`concept_input_attribution` (``aggregate`` must be ``"positive"`` or ``"abs"``).
    tolerance
        See :func:`mask_scores`.
    max_images
        At most this many images per concept (the first ones where it is present).
    progress
        Progress bar over concepts.

    Returns
    -------
    DataFrame
        One row per (image, concept) where the concept is present: ``image``, ``concept``, ``family``, ``hit``,
        ``mass_in_mask``, ``mask_area``.

    Examples
    --------
    >>> # df = pixel_check(cbm.predictor, batch, concept_names=names)
    >>> # summarize_pixel_checks(df, by="family")
    """
    from tqdm.auto import tqdm

    from concepts.world.vocabulary import Vocabulary

    names = [str(c) for c in concept_names]
    voc = Vocabulary()
    cols = set(batch.concepts.columns)
    if concepts is None:
        concepts = [c for c in names if c in cols]
    concepts = list(concepts)
    if not concepts:
        raise ValueError("no concept to check: pass concepts= with names that are both model outputs and batch columns.")
    for c in concepts:
        if c not in names:
            raise ValueError(f"concept {c!r} is not an output of the concept model (concept_names has {names[:6]} ...).")
        if c not in cols:
            raise ValueError(f"concept {c!r} is not a column of the batch's ground truth.")
    if attribution_kwargs.get("aggregate", "positive") == "signed":
        raise ValueError("pixel_check needs non-negative maps: use aggregate='positive' or 'abs'.")
    x = _images_tensor(batch.images if images is None else images)
    if x.shape[0] != len(batch):
        raise ValueError(f"images has {x.shape[0]} rows but the batch has {len(batch)} images.")
    size = x.shape[-1]
    frames = []
    for c in tqdm(concepts, disable=not progress, desc="pixel checks"):
        present = np.flatnonzero(batch.concepts[c].to_numpy(dtype=bool))
        if max_images is not None:
            present = present[:int(max_images)]
        if len(present) == 0:
            continue
        masks = concept_masks(batch, c)[present]
        attr = concept_input_attribution(concept_model, x[present], names.index(c), method=method,
                                         noise_tunnel=noise_tunnel, **attribution_kwargs)
        sc = mask_scores(attr, masks if masks.shape[-1] == size else
                         concept_masks(batch, c, size=size)[present], tolerance=tolerance)
        sc.insert(0, "family", voc.family(c))
        sc.insert(0, "concept", c)
        sc.insert(0, "image", present)
        frames.append(sc)
    if not frames:
        return pd.DataFrame(columns=["image", "concept", "family", "hit", "mass_in_mask", "mask_area"])
    return pd.concat(frames, ignore_index=True)


def summarize_pixel_checks(df: pd.DataFrame, by: str = "family") -> pd.DataFrame:
    """Aggregate :func:`pixel_check` rows per concept family or per concept.

    Returns
    -------
    DataFrame
        Index ``by``; columns ``n`` (images scored), ``pointing_game`` (hit rate), ``mass_in_mask`` (mean),
        ``mask_area`` (mean; chance level of the mass), ``lift`` (``mass_in_mask / mask_area``).

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"image": [0, 1], "concept": ["red", "red"], "family": ["colour"] * 2,
    ...                    "hit": [True, False], "mass_in_mask": [0.8, 0.4], "mask_area": [0.1, 0.1]})
    >>> float(summarize_pixel_checks(df).loc["colour", "pointing_game"])
    0.5
    """
    if by not in ("family", "concept"):
        raise ValueError(f"by must be 'family' or 'concept'; got {by!r}.")
    need = {"hit", "mass_in_mask", "mask_area", by}
    if not need <= set(df.columns):
        raise ValueError(f"df must come from pixel_check (columns {sorted(need)}).")
    g = df.groupby(by, sort=False)
    out = pd.DataFrame({
        "n": g.size(),
        "pointing_game": g["hit"].mean().astype(float),
        "mass_in_mask": g["mass_in_mask"].mean(),
        "mask_area": g["mask_area"].mean(),
    })
    out["lift"] = out["mass_in_mask"] / out["mask_area"]
    return out
