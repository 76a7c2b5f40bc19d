"""The HTML report of :func:`evaluation.audit.audit`: one self-contained page (images embedded, no network).

Sections: at a glance; discovered concepts (quality, coverage per concept family, exemplar image strips);
blindspots (:func:`evaluation.blindspots_report.add_blindspot_sections`); concept importance for the downstream
head (:func:`evaluation.importance_report.add_importance_section` plus the class-rule check); and the erasure of
the chosen concept (headline table, before / after bars, real / original / erased image triplets, and
:func:`evaluation.erasure.erasure_section`).

Examples
--------
>>> # used by evaluation.audit.audit(); the result's .html holds the page and .save(out) writes it
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .report import Report

__all__ = ["build_report", "plot_erasure_bars", "plot_family_coverage"]


def plot_family_coverage(coverage: pd.DataFrame, *, ax: Any = None) -> Any:
    """Bar chart of the mean best-unit AUROC per ConceptWorld concept family; returns the Axes.

    Examples
    --------
    >>> cov = pd.DataFrame({"family": ["colour", "shape"], "auroc": [0.95, 0.7]})
    >>> plot_family_coverage(cov).get_ylabel()
    'best unit AUROC (mean)'
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.0))
    fam = coverage.groupby("family", sort=False)["auroc"].mean()
    ax.bar(range(len(fam)), fam.to_numpy(), color="#5b7bb5")
    ax.set_xticks(range(len(fam)), fam.index, rotation=30, ha="right")
    ax.axhline(0.9, ls=":", c="k", lw=1)
    ax.set_ylim(0.5, 1.0)
    ax.set_ylabel("best unit AUROC (mean)")
    ax.set_title("Which ConceptWorld concepts the dictionary sees")
    return ax


def plot_erasure_bars(erasure: pd.DataFrame, *, ax: Any = None) -> Any:
    """Before / after bars of the erasure's delta and importance rows (each row scaled by its larger value).

    Examples
    --------
    >>> df = pd.DataFrame({"metric": ["d"], "kind": ["delta"], "before": [0.4], "after": [0.05]})
    >>> len(plot_erasure_bars(df).patches)
    2
    """
    import matplotlib.pyplot as plt

    rows = erasure[erasure["kind"].isin(["delta", "importance"])]
    rows = rows[~rows["metric"].str.contains("flagged")]
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(rows) + 1.5), 3.2))
    x = np.arange(len(rows))
    scale = np.maximum(np.abs(rows[["before", "after"]].to_numpy(dtype=float)).max(1), 1e-12)
    ax.bar(x - 0.2, rows["before"].to_numpy(dtype=float) / scale, width=0.4, label="original generator")
    ax.bar(x + 0.2, rows["after"].to_numpy(dtype=float) / scale, width=0.4, label="erased generator")
    ax.set_xticks(x, [m.replace(" (", "\n(") for m in rows["metric"]], fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("relative to the larger value")
    ax.legend(fontsize=8)
    ax.set_title("Erasure: before / after")
    return ax


def _fmt(v: Any) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{v:.3g}" if np.isfinite(v) else "n/a"
    return str(v)


def build_report(
    *,
    batch: Any,
    coder: Any,
    quality: pd.DataFrame,
    concepts: pd.DataFrame,
    coverage: pd.DataFrame,
    top_images: np.ndarray,
    energy: np.ndarray,
    comparison: Any,
    global_table: pd.DataFrame,
    rule_check: pd.DataFrame,
    head_accuracy: float,
    analysis: Any,
    blind_summary: pd.DataFrame,
    erasure: pd.DataFrame,
    erasure_result: Any,
    concept: str | None,
    concept_units: list[int],
    settings: dict[str, Any],
    max_strips: int = 12,
) -> Report:
    """Assemble the audit report (see the module docstring); returns the :class:`~evaluation.report.Report`.

    Examples
    --------
    >>> # report = build_report(batch=..., coder=..., ...); report.save("reports/audit")
    """
    import matplotlib.pyplot as plt

    from .blindspots_report import add_blindspot_sections
    from .importance_report import add_importance_section

    desc = coder.describe()
    head = settings["headline"]
    report = Report(
        "conceptkit audit",
        meta={"encoder": desc.get("encoder"), "layer": desc.get("layer"),
              "dictionary": f"{desc.get('sae')} ({desc.get('n_concepts')} units, top-k {desc.get('top_k')})"
                            + (" given" if settings.get("sae_given") else " trained on the renders"),
              "images": settings["n"], "generators": ", ".join(settings["generators"]) or "none",
              "erased concept": concept or "none", "seed": settings["seed"], "device": settings["device"],
              "wall time (s)": head.get("wall_seconds")})
    report.text(
        "One audit of one model and one concept dictionary on ConceptWorld, the built-in world whose concept labels "
        "are known exactly: what concepts the dictionary discovers and how well, which concepts the generators "
        "suppress or exaggerate, which concepts a downstream head relies on, and what erasing one concept does.",
        note=True)

    # at a glance ------------------------------------------------------------------------------------
    report.heading("At a glance", anchor="glance")
    glance = [
        ("dictionary: FVU on image tokens", head.get("fvu")),
        ("units predicting a ConceptWorld label (AUROC >= 0.9)", head.get("units_mapped")),
        ("distinct ConceptWorld concepts covered", head.get("concepts_covered")),
        ("mapped units whose vocabulary name equals their label", head.get("naming_agreement")),
        ("head accuracy on held-out renders", head_accuracy),
        ("classes whose rule concept is in the head's top-5", head.get("rule_recovery")),
        ("C-muFidelity of Gradient x Input", head.get("importance_mufidelity")),
    ]
    glance += [(f"flagged units, {k[len('flagged['):-1]}", v) for k, v in head.items() if k.startswith("flagged[")]
    if concept is not None:
        glance += [(f"'{concept}' delta (SAE units): before -> after",
                    f"{_fmt(head.get('concept_delta_before'))} -> {_fmt(head.get('concept_delta_after'))}"),
                   (f"'{concept}' delta (detector): before -> after",
                    f"{_fmt(head.get('detector_delta_before'))} -> {_fmt(head.get('detector_delta_after'))}"),
                   (f"importance of '{concept}' units: before -> after",
                    f"{_fmt(head.get('importance_before'))} -> {_fmt(head.get('importance_after'))}")]
    report.table(pd.DataFrame({"what": [g[0] for g in glance], "value": [_fmt(g[1]) for g in glance]}))

    # discovered concepts -----------------------------------------------------------------------------
    report.heading("Discovered concepts", anchor="concepts")
    report.text(
        f"The SAE reads the tokens of {desc.get('layer')!r} ({desc.get('tokens')} tokens, {desc.get('pooling')} "
        "pooling into per-image energies). Units are named against the ConceptWorld vocabulary with the text tower; "
        "because the labels are known, each unit is also matched to the label its energy predicts best (AUROC).")
    report.table(quality, float_format="{:.3g}")
    fig, ax = plt.subplots(figsize=(6.5, 3.0))
    plot_family_coverage(coverage, ax=ax)
    report.figure(fig, caption="Mean over the concepts of each family of the best unit's AUROC (dotted: 0.9).")
    report.table(coverage, max_rows=60)
    shown = concepts[concepts["mapped"].fillna(False).astype(bool)].sort_values("auroc", ascending=False)
    shown = pd.concat([shown.drop_duplicates("truth"), shown[shown.duplicated("truth")]]).head(max_strips)
    if len(shown) < max_strips:
        rest = concepts[concepts["alive"] & ~concepts["concept"].isin(shown["concept"])]
        shown = pd.concat([shown, rest.sort_values("mean_energy", ascending=False).head(max_strips - len(shown))])
    report.heading("Exemplars: the real images where each unit fires most", level=3)
    for _, row in shown.iterrows():
        j = int(row["concept"])
        idx = [int(i) for i in top_images[j]]
        energies = energy[idx, j]
        truth = f" - label '{row['truth']}' (AUROC {row['auroc']:.2f})" if isinstance(row["truth"], str) and row["truth"] else ""
        report.images([batch.images[i] for i in idx], [f"{e:.2g}" for e in energies], scale=2,
                      title=f"unit #{j}: {row['name']}{truth}")
    report.table(concepts.drop(columns=["exemplars"]).sort_values("auroc", ascending=False), max_rows=40)

    # blindspots ------------------------------------------------------------------------------------
    if analysis is not None:
        report.heading("Blindspots", anchor="blindspots")
        report.text(
            "Every caption of the real set is generated once per generator (seeded); real and generated images go "
            "through the same encoder and SAE. delta = E_gen / (E_real + E_gen) per unit (0.5 = parity). "
            + (f"The erased generator is listed beside the original so the collapse of '{concept}' can be read off "
               "the same statistics. " if concept else "")
            + "The ConceptWorld detector gives the ground-truth view of the same comparison.")
        report.table(blind_summary)
        add_blindspot_sections(report, analysis, max_concepts=6, n_examples=4, n_pairs=3)

    # importance -----------------------------------------------------------------------------------
    report.heading("Downstream head", anchor="head")
    report.text(f"A {settings['head']} trained on the concept energies of {settings['head_train']} renders to predict "
                f"the ConceptWorld class; held-out accuracy {head_accuracy:.3f} on {settings['head_test']} renders. "
                "Its concepts are the SAE units, so importance is read directly in the dictionary's terms.")
    add_importance_section(report, comparison=comparison, global_table=global_table,
                           min_count=max(2, min(10, settings["head_test"] // 20)),
                           title="Concept importance for the head")
    if len(rule_check):
        report.heading("Do the top concepts match the class rules?", level=3)
        report.text("ConceptWorld classes are defined by concept rules; a class passes when a unit whose label is "
                    "part of its rule is among its five most important concepts.", note=True)
        report.table(rule_check)

    # erasure --------------------------------------------------------------------------------------
    if concept is not None and len(erasure):
        report.heading(f"Erasing '{concept}'", anchor="erasure")
        report.text(
            f"Inference-time LEACE at {settings['erasure_layer']!r} of {settings['generators'][0]}, fitted on "
            f"{settings['erasure_fit_pairs']} counterfactual caption pairs and applied at strength "
            f"{settings['erasure_strength']:g}. Units of '{concept}': "
            + (", ".join(f"#{u}" for u in concept_units) if concept_units else "none (the dictionary has no unit "
               "for it, so the unit rows are missing)") + ".")
        report.table(erasure, float_format="{:.3g}")
        fig, ax = plt.subplots(figsize=(7.5, 3.4))
        plot_erasure_bars(erasure, ax=ax)
        report.figure(fig, caption="Delta and importance rows before and after the erasure.")
        if analysis is not None:
            ask = np.flatnonzero(batch.concepts[concept].to_numpy(dtype=bool))[:6]
            gens = list(analysis.generated)
            orig, erased = gens[0], gens[-1]
            ims, caps = [], []
            for i in ask:
                ims += [batch.images[i], analysis.generated[orig][i], analysis.generated[erased][i]]
                caps += [f"real {i}", "original", "erased"]
            if ims:
                report.images(ims, caps, scale=3, title="captions with the concept: real / original / erased")
                report.text("; ".join(f"{i}: {batch.captions[i]}" for i in ask))
        if erasure_result is not None:
            from .erasure import erasure_section

            erasure_section(report, erasure_result, title="Single-object prompts: erasure, specificity, utility",
                            n_images=4)
    return report
