"""The concept-erasure section of an HTML report (:class:`evaluation.report.Report`).

:func:`erasure_section` adds, for one :class:`~evaluation.erasure.metrics.ErasureResult` or a
:class:`~evaluation.erasure.metrics.SweepResult`: the summary table (erasure, specificity, utility), before/after
image strips of the target and retain prompts, per-set bar charts, and for sweeps the strength table and the
erasure-vs-utility curve. :func:`leace_section` reports a representation-level LEACE check (probe accuracy
before/after vs the majority baseline, rank of the edit).

Examples
--------
>>> # from evaluation.report import Report
>>> # rep = Report("Erasing 'red'")
>>> # erasure_section(rep, result, title="Inference-time LEACE on conceptworld-diffusion")
>>> # rep.save("erasure-report")
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from evaluation.report import Report

from .metrics import ErasureResult, SweepResult

__all__ = ["erasure_section", "leace_section"]

_KIND_ORDER = {"erasure": 0, "target_other": 1, "specificity": 2, "leak": 3, "utility": 4}


def _bars(result: ErasureResult) -> Any:
    import matplotlib.pyplot as plt

    s = result.summary()
    s = s[s["kind"].isin(["erasure", "target_other", "specificity", "leak"])]
    s = s[~s["metric"].str.endswith("sae_energy")]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(s) + 1.5), 3.2))
    x = np.arange(len(s))
    ax.bar(x - 0.2, s["original"], width=0.4, label="original")
    ax.bar(x + 0.2, s["erased"], width=0.4, label="erased")
    ax.set_xticks(x, s["metric"], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction detected")
    ax.legend(fontsize=8)
    ax.set_title(f"'{result.concept}': detection before / after")
    return fig


def erasure_section(
    report: Report | None,
    result: ErasureResult | SweepResult,
    *,
    title: str = "Concept erasure",
    description: str | None = None,
    n_images: int = 6,
    table_name: str | None = None,
    strength_for_images: float | None = None,
) -> Report:
    """Add a concept-erasure section to a report.

    Parameters
    ----------
    report : Report or None
        The report to extend (None: a new one titled ``title``).
    result : ErasureResult or SweepResult
        From :func:`~evaluation.erasure.metrics.evaluate_erasure` / :func:`~evaluation.erasure.metrics.erasure_sweep`.
    title : str
        Section heading.
    description : str, optional
        A paragraph under the heading (method, layer, strength ...).
    n_images : int, default 6
        Before/after pairs per prompt set.
    table_name : str, optional
        Also save the per-image table (and the sweep table) as sidecar files under this name.
    strength_for_images : float, optional
        For a sweep: the strength whose images are shown (default: the largest one with kept images).

    Returns
    -------
    Report

    Raises
    ------
    TypeError
        If ``result`` is neither an ErasureResult nor a SweepResult.

    Examples
    --------
    >>> # erasure_section(None, res, title="ESD on conceptworld-diffusion").save("out")
    """
    if not isinstance(result, (ErasureResult, SweepResult)):
        raise TypeError(f"result must be an ErasureResult or a SweepResult, got {type(result).__name__}.")
    rep = report if report is not None else Report(title)
    if not isinstance(rep, Report):
        raise TypeError(f"report must be an evaluation.report.Report or None, got {type(rep).__name__}.")
    rep.heading(title)
    if description:
        rep.text(description)

    if isinstance(result, SweepResult):
        table = result.table()
        rep.heading("Strength sweep", level=3)
        rep.table(table, name=f"{table_name}_sweep" if table_name else None)
        erasure_col = "target_detection"
        utility_col = next((c for c in ("retain_colour", "retain_shape", "utility_clip_score") if c in table), None)
        if utility_col is not None and erasure_col in table:
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(4.5, 3.5))
            result.plot(erasure_col, utility_col, ax=ax)
            rep.figure(fig, caption=f"{erasure_col} vs {utility_col} across strengths {result.strengths}")
        with_images = [(s, r) for s, r in zip(result.strengths, result.results) if r.images]
        if not with_images:
            if table_name:
                rep.table(result.frame(), name=table_name, max_rows=0)
            return rep
        if strength_for_images is not None:
            picked = [p for p in with_images if p[0] == float(strength_for_images)]
            if not picked:
                raise ValueError(f"no kept images at strength {strength_for_images}; kept: {[s for s, _ in with_images]}.")
            strength, shown = picked[0]
        else:
            strength, shown = max(with_images, key=lambda p: p[0])
        rep.text(f"Details at strength {strength:g}.")
        result = shown

    summary = result.summary()
    summary = summary.sort_values("kind", key=lambda k: k.map(_KIND_ORDER).fillna(9), kind="stable")
    meta = result.meta
    rep.text(f"Concept: '{result.concept}'. Original: {meta.get('original', '?')}; erased: {meta.get('erased', '?')}. "
             "Detection by the ConceptWorld detector; erasure = fraction of target generations still showing the "
             "concept (lower is stronger); specificity = asked sibling concepts still drawn on retain prompts.")
    rep.table(summary.reset_index(drop=True), float_format="{:.3f}")
    if table_name:
        rep.table(result.frame, name=table_name, max_rows=0)
    rep.figure(_bars(result), caption="original vs erased, per metric")
    for set_name in ("target", "retain", "utility"):
        if (set_name, "original") in result.images:
            ims, caps = result.grid(set_name, n=n_images)
            rep.images(ims, caps, scale=3, title=f"{set_name} prompts: original / erased (same seeds)")
    return rep


def leace_section(report: Report | None, numbers: Mapping[str, Any], *, title: str = "LEACE check") -> Report:
    """Report a representation-level LEACE check (probe accuracy before / after vs the majority baseline).

    Parameters
    ----------
    report : Report or None
    numbers : mapping
        E.g. ``{"probe_accuracy_before": 0.93, "probe_accuracy_after": 0.51, "majority_baseline": 0.52,
        "rank": 1}`` (any keys; shown as a two-column table).
    title : str

    Returns
    -------
    Report

    Examples
    --------
    >>> rep = leace_section(None, {"probe_accuracy_after": 0.5, "majority_baseline": 0.5})
    >>> "LEACE check" in rep.to_html()
    True
    """
    if not isinstance(numbers, Mapping):
        raise TypeError(f"numbers must be a mapping {{name: value}}, got {type(numbers).__name__}.")
    rep = report if report is not None else Report(title)
    rep.heading(title)
    rep.table(pd.DataFrame({"quantity": list(numbers), "value": [numbers[k] for k in numbers]}), float_format="{:.4g}")
    return rep
