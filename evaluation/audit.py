"""One audit of one model and one concept dictionary: concepts, blindspots, importance and erasure.

:func:`audit` runs the whole concept-based audit of an image encoder and a sparse-autoencoder concept dictionary
on ConceptWorld, where every concept label is known, and returns an :class:`AuditResult` (DataFrames, a
self-contained HTML report, ``.save(out)``). The steps, each an existing part of the package:

1. **Discovered concepts** -- a :class:`~evaluation.blindspots_coder.ConceptCoder` (encoder token layer + SAE,
   trained on the fly on the ConceptWorld renders when no SAE is given) turns every image into per-unit concept
   energies; units are named with :mod:`concepts.naming` against the ConceptWorld vocabulary. Quality:
   fraction of variance unexplained (FVU), dead fraction and L0 of the SAE on the image tokens; per unit, the
   AUROC of its energy for the ConceptWorld label it predicts best (:func:`~evaluation.blindspots_world.unit_concept_map`);
   per ConceptWorld concept, the best unit's AUROC (coverage); image strips of each unit's top real images.
2. **Blindspots** of one or more generators (:func:`~evaluation.blindspots.find_blindspots`): every caption of the
   real set is generated, both sides go through the same coder, every unit is tested for suppression /
   exaggeration; the ConceptWorld detector gives the ground-truth view of the same comparison.
3. **Concept importance** for a downstream head: a ``cbm`` head (default :class:`cbm.LinearProbe`) is trained on
   the concept energies of two thirds of the real images to predict the ConceptWorld class; importance in concept
   space (:func:`~evaluation.fidelity.compare_methods`: Gradient x Input, Integrated Gradients, Occlusion, RISE) with
   C-Deletion / C-Insertion / C-muFidelity and, per class, the most important concepts (checked against the
   class rules).
4. **Erasure** of one chosen concept (default ``"red"``) in the first generator: an inference-time LEACE eraser
   (:func:`~evaluation.erasure.fit_inference_erasure`) fitted on counterfactual caption pairs (ConceptWorld captions
   with the concept vs the same scenes with the concept swapped for a sibling), then measured three ways:

   * **delta collapsing** -- on the pairs whose caption asks for the concept, the blindspot delta
     ``E_gen / (E_real + E_gen)`` of the concept's SAE units (units whose best ConceptWorld label involves the
     concept, AUROC >= 0.9) and of the detector's reading of the concept, before and after;
   * **importance vanishing** -- Gradient x Input of the head on the generated images of those pairs (classes
     whose rule involves the concept when there are any): the summed importance of the concept's units, before
     and after;
   * **utility cost** -- :func:`~evaluation.erasure.evaluate_erasure` on single-object prompts (target detection,
     other colours / shapes still drawn, CLIP score and concept-distribution shift on unrelated prompts) and the
     head's accuracy on the generated images of the pairs without the concept.

Defaults are sized for a laptop CPU: 400 renders at 32 pixels, a 128-unit TopK SAE, the built-in diffusion
generator with 'red' erased; about 70 s of CPU time (one torch thread), 2-3 minutes wall time on a busy two-core
machine. The same seed gives the same result.

Examples
--------
>>> from evaluation.audit import audit
>>> result = audit(n=300, concept="red")            # doctest: +SKIP
>>> result.erasure[["metric", "before", "after"]]   # doctest: +SKIP
>>> result.save("reports/audit")                    # doctest: +SKIP
PosixPath('reports/audit/index.html')
"""
from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["AuditResult", "audit", "DEFAULT_GENERATORS", "DEFAULT_STRENGTH", "ERASURE_STRENGTHS", "IMPORTANCE_METHODS",
           "concept_units", "counterfactual_captions"]

DEFAULT_GENERATORS: tuple[str, ...] = ("conceptworld-diffusion",)
"""Generators audited by default (add ``"conceptworld-ar"`` for the autoregressive one)."""

IMPORTANCE_METHODS: tuple[str, ...] = ("gradient_input", "integrated_gradients", "occlusion", "rise")
"""Importance methods compared on the downstream head."""

ERASURE_STRENGTHS: dict[str, float] = {"conceptworld-diffusion": 4.0, "conceptworld-ar": 1.5}
"""Default erasure strength per built-in generator (measured on single-object 'red' prompts: the smallest strength
that cuts detection to <= 10 % while the other colours stay drawn); other generators get
:data:`DEFAULT_STRENGTH`."""

DEFAULT_STRENGTH = 2.0

IMAGE_SIZE = 32
"""Side of the ConceptWorld renders (the built-in generators' size)."""

MIN_IMAGES = 60


# ---------------------------------------------------------------------------------------------
# the result
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AuditResult:
    """Everything :func:`audit` measured, as DataFrames, plus the rendered HTML report.

    Attributes
    ----------
    concepts
        One row per SAE unit: ``concept`` (unit index), ``name`` (from the vocabulary), ``similarity``,
        ``alive``, ``truth`` (ConceptWorld label its energy predicts best), ``auroc``, ``mapped``
        (AUROC >= 0.9), ``name_matches_truth``, ``frequency`` (share of real images where it fires),
        ``mean_energy``, ``exemplars`` (indices of its top real images).
    coverage
        One row per ConceptWorld concept: ``truth``, ``family``, ``frequency``, ``best_unit``, ``best_name``,
        ``auroc`` (best unit's AUROC for that label).
    quality
        ``metric, value`` rows: FVU, dead fraction, L0, units alive / mapped, concepts covered, naming agreement.
    blindspots
        All generators' per-unit comparisons stacked (:meth:`evaluation.blindspots.BlindspotAnalysis.concept_table`).
    blindspot_summary
        One row per generator: counts per status, median delta, agreement with the ConceptWorld detector.
    importance
        Methods x fidelity metrics of the downstream head (index ``method``).
    importance_global
        Per class and concept: mean Gradient x Input importance, share of the logit, rank; ``rule_concept``
        marks units whose ConceptWorld label is part of the class rule.
    erasure
        The headline of the erasure: ``metric, kind (delta / importance / utility), before, after, change, note``.
    erasure_detail
        :meth:`evaluation.erasure.ErasureResult.summary` of the single-object prompt evaluation.
    settings
        The audit's settings and headline numbers (JSON-friendly).
    html
        The self-contained report (``index.html``).
    tables
        Further tables written by :meth:`save` (blindspot pairs, detector comparisons, ...).
    artifacts
        The live objects (``coder``, ``head``, ``analysis``, ``erasure``, ``batch``...) for further work.

    Examples
    --------
    >>> # res = audit(n=300); res.quality; res.save("reports/audit")
    """

    concepts: pd.DataFrame
    coverage: pd.DataFrame
    quality: pd.DataFrame
    blindspots: pd.DataFrame
    blindspot_summary: pd.DataFrame
    importance: pd.DataFrame
    importance_global: pd.DataFrame
    erasure: pd.DataFrame
    erasure_detail: pd.DataFrame
    settings: dict[str, Any]
    html: str = field(repr=False)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)
    artifacts: dict[str, Any] = field(default_factory=dict, repr=False)

    MAIN_TABLES = ("concepts", "coverage", "quality", "blindspots", "blindspot_summary", "importance",
                   "importance_global", "erasure", "erasure_detail")

    def save(self, out: str | Path) -> Path:
        """Write ``out/index.html``, every table as CSV and Parquet, and ``out/audit.json``.

        Parameters
        ----------
        out
            Output folder (created; existing files with the same names are replaced).

        Returns
        -------
        pathlib.Path
            The path of ``index.html``.

        Examples
        --------
        >>> # audit(n=300).save("reports/audit")
        """
        from .report import json_safe

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "index.html"
        path.write_text(self.html, encoding="utf-8")
        tables = {name: getattr(self, name) for name in self.MAIN_TABLES}
        tables.update({k: v for k, v in self.tables.items() if k not in tables})
        for name, df in tables.items():
            if not isinstance(df, pd.DataFrame):
                continue
            frame = df.reset_index() if name == "importance" else df
            frame.to_csv(folder / f"{name}.csv", index=False)
            _to_parquet(frame, folder / f"{name}.parquet")
        (folder / "audit.json").write_text(json.dumps(json_safe(self.settings), indent=2))
        return path

    def headline(self) -> dict[str, Any]:
        """The headline numbers (also in ``settings['headline']``)."""
        return dict(self.settings.get("headline", {}))

    def _repr_html_(self) -> str:
        parts = ["<h3>conceptkit audit</h3>",
                 "<p>Discovered concepts: quality</p>", self.quality.to_html(index=False, float_format="{:.3g}".format),
                 "<p>Blindspots per generator</p>",
                 self.blindspot_summary.to_html(index=False, float_format="{:.3g}".format),
                 "<p>Erasure</p>", self.erasure.to_html(index=False, float_format="{:.3g}".format),
                 "<p>The full report (concept strips, blindspots, importance, before/after images): "
                 "<code>result.save(folder)</code> writes <code>folder/index.html</code>.</p>"]
        return "".join(parts)

    def __repr__(self) -> str:
        h = self.headline()
        body = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in h.items())
        return f"AuditResult({body})"


def _to_parquet(df: pd.DataFrame, path: Path) -> None:
    frame = df.copy()
    for c in frame.columns:  # mixed object columns (lists, None) do not always convert: store them as text
        if frame[c].dtype == object:
            frame[c] = frame[c].map(lambda v: v if v is None or isinstance(v, str) else str(v))
    frame.to_parquet(path, index=False)


# ---------------------------------------------------------------------------------------------
# helpers (public ones are used by the report and the tests)
# ---------------------------------------------------------------------------------------------
def _involves(label: str, concept: str) -> bool:
    """``"red circle"`` involves ``"red"``; ``"red"`` involves ``"red"``."""
    return label == concept or concept in str(label).split(" ")


def concept_units(unit_map: pd.DataFrame, concept: str) -> list[int]:
    """Units whose best ConceptWorld label involves ``concept`` (``red``, ``red circle`` ... for ``"red"``), among
    the units mapped with AUROC >= 0.9.

    Parameters
    ----------
    unit_map
        :func:`evaluation.blindspots_world.unit_concept_map` output (``concept``, ``truth``, ``mapped``).
    concept
        A ConceptWorld concept name.

    Returns
    -------
    list of int
        Unit indices (may be empty: the dictionary has no unit for that concept).

    Examples
    --------
    >>> um = pd.DataFrame({"concept": [0, 1, 2], "truth": ["red circle", "blue", "red"],
    ...                    "mapped": [True, True, False]})
    >>> concept_units(um, "red")
    [0]
    """
    sel = unit_map["mapped"].astype(bool) & unit_map["truth"].map(lambda t: _involves(str(t), concept))
    return [int(u) for u in unit_map.loc[sel, "concept"]]


def counterfactual_captions(batch: Any, concept: str, *, seed: int = 0) -> tuple[list[str], list[str]]:
    """Caption pairs for fitting an eraser: scenes with ``concept`` and the same scenes with it swapped.

    For each image of ``batch`` that shows the concept (a ConceptWorld colour or shape), the caption is rebuilt
    from its objects once as is and once with every object of that colour (shape) given another, randomly drawn
    colour (shape), so the two prompts differ only in the concept.

    Parameters
    ----------
    batch
        A :class:`concepts.world.ConceptBatch`.
    concept
        A ConceptWorld colour or shape.
    seed
        Seed of the replacement draws.

    Returns
    -------
    (target, counterfactual) : tuple of lists of str

    Raises
    ------
    ValueError
        If ``concept`` is not a ConceptWorld colour or shape, or no image of ``batch`` shows it.

    Examples
    --------
    >>> from concepts.world import ConceptWorld
    >>> t, c = counterfactual_captions(ConceptWorld(seed=0).sample(40, seed=0), "red")
    >>> all("red" in a.split() and "red" not in b.split() for a, b in zip(t, c))
    True
    """
    from concepts.world.captions import caption
    from concepts.world.vocabulary import COLOURS, SHAPES

    if concept in COLOURS:
        column, siblings = "colour", [c for c in COLOURS if c != concept]
    elif concept in SHAPES:
        column, siblings = "shape", [s for s in SHAPES if s != concept]
    else:
        raise ValueError(f"concept must be a ConceptWorld colour {list(COLOURS)} or shape {list(SHAPES)}; "
                         f"got {concept!r}.")
    rng = np.random.default_rng(seed)
    objects = batch.objects.sort_values(["image", "slot"]) if "slot" in batch.objects else batch.objects
    target, other = [], []
    for i, grp in objects.groupby("image", sort=True):
        if not (grp[column] == concept).any():
            continue
        objs = list(zip(grp["size"], grp["colour"], grp["shape"]))
        swap = str(rng.choice(siblings))
        cf = [(s, swap if column == "colour" and c == concept else c, swap if column == "shape" and h == concept else h)
              for s, c, h in objs]
        bg = batch.backgrounds[int(i)]
        target.append(caption(objs, bg))
        other.append(caption(cf, bg))
    if not target:
        raise ValueError(f"no image of the fitting sample shows {concept!r}; use a larger sample.")
    return target, other


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def _check_concept(concept: str | None) -> str | None:
    from concepts.world.vocabulary import COLOURS, SHAPES

    if concept is None:
        return None
    if not isinstance(concept, str) or concept not in (*COLOURS, *SHAPES):
        raise ValueError(
            f"concept must be a ConceptWorld colour {list(COLOURS)} or shape {list(SHAPES)} (or None to skip the "
            f"erasure); got {concept!r}."
        )
    return concept


def _generator_specs(generators: Any) -> list[tuple[str, Any]]:
    if generators is None:
        return []
    if isinstance(generators, str):
        generators = [generators]
    if isinstance(generators, Mapping):
        items = [(str(k), v) for k, v in generators.items()]
    elif isinstance(generators, Sequence):
        items = [(g if isinstance(g, str) else str(getattr(g, "model_id", type(g).__name__)), g) for g in generators]
    else:
        raise TypeError(f"generators must be a list of names / Generator objects or a mapping name -> Generator; "
                        f"got {type(generators).__name__}.")
    for name, g in items:
        if not isinstance(g, str) and not callable(getattr(g, "generate", None)):
            raise TypeError(f"generator {name!r} has no generate(prompts, seeds) method; pass a built-in name "
                            "('conceptworld-diffusion', 'conceptworld-ar'), a diffusers/Janus folder or a Generator.")
        if isinstance(g, str) and not g.strip():
            raise ValueError("generator names must be non-empty strings.")
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"generator names must be unique; got {names}.")
    return items


def _build_coder(encoder: Any, sae: Any, *, layer: str | None, device: str, n_concepts: int, top_k: int,
                 sae_epochs: int, seed: int, progress: bool) -> Any:
    from .blindspots_coder import ConceptCoder

    if isinstance(sae, (str, os.PathLike)):
        path = Path(sae)
        if not path.exists():
            raise FileNotFoundError(f"SAE checkpoint {path} does not exist; pass a folder written by sae.save, or "
                                    "omit it to train an SAE on the fly.")
        import sae as sae_pkg

        sae = sae_pkg.load(path, device=device)
    kwargs = dict(layer=layer, sae=sae, n_concepts=n_concepts, top_k=top_k, n_epochs=sae_epochs,
                  random_state=seed, progress=progress)
    if isinstance(encoder, ConceptCoder):
        return encoder
    if isinstance(encoder, str):
        return ConceptCoder.from_spec(encoder, device=device, **kwargs)
    if callable(getattr(encoder, "extractor", None)):
        return ConceptCoder(encoder, **kwargs)
    raise TypeError(f"encoder must be a spec string ('builtin', 'ViT-B-32:/path', 'dinov2:/path'), an Encoder with "
                    f"extractor() (OpenCLIPEncoder, DINOv2Encoder) or a ConceptCoder; got {type(encoder).__name__}.")


def _build_head(head: Any, seed: int) -> Any:
    from sklearn.base import clone

    if isinstance(head, str):
        if head != "linear":
            raise ValueError(f"head must be 'linear' or a cbm head (e.g. cbm.LinearProbe(l1=1e-3)); got {head!r}.")
        from cbm import LinearProbe

        return LinearProbe(l1=1e-3, random_state=seed)
    from cbm import ConceptHead

    if not isinstance(head, ConceptHead):
        raise TypeError(f"head must be 'linear' or a cbm ConceptHead; got {type(head).__name__}.")
    return clone(head)


def _dictionary_quality(coder: Any, images: np.ndarray, unit_map: pd.DataFrame, names: pd.DataFrame,
                        max_images: int = 200) -> tuple[pd.DataFrame, dict[str, float]]:
    """FVU / dead fraction / L0 on the tokens of the first images, plus unit-map and naming statistics."""
    import torch

    from sae.metrics import dead_fraction, fvu, l0

    rows, _, _, _ = coder._extract(images[:max_images])
    codes = coder.sae_.transform(rows)
    codes_t = codes if isinstance(codes, torch.Tensor) else torch.as_tensor(np.asarray(codes))
    recon = coder.sae_.inverse_transform(codes_t)
    alive = names["alive"].to_numpy(dtype=bool)
    mapped = unit_map["mapped"].to_numpy(dtype=bool)
    agree = (names["name"].to_numpy() == unit_map["truth"].to_numpy()) & mapped
    q = {
        "fvu": fvu(rows, recon),
        "dead_fraction_tokens": dead_fraction(codes_t),
        "l0": l0(codes_t),
        "units": float(len(alive)),
        "units_alive_on_real": float(alive.sum()),
        "units_mapped_auroc_0.9": float(mapped.sum()),
        "concepts_covered": float(unit_map.loc[mapped, "truth"].nunique()),
        "median_unit_auroc": float(np.nanmedian(unit_map.loc[alive, "auroc"])) if alive.any() else float("nan"),
        "naming_agreement": float(agree.sum() / max(mapped.sum(), 1)),
    }
    table = pd.DataFrame({"metric": list(q), "value": list(q.values())})
    return table, q


def _coverage(energy: np.ndarray, labels: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    from concepts.world import Vocabulary
    from sae.metrics import auroc_per_latent

    vocab = Vocabulary()
    rows = []
    for c in labels.columns:
        y = labels[c].to_numpy(dtype=bool)
        if y.all() or not y.any():
            rows.append({"truth": c, "family": vocab.family(c), "frequency": float(y.mean()), "best_unit": -1,
                         "best_name": "", "auroc": float("nan")})
            continue
        auc = np.nan_to_num(np.asarray(auroc_per_latent(energy, y), dtype=float), nan=0.0)
        j = int(auc.argmax())
        rows.append({"truth": c, "family": vocab.family(c), "frequency": float(y.mean()), "best_unit": j,
                     "best_name": names[j], "auroc": float(auc[j])})
    return pd.DataFrame(rows)


def _rule_concepts(world: Any) -> dict[str, set[str]]:
    out = {}
    for r in getattr(world, "rules", ()):
        out[r.name] = set(r.all_of) | set(r.any_of)
    return out


def _rule_text(world: Any) -> dict[str, str]:
    return {r.name: r.describe() for r in getattr(world, "rules", ())}


def _pooled_delta(real: np.ndarray, gen: np.ndarray) -> float:
    a, b = float(real.sum()), float(gen.sum())
    return b / (a + b) if a + b > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# the audit
# ---------------------------------------------------------------------------------------------
def audit(
    encoder: Any = "builtin",
    sae: Any = None,
    *,
    generators: Sequence[Any] | Mapping[str, Any] | None = DEFAULT_GENERATORS,
    concept: str | None = "red",
    n: int = 400,
    seed: int = 0,
    device: str = "cpu",
    layer: str | None = None,
    n_concepts: int = 128,
    top_k: int = 8,
    sae_epochs: int = 10,
    head: Any = "linear",
    erasure_layer: str = "text_encoder",
    erasure_strength: float | None = None,
    n_erasure_prompts: int = 48,
    n_eval_prompts: int = 16,
    n_bootstrap: int = 200,
    world: Any = None,
    offline: bool = True,
    progress: bool = True,
) -> AuditResult:
    """Audit one encoder and one concept dictionary on ConceptWorld (see the module docstring for the steps).

    Parameters
    ----------
    encoder
        ``"builtin"`` (the built-in ConceptWorld CLIP), an encoder spec of
        :meth:`~evaluation.blindspots_coder.ConceptCoder.from_spec` (``"ViT-B-32:/path/ckpt"``, ``"dinov2:/path"``),
        an encoder object with ``extractor()`` or a ready :class:`~evaluation.blindspots_coder.ConceptCoder` (used as
        is: ``sae``, ``layer`` and the SAE settings below are then ignored; an unfitted coder is fitted on the renders).
    sae
        The concept dictionary: a fitted SAE, an SAE checkpoint folder (:func:`sae.load`), an unfitted SAE
        estimator (fitted here), or None (a ``TopKSAE(n_concepts, top_k)`` trained on the fly on the tokens of the
        ConceptWorld renders).
    generators
        Generators whose blindspots are measured: built-in names (``"conceptworld-diffusion"``,
        ``"conceptworld-ar"``), diffusers / Janus folders, ``world:...`` planted generators, Generator objects, or a
        mapping name -> Generator. Empty / None skips blindspots and erasure.
    concept
        The concept erased in the first generator: a ConceptWorld colour or shape; None skips the erasure.
    n
        ConceptWorld renders (real images, captions, labels); at least 60.
    seed
        Seed of the renders, the SAE, the generation seeds, the head split, bootstrap and permutations.
    device
        ``"cpu"``, ``"cuda"``, ``"mps"`` or ``"auto"``.
    layer
        Encoder layer whose tokens the SAE reads (default: the coder's default for the encoder).
    n_concepts, top_k, sae_epochs
        The SAE trained on the fly.
    head
        ``"linear"`` (:class:`cbm.LinearProbe` with a small L1 penalty) or an unfitted ``cbm`` head; it is trained
        on the concept energies (its concepts are the SAE units).
    erasure_layer, erasure_strength
        Generator layer of the inference-time LEACE eraser and the edit strength (see
        :func:`~evaluation.erasure.fit_inference_erasure`; strength 1 equalises the class means, larger values push
        the concept's prompts past the other class). Default strength: :data:`ERASURE_STRENGTHS` for the built-in
        generators (4 diffusion, 1.5 AR), :data:`DEFAULT_STRENGTH` otherwise.
    n_erasure_prompts
        Counterfactual caption pairs the eraser is fitted on (from a separate ConceptWorld sample).
    n_eval_prompts
        Prompts per set (target / retain / utility) of the single-object erasure evaluation.
    n_bootstrap
        Paired-bootstrap resamples of the blindspot confidence intervals.
    world
        A :class:`concepts.world.ConceptWorld` (e.g. with planted frequencies); default
        ``ConceptWorld(seed=seed, image_size=32)``.
    offline
        Never contact a model hub (sets ``HF_HUB_OFFLINE``).
    progress
        Progress bars.

    Returns
    -------
    AuditResult

    Raises
    ------
    ValueError
        Invalid settings (too few images, unknown concept, non-positive strength, an erasure layer the first
        generator lacks, a world with a single class, ...). A concept with no unit in the dictionary is not an error:
        its unit rows are left out of the erasure table and the report says so.
    TypeError
        Objects of the wrong kind (encoder, generator, head).
    FileNotFoundError
        A missing SAE checkpoint or generator folder.

    Examples
    --------
    >>> from evaluation.audit import audit
    >>> res = audit(n=300, generators=["conceptworld-diffusion"], concept="red")   # doctest: +SKIP
    >>> res.erasure.set_index("metric").loc["concept delta (SAE units)", ["before", "after"]]  # doctest: +SKIP
    >>> res.save("reports/audit")                                                  # doctest: +SKIP
    """
    from concepts.devices import resolve_device

    t_start = time.perf_counter()
    n = _check_int(n, "n", MIN_IMAGES)
    seed = _check_int(seed, "seed", 0)
    n_concepts = _check_int(n_concepts, "n_concepts", 2)
    top_k = _check_int(top_k, "top_k", 1)
    sae_epochs = _check_int(sae_epochs, "sae_epochs", 1)
    n_erasure_prompts = _check_int(n_erasure_prompts, "n_erasure_prompts", 2)
    n_eval_prompts = _check_int(n_eval_prompts, "n_eval_prompts", 1)
    n_bootstrap = _check_int(n_bootstrap, "n_bootstrap", 10)
    concept = _check_concept(concept)
    if erasure_strength is not None and (isinstance(erasure_strength, bool)
                                         or not isinstance(erasure_strength, numbers.Real) or not erasure_strength > 0):
        raise ValueError(f"erasure_strength must be a number > 0; got {erasure_strength!r}.")
    if top_k > n_concepts:
        raise ValueError(f"top_k ({top_k}) cannot exceed n_concepts ({n_concepts}).")
    specs = _generator_specs(generators)
    if concept is not None and not specs:
        raise ValueError(f"erasing {concept!r} needs a generator; pass generators=[...] or concept=None.")
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    dev = str(resolve_device(device))
    head_est = _build_head(head, seed)

    from concepts import zoo
    from concepts.world import ConceptWorld

    from .blindspots import find_blindspots
    from .blindspots_job import resolve_generator
    from .blindspots_world import detector_agreement, detector_comparison, unit_concept_map
    from .fidelity import compare_methods
    from .importance import GradientXInput, global_importance

    stages = ["concepts", "head", "blindspots", "erasure", "report"]
    bar = tqdm(total=len(stages), desc="audit", disable=not progress)
    timings: dict[str, float] = {}
    clock = {"name": None, "t": time.perf_counter()}

    def stage(name: str | None) -> None:
        now = time.perf_counter()
        if clock["name"] is not None:
            timings[clock["name"]] = round(now - clock["t"], 2)
        clock["name"], clock["t"] = name, now
        if name is not None:
            bar.set_postfix_str(name)

    # 1. real set and concept dictionary -----------------------------------------------------------
    stage("concepts")
    if world is None:
        world = ConceptWorld(seed=seed, image_size=IMAGE_SIZE)
    elif not callable(getattr(world, "sample", None)):
        raise TypeError(f"world must be a concepts.world.ConceptWorld; got {type(world).__name__}.")
    batch = world.sample(n, seed=seed)
    real, captions, labels = batch.images, list(batch.captions), batch.concepts
    y = np.asarray(batch.labels)
    order = np.random.default_rng(seed).permutation(n)
    n_train = (2 * n) // 3
    train, test = np.sort(order[:n_train]), np.sort(order[n_train:])
    if len(np.unique(y[train])) < 2:
        raise ValueError(f"the {n_train} training renders all have one class, so no head can be trained; use a "
                         "larger n or a world whose rules give several classes.")
    gens: dict[str, Any] = {}
    for name, g in specs:
        gens[name] = resolve_generator(g, device=dev, image_size=IMAGE_SIZE, offline=offline) if isinstance(g, str) else g
    if concept is not None:
        first = next(iter(gens))
        if not (callable(getattr(gens[first], "module_names", None))
                and callable(getattr(gens[first], "run_with_hooks", None))):
            raise ValueError(
                f"generator {first!r} exposes no layers (module_names / run_with_hooks), so '{concept}' cannot be erased "
                "in it; put a built-in, diffusers or Janus generator first, or pass concept=None.")
        layers = gens[first].module_names()
        if erasure_layer not in layers:
            raise ValueError(f"generator {first!r} has no layer {erasure_layer!r}; pass erasure_layer= one of "
                             f"{layers[:8]} ...")
    coder = _build_coder(encoder, sae, layer=layer, device=dev, n_concepts=n_concepts, top_k=top_k,
                         sae_epochs=sae_epochs, seed=seed, progress=progress)
    if not hasattr(coder, "sae_"):
        coder.fit(real)
    real_energy = coder.transform(real)
    E = real_energy.energy
    names_df = coder.names_.copy()
    unit_names = names_df["name"].tolist()
    labelled = [f"#{j} {nm}" for j, nm in enumerate(unit_names)]
    unit_map = unit_concept_map(real_energy, labels)
    quality, q = _dictionary_quality(coder, real, unit_map, names_df)
    coverage = _coverage(E, labels, unit_names)
    top_images = np.argsort(-E, axis=0, kind="stable")[:6].T  # [K, 6]
    concepts_df = names_df.merge(unit_map, on="concept", how="left")
    concepts_df["name_matches_truth"] = concepts_df["mapped"] & (concepts_df["name"] == concepts_df["truth"])
    concepts_df["frequency"] = (E > 0).mean(0)
    concepts_df["mean_energy"] = E.mean(0)
    concepts_df["exemplars"] = [" ".join(str(int(i)) for i in row if E[i, j] > 0) for j, row in enumerate(top_images)]
    bar.update(1)

    # 2. downstream head and concept importance ----------------------------------------------------
    stage("head")
    head_fit = head_est.fit(E[train], y[train])
    class_names = list(batch.class_names)
    acc_real = float(head_fit.score(E[test], y[test]))
    known = np.isin(y[test], head_fit.classes_)
    xt, yt = E[test][known], y[test][known]
    comparison = compare_methods(head_fit, xt, target=[int(np.flatnonzero(head_fit.classes_ == v)[0]) for v in yt],
                                 methods=IMPORTANCE_METHODS, seed=seed, progress=False)
    comparison = dataclasses.replace(comparison, concept_names=labelled)
    phi_real = comparison.phi["gradient_input"]
    rules = _rule_concepts(world)
    truth_of = dict(zip(unit_map["concept"], unit_map["truth"]))
    mapped_of = dict(zip(unit_map["concept"], unit_map["mapped"]))
    glob = global_importance(phi_real, labelled, [class_names[int(v)] for v in yt], method="gradient_input")
    unit_idx = {lab: j for j, lab in enumerate(labelled)}
    glob["unit"] = glob["concept"].map(unit_idx)
    glob["truth"] = glob["unit"].map(truth_of)
    glob["rule_concept"] = [bool(mapped_of.get(u)) and any(_involves(str(truth_of.get(u, "")), rc) or
                                                         _involves(rc, str(truth_of.get(u, "")))
                                                         for rc in rules.get(c, ()))
                            for c, u in zip(glob["class"], glob["unit"])]
    rule_rows = []
    for c, grp in glob.groupby("class", sort=False):
        if c not in rules:
            continue
        top = grp.sort_values("rank").head(5)
        rule_rows.append({"class": c, "rule": _rule_text(world).get(c, ""), "n_images": int(top["n_images"].iloc[0]),
                          "top concepts": ", ".join(top["concept"]), "rule concept in top 5": bool(top["rule_concept"].any())})
    rule_check = pd.DataFrame(rule_rows)
    bar.update(1)

    # 3. blindspots (with the erased generator alongside) -------------------------------------------
    stage("blindspots")
    erased_name = None
    erasure_fit = None
    fit_time = float("nan")
    if concept is not None:
        from .erasure import fit_inference_erasure

        first = next(iter(gens))
        base = gens[first]
        fit_batch = world.sample(max(8 * n_erasure_prompts, 200), seed=seed + 10_007)
        tgt, cf = counterfactual_captions(fit_batch, concept, seed=seed)
        tgt, cf = tgt[:n_erasure_prompts], cf[:n_erasure_prompts]
        t0 = time.perf_counter()
        erasure_fit = fit_inference_erasure(base, erasure_layer, tgt, cf, method="leace", anchor="other",
                                            seeds=seed + 50_000)
        fit_time = time.perf_counter() - t0
        if erasure_strength is None:
            erasure_strength = ERASURE_STRENGTHS.get(str(getattr(base, "model_id", first)),
                                                     ERASURE_STRENGTHS.get(first, DEFAULT_STRENGTH))
        erased_name = f"{first} (erased '{concept}')"
        gens[erased_name] = erasure_fit.apply(base, float(erasure_strength))
    analysis = None
    blind_summary = pd.DataFrame()
    detector = zoo.load("conceptworld-detector", device=dev)
    if gens:
        analysis = find_blindspots(real, captions, generators=gens, coder=coder, seed=seed, progress=progress,
                                   n_bootstrap=n_bootstrap)
        analysis.extras["unit_map"] = unit_map
        analysis.extras["detector"], analysis.extras["agreement"] = {}, {}
        rows = []
        for g, imgs in analysis.generated.items():
            det = detector_comparison(detector, real, imgs, n_bootstrap=min(n_bootstrap, 200), seed=seed)
            agree = detector_agreement(analysis.results[g].concepts, unit_map, det)
            analysis.extras["detector"][g], analysis.extras["agreement"][g] = det, agree
            rows.append({"generator": g, **analysis.results[g].summary(),
                         "detector_flagged": int(det["status"].isin(("suppressed", "exaggerated")).sum()),
                         "agreement_precision": agree["precision"], "agreement_recall": agree["recall"],
                         "delta_spearman": agree["delta_spearman"]})
        analysis.extras["notes"] = [
            f"{int(unit_map['mapped'].sum())} of {len(unit_map)} SAE units predict one ConceptWorld label with AUROC "
            f">= 0.9 ({unit_map.loc[unit_map['mapped'], 'truth'].nunique()} distinct concepts)."]
        blind_summary = pd.DataFrame(rows)
    bar.update(1)

    # 4. erasure: delta collapsing, importance vanishing, utility cost ------------------------------
    stage("erasure")
    erasure_rows: list[dict[str, Any]] = []
    erasure_detail = pd.DataFrame(columns=["metric", "kind", "original", "erased", "delta"])
    erasure_result = None
    units: list[int] = []
    if concept is not None and analysis is not None:
        from .erasure import erasure_prompt_sets, evaluate_erasure, load_builtin_clip_encoder

        first = next(iter(specs))[0]
        units = concept_units(unit_map, concept)
        ask = labels[concept].to_numpy(dtype=bool) if concept in labels.columns else np.zeros(n, bool)
        res0, res1 = analysis.results[first], analysis.results[erased_name]

        def add(metric: str, kind: str, before: float, after: float, note: str = "") -> None:
            erasure_rows.append({"metric": metric, "kind": kind, "before": before, "after": after,
                                 "change": after - before, "note": note})

        if units and ask.any():
            add("concept delta (SAE units)", "delta", _pooled_delta(E[ask][:, units], res0.gen_energy[ask][:, units]),
                _pooled_delta(E[ask][:, units], res1.gen_energy[ask][:, units]),
                f"E_gen / (E_real + E_gen) of the {len(units)} units of '{concept}' on the {int(ask.sum())} pairs "
                "whose caption asks for it (0.5 = parity, 0 = never drawn)")
        d_real = detector.detect(real[ask])[concept].to_numpy(dtype=float) if ask.any() else np.zeros(0)
        if ask.any():
            d0 = detector.detect(analysis.generated[first][ask])[concept].to_numpy(dtype=float)
            d1 = detector.detect(analysis.generated[erased_name][ask])[concept].to_numpy(dtype=float)
            add("concept delta (detector)", "delta", _pooled_delta(d_real, d0), _pooled_delta(d_real, d1),
                "the same delta on the ConceptWorld detector's 0/1 reading of the concept (ground truth)")
            add("concept detected on its pairs", "delta", float(d0.mean()), float(d1.mean()),
                f"share of generations of those pairs where the detector finds '{concept}' (real: {d_real.mean():.2f})")
        if units and ask.sum() >= 2:
            from .blindspots import compare_energies

            flags = []
            for res in (res0, res1):
                sub = compare_energies(E[ask][:, units], res.gen_energy[ask][:, units], n_bootstrap=n_bootstrap,
                                       pairs=False, seed=seed, min_support=min(10, int(ask.sum())))
                flags.append(float((sub.concepts["status"] == "suppressed").sum()))
            add("concept units flagged suppressed", "delta", flags[0], flags[1],
                f"of {len(units)} units: the blindspot test (sign-flip, BH-FDR, delta < 0.2) on the pairs whose "
                "caption asks for the concept")
        # importance of the concept's units for the head, on generated images of the concept's pairs
        concept_classes = [c for c, rc in rules.items() if any(_involves(r, concept) for r in rc)]
        sel = ask & np.isin(y, [class_names.index(c) for c in concept_classes]) if concept_classes else ask
        sel &= np.isin(y, head_fit.classes_)
        if units and sel.any():
            gxi = GradientXInput(head_fit)
            tgt_idx = [int(np.flatnonzero(head_fit.classes_ == v)[0]) for v in y[sel]]
            phis = {k: gxi.attribute(v[sel], target=tgt_idx).numpy()
                    for k, v in (("real", E), ("before", res0.gen_energy), ("after", res1.gen_energy))}
            where = f"classes {concept_classes}" if concept_classes else f"pairs with '{concept}'"
            add("importance of the concept's units", "importance", float(phis["before"][:, units].sum(1).mean()),
                float(phis["after"][:, units].sum(1).mean()),
                f"Gradient x Input of the head for the true class, summed over the concept's units, mean over the "
                f"{int(sel.sum())} generated images of {where} (real images: {phis['real'][:, units].sum(1).mean():.3g})")
            share = {k: float(np.abs(p[:, units]).sum() / max(np.abs(p).sum(), 1e-12)) for k, p in phis.items()}
            add("share of |importance| on the concept's units", "importance", share["before"], share["after"],
                f"real images: {share['real']:.3g}")
        other = ~ask & np.isin(y, head_fit.classes_)
        if other.any():
            add("head accuracy, pairs without the concept", "utility",
                float(head_fit.score(res0.gen_energy[other], y[other])),
                float(head_fit.score(res1.gen_energy[other], y[other])),
                f"{int(other.sum())} generated images; the head reads the SAE energies")
        sets = erasure_prompt_sets(concept, n_target=n_eval_prompts, n_retain=max(n_eval_prompts, 5),
                                   n_utility=n_eval_prompts, seed=seed, seed_offset=seed + 100_000,
                                   image_size=IMAGE_SIZE)
        erasure_result = evaluate_erasure(gens[first], gens[erased_name], concept, sets, detector=detector,
                                          encoder=load_builtin_clip_encoder(dev), progress=False)
        erasure_detail = erasure_result.summary()
        s = erasure_detail.set_index("metric")
        for metric, kind, label in (("target_detection", "delta", "single-object prompts: concept detected"),
                                    ("retain_colour", "utility", "retain prompts: asked colour drawn"),
                                    ("retain_shape", "utility", "retain prompts: asked shape drawn"),
                                    ("utility_clip_score", "utility", "unrelated prompts: CLIP score"),
                                    ("utility_concept_shift", "utility", "unrelated prompts: concept shift")):
            if metric in s.index:
                add(label, kind, float(s.loc[metric, "original"]), float(s.loc[metric, "erased"]),
                    f"{metric} of evaluate_erasure ({n_eval_prompts} prompts per set)")
    erasure_df = pd.DataFrame(erasure_rows, columns=["metric", "kind", "before", "after", "change", "note"])
    bar.update(1)

    # 5. report ------------------------------------------------------------------------------------
    stage("report")
    e = erasure_df.set_index("metric") if len(erasure_df) else pd.DataFrame()

    def ev(metric: str, col: str) -> float:
        return float(e.loc[metric, col]) if metric in getattr(e, "index", []) else float("nan")

    wall = time.perf_counter() - t_start
    headline = {
        "fvu": q["fvu"], "units_mapped": int(q["units_mapped_auroc_0.9"]), "concepts_covered": int(q["concepts_covered"]),
        "naming_agreement": q["naming_agreement"], "head_accuracy_real": acc_real,
        "importance_mufidelity": float(comparison.table.loc["gradient_input", "c_mufidelity"])
        if "c_mufidelity" in comparison.table else float("nan"),
        "rule_recovery": float(rule_check["rule concept in top 5"].mean()) if len(rule_check) else float("nan"),
        **{f"flagged[{r['generator']}]": int(r["suppressed"] + r["exaggerated"]) for _, r in blind_summary.iterrows()},
        "concept": concept,
        "concept_delta_before": ev("concept delta (SAE units)", "before"),
        "concept_delta_after": ev("concept delta (SAE units)", "after"),
        "detector_delta_before": ev("concept delta (detector)", "before"),
        "detector_delta_after": ev("concept delta (detector)", "after"),
        "importance_before": ev("importance of the concept's units", "before"),
        "importance_after": ev("importance of the concept's units", "after"),
        "wall_seconds": round(wall, 1),
    }
    settings = {
        "encoder": coder.describe(), "sae_given": sae is not None, "generators": list(gens), "concept": concept,
        "n": n, "seed": seed, "device": dev, "n_concepts": int(len(unit_names)), "head": type(head_fit).__name__,
        "head_train": int(len(train)), "head_test": int(len(test)), "erasure_layer": erasure_layer if concept else None,
        "erasure_strength": float(erasure_strength) if concept else None,
        "erasure_fit_pairs": int(n_erasure_prompts) if concept else None, "erasure_fit_seconds": fit_time,
        "concept_units": units, "n_bootstrap": n_bootstrap, "stage_seconds": timings, "headline": headline,
    }
    from .audit_report import build_report

    report = build_report(
        batch=batch, coder=coder, quality=quality, concepts=concepts_df, coverage=coverage, top_images=top_images, energy=E,
        comparison=comparison, global_table=glob, rule_check=rule_check, head_accuracy=acc_real,
        analysis=analysis, blind_summary=blind_summary, erasure=erasure_df, erasure_result=erasure_result,
        concept=concept, concept_units=units, settings=settings)
    bar.update(1)
    bar.close()
    stage(None)
    settings["stage_seconds"] = timings
    settings["headline"]["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    duplicates = {"importance_fidelity", "blindspots_concepts"}  # saved as .importance / .blindspots
    extra = {k: v for k, v in report._tables.items() if k not in duplicates}
    extra["importance_rule_check"] = rule_check
    if analysis is not None:
        extra.setdefault("blindspots_pairs", analysis.pair_tables())
    artifacts = {"coder": coder, "head": head_fit, "analysis": analysis, "erasure": erasure_fit,
                 "erasure_result": erasure_result, "comparison": comparison, "batch": batch, "unit_map": unit_map,
                 "generators": gens, "report": report}
    blindspots = analysis.concept_table() if analysis is not None else pd.DataFrame()
    logger.info("audit finished in %.1f s", wall)
    return AuditResult(concepts=concepts_df, coverage=coverage, quality=quality, blindspots=blindspots,
                       blindspot_summary=blind_summary, importance=comparison.table, importance_global=glob,
                       erasure=erasure_df, erasure_detail=erasure_detail, settings=settings, html=report.to_html(),
                       tables=extra, artifacts=artifacts)

