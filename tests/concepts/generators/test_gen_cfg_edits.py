"""CFG row layouts, activation edits and token sampling on plain tensors (closed forms)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from concepts.generators import (
    AddVector,
    CallContext,
    CFGLayout,
    ClampFeatures,
    FunctionEdit,
    ProjectOut,
    sae_functions,
    sample_tokens,
    split_cfg,
)


class LinearSAE(nn.Module):
    """ReLU SAE with encode/decode (imperfect reconstruction, so the error term matters)."""

    def __init__(self, d: int = 6, k: int = 10, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d, k, generator=g) / d**0.5)
        self.b_enc = nn.Parameter(torch.randn(k, generator=g) * 0.1)
        self.W_dec = nn.Parameter(torch.randn(k, d, generator=g) / k**0.5)
        self.b_dec = nn.Parameter(torch.randn(d, generator=g) * 0.1)

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, z):
        return z @ self.W_dec + self.b_dec


class SklearnStyleSAE:
    """transform/inverse_transform returning numpy (like an sklearn estimator)."""

    def __init__(self, sae: LinearSAE):
        self.sae = sae

    def transform(self, x):
        return self.sae.encode(x).detach().numpy()

    def inverse_transform(self, z):
        return self.sae.decode(torch.as_tensor(z)).detach().numpy()


def ctx(rows=4, n=2, order="uncond_cond", step=0, phase="denoise", branch=None, cfg=True):
    return CallContext("layer", 0, phase, step, None, None, n, rows, CFGLayout(order) if cfg else None, branch)


# ---------------------------------------------------------------------------------------------
# CFG layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "order, cond_rows",
    [("uncond_cond", [3, 4, 5]), ("cond_uncond", [0, 1, 2]), ("interleaved", [0, 2, 4]),
     ("interleaved_uncond_first", [1, 3, 5])],
)
def test_cfg_layout_rows_split_merge(order, cond_rows):
    layout = CFGLayout(order)
    assert layout.cond_index(6).tolist() == cond_rows
    assert sorted(layout.cond_index(6).tolist() + layout.uncond_index(6).tolist()) == list(range(6))
    x = torch.arange(6 * 2).reshape(6, 2)
    cond, uncond = layout.split(x)
    assert cond[:, 0].tolist() == [2 * r for r in cond_rows]
    assert torch.equal(layout.merge(cond, uncond), x)
    # the row dimension can be any dim
    xt = x.T.contiguous()
    c2, u2 = split_cfg(xt, order, dim=1)
    assert torch.equal(c2, cond.T) and torch.equal(layout.merge(c2, u2, dim=1), xt)
    assert torch.equal(layout.merge(c2, u2, dim=-1), xt)


def test_cfg_guide_formula():
    layout = CFGLayout("uncond_cond")
    x = torch.tensor([[1.0], [2.0], [3.0], [5.0]])  # uncond 1, 2 ; cond 3, 5
    assert layout.guide(x, 2.0).flatten().tolist() == [1 + 2 * 2, 2 + 2 * 3]
    assert layout.guide(x, 1.0).flatten().tolist() == [3.0, 5.0]


def test_cfg_errors():
    with pytest.raises(ValueError, match="Unknown CFG row order"):
        CFGLayout("cond_first")
    with pytest.raises(ValueError, match="even number of rows"):
        CFGLayout("uncond_cond").split(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="same shape"):
        CFGLayout("uncond_cond").merge(torch.zeros(2), torch.zeros(3))
    with pytest.raises(TypeError, match="torch.Tensor"):
        CFGLayout("uncond_cond").split(np.zeros(4))


def test_call_context_rows():
    c = ctx(rows=4, n=2, order="cond_uncond")
    assert c.row_index("cond").tolist() == [0, 1] and c.row_index("uncond").tolist() == [2, 3]
    assert c.row_index("all") is None
    no_cfg = ctx(rows=2, n=2, cfg=False)
    assert no_cfg.row_index("cond") is None and no_cfg.row_index("uncond").numel() == 0
    enc = ctx(rows=2, n=2, phase="encode", branch="uncond", step=None)
    assert enc.row_index("uncond") is None and enc.row_index("cond").numel() == 0
    with pytest.raises(ValueError, match="Cannot tell conditional"):
        ctx(rows=3, n=2).row_index("cond")
    with pytest.raises(ValueError, match="rows must be"):
        c.row_index("both")


# ---------------------------------------------------------------------------------------------
# edits
# ---------------------------------------------------------------------------------------------
def test_add_vector_closed_form_and_dims():
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    v = torch.arange(5.0)
    assert torch.allclose(AddVector(v, strength=-2.0)(x), x - 2 * v)
    conv = torch.randn(2, 3, 4, 4)
    out = AddVector(torch.tensor([1.0, 0.0, -1.0]), dim=1)(conv)
    assert torch.allclose(out[:, 0], conv[:, 0] + 1) and torch.equal(out[:, 1], conv[:, 1])
    unit = AddVector(torch.tensor([3.0, 4.0]), normalize=True)(torch.zeros(1, 2))
    assert torch.allclose(unit, torch.tensor([[0.6, 0.8]]))


def test_project_out_removes_component():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 6, generator=g)
    u = torch.randn(6, generator=g)
    out = ProjectOut(u)(x)
    assert torch.allclose(out @ (u / u.norm()), torch.zeros(10), atol=1e-5)
    # the orthogonal complement is untouched: out = x - (x.u_hat) u_hat
    uh = u / u.norm()
    assert torch.allclose(out, x - (x @ uh)[:, None] * uh, atol=1e-6)
    # a 2-D subspace (with a redundant direction) is removed too
    U = torch.stack([u, torch.randn(6, generator=g), 2 * u])
    out2 = ProjectOut(U)(x)
    assert torch.allclose(out2 @ U.T, torch.zeros(10, 3), atol=1e-4)
    # strength 2 reflects the component
    assert torch.allclose(ProjectOut(u, strength=2.0)(x) @ uh, -(x @ uh), atol=1e-5)


def test_clamp_features_keeps_reconstruction_error():
    sae = LinearSAE()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    z = sae.encode(x)
    zc = z.clone()
    zc[:, [1, 4]] = 3.0
    expected = x - sae.decode(z) + sae.decode(zc)
    out = ClampFeatures(sae, [1, 4], value=3.0)(x)
    assert torch.allclose(out, expected, atol=1e-6)
    # the reconstruction error is preserved: x' - dec(z_c) == x - dec(z)
    assert torch.allclose(out - sae.decode(zc), x - sae.decode(z), atol=1e-6)
    # modes
    zs = z.clone()
    zs[:, 2] = -z[:, 2]
    assert torch.allclose(ClampFeatures(sae, 2, -1.0, mode="scale")(x), x - sae.decode(z) + sae.decode(zs), atol=1e-6)
    zcap = z.clone()
    zcap[:, 0] = torch.clamp(z[:, 0], max=0.1)
    assert torch.allclose(ClampFeatures(sae, [0], 0.1, mode="cap")(x), x - sae.decode(z) + sae.decode(zcap), atol=1e-6)
    # only_active leaves inactive positions alone
    zact = z.clone()
    zact[:, 3] = torch.where(z[:, 3] > 0, torch.tensor(5.0), z[:, 3])
    out_a = ClampFeatures(sae, [3], 5.0, only_active=True)(x)
    assert torch.allclose(out_a, x - sae.decode(z) + sae.decode(zact), atol=1e-6)


def test_clamp_features_sklearn_style_and_conv_layout():
    sae = LinearSAE()
    sk = SklearnStyleSAE(sae)
    x = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(3))  # channels on dim 1
    out = ClampFeatures(sk, [0], value=2.0, dim=1)(x)
    flat = x.movedim(1, -1).reshape(-1, 6)
    z = sae.encode(flat)
    zc = z.clone()
    zc[:, 0] = 2.0
    expected = (flat - sae.decode(z) + sae.decode(zc)).reshape(2, 3, 3, 6).movedim(-1, 1)
    assert torch.allclose(out, expected, atol=1e-5)


def test_noop_edits_are_exact_identity():
    sae = LinearSAE()
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(4)) * 100
    noops = [
        AddVector(torch.zeros(6)),
        AddVector(torch.randn(6), strength=0.0),
        ProjectOut(torch.randn(6), strength=0.0),
        ClampFeatures(sae, [0, 3, 7], value=lambda z: z),
        ClampFeatures(sae, [1], value=1.0, mode="scale"),
        ClampFeatures(sae, [], value=9.0),
        ClampFeatures(SklearnStyleSAE(sae), [2], value=0.0, mode="add"),
        FunctionEdit(lambda t: t),
    ]
    for e in noops:
        out = e(x)
        assert out is None or torch.equal(out, x), repr(e)
        out = e(x, ctx(rows=4, n=2))
        assert out is None or torch.equal(out, x), repr(e)
    x16 = x.half()
    assert torch.equal(AddVector(torch.zeros(6))(x16), x16)
    assert torch.equal(ClampFeatures(sae, [0], value=lambda z: z)(x16), x16)


def test_edit_restrictions_rows_steps_phases():
    x = torch.zeros(4, 3)
    v = torch.ones(3)
    out = AddVector(v, rows="cond")(x, ctx(rows=4, n=2, order="uncond_cond"))
    assert out[:2].abs().sum() == 0 and torch.equal(out[2:], torch.ones(2, 3))
    out = AddVector(v, rows="uncond")(x, ctx(rows=4, n=2, order="cond_uncond"))
    assert torch.equal(out[2:], torch.ones(2, 3)) and out[:2].abs().sum() == 0
    assert AddVector(v, rows="uncond")(x, ctx(rows=4, n=4, cfg=False)) is None  # no uncond rows
    e = AddVector(v, steps=range(1, 3))
    assert e(x, ctx(step=0)) is None and e(x, ctx(step=2)) is not None and e(x, ctx(step=3)) is None
    assert AddVector(v, steps=slice(2, None, 2))(x, ctx(step=4)) is not None
    assert AddVector(v, steps=slice(2, None, 2))(x, ctx(step=3)) is None
    assert AddVector(v, steps=lambda s: s % 2 == 1)(x, ctx(step=1)) is not None
    assert AddVector(v, steps=[5])(x, ctx(step=None, phase="encode")) is None
    assert AddVector(v, phases="token")(x, ctx(phase="prefill")) is None
    tok = CallContext("layer", 3, "token", 3, None, 5, 2, 4, CFGLayout("cond_uncond"), None)
    assert AddVector(v, tokens=range(4, 8))(x, tok) is not None
    assert AddVector(v, tokens=[0, 1])(x, tok) is None
    assert AddVector(v, tokens=0)(x, CallContext("l", 0, "decode", 3, None, 0, 2, 4, None, None)) is None
    assert AddVector(v, phases=["token"])(x, ctx(phase="token")) is not None


def test_edit_errors():
    with pytest.raises(ValueError, match="rows must be"):
        AddVector(torch.ones(3), rows="first")
    with pytest.raises(ValueError, match="Unknown phase"):
        AddVector(torch.ones(3), phases="sampling")
    with pytest.raises(ValueError, match="vector must be 1-D"):
        AddVector(torch.ones(2, 3))
    with pytest.raises(TypeError, match="torch.Tensor or numpy"):
        AddVector([1.0, 2.0])
    with pytest.raises(TypeError, match="strength must be a real"):
        AddVector(torch.ones(3), strength="big")
    with pytest.raises(ValueError, match="Cannot normalize a zero vector"):
        AddVector(torch.zeros(3), normalize=True)
    with pytest.raises(ValueError, match="vector has 3 features, but the layer output has 5"):
        AddVector(torch.ones(3))(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="out of range for a layer output"):
        AddVector(torch.ones(3), dim=4)(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="dim must be an int"):
        AddVector(torch.ones(3), dim=1.5)
    with pytest.raises(ValueError, match="called without a CallContext"):
        AddVector(torch.ones(3), rows="cond")(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="restricts autoregressive image tokens"):
        AddVector(torch.ones(3), tokens=range(2))(torch.zeros(4, 3), ctx(rows=4, n=2))
    with pytest.raises(TypeError, match="steps must be"):
        AddVector(torch.ones(3), steps="all")
    with pytest.raises(TypeError, match="steps must contain ints"):
        AddVector(torch.ones(3), steps=[1.5])
    with pytest.raises(ValueError, match="positive step"):
        AddVector(torch.ones(3), steps=slice(0, None, -1))
    with pytest.raises(ValueError, match="directions must be"):
        ProjectOut(torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="directions are all zero"):
        ProjectOut(torch.zeros(3))
    with pytest.raises(ValueError, match="directions have 3 features"):
        ProjectOut(torch.ones(3))(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="strength must be a real"):
        ProjectOut(torch.ones(3), strength=None)
    with pytest.raises(TypeError, match="not usable as a sparse autoencoder"):
        ClampFeatures(object(), [0])
    sae = LinearSAE()
    with pytest.raises(ValueError, match="mode must be one of"):
        ClampFeatures(sae, [0], mode="zero")
    with pytest.raises(ValueError, match="non-negative feature indices"):
        ClampFeatures(sae, [-1])
    with pytest.raises(TypeError, match="features must be an int or a sequence"):
        ClampFeatures(sae, "0")
    with pytest.raises(TypeError, match="value must be a number"):
        ClampFeatures(sae, [0], value="high")
    with pytest.raises(ValueError, match="one value per feature"):
        ClampFeatures(sae, [0, 1], value=torch.ones(3))
    with pytest.raises(ValueError, match=r"features \[12\] are out of range: the SAE has 10"):
        ClampFeatures(sae, [12])(torch.zeros(2, 6))
    with pytest.raises(TypeError, match="fn must be callable"):
        FunctionEdit(3)
    with pytest.raises(ValueError, match="FunctionEdit's fn must return a tensor of shape"):
        FunctionEdit(lambda t: t[:1])(torch.zeros(2, 3))

    class BadSAE:
        def encode(self, x):
            return x[:, :1, None]

        def decode(self, z):
            return z

    with pytest.raises(ValueError, match="expected \\[n, n_concepts\\]"):
        ClampFeatures(BadSAE(), [0])(torch.zeros(2, 3))

    class WrongWidth:
        def encode(self, x):
            return x

        def decode(self, z):
            return z[:, :1]

    with pytest.raises(ValueError, match="the layer width"):
        ClampFeatures(WrongWidth(), [0], value=1.0)(torch.zeros(2, 3))

    class Strings:
        def encode(self, x):
            return "codes"

        def decode(self, z):
            return z

    enc, _ = sae_functions(Strings())
    with pytest.raises(TypeError, match="The SAE returned str"):
        enc(torch.zeros(1, 2))


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_sample_tokens_rows_independent_and_seeded():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(5))
    a = sample_tokens(logits, _gens([0, 1, 2]))
    b = sample_tokens(logits[1:2], _gens([1]))
    assert a[1] == b[0]  # row 1 only depends on its own generator
    assert torch.equal(a, sample_tokens(logits, _gens([0, 1, 2])))
    many = torch.stack([sample_tokens(logits[:1], _gens([s])) for s in range(200)]).flatten()
    assert len(set(many.tolist())) > 3  # it does sample
    greedy = sample_tokens(logits, _gens([0, 1, 2]), temperature=0)
    assert torch.equal(greedy, logits.argmax(-1))


def test_sample_tokens_top_k_top_p_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(1, 1)
    draws_k = {int(sample_tokens(logits, _gens([s]), top_k=2)[0]) for s in range(300)}
    assert draws_k == {0, 1}
    p = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    draws_p = {int(sample_tokens(logits, _gens([s]), top_p=float(p[0] + 0.01))[0]) for s in range(300)}
    assert draws_p == {0, 1}
    multi = sample_tokens(torch.randn(2, 4, 7), _gens([0, 1]))
    assert multi.shape == (2, 4) and int(multi.max()) < 7


def test_sample_tokens_errors():
    with pytest.raises(ValueError, match="logits must be"):
        sample_tokens(torch.zeros(5), _gens([0]))
    with pytest.raises(ValueError, match="generators for 2 rows"):
        sample_tokens(torch.zeros(2, 5), _gens([0]))
    with pytest.raises(ValueError, match="temperature must be"):
        sample_tokens(torch.zeros(1, 5), _gens([0]), temperature=-1)
    with pytest.raises(ValueError, match="top_k must be"):
        sample_tokens(torch.zeros(1, 5), _gens([0]), top_k=0)
    with pytest.raises(ValueError, match="top_p must be"):
        sample_tokens(torch.zeros(1, 5), _gens([0]), top_p=1.5)
