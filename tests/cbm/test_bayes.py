"""BayesianZeroShot (concept-guided Bayesian zero-shot classification) against closed forms and planted toys.

The toy text encoder embeds a prompt as the sum of the vectors of its known words, so every prompt
embedding, every image-prompt cosine and hence every aggregated class score is known exactly.
"""
from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from cbm.bayes import (
    AGGREGATORS,
    BayesianZeroShot,
    aggregate,
    class_concept_file,
    corrupt_class_concepts,
    soft_trim_weights,
)
from concepts.selection import log_det
from concepts.vocabularies import read_class_concepts
from concepts.world import DEFAULT_RULES

D = 24


class WordEncoder:
    """Embeds a text as the sum of its known words' vectors (other words: nothing)."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def encode_texts(self, texts, normalize=True):
        out = np.zeros((len(texts), D))
        for i, t in enumerate(texts):
            for w in t.replace(".", " ").split():
                if w in self.vectors:
                    out[i] += self.vectors[w]
        x = torch.tensor(out, dtype=torch.float32)
        return torch.nn.functional.normalize(x, dim=1) if normalize else x


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _noise(word: str, scale: float) -> np.ndarray:
    return scale * np.random.default_rng(zlib.crc32(word.encode())).normal(size=D)


class Toy:
    """Three classes with their own directions; each class's concepts lie near its direction, with
    unequal list lengths (10, 6, 8) so the per-class prompt tables are padded."""

    def __init__(self) -> None:
        basis = np.eye(D)
        self.dirs = {"ant": basis[0], "bee": basis[1], "cow": basis[2]}
        self.lists = {"ant": [f"ant{i}" for i in range(10)], "bee": [f"bee{i}" for i in range(6)],
                      "cow": [f"cow{i}" for i in range(8)]}
        vec = {}
        for cls, words in self.lists.items():
            for w in words:
                vec[w] = _unit(self.dirs[cls] + _noise(w, 0.25))
        for w in ("zzz", "qqq", "xxx"):  # nonsense: directions of no class
            vec[w] = _unit(_noise(w, 1.0) - 3 * self.dirs["ant"] * 0.3)
        self.encoder = WordEncoder(vec)
        rng = np.random.default_rng(0)
        y = np.repeat([0, 1, 2], 40)
        X = np.stack([self.dirs[c] for c in ("ant", "bee", "cow")])[y] + rng.normal(scale=0.15, size=(120, D))
        self.X, self.y = X.astype(np.float32), y
        self.names = ["ant", "bee", "cow"]

    def head(self, lists=None, **kw) -> BayesianZeroShot:
        params = dict(encoder=self.encoder, template="{concepts}", concepts_per_prompt=1, selection="all")
        params.update(kw)
        return BayesianZeroShot(self.lists if lists is None else lists, self.names, **params)


@pytest.fixture(scope="module")
def toy() -> Toy:
    return Toy()


# ------------------------------------------------------------------------------------------------ soft-trim
def test_soft_trim_weights_closed_form():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64)
    w, rho = soft_trim_weights(s, eps=0.0)
    # median 3, MAD = median(2, 1, 0, 1, 97) = 1; one score beyond 2.5 MAD -> rho = 1/5
    assert float(rho) == pytest.approx(0.2)
    kappa = math.log(0.8 / 0.2)
    expected = 1 / (1 + np.exp(-kappa * (np.array([1, 2, 3, 4, 100.0]) - 3) / 1))
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-12)
    assert float(aggregate(s, "soft_trim", mad_eps=0.0)) == pytest.approx(float((expected * s.numpy()).sum() / expected.sum()))


def test_soft_trim_steepness_is_clipped_and_missing_prompts_are_ignored():
    # no outlier: rho = 0, kappa = log(1/0) clipped to kappa_range[1]
    s = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    w, rho = soft_trim_weights(s, kappa_range=(0.1, 4.0), eps=0.0)
    assert float(rho) == 0.0
    np.testing.assert_allclose(w[0].numpy(), 1 / (1 + np.exp(-4.0 * (np.arange(5) - 2.0) / 1.0)), rtol=1e-6)
    # half outliers: kappa = log(1) = 0, clipped to kappa_range[0]
    s = torch.tensor([[0.0, 0.0, 0.0, 10.0, -10.0, 0.0, 10.0, -10.0]])
    w, rho = soft_trim_weights(s, lambda_threshold=1.0, kappa_range=(0.1, 4.0), eps=1.0)
    assert float(rho) == pytest.approx(0.5)
    np.testing.assert_allclose(w[0].numpy(), 1 / (1 + np.exp(-0.1 * s[0].numpy() / 1.0)), rtol=1e-6)
    # NaN = missing prompt: weight 0, not counted; same result as without it
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0, math.nan, math.nan]])
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    wa, ra = soft_trim_weights(a)
    wb, rb = soft_trim_weights(b)
    np.testing.assert_allclose(wa[0, :5].numpy(), wb[0].numpy(), rtol=1e-6)
    assert (wa[0, 5:] == 0).all() and float(ra) == pytest.approx(float(rb))
    for agg in AGGREGATORS:
        if agg != "prompt_ensemble":
            assert float(aggregate(a, agg)) == pytest.approx(float(aggregate(b, agg)), rel=1e-6), agg


def test_outlier_rate_estimates_on_planted_outliers():
    """Clean Gaussian scores: the rate is the normal tail beyond 2.5 MADs, 2 * (1 - Phi(2.5 * 0.6745))
    = 0.092. Planted far outliers (at -12 sd) are all flagged and switched off, so the estimate is the
    planted rate plus the inliers' tail and grows with it."""
    rng = np.random.default_rng(0)
    # many prompts: the median and MAD are at their population values (with 51 the MAD's small-sample
    # bias raises the rate to about 0.10)
    clean = torch.tensor(rng.normal(size=(200, 2001)))
    _, rho = soft_trim_weights(clean)
    tail = 2 * (1 - norm.cdf(2.5 * norm.ppf(0.75)))
    assert abs(float(rho.mean()) - tail) < 0.004  # sampling sd of the mean ~ 0.0005
    n, C = 4000, 51
    means = []
    for rate in (0.1, 0.2, 0.3):
        s = rng.normal(size=(n, C))
        m = int(round(rate * C))
        s[:, :m] = -12.0
        w, rho = soft_trim_weights(torch.tensor(s))
        assert (rho >= m / C - 1e-9).all()                  # every planted outlier is flagged
        # ... and switched off (the steepness falls when a row's estimated rate is high, hence the mean)
        assert float(w[:, :m].mean()) < 1e-3 and float((w[:, :m].max(1).values < 0.05).double().mean()) > 0.99
        assert float(w[:, m:].mean()) > 0.3
        means.append(float(rho.mean()))
        assert m / C < means[-1] < m / C + 0.15
    assert means[0] < means[1] < means[2]


# ------------------------------------------------------------------------------------------------ aggregators
def test_aggregators_match_hand_computations():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0], dtype=torch.float64)
    vals = s.numpy()
    assert float(aggregate(s, "average")) == pytest.approx(22.0)
    assert float(aggregate(s, "max")) == 100.0
    assert float(aggregate(s, "median")) == 3.0
    # symmetric 20 % trim of 5 values drops one on each side
    assert float(aggregate(s, "trimmed_mean", trim=0.2)) == pytest.approx(3.0)
    assert float(aggregate(s, "trimmed_mean", trim=0.0)) == pytest.approx(22.0)
    prior = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    assert float(aggregate(s, "average", prior=prior)) == pytest.approx(2.5)
    # M-estimates: roots of sum psi((s - mu) / scale) = 0 with scale 1.4826 MAD (MAD = 1)
    scale = 1.4826

    def huber_eq(mu: float) -> float:
        return float(np.clip((vals - mu) / scale, -1.345, 1.345).sum())

    def cauchy_eq(mu: float) -> float:
        r = (vals - mu) / scale
        return float((r / (1 + (r / 2.385) ** 2)).sum())

    assert float(aggregate(s, "huber")) == pytest.approx(brentq(huber_eq, 1.0, 10.0), abs=1e-4)
    assert float(aggregate(s, "cauchy")) == pytest.approx(brentq(cauchy_eq, 1.0, 5.0), abs=1e-4)
    # the robust ones ignore the outlier, the mean and max do not
    for agg in ("median", "trimmed_mean", "huber", "cauchy"):
        assert 2.0 < float(aggregate(s, agg)) < 4.5, agg
    # soft-trim is one-sided (CGBC's weights): a prompt far *below* the median (a concept that does not
    # match) is switched off, one far above keeps its full weight
    low = torch.tensor([-100.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert 2.0 < float(aggregate(low, "soft_trim")) < 3.5
    assert float(aggregate(s, "soft_trim")) > 30
    # batched over leading dimensions, one row at a time is the same
    B = torch.tensor(np.random.default_rng(1).normal(size=(3, 4, 7)))
    for agg in AGGREGATORS:
        if agg == "prompt_ensemble":
            continue
        out = aggregate(B, agg)
        loop = torch.stack([torch.stack([aggregate(B[i, j], agg) for j in range(4)]) for i in range(3)])
        torch.testing.assert_close(out, loop, rtol=1e-9, atol=1e-9)


def test_aggregate_rejects_unknown_names():
    with pytest.raises(ValueError, match="aggregator must be one of"):
        aggregate(torch.zeros(3), "mode")


# ------------------------------------------------------------------------------------------------ the head
@pytest.mark.parametrize("aggregator", AGGREGATORS)
def test_vectorised_prediction_equals_a_per_sample_loop(toy, aggregator):
    head = toy.head(aggregator=aggregator, class_prior=[0.5, 0.3, 0.2]).fit(toy.X, toy.y)
    proba = head.predict_proba(toy.X)
    U = torch.nn.functional.normalize(head.bank_.vectors, dim=1).double()
    log_prior = np.log([0.5, 0.3, 0.2])
    assert head.prompts_.groupby("class").size().to_dict() == {"ant": 10, "bee": 6, "cow": 8}
    for i in range(0, len(toy.X), 7):
        x = torch.nn.functional.normalize(torch.tensor(toy.X[i], dtype=torch.float64), dim=0)
        logits = []
        for k in range(3):
            Uk = U[torch.as_tensor(np.flatnonzero(head.prompt_class_ == k))]
            if aggregator == "prompt_ensemble":  # cosine to the renormalised mean prompt (CuPL-style)
                score = float(x @ torch.nn.functional.normalize(Uk.mean(0), dim=0))
            else:
                score = float(aggregate(Uk @ x, aggregator))
            logits.append(head.temperature_ * score + log_prior[k])
        p = np.exp(np.array(logits) - max(logits))
        np.testing.assert_allclose(proba[i], p / p.sum(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(head.predict_proba(toy.X[i:i + 1])[0], proba[i], rtol=1e-5, atol=1e-7)
    assert head.score(toy.X, toy.y) > 0.8


def test_planted_outlier_prompts_are_switched_off(toy):
    """Two of the ten ``ant`` concepts (20 %) are replaced by nonsense: on ``ant`` images their prompts
    get (nearly) no weight under soft-trim, the estimated outlier rate of ``ant`` covers them, and the
    ``ant`` score is closer to the clean one than the plain average's."""
    bad = dict(toy.lists, ant=["zzz", "qqq"] + toy.lists["ant"][2:])
    soft = toy.head(bad, temperature=1.0).fit(toy.X, toy.y)
    ants = toy.X[toy.y == 0]
    w = soft.prompt_weights(ants)
    w = w[w["class"] == "ant"]
    outlier = w["prompt"].isin(["zzz", "qqq"])
    assert w[outlier]["weight"].mean() < 0.1 * w[~outlier]["weight"].mean()
    assert w[outlier].groupby("sample")["weight"].sum().max() < 0.2   # 2 of 10 prompts: 0.2 without trimming
    np.testing.assert_allclose(w.groupby("sample")["weight"].sum(), 1.0, rtol=1e-6)
    rates = soft.outlier_rates(ants)
    assert list(rates.columns) == ["ant", "bee", "cow"]
    assert rates["ant"].mean() >= 0.2 and (rates["ant"] >= 0.2 - 1e-6).mean() > 0.85   # 90 % measured
    clean = toy.head(temperature=1.0).fit(toy.X, toy.y)
    assert soft.outlier_rate_["ant"] > clean.outlier_rate_["ant"] + 0.1
    np.testing.assert_allclose(soft.outlier_rate_["ant"], rates["ant"].mean(), rtol=1e-6)  # mean over ant images
    clean_score = clean.decision_function(ants)[:, 0]
    avg_score = toy.head(bad, aggregator="average", temperature=1.0).fit(toy.X, toy.y).decision_function(ants)[:, 0]
    soft_score = soft.decision_function(ants)[:, 0]
    assert np.abs(soft_score - clean_score).mean() < 0.5 * np.abs(avg_score - clean_score).mean()
    # explanations stay inside the explained class's prompts
    ex = soft.explain(ants[:3], top=3)
    assert set(ex["concept"]) <= set(soft.prompts_.loc[soft.prompts_["class"] == "ant", "prompt"])


def test_priors_enter_the_marginalisation(toy):
    """Concept priors weight the prompts (average = prior-weighted mean); the class prior adds log p(k)."""
    priors = {"ant": {"ant0": 3.0, "ant1": 0.0}}
    head = toy.head(aggregator="average", concept_priors=priors, temperature=1.0).fit(toy.X, toy.y)
    table = head.prompts_.set_index("prompt")["prior"]
    assert table["ant0"] == 3.0 and table["ant1"] == 0.0 and table["bee0"] == 1.0
    S = head.concept_scores(toy.X[:5])
    ant = np.flatnonzero(head.prompt_class_ == 0)
    wts = table.iloc[ant].to_numpy()
    np.testing.assert_allclose(head.decision_function(toy.X[:5])[:, 0], S[:, ant] @ wts / wts.sum(), rtol=1e-5)
    flat = toy.head(temperature=1.0).fit(toy.X, toy.y).decision_function(toy.X[:5])
    tilted = toy.head(temperature=1.0, class_prior={0: 1.0, 1: 2.0, 2: 1.0}).fit(toy.X, toy.y).decision_function(toy.X[:5])
    np.testing.assert_allclose(tilted - flat, np.tile(np.log([0.25, 0.5, 0.25]), (5, 1)), atol=1e-5)


def test_compositional_prompts_follow_the_template(toy):
    head = BayesianZeroShot(toy.lists, toy.names, encoder=toy.encoder, concepts_per_prompt=2, n_prompts=4,
                            max_combinations=20).fit(toy.X, toy.y)
    ant = head.prompts_[head.prompts_["class"] == "ant"]
    assert len(ant) == 4 and head.n_candidates_["ant"] == 20 and head.n_candidates_["bee"] == 15  # C(6, 2)
    for _, row in ant.iterrows():
        a, b = row["concepts"]
        assert row["prompt"] == f"a photo of a ant with {a} or {b}." and a != b
    again = clone(head).fit(toy.X, toy.y)
    assert again.prompts_.equals(head.prompts_)                       # seeded
    other = clone(head).set_params(random_state=3).fit(toy.X, toy.y)
    assert not other.prompts_["prompt"].equals(head.prompts_["prompt"])


# ------------------------------------------------------------------------------------------------ DPP selection
def test_dpp_selection_picks_diverse_prompts():
    """One class whose 18 concepts form three tight clusters: greedy MAP picks one prompt per cluster;
    so does dppy's k-DPP sample, up to the small probability (about 0.003 per draw here) of a triple with
    two near-copies; a uniform random subset of 3 often repeats a cluster (P(all distinct) = 0.26)."""
    dirs = np.eye(D)[:3]
    vec, cluster = {}, {}
    for c, name in enumerate("rgb"):
        for i in range(6):
            w = f"{name}{i}"
            vec[w] = _unit(dirs[c] + _noise(w, 0.005))
            cluster[w] = c
    vec["other"] = np.eye(D)[5]
    enc = WordEncoder(vec)
    lists = {"one": [w for w in vec if w != "other"], "two": ["other"]}
    X = np.eye(D, dtype=np.float32)[[0, 5]]
    distinct = {}
    for selection in ("greedy", "sample", "random"):
        counts = []
        for seed in range(8):
            head = BayesianZeroShot(lists, ["one", "two"], encoder=enc, template="{concepts}", concepts_per_prompt=1,
                                    n_prompts=3, selection=selection, random_state=seed, temperature=1.0).fit(X, [0, 1])
            chosen = head.prompts_.loc[head.prompts_["class"] == "one", "prompt"]
            counts.append(len({cluster[w] for w in chosen}))
            if selection == "greedy" and seed == 0:
                E = torch.nn.functional.normalize(head.bank_.vectors[:3], dim=1).numpy()
                greedy_logdet = log_det(E @ E.T, [0, 1, 2])
        distinct[selection] = counts
    assert distinct["greedy"] == [3] * 8 and sum(c == 3 for c in distinct["sample"]) >= 7
    assert np.mean(distinct["random"]) < 2.9 and np.mean(distinct["random"]) < np.mean(distinct["sample"])
    # the greedy choice has (near) the largest log det among triples: one per cluster, det close to 1
    assert greedy_logdet > -0.1


# ------------------------------------------------------------------------------------------------ concept lists
def test_shipped_concept_list_covers_the_conceptworld_classes():
    lists = read_class_concepts(class_concept_file("conceptworld"))
    assert set(lists) == {r.name for r in DEFAULT_RULES} | {"other"}
    assert all(len(v) == 15 and len(set(v)) == 15 for v in lists.values())


def test_concept_lists_from_json_files(toy, tmp_path):
    path = tmp_path / "lists.json"
    path.write_text(json.dumps(toy.lists))
    a = toy.head(str(path), temperature=1.0).fit(toy.X, toy.y)
    b = toy.head(path, temperature=1.0).fit(toy.X, toy.y)
    c = toy.head(temperature=1.0).fit(toy.X, toy.y)
    np.testing.assert_allclose(a.predict_proba(toy.X), c.predict_proba(toy.X))
    assert b.prompts_.equals(c.prompts_)
    # keyed by label instead of class text
    by_label = toy.head({str(i): toy.lists[n] for i, n in enumerate(toy.names)}, temperature=1.0)
    by_label.set_params(class_names=None).fit(toy.X, toy.y)
    np.testing.assert_allclose(by_label.predict_proba(toy.X), c.predict_proba(toy.X))


@pytest.mark.parametrize("content, error, match", [
    ("{not json", ValueError, r"bad\.json: not valid JSON"),
    ('["a", "b"]', ValueError, r"bad\.json: expected a JSON object"),
    ('{"ant": "ant0"}', ValueError, r"bad\.json: class 'ant' must map to a list of strings"),
    ('{"ant": [1, 2]}', ValueError, "must map to a list of strings"),
])
def test_bad_concept_files_give_clear_errors(toy, tmp_path, content, error, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(error, match=match):
        toy.head(str(path)).fit(toy.X, toy.y)


def test_concept_list_errors(toy, tmp_path):
    with pytest.raises(FileNotFoundError, match="no concept list at"):
        toy.head(str(tmp_path / "missing.json")).fit(toy.X, toy.y)
    with pytest.raises(KeyError, match="has no concepts for class 'cow'"):
        toy.head({"ant": ["ant0"], "bee": ["bee0"]}).fit(toy.X, toy.y)
    with pytest.raises(ValueError, match=r"class_concepts\['cow'\] is empty"):
        toy.head(dict(toy.lists, cow=[])).fit(toy.X, toy.y)
    with pytest.raises(TypeError, match="must be a mapping"):
        toy.head(["ant0", "bee0"]).fit(toy.X, toy.y)
    with pytest.raises(TypeError, match=r"class_concepts\['ant'\] must be a list of concept strings"):
        toy.head({"ant": "ant0", "bee": ["bee0"], "cow": ["cow0"]}).fit(toy.X, toy.y)
    with pytest.raises(ValueError, match="must contain non-empty strings only"):
        toy.head(dict(toy.lists, ant=["ant0", ""])).fit(toy.X, toy.y)
    with pytest.raises(ValueError, match="no shipped concept list named 'cub'"):
        class_concept_file("cub")


def test_corrupt_class_concepts_replaces_the_given_fraction():
    lists = read_class_concepts(class_concept_file("conceptworld"))
    bad = corrupt_class_concepts(lists, 0.2, random_state=0)
    pool = {c for v in lists.values() for c in v}
    for cls, concepts in lists.items():
        changed = [b for a, b in zip(concepts, bad[cls]) if a != b]
        assert len(changed) == 3                                   # 20 % of 15
        assert all(c not in concepts for c in changed)             # outliers: other classes' concepts or nonsense
    kinds = [c in pool for cls in lists for a, c in zip(lists[cls], bad[cls]) if a != c]
    assert 0 < sum(kinds) < len(kinds)                             # both kinds occur
    assert corrupt_class_concepts(lists, 0.2, random_state=0) == bad
    assert corrupt_class_concepts(lists, 0.2, random_state=1) != bad
    assert corrupt_class_concepts(lists, 0.0) == lists
    with pytest.raises(ValueError, match="rate must be a fraction"):
        corrupt_class_concepts(lists, 1.5)
    with pytest.raises(ValueError, match="nonsense_fraction must be a probability"):
        corrupt_class_concepts(lists, 0.2, nonsense_fraction=2)
    with pytest.raises(ValueError, match="nonsense is empty"):
        corrupt_class_concepts(lists, 0.2, nonsense=())
    with pytest.raises(ValueError, match="no other-class concepts to borrow"):
        corrupt_class_concepts({"a": ["x", "y"]}, 0.5, nonsense=(), nonsense_fraction=0.0)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("params, error, match", [
    ({"class_concepts": None}, ValueError, "needs class_concepts"),
    ({"aggregator": "mode"}, ValueError, "aggregator must be one of"),
    ({"selection": "best"}, ValueError, "selection must be one of"),
    ({"template": "a photo of {cls}"}, ValueError, "template must be a string with a {concepts}"),
    ({"template": "{cls} {concepts} {x}"}, ValueError, "has placeholders other than"),
    ({"combine_op": " "}, ValueError, "combine_op must be a non-empty word"),
    ({"n_prompts": 0}, ValueError, "n_prompts must be a positive integer"),
    ({"concepts_per_prompt": 1.5}, ValueError, "concepts_per_prompt must be a positive integer"),
    ({"lambda_threshold": -1.0}, ValueError, "lambda_threshold must be a finite number > 0"),
    ({"huber_delta": math.inf}, ValueError, "huber_delta must be a finite number > 0"),
    ({"trim": 0.5}, ValueError, r"trim must be a fraction in \[0, 0.5\)"),
    ({"kappa_range": "ab"}, TypeError, "kappa_range must be two numbers"),
    ({"kappa_range": (2.0, 1.0)}, ValueError, "kappa_range must satisfy 0 < low <= high"),
    ({"temperature": 0.0}, ValueError, "temperature must be a number > 0 or None"),
    ({"encoder": None}, ValueError, "needs a text encoder"),
    ({"class_prior": [1.0, 2.0]}, ValueError, "class_prior has 2 entries but there are 3 classes"),
    ({"class_prior": {0: 1.0, 1: 1.0}}, ValueError, "class_prior has no entry for class 2"),
    ({"class_prior": [1.0, 0.0, 1.0]}, ValueError, "class_prior must be positive and finite"),
    ({"concept_priors": {"ant": {"ant0": -1.0}}}, ValueError, "concept_priors for class 'ant' must be finite"),
])
def test_invalid_parameters_raise(toy, params, error, match):
    head = toy.head(**{k: v for k, v in params.items() if k != "class_concepts"})
    if "class_concepts" in params:
        head.set_params(class_concepts=params["class_concepts"])
    with pytest.raises(error, match=match):
        head.fit(toy.X, toy.y)


def test_usage_errors_raise(toy):
    with pytest.raises(NotFittedError):
        toy.head().outlier_rates(toy.X)
    with pytest.raises(NotFittedError):
        toy.head().prompt_weights(toy.X)
    with pytest.raises(ValueError, match="the prompts are 24-dimensional"):
        toy.head().fit(toy.X[:, :10], toy.y)
    head = toy.head().fit(toy.X, toy.y)
    with pytest.raises(ValueError, match="X has 10 features, but BayesianZeroShot is expecting 24"):
        head.predict(toy.X[:, :10])
    params = clone(head).get_params()
    assert params["aggregator"] == "soft_trim" and params["selection"] == "all"
    assert pd.api.types.is_float_dtype(head.outlier_rate_)
