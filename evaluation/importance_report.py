"""The concept-importance section of an HTML report (:class:`evaluation.report.Report`).

Examples
--------
>>> import numpy as np, pandas as pd
>>> from evaluation.report import Report
>>> table = pd.DataFrame({"c_deletion": [0.1], "c_insertion": [0.9], "c_mufidelity": [1.0]},
...                      index=pd.Index(["gradient_input"], name="method"))
>>> r = add_importance_section(Report("audit"), table=table)
>>> "C-Deletion" in r.to_html()
True
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

__all__ = ["add_importance_section"]


def add_importance_section(
    report: Any,
    *,
    comparison: Any = None,
    table: pd.DataFrame | None = None,
    global_table: pd.DataFrame | None = None,
    pixel_summary: pd.DataFrame | None = None,
    cluster_method: str | None = None,
    min_count: int = 10,
    embedding: str = "auto",
    title: str = "Concept importance",
    top: int = 5,
) -> Any:
    """Add a concept-importance section: fidelity table and bars, strategic cluster graph, top concepts per class,
    and concept-to-pixel scores.

    Parameters
    ----------
    report : evaluation.report.Report
    comparison : ImportanceComparison, optional
        From :func:`evaluation.fidelity.compare_methods`; gives the table, the cluster graph and (when no
        ``global_table`` is given) the per-target top concepts of ``cluster_method``.
    table : DataFrame, optional
        A methods x metrics table (used when ``comparison`` is None).
    global_table : DataFrame, optional
        From :func:`evaluation.importance.global_importance`; the ``top`` concepts of each class are listed.
    pixel_summary : DataFrame, optional
        From :func:`evaluation.pixel_checks.summarize_pixel_checks`.
    cluster_method : str, optional
        Method whose importances are drawn in the cluster graph (default: the first compared).
    min_count, embedding
        Cluster-graph settings (see :func:`evaluation.cluster_graph.cluster_graph`).
    title : str
    top : int
        Concepts listed per class.

    Returns
    -------
    The report (for chaining).

    Examples
    --------
    >>> # add_importance_section(report, comparison=res, pixel_summary=summarize_pixel_checks(df))
    """
    import matplotlib.pyplot as plt

    from .cluster_graph import cluster_graph, fidelity_bars

    if not (hasattr(report, "heading") and hasattr(report, "table") and hasattr(report, "figure")):
        raise TypeError(f"report must be an evaluation.report.Report; got {type(report).__name__}.")
    if comparison is None and table is None and global_table is None and pixel_summary is None:
        raise ValueError("nothing to report: pass comparison=, table=, global_table= or pixel_summary=.")
    report.heading(title, anchor="importance")
    report.text(
        "Concept importance is attribution in concept space: the model is split at a layer, its activations are "
        "decomposed into concept coefficients u, and each method scores how much the explained output depends on "
        "each concept (u = 0 removes a concept). C-Deletion: area under the output curve as the most important "
        "concepts are removed (lower is better); C-Insertion: as they are inserted from u = 0 (higher is better); "
        "C-muFidelity: Spearman correlation between summed importances and the effect of removing random concept "
        "subsets (higher is better, 1 at most)."
    )
    if comparison is not None:
        table = comparison.table
    if table is not None:
        report.heading("Fidelity per method", level=3)
        report.table(table.reset_index(), name="importance_fidelity")
        fig, ax = plt.subplots(figsize=(7, 3.2))
        fidelity_bars(table, ax=ax)
        report.figure(fig, caption="Fidelity metrics per importance method.")
    if comparison is not None:
        method = cluster_method or next(iter(comparison.phi))
        phi = comparison.phi[comparison._check(method)]
        fig, ax = plt.subplots(figsize=(6, 5))
        cluster_graph(phi, comparison.concept_names, min_count=min_count, embedding=embedding, ax=ax,
                      title=f"Strategic cluster graph ({method})")
        report.figure(fig, caption=(f"Each point is an input, placed by its {method} importance vector and coloured "
                                    f"by its most important concept (concepts that are the top one for at least "
                                    f"{min_count} inputs)."))
        if global_table is None:
            global_table = comparison.global_(method)
    if global_table is not None:
        report.heading("Most important concepts per class", level=3)
        rows = []
        for c, grp in global_table.groupby("class", sort=False):
            g = grp.sort_values("rank").head(top)
            rows.append({"class": str(c), "n_images": int(g["n_images"].iloc[0]),
                         "top concepts": ", ".join(f"{n} ({s:.0%})" if np.isfinite(s) else str(n)
                                                   for n, s in zip(g["concept"], g["share_of_logit"]))})
        report.table(pd.DataFrame(rows), name="importance_global_top")
    if pixel_summary is not None:
        report.heading("Are concepts read from the right pixels?", level=3)
        report.text("Pointing game: share of images whose largest input attribution for a concept lies on the "
                    "concept's object mask; mass in mask: share of the attribution on the mask (chance level: "
                    "mask area).", note=True)
        report.table(pixel_summary.reset_index(), name="importance_pixel_checks")
    return report
