"""Conceptual blindspots of image generators: which concepts a generator under- or over-produces.

The method follows Bohacek et al. (*Uncovering conceptual blindspots in generative image models using
sparse autoencoders*, 2025; research notes in ``analysis-anchors.md`` §1) and adds the statistics the
anchor lacks. One generated image is made per real image, prompted with that image's caption (with a
recorded seed), so the two sets are **paired by caption**. Both sets go through the same frozen encoder
and sparse autoencoder (:class:`~evaluation.blindspots_coder.ConceptCoder`), which turns each image into a
vector of non-negative per-concept energies ``e_k(x)`` (SAE codes pooled over tokens).

Per concept ``k`` (one SAE unit):

* ``E_real = mean_i e_k(x_i)`` and ``E_gen = mean_i e_k(x'_i)`` (activation mass per image; also per token);
* ``diff = E_gen - E_real``; ``rel_diff = diff / (E_real + E_gen)`` (the anchor's ``relative_energy_diff``);
* ``delta = E_gen / (E_real + E_gen)`` in (0, 1), 0.5 = parity, small = suppressed, large = exaggerated.

Why this ``delta`` (documented choice). The paper writes ``delta(k) = p_k(D') / (p_k(D) + p_k(D'))`` and the
released code plots ``sigmoid(diff / T)`` with ``T = 0.8``; the latter depends on the energy scale (a
different SAE, a different pooling or a larger image changes ``diff`` and so which concepts pass a 0.1/0.9
threshold). Reading ``p_k(D)`` as the concept's activation mass in ``D`` gives the scale-free
``delta = E_gen / (E_real + E_gen) = sigmoid(log E_gen - log E_real)`` -- the anchor's sigmoid of an energy
difference with energy ``xi = -log(mass)`` and ``T = 1``. It does not change when the codes are rescaled,
``rel_diff = 2 * delta - 1``, and the thresholds read as fold changes: ``delta < 0.2`` means the generator
produces less than a quarter of the concept's real activation mass, ``delta > 0.8`` more than four times it.

Statistics (what the anchor lacks):

* **confidence interval**: paired bootstrap over caption pairs (resample pair indices, recompute ``delta``
  and ``diff``), percentile interval;
* **p-value**: paired sign-flip permutation test. Under the null hypothesis that, within a pair, the real and
  the generated image are exchangeable, the sign of ``d_i = e_k(x'_i) - e_k(x_i)`` is a fair coin. Because
  ``E_real + E_gen`` does not change under a swap, ``delta - 0.5`` is proportional to ``sum_i d_i``, so the
  sign-flip test on ``sum_i d_i`` is exactly the permutation test of ``delta``. Monte-Carlo p-values are
  ``(1 + #{|T*| >= |T|}) / (B + 1)``; ``test="normal"`` uses the conditional normal approximation
  ``z = sum d_i / sqrt(sum d_i^2)`` (exact first two moments of the sign-flip distribution) for very many
  concepts; ``test="auto"`` uses permutations when ``B = 2 K / fdr`` is affordable;
* **multiple testing**: Benjamini-Hochberg q-values over the concepts with enough support;
* **support filter**: a concept is tested only when it fires (energy > 0) in at least ``min_support`` pairs
  (in either image). The count is invariant under the sign flips, so filtering on it keeps the tests valid.

``status`` is ``"suppressed"`` when ``q <= fdr`` **and** ``delta < lambda_min``, ``"exaggerated"`` when
``q <= fdr`` **and** ``delta > lambda_max``, ``"insufficient_support"`` when untested, and ``"aligned"``
otherwise. Requiring both a significant test and a large effect is what makes a null comparison (two
independent samples of one distribution) flag nothing: FDR control alone would still flag tiny, real but
irrelevant shifts in large samples, and a threshold alone flags noise in rare concepts.

Per pair, :func:`pair_table` gives the distance between the two energy vectors, the concepts most
suppressed / exaggerated in that pair, the pixel similarity to the real image, and flags memorization
candidates (smallest distances *and* near-copies in pixels) and blindspot candidates (largest distances).
Across generators, :func:`compare_generators` correlates the deltas.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> real = rng.exponential(1.0, (300, 4))
>>> gen = real[rng.permutation(300)] * np.array([1.0, 0.05, 1.0, 8.0])   # unit 1 suppressed, 3 exaggerated
>>> res = compare_energies(real, gen, n_bootstrap=200, seed=0)
>>> res.concepts["status"].tolist()
['aligned', 'suppressed', 'aligned', 'exaggerated']
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "STATUSES",
    "DEFAULTS",
    "BlindspotResult",
    "benjamini_hochberg",
    "sign_flip_pvalues",
    "bootstrap_intervals",
    "compare_energies",
    "pair_table",
    "pixel_similarity",
    "compare_generators",
    "concept_status",
    "generate_images",
    "BlindspotAnalysis",
    "find_blindspots",
]

STATUSES: tuple[str, ...] = ("suppressed", "exaggerated", "aligned", "insufficient_support")
"""The possible values of the ``status`` column."""

DEFAULTS: dict[str, Any] = {
    "fdr": 0.05,
    "lambda_min": 0.2,
    "lambda_max": 0.8,
    "min_support": 10,
    "n_bootstrap": 1000,
    "n_permutations": None,
    "max_permutations": 50_000,
    "test": "auto",
    "ci": 0.95,
    "top_k": 3,
    "candidate_quantile": 0.01,
    "memorization_similarity": 0.95,
}
"""Default settings of :func:`compare_energies` and :func:`pair_table` (the thresholds of the status)."""

CONCEPT_COLUMNS: tuple[str, ...] = (
    "concept", "name", "E_real", "E_gen", "E_real_per_token", "E_gen_per_token", "diff", "rel_diff", "delta",
    "delta_ci_low", "delta_ci_high", "diff_ci_low", "diff_ci_high", "p_value", "q_value", "nb_fire_real",
    "nb_fire_gen", "tokens_fired_real", "tokens_fired_gen", "support", "status",
)


# ---------------------------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------------------------
def _as_energy(x: Any, what: str) -> np.ndarray:
    """A float64 matrix ``[n, K]`` of non-negative finite energies (accepts ConceptEnergies, tensors, arrays)."""
    if hasattr(x, "energy") and not isinstance(x, np.ndarray):
        x = x.energy
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be a numeric array [n_pairs, n_concepts]; got {type(x).__name__}.") from exc
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D [n_pairs, n_concepts]; got shape {arr.shape}.")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"{what} needs at least 2 pairs and 1 concept; got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} contains NaN or infinite energies; check the encoder / SAE outputs.")
    if (arr < 0).any():
        raise ValueError(
            f"{what} has negative energies (min {arr.min():.3g}); concept energies are non-negative SAE codes "
            "pooled over tokens. Use an SAE with non-negative codes (TopK, ReLU, JumpReLU, ...)."
        )
    return arr


def _check_fraction(value: Any, name: str, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in ({low}, {high}); got {type(value).__name__}.")
    v = float(value)
    if not low < v < high:
        raise ValueError(f"{name} must lie strictly between {low} and {high}; got {v}.")
    return v


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def benjamini_hochberg(p_values: np.ndarray | Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg q-values (step-up, monotone, capped at 1); NaN p-values stay NaN and are not counted.

    Parameters
    ----------
    p_values
        ``[m]`` p-values in [0, 1] (NaN = not tested).

    Returns
    -------
    numpy.ndarray
        ``[m]`` q-values: the smallest FDR level at which each hypothesis is rejected.

    Examples
    --------
    >>> benjamini_hochberg([0.01, 0.04, 0.03, 0.5]).round(3).tolist()
    [0.04, 0.053, 0.053, 0.5]
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D; got shape {p.shape}.")
    ok = ~np.isnan(p)
    if ((p[ok] < 0) | (p[ok] > 1)).any():
        raise ValueError("p_values must lie in [0, 1] (NaN marks untested hypotheses).")
    q = np.full_like(p, np.nan)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv, kind="mergesort")
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


def sign_flip_pvalues(
    d: np.ndarray,
    *,
    n_permutations: int = 10_000,
    test: str = "permutation",
    seed: int = 0,
    chunk: int = 512,
    progress: bool = False,
) -> np.ndarray:
    """Two-sided paired sign-flip p-values of ``sum_i d[i, k] = 0`` for every column ``k``.

    Parameters
    ----------
    d
        ``[n, K]`` per-pair differences (generated minus real).
    n_permutations
        Monte-Carlo sign-flip draws ``B`` (``test="permutation"``); the smallest p-value is ``1 / (B + 1)``.
    test
        ``"permutation"`` (Monte-Carlo, exact in distribution) or ``"normal"`` (conditional normal
        approximation ``z = sum d / sqrt(sum d^2)``).
    seed
        Seed of the sign draws (the same draws are used for every column).
    chunk
        Sign vectors per matrix product (bounds memory to ``chunk x K``).
    progress
        Show a progress bar.

    Returns
    -------
    numpy.ndarray
        ``[K]`` p-values; columns with all-zero differences get 1.

    Examples
    --------
    >>> d = np.r_[np.ones((20, 1)), np.zeros((20, 1))]     # 20 pairs all in one direction
    >>> float(sign_flip_pvalues(d, n_permutations=4000, seed=0)[0]) < 0.001
    True
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"d must be 2-D [n_pairs, n_concepts]; got shape {d.shape}.")
    if test not in ("permutation", "normal"):
        raise ValueError(f"test must be 'permutation' or 'normal'; got {test!r}.")
    n, k = d.shape
    t_obs = np.abs(d.sum(0))
    ss = (d ** 2).sum(0)
    zero = ss == 0
    if test == "normal":
        from scipy.stats import norm

        z = np.where(zero, 0.0, t_obs / np.sqrt(np.where(zero, 1.0, ss)))
        return np.where(zero, 1.0, np.minimum(1.0, 2.0 * norm.sf(z)))
    b = _check_int(n_permutations, "n_permutations", 1)
    rng = np.random.default_rng(seed)
    # a relative tolerance makes ties (|T*| == |T| up to rounding) count as "at least as extreme"
    thresh = t_obs - 1e-9 * np.maximum(1.0, np.abs(d).sum(0))
    count = np.zeros(k, dtype=np.int64)
    done = 0
    with tqdm(total=b, desc="sign-flip test", disable=not progress, leave=False) as bar:
        while done < b:
            m = min(chunk, b - done)
            signs = rng.integers(0, 2, size=(m, n), dtype=np.int8).astype(np.float64) * 2.0 - 1.0
            count += (np.abs(signs @ d) >= thresh).sum(0)
            done += m
            bar.update(m)
    p = (1.0 + count) / (b + 1.0)
    p[zero] = 1.0
    return p


def bootstrap_intervals(
    real: np.ndarray,
    gen: np.ndarray,
    *,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    chunk: int = 128,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Paired-bootstrap percentile intervals of ``delta`` and ``diff`` per concept.

    Pair indices are resampled with replacement (a real image and its generated counterpart stay together).

    Parameters
    ----------
    real, gen
        ``[n, K]`` per-image energies, row ``i`` of both from pair ``i``.
    n_bootstrap
        Resamples.
    ci
        Coverage of the interval.
    seed
        Seed of the resampling.
    chunk
        Resamples per matrix product.
    progress
        Show a progress bar.

    Returns
    -------
    dict
        ``delta_low``, ``delta_high``, ``diff_low``, ``diff_high``: ``[K]`` arrays (NaN where a concept never
        fires).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> r = rng.exponential(size=(200, 1)); g = 3 * rng.exponential(size=(200, 1))
    >>> iv = bootstrap_intervals(r, g, n_bootstrap=300)
    >>> bool(iv["delta_low"][0] < 0.75 < iv["delta_high"][0])
    True
    """
    real = np.asarray(real, dtype=np.float64)
    gen = np.asarray(gen, dtype=np.float64)
    if real.shape != gen.shape:
        raise ValueError(f"real {real.shape} and gen {gen.shape} must have the same shape [n_pairs, n_concepts].")
    b = _check_int(n_bootstrap, "n_bootstrap", 1)
    ci = _check_fraction(ci, "ci")
    n, k = real.shape
    rng = np.random.default_rng(seed)
    deltas = np.empty((b, k))
    diffs = np.empty((b, k))
    done = 0
    with tqdm(total=b, desc="bootstrap", disable=not progress, leave=False) as bar:
        while done < b:
            m = min(chunk, b - done)
            w = rng.multinomial(n, np.full(n, 1.0 / n), size=m).astype(np.float64) / n  # [m, n]
            er, eg = w @ real, w @ gen
            tot = er + eg
            with np.errstate(invalid="ignore", divide="ignore"):
                deltas[done:done + m] = np.where(tot > 0, eg / np.where(tot > 0, tot, 1.0), np.nan)
            diffs[done:done + m] = eg - er
            done += m
            bar.update(m)
    alpha = (1.0 - ci) / 2.0
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (never-firing concepts)
            lo, hi = np.nanquantile(deltas, [alpha, 1 - alpha], axis=0)
    dlo, dhi = np.quantile(diffs, [alpha, 1 - alpha], axis=0)
    return {"delta_low": lo, "delta_high": hi, "diff_low": dlo, "diff_high": dhi}


def concept_status(
    delta: np.ndarray, q_value: np.ndarray, tested: np.ndarray, *, fdr: float, lambda_min: float, lambda_max: float,
) -> np.ndarray:
    """The ``status`` of each concept from its delta, q-value and support (see the module docstring).

    Examples
    --------
    >>> concept_status(np.array([0.05, 0.95, 0.5, 0.05]), np.array([0.01, 0.01, 0.01, 0.2]),
    ...                np.array([True, True, True, True]), fdr=0.05, lambda_min=0.2, lambda_max=0.8).tolist()
    ['suppressed', 'exaggerated', 'aligned', 'aligned']
    """
    status = np.full(len(delta), "aligned", dtype=object)
    sig = tested & (np.nan_to_num(q_value, nan=1.0) <= fdr)
    status[sig & (delta < lambda_min)] = "suppressed"
    status[sig & (delta > lambda_max)] = "exaggerated"
    status[~tested] = "insufficient_support"
    return status


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class BlindspotResult:
    """Real-vs-generated comparison of one generator.

    Attributes
    ----------
    concepts
        One row per concept (SAE unit): columns :data:`CONCEPT_COLUMNS` (``concept`` = unit index, ``name``,
        energies, ``diff``, ``rel_diff``, ``delta`` with its bootstrap interval, ``p_value``, ``q_value``,
        firing counts, ``support`` and ``status``).
    pairs
        One row per caption pair (see :func:`pair_table`); empty if not computed.
    settings
        The thresholds and test settings used (JSON-friendly).
    real_energy, gen_energy
        The per-image energies ``[n, K]`` that were compared (used for image strips).

    Examples
    --------
    >>> # res = compare_energies(real, gen); res.flagged()[["name", "delta", "q_value", "status"]]
    """

    concepts: pd.DataFrame
    pairs: pd.DataFrame
    settings: dict[str, Any]
    real_energy: np.ndarray = field(repr=False)
    gen_energy: np.ndarray = field(repr=False)

    def flagged(self) -> pd.DataFrame:
        """Rows of suppressed and exaggerated concepts, most extreme delta first."""
        c = self.concepts
        out = c[c["status"].isin(("suppressed", "exaggerated"))]
        return out.assign(_ext=(out["delta"] - 0.5).abs()).sort_values("_ext", ascending=False).drop(columns="_ext")

    def summary(self) -> dict[str, Any]:
        """Counts per status, number of tested concepts and the median delta (JSON-friendly)."""
        c = self.concepts
        counts = c["status"].value_counts()
        tested = c["status"] != "insufficient_support"
        return {
            "n_pairs": int(self.real_energy.shape[0]),
            "n_concepts": int(len(c)),
            "n_tested": int(tested.sum()),
            **{s: int(counts.get(s, 0)) for s in STATUSES},
            "median_delta": float(np.nanmedian(c.loc[tested, "delta"])) if tested.any() else float("nan"),
        }

    def _repr_html_(self, max_rows: int = 20) -> str:
        """Notebook view: the status counts and the flagged concepts, most extreme delta first."""
        import html

        s = self.summary()
        counts = ", ".join(f"{k}: {s[k]}" for k in STATUSES)
        cols = [c for c in ("concept", "name", "E_real", "E_gen", "delta", "delta_ci_low", "delta_ci_high", "q_value",
                            "status") if c in self.concepts.columns]
        flagged = self.flagged()[cols]
        table = (flagged.head(max_rows).to_html(index=False, float_format="{:.3g}".format) if len(flagged)
                 else "<p>No concept is flagged.</p>")
        more = f"<p>... {len(flagged) - max_rows} more flagged concepts</p>" if len(flagged) > max_rows else ""
        return (f"<div><b>BlindspotResult</b>: {s['n_pairs']} caption pairs, {s['n_tested']} of {s['n_concepts']} "
                f"concepts tested ({html.escape(counts)}); median delta {s['median_delta']:.3f}{table}{more}</div>")


def compare_energies(
    real: Any,
    gen: Any,
    *,
    names: Sequence[str] | None = None,
    fdr: float = DEFAULTS["fdr"],
    lambda_min: float = DEFAULTS["lambda_min"],
    lambda_max: float = DEFAULTS["lambda_max"],
    min_support: int = DEFAULTS["min_support"],
    n_bootstrap: int = DEFAULTS["n_bootstrap"],
    n_permutations: int | None = DEFAULTS["n_permutations"],
    max_permutations: int = DEFAULTS["max_permutations"],
    test: str = DEFAULTS["test"],
    ci: float = DEFAULTS["ci"],
    seed: int = 0,
    real_fired: Any = None,
    gen_fired: Any = None,
    tokens_per_image: float | None = None,
    pairs: bool = True,
    pair_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> BlindspotResult:
    """Compare per-concept energies of paired real and generated images.

    Parameters
    ----------
    real, gen
        ``[n_pairs, n_concepts]`` non-negative per-image energies (arrays, tensors or
        :class:`~evaluation.blindspots_coder.ConceptEnergies`); row ``i`` of both belongs to caption ``i``.
    names
        One name per concept (default ``"unit k"``), e.g. from :func:`concepts.naming.name_concepts`.
    fdr
        Benjamini-Hochberg false discovery rate for the ``q_value <= fdr`` rule.
    lambda_min, lambda_max
        Effect-size thresholds on ``delta``: suppressed below ``lambda_min``, exaggerated above ``lambda_max``
        (0.2 / 0.8 = four-fold less / more activation mass).
    min_support
        Pairs in which a concept must fire (in either image) to be tested.
    n_bootstrap
        Paired-bootstrap resamples of the confidence interval.
    n_permutations
        Sign-flip draws; ``None`` picks ``max(999, ceil(2 * K_tested / fdr))`` so that one true discovery
        among ``K_tested`` concepts can reach ``q <= fdr``.
    max_permutations
        With ``test="auto"``, use the normal approximation instead when the draws needed exceed this.
    test
        ``"auto"``, ``"permutation"`` or ``"normal"`` (see :func:`sign_flip_pvalues`).
    ci
        Coverage of the bootstrap interval.
    seed
        Seed of the bootstrap and of the sign flips.
    real_fired, gen_fired
        Optional ``[n, K]`` numbers of tokens on which each concept fires (``tokens_fired_*`` columns);
        taken from ConceptEnergies inputs automatically.
    tokens_per_image
        Tokens pooled per image (for the per-token energies); taken from ConceptEnergies automatically.
    pairs
        Also compute the per-pair table (:func:`pair_table`).
    pair_kwargs
        Extra arguments of :func:`pair_table` (``captions``, ``seeds``, ``real_images``, ``gen_images`` ...).
    progress
        Progress bars for the bootstrap and the permutations.

    Returns
    -------
    BlindspotResult

    Raises
    ------
    ValueError
        Mismatched shapes, negative or non-finite energies, thresholds out of range.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> a, b = rng.exponential(size=(200, 3)), rng.exponential(size=(200, 3))   # same distribution
    >>> bool((compare_energies(a, b, n_bootstrap=100).concepts["status"] == "aligned").all())
    True
    """
    tokens_real = getattr(real, "n_tokens", None)
    if real_fired is None and hasattr(real, "fired"):
        real_fired = real.fired
    if gen_fired is None and hasattr(gen, "fired"):
        gen_fired = gen.fired
    R = _as_energy(real, "real")
    G = _as_energy(gen, "gen")
    if R.shape != G.shape:
        raise ValueError(
            f"real has shape {R.shape} but gen has shape {G.shape}; pass one generated image per real image "
            "(same number of rows, paired by row) encoded with the same encoder and SAE (same number of concepts)."
        )
    fdr = _check_fraction(fdr, "fdr")
    lambda_min = _check_fraction(lambda_min, "lambda_min")
    lambda_max = _check_fraction(lambda_max, "lambda_max")
    if not lambda_min < 0.5 < lambda_max:
        raise ValueError(
            f"need lambda_min < 0.5 < lambda_max (0.5 = parity); got lambda_min={lambda_min}, lambda_max={lambda_max}."
        )
    min_support = _check_int(min_support, "min_support", 1)
    if test not in ("auto", "permutation", "normal"):
        raise ValueError(f"test must be 'auto', 'permutation' or 'normal'; got {test!r}.")
    n, k = R.shape
    if names is None:
        names = [f"unit {j}" for j in range(k)]
    names = [str(x) for x in names]
    if len(names) != k:
        raise ValueError(f"got {len(names)} names for {k} concepts; pass one name per concept (SAE unit).")

    e_real, e_gen = R.mean(0), G.mean(0)
    tot = e_real + e_gen
    with np.errstate(invalid="ignore", divide="ignore"):
        delta = np.where(tot > 0, e_gen / np.where(tot > 0, tot, 1.0), np.nan)
    fire_r, fire_g = R > 0, G > 0
    support = (fire_r | fire_g).sum(0)
    tested = support >= min_support

    kt = int(tested.sum())
    used_test = test
    b_perm = n_permutations
    if test in ("auto", "permutation") and b_perm is None:
        b_perm = max(999, int(math.ceil(2 * max(kt, 1) / fdr)))
    if test == "auto":
        used_test = "permutation" if b_perm <= max_permutations else "normal"
        if used_test == "normal":
            logger.info("testing %d concepts: %d sign flips needed, using the normal approximation", kt, b_perm)
    p = np.full(k, np.nan)
    if kt:
        p[tested] = sign_flip_pvalues(
            (G - R)[:, tested], n_permutations=int(b_perm or 1), test=used_test, seed=seed, progress=progress
        )
    q = benjamini_hochberg(p)
    iv = bootstrap_intervals(R, G, n_bootstrap=n_bootstrap, ci=ci, seed=seed + 1, progress=progress)
    status = concept_status(delta, q, tested, fdr=fdr, lambda_min=lambda_min, lambda_max=lambda_max)

    t_img = tokens_per_image if tokens_per_image is not None else tokens_real
    t_img = float(t_img) if t_img else 1.0

    def fired_total(x: Any) -> np.ndarray:
        if x is None:
            return np.full(k, -1, dtype=np.int64)
        arr = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
        if arr.shape != (n, k):
            raise ValueError(f"fired token counts must have shape {(n, k)}; got {arr.shape}.")
        return arr.sum(0).astype(np.int64)

    concepts = pd.DataFrame({
        "concept": np.arange(k),
        "name": names,
        "E_real": e_real,
        "E_gen": e_gen,
        "E_real_per_token": e_real / t_img,
        "E_gen_per_token": e_gen / t_img,
        "diff": e_gen - e_real,
        "rel_diff": np.where(tot > 0, (e_gen - e_real) / np.where(tot > 0, tot, 1.0), np.nan),
        "delta": delta,
        "delta_ci_low": iv["delta_low"],
        "delta_ci_high": iv["delta_high"],
        "diff_ci_low": iv["diff_low"],
        "diff_ci_high": iv["diff_high"],
        "p_value": p,
        "q_value": q,
        "nb_fire_real": fire_r.sum(0),
        "nb_fire_gen": fire_g.sum(0),
        "tokens_fired_real": fired_total(real_fired),
        "tokens_fired_gen": fired_total(gen_fired),
        "support": support,
        "status": status,
    })
    settings = {
        "fdr": fdr, "lambda_min": lambda_min, "lambda_max": lambda_max, "min_support": min_support,
        "n_bootstrap": int(n_bootstrap), "test": used_test,
        "n_permutations": int(b_perm) if used_test == "permutation" else None, "ci": ci, "seed": int(seed),
        "n_pairs": int(n), "n_concepts": int(k), "n_tested": kt,
        "delta": "E_gen / (E_real + E_gen) of per-image activation mass",
    }
    ptable = pair_table(R, G, names=names, **dict(pair_kwargs or {})) if pairs else pd.DataFrame()
    return BlindspotResult(concepts=concepts, pairs=ptable, settings=settings, real_energy=R, gen_energy=G)


# ---------------------------------------------------------------------------------------------
# per-pair analysis
# ---------------------------------------------------------------------------------------------
def _to_float_images(images: Any, what: str) -> list[np.ndarray]:
    if hasattr(images, "images") and not isinstance(images, np.ndarray):
        images = images.images
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    out = []
    for im in images:
        a = np.asarray(im)
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"{what} must be RGB images [n, H, W, 3]; got an image of shape {a.shape}.")
        out.append(a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32))
    return out


def pixel_similarity(real_images: Any, gen_images: Any, size: int | None = None) -> np.ndarray:
    """Pixel similarity ``1 - RMSE`` between paired images (both resized to a common size), in [0, 1].

    Images may be uint8 ``[n, H, W, 3]`` or float in [0, 1] (the two sets may differ in size; each pair is
    compared at the smaller side, or at ``size``, after area downsampling, which is exact block averaging for
    integer factors). 1 means an exact copy. RMSE rather than a perceptual
    metric keeps it dependency-free and literal: memorization in the anchor means copying.

    Examples
    --------
    >>> a = np.zeros((2, 8, 8, 3), np.uint8); b = a.copy(); b[1] = 255
    >>> pixel_similarity(a, b).tolist()
    [1.0, 0.0]
    """
    import torch
    import torch.nn.functional as F

    ra = _to_float_images(real_images, "real_images")
    ga = _to_float_images(gen_images, "gen_images")
    if len(ra) != len(ga):
        raise ValueError(f"got {len(ra)} real and {len(ga)} generated images; pass one generated image per real one.")

    def batch(ims: list[np.ndarray], side: int) -> torch.Tensor:
        t = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2)
        return t if t.shape[-2:] == (side, side) else F.interpolate(t, size=(side, side), mode="area")

    out = np.empty(len(ra))
    groups: dict[tuple, list[int]] = {}
    for i, (a, b) in enumerate(zip(ra, ga)):
        groups.setdefault((a.shape, b.shape), []).append(i)
    for (sa, sb), idx in groups.items():
        side = size or min(sa[0], sa[1], sb[0], sb[1])
        ta = batch([ra[i] for i in idx], side).clamp(0, 1)
        tb = batch([ga[i] for i in idx], side).clamp(0, 1)
        out[idx] = 1.0 - torch.sqrt(((ta - tb) ** 2).mean(dim=(1, 2, 3))).numpy()
    return out


def pair_table(
    real: Any,
    gen: Any,
    *,
    names: Sequence[str] | None = None,
    captions: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    pair_ids: Sequence[Any] | None = None,
    real_images: Any = None,
    gen_images: Any = None,
    top_k: int = DEFAULTS["top_k"],
    candidate_quantile: float = DEFAULTS["candidate_quantile"],
    memorization_similarity: float = DEFAULTS["memorization_similarity"],
) -> pd.DataFrame:
    """Per-pair energy distances, most changed concepts, and memorization / blindspot candidates.

    Parameters
    ----------
    real, gen
        ``[n, K]`` per-image energies (paired by row).
    names
        Concept names (default ``"unit k"``).
    captions, seeds, pair_ids
        Recorded per pair (``pair_id`` defaults to the row index).
    real_images, gen_images
        When both are given, ``pixel_similarity`` (``1 - RMSE``) is computed.
    top_k
        Concepts listed per pair in ``top_suppressed`` / ``top_exaggerated`` (largest per-pair energy loss /
        gain, as ``"name (#unit)"`` joined by ``"; "``).
    candidate_quantile
        Share of pairs (at least one) considered at each end of the distance ranking (pairs in which no concept
        fires in either image are not ranked).
    memorization_similarity
        A low-distance pair is a ``memorization_candidate`` only if its pixel similarity reaches this (so a
        faithful but different drawing is not called a copy). Without images, the low-distance end is flagged
        ``closest_pair`` instead.

    Returns
    -------
    pandas.DataFrame
        ``pair_id``, ``caption``, ``seed``, ``energy_distance`` (``||e(x') - e(x)||_2``),
        ``relative_distance`` (``||e(x') - e(x)|| / (||e(x')|| + ||e(x)||)``, in [0, 1], ranks the pairs),
        ``mean_abs_rel_diff``, ``pixel_similarity``, ``top_suppressed``, ``top_exaggerated``, ``flag`` (one of
        ``memorization_candidate``, ``closest_pair``, ``blindspot_candidate`` or ``""``).

    Examples
    --------
    >>> r = np.eye(3); g = np.array([[1.0, 0, 0], [0, 0, 1], [0, 0, 1]])
    >>> pair_table(r, g, names=["a", "b", "c"], top_k=1)["top_suppressed"].tolist()
    ['', 'b (#1)', '']
    """
    R = _as_energy(real, "real")
    G = _as_energy(gen, "gen")
    if R.shape != G.shape:
        raise ValueError(f"real {R.shape} and gen {G.shape} must have the same shape [n_pairs, n_concepts].")
    n, k = R.shape
    top_k = _check_int(top_k, "top_k", 0)
    candidate_quantile = _check_fraction(candidate_quantile, "candidate_quantile", 0.0, 0.5)
    names = [f"unit {j}" for j in range(k)] if names is None else [str(x) for x in names]
    if len(names) != k:
        raise ValueError(f"got {len(names)} names for {k} concepts; pass one name per concept.")
    for what, seq in (("captions", captions), ("seeds", seeds), ("pair_ids", pair_ids)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{what} has {len(seq)} entries for {n} pairs; pass one per pair.")
    D = G - R
    dist = np.linalg.norm(D, axis=1)
    norms = np.linalg.norm(R, axis=1) + np.linalg.norm(G, axis=1)
    rel = np.where(norms > 0, dist / np.where(norms > 0, norms, 1.0), 0.0)
    tot = R + G
    with np.errstate(invalid="ignore", divide="ignore"):
        rel_k = np.where(tot > 0, D / np.where(tot > 0, tot, 1.0), np.nan)
    active = tot > 0
    mean_abs = np.where(active, np.abs(np.nan_to_num(rel_k)), 0.0).sum(1) / np.maximum(active.sum(1), 1)

    def listing(values: np.ndarray) -> list[str]:
        """Per row, the ``top_k`` concepts with the largest positive ``values``."""
        out = []
        for row in values:
            idx = np.argsort(-row, kind="mergesort")[:top_k] if top_k else []
            out.append("; ".join(f"{names[j]} (#{j})" for j in idx if row[j] > 0))
        return out

    sim = np.full(n, np.nan)
    if real_images is not None and gen_images is not None:
        sim = pixel_similarity(real_images, gen_images)
    informative = np.flatnonzero(norms > 0)  # pairs where no concept fires in either image carry no evidence
    m = min(len(informative), max(1, int(math.ceil(candidate_quantile * len(informative)))))
    order = informative[np.argsort(rel[informative], kind="mergesort")]
    flag = np.full(n, "", dtype=object)
    if m == 0:
        order = np.zeros(0, dtype=np.int64)
    if m:
        flag[order[-m:]] = "blindspot_candidate"
    low = order[:m]
    if np.isfinite(sim).all():
        flag[low[sim[low] >= memorization_similarity]] = "memorization_candidate"
    else:
        flag[low] = "closest_pair"
    return pd.DataFrame({
        "pair_id": list(pair_ids) if pair_ids is not None else np.arange(n),
        "caption": list(captions) if captions is not None else [""] * n,
        "seed": list(seeds) if seeds is not None else [-1] * n,
        "energy_distance": dist,
        "relative_distance": rel,
        "mean_abs_rel_diff": mean_abs,
        "pixel_similarity": sim,
        "top_suppressed": listing(-D),
        "top_exaggerated": listing(D),
        "flag": flag,
    })


# ---------------------------------------------------------------------------------------------
# across generators
# ---------------------------------------------------------------------------------------------
def compare_generators(results: Mapping[str, BlindspotResult]) -> pd.DataFrame:
    """Correlation of the per-concept deltas between every two generators (same encoder and SAE).

    Parameters
    ----------
    results
        ``{generator name: BlindspotResult}`` computed with the same concept dictionary.

    Returns
    -------
    pandas.DataFrame
        One row per pair of generators: ``model_a``, ``model_b``, ``pearson_r`` and ``spearman_rho`` of
        ``delta`` over the concepts tested in both, ``n_concepts``, ``n_flagged_a``, ``n_flagged_b``,
        ``n_flagged_both`` (same status in both) and ``jaccard`` of the flagged (concept, status) sets.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> r = rng.exponential(size=(100, 5)); scale = np.array([1, .05, 1, 1, 9.])
    >>> res = {m: compare_energies(r, rng.exponential(size=(100, 5)) * scale, n_bootstrap=50) for m in "ab"}
    >>> compare_generators(res)[["model_a", "model_b", "n_flagged_both"]].values.tolist()
    [['a', 'b', 2]]
    """
    from scipy.stats import pearsonr, spearmanr

    if not isinstance(results, Mapping):
        raise TypeError(f"results must be a mapping {{name: BlindspotResult}}; got {type(results).__name__}.")
    rows = []
    for a, b in combinations(list(results), 2):
        ca, cb = results[a].concepts, results[b].concepts
        if len(ca) != len(cb):
            raise ValueError(
                f"{a!r} has {len(ca)} concepts but {b!r} has {len(cb)}; compare generators only through the same "
                "encoder and SAE."
            )
        both = (ca["status"] != "insufficient_support").to_numpy() & (cb["status"] != "insufficient_support").to_numpy()
        da, db = ca["delta"].to_numpy()[both], cb["delta"].to_numpy()[both]
        ok = len(da) >= 3 and np.std(da) > 0 and np.std(db) > 0
        fa = {(i, s) for i, s in enumerate(ca["status"]) if s in ("suppressed", "exaggerated")}
        fb = {(i, s) for i, s in enumerate(cb["status"]) if s in ("suppressed", "exaggerated")}
        union = fa | fb
        rows.append({
            "model_a": a,
            "model_b": b,
            "pearson_r": float(pearsonr(da, db)[0]) if ok else float("nan"),
            "spearman_rho": float(spearmanr(da, db)[0]) if ok else float("nan"),
            "n_concepts": int(both.sum()),
            "n_flagged_a": len(fa),
            "n_flagged_b": len(fb),
            "n_flagged_both": len(fa & fb),
            "jaccard": len(fa & fb) / len(union) if union else float("nan"),
        })
    return pd.DataFrame(rows, columns=["model_a", "model_b", "pearson_r", "spearman_rho", "n_concepts",
                                       "n_flagged_a", "n_flagged_b", "n_flagged_both", "jaccard"])


# ---------------------------------------------------------------------------------------------
# end to end: real images + captions + generators -> results
# ---------------------------------------------------------------------------------------------
def generate_images(
    generator: Any,
    captions: Sequence[str],
    seeds: Sequence[int],
    *,
    batch_size: int = 32,
    progress: bool = True,
    desc: str | None = None,
    **settings: Any,
) -> tuple[np.ndarray, pd.DataFrame]:
    """One image per caption from any ``Generator`` (``generate(prompts, seeds, **settings)``), in batches.

    Parameters
    ----------
    generator
        A :class:`concepts.generators.Generator` (or anything with that ``generate`` method).
    captions, seeds
        One seed per caption (recorded with each image).
    batch_size
        Captions per ``generate`` call.
    progress
        Progress bar.
    desc
        Progress-bar label.
    **settings
        Generation settings (``steps``, ``guidance`` ...).

    Returns
    -------
    images : numpy.ndarray
        uint8 ``[n, H, W, 3]``.
    records : pandas.DataFrame
        The generator's per-image records (prompt, seed, settings ...), index = pair index.

    Examples
    --------
    >>> from evaluation.blindspots_world import WorldGenerator
    >>> imgs, rec = generate_images(WorldGenerator(), ["a large red circle on dots"], [7], progress=False)
    >>> imgs.shape, rec["seed"].tolist()
    ((1, 32, 32, 3), [7])
    """
    if not callable(getattr(generator, "generate", None)):
        raise TypeError(
            f"generator must have a generate(prompts, seeds) method (a concepts.generators.Generator); got "
            f"{type(generator).__name__}."
        )
    captions = [str(c) for c in captions]
    seeds = [int(s) for s in seeds]
    if len(captions) != len(seeds):
        raise ValueError(f"got {len(captions)} captions but {len(seeds)} seeds; pass one seed per caption.")
    batch_size = _check_int(batch_size, "batch_size", 1)
    images, records = [], []
    label = desc or f"generating ({getattr(generator, 'model_id', type(generator).__name__)})"
    with tqdm(total=len(captions), desc=label, disable=not progress) as bar:
        for lo in range(0, len(captions), batch_size):
            out = generator.generate(captions[lo:lo + batch_size], seeds[lo:lo + batch_size], **settings)
            x = out.images
            x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"the generator returned images of shape {x.shape}; expected [N, H, W, 3].")
            images.append((np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8) if x.dtype != np.uint8 else x)
            for rec in out.records:
                records.append({k: v for k, v in rec.items() if isinstance(v, (str, int, float, bool, type(None)))})
            bar.update(len(x))
    return np.concatenate(images), pd.DataFrame(records)


@dataclass(eq=False)
class BlindspotAnalysis:
    """Everything :func:`find_blindspots` computed (input of :mod:`evaluation.blindspots_report`).

    Attributes
    ----------
    results
        ``{generator name: BlindspotResult}``.
    cross
        :func:`compare_generators` table (empty with one generator).
    coder
        The fitted :class:`~evaluation.blindspots_coder.ConceptCoder`.
    real_images, captions, seeds
        The real set, its captions and the generation seeds (one per pair).
    generated
        ``{generator name: uint8 images [n, H, W, 3]}`` paired with ``real_images``.
    records
        ``{generator name: generation records}``.
    real_energy
        The real set's :class:`~evaluation.blindspots_coder.ConceptEnergies`.
    extras
        Free-form additions (unit maps, detector comparisons, ...) used by the report.
    """

    results: dict[str, BlindspotResult]
    cross: pd.DataFrame
    coder: Any
    real_images: np.ndarray
    captions: list[str]
    seeds: list[int]
    generated: dict[str, np.ndarray]
    records: dict[str, pd.DataFrame]
    real_energy: Any
    extras: dict[str, Any] = field(default_factory=dict)

    def concept_table(self) -> pd.DataFrame:
        """All generators' concept tables stacked, with a ``generator`` column."""
        return pd.concat([r.concepts.assign(generator=g) for g, r in self.results.items()], ignore_index=True)

    def pair_tables(self) -> pd.DataFrame:
        """All generators' pair tables stacked, with a ``generator`` column."""
        return pd.concat([r.pairs.assign(generator=g) for g, r in self.results.items()], ignore_index=True)

    def _repr_html_(self) -> str:
        """Notebook view: one row of status counts per generator, and the cross-generator table."""
        summary = pd.DataFrame({g: r.summary() for g, r in self.results.items()}).T
        summary.index.name = "generator"
        cross = ("" if self.cross.empty
                 else "<p>Across generators:</p>" + self.cross.to_html(float_format="{:.3g}".format))
        return (f"<div><b>BlindspotAnalysis</b>: {len(self.captions)} real images, {len(self.results)} generator(s)"
                f"{summary.to_html(float_format='{:.3g}'.format)}{cross}</div>")


def _as_uint8_images(images: Any, what: str) -> np.ndarray:
    if hasattr(images, "images") and not isinstance(images, np.ndarray):
        images = images.images
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[-1] == 3:
        if images.dtype == np.uint8:
            return images
        return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    from concepts.images import load_images

    out, _ = load_images(images)
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{what} have different sizes; resize them to one size first.")
    return out


def find_blindspots(
    real_images: Any,
    captions: Sequence[str],
    *,
    generators: Mapping[str, Any] | None = None,
    generated: Mapping[str, Any] | None = None,
    coder: Any = None,
    seeds: Sequence[int] | None = None,
    seed: int = 0,
    generation_batch_size: int = 32,
    generation_settings: Mapping[str, Any] | None = None,
    device: str = "cpu",
    progress: bool = True,
    **compare_kwargs: Any,
) -> BlindspotAnalysis:
    """Generate one image per caption with each generator, encode everything, and compare per concept.

    Parameters
    ----------
    real_images
        The real set: uint8 ``[n, H, W, 3]``, float tensors, PIL images or file paths.
    captions
        One caption per real image (the prompts).
    generators
        ``{name: Generator}``; each makes one image per caption with ``seeds``.
    generated
        ``{name: images}`` already generated, row ``i`` paired with real image ``i`` (e.g. a ``--generated``
        folder matched by id).
    coder
        A :class:`~evaluation.blindspots_coder.ConceptCoder`; unfitted coders are fitted on the real images.
        Default: :meth:`ConceptCoder.builtin` (built-in CLIP, TopK SAE trained on the real tokens).
    seeds
        Generation seed per caption (default ``seed + i``).
    seed
        Base seed (generation seeds, bootstrap and permutations).
    generation_batch_size, generation_settings
        Passed to :func:`generate_images`.
    device
        Device of the default coder.
    progress
        Progress bars.
    **compare_kwargs
        Passed to :func:`compare_energies` (``fdr``, ``lambda_min``, ``lambda_max``, ``min_support`` ...).

    Returns
    -------
    BlindspotAnalysis

    Examples
    --------
    >>> # from concepts.world import ConceptWorld; from evaluation.blindspots_world import WorldGenerator
    >>> # batch = ConceptWorld(seed=0, image_size=32).sample(500, seed=0)
    >>> # gens = {"no red": WorldGenerator(suppress={"red": 1.0})}
    >>> # res = find_blindspots(batch.images, batch.captions, generators=gens)
    >>> # res.results["no red"].flagged()[["name", "delta", "q_value", "status"]]
    """
    captions = [str(c) for c in captions]
    real = _as_uint8_images(real_images, "real images")
    n = len(real)
    if len(captions) != n:
        raise ValueError(f"got {n} real images but {len(captions)} captions; pass one caption per real image.")
    if not generators and not generated:
        raise ValueError("nothing to compare: pass generators={name: Generator} and/or generated={name: images}.")
    seeds = [seed + i for i in range(n)] if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} captions; pass one seed per caption.")
    images: dict[str, np.ndarray] = {}
    records: dict[str, pd.DataFrame] = {}
    for name, gen in (generators or {}).items():
        images[name], records[name] = generate_images(
            gen, captions, seeds, batch_size=generation_batch_size, progress=progress,
            desc=f"generating with {name}", **dict(generation_settings or {}))
    for name, imgs in (generated or {}).items():
        if name in images:
            raise ValueError(f"generator name {name!r} is used twice (in generators and in generated); rename one.")
        arr = _as_uint8_images(imgs, f"generated images of {name!r}")
        if len(arr) != n:
            raise ValueError(f"{name!r} has {len(arr)} generated images for {n} real images; pair them one to one.")
        images[name] = arr
        records[name] = pd.DataFrame({"prompt": captions, "seed": [-1] * n})
    if coder is None:
        from .blindspots_coder import ConceptCoder

        coder = ConceptCoder.builtin(device=device, progress=progress, random_state=seed)
    if not hasattr(coder, "sae_"):
        coder.fit(real)
    real_energy = coder.transform(real)
    results = {}
    for name, imgs in images.items():
        gen_energy = coder.transform(imgs)
        rec = records[name]
        rec_seeds = rec["seed"].tolist() if "seed" in rec and len(rec) == n else seeds
        results[name] = compare_energies(
            real_energy, gen_energy, names=coder.names, seed=seed, progress=progress,
            pair_kwargs={"captions": captions, "seeds": rec_seeds, "real_images": real, "gen_images": imgs},
            **compare_kwargs)
    cross = compare_generators(results) if len(results) > 1 else pd.DataFrame()
    return BlindspotAnalysis(results=results, cross=cross, coder=coder, real_images=real, captions=captions,
                             seeds=seeds, generated=images, records=records, real_energy=real_energy)
