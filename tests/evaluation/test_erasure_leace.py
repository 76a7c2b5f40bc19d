"""LEACE: the linear guarantee, idempotence, rank, streaming, hooks, persistence and the reference package."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

from concepts.hooks import intervene, record
from evaluation.erasure.leace import LeaceEraser, LeaceFitter, optimal_linear_shrinkage


def _data(k: int, n: int = 2048, d: int = 32, seed: int = 0):
    X, y = make_classification(n, d, n_informative=min(8, d // 2), n_redundant=min(4, d // 4), n_classes=k, n_clusters_per_class=1,
                               class_sep=1.5, random_state=seed)
    half = n // 2
    return X[:half], y[:half], X[half:], y[half:]


@pytest.mark.parametrize("k", [2, 4])
def test_no_linear_classifier_beats_majority_after_erasure(k):
    Xtr, ytr, Xte, yte = _data(k)
    majority = np.bincount(yte, minlength=k).max() / len(yte)
    before = LogisticRegression(max_iter=2000).fit(Xtr, ytr).score(Xte, yte)
    assert before > majority + 0.2  # the concept is linearly there

    fitter = LeaceFitter().fit(Xtr, ytr)
    Etr, Ete = fitter.transform(Xtr), fitter.transform(Xte)
    probe = LogisticRegression(C=np.inf, max_iter=5000, tol=1e-10).fit(Etr, ytr)
    assert probe.score(Ete, yte) <= majority + 0.02
    # on the fitting data the erased class means coincide, so the unpenalized optimum predicts a constant
    # (its weights may only point along directions the eraser collapsed, where every sample agrees)
    assert probe.predict_proba(Etr).std(0).max() < 1e-5
    means = np.stack([Etr[ytr == c].mean(0) for c in range(k)])
    assert np.abs(means - means[0]).max() < 1e-9


@pytest.mark.parametrize("method", ["leace", "orth"])
@pytest.mark.parametrize("k", [2, 5])
def test_idempotent_and_rank_at_most_k_minus_1(method, k):
    Xtr, ytr, _, _ = _data(k, n=1024, d=16)
    e = LeaceFitter(method=method).fit(Xtr, ytr).eraser_
    X = torch.as_tensor(Xtr)
    once = e(X)
    assert torch.allclose(e(once), once, atol=1e-10)
    P = e.P
    assert torch.allclose(P @ P, P, atol=1e-10)
    assert e.rank <= k - 1
    assert int(torch.linalg.matrix_rank(torch.eye(16, dtype=P.dtype) - P)) <= k - 1
    if method == "orth":
        assert torch.allclose(P, P.T, atol=1e-12)  # an orthogonal projection


def test_leace_moves_less_than_orth_and_keeps_the_trace_identity():
    Xtr, ytr, _, _ = _data(3, n=1024, d=16)
    X = torch.as_tensor(Xtr)
    leace = LeaceFitter(shrinkage=False).fit(Xtr, ytr)
    orth = LeaceFitter(method="orth").fit(Xtr, ytr)
    move_leace = (leace.eraser_(X) - X).pow(2).sum(1).mean()
    move_orth = (orth.eraser_(X) - X).pow(2).sum(1).mean()
    assert move_leace < move_orth
    # closed form: tr Cov(P x) = tr Sigma - ||W^+ U||_F^2 = tr Sigma - ||proj_left||_F^2
    e = leace.eraser_
    after = torch.cov(e(X).T).trace()
    assert torch.isclose(after, torch.cov(X.T).trace() - e.proj_left.pow(2).sum(), rtol=1e-9)
    assert not e.metadata["trace_constrained"]


def test_streaming_equals_batch_and_accepts_token_layouts():
    Xtr, ytr, _, _ = _data(3, n=1800, d=12)
    batch = LeaceFitter().fit(Xtr, ytr).eraser_
    stream = LeaceFitter()
    for i in range(0, 900, 128):
        stream.partial_fit(Xtr[i:i + 128], ytr[i:i + 128], classes=[0, 1, 2])
    assert stream.n_samples_seen_ == 900
    X = torch.as_tensor(Xtr)
    assert torch.allclose(batch(X), stream.eraser_(X), atol=1e-9)
    # [n, L, d] features with [n, L] labels flatten to the same fit
    tok = LeaceFitter().fit(Xtr.reshape(300, 3, 12), ytr.reshape(300, 3)).eraser_
    assert torch.allclose(tok(X), batch(X), atol=1e-9)
    # one-hot float matrix == categorical labels
    onehot = np.eye(3)[ytr]
    assert torch.allclose(LeaceFitter().fit(Xtr, onehot).eraser_(X), batch(X), atol=1e-9)


def test_strength_dim_and_intervene_hook():
    Xtr, ytr, _, _ = _data(2, n=512, d=8)
    e = LeaceFitter().fit(Xtr, ytr).eraser_.to(dtype="float32")
    x = torch.as_tensor(Xtr, dtype=torch.float32)
    assert e(x, strength=0.0) is x
    half = e(x, strength=0.5)
    assert torch.allclose(half, x + 0.5 * (e(x) - x), atol=1e-5)
    conv = x[:6].reshape(6, 8, 1, 1).expand(6, 8, 2, 3)
    assert torch.allclose(e(conv, dim=1)[:, :, 1, 2], e(x[:6]), atol=1e-6)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(8, 3))
    with intervene(model, {"0": e.hook()}), record(model, "0") as acts:
        model(x)
    h = acts["0"][0]
    y = torch.as_tensor(ytr)
    assert (h[y == 1].mean(0) - h[y == 0].mean(0)).abs().max() < 1e-4
    assert (x[y == 1].mean(0) - x[y == 0].mean(0)).abs().max() > 0.5


def test_save_load_roundtrip_and_errors(tmp_path):
    Xtr, ytr, _, _ = _data(3, n=300, d=6)
    e = LeaceFitter().fit(Xtr, ytr).eraser_
    path = e.save(tmp_path / "eraser")
    assert path.suffix == ".safetensors"
    back = LeaceEraser.load(path)
    assert torch.equal(back.proj_left, e.proj_left) and torch.equal(back.bias, e.bias)
    assert back.metadata["n_samples"] == 150 and back.method == "leace"
    with pytest.raises(FileNotFoundError, match="eraser file not found"):
        LeaceEraser.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"proj_left": torch.zeros(2, 1)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
    with pytest.raises(ValueError, match="field 'format'"):
        LeaceEraser.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        LeaceEraser.load(tmp_path / "junk.safetensors")


def test_immutable_and_shrinkage_closed_form():
    left = torch.tensor([[1.0], [0.0]])
    e = LeaceEraser(left, torch.tensor([[1.0, 0.0]]), None, "orth")
    left[0, 0] = 5.0  # the eraser keeps its own copy
    assert e.proj_left[0, 0] == 1.0
    with pytest.raises(AttributeError):
        e.bias = torch.zeros(2)  # frozen
    S = torch.tensor([[3.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    shrunk = optimal_linear_shrinkage(S, n=10)
    assert torch.isclose(shrunk.trace(), S.trace())  # trace preserved
    assert torch.allclose(optimal_linear_shrinkage(2 * torch.eye(3), n=5), 2 * torch.eye(3))


def test_sklearn_conventions_and_errors():
    Xtr, ytr, _, _ = _data(2, n=200, d=5)
    f = LeaceFitter(method="orth", svd_tol=0.05)
    assert clone(f).get_params()["svd_tol"] == 0.05
    with pytest.raises(NotFittedError, match="not fitted yet"):
        f.eraser_
    with pytest.raises(ValueError, match="method must be one of"):
        LeaceFitter(method="ortho").fit(Xtr, ytr)
    with pytest.raises(ValueError, match="svd_tol must be a positive"):
        LeaceFitter(svd_tol=0).fit(Xtr, ytr)
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        LeaceFitter(dtype="float16").fit(Xtr, ytr)
    with pytest.raises(ValueError, match="single class"):
        LeaceFitter().fit(Xtr, np.zeros(len(Xtr), dtype=int))
    with pytest.raises(ValueError, match="not among classes_"):
        LeaceFitter().fit(Xtr[:50], ytr[:50]).partial_fit(Xtr[50:52], np.array([0, 7]))
    with pytest.raises(ValueError, match=r"z has shape \(10,\) but X has 100 rows"):
        LeaceFitter().fit(Xtr, ytr[:10])
    with pytest.raises(ValueError, match="NaN or infinite"):
        LeaceFitter().fit(np.full((4, 5), np.nan), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="X must be"):
        LeaceFitter().fit(np.ones(5), [0, 1, 0, 1, 0])
    with pytest.raises(TypeError, match="X must be a torch.Tensor"):
        LeaceFitter().fit("abc", [0])
    fitted = LeaceFitter().fit(Xtr, ytr)
    with pytest.raises(ValueError, match="X has 4 features, but LeaceFitter is expecting 5"):
        fitted.transform(np.ones((2, 4)))
    with pytest.raises(ValueError, match="X has 4 features, but LeaceFitter is expecting 5"):
        fitted.partial_fit(np.ones((2, 4)), [0, 1])
    with pytest.raises(ValueError, match="classes .* differ"):
        fitted.partial_fit(Xtr[:2], ytr[:2], classes=[0, 1, 2])
    with pytest.raises(ValueError, match="covariances need at least 2"):
        LeaceFitter().fit(Xtr[:1], np.array([0.5])).eraser_
    e = fitted.eraser_
    with pytest.raises(ValueError, match="the eraser is expecting 5 features"):
        e(torch.ones(2, 4))
    with pytest.raises(ValueError, match="dim=3 is out of range"):
        e(torch.ones(2, 5), dim=3)
    with pytest.raises(TypeError, match="strength must be a real number"):
        e(torch.ones(2, 5), strength="1")
    with pytest.raises(TypeError, match="strength must be a real number"):
        e.hook(strength=None)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        e.delta(np.ones((2, 5)))
    with pytest.raises(ValueError, match=r"proj_left must be \[d, r\]"):
        LeaceEraser(torch.ones(3, 1), torch.ones(2, 3))
    with pytest.raises(ValueError, match="bias must be None or a tensor of shape"):
        LeaceEraser(torch.ones(3, 1), torch.ones(1, 3), torch.ones(2))
    with pytest.raises(TypeError, match="proj_left must be a torch.Tensor"):
        LeaceEraser(np.ones((3, 1)), torch.ones(1, 3))
    with pytest.raises(ValueError, match="method must be one of"):
        LeaceEraser(torch.ones(3, 1), torch.ones(1, 3), None, "pca")
    with pytest.raises(ValueError, match="started with categorical labels"):
        LeaceFitter().fit(Xtr, ytr).partial_fit(Xtr[:3], np.ones((3, 2)))
    with pytest.raises(ValueError, match="columns in this batch"):
        LeaceFitter().fit(Xtr, np.ones((100, 2)) * np.arange(100)[:, None]).partial_fit(Xtr[:2], np.ones((2, 3)))
    with pytest.raises(ValueError, match="one label per row"):
        LeaceFitter().fit(Xtr, np.ones(300))
    with pytest.raises(ValueError, match="one label per row"):
        LeaceFitter().fit(Xtr, np.array(["a", "b"]))
    with pytest.raises(ValueError, match="categorical labels must have the leading shape"):
        LeaceFitter().fit(Xtr, np.array([["a", "b"]] * 100))
    with pytest.raises(TypeError, match="numbers or labels"):
        LeaceFitter().fit(Xtr[:2], np.array([None, None], dtype=object).astype("M8[ns]"))
    with pytest.raises(AttributeError, match="does not track the covariance"):
        LeaceFitter(method="orth").fit(Xtr, ytr).cov_xx_


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("shrinkage", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_concept_erasure_package(k, shrinkage, affine):
    ce = pytest.importorskip("concept_erasure")
    Xtr, ytr, Xte, _ = _data(k, n=1024, d=24)
    X, Xt = torch.as_tensor(Xtr), torch.as_tensor(Xte)
    Z = torch.nn.functional.one_hot(torch.as_tensor(ytr), k).double()
    ref = ce.LeaceFitter.fit(X, Z, shrinkage=shrinkage, affine=affine).eraser
    ours = LeaceFitter(shrinkage=shrinkage, affine=affine).fit(Xtr, ytr).eraser_
    assert (ref(Xt) - ours(Xt)).abs().max() < 1e-4
    orth_ref = ce.LeaceFitter.fit(X, Z, method="orth", affine=affine).eraser
    orth = LeaceFitter(method="orth", affine=affine).fit(Xtr, ytr).eraser_
    assert (orth_ref(Xt) - orth(Xt)).abs().max() < 1e-4


def test_one_sided_delta_erases_only_the_concept_side():
    """With signs pointing toward the concept, rows on the concept side get the full LEACE change and rows on the
    other side of the anchor are left exactly as they were; on binary data the concept rows still end at the anchor."""
    X, y = make_classification(n_samples=600, n_features=6, n_informative=3, n_redundant=0, random_state=0)
    X = torch.tensor(X, dtype=torch.float64)
    eraser = LeaceFitter().fit(X, y).eraser_
    coef = (X - eraser.bias) @ eraser.proj_right.T                        # [n, 1] erased coordinate
    sign = torch.sign(coef[torch.tensor(y) == 1].mean(0))                   # concept class side
    full, one = eraser.delta(X), eraser.delta(X, one_sided=sign)
    side = (sign * coef[:, 0]) > 0
    assert 0 < int(side.sum()) < len(X)
    torch.testing.assert_close(one[side], full[side])
    assert torch.equal(one[~side], torch.zeros_like(one[~side]))
    after = X + one
    assert torch.allclose(((after - eraser.bias) @ eraser.proj_right.T)[side], torch.zeros(int(side.sum()), 1,
                                                                                          dtype=X.dtype), atol=1e-9)
