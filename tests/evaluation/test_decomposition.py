"""Concept decompositions and models seen in concept space (evaluation.decomposition)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch import nn

from concepts.bank import ConceptBank
from evaluation.decomposition import (
    BankDecomposition,
    ConceptState,
    GeneratorConceptModel,
    HeadConceptModel,
    IdentityDecomposition,
    LayerConceptModel,
    NMFDecomposition,
    SAEDecomposition,
    as_concept_model,
    craft_crops,
    extract_activations,
    fit_craft,
    from_rows,
    label_units,
    to_rows,
)


def _planted_nmf(seed: int = 0, n: int = 300, k: int = 4, d: int = 12):
    g = torch.Generator().manual_seed(seed)
    W = torch.rand(k, d, generator=g) ** 3  # peaky, nearly separable atoms
    U = torch.rand(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.5)
    return U, W, U @ W


# ------------------------------------------------------------------------------------------ views
def test_nmf_recovers_planted_factorisation() -> None:
    U, W, A = _planted_nmf()
    dec = NMFDecomposition(n_concepts=4, max_iter=3000, tol=1e-7, random_state=0).fit(A)
    q = dec.quality(A)
    assert q["relative_l2"] < 0.02 and q["r2"] > 0.99
    # each planted atom is matched by one learned component (cosine > 0.98)
    Wn = torch.nn.functional.normalize(W, dim=1)
    Cn = torch.nn.functional.normalize(dec.components_, dim=1)
    assert (Wn @ Cn.T).max(1).values.min() > 0.98


def test_nmf_decode_is_differentiable_and_linear() -> None:
    _, _, A = _planted_nmf()
    dec = NMFDecomposition(n_concepts=3, random_state=0).fit(A)
    u = dec.encode(A[:5]).requires_grad_(True)
    dec.decode(u).sum().backward()
    assert torch.allclose(u.grad, dec.components_.sum(1).expand(5, -1))


def test_nmf_errors() -> None:
    with pytest.raises(ValueError, match="non-negative activations"):
        NMFDecomposition(n_concepts=2).fit(torch.randn(20, 4))
    with pytest.raises(ValueError, match="n_concepts must be a positive integer"):
        NMFDecomposition(n_concepts=0).fit(torch.rand(20, 4))
    with pytest.raises(ValueError, match="exceeds min"):
        NMFDecomposition(n_concepts=9).fit(torch.rand(20, 4))
    with pytest.raises(NotFittedError, match="not fitted yet"):
        NMFDecomposition().encode(torch.rand(3, 4))
    dec = NMFDecomposition(n_concepts=2).fit(torch.rand(20, 4))
    with pytest.raises(ValueError, match="expecting \\[m, 4\\]"):
        dec.encode(torch.rand(3, 5))
    with pytest.raises(ValueError, match="expecting \\[m, 2\\]"):
        dec.decode(torch.rand(3, 3))
    with pytest.raises(ValueError, match="names has 3 entries"):
        NMFDecomposition(n_concepts=2, names=["a", "b", "c"]).fit(torch.rand(20, 4))
    with pytest.raises(ValueError, match="needs activations"):
        NMFDecomposition(n_concepts=2).fit()
    with pytest.raises(ValueError, match="shape \\[m, d\\]"):
        NMFDecomposition(n_concepts=2).fit(torch.rand(2, 3, 4))
    with pytest.raises(TypeError, match="must be a tensor"):
        NMFDecomposition(n_concepts=2).fit("acts")
    with pytest.raises(ValueError, match="NaN"):
        NMFDecomposition(n_concepts=2).fit(torch.tensor([[float("nan"), 1.0]]))


def test_decompositions_are_sklearn_estimators() -> None:
    dec = NMFDecomposition(n_concepts=3, random_state=1)
    assert clone(dec).get_params()["n_concepts"] == 3
    assert "n_concepts=3" in repr(dec)


def test_bank_projection_is_exact_on_the_span_and_offsets_mean_absent() -> None:
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6))
    V = Q[:3]  # orthonormal concept directions
    labels = pd.DataFrame(np.random.default_rng(0).random((200, 3)) < 0.4, columns=["a", "b", "c"])
    A = torch.tensor(labels.to_numpy(np.float32)) @ (2.0 * V) + 0.5  # concept present -> +2 along its direction
    bank = ConceptBank(V, names=["a", "b", "c"])
    plain = BankDecomposition(bank, ridge=0.0).fit()
    # decode(encode(a)) is the orthogonal projection on the span
    assert torch.allclose(plain.decode(plain.encode(A)), A @ V.T @ V, atol=1e-5)
    absent = BankDecomposition(bank, offset="absent", ridge=0.0).fit(A, concepts=labels)
    u = absent.encode(A)
    lab = torch.tensor(labels.to_numpy())
    assert u[~lab].abs().max() < 1e-4  # u = 0 exactly when the concept is absent
    assert torch.allclose(u[lab], torch.full_like(u[lab], 2.0), atol=1e-4)
    assert torch.allclose(absent.decode(u), plain.decode(plain.encode(A)), atol=1e-5)
    mean = BankDecomposition(bank, offset="mean").fit(A)
    assert mean.encode(A).mean(0).abs().max() < 1e-4
    assert absent.concept_names_ == ["a", "b", "c"]


def test_bank_ridge_shrinks_decoder_of_duplicate_directions() -> None:
    v = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 1e-4]]), dim=1)
    bank = ConceptBank(v, names=["x", "x2"])
    exact = BankDecomposition(bank, ridge=0.0).fit()
    ridge = BankDecomposition(bank, ridge=1e-2).fit()
    assert exact.decoder_.abs().max() > 100  # ill-conditioned pseudo-inverse
    assert ridge.decoder_.abs().max() < 1.0


def test_bank_errors() -> None:
    bank = ConceptBank(torch.eye(3), names=["a", "b", "c"])
    with pytest.raises(ValueError, match="needs concept labels"):
        BankDecomposition(bank, offset="absent").fit(torch.rand(5, 3))
    with pytest.raises(ValueError, match="lacks columns"):
        BankDecomposition(bank, offset="absent").fit(torch.rand(4, 3), concepts=pd.DataFrame({"a": [True, False] * 2}))
    with pytest.raises(ValueError, match="present in every fit row"):
        BankDecomposition(bank, offset="absent").fit(
            torch.rand(2, 3), concepts=pd.DataFrame({"a": [True, True], "b": [True, False], "c": [False, True]}))
    with pytest.raises(ValueError, match="offset must be one of"):
        BankDecomposition(bank, offset="median").fit(torch.rand(4, 3))
    with pytest.raises(ValueError, match="offset array has shape"):
        BankDecomposition(bank, offset=[0.0, 1.0]).fit()
    with pytest.raises(ValueError, match="ridge must be"):
        BankDecomposition(bank, ridge=-1.0).fit()
    with pytest.raises(ValueError, match="bank vectors have 3"):
        BankDecomposition(bank, offset="mean").fit(torch.rand(4, 5))
    with pytest.raises(TypeError, match="ConceptBank"):
        BankDecomposition(torch.eye(3)).fit()
    with pytest.raises(ValueError, match="A has 4 rows but concepts has 2"):
        BankDecomposition(bank, offset="absent").fit(torch.rand(4, 3), concepts=pd.DataFrame({"a": [1, 0]}))
    with pytest.raises(TypeError, match="DataFrame"):
        BankDecomposition(bank, offset="absent").fit(torch.rand(4, 3), concepts=np.zeros((4, 3)))


def test_sae_decomposition_matches_the_sae() -> None:
    from sae import TopKSAE

    X = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    sae = TopKSAE(n_concepts=16, top_k=4, n_epochs=2, batch_size=128, random_state=0).fit(X)
    dec = SAEDecomposition(sae).fit()
    u = dec.encode(X[:10])
    assert torch.equal(u, sae.transform(X[:10]))
    assert torch.allclose(dec.decode(u), sae.inverse_transform(u), atol=1e-6)
    uu = u.clone().requires_grad_(True)
    dec.decode(uu).sum().backward()
    assert torch.allclose(uu.grad, sae.dictionary_.sum(1).expand(10, -1), atol=1e-5)
    with pytest.raises(ValueError, match="expecting 8 features"):
        SAEDecomposition(sae).fit(torch.rand(4, 3))
    with pytest.raises(TypeError, match="SAE estimator"):
        SAEDecomposition(object()).fit(X)


def test_identity_decomposition_and_quality() -> None:
    dec = IdentityDecomposition(names=["a", "b"]).fit()
    A = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert torch.equal(dec.decode(dec.encode(A)), A)
    q = dec.quality(A)
    assert q == {"relative_l2": 0.0, "r2": 1.0, "l0": 1.0, "dead": 0.0}
    with pytest.raises(ValueError, match="needs activations"):
        IdentityDecomposition().fit()


def test_to_rows_layouts_roundtrip() -> None:
    conv = torch.randn(2, 5, 3, 4)
    rows, lay = to_rows(conv)
    assert rows.shape == (2, 12, 5) and torch.equal(rows[0, 0], conv[0, :, 0, 0])
    assert torch.equal(from_rows(rows, lay), conv)
    tok = torch.randn(2, 7, 5)
    rows, lay = to_rows(tok)
    assert rows.shape == (2, 7, 5) and torch.equal(from_rows(rows, lay), tok)
    rows, lay = to_rows(tok, channel_dim=1)
    assert rows.shape == (2, 5, 7) and torch.equal(from_rows(rows, lay), tok)
    with pytest.raises(ValueError, match="batch axis"):
        to_rows(tok, channel_dim=0)
    with pytest.raises(TypeError, match="channel_dim"):
        to_rows(tok, channel_dim="last")
    with pytest.raises(ValueError, match="batch axis and a feature axis"):
        to_rows(torch.zeros(3))


def test_label_units_names_planted_units() -> None:
    rng = np.random.default_rng(0)
    labels = pd.DataFrame(rng.random((300, 3)) < 0.5, columns=["red", "blue", "star"])
    codes = np.c_[labels["blue"] * 2.0, labels["star"] + rng.normal(0, 0.1, 300), labels["blue"] * 1.0]
    tab = label_units(codes, labels)
    assert tab["concept"].tolist() == ["blue", "star", "blue"]
    assert tab["name"].tolist() == ["blue", "star", "blue (2)"]
    assert (tab["auc"] > 0.99).all()
    with pytest.raises(ValueError, match="codes has 300 rows"):
        label_units(codes, labels.iloc[:10])
    with pytest.raises(ValueError, match="both positives and negatives"):
        label_units(codes, pd.DataFrame({"a": [True] * 300}))


def test_craft_crops_and_fit_craft() -> None:
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    crops = craft_crops(x, 4, stride=4, size=4)
    assert crops.shape == (8, 1, 4, 4)
    assert torch.equal(crops[1], x[0, :, 0:4, 4:8])  # windows in raster order
    with pytest.raises(ValueError, match="patch_size must be"):
        craft_crops(x, 9)
    with pytest.raises(ValueError, match="float tensor"):
        craft_crops(x[0], 4)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    dec = fit_craft(net, "1", torch.rand(4, 3, 16, 16), n_concepts=3, patch_size=8)
    assert dec.components_.shape == (3, 6)
    acts = extract_activations(net, "1", torch.rand(2, 3, 16, 16), pooling="spatial")
    assert acts.shape == (2 * 16 * 16, 6) and (acts >= 0).all()


# ------------------------------------------------------------------------------------------ concept models
def _conv_classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


@pytest.mark.parametrize("split", ["sequential", "hooks"])
def test_layer_concept_model_reproduces_the_model(split: str) -> None:
    net = _conv_classifier()
    x = torch.rand(5, 3, 8, 8)
    A = extract_activations(net, "3", x, pooling="spatial")
    dec = NMFDecomposition(n_concepts=3, random_state=0).fit(A)
    cm = LayerConceptModel(net, dec, "3", split=split, batch_size=2)
    assert cm.split == split
    state = cm.prepare(x)
    assert state.u.shape == (5, 64, 3)
    with torch.no_grad():
        ref = net(x)
        out = cm.forward_codes(state.u, torch.arange(5), state)
        one = cm.forward_masks(torch.ones(2, 3), torch.tensor([4, 1]), state)
    assert torch.allclose(state.reference, ref, atol=1e-5)
    assert torch.allclose(out, ref, atol=1e-5)  # the error term makes the split exact
    assert torch.allclose(one, ref[[4, 1]], atol=1e-5)
    # removing every concept leaves only the reconstruction error: a different output
    with torch.no_grad():
        zero = cm.forward_masks(torch.zeros(5, 3), torch.arange(5), state)
    assert not torch.allclose(zero, ref, atol=1e-3)


def test_hooks_and_sequential_split_agree_on_perturbations() -> None:
    net = _conv_classifier()
    x = torch.rand(4, 3, 8, 8)
    dec = NMFDecomposition(n_concepts=3, random_state=0).fit(extract_activations(net, "3", x, pooling="spatial"))
    a = LayerConceptModel(net, dec, "3", split="hooks")
    b = LayerConceptModel(net, dec, "3", split="auto")
    sa, sb = a.prepare(x), b.prepare(x)
    m = torch.rand(4, 3)
    with torch.no_grad():
        assert torch.allclose(a.forward_masks(m, torch.arange(4), sa), b.forward_masks(m, torch.arange(4), sb),
                              atol=1e-6)


def test_layer_concept_model_non_sequential_model_and_output_fn() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return {"logits": self.head(self.body(x)), "aux": 1}

    net = Net()
    x = torch.randn(6, 4)
    dec = IdentityDecomposition().fit(torch.rand(2, 5))
    cm = LayerConceptModel(net, dec, "body", output=lambda o: o["logits"], output_names=["a", "b", "c"])
    assert cm.split == "hooks"
    state = cm.prepare(x)
    assert torch.allclose(state.reference, net(x)["logits"])
    assert cm.resolve_target("b", state).tolist() == [1] * 6
    assert cm.resolve_target(None, state).tolist() == net(x)["logits"].argmax(1).tolist()
    assert cm.resolve_target([0, 1, 2, 0, 1, 2], state).tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="not an output name"):
        cm.resolve_target("d", state)
    with pytest.raises(ValueError, match="out of range"):
        cm.resolve_target(3, state)
    with pytest.raises(ValueError, match="2 entries for 6 inputs"):
        cm.resolve_target([0, 1], state)
    with pytest.raises(TypeError, match="target must be"):
        cm.resolve_target(1.5, state)
    with pytest.raises(ValueError, match="split='sequential' needs"):
        LayerConceptModel(net, dec, "body", split="sequential")


def test_layer_concept_model_errors() -> None:
    net = _conv_classifier()
    dec = IdentityDecomposition().fit(torch.rand(2, 5))
    with pytest.raises(ValueError, match="expecting 5"):
        LayerConceptModel(net, dec, "3").prepare(torch.rand(2, 3, 8, 8))
    with pytest.raises(KeyError, match="Closest matches"):
        LayerConceptModel(net, dec, "33")
    with pytest.raises(ValueError, match="layer must be the name"):
        LayerConceptModel(net, dec, "")
    with pytest.raises(TypeError, match="ConceptDecomposition"):
        LayerConceptModel(net, "nmf", "3")
    with pytest.raises(NotFittedError):
        LayerConceptModel(net, NMFDecomposition(), "3")
    with pytest.raises(ValueError, match="split must be"):
        LayerConceptModel(net, dec, "3", split="magic")
    with pytest.raises(TypeError, match="model-ready tensor"):
        LayerConceptModel(net, IdentityDecomposition().fit(torch.rand(2, 6)), "3").prepare([1, 2])
    shared = nn.Linear(3, 3)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = shared

        def forward(self, x):
            return self.f(self.f(x))

    with pytest.raises(ValueError, match="called 2 times"):
        LayerConceptModel(Twice(), IdentityDecomposition().fit(torch.rand(2, 3)), "f").prepare(torch.rand(2, 3))


def test_head_concept_model_uses_the_cbm_bottleneck() -> None:
    from cbm import ConceptBottleneckModel

    rng = np.random.default_rng(0)
    C = pd.DataFrame({"a": rng.random(300) < 0.5, "b": rng.random(300) < 0.5})
    X = np.c_[C.to_numpy(float), rng.normal(size=(300, 2))] + rng.normal(scale=0.1, size=(300, 4))
    y = (C["a"] | C["b"]).to_numpy().astype(int)
    head = ConceptBottleneckModel(label_head="linear", n_epochs=5).fit(X, y, C)
    cm = as_concept_model(head)
    assert isinstance(cm, HeadConceptModel) and cm.concept_names == ["a", "b"]
    state = cm.prepare(X[:7])
    assert np.allclose(state.u[:, 0].numpy(), head.concept_scores(X[:7]), atol=1e-6)
    with torch.no_grad():
        out = cm.forward_codes(state.u, torch.arange(7), state)
    assert np.allclose(torch.softmax(out, 1).numpy(), head.predict_proba(X[:7]), atol=1e-5)
    with pytest.raises(ValueError, match="do not pass decomposition"):
        as_concept_model(head, IdentityDecomposition(names=["a", "b"]).fit())


def test_as_concept_model_errors() -> None:
    net = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="needs decomposition"):
        as_concept_model(net)
    with pytest.raises(TypeError, match="cannot explain"):
        as_concept_model("model")
    cm = LayerConceptModel(nn.Sequential(nn.Identity(), net), IdentityDecomposition().fit(torch.rand(2, 3)), "0")
    assert as_concept_model(cm) is cm
    with pytest.raises(ValueError, match="already a ConceptModel"):
        as_concept_model(cm, layer="0")


# ------------------------------------------------------------------------------------------ generators
def toy_generator():
    """A one-token AR generator with CFG whose output colour is set by concept directions at layer ``mix``.

    The prompt embedding has a ``red`` and a ``blue`` coordinate (unconditional rows: zeros); ``mix`` (identity)
    is the hooked layer; greedy sampling picks token 1 (red image), 2 (blue image) or 0 (grey) by the guided logits.
    """
    from concepts.generators import ARLoopGenerator

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Identity()

    model = Toy()
    emb = {"red": [1.0, 0.0], "blue": [0.0, 1.0], "red blue": [1.0, 1.2], "": [0.0, 0.0]}

    def prefill(prompts, cfg):
        e = torch.tensor([emb[p] for p in prompts])
        if cfg:
            e = torch.cat([e, torch.zeros_like(e)])  # cond_uncond
        h = model.mix(e)
        logits = torch.stack([torch.full((len(h),), 0.5), 2 * h[:, 0], 2 * h[:, 1]], 1)
        return logits, None

    colours = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])

    def decode(tokens):
        return colours[tokens[:, 0]][:, :, None, None].expand(-1, 3, 2, 2)

    return ARLoopGenerator(model, prefill=prefill, step=lambda t, s, st: (None, st), decode=decode, num_steps=1,
                           image_range=(0.0, 1.0), settings={"guidance": 2.0, "temperature": 0.0})


def _mean_colour(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1, 3).mean(1)


def test_generator_concept_model_masks_the_right_images() -> None:
    gen = toy_generator()
    bank = ConceptBank(torch.eye(2), names=["red dir", "blue dir"])
    dec = BankDecomposition(bank, ridge=0.0).fit()
    cm = GeneratorConceptModel(gen, dec, "mix", _mean_colour, output_names=["R", "G", "B"], seeds=[0, 1])
    state = cm.prepare(["red", "blue"])
    assert torch.allclose(state.reference, torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    # remove "red dir" from image 0 only: image 0 turns grey, image 1 stays blue
    out = cm.forward_masks(torch.tensor([[0.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 1]), state)
    assert torch.allclose(out, torch.tensor([[0.5, 0.5, 0.5], [0.0, 0.0, 1.0]]))
    with pytest.raises(TypeError, match="list of prompts"):
        cm.prepare([1, 2])
    with pytest.raises(ValueError, match="seeds has 2 entries for 3 prompts"):
        cm.prepare(["red", "blue", "red"])
    with pytest.raises(ValueError, match="rows must be"):
        GeneratorConceptModel(gen, dec, "mix", _mean_colour, rows="uncond")
    with pytest.raises(TypeError, match="run_with_hooks"):
        GeneratorConceptModel(nn.Linear(2, 2), dec, "mix", _mean_colour)
    with pytest.raises(TypeError, match="score must be"):
        GeneratorConceptModel(gen, dec, "mix", "detector")
    with pytest.raises(TypeError, match="cannot evaluate arbitrary concept codes"):
        cm.forward_codes(torch.zeros(1, 1, 2), torch.tensor([0]), ConceptState(None, 1, torch.zeros(1, 3)))


def test_generator_concept_model_cond_rows_only() -> None:
    gen = toy_generator()
    dec = BankDecomposition(ConceptBank(torch.eye(2), names=["r", "b"]), ridge=0.0).fit()
    cm = GeneratorConceptModel(gen, dec, "mix", _mean_colour, rows="cond")
    state = cm.prepare(["red"])
    # uncond rows are zeros anyway, so masking only the cond rows removes red as well
    out = cm.forward_masks(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), state)
    assert torch.allclose(out, torch.tensor([[0.5, 0.5, 0.5]]))
