"""Head-specific behaviour: closed forms, the Sparse-CBM fixes, CMS rules, decision-list label heads, DN-CBM."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import cbm
from cbm.concept_sets import class_texts, describe_rules, text_bank
from cbm.sparse import _soft_ce
from concepts.bank import ConceptBank
from concepts.world import DEFAULT_RULES


# ---------------------------------------------------------------------------------------------- linear heads
def test_linear_probe_agrees_with_sklearn(planted):
    tr, te = planted.train, planted.test
    X, y = tr.X[:600], tr.y[:600]
    head = cbm.LinearProbe(l2=1e-2).fit(X, y)
    mu, sd = X.mean(0), X.std(0, ddof=1)
    ref = LogisticRegression(C=1 / (1e-2 * len(X)), max_iter=3000).fit((X - mu) / sd, y)
    agree = (head.predict(te.X) == ref.predict((te.X - mu) / sd)).mean()
    assert agree > 0.98


def test_label_free_l1_makes_the_final_layer_sparse(planted):
    tr = planted.train
    dense = cbm.LabelFreeCBM(encoder=planted.encoder, l1=0.0).fit(tr.X, tr.y)
    sparse = cbm.LabelFreeCBM(encoder=planted.encoder, l1=0.01).fit(tr.X, tr.y)
    assert (dense.coef_ != 0).float().mean() > 0.9
    assert (sparse.coef_ != 0).float().mean() < 0.3
    top = sparse.class_concepts(top=3)
    # "dotted" is the rule "dots": its top concept is the dots background
    assert top[top["class"] == DEFAULT_RULES.index(next(r for r in DEFAULT_RULES if r.name == "dotted"))][
        "concept"].iloc[0] == "dots"
    assert "top concepts" in sparse._repr_html_()


# ---------------------------------------------------------------------------------------------- Sparse-CBM
def test_soft_ce_is_cross_entropy_for_one_hot_targets():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    t = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    expect = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    assert _soft_ce(logits, t, 1) == pytest.approx(expect.item())
    # rows without positives are skipped, not counted as zero loss
    t2 = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    assert _soft_ce(logits, t2, 1) == pytest.approx(torch.nn.functional.cross_entropy(logits[:1], torch.tensor([0])).item())


def test_contrastive_objective_does_not_pair_image_i_with_concept_i(planted):
    """Reordering the concept list reorders the concepts and changes nothing else (the reference's
    diagonal pairing would give a different model for every order)."""
    tr, te = planted.train, planted.test
    bank = text_bank("conceptworld", planted.encoder)
    perm = np.random.default_rng(0).permutation(bank.n_concepts)
    shuffled = ConceptBank(bank.vectors[perm], names=[bank.names[i] for i in perm])
    kw = dict(objective="contrastive", n_epochs=4, logit_scale=20.0)
    a = cbm.SparseCBM(bank=bank, **kw).fit(tr.X[:600], tr.y[:600])
    b = cbm.SparseCBM(bank=shuffled, **kw).fit(tr.X[:600], tr.y[:600])
    np.testing.assert_allclose(a.predict_proba(te.X[:50]), b.predict_proba(te.X[:50]), atol=2e-3)  # float order
    np.testing.assert_allclose(a.concept_scores(te.X[:50])[:, perm], b.concept_scores(te.X[:50]), atol=0.05)


@pytest.mark.parametrize("objective", ["gumbel", "contrastive"])
def test_label_targets_keep_units_on_their_concepts(planted, objective):
    tr, te = planted.train, planted.test
    head = cbm.SparseCBM(encoder=planted.encoder, objective=objective, n_epochs=10).fit(tr.X, tr.y, tr.concepts)
    assert head.targets_ == "labels"
    S = head.concept_scores(te.X)
    aucs = [roc_auc_score(te.concepts[c], S[:, j]) for j, c in enumerate(head.bank_.names)]
    assert np.median(aucs) > 0.9
    assert head.score(te.X, te.y) > 0.6


def test_sparse_cbm_targets_and_l1(planted):
    tr = planted.train
    assert cbm.SparseCBM(encoder=planted.encoder, n_epochs=2).fit(tr.X[:300], tr.y[:300]).targets_ == "clip"
    with pytest.raises(ValueError, match="targets='labels' needs concept labels"):
        cbm.SparseCBM(encoder=planted.encoder, targets="labels").fit(tr.X[:300], tr.y[:300])
    with pytest.raises(ValueError, match="label column for every bank concept"):
        cbm.SparseCBM(bank=["red", "blue"], encoder=planted.encoder, targets="labels").fit(
            tr.X[:300], tr.y[:300], tr.concepts[["red"]][:300])
    loose = cbm.SparseCBM(encoder=planted.encoder, objective="l1", l1_lambda=0.0, n_epochs=5).fit(tr.X, tr.y)
    tight = cbm.SparseCBM(encoder=planted.encoder, objective="l1", l1_lambda=30.0, n_epochs=5).fit(tr.X, tr.y)
    off = ~torch.eye(55, dtype=torch.bool)
    assert tight.cbl_[off].abs().mean() < 0.5 * loose.cbl_[off].abs().mean()
    assert 0 <= tight.cbl_sparsity() <= 1


def test_sparse_cbm_reads_the_logit_scale_of_the_encoder(planted):
    class Enc:
        def __init__(self, inner):
            self.inner = inner
            self.model = torch.nn.Module()
            self.model.logit_scale = torch.nn.Parameter(torch.tensor(np.log(30.0), dtype=torch.float32))

        def encode_texts(self, texts, normalize=True):
            return self.inner.encode_texts(texts, normalize=normalize)

    tr = planted.train
    head = cbm.SparseCBM(encoder=Enc(planted.encoder), n_epochs=1).fit(tr.X[:100], tr.y[:100])
    assert head.logit_scale_ == pytest.approx(30.0, rel=1e-5)
    # psi = s * cos - mean: the bank vectors are the CBL-mixed directions scaled by s
    assert torch.allclose(head.bank_.vectors, 30.0 * head.cbl_ @ head._unit_, atol=1e-4)


# ---------------------------------------------------------------------------------------------- CMS / zero-shot
WORDS = {"red": [1.0, 0, 0, 0], "round": [0, 1.0, 0, 0], "blue": [0, 0, 1.0, 0],
         "apple": [1.0, 1.0, 0, 0.2], "sky": [0, 0, 1.0, 0.3], "ball": [0.1, 1.0, 0.9, 0.1]}


def words(texts):
    return torch.tensor([WORDS[t] for t in texts])


def test_cms_rules_by_hand():
    X = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 1.0, 0.1], [0.1, 0.9, 0.8, 0.0], [1.0, 0.0, 0.1, 0.0]])
    y = [0, 1, 2, 0]
    concepts, classes = ["red", "round", "blue"], ["apple", "sky", "ball"]
    V = torch.nn.functional.normalize(X, dim=1) @ torch.nn.functional.normalize(words(concepts), dim=1).T
    T = torch.nn.functional.normalize(words(classes), dim=1) @ torch.nn.functional.normalize(words(concepts), dim=1).T
    sim = torch.nn.functional.normalize(V, dim=1) @ torch.nn.functional.normalize(T, dim=1).T
    Vr, Tr = V / V.abs().sum(1, keepdim=True), T / T.abs().sum(1, keepdim=True)
    mx = Tr[:, Vr.argmax(1)].T.argmax(1)
    for normalize in ("row", "none"):
        head = cbm.ConceptMatrixSearch(bank=concepts, class_names=classes, encoder=words, normalize=normalize).fit(X, y)
        assert head.predict(X).tolist() == sim.argmax(1).tolist()  # row scaling leaves the similarity rule alone
    head = cbm.ConceptMatrixSearch(bank=concepts, class_names=classes, encoder=words, rule="max",
                                   normalize="row").fit(X, y)
    assert head.predict(X).tolist() == mx.tolist()
    np.testing.assert_allclose(head.concept_scores(X), Vr.numpy(), atol=1e-6)


def test_cms_row_normalisation_keeps_signs_and_column_uses_fit_statistics():
    """With mostly negative cosines (a modality gap) dividing by the plain row sum would flip rows."""
    X = torch.tensor([[-1.0, -0.2, -0.9, 0.1], [-0.2, -1.0, -0.9, 0.0], [-0.9, -0.9, -0.1, 0.2]])
    y = [0, 1, 2]
    kw = dict(bank=["red", "round", "blue"], class_names=["apple", "sky", "ball"], encoder=words)
    row = cbm.ConceptMatrixSearch(normalize="row", **kw).fit(X, y)
    S = row.concept_scores(X)
    raw = cbm.ConceptMatrixSearch(normalize="none", **kw).fit(X, y).concept_scores(X)
    assert np.all(np.sign(S) == np.sign(raw))
    col = cbm.ConceptMatrixSearch(normalize="column", **kw).fit(X, y)
    np.testing.assert_allclose(col.concept_scores(X[:1]), col.concept_scores(X)[:1], atol=1e-6)  # batch-independent
    np.testing.assert_allclose(col.image_col_stat_.numpy(), np.abs(raw).sum(0), rtol=1e-5)
    cen = cbm.ConceptMatrixSearch(normalize="center", **kw).fit(X, y)
    np.testing.assert_allclose(cen.concept_scores(X).mean(0), 0, atol=1e-6)
    raw_T = cbm.ConceptMatrixSearch(normalize="none", **kw).fit(X, y).class_concept_
    assert torch.equal(cen.class_concept_, raw_T)  # the class side is not centred


def test_zero_shot_is_argmax_cosine_and_calibrated(planted):
    tr = planted.train
    names = planted.class_names
    head = cbm.ZeroShotClassifier(class_names=names, encoder=planted.encoder).fit(tr.X, tr.y)
    prompts = torch.nn.functional.normalize(planted.encoder.encode_texts([f"a photo of {n}" for n in names]), dim=1)
    cos = torch.nn.functional.normalize(torch.tensor(tr.X), dim=1) @ prompts.T
    assert head.predict(tr.X).tolist() == cos.argmax(1).tolist()
    fixed = cbm.ZeroShotClassifier(class_names=names, encoder=planted.encoder, temperature=1.0).fit(tr.X, tr.y)
    nll = lambda h: -np.log(h.predict_proba(tr.X)[np.arange(len(tr.y)), tr.y]).mean()  # noqa: E731
    assert nll(head) < nll(fixed) and fixed.temperature_ == 1.0
    assert head.concept_truth_names_[0] == f"class: {names[0]}"


def test_class_texts_and_rule_descriptions():
    assert class_texts(np.array([1, 0]), {0: "a", 1: "b"}) == ["b", "a"]
    assert class_texts(np.array(["x"]), None) == ["x"]
    with pytest.raises(ValueError, match="no text for classes"):
        class_texts([0, 5], {0: "a"})
    with pytest.raises(ValueError, match="must be integers indexing it"):
        class_texts(["x"], ["a"])
    with pytest.raises(ValueError, match="out of range"):
        class_texts([3], ["a"])
    with pytest.raises(TypeError, match="class_names must be a list"):
        class_texts([0], "abc")
    texts = describe_rules(DEFAULT_RULES)
    assert len(texts) == len(DEFAULT_RULES) + 1 and texts[-1] == "other"
    assert texts[0] == "a red shape and three shapes or four shapes"
    from concepts.world import Rule

    assert describe_rules([Rule("x", all_of=("red",), none_of=("dots",))], fallback=None) == [
        "a red shape and no shapes on dots"]


def test_text_heads_errors(planted):
    tr = planted.train
    with pytest.raises(ValueError, match="class_bank has 2 texts but y has 9 classes"):
        cbm.ConceptMatrixSearch(encoder=planted.encoder, class_bank=ConceptBank(torch.eye(64)[:2])).fit(tr.X, tr.y)
    with pytest.raises(ValueError, match="class_bank has 2 prompts"):
        cbm.ZeroShotClassifier(class_bank=ConceptBank(torch.eye(64)[:2])).fit(tr.X, tr.y)
    with pytest.raises(ValueError, match="same image-text model"):
        cbm.ZeroShotClassifier(class_bank=ConceptBank(torch.eye(9))).fit(tr.X, tr.y)
    with pytest.raises(ValueError, match="class_names must be unique"):
        cbm.ZeroShotClassifier(class_names={0: "a", 1: "a"}, encoder=planted.encoder).fit(tr.X[:4], [0, 1, 0, 1])
    with pytest.raises(TypeError, match="encode_texts"):
        cbm.ZeroShotClassifier(class_names=["a", "b"], encoder=3).fit(tr.X[:4], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="bank is None"):
        cbm.LabelFreeCBM(bank=None, encoder=planted.encoder).fit(tr.X[:4], [0, 1, 0, 1])


# ---------------------------------------------------------------------------------------------- supervised CBM
@pytest.fixture(scope="module")
def xor_world():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    C = pd.DataFrame({"a": rng.random(800) < 0.5, "b": rng.random(800) < 0.5, "c": rng.random(800) < 0.5})
    X = C.to_numpy(float) @ rng.normal(size=(3, 8)) + rng.normal(scale=0.9, size=(800, 8))
    y = (C["a"] ^ C["b"]).to_numpy().astype(int)
    return X.astype(np.float32), y, C


def test_decision_lists_need_a_nonlinear_label_head(xor_world):
    """XOR of two concepts: with both set to the truth the MLP head is exact, a linear head cannot be."""
    X, y, C = xor_world
    mlp = cbm.ConceptBottleneckModel(n_epochs=40).fit(X, y, C)
    lin = cbm.ConceptBottleneckModel(label_head="linear", n_epochs=40).fit(X, y, C)
    acc = lambda h: (h.predict_proba_from_concepts(h.intervened_scores(X, ["a", "b"], concepts=C)).argmax(1) == y).mean()  # noqa: E731,E501
    assert acc(mlp) == 1.0
    assert acc(lin) < 0.8
    assert np.all(mlp.concept_on_ == 1) and np.all(mlp.concept_off_ == 0)


@pytest.mark.parametrize("training", ["independent", "joint"])
def test_cbm_training_modes(xor_world, training):
    X, y, C = xor_world
    head = cbm.ConceptBottleneckModel(training=training, n_epochs=30).fit(X, y, C)
    S = head.concept_scores(X)
    assert roc_auc_score(C["a"], S[:, 0]) > 0.8
    acc = (head.predict_proba_from_concepts(head.intervened_scores(X, ["a", "b"], concepts=C)).argmax(1) == y).mean()
    assert acc > 0.95
    assert set(head.history_) == ({"joint"} if training == "joint" else {"label"})


def test_cbm_bank_and_columns(xor_world):
    X, y, C = xor_world
    head = cbm.ConceptBottleneckModel(concept_columns=["a", "b"], n_epochs=5).fit(X, y, C)
    assert head.bank_.names == ("a", "b") and head.bank_.dim == X.shape[1]
    mlp = cbm.ConceptBottleneckModel(concept_predictor="mlp", n_epochs=5).fit(X, y, C)
    assert mlp.bank_.metadata["how"] == "cavs"


# ---------------------------------------------------------------------------------------------- DN-CBM
def test_dn_cbm_with_a_prefitted_sae_and_an_embedded_vocabulary(planted):
    from concepts.vocabularies import conceptworld_vocabulary
    from sae import TopKSAE

    tr = planted.train
    sae = TopKSAE(n_concepts=64, top_k=8, n_epochs=3, batch_size=256, random_state=0).fit(torch.tensor(tr.X))
    vocab = conceptworld_vocabulary().embed(planted.encoder)
    calls = planted.encoder.calls
    head = cbm.DiscoverThenNameCBM(sae=sae, fit_sae=False, vocabulary=vocab).fit(tr.X, tr.y)
    assert planted.encoder.calls == calls  # nothing embedded again
    assert head.sae_ is sae and torch.equal(head.bank_.vectors, sae.dictionary_.float())
    np.testing.assert_allclose(head.concept_scores(tr.X[:5]), sae.transform(torch.tensor(tr.X[:5])).numpy())
    assert head.naming_ is not None and set(head.naming_["rank"]) == {1, 2, 3}
    assert np.all(head._baseline().numpy() == 0)
    with pytest.raises(ValueError, match="is not fitted"):
        cbm.DiscoverThenNameCBM(sae=TopKSAE(n_concepts=8, top_k=2), fit_sae=False, vocabulary=None).fit(tr.X, tr.y)
    with pytest.raises(ValueError, match="expecting 64 features"):
        cbm.DiscoverThenNameCBM(sae=sae, fit_sae=False, vocabulary=None).fit(tr.X[:, :10], tr.y)


def test_dn_cbm_without_names_and_coverage(planted):
    tr, te = planted.train, planted.test
    head = cbm.DiscoverThenNameCBM(vocabulary=None, n_concepts=64, top_k=8, sae_epochs=3).fit(tr.X, tr.y)
    assert head.bank_.names[0] == "concept_0" and head.naming_ is None
    from cbm.metrics import coverage

    cov = coverage(head, te.X)
    assert cov[0.9] <= cov[0.95] <= cov[0.99] <= 8  # at most the active units of a sample contribute
    c = head.contributions(te.X[:10])
    logits = head.decision_function(te.X[:10])
    np.testing.assert_allclose(c.sum(1), logits.max(1), rtol=1e-4, atol=1e-4)  # bias-free: w.f sums to the logit
