"""The ConceptWorld concept detector: reads which concepts any image shows (the referee for generators).

A small CNN (:class:`DetectorNet`) maps an RGB image, resized to 32x32, to one logit per ConceptWorld concept
column (colours, shapes, colour-shape pairs, sizes, counts, backgrounds, positions). It is trained by
:mod:`concepts.zoo.train_detector` with a binary cross-entropy loss on fresh ConceptWorld renders (rendered at
32, 64 and 128 pixels and resized to 32), each corrupted by :func:`corrupt` (blur, noise, colour drift and
jitter, down-and-up scaling), so that it keeps reading concepts in the
blurred, noisy and colour-shifted images a small generator makes.

Why a CNN and not a pixel parser: ConceptWorld renders are flat colours, so an exact parser works on real
renders, but generated images have soft edges and drifting colours; the CNN trained with corruptions reads
both (measured in ``config.json['quality']`` of the shipped folder: accuracy on clean and corrupted renders).

Use :func:`load_conceptworld_detector` (registry name ``"conceptworld-detector"``)::

    det = concepts.zoo.load("conceptworld-detector")
    det.detect(images)   # DataFrame of bools [n, 55], one column per concept
    det.scores(images)   # DataFrame of probabilities

Documented blindspots of the detector itself: ``small`` shapes at 32 pixels are 5 pixels wide, so a small
star and a small triangle differ by one row of pixels -- shape and colour-shape columns of small objects are
the least accurate (see ``config.json['quality']['per_concept']``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_state_dict_checked, read_json, require_keys, weights_dir

logger = logging.getLogger(__name__)

__all__ = [
    "DETECTOR_NAME", "CONFIG_FORMAT", "DetectorNet", "ConceptDetector", "corrupt", "resize_batch",
    "load_detector", "load_conceptworld_detector", "heldout_prompts", "prompt_fidelity", "PROMPT_FAMILIES",
]

DETECTOR_NAME = "conceptworld-detector"
CONFIG_FORMAT = "conceptkit.zoo.detector"


class DetectorNet(nn.Module):
    """CNN: three conv stages (32 -> 16 -> 8 -> 4 pixels) and an MLP head on the flattened 4x4 map.

    Keeping the 4x4 map (no global pooling) lets the head read positions and counts; the per-location conv
    features bind colour and shape, so colour-shape pairs are read too.

    Parameters
    ----------
    n_concepts
        Number of output logits.
    width
        Channels of the first stage (doubled at each of the next two stages).
    hidden
        Width of the MLP head.
    input_size
        Side of the (square) input; must be divisible by 8.

    Examples
    --------
    >>> net = DetectorNet(55, width=8, hidden=16)
    >>> net(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 55])
    """

    def __init__(self, n_concepts: int, width: int = 32, hidden: int = 256, input_size: int = 32) -> None:
        super().__init__()
        if input_size % 8:
            raise ValueError(f"input_size must be divisible by 8, got {input_size}.")
        w = int(width)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.features = nn.Sequential(
            block(3, w), nn.MaxPool2d(2),
            block(w, 2 * w), block(2 * w, 2 * w), nn.MaxPool2d(2),
            block(2 * w, 4 * w), block(4 * w, 4 * w), nn.MaxPool2d(2),
        )
        side = input_size // 8
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * side * side, hidden), nn.SiLU(), nn.Linear(hidden, n_concepts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float ``[n, 3, S, S]`` in [0, 1]; returns logits ``[n, n_concepts]``."""
        return self.head(self.features((x - 0.5) * 4.0))


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize float images ``[n, 3, H, W]`` to ``size x size`` (bilinear, antialiased; identity if equal)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image Gaussian blur (``sigma [n]`` in pixels; 0 leaves an image unchanged)."""
    radius = 3
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    s = sigma.clamp(min=1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # [n, 7]
    n, c, h, w = x.shape
    xp = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    kk = k.repeat_interleave(c, 0)
    xp = F.conv2d(xp, kk[:, None, None, :], groups=n * c)
    xp = F.conv2d(xp, kk[:, None, :, None], groups=n * c)
    return xp.reshape(n, c, h, w)


def corrupt(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    p_blur: float = 0.5,
    max_sigma: float = 1.0,
    p_noise: float = 0.5,
    max_noise: float = 0.08,
    p_colour: float = 0.8,
    max_shift: float = 0.06,
    max_gain: float = 0.15,
    p_rescale: float = 0.25,
) -> torch.Tensor:
    """Corrupt a batch of images the way a small generator might (used for training and validation).

    Each image independently gets, with the given probabilities: a colour drift (per-channel gain in
    ``1 +- max_gain`` and offset in ``+- max_shift``, plus a common brightness change), a down-and-up
    rescale by 2 (bilinear), a Gaussian blur (sigma uniform in ``[0, max_sigma]`` pixels) and Gaussian
    noise (std uniform in ``[0, max_noise]``). Hue-changing corruptions are kept small so that no colour
    turns into a neighbouring ConceptWorld colour (red / orange / yellow are close in hue).

    Parameters
    ----------
    x
        Float images ``[n, 3, H, W]`` in [0, 1].
    generator
        CPU generator (the corruption is reproducible for a seed).

    Returns
    -------
    torch.Tensor
        Corrupted images ``[n, 3, H, W]`` in [0, 1].

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> y = corrupt(torch.full((4, 3, 32, 32), 0.5), g)
    >>> y.shape, bool(((y >= 0) & (y <= 1)).all())
    (torch.Size([4, 3, 32, 32]), True)
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"corrupt expects float images [n, 3, H, W], got shape {tuple(x.shape)}.")
    n, _, h, w = x.shape
    dev = x.device

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    x = x.clone()
    on = (u(n) < p_colour).float()[:, None, None, None]
    gain = 1.0 + (u(n, 3) * 2 - 1)[:, :, None, None] * max_gain
    shift = (u(n, 3) * 2 - 1)[:, :, None, None] * max_shift
    bright = (u(n) * 2 - 1)[:, None, None, None] * max_shift
    x = on * (x * gain + shift + bright) + (1 - on) * x
    resc = u(n) < p_rescale
    if resc.any():
        small = F.interpolate(x[resc], size=(max(1, h // 2), max(1, w // 2)), mode="bilinear", antialias=True,
                              align_corners=False)
        x[resc] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    sigma = u(n) * max_sigma * (u(n) < p_blur).float()
    blur = sigma > 0.05
    if blur.any():
        x[blur] = _gaussian_blur(x[blur], sigma[blur])
    std = u(n) * max_noise * (u(n) < p_noise).float()
    noise = torch.randn(x.shape, generator=generator).to(dev)
    x = x + noise * std[:, None, None, None]
    return x.clamp_(0.0, 1.0)


class ConceptDetector:
    """Reads the ConceptWorld concepts present in images.

    Parameters
    ----------
    net
        The trained :class:`DetectorNet`.
    concept_names
        Concept column names, in logit order.
    input_size
        Images are resized to ``input_size x input_size`` before the network.
    thresholds
        Probability threshold per concept for :meth:`detect` (default 0.5 for every concept).
    config
        The parsed ``config.json`` (training record and measured quality), if loaded from a folder.

    Examples
    --------
    >>> from concepts import zoo
    >>> from concepts.world import ConceptWorld
    >>> det = zoo.load("conceptworld-detector")
    >>> batch = ConceptWorld(seed=0, image_size=32).sample(64, seed=123)
    >>> found = det.detect(batch.images)
    >>> float((found["red"] == batch.concepts["red"]).mean()) > 0.9
    True
    """

    def __init__(
        self,
        net: nn.Module,
        concept_names: Sequence[str],
        *,
        input_size: int = 32,
        thresholds: Sequence[float] | None = None,
        config: dict | None = None,
    ) -> None:
        self.net = net.eval()
        self.concept_names = list(concept_names)
        self.input_size = int(input_size)
        k = len(self.concept_names)
        th = np.full(k, 0.5) if thresholds is None else np.asarray(thresholds, dtype=float)
        if th.shape != (k,):
            raise ValueError(f"thresholds has {th.size} values, but the detector has {k} concepts; pass one per concept.")
        self.thresholds = th
        self.config = config or {}

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device: str | torch.device) -> ConceptDetector:
        """Move the network to ``device`` (returns self)."""
        self.net.to(device)
        return self

    def _tensor(self, images: Any) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point():
            if images.shape[1] == 3:
                x = images
            elif images.shape[-1] == 3:  # [n, H, W, 3] float in [0, 1] (GenerationResult.images)
                x = images.permute(0, 3, 1, 2)
            else:
                raise ValueError(
                    f"float image tensors must be [n, 3, H, W] or [n, H, W, 3] in [0, 1], got shape "
                    f"{tuple(images.shape)}."
                )
            return resize_batch(x.detach().float().clamp(0, 1), self.input_size)
        if hasattr(images, "images") and isinstance(getattr(images, "images"), (torch.Tensor, np.ndarray)):
            return self._tensor(images.images)  # a GenerationResult or ConceptBatch
        from concepts.images import images_to_tensor

        return images_to_tensor(images, size=self.input_size)

    @torch.no_grad()
    def logits(self, images: Any, *, batch_size: int = 512) -> torch.Tensor:
        """Raw logits ``[n, n_concepts]`` (float32, CPU).

        ``images``: uint8 ``[n, H, W, 3]``, float tensors ``[n, 3, H, W]`` / ``[n, H, W, 3]`` in [0, 1], PIL
        images, file paths, or an object with an ``images`` attribute (``GenerationResult``, ``ConceptBatch``).
        """
        x = self._tensor(images)
        if len(x) == 0:
            raise ValueError("No images given: pass at least one image.")
        out = []
        dev = self.device
        for i in range(0, len(x), batch_size):
            out.append(self.net(x[i:i + batch_size].to(dev)).float().cpu())
        return torch.cat(out)

    def scores(self, images: Any, *, batch_size: int = 512) -> pd.DataFrame:
        """Probability of every concept: DataFrame ``[n, n_concepts]`` of floats in [0, 1].

        Examples
        --------
        >>> # det.scores(batch.images)["red"].round(2).tolist()[:3]  ->  [0.99, 0.0, 0.01]
        """
        p = torch.sigmoid(self.logits(images, batch_size=batch_size)).numpy()
        return pd.DataFrame(p, columns=self.concept_names)

    def detect(self, images: Any, *, batch_size: int = 512) -> pd.DataFrame:
        """Which concepts each image shows: DataFrame ``[n, n_concepts]`` of bools (score >= threshold).

        Examples
        --------
        >>> # det.detect(generated.images)[["red", "circle"]].mean()   # fraction of images with red / a circle
        """
        p = torch.sigmoid(self.logits(images, batch_size=batch_size)).numpy()
        return pd.DataFrame(p >= self.thresholds[None], columns=self.concept_names)

    def accuracy(self, images: Any, truth: pd.DataFrame) -> pd.Series:
        """Per-concept accuracy of :meth:`detect` against a truth DataFrame (columns = concept names)."""
        missing = [c for c in self.concept_names if c not in truth.columns]
        if missing:
            raise ValueError(f"truth lacks concept column {missing[0]!r}; expected the ConceptWorld concept columns.")
        found = self.detect(images)
        if len(found) != len(truth):
            raise ValueError(f"got {len(found)} images but {len(truth)} truth rows; pass one truth row per image.")
        t = truth[self.concept_names].to_numpy().astype(bool)
        return pd.Series((found.to_numpy() == t).mean(0), index=self.concept_names)

    def __repr__(self) -> str:
        return f"ConceptDetector(n_concepts={len(self.concept_names)}, input_size={self.input_size})"


def build_net(arch: dict, *, source: str = "architecture") -> DetectorNet:
    """Build an untrained :class:`DetectorNet` from the ``"architecture"`` block of ``config.json``."""
    require_keys(arch, ("n_concepts", "width", "hidden", "input_size"), source=source)
    return DetectorNet(int(arch["n_concepts"]), width=int(arch["width"]), hidden=int(arch["hidden"]),
                       input_size=int(arch["input_size"]))


def load_detector(path: str | Path, device: str | torch.device = "cpu", *, verify_checksum: bool = True) -> ConceptDetector:
    """Load a detector folder (``config.json`` + ``model.safetensors``) written by :mod:`concepts.zoo.train_detector`.

    Raises
    ------
    FileNotFoundError
        The folder or one of its files is missing.
    ValueError
        A file is corrupt or does not match the config (the message names the file and the key).

    Examples
    --------
    >>> det = load_detector(weights_dir("conceptworld-detector"))
    >>> len(det.concept_names)
    55
    """
    from concepts.devices import resolve_device

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: detector folder not found (expected config.json and model.safetensors).")
    cfg_path = folder / "config.json"
    config = read_json(cfg_path)
    src = str(cfg_path)
    require_keys(config, ("format", "architecture", "concept_names", "weights"), source=src)
    if config["format"] != CONFIG_FORMAT:
        raise ValueError(f"{src}: key 'format' is {config['format']!r}, expected {CONFIG_FORMAT!r}.")
    names = config["concept_names"]
    arch = config["architecture"]
    if not isinstance(names, list) or len(names) != arch.get("n_concepts"):
        raise ValueError(
            f"{src}: key 'concept_names' has {len(names) if isinstance(names, list) else type(names).__name__} "
            f"entries, but 'architecture.n_concepts' is {arch.get('n_concepts')!r}."
        )
    require_keys(config["weights"], ("file",), source=f"{src} ['weights']")
    net = build_net(arch, source=f"{src} ['architecture']")
    sha = config["weights"].get("sha256") if verify_checksum else None
    load_state_dict_checked(net, folder / config["weights"]["file"], sha256=sha)
    net = net.float().to(resolve_device(device)).eval()
    return ConceptDetector(net, names, input_size=int(arch["input_size"]), thresholds=config.get("thresholds"),
                           config=config)


def load_conceptworld_detector(device: str | torch.device = "cpu", path: str | Path | None = None) -> ConceptDetector:
    """Registry loader of ``"conceptworld-detector"``: :func:`load_detector` on the shipped folder (or ``path``)."""
    return load_detector(weights_dir(DETECTOR_NAME) if path is None else path, device=device)


# ---------------------------------------------------------------------------------------------
# prompt fidelity of generators, read by the detector
# ---------------------------------------------------------------------------------------------
PROMPT_FAMILIES: tuple[str, ...] = ("colour", "shape", "colour_shape", "size", "count", "background")
"""Families scored by :func:`prompt_fidelity`."""


def heldout_prompts(n: int, seed: int = 777, *, world_seed: int = 0, image_size: int = 32) -> tuple[list[str], list[dict]]:
    """Full ConceptWorld captions of a held-out sample and what each one asks for.

    Parameters
    ----------
    n
        Number of prompts.
    seed
        Sample seed (the zoo generators train on sample seeds >= 30000; 777 is the held-out test seed).

    Returns
    -------
    captions : list of str
    wanted : list of dict
        Per caption: ``colour``, ``shape``, ``colour_shape``, ``size`` (sets of concept names), ``count``
        (``{"count=n"}``) and ``background`` (``{name}``).

    Examples
    --------
    >>> caps, wanted = heldout_prompts(2, seed=1)
    >>> sorted(wanted[0])
    ['background', 'colour', 'colour_shape', 'count', 'shape', 'size']
    """
    from concepts.world import ConceptWorld

    batch = ConceptWorld(seed=world_seed, image_size=image_size).sample(n, seed=seed)
    wanted: list[dict] = [
        {"colour": set(), "shape": set(), "colour_shape": set(), "size": set(), "count": set(), "background": set()}
        for _ in range(n)
    ]
    for i, size, colour, shape in batch.objects[["image", "size", "colour", "shape"]].itertuples(index=False):
        w = wanted[i]
        w["colour"].add(colour)
        w["shape"].add(shape)
        w["colour_shape"].add(f"{colour} {shape}")
        w["size"].add(size)
    for i in range(n):
        w = wanted[i]
        w["count"].add(f"count={int(batch.objects['image'].eq(i).sum())}")
        w["background"].add(batch.backgrounds[i])
    return list(batch.captions), wanted


def prompt_fidelity(detected: pd.DataFrame, wanted: Sequence[dict]) -> dict[str, float]:
    """How often the concepts a prompt asks for are detected in its image.

    Parameters
    ----------
    detected
        Output of :meth:`ConceptDetector.detect` (one row per generated image).
    wanted
        Per image, the concept names asked for per family (see :func:`heldout_prompts`).

    Returns
    -------
    dict
        For each family ``f`` of :data:`PROMPT_FAMILIES`: ``f`` = fraction of (prompt, asked concept) pairs
        whose concept is detected, and ``f + "_all"`` = fraction of prompts whose asked concepts of that
        family are all detected. For ``colour`` and ``shape`` also ``f + "_extra"``: the fraction of
        (prompt, concept of the family *not* asked for) pairs that are detected anyway -- a generator that
        paints every colour everywhere scores high on ``colour`` but also on ``colour_extra``.

    Examples
    --------
    >>> d = pd.DataFrame({"red": [True, False], "blue": [True, True]})
    >>> prompt_fidelity(d, [{"colour": {"red", "blue"}}, {"colour": {"red"}}])["colour"]
    0.6667
    """
    if len(detected) != len(wanted):
        raise ValueError(f"got {len(detected)} detected rows but {len(wanted)} prompts; pass one per image.")
    out: dict[str, float] = {}
    for fam in PROMPT_FAMILIES:
        hits, total, all_ok, n_prompts = 0, 0, 0, 0
        for i, w in enumerate(wanted):
            names = [c for c in w.get(fam, ()) if c in detected.columns]
            if not names:
                continue
            found = [bool(detected.iloc[i][c]) for c in names]
            hits += sum(found)
            total += len(found)
            all_ok += all(found)
            n_prompts += 1
        if total:
            out[fam] = round(hits / total, 4)
            out[fam + "_all"] = round(all_ok / n_prompts, 4)
    vocab = {"colour": [c for c in ("red", "green", "blue", "yellow", "purple", "orange") if c in detected.columns],
             "shape": [c for c in ("circle", "square", "triangle", "star", "cross") if c in detected.columns]}
    for fam, names in vocab.items():
        hits = total = 0
        for i, w in enumerate(wanted):
            if fam not in w or not w[fam]:
                continue
            others = [c for c in names if c not in w[fam]]
            hits += int(detected.iloc[i][others].sum()) if others else 0
            total += len(others)
        if total:
            out[fam + "_extra"] = round(hits / total, 4)
    return out
