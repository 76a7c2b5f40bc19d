"""Metrics against hand computations, scikit-learn, and planted truth."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score

import cbm
from cbm.interventions import conceptworld_groups, intervention_curve
from cbm.metrics import (auroc_matrix, concept_metrics, coverage, evaluate, expected_calibration_error,
                         explanation_size, name_quality, subset_accuracy, top_k_accuracy, unit_alignment)

from cbm_testing import RULE_CONCEPTS


@pytest.fixture(scope="module")
def cbm_head(planted):
    torch.set_num_threads(1)
    tr = planted.train
    return cbm.ConceptBottleneckModel(n_epochs=25).fit(tr.X, tr.y, tr.concepts)


@pytest.fixture(scope="module")
def lf_head(planted):
    torch.set_num_threads(1)
    tr = planted.train
    return cbm.LabelFreeCBM(encoder=planted.encoder).fit(tr.X, tr.y, tr.concepts)


def test_top_k_and_ece_by_hand():
    proba = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.45, 0.1, 0.45], [0.1, 0.2, 0.7]])
    y = np.array([0, 2, 1, 2])
    assert top_k_accuracy(y, proba, 1) == 0.5
    assert top_k_accuracy(y, proba, 2) == 0.75
    assert top_k_accuracy(y, proba, 10) == 1.0
    # bins (0, 0.5] and (0.5, 1]: {0.6 right, 0.5 wrong, 0.45 wrong (tie -> class 0), 0.7 right}
    low = abs(0 - (0.5 + 0.45) / 2)
    high = abs(1 - (0.6 + 0.7) / 2)
    assert expected_calibration_error(y, proba, n_bins=2) == pytest.approx(0.5 * low + 0.5 * high)


def test_auroc_matrix_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    S = rng.integers(0, 5, size=(200, 3)).astype(float)
    S[:, 2] = 1.0  # constant
    Y = rng.random((200, 2)) < 0.4
    Y[:, 1] |= S[:, 0] > 2
    A = auroc_matrix(S, Y)
    for i in range(2):
        for j in range(2):
            assert A[i, j] == pytest.approx(roc_auc_score(Y[:, j], S[:, i]))
    assert np.all(A[2] == 0.5)
    assert np.isnan(auroc_matrix(S, np.ones((200, 1)))).all()


def test_coverage_and_explanation_size_by_hand(lf_head, planted):
    c = np.array([[4.0, 3.0, 2.0, 1.0, -5.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    X = planted.test.X[:3]
    # positive parts 4,3,2,1 (total 10): 90% -> 3 concepts (4+3+2), 91% -> 4, 50% -> 2 (4+3 >= 5);
    # absolute 5,4,3,2,1 (15): 50% -> 2 (5+4 >= 7.5)
    assert coverage(lf_head, X, levels=[0.9, 0.91, 0.5], contributions=c) == {
        0.9: (3 + 1 + 0) / 3, 0.91: (4 + 1 + 0) / 3, 0.5: (2 + 1 + 0) / 3}
    assert coverage(lf_head, X, levels=[0.5], mode="absolute", contributions=c) == {0.5: (2 + 1 + 0) / 3}
    assert explanation_size(lf_head, X, contributions=np.array([[2.0, 0, 0], [1.0, -1.0, 1.0]])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="mode must be"):
        coverage(lf_head, X, mode="signed", contributions=c)
    with pytest.raises(ValueError, match="levels must be in"):
        coverage(lf_head, X, levels=[1.5], contributions=c)


def test_concept_metrics_by_hand(cbm_head, planted):
    te = planted.test
    m = concept_metrics(cbm_head, te.X, te.concepts)
    S = cbm_head.concept_scores(te.X)
    pred = S > 0.5
    truth = te.concepts.to_numpy()
    assert m["concept_accuracy"] == pytest.approx((pred == truth).mean())
    assert m["exact_match_accuracy"] == pytest.approx((pred == truth).all(1).mean())
    aucs = [roc_auc_score(truth[:, j], S[:, j]) for j in range(truth.shape[1])]
    assert m["concept_auroc"] == pytest.approx(np.mean(aucs))
    assert m["concept_auroc"] > 0.95  # planted features carry every concept
    assert np.isnan(concept_metrics(cbm_head, te.X, pd.DataFrame({"nope": te.y > 0}))["concept_accuracy"])


def test_unit_alignment_on_planted_text_concepts(lf_head, planted):
    te = planted.test
    table = unit_alignment(lf_head, te.X, te.concepts, min_auroc=0.9)
    assert table.attrs["n_aligned"] >= 40
    assert table.attrs["aligned_named_correctly"] >= 0.9
    # rename the concepts wrongly: alignment stays, names are now wrong
    shuffled = lf_head.concept_truth_names_[1:] + lf_head.concept_truth_names_[:1]
    lf2 = cbm.LabelFreeCBM(encoder=planted.encoder)
    lf2.__dict__.update(lf_head.__dict__)
    lf2.concept_truth_names_ = shuffled
    assert unit_alignment(lf2, te.X, te.concepts).attrs["aligned_named_correctly"] < 0.1


def test_subset_accuracy(cbm_head, planted):
    te = planted.test
    classes = [0, 1]
    sel = np.isin(te.y, classes)
    proba = cbm_head.predict_proba(te.X[sel])[:, classes]
    expect = (np.array(classes)[proba.argmax(1)] == te.y[sel]).mean()
    assert subset_accuracy(cbm_head, te.X, te.y, classes) == pytest.approx(expect)
    with pytest.raises(ValueError, match="classes is empty"):
        subset_accuracy(cbm_head, te.X, te.y, [])
    with pytest.raises(ValueError, match="no sample has a class"):
        subset_accuracy(cbm_head, te.X[te.y != 0], te.y[te.y != 0], [0])


def test_intervention_curves(cbm_head, planted):
    te = planted.test
    curves = {p: intervention_curve(cbm_head, te.X, te.y, te.concepts, policy=p, fractions=[0, 0.5, 1],
                                    intervene_on=RULE_CONCEPTS) for p in ("random", "uncertainty", "group")}
    for p, cur in curves.items():
        assert cur["accuracy"].iloc[0] == pytest.approx(cbm_head.score(te.X, te.y))
        assert cur["accuracy"].iloc[-1] >= 0.99, p
    assert curves["random"]["n_intervened"].tolist() == [0.0, 7.0, 14.0]
    # uncertainty first: at least as good as random halfway (the uncertain concepts are the wrong ones)
    assert curves["uncertainty"]["accuracy"].iloc[1] >= curves["random"]["accuracy"].iloc[1]
    # group policy counts groups: the rule concepts span 6 ConceptWorld families
    groups = conceptworld_groups(RULE_CONCEPTS)
    assert len(groups) == 6
    g = intervention_curve(cbm_head, te.X, te.y, te.concepts, policy="group", fractions=[0.2],
                           intervene_on=RULE_CONCEPTS)
    sizes = [len(v) for v in groups.values()]
    assert min(sizes) <= g["n_intervened"].iloc[0] <= max(sizes)
    custom = intervention_curve(cbm_head, te.X, te.y, te.concepts, policy="group", fractions=[0.5],
                                groups={"a": ["red"], "b": ["blue", "green"]}, intervene_on=["red", "blue", "green"])
    assert custom["n_intervened"].iloc[0] == pytest.approx(1.5, abs=0.2)


def test_intervention_curve_errors(cbm_head, lf_head, planted):
    te = planted.test
    with pytest.raises(ValueError, match="policy must be one of"):
        intervention_curve(cbm_head, te.X, te.y, te.concepts, policy="oracle")
    with pytest.raises(ValueError, match="fractions must be"):
        intervention_curve(cbm_head, te.X, te.y, te.concepts, fractions=[1.5])
    with pytest.raises(KeyError, match="not columns of the ground truth"):
        intervention_curve(cbm_head, te.X, te.y, te.concepts, intervene_on=["nope"])
    with pytest.raises(ValueError, match="nothing can be intervened on"):
        intervention_curve(cbm_head, te.X, te.y, pd.DataFrame({"x": te.y > 0}))
    with pytest.raises(ValueError, match="no intervention group"):
        intervention_curve(cbm_head, te.X, te.y, te.concepts, policy="group", groups={"g": ["nope"]})


def test_evaluate_row(cbm_head, lf_head, planted):
    te = planted.test
    row, curves = evaluate(cbm_head, te.X, te.y, te.concepts, name="cbm", intervene_on=RULE_CONCEPTS,
                           return_curves=True)
    assert list(row.index) == ["cbm"] and len(row) == 1
    assert row["accuracy"].iloc[0] == pytest.approx(cbm_head.score(te.X, te.y))
    assert row["intervention_accuracy"].iloc[0] >= 0.99
    assert set(curves["policy"]) == {"random", "uncertainty", "group"} and (curves["head"] == "cbm").all()
    lp = evaluate(cbm.LinearProbe().fit(planted.train.X, planted.train.y), te.X, te.y, te.concepts)
    assert np.isnan(lp["aligned_named_correctly"].iloc[0]) and np.isnan(lp["intervention_accuracy"].iloc[0])
    both = pd.concat([row, evaluate(lf_head, te.X, te.y, name="lf")])
    assert both.loc["lf"].isna()["concept_accuracy"] and both.shape[0] == 2
    assert name_quality(lf_head) == {"name_similarity": pytest.approx(np.nan, nan_ok=True), "duplicate_rate": 0.0,
                                     "low_similarity_rate": pytest.approx(np.nan, nan_ok=True)}
