"""Concept importance methods (evaluation.importance): closed forms, the linear-head identity, generators."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from concepts.bank import ConceptBank
from evaluation.decomposition import (
    BankDecomposition,
    GeneratorConceptModel,
    IdentityDecomposition,
    LayerConceptModel,
    NMFDecomposition,
    extract_activations,
)
from evaluation.fidelity import c_mufidelity
from evaluation.importance import (
    METHODS,
    RISE,
    GradientXInput,
    IntegratedGradients,
    Occlusion,
    RandomImportance,
    Saliency,
    Sobol,
    global_importance,
    local_importance,
    make_method,
    top_concepts,
)


@pytest.fixture(scope="module")
def linear_setup():
    """A ReLU layer decomposed by NMF, followed by a linear head: h(decode(u)) is linear in u (float64)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).double()
        x = torch.randn(40, 8, dtype=torch.float64)
    A = net[1](net[0](x)).detach()
    dec = NMFDecomposition(n_concepts=6, random_state=0).fit(A)
    cm = LayerConceptModel(net, dec, "1")
    state = cm.prepare(x)
    # closed form: f_c(u) = sum_j u_j (W_nmf W_head^T)_{j c} + const
    coef = dec.components_.double() @ net[2].weight.detach().T  # [k, C]
    return net, dec, cm, state, x, coef


def test_linear_head_identity_gxi_ig_occlusion(linear_setup) -> None:
    net, dec, cm, state, x, coef = linear_setup
    target = torch.tensor([0, 1, 2] * 13 + [0])
    exact = state.u[:, 0, :] * coef.T[target]  # u_j (W w)_j per input
    gxi = GradientXInput(cm).attribute(state, target).double()
    ig = IntegratedGradients(cm).attribute(state, target).double()
    occ = Occlusion(cm).attribute(state, target).double()
    # float32 outputs of attribute() -> compare at float32 precision
    for phi in (gxi, ig, occ):
        assert torch.allclose(phi, exact, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gxi, ig, rtol=1e-5, atol=1e-6) and torch.allclose(gxi, occ, rtol=1e-5, atol=1e-6)
    # the concept shares sum to the logit minus the logit with every concept removed
    with torch.no_grad():
        zero = cm.forward_masks(torch.zeros(40, 6, dtype=torch.float64), torch.arange(40), state)
    diff = (state.reference - zero).gather(1, target[:, None])[:, 0]
    assert torch.allclose(gxi.sum(1), diff, rtol=1e-5, atol=1e-6)
    for phi in (gxi, ig, occ):
        assert c_mufidelity(cm, state, phi, target) == pytest.approx(1.0, abs=1e-12)
    sal = Saliency(cm).attribute(state, target).double()
    assert torch.allclose(sal, coef.T[target].abs(), rtol=1e-5)  # |d f / d u| of a linear f
    assert c_mufidelity(cm, state, sal, target) < 0.9


def test_linear_identity_on_a_spatial_layer() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Linear(5, 2)).double()
        x = torch.rand(6, 3, 6, 6, dtype=torch.float64)
    dec = NMFDecomposition(n_concepts=3, random_state=0).fit(extract_activations(net.float(), "1", x.float(),
                                                                                 pooling="spatial"))
    net.double()
    gxi = GradientXInput(net, dec, layer="1").attribute(x, target=1).double()
    occ = Occlusion(net, dec, layer="1").attribute(x, target=1).double()
    ig = IntegratedGradients(net, dec, layer="1", split="hooks").attribute(x, target=1).double()
    assert torch.allclose(gxi, occ, rtol=1e-5, atol=1e-7) and torch.allclose(gxi, ig, rtol=1e-5, atol=1e-7)
    # closed form: mean over positions of u_pj, times (W_nmf w)_j
    cm = LayerConceptModel(net, dec, "1")
    st = cm.prepare(x)
    exact = st.u.mean(1) * (dec.components_.double() @ net[4].weight.detach()[1])
    assert torch.allclose(gxi, exact, rtol=1e-5, atol=1e-7)


def test_linear_identity_on_a_signed_bank_space() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(2)
        head = nn.Linear(10, 4)
        x = torch.randn(30, 10)
        V = torch.randn(5, 10)
    net = nn.Sequential(nn.Identity(), head)
    dec = BankDecomposition(ConceptBank(V), offset="mean").fit(x)
    gxi = GradientXInput(net, dec, layer="0").attribute(x, target=3)
    occ = Occlusion(net, dec, layer="0").attribute(x, target=3)
    ig = IntegratedGradients(net, dec, layer="0").attribute(x, target=3)
    assert torch.allclose(gxi, occ, atol=1e-5) and torch.allclose(gxi, ig, atol=1e-5)
    assert c_mufidelity(net, x, gxi, 3, decomposition=dec, layer="0") > 0.999


def test_sobol_total_indices_match_the_closed_form(linear_setup) -> None:
    _, _, cm, state, _, coef = linear_setup
    # f(u * m) = sum_j c_j m_j + b with m ~ U[0,1]^k: ST_j = c_j^2 / sum_i c_i^2
    c = state.u[0, 0] * coef[:, 1]
    expected = c ** 2 / (c ** 2).sum()
    st = Sobol(cm, n_design=1024, seed=0).attribute(state, 1)[0].double()
    assert torch.allclose(st, expected, atol=0.03)
    halton = Sobol(cm, n_design=256, sampler="halton").attribute(state, 1)[0].double()
    assert torch.allclose(halton, expected, atol=0.06)
    masks, A = Sobol(cm, n_design=8).design(3)
    assert masks.shape == (8 * 5, 3) and torch.equal(masks[:8], A)
    assert torch.equal(masks[16:24, 1:], A[:, 1:])  # C_0 = A with column 0 from B
    assert torch.equal(masks[16:24, 0], masks[8:16, 0])


def test_rise_closed_form(linear_setup) -> None:
    _, _, cm, state, _, coef = linear_setup
    c = (state.u[:3, 0] * coef[:, 0]).float()
    centred = RISE(cm, n_masks=4000, seed=0).attribute(state, 0)[:3]
    assert torch.allclose(centred, c, atol=0.1 * c.abs().max())
    raw = RISE(cm, n_masks=4000, p_keep=0.5, centered=False, seed=0).attribute(state, 0)[:3]
    # uncentred RISE = (1 - p) * contribution + a constant shared by the concepts of an input (noisier: the
    # constant part of f enters every estimate)
    offset = (raw - 0.5 * c).mean(1, keepdim=True)
    assert torch.allclose(raw - offset, 0.5 * c, atol=0.2 * c.abs().max())
    assert np.corrcoef((raw - offset).flatten(), c.flatten())[0, 1] > 0.9


def test_random_importance_is_seeded(linear_setup) -> None:
    _, _, cm, state, _, _ = linear_setup
    a = RandomImportance(cm, seed=3).attribute(state)
    assert torch.equal(a, RandomImportance(cm, seed=3).attribute(state))
    assert not torch.equal(a, RandomImportance(cm, seed=4).attribute(state))


def test_cbm_head_importance_closed_form() -> None:
    from cbm import ConceptBottleneckModel

    rng = np.random.default_rng(0)
    C = pd.DataFrame({"a": rng.random(300) < 0.5, "b": rng.random(300) < 0.5, "c": rng.random(300) < 0.5})
    X = np.c_[C.to_numpy(float), rng.normal(size=(300, 2))] + rng.normal(scale=0.1, size=(300, 5))
    y = (C["a"] & ~C["c"]).to_numpy().astype(int)
    head = ConceptBottleneckModel(label_head="linear", n_epochs=10).fit(X, y, C)
    S = torch.tensor(head.concept_scores(X[:20]))
    W = head.head_.weight.detach()
    gxi = GradientXInput(head).attribute(X[:20], target=1)
    assert torch.allclose(gxi, S * W[1], atol=1e-5)
    assert torch.allclose(Occlusion(head).attribute(X[:20], target="1"), S * W[1], atol=1e-5)
    # the label depends on a (up) and c (down), not on b
    mean = gxi[torch.tensor(y[:20] == 1)].mean(0)
    assert mean[0] > 0 and mean[0] > mean[1].abs()


def test_method_errors(linear_setup) -> None:
    _, _, cm, state, _, _ = linear_setup
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        IntegratedGradients(cm, n_steps=0)
    with pytest.raises(ValueError, match="p_keep"):
        RISE(cm, p_keep=1.5)
    with pytest.raises(ValueError, match="sampler must be"):
        Sobol(cm, sampler="random")
    with pytest.raises(ValueError, match="batch_size must be"):
        Occlusion(cm, batch_size=0)
    with pytest.raises(ValueError, match="unknown importance method 'gxi'"):
        make_method("gxi", cm)
    assert isinstance(make_method("sobol", cm, n_design=4), Sobol)
    assert set(METHODS) == {"gradient_input", "integrated_gradients", "occlusion", "saliency", "rise", "sobol",
                            "random"}
    with pytest.raises(ValueError, match="needs decomposition"):
        GradientXInput(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------------ generators
def test_generator_importance_by_perturbation() -> None:
    from test_decomposition import _mean_colour, toy_generator

    gen = toy_generator()
    dec = BankDecomposition(ConceptBank(torch.eye(2), names=["red dir", "blue dir"]), ridge=0.0).fit()
    cm = GeneratorConceptModel(gen, dec, "mix", _mean_colour, output_names=["R", "G", "B"])
    occ = Occlusion(cm).attribute(["red", "red blue"], target=["R", "B"])
    # "red": removing the red direction turns the image grey (R 1 -> 0.5); "red blue" is blue because of the blue
    # direction only (removing red changes nothing)
    assert torch.allclose(occ, torch.tensor([[0.5, 0.0], [0.0, 1.0]]))
    occ_r = Occlusion(cm).attribute(["red blue"], target="R")
    assert torch.allclose(occ_r, torch.tensor([[0.0, -1.0]]))  # blue suppresses red
    sob = Sobol(cm, n_design=8, batch_size=64).attribute(["red"], target="R")
    assert sob[0, 0] > 0.5 and sob[0, 1] == 0
    with pytest.raises(TypeError, match="needs gradients"):
        GradientXInput(cm)
    with pytest.raises(ValueError, match="needs decomposition=, layer= and score="):
        Occlusion(gen, dec, layer="mix")
    via_kwargs = Occlusion(gen, dec, layer="mix", score=_mean_colour).attribute(["red"], target=0)
    assert torch.allclose(via_kwargs, torch.tensor([[0.5, 0.0]]))


# ------------------------------------------------------------------------------------------ tables
def test_local_and_global_tables() -> None:
    phi = np.array([[1.0, 3.0, -1.0], [2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loc = local_importance(phi, ["a", "b", "c"], method="gxi", image_ids=["x", "y", "z"], targets=[0, 1, 0])
    assert len(loc) == 9 and loc.query("image_id == 'x' and rank == 1")["concept"].item() == "b"
    assert set(loc.columns) == {"image_id", "target", "concept", "method", "phi", "rank"}
    glob = global_importance(phi, ["a", "b", "c"], classes=[0, 1, 0], class_names=["cat", "dog"], method="gxi")
    cat = glob[glob["class"] == "cat"].set_index("concept")
    assert cat.loc["b", "mean_phi"] == 2.0 and cat.loc["b", "rank"] == 1 and cat.loc["b", "n_images"] == 2
    assert cat["share_of_logit"].sum() == pytest.approx(1.0)
    assert cat.loc["b", "share_of_logit"] == pytest.approx(2.0 / 2.0)  # mean (0.5, 2, -0.5) sums to 2
    assert top_concepts(glob, {"cat": 2, "dog": 1}) == {"cat": ["b", "a"], "dog": ["a"]}
    with pytest.raises(ValueError, match="2 concept names"):
        local_importance(phi, ["a", "b"])
    with pytest.raises(ValueError, match="classes has 2 entries"):
        global_importance(phi, None, classes=[0, 1])
    with pytest.raises(ValueError, match="must be \\[n, k\\]"):
        global_importance(np.zeros(3))
    with pytest.raises(ValueError, match="global_importance"):
        top_concepts(pd.DataFrame({"x": [1]}))


# ------------------------------------------------------------------------------------------ ground truth
def _precision_at_k(phi: np.ndarray, labels: np.ndarray, names: list[str], rules) -> float:
    hits = total = 0
    for c, rule in enumerate(rules):
        g = global_importance(phi[labels == c], names)
        top = g.sort_values("rank")["concept"].head(len(rule.concepts)).tolist()
        hits += len(set(top) & set(rule.concepts))
        total += len(rule.concepts)
    return hits / total


@pytest.fixture(scope="module")
def world_classifiers():
    """MLPs trained on ConceptWorld classes from features that encode the concepts linearly (plus noise): one with
    "orange" planted into every "purple cross" training image, one without (control). The concept space is a
    bank of concept activation vectors with the "absent" offset."""
    from cbm.training import train_minibatch
    from concepts.world import DEFAULT_RULES, ConceptWorld, Correlation

    biased = ConceptWorld(seed=0, image_size=32, correlations=[Correlation("purple cross", "orange", 1.0)],
                          colour_probs={"orange": 0.3})
    control = ConceptWorld(seed=0, image_size=32, colour_probs={"orange": 0.3})
    test = ConceptWorld(seed=0, image_size=32).sample(1500, seed=2)
    g = torch.Generator().manual_seed(0)
    E = torch.randn(len(test.concepts.columns), 48, generator=g) / 4

    def feats(batch):
        C = torch.tensor(batch.concepts.to_numpy(np.float32))
        return C @ E + 0.05 * torch.randn(len(C), 48, generator=g)

    Xte = feats(test)
    nets = {}
    for name, world in (("biased", biased), ("control", control)):
        train = world.sample(3000, seed=1)
        Xtr, ytr = feats(train), torch.tensor(train.labels)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            mlp = nn.Sequential(nn.Linear(48, 128), nn.ReLU(), nn.Linear(128, len(train.class_names)))
        train_minibatch(lambda i: nn.functional.cross_entropy(mlp(Xtr[i]), ytr[i]), mlp.parameters(), len(Xtr),
                        n_epochs=10, batch_size=256, lr=3e-3, seed=0)
        nets[name] = nn.Sequential(nn.Identity(), mlp).eval()
    bank = ConceptBank.from_cavs(Xte[:800], test.concepts.iloc[:800])
    dec = BankDecomposition(bank, offset="absent", ridge=1e-2).fit(Xte, concepts=test.concepts)
    return nets, dec, Xte, test, DEFAULT_RULES


def test_importance_recovers_rule_concepts_and_the_planted_concept(world_classifiers) -> None:
    nets, dec, X, test, rules = world_classifiers
    names = dec.concept_names_
    pc = test.class_names.index("purple cross")
    tables = {}
    for name, net in nets.items():
        assert (net(X).argmax(1).numpy() == test.labels).mean() > 0.9
        phi = GradientXInput(net, dec, layer="0").attribute(X, target=torch.tensor(test.labels)).numpy()
        assert _precision_at_k(phi, test.labels, names, rules) >= 0.9
        tables[name] = global_importance(phi[test.labels == pc], names).set_index("concept")
        assert tables[name].loc["purple cross", "rank"] == 1
    # the planted shortcut is among the top concepts of the class it leaks into (of 55), and not in the control
    assert tables["biased"].loc["orange", "rank"] <= 5
    assert tables["control"].loc["orange", "rank"] > 20
    assert tables["biased"].loc["orange", "mean_phi"] > tables["control"].loc["orange", "mean_phi"] + 0.3
