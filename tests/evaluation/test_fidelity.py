"""Fidelity metrics of concept importance (evaluation.fidelity) and the comparison table / plots / report."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from evaluation.decomposition import IdentityDecomposition, LayerConceptModel
from evaluation.fidelity import (
    ImportanceComparison,
    _spearman,
    c_deletion,
    c_insertion,
    c_mufidelity,
    compare_methods,
    deletion_curves,
    fidelity_scores,
)
from evaluation.importance import GradientXInput


@pytest.fixture(scope="module")
def linear_cm():
    """f(u) = u @ w + b on an identity concept space of 5 concepts (float64)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        head = nn.Linear(5, 2).double()
        x = torch.randn(12, 5, dtype=torch.float64)
    net = nn.Sequential(nn.Identity(), head)
    cm = LayerConceptModel(net, IdentityDecomposition().fit(x), "0")
    state = cm.prepare(x)
    w = head.weight.detach()[0]
    return cm, state, x, w, head.bias.detach()[0]


def test_deletion_and_insertion_curves_closed_form(linear_cm) -> None:
    cm, state, x, w, b = linear_cm
    contrib = x * w  # exact contributions to logit 0
    phi = contrib.clone()
    curves = deletion_curves(cm, state, phi, 0)
    order = torch.argsort(-phi, dim=1)
    removed = torch.cumsum(torch.gather(contrib, 1, order), 1)
    full = contrib.sum(1) + b
    expected = torch.cat([full[:, None], full[:, None] - removed], 1)
    assert np.allclose(curves, expected.numpy())
    ins = deletion_curves(cm, state, phi, 0, mode="insertion")
    assert np.allclose(ins[:, 0], b.item()) and np.allclose(ins[:, -1], full.numpy())
    auc = ((expected[:, :-1] + expected[:, 1:]) / 2).mean(1)
    assert c_deletion(cm, state, phi, 0) == pytest.approx(auc.mean().item())
    assert np.allclose(c_deletion(cm, state, phi, 0, reduce=False), auc.numpy())
    coarse = deletion_curves(cm, state, phi, 0, steps=2)  # removes ceil(5/2)=3 then 5 concepts
    assert np.allclose(coarse, expected[:, [0, 3, 5]].numpy())


def test_faithful_importances_score_best(linear_cm) -> None:
    cm, state, x, w, _ = linear_cm
    exact = (x * w).numpy()
    rng = np.random.default_rng(0)
    noise = rng.normal(size=exact.shape)
    reverse = -exact
    scores = {name: fidelity_scores(cm, state, phi, 0) for name, phi in
              (("exact", exact), ("noise", noise), ("reverse", reverse))}
    assert scores["exact"]["c_deletion"] < scores["noise"]["c_deletion"] < scores["reverse"]["c_deletion"]
    assert scores["exact"]["c_insertion"] > scores["noise"]["c_insertion"] > scores["reverse"]["c_insertion"]
    assert scores["exact"]["c_mufidelity"] == pytest.approx(1.0, abs=1e-12)
    assert scores["reverse"]["c_mufidelity"] == pytest.approx(-1.0, abs=1e-12)
    assert abs(scores["noise"]["c_mufidelity"]) < 0.5


def test_spearman_matches_scipy_and_handles_ties() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert _spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    a_t = np.round(a, 0)  # many ties
    assert _spearman(a_t, b) == pytest.approx(spearmanr(a_t, b).statistic)
    # round-off below the tolerance is a tie, not an order
    assert _spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 1.0 + 1e-12, 2.0])) == pytest.approx(1.0)
    assert np.isnan(_spearman(np.ones(4), b[:4]))


def test_metric_errors(linear_cm) -> None:
    cm, state, x, w, _ = linear_cm
    phi = (x * w).numpy()
    with pytest.raises(ValueError, match="expected \\[12, 5\\]"):
        c_deletion(cm, state, phi[:, :3], 0)
    with pytest.raises(ValueError, match="NaN"):
        c_insertion(cm, state, np.full_like(phi, np.nan), 0)
    with pytest.raises(ValueError, match="mode must be"):
        deletion_curves(cm, state, phi, 0, mode="both")
    with pytest.raises(ValueError, match="steps must be"):
        c_deletion(cm, state, phi, 0, steps=0)
    with pytest.raises(ValueError, match="drop_prob"):
        c_mufidelity(cm, state, phi, 0, drop_prob=1.0)
    with pytest.raises(ValueError, match="n_samples"):
        c_mufidelity(cm, state, phi, 0, n_samples=1)
    with pytest.raises(ValueError, match="unknown fidelity metric"):
        fidelity_scores(cm, state, phi, 0, metrics=["aopc"])


def test_compare_methods_table(linear_cm) -> None:
    cm, state, x, w, _ = linear_cm
    res = compare_methods(cm, state, target=0,
                          methods={"gradient_input": {}, "integrated_gradients": {}, "occlusion": {},
                                   "saliency": {}, "rise": {"n_masks": 400}, "sobol": {"n_design": 16},
                                   "random": {"seed": 1}})
    t = res.table
    assert list(t.index) == ["gradient_input", "integrated_gradients", "occlusion", "saliency", "rise", "sobol",
                             "random"]
    assert {"c_deletion", "c_insertion", "c_mufidelity", "seconds", "n_images"} <= set(t.columns)
    for m in ("integrated_gradients", "occlusion"):  # the linear identity, as rows of the table
        assert np.allclose(t.loc[m, ["c_deletion", "c_insertion", "c_mufidelity"]].to_numpy(float),
                           t.loc["gradient_input", ["c_deletion", "c_insertion", "c_mufidelity"]].to_numpy(float))
    assert t.loc["gradient_input", "c_mufidelity"] == pytest.approx(1.0)
    assert t.loc["gradient_input", "c_deletion"] <= t["c_deletion"].min() + 1e-12
    assert t.loc["gradient_input", "c_insertion"] >= t["c_insertion"].max() - 1e-12
    assert t.loc["random", "c_mufidelity"] < 0.5
    assert np.allclose(res.phi["gradient_input"], (x * w).numpy(), atol=1e-6)
    assert res.targets.tolist() == [0] * 12
    loc = res.local("occlusion")
    assert len(loc) == 12 * 5 and set(loc["method"]) == {"occlusion"}
    glob = res.global_("gradient_input")
    assert glob["share_of_logit"].sum() == pytest.approx(1.0)
    with pytest.raises(KeyError, match="was not compared"):
        res.local("lime")
    with pytest.raises(ValueError, match="methods is empty"):
        compare_methods(cm, state, methods=[])
    res2 = compare_methods(cm, state, methods=[GradientXInput(cm)], metrics=["c_mufidelity"])
    assert list(res2.table.columns) == ["c_mufidelity", "seconds", "n_images"]
    other = LayerConceptModel(cm.model, cm.decomposition, "0")
    with pytest.raises(ValueError, match="built on another concept model"):
        compare_methods(cm, state, methods=[GradientXInput(other)])


def test_comparison_renders_in_notebook_and_report(linear_cm, tmp_path) -> None:
    import matplotlib.pyplot as plt

    from evaluation.report import Report

    cm, state, _, _, _ = linear_cm
    res = compare_methods(cm, state, target=None, methods=["gradient_input", "saliency", "random"])
    assert isinstance(res, ImportanceComparison)
    html = res._repr_html_()
    assert "<table" in html and "gradient_input" in html and "c_mufidelity" in html
    assert html.count("<img") == 1 and "data:image/png;base64," in html  # fidelity bars + cluster graph
    ax = res.plot()
    assert len(ax.patches) == 3 * 3
    ax2 = res.cluster_graph("gradient_input", min_count=2, embedding="pca")
    assert ax2.get_title() == "Strategic cluster graph (pca)"
    plt.close("all")
    report = res.to_report(Report("audit"), min_count=2, embedding="pca")
    out = report.to_html()
    assert "Concept importance" in out and "Fidelity per method" in out and out.count("<img") >= 2
    assert "Most important concepts per class" in out
    path = report.save(tmp_path)
    assert (tmp_path / "importance_fidelity.csv").exists() and path.exists()


def test_generator_models_skip_gradient_methods() -> None:
    from concepts.bank import ConceptBank
    from evaluation.decomposition import BankDecomposition, GeneratorConceptModel

    from test_decomposition import _mean_colour, toy_generator

    dec = BankDecomposition(ConceptBank(torch.eye(2), names=["r", "b"]), ridge=0.0).fit()
    cm = GeneratorConceptModel(toy_generator(), dec, "mix", _mean_colour, output_names=["R", "G", "B"])
    res = compare_methods(cm, ["red", "blue"], target=["R", "B"], methods=["gradient_input", "occlusion"],
                          metrics=["c_deletion", "c_insertion"])
    assert list(res.table.index) == ["occlusion"]
    # removing the one concept that makes each image: deletion drops to grey (0.5) right away
    assert res.table.loc["occlusion", "c_deletion"] == pytest.approx(0.5 * (0.75 + 0.5))
    with pytest.raises(ValueError, match="no method could run"):
        compare_methods(cm, ["red"], target="R", methods=["saliency"])
