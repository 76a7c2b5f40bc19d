"""LEACE benchmark: the linear guarantee on held-out data, and agreement with the `concept-erasure` package.

Data: ``sklearn.datasets.make_classification`` (4096 x 64, 10 informative features) with k = 2 and k = 5 classes,
fitted on one half and probed on the other (logistic regression, the analysis-anchors' CPU check §5.1).
If ``concept_erasure`` is installed, the same data go through its ``LeaceFitter`` (LEACE and orth) and the largest
absolute difference of the erased features is reported.

Run: ``.venv/bin/python benchmarks/erasure_leace.py`` (no arguments). Last line: ``RESULT {json}`` with
``probe_accuracy_after``, ``majority_baseline`` (k = 2), the same with ``_k5``, ``probe_accuracy_before``,
``rank_k2``/``rank_k5`` and ``max_diff_vs_concept_erasure`` (null when the package is missing).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

import numpy as np
import torch
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from evaluation.erasure.leace import LeaceFitter  # noqa: E402


def run(k: int, seed: int = 0) -> dict:
    X, y = make_classification(4096, 64, n_informative=10, n_classes=k, random_state=seed)
    Xtr, ytr, Xte, yte = X[:2048], y[:2048], X[2048:], y[2048:]
    majority = float(np.bincount(yte, minlength=k).max() / len(yte))
    before = LogisticRegression(max_iter=3000).fit(Xtr, ytr).score(Xte, yte)
    t0 = time.perf_counter()
    fitter = LeaceFitter().fit(Xtr, ytr)
    eraser = fitter.eraser_
    t_fit = time.perf_counter() - t0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        after = LogisticRegression(C=np.inf, max_iter=5000).fit(fitter.transform(Xtr), ytr).score(fitter.transform(Xte), yte)
    out = {"k": k, "majority": majority, "before": float(before), "after": float(after), "rank": eraser.rank,
           "fit_s": t_fit, "diff_leace": None, "diff_orth": None, "ref_fit_s": None}
    try:
        import concept_erasure as ce
    except ImportError:
        return out
    Xt, Xe = torch.as_tensor(Xtr), torch.as_tensor(Xte)
    Z = torch.nn.functional.one_hot(torch.as_tensor(ytr), k).double()
    t0 = time.perf_counter()
    ref = ce.LeaceFitter.fit(Xt, Z).eraser
    out["ref_fit_s"] = time.perf_counter() - t0
    out["diff_leace"] = float((ref(Xe) - eraser(Xe)).abs().max())
    ref_o = ce.LeaceFitter.fit(Xt, Z, method="orth").eraser
    ours_o = LeaceFitter(method="orth").fit(Xtr, ytr).eraser_
    out["diff_orth"] = float((ref_o(Xe) - ours_o(Xe)).abs().max())
    return out


def main() -> None:
    torch.set_num_threads(1)
    rows = [run(2), run(5)]
    print(f"{'k':>3} {'majority':>9} {'probe before':>13} {'probe after':>12} {'rank':>5} {'fit s':>7} "
          f"{'ref fit s':>10} {'|diff| leace':>13} {'|diff| orth':>12}")
    for r in rows:
        ref = "-" if r["ref_fit_s"] is None else f"{r['ref_fit_s']:.3f}"
        dl = "-" if r["diff_leace"] is None else f"{r['diff_leace']:.2e}"
        do = "-" if r["diff_orth"] is None else f"{r['diff_orth']:.2e}"
        print(f"{r['k']:>3} {r['majority']:>9.4f} {r['before']:>13.4f} {r['after']:>12.4f} {r['rank']:>5} "
              f"{r['fit_s']:>7.3f} {ref:>10} {dl:>13} {do:>12}")
    diffs = [d for r in rows for d in (r["diff_leace"], r["diff_orth"]) if d is not None]
    result = {
        "probe_accuracy_after": round(rows[0]["after"], 4),
        "majority_baseline": round(rows[0]["majority"], 4),
        "probe_accuracy_before": round(rows[0]["before"], 4),
        "probe_accuracy_after_k5": round(rows[1]["after"], 4),
        "majority_baseline_k5": round(rows[1]["majority"], 4),
        "rank_k2": rows[0]["rank"],
        "rank_k5": rows[1]["rank"],
        "max_diff_vs_concept_erasure": max(diffs) if diffs else None,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
