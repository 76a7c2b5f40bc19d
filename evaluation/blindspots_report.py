"""The blindspot report: plots and one self-contained HTML page for a :class:`~evaluation.blindspots.BlindspotAnalysis`.

Sections: summary (counts per status and generator, settings), one delta histogram per generator, frequency vs
delta, the cross-generator comparison, and for every flagged concept its name, statistics and image strips
(the real images where the concept is strongest next to their generated counterparts, and the generated images
where it is strongest next to their real counterparts), then the per-pair memorization and blindspot
candidates. Ground-truth sections (planted-bias recovery, detector agreement) are added when the analysis
carries them in ``extras``.

Plot functions take ``ax=None`` and return the Axes.

Examples
--------
>>> # analysis = find_blindspots(...); path = write_report(analysis, "reports/blindspots")
"""
from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "plot_delta_histogram",
    "plot_frequency_vs_delta",
    "plot_cross_generator",
    "add_blindspot_sections",
    "write_report",
    "STATUS_COLOURS",
]

STATUS_COLOURS = {"suppressed": "#1f5fbf", "exaggerated": "#d2472b", "aligned": "#9a9a9a",
                  "insufficient_support": "#dddddd"}


def _axes(ax: Any, figsize: tuple[float, float] = (5.5, 3.2)) -> Any:
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_delta_histogram(result: Any, *, title: str = "", ax: Any = None) -> Any:
    """Histogram of ``delta`` over the tested concepts (log-density), with the median and the thresholds.

    Parameters
    ----------
    result
        A :class:`~evaluation.blindspots.BlindspotResult`.
    title
        Axes title.
    ax
        Matplotlib Axes (default: a new figure).

    Returns
    -------
    matplotlib.axes.Axes
    """
    ax = _axes(ax)
    c = result.concepts
    tested = c[c["status"] != "insufficient_support"]
    s = result.settings
    bins = np.linspace(0, 1, 41)
    for status in ("aligned", "suppressed", "exaggerated"):
        d = tested.loc[tested["status"] == status, "delta"].dropna()
        if len(d):
            ax.hist(d, bins=bins, color=STATUS_COLOURS[status], alpha=0.85, label=f"{status} ({len(d)})", log=True)
    if len(tested):
        med = float(np.nanmedian(tested["delta"]))
        ax.axvline(med, color="k", lw=1, ls="-", label=f"median {med:.2f}")
    for v in (s["lambda_min"], s["lambda_max"]):
        ax.axvline(v, color="k", lw=0.8, ls=":")
    ax.axvline(0.5, color="#666", lw=0.6, ls="--")
    ax.set_xlim(0, 1)
    ax.set_xlabel("delta = E_gen / (E_real + E_gen)")
    ax.set_ylabel("concepts (log)")
    ax.set_title(title or f"{len(tested)} tested concepts")
    ax.legend(fontsize=7, loc="upper left")
    return ax


def plot_frequency_vs_delta(results: Mapping[str, Any], *, ax: Any = None, n_bins: int = 8) -> Any:
    """How often a concept fires in the real set vs its delta, per generator, with 5-95 % bands per frequency bin.

    Parameters
    ----------
    results
        ``{generator: BlindspotResult}``.
    ax
        Matplotlib Axes.
    n_bins
        Log-spaced frequency bins of the bands.

    Returns
    -------
    matplotlib.axes.Axes
    """
    ax = _axes(ax, (6.5, 3.6))
    markers = "os^Dv<>"
    for i, (name, res) in enumerate(results.items()):
        c = res.concepts
        c = c[c["status"] != "insufficient_support"]
        if not len(c):
            continue
        freq = np.maximum(c["nb_fire_real"].to_numpy(dtype=float), 0.5)
        colours = [STATUS_COLOURS[s] for s in c["status"]]
        ax.scatter(freq, c["delta"], s=12, c=colours, marker=markers[i % len(markers)], alpha=0.7,
                   edgecolors="none", label=name)
        edges = np.geomspace(freq.min(), freq.max() * 1.001, n_bins + 1)
        which = np.clip(np.searchsorted(edges, freq, side="right") - 1, 0, n_bins - 1)
        xs, lo, hi = [], [], []
        for b in range(n_bins):
            d = c["delta"].to_numpy()[which == b]
            if len(d) >= 3:
                xs.append(np.sqrt(edges[b] * edges[b + 1]))
                lo.append(np.nanquantile(d, 0.05))
                hi.append(np.nanquantile(d, 0.95))
        if xs:
            ax.fill_between(xs, lo, hi, alpha=0.12, label=f"{name} 5-95 %")
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="#666", lw=0.6, ls="--")
    ax.set_xlabel("images of the real set where the concept fires (log)")
    ax.set_ylabel("delta")
    ax.set_title("concept frequency vs delta (colour = status)")
    ax.legend(fontsize=7, loc="best")
    return ax


def plot_cross_generator(results: Mapping[str, Any], a: str, b: str, *, ax: Any = None) -> Any:
    """Scatter of the deltas of two generators over the concepts tested in both.

    Returns
    -------
    matplotlib.axes.Axes
    """
    ax = _axes(ax, (4.0, 4.0))
    ca, cb = results[a].concepts, results[b].concepts
    both = (ca["status"] != "insufficient_support") & (cb["status"] != "insufficient_support")
    ax.scatter(ca.loc[both, "delta"], cb.loc[both, "delta"], s=12, alpha=0.7, color="#345")
    ax.plot([0, 1], [0, 1], color="#999", lw=0.7, ls="--")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"delta, {a}")
    ax.set_ylabel(f"delta, {b}")
    ax.set_title("per-concept delta across generators")
    return ax


def _fmt(v: Any, spec: str = ".3g") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "" if not np.isfinite(f) else format(f, spec)


def _flagged_section(report: Any, analysis: Any, gen: str, res: Any, *, max_concepts: int, n_examples: int,
                     unit_map: pd.DataFrame | None) -> None:
    flagged = res.flagged()
    report.heading(f"Flagged concepts: {gen}", level=2, anchor=f"flagged-{_slug(gen)}")
    if not len(flagged):
        report.text(f"No concept of {gen} passes both the significance (q <= {res.settings['fdr']}) and the "
                    "effect-size "
                    f"rule (delta outside [{res.settings['lambda_min']}, {res.settings['lambda_max']}]).")
        return
    cols = ["concept", "name", "status", "delta", "delta_ci_low", "delta_ci_high", "q_value", "E_real", "E_gen",
            "nb_fire_real", "nb_fire_gen"]
    table = flagged[cols]
    if unit_map is not None:
        table = table.merge(unit_map[["concept", "truth", "auroc"]], on="concept", how="left")
    report.table(table, max_rows=60)
    real, genimg = analysis.real_images, analysis.generated[gen]
    if len(flagged) > max_concepts:
        report.text(f"Image strips for the {max_concepts} most extreme of {len(flagged)} flagged concepts.")
    for _, row in flagged.head(max_concepts).iterrows():
        unit = int(row["concept"])
        truth = ""
        if unit_map is not None:
            m = unit_map.set_index("concept").loc[unit]
            truth = f" · ground truth: {m['truth']} (AUROC {_fmt(m['auroc'], '.2f')})" if m["truth"] else ""
        report.raw_html(
            f'<div class="flagged" data-generator="{html.escape(gen)}" data-unit="{unit}" '
            f'data-status="{html.escape(row["status"])}"><h3>#{unit} {html.escape(str(row["name"]))} '
            f'<span class="meta">{html.escape(row["status"])} · delta {_fmt(row["delta"], ".2f")} '
            f'[{_fmt(row["delta_ci_low"], ".2f")}, {_fmt(row["delta_ci_high"], ".2f")}] · q {_fmt(row["q_value"])}'
            f'{html.escape(truth)}</span></h3></div>')
        er, eg = res.real_energy[:, unit], res.gen_energy[:, unit]
        top_r = [i for i in np.argsort(-er, kind="mergesort")[:n_examples] if er[i] > 0]
        top_g = [i for i in np.argsort(-eg, kind="mergesort")[:n_examples] if eg[i] > 0]
        if top_r:
            ims = [im for i in top_r for im in (real[i], genimg[i])]
            caps = [c for i in top_r for c in (f"real {i}: {er[i]:.2g}", f"gen {i}: {eg[i]:.2g}")]
            report.images(ims, caps, scale=2,
                          title="strongest in real images (each followed by its generated counterpart)")
        if top_g:
            ims = [im for i in top_g for im in (genimg[i], real[i])]
            caps = [c for i in top_g for c in (f"gen {i}: {eg[i]:.2g}", f"real {i}: {er[i]:.2g}")]
            report.images(ims, caps, scale=2,
                          title="strongest in generated images (each followed by its real counterpart)")


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in str(text)).strip("-").lower() or "x"


def add_blindspot_sections(
    report: Any,
    analysis: Any,
    *,
    max_concepts: int = 12,
    n_examples: int = 4,
    n_pairs: int = 4,
) -> Any:
    """Add the blindspot sections of ``analysis`` to a :class:`~evaluation.report.Report`.

    Parameters
    ----------
    report
        The report to extend (tables are registered as ``blindspots_concepts``, ``blindspots_pairs``,
        ``blindspots_cross`` ... and saved beside the HTML).
    analysis
        A :class:`~evaluation.blindspots.BlindspotAnalysis`; its ``extras`` may hold ``unit_map`` (DataFrame of
        :func:`~evaluation.blindspots_world.unit_concept_map`), ``detector`` (``{generator: detector table}``),
        ``agreement`` (``{generator: detector_agreement dict}``), ``planted`` (``{generator: planted_recovery
        dict}``) and ``notes`` (list of str).
    max_concepts
        Flagged concepts per generator shown with image strips.
    n_examples
        Examples per strip.
    n_pairs
        Pairs shown per candidate kind.

    Returns
    -------
    Report
        ``report``.
    """
    import matplotlib.pyplot as plt

    results = analysis.results
    extras = analysis.extras
    unit_map = extras.get("unit_map")
    first = next(iter(results.values()))
    s = first.settings
    report.heading("Summary", anchor="summary")
    report.text(
        f"{len(analysis.real_images)} real images with captions; {len(results)} generator(s), one image per caption "
        f"with a recorded seed; concepts = {s['n_concepts']} SAE units ({analysis.coder.describe()}). A concept is "
        f"suppressed (exaggerated) when its Benjamini-Hochberg q-value is <= {s['fdr']} and its "
        f"delta = E_gen / (E_real + E_gen) is below {s['lambda_min']} (above {s['lambda_max']}); concepts firing "
        f"in fewer than {s['min_support']} pairs are not tested.")
    for note in extras.get("notes", []):
        report.text(note, note=True)
    summary = pd.DataFrame([{"generator": g, **r.summary()} for g, r in results.items()])
    report.table(summary, name="blindspots_summary")
    flagged_all = []
    for g, r in results.items():
        f = r.flagged()[["concept", "name", "status", "delta", "q_value"]].assign(generator=g)
        flagged_all.append(f)
    flagged_all = pd.concat(flagged_all, ignore_index=True) if flagged_all else pd.DataFrame()
    if len(flagged_all):
        report.raw_html('<p id="flagged-list">Flagged: ' + ", ".join(
            f'<a href="#flagged-{_slug(g)}">{html.escape(g)}: #{int(u)} {html.escape(str(n))} ({html.escape(st)})</a>'
            for g, u, n, st in zip(flagged_all["generator"], flagged_all["concept"], flagged_all["name"],
                                   flagged_all["status"])) + "</p>")
    else:
        report.raw_html('<p id="flagged-list">Flagged: none.</p>')

    report.heading("Delta per generator", anchor="delta-histograms")
    k = len(results)
    fig, axes = plt.subplots(1, k, figsize=(5.0 * k, 3.2), squeeze=False)
    for ax, (g, r) in zip(axes[0], results.items()):
        plot_delta_histogram(r, title=g, ax=ax)
    fig.tight_layout()
    report.figure(fig, caption="Histogram of delta over the tested concepts (log counts); dotted lines: thresholds.")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    plot_frequency_vs_delta(results, ax=ax)
    report.figure(fig, caption="Concept frequency in the real set vs delta; rare concepts spread more.")

    report.heading("Across generators", anchor="cross")
    if len(analysis.cross):
        report.table(analysis.cross, name="blindspots_cross")
        pairs = list(analysis.cross[["model_a", "model_b"]].itertuples(index=False))
        fig, axes = plt.subplots(1, len(pairs), figsize=(4.0 * len(pairs), 4.0), squeeze=False)
        for ax, (a, b) in zip(axes[0], pairs):
            plot_cross_generator(results, a, b, ax=ax)
        fig.tight_layout()
        report.figure(fig, caption="Per-concept delta of one generator against another (dashed: equal deltas).")
    else:
        report.text("One generator only: nothing to compare.")

    sections = (("Planted-bias recovery", "planted"), ("Agreement with the ConceptWorld detector", "agreement"))
    for section, key in sections:
        block = extras.get(key)
        if not block:
            continue
        report.heading(section, anchor=_slug(section))
        rows = [{"generator": g, **{k2: v for k2, v in d.items() if not isinstance(v, (pd.DataFrame, dict))}}
                for g, d in block.items()]
        report.table(pd.DataFrame(rows), name=f"blindspots_{key}")
        for g, d in block.items():
            if isinstance(d.get("table"), pd.DataFrame) and len(d["table"]):
                report.heading(f"{section}: {g}", level=3)
                report.table(d["table"], name=f"blindspots_{key}_{_slug(g)}", max_rows=80)
    if extras.get("detector"):
        det = pd.concat([t.assign(generator=g) for g, t in extras["detector"].items()], ignore_index=True)
        report.table(det, name="blindspots_detector", max_rows=20)

    for g, r in results.items():
        _flagged_section(report, analysis, g, r, max_concepts=max_concepts, n_examples=n_examples, unit_map=unit_map)

    report.heading("Per-pair candidates", anchor="pairs")
    report.text("Memorization candidates: the pairs with the smallest relative energy distance whose generated image "
                "is also a near-copy of the real one in pixels (1 - RMSE >= the threshold). Blindspot candidates: the "
                "pairs "
                "with the largest distance (the generation misses or adds the most concepts).")
    for g, r in results.items():
        p = r.pairs
        if not len(p):
            continue
        for kind in ("memorization_candidate", "closest_pair", "blindspot_candidate"):
            sel = p[p["flag"] == kind].sort_values("relative_distance", ascending=kind == "blindspot_candidate")
            if not len(sel):
                continue
            sel = sel.head(n_pairs)
            idx = sel.index.to_numpy()
            ims = [im for i in idx for im in (analysis.real_images[i], analysis.generated[g][i])]
            caps = [c for i, d, ps in zip(idx, sel["relative_distance"], sel["pixel_similarity"])
                    for c in (f"real {i}", f"gen · dist {d:.2f} · pix {ps:.2f}")]
            report.images(ims, caps, scale=2, title=f"{g}: {kind.replace('_', ' ')}s")
            report.table(sel[["pair_id", "caption", "seed", "relative_distance", "pixel_similarity", "top_suppressed",
                              "top_exaggerated"]])
    report.heading("Tables", anchor="tables")
    report.text("Full tables are saved beside this page: blindspots_concepts.(csv|parquet) (one row per generator and "
                "concept), blindspots_pairs (one row per generator and pair), blindspots_cross, and the ground-truth "
                "tables when present.")
    report.table(analysis.concept_table(), name="blindspots_concepts", max_rows=20)
    report.table(analysis.pair_tables(), name="blindspots_pairs", max_rows=20)
    return report


def write_report(analysis: Any, out: str | Path, *, title: str = "conceptkit blindspots",
                 meta: Mapping[str, Any] | None = None, tables: str = "parquet", **kwargs: Any) -> Path:
    """Write ``out/index.html`` (self-contained) plus the tables as CSV and Parquet; returns the HTML path.

    Parameters
    ----------
    analysis
        A :class:`~evaluation.blindspots.BlindspotAnalysis`.
    out
        Output folder (created).
    title, meta
        Page title and metadata shown under it.
    tables
        ``"parquet"`` (Parquet and CSV) or ``"csv"``.
    **kwargs
        Passed to :func:`add_blindspot_sections`.
    """
    from .report import Report

    report = Report(title, meta=dict(meta or {}))
    add_blindspot_sections(report, analysis, **kwargs)
    return report.save(out, tables=tables)
