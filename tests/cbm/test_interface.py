"""The ConceptHead contract, checked on every head with planted features (truth known exactly)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import cbm
from concepts.bank import ConceptBank

HEADS = ["linear_probe", "label_free", "sparse", "cms", "zero_shot", "dn_cbm", "cbm"]


def make(name: str, p) -> cbm.ConceptHead:
    enc = p.encoder
    return {
        "linear_probe": lambda: cbm.LinearProbe(),
        "label_free": lambda: cbm.LabelFreeCBM(encoder=enc),
        "sparse": lambda: cbm.SparseCBM(encoder=enc, n_epochs=8),
        "cms": lambda: cbm.ConceptMatrixSearch(encoder=enc, class_names=p.class_names),
        "zero_shot": lambda: cbm.ZeroShotClassifier(encoder=enc, class_names=p.class_names),
        "dn_cbm": lambda: cbm.DiscoverThenNameCBM(encoder=enc, n_concepts=96, top_k=8, sae_epochs=5),
        "cbm": lambda: cbm.ConceptBottleneckModel(n_epochs=10),
    }[name]()


@pytest.fixture(scope="module")
def fitted(planted):
    torch.set_num_threads(1)
    tr = planted.train
    return {name: make(name, planted).fit(tr.X, tr.y, tr.concepts) for name in HEADS}


@pytest.mark.parametrize("name", HEADS)
def test_contract(name, planted, fitted):
    head, te = fitted[name], planted.test
    proba = head.predict_proba(te.X)
    assert proba.shape == (len(te.y), len(head.classes_))
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(head.predict(te.X), head.classes_[proba.argmax(1)])
    assert head.score(te.X, te.y) == pytest.approx((head.predict(te.X) == te.y).mean())
    S = head.concept_scores(te.X)
    assert S.shape == (len(te.y), head.bank_.n_concepts) and isinstance(head.bank_, ConceptBank)
    # the bottleneck is the whole story: probabilities from the concept scores are the same
    np.testing.assert_allclose(head.predict_proba_from_concepts(S), proba, atol=1e-5)
    assert head.n_features_in_ == te.X.shape[1]
    html = head._repr_html_()
    assert type(head).__name__ in html and "fitted" in html


@pytest.mark.parametrize("name", HEADS)
def test_not_fitted_and_feature_count(name, planted, fitted):
    with pytest.raises(NotFittedError, match="not fitted"):
        make(name, planted).predict(planted.test.X)
    assert "not fitted" in make(name, planted)._repr_html_()
    with pytest.raises(ValueError, match=r"X has 63 features, but .* is expecting 64 features"):
        fitted[name].predict(planted.test.X[:, :63])


@pytest.mark.parametrize("name", HEADS)
def test_clone_and_params(name, planted):
    head = make(name, planted)
    params = head.get_params()
    twin = clone(head)
    assert type(twin) is type(head) and twin.get_params().keys() == params.keys()
    assert not hasattr(twin, "bank_")


@pytest.mark.parametrize("name", ["sparse", "dn_cbm", "cbm"])
def test_seeded_runs_are_identical(name, planted):
    tr, te = planted.train, planted.test
    a = make(name, planted).fit(tr.X[:600], tr.y[:600], tr.concepts[:600]).predict_proba(te.X[:50])
    b = make(name, planted).fit(tr.X[:600], tr.y[:600], tr.concepts[:600]).predict_proba(te.X[:50])
    np.testing.assert_array_equal(a, b)
    state = torch.random.get_rng_state()
    make(name, planted).fit(tr.X[:300], tr.y[:300], tr.concepts[:300])
    assert torch.equal(state, torch.random.get_rng_state()), "fit must not consume the global torch RNG"


@pytest.mark.parametrize("name", ["linear_probe", "label_free", "sparse", "dn_cbm", "zero_shot"])
def test_linear_contributions_are_exact(name, planted, fitted):
    """For heads linear in the concepts, contributions sum to logit(x) - logit(baseline)."""
    head, X = fitted[name], planted.test.X[:40]
    logits = head.decision_function(X)
    pred = logits.argmax(1)
    base = head._baseline().numpy()
    with torch.no_grad():
        at_base = head._logits(torch.as_tensor(np.tile(base, (len(X), 1)), dtype=torch.float32)).numpy()
    c = head.contributions(X)
    np.testing.assert_allclose(c.sum(1), logits[np.arange(len(X)), pred] - at_base[np.arange(len(X)), pred],
                               rtol=1e-4, atol=1e-4)


def test_occlusion_contributions_match_definition(planted, fitted):
    head, X = fitted["cbm"], planted.test.X[:5]
    S = torch.as_tensor(head.concept_scores(X))
    c = head.contributions(X)
    j = 3
    S2 = S.clone()
    S2[:, j] = float(head.concept_mean_[j])
    with torch.no_grad():
        pred = head._logits(S).argmax(1)
        expect = (head._logits(S) - head._logits(S2)).gather(1, pred[:, None])[:, 0].numpy()
    np.testing.assert_allclose(c[:, j], expect, atol=1e-5)


def test_explain_table(planted, fitted):
    head = fitted["label_free"]
    X = planted.test.X[:7]
    table = head.explain(X, top=3)
    assert list(table.columns) == ["sample", "prediction", "target", "rank", "concept", "score", "baseline",
                                   "contribution", "share"]
    assert len(table) == 21 and table["rank"].tolist()[:3] == [1, 2, 3]
    c = head.contributions(X)
    top = np.argsort(-np.abs(c), axis=1)[:, 0]
    first = table[table["rank"] == 1]
    assert first["concept"].tolist() == [head.bank_.names[j] for j in top]
    np.testing.assert_array_equal(first["prediction"].to_numpy(), head.predict(X))
    assert (np.abs(table.groupby("sample")["share"].apply(lambda s: s.abs().sum())) <= 1 + 1e-9).all()
    other = head.explain(X, top=None, target=head.classes_[0])
    assert (other["target"] == head.classes_[0]).all() and len(other) == 7 * head.bank_.n_concepts
    with pytest.raises(ValueError, match="top must be a positive integer"):
        head.explain(X, top=0)


def test_label_free_scores_are_cosines(planted, fitted):
    head, X = fitted["label_free"], planted.test.X[:20]
    A = planted.directions
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    expect = Xn @ (A / np.linalg.norm(A, axis=1, keepdims=True)).T
    np.testing.assert_allclose(head.concept_scores(X), expect, atol=1e-5)
    assert list(head.bank_.names) == planted.names


def test_string_labels_and_images_with_encoder(planted):
    """Class labels may be strings; X may be images when the head has an image encoder."""
    from concepts.encoders import CallableEncoder

    tr = planted.train
    labels = np.array(planted.class_names)[tr.y]
    head = cbm.LinearProbe().fit(tr.X, labels)
    assert set(head.predict(tr.X[:20])) <= set(planted.class_names)
    images = np.random.default_rng(0).integers(0, 255, size=(30, 8, 8, 3), dtype=np.uint8)
    enc = CallableEncoder(lambda x: x.flatten(1)[:, :16], embed_dim=16)
    y = (images[:, 0, 0, 0] > 127).astype(int)
    head = cbm.LinearProbe(encoder=enc).fit(images, y)
    feats = enc.encode_images(images, normalize=True).numpy()
    np.testing.assert_allclose(head.predict_proba(images), head.predict_proba(feats), atol=1e-6)
    with pytest.raises(TypeError, match="give the head an image encoder"):
        cbm.LinearProbe().fit(images, y)


# ---------------------------------------------------------------------------------------------- interventions
def test_intervention_values(planted, fitted):
    head, te = fitted["label_free"], planted.test
    X = te.X[:30]
    j = head.concept_indices("red")[0]
    S = head.intervened_scores(X, {"red": "p95"})
    assert np.allclose(S[:, j], np.percentile(head.concept_scores(planted.train.X)[:, j], 95), atol=1e-4)
    S = head.intervened_scores(X, {"red": True, 5: 0.25})
    assert np.allclose(S[:, j], head.concept_on_[j]) and np.allclose(S[:, 5], 0.25)
    # on/off of a label-free concept with labels at fit: median score of the positives/negatives
    tr_S = head.concept_scores(planted.train.X)[:, j]
    lab = planted.train.concepts["red"].to_numpy()
    assert head.concept_on_[j] == pytest.approx(np.median(tr_S[lab]), abs=1e-5)
    assert head.concept_off_[j] == pytest.approx(np.median(tr_S[~lab]), abs=1e-5)
    S = head.intervened_scores(X, ["red"], concepts=te.concepts[:30])
    np.testing.assert_allclose(S[:, j], np.where(te.concepts["red"][:30], head.concept_on_[j], head.concept_off_[j]))
    per = np.linspace(0, 1, 30)
    np.testing.assert_allclose(head.intervened_scores(X, {"red": per})[:, j], per, atol=1e-6)
    S = head.intervened_scores(X, {"red": "mean", "blue": "off"})
    assert np.allclose(S[:, j], head.concept_mean_[j], atol=1e-6)
    p = head.intervene(X, {"red": "on"})
    np.testing.assert_allclose(p, head.predict_proba_from_concepts(head.intervened_scores(X, {"red": "on"})))


def test_intervention_errors(planted, fitted):
    head, X = fitted["label_free"], planted.test.X[:5]
    with pytest.raises(KeyError, match=r"no concept named 'rde'.*Did you mean"):
        head.intervene(X, {"rde": 1.0})
    with pytest.raises(IndexError, match="out of range"):
        head.intervene(X, {999: 1.0})
    with pytest.raises(TypeError, match="name .str. or an index"):
        head.intervene(X, {1.5: 1.0})
    with pytest.raises(ValueError, match="needs the ground truth"):
        head.intervene(X, {"red": "truth"})
    with pytest.raises(KeyError, match="no column 'red'"):
        head.intervene(X, {"red": "truth"}, concepts=pd.DataFrame({"blue": [True] * 5}))
    with pytest.raises(ValueError, match="unknown intervention value 'high'"):
        head.intervene(X, {"red": "high"})
    with pytest.raises(ValueError, match="between p0 and p100"):
        head.intervene(X, {"red": "p150"})
    with pytest.raises(ValueError, match=r"expected a scalar or an array \[5\]"):
        head.intervene(X, {"red": np.ones(4)})
    with pytest.raises(ValueError, match="must be finite"):
        head.intervene(X, {"red": float("nan")})
    with pytest.raises(ValueError, match="NaN or infinite"):
        head.intervene(X, {"red": np.array([1.0, 2, 3, 4, np.inf])})
    with pytest.raises(TypeError, match="numbers or booleans"):
        head.intervene(X, {"red": np.array(list("abcde"))})
    with pytest.raises(TypeError, match="mapping .concept: value. or a list"):
        head.intervene(X, "red")
    with pytest.raises(ValueError, match=r"concept scores have shape \(5, 3\)"):
        head.predict_proba_from_concepts(np.zeros((5, 3)))


def test_dn_cbm_interventions_by_shared_name(planted, fitted):
    """Heads without concept labels intervene on their own units; a shared name sets every unit carrying it."""
    head = fitted["dn_cbm"]
    name = pd.Series(head.concept_truth_names_).value_counts().index[0]
    idx = head.concept_indices(name)
    assert len(idx) == head.concept_truth_names_.count(name)
    S = head.intervened_scores(planted.test.X[:4], {name: "on"})
    np.testing.assert_allclose(S[:, idx], np.tile(head.concept_on_[idx], (4, 1)))


# ---------------------------------------------------------------------------------------------- fit errors
def test_fit_errors(planted):
    tr = planted.train
    with pytest.raises(ValueError, match="X has 1500 samples but y has 10"):
        cbm.LinearProbe().fit(tr.X, tr.y[:10])
    with pytest.raises(ValueError, match="single class"):
        cbm.LinearProbe().fit(tr.X, np.zeros(len(tr.X)))
    with pytest.raises(ValueError, match="1-D array"):
        cbm.LinearProbe().fit(tr.X, tr.y[:, None])
    with pytest.raises(ValueError, match="NaN or infinite"):
        cbm.LinearProbe().fit(np.full((4, 2), np.nan), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="0 samples"):
        cbm.LinearProbe().fit(np.zeros((0, 3)), [])
    with pytest.raises(TypeError, match="numeric features"):
        cbm.LinearProbe().fit(np.array([["a", "b"], ["c", "d"]]), [0, 1])
    with pytest.raises(ValueError, match="concept supervision"):
        cbm.ConceptBottleneckModel().fit(tr.X, tr.y)
    with pytest.raises(ValueError, match="X has 1500 samples but concepts has 3 rows"):
        cbm.ConceptBottleneckModel().fit(tr.X, tr.y, tr.concepts[:3])
    with pytest.raises(TypeError, match="pandas DataFrame with one boolean column"):
        cbm.ConceptBottleneckModel().fit(tr.X, tr.y, [1, 2])
    with pytest.raises(ValueError, match="must be boolean or 0/1"):
        cbm.ConceptBottleneckModel().fit(tr.X[:3], [0, 1, 0], pd.DataFrame({"a": [0.5, 1, 0]}))
    with pytest.raises(ValueError, match="must be boolean or 0/1; got dtype"):
        cbm.ConceptBottleneckModel().fit(tr.X[:3], [0, 1, 0], pd.DataFrame({"a": ["x", "y", "z"]}))
    with pytest.raises(ValueError, match="a DataFrame or an array"):
        cbm.ConceptBottleneckModel().fit(tr.X[:3], [0, 1, 0], np.zeros(3))
    with pytest.raises(ValueError, match="has no columns"):
        cbm.ConceptBottleneckModel().fit(tr.X[:3], [0, 1, 0], pd.DataFrame(index=range(3)))
    with pytest.raises(ValueError, match="needs a text encoder"):
        cbm.LabelFreeCBM().fit(tr.X, tr.y)
    with pytest.raises(ValueError, match="same image-text model"):
        cbm.LabelFreeCBM(encoder=planted.encoder).fit(tr.X[:, :10], tr.y)
    with pytest.raises(ValueError, match="labels the head was not fitted on"):
        cbm.evaluate(cbm.LinearProbe().fit(tr.X, tr.y), tr.X[:2], [0, 99])


@pytest.mark.parametrize("head, match", [
    (cbm.LinearProbe(l2=-1), "l2 must be a number >= 0"),
    (cbm.LinearProbe(max_iter=0), "max_iter must be a positive integer"),
    (cbm.LabelFreeCBM(l1="x"), "l1 must be a number >= 0"),
    (cbm.SparseCBM(objective="l2"), "objective must be one of"),
    (cbm.SparseCBM(targets="x"), "targets must be"),
    (cbm.SparseCBM(gumbel_tau=0), "gumbel_tau must be a number > 0"),
    (cbm.SparseCBM(cbl_weight=-1), "cbl_weight must be a number >= 0"),
    (cbm.SparseCBM(logit_scale=-1), "logit_scale must be a number > 0"),
    (cbm.SparseCBM(n_epochs=0), "n_epochs must be a positive integer"),
    (cbm.ConceptMatrixSearch(normalize="l2"), "normalize must be one of"),
    (cbm.ConceptMatrixSearch(rule="min"), "rule must be one of"),
    (cbm.ConceptMatrixSearch(temperature=0), "temperature must be a number > 0"),
    (cbm.ConceptMatrixSearch(class_bank="x"), "class_bank must be a ConceptBank"),
    (cbm.ZeroShotClassifier(temperature=-2), "temperature must be a number > 0"),
    (cbm.ZeroShotClassifier(class_bank=3), "class_bank must be a ConceptBank"),
    (cbm.DiscoverThenNameCBM(top_k=0), "top_k must be a positive integer"),
    (cbm.DiscoverThenNameCBM(n_concepts=0), "n_concepts must be a positive integer or None"),
    (cbm.DiscoverThenNameCBM(lam=-1), "lam must be a number >= 0"),
    (cbm.DiscoverThenNameCBM(sae="sae"), "sae must be an SAE estimator"),
    (cbm.DiscoverThenNameCBM(fit_sae=False), "pass sae=<fitted SAE>"),
    (cbm.DiscoverThenNameCBM(n_concepts=4, top_k=8), "top_k=8 is larger than n_concepts=4"),
    (cbm.ConceptBottleneckModel(training="mixed"), "training must be one of"),
    (cbm.ConceptBottleneckModel(concept_predictor="tree"), "concept_predictor must be one of"),
    (cbm.ConceptBottleneckModel(label_head="tree"), "label_head must be one of"),
    (cbm.ConceptBottleneckModel(intervention_prob=2), "intervention_prob must be a probability"),
    (cbm.ConceptBottleneckModel(hidden=0), "hidden must be a positive integer"),
    (cbm.ConceptBottleneckModel(lr=0), "lr must be a number > 0"),
    (cbm.ConceptBottleneckModel(concept_columns=["nope"]), "concept_columns"),
    (cbm.ConceptBottleneckModel(concept_columns=[]), "concept_columns is empty"),
])
def test_parameter_errors(head, match, planted):
    tr = planted.train
    if "encoder" in head.get_params() and head.get_params()["encoder"] is None:
        head.set_params(encoder=planted.encoder)
    if "class_names" in head.get_params():
        head.set_params(class_names=planted.class_names)
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        head.fit(tr.X[:200], tr.y[:200], tr.concepts[:200])


def test_intervention_mask_reaches_heads_that_reinfer(planted):
    """Heads that re-infer concepts see which ones were intervened on (the hook energy-based CBMs use)."""
    seen = {}

    class Reinfer(cbm.LinearProbe):
        def _intervened_logits(self, S, intervened):
            seen["mask"] = intervened.cpu().numpy().copy()
            return self._logits(S)

    tr = planted.train
    head = Reinfer().fit(tr.X[:100], tr.y[:100])
    p = head.intervene(tr.X[:4], {"feature_3": 1.0, 5: "p50"})
    assert seen["mask"].shape == (4, 64) and seen["mask"].sum() == 8
    assert seen["mask"][:, [3, 5]].all()
    np.testing.assert_allclose(p, head.predict_proba_from_concepts(head.intervened_scores(tr.X[:4], {"feature_3": 1.0, 5: "p50"})))
    with pytest.raises(ValueError, match="intervened has shape"):
        head.predict_proba_from_concepts(np.zeros((4, 64)), intervened=np.zeros((4, 3), bool))
