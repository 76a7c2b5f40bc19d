"""The solvers behind the heads, against closed forms and a peer library (scikit-learn)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from cbm.training import fit_sparse_linear, fit_temperature, train_minibatch


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 6))
    W = rng.normal(size=(6, 3)) * 2
    y = (X @ W + rng.gumbel(size=(400, 3))).argmax(1)
    return X, y


def test_l2_matches_sklearn(data):
    X, y = data
    l2 = 1e-2
    W, b = fit_sparse_linear(torch.tensor(X), torch.tensor(y), 3, l2=l2, max_iter=5000, tol=1e-10)
    ref = LogisticRegression(C=1 / (l2 * len(X)), tol=1e-10, max_iter=5000).fit(X, y)
    ours = torch.softmax(torch.tensor(X, dtype=torch.float32) @ W.T + b, 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(X), atol=2e-3)


def test_l1_solution_satisfies_the_optimality_conditions(data):
    X, y = data
    l1 = 0.02
    W, b = fit_sparse_linear(torch.tensor(X), torch.tensor(y), 3, l1=l1, max_iter=20000, tol=1e-12)
    Xt = torch.tensor(X)
    P = torch.softmax(Xt @ W.double().T + b.double(), 1)
    Y = torch.nn.functional.one_hot(torch.tensor(y), 3).double()
    G = ((P - Y).T @ Xt / len(X)).numpy()
    Wn = W.numpy()
    assert (Wn == 0).any(), "l1 should zero some weights"
    zero = Wn == 0
    assert np.all(np.abs(G[zero]) <= l1 + 1e-3)
    np.testing.assert_allclose(G[~zero], -l1 * np.sign(Wn[~zero]), atol=1e-3)
    assert np.abs((P - Y).sum(0).numpy() / len(X)).max() < 1e-3  # unpenalised bias: gradient zero


def test_no_bias_and_sample_weights(data):
    X, y = data
    W, b = fit_sparse_linear(torch.tensor(X), torch.tensor(y), 3, l2=0.1, bias=False)
    assert torch.all(b == 0)
    Xd = np.concatenate([X, X[:50]])
    yd = np.concatenate([y, y[:50]])
    w = np.ones(len(X))
    w[:50] = 2.0
    W1, b1 = fit_sparse_linear(torch.tensor(Xd), torch.tensor(yd), 3, l2=0.05, max_iter=5000, tol=1e-10)
    W2, b2 = fit_sparse_linear(torch.tensor(X), torch.tensor(y), 3, l2=0.05, max_iter=5000, tol=1e-10,
                               sample_weight=torch.tensor(w * len(Xd) / len(X)))
    np.testing.assert_allclose(W1.numpy(), W2.numpy(), atol=2e-3)


def test_temperature_recovers_the_planted_scale():
    rng = np.random.default_rng(1)
    L = torch.tensor(rng.normal(size=(20000, 4)))
    p = torch.softmax(3.0 * L, 1).numpy()
    y = torch.tensor([rng.choice(4, p=row) for row in p])
    assert fit_temperature(L, y) == pytest.approx(3.0, rel=0.05)


def test_train_minibatch_is_seeded_and_guards_nan():
    def run(seed):
        w = torch.zeros(2, requires_grad=True)
        X = torch.arange(20.0).view(10, 2)
        train_minibatch(lambda i: ((X[i] @ w - 1.0) ** 2).mean(), [w], 10, n_epochs=3, batch_size=3, lr=0.01,
                        seed=seed)
        return w.detach().clone()

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    w = torch.zeros(1, requires_grad=True)
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train_minibatch(lambda i: w.sum() * float("nan"), [w], 4, n_epochs=1, batch_size=2, lr=0.1, seed=0)
