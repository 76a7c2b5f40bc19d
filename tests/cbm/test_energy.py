"""EnergyCBM against ConceptWorld truth on planted features.

The world has strongly correlated concepts (``count=2 -> cross``, ``star -> triangle``, ``red -> circle``,
each planted with p = 0.95) and rules over the 12 concepts used. Features are ``X = C @ A + noise`` with
weaker directions for three shapes (hard to see), so their evidence is ambiguous and the energy's
knowledge of co-occurrence matters. Everything is measured against the world's concept labels and classes.
"""
from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from cbm import ConceptBottleneckModel
from cbm.energy import EnergyCBM, conditional_mae, empirical_conditionals, plot_conditionals
from cbm.interventions import intervention_curve
from cbm.metrics import concept_metrics, evaluate
from concepts.world import ConceptWorld, Rule

matplotlib.use("Agg")

SUB = ["red", "blue", "green", "circle", "square", "triangle", "star", "cross",
       "count=1", "count=2", "count=3", "count=4"]
COUNTS = [SUB.index(c) for c in ("count=1", "count=2", "count=3", "count=4")]
WEAK = ("circle", "triangle", "cross")
RULES = (
    Rule("red crowd", all_of=("red",), any_of=("count=3", "count=4")),
    Rule("blue square", all_of=("blue", "square")),
    Rule("pair", all_of=("count=2",)),
)
SMALL = dict(n_epochs=30, hidden=64, global_hidden=64, prior_hidden=32, max_steps=100)


class Data:
    def __init__(self) -> None:
        world = ConceptWorld(seed=0, image_size=32, rules=RULES, correlations=[
            ("red", "circle", 0.95), ("count=2", "cross", 0.95), ("star", "triangle", 0.95)])
        rng = np.random.default_rng(0)
        A = rng.normal(size=(len(SUB), 32))
        A /= np.linalg.norm(A, axis=1, keepdims=True)
        for c in WEAK:
            A[SUB.index(c)] *= 0.5
        self.class_names = list(world.class_names)
        self.world, self.A = world, A
        self.splits = {name: self.make(n, seed) for name, n, seed in (("train", 2000, 1), ("test", 600, 2))}

    def make(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
        b = self.world.sample(n, seed=seed)
        noise = np.random.default_rng(seed + 10).normal(scale=0.5, size=(n, 32))
        X = (b.concepts[SUB].to_numpy(float) @ self.A + noise).astype(np.float32)
        return X, b.labels, b.concepts[SUB].reset_index(drop=True)


@pytest.fixture(scope="module")
def data() -> Data:
    torch.set_num_threads(1)
    return Data()


@pytest.fixture(scope="module")
def head(data) -> EnergyCBM:
    torch.set_num_threads(1)
    X, y, C = data.splits["train"]
    return EnergyCBM(**SMALL).fit(X, y, C)


@pytest.fixture(scope="module")
def scores(data, head) -> np.ndarray:
    torch.set_num_threads(1)
    return head.concept_scores(data.splits["test"][0])


def test_joint_inference_enforces_the_one_count_structure(data, head, scores):
    """Exactly one count is true in every image: the jointly inferred counts are exactly right more often
    than the concept energies' own (independent) evidence and than the vanilla CBM's predictors."""
    X, y, C = data.splits["test"]
    L = C.to_numpy()
    Xtr, ytr, Ctr = data.splits["train"]
    vanilla = ConceptBottleneckModel(n_epochs=10).fit(Xtr, ytr, Ctr)

    def count_exact(P: np.ndarray) -> float:
        return float(((P[:, COUNTS] > 0.5) == L[:, COUNTS]).all(1).mean())

    joint, evidence = count_exact(scores), count_exact(head.concept_evidence(X))
    base = count_exact(vanilla.concept_scores(X))
    assert joint > evidence + 0.03 and joint > base + 0.03, (joint, evidence, base)
    # the inferred counts are (nearly) always a single count
    assert ((scores[:, COUNTS] > 0.5).sum(1) == 1).mean() > 0.97


def _paired_counts(head, X, C, S, a, b, wrong=None) -> tuple[int, int, int]:
    """Intervene on ``a`` (set to the truth) where it was mispredicted: (partners fixed, partners broken, n)."""
    L = C.to_numpy()
    i, j = SUB.index(a), SUB.index(b)
    if wrong is None:
        wrong = np.flatnonzero((S[:, i] > 0.5) != L[:, i])
    after = head.intervened_concepts(X[wrong], [a], concepts=C.iloc[wrong])
    before_ok = (S[wrong, j] > 0.5) == L[wrong, j]
    after_ok = (after[:, j] > 0.5) == L[wrong, j]
    return int((after_ok & ~before_ok).sum()), int((before_ok & ~after_ok).sum()), len(wrong)


def test_intervention_propagates_to_the_correlated_concept(data, head, scores):
    """Correcting a mispredicted ``count=2`` raises the accuracy of its weakly visible partner ``cross``
    (p(cross | count=2) = 0.76 vs 0.37 without); without propagation (ECBM's reference code) the partner
    cannot change. The gain is a paired count on the mispredicted samples (partners fixed vs broken); under
    "no effect" both are equally likely, so a one-sided sign test is the criterion (the other two planted
    pairs gain less, and are tested with enough samples in the slow test below)."""
    from scipy.stats import binomtest

    X, y, C = data.splits["test"]
    L = C.to_numpy()
    i, j = SUB.index("count=2"), SUB.index("cross")
    after = head.intervened_concepts(X, ["count=2"], concepts=C)
    frozen = head.intervened_concepts(X, ["count=2"], concepts=C, propagate=False)
    assert np.array_equal(frozen[:, j], scores[:, j])            # no propagation: partner untouched
    assert np.array_equal(after[:, i], L[:, i].astype(float))    # the intervened concept holds its value
    proba = head.intervene(X, ["count=2"], concepts=C)          # the class read-out sees the re-inferred concepts
    np.testing.assert_allclose(proba, head.predict_proba_from_concepts(after), atol=1e-5)
    wrong = np.flatnonzero((scores[:, i] > 0.5) != L[:, i])
    assert len(wrong) >= 30, "the test needs mispredicted concepts to correct"
    fixed, broken, n = _paired_counts(head, X, C, scores, "count=2", "cross", wrong)
    # the rows of the intervention on the subset are the rows of the intervention on everything (up to the
    # batch-wide stopping rule: the inference stops once no probability moves by more than tol = 1e-3)
    np.testing.assert_allclose(head.intervened_concepts(X[wrong], ["count=2"], concepts=C.iloc[wrong]), after[wrong],
                               atol=0.02)
    assert (fixed - broken) / n > 0.05, (fixed, broken, n)
    # 58 corrections give 12 fixed vs 3 broken (p = 0.018); the slow test below has the power for p < 1e-3
    assert binomtest(fixed, fixed + broken, alternative="greater").pvalue < 0.05, (fixed, broken)


@pytest.mark.slow
def test_intervention_propagates_on_every_planted_pair(data, head):
    """The same paired statistic on 4,000 more held-out images (a few hundred corrections per pair) for
    all three planted pairs: each pair gains, and the pooled sign test gives p < 1e-3. (The weaker pairs
    gain little on false positives: p(triangle | not star) = 0.40 carries almost no information.)"""
    from scipy.stats import binomtest

    X, _, C = data.make(4000, seed=3)
    S = head.concept_scores(X)
    fixed_all = broken_all = 0
    gains = {}
    for a, b in (("count=2", "cross"), ("star", "triangle"), ("red", "circle")):
        fixed, broken, n = _paired_counts(head, X, C, S, a, b)
        assert n >= 200, "the test needs mispredicted concepts to correct"
        gains[a] = (fixed - broken) / n
        fixed_all, broken_all = fixed_all + fixed, broken_all + broken
    assert min(gains.values()) > 0 and gains["count=2"] > 0.05, gains
    assert binomtest(fixed_all, fixed_all + broken_all, alternative="greater").pvalue < 1e-3, (fixed_all, broken_all)


def test_concepts_set_to_truth_give_the_rule_class(data, head):
    """p(y | c) is the decision list: with every concept set to its truth, the class is the rule's."""
    X, y, C = data.splits["test"]
    proba = head.intervene(X, SUB, concepts=C)
    assert (head.classes_[proba.argmax(1)] == y).mean() >= 0.97
    # the same through the metric suite (scores-only path)
    curve = intervention_curve(head, X, y, C, fractions=[0.0, 1.0])
    assert curve["accuracy"].iloc[-1] >= 0.97
    assert curve["accuracy"].iloc[-1] > curve["accuracy"].iloc[0]


def test_energy_conditionals_match_heldout_frequencies(data, head):
    X, y, C = data.splits["test"]
    cy = head.conditional_probabilities("concept|class")
    emp_cy = empirical_conditionals(C, y, "concept|class", classes=head.classes_)
    support = pd.Series(np.bincount(y, minlength=len(head.classes_)), index=emp_cy.index)
    assert conditional_mae(cy, emp_cy, support=support, min_support=30) < 0.1
    cc = head.conditional_probabilities("concept|concept")
    emp_cc = empirical_conditionals(C, kind="concept|concept")
    assert conditional_mae(cc, emp_cc) < 0.1
    # the planted correlation itself, and exclusivity of counts
    assert abs(cc.loc["count=2", "cross"] - emp_cc.loc["count=2", "cross"]) < 0.1
    assert cc.loc["count=2", "count=3"] < 0.05
    nc = head.conditional_probabilities("concept|not concept")
    emp_nc = empirical_conditionals(C, kind="concept|not concept")
    assert conditional_mae(nc, emp_nc) < 0.1
    joint = head.conditional_probabilities("joint")
    prior = head.conditional_probabilities("class")
    np.testing.assert_allclose(joint.to_numpy(), cy.to_numpy() * prior["p"].to_numpy()[:, None], atol=1e-9)
    assert abs(prior["p"].sum() - 1) < 1e-9 and cy.attrs["method"] == "exact"
    named = head.conditional_probabilities("class", class_names=data.class_names)
    assert list(named.index) == data.class_names


def test_gibbs_estimates_agree_with_exact_sums(head):
    """Gibbs estimates of the probability tables agree with the exact sums over the 4,096 concept vectors.

    200 chains x 3,000 sweeps (1,000 burn-in): over four sampler seeds the largest error of the 144
    ``p(c_k | c_j)`` cells was 0.018-0.026 and of ``p(c_k | y)`` 0.013-0.032 (mean error 0.004), so 0.06
    is more than twice the worst observed sampling error. Too few sweeps leave a burn-in bias (0.12 at
    120 sweeps, the same with 2,000 chains): the prior's block Gibbs mixes slowly between counts.
    """
    exact = head.conditional_probabilities("concept|concept")
    sampled_head = clone(head).set_params(exact_max_concepts=0, n_chains=200, n_sweeps=3000)
    sampled_head.__dict__.update({k: v for k, v in head.__dict__.items() if k.endswith("_")})
    gibbs = sampled_head.conditional_probabilities("concept|concept")
    assert gibbs.attrs["method"] == "gibbs"
    assert np.nanmax(np.abs(gibbs.to_numpy() - exact.to_numpy())) < 0.06
    cy_exact = head.conditional_probabilities("concept|class").to_numpy()
    cy_gibbs = sampled_head.conditional_probabilities("concept|class").to_numpy()
    assert np.abs(cy_gibbs - cy_exact).max() < 0.06
    # the most probable concept vector of every class is the same
    top_exact = head.top_configurations(1)["concepts"].tolist()
    assert sampled_head.top_configurations(1)["concepts"].tolist() == top_exact


def test_top_configurations_are_consistent_with_the_rules(data, head):
    top = head.top_configurations(3, class_names=data.class_names)
    assert top["probability"].between(0, 1).all()
    assert (top.groupby("class")["probability"].apply(lambda p: p.is_monotonic_decreasing)).all()
    pair = top[(top["class"] == "pair") & (top["rank"] == 1)]["concepts"].iloc[0].split(" & ")
    assert "count=2" in pair and not {"count=1", "count=3", "count=4"} & set(pair)
    crowd = top[(top["class"] == "red crowd") & (top["rank"] == 1)]["concepts"].iloc[0].split(" & ")
    assert "red" in crowd and {"count=3", "count=4"} & set(crowd)


def test_evidence_is_recovered_from_the_scores(data, head, scores):
    """At the inference's fixed point the per-concept evidence is a closed form of the scores."""
    X = data.splits["test"][0]
    ev = head.concept_evidence(X)
    true = np.log(ev) - np.log1p(-ev)
    rec = head._recover_evidence(torch.tensor(scores)).numpy()
    ok = (np.abs(true) < 8) & (scores > 1e-4) & (scores < 1 - 1e-4)
    assert np.median(np.abs(rec[ok] - true[ok])) < 0.05


def test_without_the_global_energy_scores_are_the_evidence(data, head):
    X = data.splits["test"][0][:50]
    ev = head.concept_evidence(X)
    local = clone(head).set_params(inference_weights=(1.0, 0.0, 0.0), temperature=2.0)
    local.__dict__.update({k: v for k, v in head.__dict__.items() if k.endswith("_")})
    logit = np.log(ev) - np.log1p(-ev)
    np.testing.assert_allclose(local.concept_scores(X), 1 / (1 + np.exp(-logit / 2.0)), atol=1e-5)


def test_evaluate_reports_the_joint_concepts(data, head, scores):
    X, y, C = data.splits["test"]
    row = evaluate(head, X[:200], y[:200], C[:200], policies=("random",), fractions=(0.0, 1.0))
    cm = concept_metrics(head, X[:200], C[:200], S=scores[:200])
    assert row["exact_match_accuracy"].iloc[0] == pytest.approx(cm["exact_match_accuracy"])
    assert row["intervention_accuracy"].iloc[0] >= 0.97


def test_fit_is_seeded_and_clonable(data):
    X, y, C = data.splits["train"]
    kw = dict(n_epochs=3, hidden=16, global_hidden=8, prior_hidden=8, max_steps=20)
    a = EnergyCBM(**kw).fit(X[:300], y[:300], C[:300])
    b = clone(a).fit(X[:300], y[:300], C[:300])
    np.testing.assert_array_equal(a.concept_scores(X[:20]), b.concept_scores(X[:20]))
    c = EnergyCBM(**kw, random_state=1).fit(X[:300], y[:300], C[:300])
    assert not np.array_equal(a.concept_scores(X[:20]), c.concept_scores(X[:20]))
    sub = EnergyCBM(**kw, concept_columns=["red", "count=2"]).fit(X[:300], y[:300], C[:300])
    assert list(sub.bank_.names) == ["red", "count=2"]


def test_plot_conditionals_draws_the_table(head):
    table = head.conditional_probabilities("concept|concept")
    ax = plot_conditionals(table)
    assert [t.get_text() for t in ax.get_xticklabels()] == SUB
    assert ax.get_title() == "p(column | row)"
    import matplotlib.pyplot as plt

    _, own = plt.subplots()
    assert plot_conditionals(head.conditional_probabilities("joint"), ax=own) is own
    plt.close("all")


@pytest.mark.parametrize("params, match", [
    ({"hidden": 0}, "hidden must be a positive integer"),
    ({"n_sweeps": 1.5}, "n_sweeps must be a positive integer"),
    ({"exact_max_concepts": 40}, "exact_max_concepts must be an integer in"),
    ({"dropout": 1.0}, "dropout must be a probability"),
    ({"flip_prob": 1.5}, "flip_prob must be a probability"),
    ({"lr": 0}, "lr must be a finite number >"),
    ({"temperature": 0.0}, "temperature must be a finite number >"),
    ({"tol": -1.0}, "tol must be a finite number >="),
    ({"loss_weights": (1, 2)}, "loss_weights must be three finite numbers"),
    ({"loss_weights": "abc"}, "loss_weights must be three numbers"),
    ({"inference_weights": (0.0, 1.0, 1.0)}, r"inference_weights\[0\]"),
    ({"concept_columns": "red"}, "concept_columns must be a list"),
    ({"concept_columns": []}, "concept_columns is empty"),
    ({"concept_columns": ["red", "red"]}, "concept_columns has repeats"),
])
def test_invalid_parameters_raise(data, params, match):
    X, y, C = data.splits["train"]
    with pytest.raises((ValueError, TypeError), match=match):
        EnergyCBM(**params, n_epochs=1).fit(X[:50], y[:50], C[:50])


def test_usage_errors_raise(data, head):
    X, y, C = data.splits["train"]
    with pytest.raises(NotFittedError):
        EnergyCBM().conditional_probabilities()
    with pytest.raises(ValueError, match="needs concept labels|concept supervision"):
        EnergyCBM(n_epochs=1).fit(X[:50], y[:50])
    with pytest.raises(KeyError, match="not columns of concepts"):
        EnergyCBM(n_epochs=1, concept_columns=["purple"]).fit(X[:50], y[:50], C[:50])
    with pytest.raises(ValueError, match="kind must be one of"):
        head.conditional_probabilities("concept|pixel")
    with pytest.raises(ValueError, match="top must be a positive integer"):
        head.top_configurations(0)
    with pytest.raises(ValueError, match="needs the class labels y"):
        empirical_conditionals(C, kind="concept|class")
    with pytest.raises(ValueError, match="kind must be one of"):
        empirical_conditionals(C, y, kind="nope")
    with pytest.raises(ValueError, match="one label per row"):
        empirical_conditionals(C, y[:5])
    with pytest.raises(ValueError, match="not in classes"):
        empirical_conditionals(C, y, classes=[0])
    with pytest.raises(ValueError, match="share no finite cells"):
        conditional_mae(pd.DataFrame({"a": [0.1]}), pd.DataFrame({"b": [0.2]}))
    with pytest.raises(TypeError, match="must be a pandas DataFrame"):
        plot_conditionals(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="12 concepts"):
        head.predict_proba_from_concepts(np.zeros((2, 3)))
    assert math.isfinite(head.history_["loss"][-1])
