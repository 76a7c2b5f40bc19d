"""Erasure measured through concepts: detection, specificity and utility of an erased generator.

Every number is read off the generations themselves with the concept machinery of the package (no external
classifier), on three prompt sets with fixed per-prompt seeds, for the original and the erased generator:

``target``
    Prompts that ask for the erased concept. **Erasure**: the fraction of generations where the ConceptWorld
    detector still finds the concept (and, with an :class:`SAEConceptProbe`, where the concept's SAE energy in
    the built-in CLIP's embedding still crosses its threshold). Also: are the prompt's *other* concepts (its
    shape, ...) still drawn?
``retain``
    Prompts that ask for sibling concepts (the other colours when a colour is erased). **Specificity**: the
    fraction of (prompt, asked concept) pairs the detector finds, per family, before and after.
``utility``
    Unrelated prompts (full ConceptWorld captions without the concept). **Utility**: the shift of the detected
    concept distribution vs the original model, the CLIP score (cosine of image and prompt embeddings of the
    built-in CLIP), the pixel RMSE and the CLIP-embedding distance to the original generation at the same seed.

:func:`evaluate_erasure` returns an :class:`ErasureResult`: one per-image DataFrame (``frame``), a summary
(``summary()``) and the images for before/after grids; :func:`erasure_sweep` runs it over edit strengths
(erasure vs utility curves), reusing the original generations.

Examples
--------
>>> # from concepts import zoo
>>> # gen = zoo.load("conceptworld-diffusion")
>>> # sets = erasure_prompt_sets("red", n_target=24, n_retain=24, n_utility=24)
>>> # er = fit_inference_erasure(gen, "text_encoder", sets["target"].prompts, sets["retain"].prompts)
>>> # res = evaluate_erasure(gen, er.apply(gen), "red", sets)
>>> # res.summary()
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
from tqdm.auto import tqdm

from concepts.zoo.clip import load_builtin_clip_encoder

__all__ = [
    "ErasureResult",
    "PromptSet",
    "SAEConceptProbe",
    "SweepResult",
    "erasure_prompt_sets",
    "erasure_sweep",
    "evaluate_erasure",
    "load_builtin_clip_encoder",
]

logger = logging.getLogger(__name__)

FAMILIES: tuple[str, ...] = ("colour", "shape", "colour_shape", "size", "count", "background")
"""Concept families a prompt can ask for (as in :func:`concepts.zoo.detector.prompt_fidelity`)."""

SETS: tuple[str, ...] = ("target", "retain", "utility")


# ---------------------------------------------------------------------------------------------
# prompt sets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptSet:
    """Prompts with per-prompt seeds and what each prompt asks for.

    Attributes
    ----------
    name : str
        ``"target"``, ``"retain"`` or ``"utility"``.
    prompts : list of str
    seeds : list of int
    wanted : list of dict
        Per prompt, ``{family: set of concept names}`` (families of :data:`FAMILIES`).

    Examples
    --------
    >>> ps = PromptSet("target", ["a large red circle on stripes"], [0], [{"colour": {"red"}, "shape": {"circle"}}])
    >>> len(ps)
    1
    """

    name: str
    prompts: list[str]
    seeds: list[int]
    wanted: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.seeds):
            raise ValueError(f"PromptSet {self.name!r}: {len(self.prompts)} prompts but {len(self.seeds)} seeds.")
        if self.wanted and len(self.wanted) != len(self.prompts):
            raise ValueError(f"PromptSet {self.name!r}: {len(self.prompts)} prompts but {len(self.wanted)} wanted sets.")
        if not self.prompts:
            raise ValueError(f"PromptSet {self.name!r} is empty: pass at least one prompt.")

    def __len__(self) -> int:
        return len(self.prompts)


def _single_object_prompt(size: str, colour: str, shape: str, background: str) -> tuple[str, dict]:
    from concepts.world.captions import caption

    text = caption([(size, colour, shape)], background)
    wanted = {"colour": {colour}, "shape": {shape}, "colour_shape": {f"{colour} {shape}"}, "size": {size},
              "count": {"count=1"}, "background": {background}}
    return text, wanted


def _world_prompts(n: int, seed: int, exclude: str, family: str, world_seed: int, image_size: int) -> tuple[list, list]:
    from concepts.world import ConceptWorld

    kw: dict[str, Any] = {}
    if family == "colour":
        kw["colour_probs"] = {exclude: 0.0}
    elif family == "shape":
        kw["shape_probs"] = {exclude: 0.0}
    elif family == "size":
        kw["size_probs"] = {exclude: 0.0}
    elif family == "background":
        kw["background_probs"] = {exclude: 0.0}
    world = ConceptWorld(seed=world_seed, image_size=image_size, **kw)
    batch = world.sample(n, seed=seed)
    wanted: list[dict] = [{f: set() for f in FAMILIES} for _ in range(n)]
    for i, size, colour, shape in batch.objects[["image", "size", "colour", "shape"]].itertuples(index=False):
        w = wanted[i]
        w["colour"].add(colour)
        w["shape"].add(shape)
        w["colour_shape"].add(f"{colour} {shape}")
        w["size"].add(size)
    for i in range(n):
        wanted[i]["count"].add(f"count={int(batch.objects['image'].eq(i).sum())}")
        wanted[i]["background"].add(batch.backgrounds[i])
    return list(batch.captions), wanted


def erasure_prompt_sets(
    concept: str,
    *,
    n_target: int = 24,
    n_retain: int = 24,
    n_utility: int = 24,
    sizes: Sequence[str] = ("large",),
    seed: int = 0,
    seed_offset: int = 0,
    world_seed: int = 0,
    image_size: int = 32,
) -> dict[str, PromptSet]:
    """ConceptWorld prompt sets for erasing a colour or shape concept.

    * ``target``: single-object captions with the concept (``"a large red star on dots"``), the other
      attributes drawn at random;
    * ``retain``: the same kind of caption with each sibling concept of the family in turn (other colours, or
      other shapes), so every sibling is prompted equally often;
    * ``utility``: full ConceptWorld captions of a world where the concept never occurs.

    Parameters
    ----------
    concept : str
        A colour (``"red"``) or a shape (``"circle"``) of ConceptWorld.
    n_target, n_retain, n_utility : int
        Prompts per set.
    sizes : sequence of str, default ("large",)
        Object sizes used in the target and retain captions (small objects are 5 pixels wide at 32 px).
    seed : int, default 0
        Draws the captions.
    seed_offset : int, default 0
        First generation seed; the sets use consecutive, non-overlapping seeds.
    world_seed, image_size : int
        Of the ConceptWorld drawing the utility captions.

    Returns
    -------
    dict of str to PromptSet
        ``{"target": ..., "retain": ..., "utility": ...}``.

    Raises
    ------
    ValueError
        For a concept that is not a ConceptWorld colour or shape, or a non-positive set size.

    Examples
    --------
    >>> sets = erasure_prompt_sets("red", n_target=2, n_retain=5, n_utility=1)
    >>> sets["target"].prompts[0].split()[2], sorted({w["colour"].pop() for w in sets["retain"].wanted})
    ('red', ['blue', 'green', 'orange', 'purple', 'yellow'])
    """
    from concepts.world.vocabulary import BACKGROUNDS, COLOURS, SHAPES, SIZES

    if concept in COLOURS:
        family, siblings = "colour", [c for c in COLOURS if c != concept]
    elif concept in SHAPES:
        family, siblings = "shape", [s for s in SHAPES if s != concept]
    else:
        raise ValueError(
            f"concept must be a ConceptWorld colour {list(COLOURS)} or shape {list(SHAPES)}, got {concept!r}."
        )
    for name, n in (("n_target", n_target), ("n_retain", n_retain), ("n_utility", n_utility)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}.")
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        raise ValueError(f"sizes must be a non-empty subset of {list(SIZES)}, got {list(sizes)}.")
    rng = np.random.default_rng(seed)
    colours, shapes, backgrounds = list(COLOURS), list(SHAPES), list(BACKGROUNDS)

    def draw(fixed: str) -> tuple[str, dict]:
        size = str(rng.choice(list(sizes)))
        colour = fixed if family == "colour" else str(rng.choice(colours))
        shape = fixed if family == "shape" else str(rng.choice(shapes))
        return _single_object_prompt(size, colour, shape, str(rng.choice(backgrounds)))

    target = [draw(concept) for _ in range(n_target)]
    retain = [draw(siblings[i % len(siblings)]) for i in range(n_retain)]
    u_prompts, u_wanted = _world_prompts(n_utility, seed + 7919, concept, family, world_seed, image_size)
    s0 = int(seed_offset)
    out = {
        "target": PromptSet("target", [p for p, _ in target], list(range(s0, s0 + n_target)), [w for _, w in target]),
        "retain": PromptSet("retain", [p for p, _ in retain], list(range(s0 + n_target, s0 + n_target + n_retain)),
                            [w for _, w in retain]),
        "utility": PromptSet("utility", u_prompts,
                             list(range(s0 + n_target + n_retain, s0 + n_target + n_retain + n_utility)), u_wanted),
    }
    return out


# ---------------------------------------------------------------------------------------------
# the built-in CLIP and an SAE concept probe on its embeddings
# ---------------------------------------------------------------------------------------------
def _best_threshold(energy: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Threshold ``t`` (predict ``energy > t``) with the best balanced accuracy; returns ``(t, accuracy)``."""
    order = np.argsort(energy, kind="stable")
    e, y = energy[order], labels[order].astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = (n_pos - np.cumsum(y)) / max(n_pos, 1)  # threshold just above e[i]
    tnr = np.cumsum(~y) / max(n_neg, 1)
    bal = 0.5 * (tpr + tnr)
    valid = np.r_[e[1:] > e[:-1], False]  # thresholds between distinct values only
    if not valid.any():
        return float(e[-1]), 0.5
    bal = np.where(valid, bal, -1.0)
    i = int(bal.argmax())
    return float((e[i] + e[i + 1]) / 2), float(bal[i])


class SAEConceptProbe:
    """Concept energy of images through an encoder and a sparse autoencoder.

    For each concept, the SAE features whose codes best separate images with and without it (AUROC on
    labelled images, :func:`sae.metrics.auroc_per_latent`) form its feature set ``S``; the concept energy of an
    image is ``|| sum_{j in S} z_j D_j ||_2`` (the norm of the concept's part of the SAE reconstruction), and the
    concept is "found" when the energy exceeds the threshold with the best balanced accuracy on the labelled
    images.

    Parameters
    ----------
    encoder : Encoder
        Image encoder (``encode_images``), e.g. :func:`load_builtin_clip_encoder`.
    sae : fitted SAE
        Trained on ``encoder`` embeddings (``transform`` and ``dictionary_``).
    n_features : int, default 5
        Features per concept.
    batch_size : int, default 256
        Images per encoder call.

    Attributes
    ----------
    features_ : dict of str to list of int
    thresholds_ : dict of str to float
    balanced_accuracy_ : dict of str to float
        On the fitting images.

    Examples
    --------
    >>> # probe = SAEConceptProbe.from_conceptworld(encoder, n_images=2000)
    >>> # probe.energy(generated.images)["red"]
    """

    def __init__(self, encoder: Any, sae: Any, n_features: int = 5, batch_size: int = 256) -> None:
        if not callable(getattr(encoder, "encode_images", None)):
            raise TypeError(f"encoder must have encode_images (an Encoder), got {type(encoder).__name__}.")
        if not hasattr(sae, "dictionary_") or not callable(getattr(sae, "transform", None)):
            raise TypeError(
                f"sae must be a fitted SAE with transform() and dictionary_ (e.g. sae.TopKSAE), got {type(sae).__name__}."
            )
        if isinstance(n_features, bool) or not isinstance(n_features, numbers.Integral) or n_features < 1:
            raise ValueError(f"n_features must be a positive int, got {n_features!r}.")
        self.encoder = encoder
        self.sae = sae
        self.n_features = int(n_features)
        self.batch_size = int(batch_size)

    def _codes(self, images: Any, embeddings: Tensor | None = None) -> Tensor:
        emb = self.encoder.encode_images(images, batch_size=self.batch_size) if embeddings is None else embeddings
        z = self.sae.transform(emb)
        return torch.as_tensor(np.asarray(z) if not isinstance(z, Tensor) else z).float().cpu()

    def fit(self, images: Any, concepts: pd.DataFrame, *, embeddings: Tensor | None = None) -> SAEConceptProbe:
        """Choose each concept's features and threshold on labelled images.

        Parameters
        ----------
        images : images accepted by the encoder
        concepts : pandas.DataFrame
            One boolean column per concept (e.g. ``ConceptBatch.concepts``).
        embeddings : Tensor, optional
            The encoder's embeddings of ``images`` [n, d], if already computed.

        Returns
        -------
        self
        """
        from sae.metrics import auroc_per_latent

        if not isinstance(concepts, pd.DataFrame):
            raise TypeError(f"concepts must be a DataFrame of booleans, got {type(concepts).__name__}.")
        z = self._codes(images, embeddings)
        if len(z) != len(concepts):
            raise ValueError(f"got {len(z)} images but {len(concepts)} label rows; pass one row per image.")
        self.features_, self.thresholds_, self.balanced_accuracy_ = {}, {}, {}
        for name in concepts.columns:
            y = concepts[name].to_numpy().astype(bool)
            if y.all() or not y.any():
                continue
            auc = auroc_per_latent(z.numpy(), y)
            feats = [int(j) for j in np.argsort(-auc)[: self.n_features]]
            self.features_[name] = feats
            e = self._energy(z, feats)
            t, b = _best_threshold(e, y)
            self.thresholds_[name], self.balanced_accuracy_[name] = t, b
        if not self.features_:
            raise ValueError("no concept column has both positive and negative images; cannot fit the probe.")
        return self

    def _energy(self, z: Tensor, feats: list[int]) -> np.ndarray:
        D = torch.as_tensor(np.asarray(self.sae.dictionary_) if not isinstance(self.sae.dictionary_, Tensor)
                            else self.sae.dictionary_).float().cpu()
        return (z[:, feats] @ D[feats]).norm(dim=1).numpy()

    def _check(self) -> None:
        if not hasattr(self, "features_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("This SAEConceptProbe is not fitted yet; call fit(images, concepts) first.")

    def energy(self, images: Any, concepts: Sequence[str] | None = None) -> pd.DataFrame:
        """Concept energies: DataFrame [n, concepts] of floats."""
        self._check()
        names = list(self.features_) if concepts is None else list(concepts)
        unknown = [c for c in names if c not in self.features_]
        if unknown:
            raise KeyError(f"the probe has no features for {unknown}; fitted concepts: {list(self.features_)[:8]} ...")
        z = self._codes(images)
        return pd.DataFrame({c: self._energy(z, self.features_[c]) for c in names})

    def detect(self, images: Any, concepts: Sequence[str] | None = None) -> pd.DataFrame:
        """Whether each concept's energy crosses its threshold: DataFrame [n, concepts] of bools."""
        e = self.energy(images, concepts)
        return pd.DataFrame({c: e[c].to_numpy() > self.thresholds_[c] for c in e.columns})

    @classmethod
    def from_conceptworld(
        cls,
        encoder: Any = None,
        *,
        n_images: int = 2000,
        n_concepts: int = 64,
        top_k: int = 4,
        n_features: int = 5,
        image_size: int = 32,
        seed: int = 0,
        progress: bool = False,
    ) -> SAEConceptProbe:
        """Train a TopK SAE on encoder embeddings of ConceptWorld renders and fit the probe on their labels.

        Parameters
        ----------
        encoder : Encoder, optional
            Default: the built-in CLIP (:func:`load_builtin_clip_encoder`).
        n_images, n_concepts, top_k, n_features, image_size, seed
            Renders, SAE width and sparsity, features per concept, render size, seed.
        progress : bool, default False

        Returns
        -------
        SAEConceptProbe
        """
        from concepts.world import ConceptWorld
        from sae import TopKSAE

        encoder = encoder if encoder is not None else load_builtin_clip_encoder()
        batch = ConceptWorld(seed=0, image_size=image_size).sample(int(n_images), seed=int(seed) + 50_000)
        emb = encoder.encode_images(batch.images, batch_size=256)
        sae = TopKSAE(n_concepts=n_concepts, top_k=top_k, n_epochs=20, batch_size=256, random_state=seed,
                      verbose=progress).fit(emb)
        return cls(encoder, sae, n_features=n_features).fit(batch.images, batch.concepts, embeddings=emb)


# ---------------------------------------------------------------------------------------------
# scoring generations
# ---------------------------------------------------------------------------------------------
def _generate(generator: Any, ps: PromptSet, settings: Mapping[str, Any], batch_size: int) -> Tensor:
    chunks = []
    for i in range(0, len(ps), batch_size):
        out = generator.generate(ps.prompts[i:i + batch_size], ps.seeds[i:i + batch_size], **dict(settings))
        chunks.append(out.images)
    return torch.cat(chunks)


def _score(
    images: Tensor, ps: PromptSet, concept: str, detector: Any, encoder: Any, probe: Any, model: str,
) -> tuple[pd.DataFrame, pd.DataFrame, Tensor | None]:
    scores = detector.scores(images)
    found = scores.to_numpy() >= np.asarray(detector.thresholds)[None]
    found = pd.DataFrame(found, columns=scores.columns)
    rows: dict[str, Any] = {
        "set": ps.name,
        "prompt_id": np.arange(len(ps)),
        "prompt": ps.prompts,
        "seed": ps.seeds,
        "model": model,
        "target_score": scores[concept].to_numpy(),
        "target_detected": found[concept].to_numpy(),
    }
    for fam in FAMILIES:
        hits = []
        for i in range(len(ps)):
            names = [c for c in (ps.wanted[i].get(fam, ()) if ps.wanted else ()) if c in found.columns and c != concept
                     and concept not in c.split()]
            hits.append(np.mean([bool(found.iloc[i][c]) for c in names]) if names else np.nan)
        rows[f"asked_{fam}"] = hits
    emb = None
    if encoder is not None:
        emb = encoder.encode_images(images, batch_size=256)
        txt = encoder.encode_texts(list(ps.prompts))
        rows["clip_score"] = (torch.nn.functional.normalize(emb, dim=-1)
                              * torch.nn.functional.normalize(txt, dim=-1)).sum(-1).numpy()
    if probe is not None:
        e = probe.energy(images, [concept])[concept].to_numpy()
        rows["sae_energy"] = e
        rows["sae_detected"] = e > probe.thresholds_[concept]
    return pd.DataFrame(rows), found, emb


@dataclass(frozen=True)
class ErasureResult:
    """Per-image scores of an original and an erased generator on the prompt sets.

    Attributes
    ----------
    frame : pandas.DataFrame
        One row per (set, prompt, model): ``set, prompt_id, prompt, seed, model ("original"/"erased"),
        target_score, target_detected, asked_<family>`` (fraction of the prompt's asked concepts of that family
        the detector finds, the erased concept excluded), ``clip_score``, ``sae_energy``, ``sae_detected``
        (with an encoder / probe), and for erased rows ``pixel_rmse`` and ``clip_distance`` to the original
        image at the same seed.
    concept : str
    detected : dict
        ``{(set, model): DataFrame of detected concepts}`` (concept-distribution shift).
    images : dict
        ``{(set, model): Tensor [n, H, W, 3]}`` (before/after grids).
    meta : dict
        Model ids, strength, settings.

    Examples
    --------
    >>> # res.summary()[["metric", "original", "erased", "delta"]]
    """

    frame: pd.DataFrame
    concept: str
    detected: dict = field(repr=False, default_factory=dict)
    images: dict = field(repr=False, default_factory=dict)
    meta: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """One row per metric: ``metric, kind, original, erased, delta``.

        Metrics: ``target_detection`` (erasure; lower is stronger), ``target_sae_detection``,
        ``target_sae_energy``, ``target_<family>`` (other concepts of the target prompts still drawn),
        ``retain_<family>`` (specificity), ``utility_<family>``, ``utility_concept_shift`` (mean absolute change
        of every concept's detection rate), ``utility_clip_score``, ``utility_pixel_rmse``,
        ``utility_clip_distance`` (and the same distances on the retain set).
        """
        f = self.frame
        out: list[dict[str, Any]] = []

        def add(metric: str, kind: str, orig: float, erased: float) -> None:
            out.append({"metric": metric, "kind": kind, "original": orig, "erased": erased, "delta": erased - orig})

        def mean(s: str, model: str, col: str) -> float:
            sel = f[(f["set"] == s) & (f["model"] == model)]
            if col not in sel or sel.empty:
                return float("nan")
            v = sel[col].astype(float)
            return float(v.mean()) if v.notna().any() else float("nan")

        sets = [s for s in SETS if (f["set"] == s).any()]
        if "target" in sets:
            add("target_detection", "erasure", mean("target", "original", "target_detected"),
                mean("target", "erased", "target_detected"))
            if "sae_detected" in f:
                add("target_sae_detection", "erasure", mean("target", "original", "sae_detected"),
                    mean("target", "erased", "sae_detected"))
                add("target_sae_energy", "erasure", mean("target", "original", "sae_energy"),
                    mean("target", "erased", "sae_energy"))
        for s in sets:
            kind = {"target": "target_other", "retain": "specificity", "utility": "utility"}[s]
            for fam in FAMILIES:
                o, e = mean(s, "original", f"asked_{fam}"), mean(s, "erased", f"asked_{fam}")
                if not (np.isnan(o) and np.isnan(e)):
                    add(f"{s}_{fam}", kind, o, e)
            if s != "target":
                add(f"{s}_target_detection", "leak", mean(s, "original", "target_detected"),
                    mean(s, "erased", "target_detected"))
        for s in ("retain", "utility"):
            if s not in sets:
                continue
            if (s, "original") in self.detected:
                d0 = self.detected[(s, "original")].mean(axis=0)
                d1 = self.detected[(s, "erased")].mean(axis=0)
                add(f"{s}_concept_shift", "utility", 0.0, float((d1 - d0).abs().mean()))
            if "clip_score" in f:
                add(f"{s}_clip_score", "utility", mean(s, "original", "clip_score"), mean(s, "erased", "clip_score"))
            if "clip_distance" in f:
                add(f"{s}_clip_distance", "utility", 0.0, mean(s, "erased", "clip_distance"))
            add(f"{s}_pixel_rmse", "utility", 0.0, mean(s, "erased", "pixel_rmse"))
        return pd.DataFrame(out)

    def _repr_html_(self) -> str:
        """Notebook view: the concept, the models and the :meth:`summary` table."""
        import html

        models = ", ".join(f"{k}: {v}" for k, v in self.meta.items() if isinstance(v, (str, int, float)))
        extra = f" ({html.escape(models)})" if models else ""
        return (f"<div><b>ErasureResult</b>: erasing {html.escape(repr(self.concept))}{extra}"
                f"{self.summary().to_html(index=False, float_format='{:.3g}'.format)}</div>")

    def value(self, metric: str, which: str = "erased") -> float:
        """One number of :meth:`summary` (``which``: original / erased / delta)."""
        s = self.summary().set_index("metric")
        if metric not in s.index:
            raise KeyError(f"unknown metric {metric!r}; available: {list(s.index)}.")
        if which not in ("original", "erased", "delta"):
            raise ValueError(f"which must be 'original', 'erased' or 'delta', got {which!r}.")
        return float(s.loc[metric, which])

    def grid(self, set_name: str = "target", n: int = 8) -> tuple[list[np.ndarray], list[str]]:
        """Before/after image pairs of a set: ``(images, captions)`` alternating original / erased."""
        if (set_name, "original") not in self.images:
            raise KeyError(f"no images kept for set {set_name!r}; evaluate with keep_images=True.")
        a, b = self.images[(set_name, "original")], self.images[(set_name, "erased")]
        prompts = self.frame[(self.frame["set"] == set_name) & (self.frame["model"] == "original")]["prompt"].tolist()
        ims, caps = [], []
        for i in range(min(n, len(a))):
            ims += [a[i].numpy(), b[i].numpy()]
            caps += [f"{prompts[i]} (original)", "erased"]
        return ims, caps


def _check_sets(prompt_sets: Any) -> dict[str, PromptSet]:
    if not isinstance(prompt_sets, Mapping) or not prompt_sets:
        raise TypeError("prompt_sets must be a non-empty mapping {'target'|'retain'|'utility': PromptSet}.")
    bad = [k for k in prompt_sets if k not in SETS]
    if bad:
        raise ValueError(f"unknown prompt set(s) {bad}; use the keys {list(SETS)}.")
    for k, v in prompt_sets.items():
        if not isinstance(v, PromptSet):
            raise TypeError(f"prompt_sets[{k!r}] must be a PromptSet, got {type(v).__name__}.")
    return dict(prompt_sets)


def _check_concept(concept: str, detector: Any) -> None:
    if concept not in detector.concept_names:
        raise ValueError(
            f"the detector does not know concept {concept!r}; it reads {detector.concept_names[:8]} ... "
            "(ConceptWorld concept names)."
        )


class _Evaluator:
    """Shared state of evaluate_erasure / erasure_sweep: detector, encoder, probe and cached originals."""

    def __init__(self, concept: str, prompt_sets: Mapping[str, PromptSet], detector: Any, encoder: Any, probe: Any,
                 settings: Mapping[str, Any] | None, batch_size: int, progress: bool) -> None:
        from concepts import zoo

        self.sets = _check_sets(prompt_sets)
        self.detector = detector if detector is not None else zoo.load("conceptworld-detector")
        _check_concept(concept, self.detector)
        if probe is not None and not isinstance(probe, SAEConceptProbe):
            raise TypeError(f"sae_probe must be an SAEConceptProbe, got {type(probe).__name__}.")
        self.concept = concept
        self.encoder = encoder
        self.probe = probe
        self.settings = dict(settings or {})
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        self.batch_size = int(batch_size)
        self.progress = progress
        self._orig: dict[str, tuple[Tensor, pd.DataFrame, pd.DataFrame, Tensor | None]] = {}

    def _run(self, generator: Any, model: str) -> dict[str, tuple[Tensor, pd.DataFrame, pd.DataFrame, Tensor | None]]:
        out = {}
        for name, ps in tqdm(self.sets.items(), disable=not self.progress, desc=f"erasure eval ({model})"):
            images = _generate(generator, ps, self.settings, self.batch_size)
            frame, found, emb = _score(images, ps, self.concept, self.detector, self.encoder, self.probe, model)
            out[name] = (images, frame, found, emb)
        return out

    def original(self, generator: Any) -> dict:
        if not self._orig:
            self._orig = self._run(generator, "original")
        return self._orig

    def evaluate(self, original: Any, erased: Any, meta: Mapping[str, Any], keep_images: bool) -> ErasureResult:
        orig = self.original(original)
        new = self._run(erased, "erased")
        frames, detected, images = [], {}, {}
        for name in self.sets:
            im0, f0, d0, e0 = orig[name]
            im1, f1, d1, e1 = new[name]
            f1 = f1.copy()
            f1["pixel_rmse"] = (im1 - im0).pow(2).mean(dim=(1, 2, 3)).sqrt().numpy()
            if e0 is not None:
                cos = (torch.nn.functional.normalize(e0, dim=-1) * torch.nn.functional.normalize(e1, dim=-1)).sum(-1)
                f1["clip_distance"] = (1.0 - cos).numpy()
            frames += [f0, f1]
            detected[(name, "original")], detected[(name, "erased")] = d0, d1
            if keep_images:
                images[(name, "original")], images[(name, "erased")] = im0, im1
        frame = pd.concat(frames, ignore_index=True)
        return ErasureResult(frame, self.concept, detected, images, dict(meta))


def evaluate_erasure(
    original: Any,
    erased: Any,
    concept: str,
    prompt_sets: Mapping[str, PromptSet] | None = None,
    *,
    detector: Any = None,
    encoder: Any = None,
    sae_probe: SAEConceptProbe | None = None,
    settings: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    keep_images: bool = True,
    progress: bool = False,
) -> ErasureResult:
    """Compare an erased generator with the original on target, retain and utility prompts.

    Parameters
    ----------
    original, erased : Generator
        The erased one is e.g. ``InferenceErasure.apply(original)`` or a fine-tuned model
        (:meth:`~evaluation.erasure.finetune.FinetunedWeights.apply`).
    concept : str
        The erased ConceptWorld concept (a detector column).
    prompt_sets : mapping, optional
        ``{"target", "retain", "utility"} -> PromptSet`` (default: :func:`erasure_prompt_sets` of the concept).
    detector : ConceptDetector, optional
        Default: the built-in ``conceptworld-detector``.
    encoder : Encoder, optional
        For CLIP scores and embedding distances (e.g. :func:`load_builtin_clip_encoder`); skipped if None.
    sae_probe : SAEConceptProbe, optional
        For the concept's SAE energy; skipped if None.
    settings : mapping, optional
        Generation settings for both generators.
    batch_size : int, default 32
    keep_images : bool, default True
        Keep the generations (grids in the report).
    progress : bool, default False

    Returns
    -------
    ErasureResult

    Raises
    ------
    ValueError
        For a concept the detector does not read, or malformed prompt sets.

    Examples
    --------
    >>> # res = evaluate_erasure(gen, erased, "red", encoder=load_builtin_clip_encoder())
    >>> # res.value("target_detection", "original"), res.value("target_detection")
    """
    sets = prompt_sets if prompt_sets is not None else erasure_prompt_sets(concept)
    ev = _Evaluator(concept, sets, detector, encoder, sae_probe, settings, batch_size, progress)
    meta = {"original": getattr(original, "model_id", type(original).__name__),
            "erased": getattr(erased, "model_id", type(erased).__name__), "concept": concept}
    return ev.evaluate(original, erased, meta, keep_images)


@dataclass(frozen=True)
class SweepResult:
    """:func:`erasure_sweep` results: one :class:`ErasureResult` per strength.

    Attributes
    ----------
    strengths : list of float
    results : list of ErasureResult

    Examples
    --------
    >>> # sweep.table()[["strength", "target_detection", "retain_colour", "utility_clip_score"]]
    """

    strengths: list[float]
    results: list[ErasureResult]

    def table(self) -> pd.DataFrame:
        """One row per strength, one column per summary metric (the erased value)."""
        rows = []
        for s, r in zip(self.strengths, self.results):
            summ = r.summary().set_index("metric")["erased"]
            rows.append({"strength": s, **summ.to_dict()})
        return pd.DataFrame(rows)

    def _repr_html_(self) -> str:
        """Notebook view: :meth:`table` (one row per strength)."""
        import html

        concept = self.results[0].concept if self.results else ""
        return (f"<div><b>SweepResult</b>: erasing {html.escape(repr(concept))} at {len(self.strengths)} strengths"
                f"{self.table().to_html(index=False, float_format='{:.3g}'.format)}</div>")

    def frame(self) -> pd.DataFrame:
        """All per-image frames with a ``strength`` column."""
        parts = []
        for s, r in zip(self.strengths, self.results):
            f = r.frame.copy()
            f.insert(0, "strength", s)
            parts.append(f)
        return pd.concat(parts, ignore_index=True)

    def plot(self, erasure: str = "target_detection", utility: str = "retain_colour", ax: Any = None) -> Any:
        """Erasure vs utility curve across strengths; returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        t = self.table()
        for col in (erasure, utility):
            if col not in t:
                raise KeyError(f"unknown metric {col!r}; available: {[c for c in t.columns if c != 'strength']}.")
        if ax is None:
            _, ax = plt.subplots(figsize=(4.5, 3.5))
        ax.plot(t[erasure], t[utility], marker="o")
        for s, x, y in zip(t["strength"], t[erasure], t[utility]):
            ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{erasure} (lower = stronger erasure)")
        ax.set_ylabel(utility)
        ax.set_title("erasure vs utility across strengths")
        return ax


def erasure_sweep(
    original: Any,
    make_erased: Callable[[float], Any],
    strengths: Sequence[float],
    concept: str,
    prompt_sets: Mapping[str, PromptSet] | None = None,
    *,
    detector: Any = None,
    encoder: Any = None,
    sae_probe: SAEConceptProbe | None = None,
    settings: Mapping[str, Any] | None = None,
    batch_size: int = 32,
    keep_images: bool = False,
    progress: bool = False,
) -> SweepResult:
    """:func:`evaluate_erasure` at several edit strengths (the original is generated once).

    Parameters
    ----------
    original : Generator
    make_erased : callable
        ``strength -> Generator`` (e.g. ``lambda s: erasure.apply(gen, s)`` or
        ``lambda s: weights.apply(gen, s)``).
    strengths : sequence of float
    concept, prompt_sets, detector, encoder, sae_probe, settings, batch_size, keep_images, progress
        As in :func:`evaluate_erasure`.

    Returns
    -------
    SweepResult

    Examples
    --------
    >>> # sweep = erasure_sweep(gen, lambda s: er.apply(gen, s), [0, 0.5, 1, 2], "red")
    >>> # sweep.plot()
    """
    if not callable(make_erased):
        raise TypeError(f"make_erased must be callable (strength -> generator), got {type(make_erased).__name__}.")
    strengths = [float(s) for s in strengths]
    if not strengths:
        raise ValueError("strengths is empty: pass at least one strength.")
    sets = prompt_sets if prompt_sets is not None else erasure_prompt_sets(concept)
    ev = _Evaluator(concept, sets, detector, encoder, sae_probe, settings, batch_size, progress)
    results = []
    for s in tqdm(strengths, disable=not progress, desc="strength sweep"):
        erased = make_erased(s)
        meta = {"original": getattr(original, "model_id", ""), "erased": getattr(erased, "model_id", ""),
                "concept": concept, "strength": s}
        results.append(ev.evaluate(original, erased, meta, keep_images))
    return SweepResult(strengths, results)
