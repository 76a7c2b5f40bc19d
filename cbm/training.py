"""Fitting the small layers concept-bottleneck heads are made of.

Three solvers, shared by every head so that each head states only *what* it fits:

* :func:`fit_sparse_linear`: multinomial logistic regression with an elastic-net penalty, solved full-batch
  with FISTA (accelerated proximal gradient, adaptive restart), or with L-BFGS when there is no L1 term. It is the sparse final layer of
  Label-free CBM (where the original uses ``glm_saga``), the sparse probe of Discover-then-Name and, with
  ``l1=0``, a plain L2 linear probe. Deterministic: no sampling, no seeds.
* :func:`fit_multilabel_logistic`: one L2-regularised logistic regression per label column, all solved
  together full-batch with L-BFGS (the linear concept predictor of a concept-supervised CBM).
* :func:`train_minibatch`: a seeded mini-batch loop around any loss over a fixed set of rows (Adam by
  default), with an optional progress bar; used for the Sparse-CBM layers, concept predictors and MLP
  label heads.
* :func:`fit_temperature`: a one-parameter softmax temperature fitted by log-likelihood (calibration of
  the training-free heads; it never changes an argmax).

Examples
--------
>>> import torch
>>> Z = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.1, 0.9], [0.9, 0.2]])
>>> W, b = fit_sparse_linear(Z, torch.tensor([1, 0, 1, 0]), 2, l2=1e-2)
>>> (Z @ W.T + b).argmax(1).tolist()
[1, 0, 1, 0]
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["fit_sparse_linear", "fit_multilabel_logistic", "train_minibatch", "fit_temperature", "seeded_generator"]


def seeded_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (never touches the global RNG).

    Examples
    --------
    >>> g = seeded_generator(0)
    >>> torch.rand(1, generator=g).item() == torch.rand(1, generator=seeded_generator(0)).item()
    True
    """
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(int(seed))
    return g


def _prox_l1(W: Tensor, t: float) -> Tensor:
    return torch.sign(W) * torch.clamp(W.abs() - t, min=0.0)


def fit_sparse_linear(
    Z: Tensor,
    y: Tensor,
    n_classes: int,
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    bias: bool = True,
    max_iter: int = 2000,
    tol: float = 1e-6,
    sample_weight: Tensor | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Elastic-net multinomial logistic regression, solved with FISTA (L-BFGS when ``l1 == 0``).

    Minimises ``mean_i CE(W z_i + b, y_i) + l1 * sum|W| + l2 / 2 * ||W||^2`` (the bias is not penalised).

    Parameters
    ----------
    Z
        Inputs ``[n, k]`` (any float dtype; solved in float64 on ``Z``'s device).
    y
        Class indices ``[n]`` in ``0 .. n_classes - 1``.
    n_classes
        Number of classes ``K``.
    l1, l2
        Penalty strengths (``l1`` is per weight entry: Discover-then-Name's ``lambda * mean|W|`` is
        ``l1 = lambda / (K * k)``).
    bias
        Fit an intercept per class.
    max_iter, tol
        Iteration cap and (FISTA) the stopping tolerance on the relative change of the parameters.
    sample_weight
        Optional weights ``[n]`` (normalised to mean 1).
    progress
        Show a progress bar over iterations.

    Returns
    -------
    (Tensor, Tensor)
        ``W [K, k]`` and ``b [K]`` (zeros when ``bias=False``), float32 on ``Z``'s device.

    Examples
    --------
    >>> Z = torch.eye(3).repeat(4, 1)
    >>> W, b = fit_sparse_linear(Z, torch.arange(3).repeat(4), 3, l1=1e-3)
    >>> W.argmax(1).tolist()
    [0, 1, 2]
    """
    Z64 = Z.detach().to(torch.float64)
    n, k = Z64.shape
    yy = y.to(Z64.device, torch.long)
    if sample_weight is None:
        sw = torch.ones(n, dtype=torch.float64, device=Z64.device)
    else:
        sw = sample_weight.to(Z64.device, torch.float64)
        sw = sw * (n / sw.sum())
    Y = torch.zeros(n, n_classes, dtype=torch.float64, device=Z64.device)
    Y[torch.arange(n, device=Z64.device), yy] = 1.0
    Za = torch.cat([Z64, torch.ones(n, 1, dtype=torch.float64, device=Z64.device)], 1) if bias else Z64
    # Lipschitz constant of the smooth part (Boehning's bound on the softmax Hessian, 1/2 * Za' D Za / n)
    sigma = torch.linalg.matrix_norm(Za * sw.sqrt()[:, None], ord=2).item()
    L = 0.5 * sigma**2 / n + float(l2) + 1e-12
    step = 1.0 / L

    def grad(P: Tensor) -> Tensor:
        logits = Za @ P.T
        prob = torch.softmax(logits, dim=1)
        G = ((prob - Y) * sw[:, None]).T @ Za / n
        if l2:
            G[:, :k] += l2 * P[:, :k]
        return G

    def prox(P: Tensor) -> Tensor:
        if l1:
            P = P.clone()
            P[:, :k] = _prox_l1(P[:, :k], step * l1)
        return P

    def objective(P: Tensor) -> float:
        logits = Za @ P.T
        ce = (torch.logsumexp(logits, 1) - (logits * Y).sum(1)) * sw
        W = P[:, :k]
        return float(ce.mean() + l1 * W.abs().sum() + 0.5 * l2 * (W**2).sum())

    if not l1:  # smooth problem: L-BFGS converges in far fewer passes than FISTA
        P = torch.zeros(n_classes, Za.shape[1], dtype=torch.float64, device=Z64.device, requires_grad=True)
        opt = torch.optim.LBFGS([P], lr=1.0, max_iter=int(max_iter), tolerance_grad=1e-7, tolerance_change=1e-10,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            logits = Za @ P.T
            ce = ((torch.logsumexp(logits, 1) - (logits * Y).sum(1)) * sw).mean()
            loss = ce + 0.5 * l2 * (P[:, :k] ** 2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        P = P.detach()
        logger.debug("fit_sparse_linear (L-BFGS): %s iterations, objective %.6f", opt.state[opt._params[0]].get("n_iter"),
                     objective(P))
        W = P[:, :k].to(torch.float32)
        b = P[:, k].to(torch.float32) if bias else torch.zeros(n_classes, device=Z64.device)
        return W, b

    P = torch.zeros(n_classes, Za.shape[1], dtype=torch.float64, device=Z64.device)
    V = P.clone()
    t = 1.0
    it = 0
    for it in tqdm(range(int(max_iter)), disable=not progress, desc="sparse linear layer"):
        P_new = prox(V - step * grad(V))
        # gradient-based adaptive restart (O'Donoghue & Candes 2015)
        if ((V - P_new) * (P_new - P)).sum() > 0:
            t = 1.0
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        V = P_new + ((t - 1.0) / t_new) * (P_new - P)
        change = (P_new - P).norm() / max(P_new.norm().item(), 1e-12)
        P, t = P_new, t_new
        if it > 5 and change < tol:
            break
    logger.debug("fit_sparse_linear: %d iterations, objective %.6f", it + 1, objective(P))
    W = P[:, :k].to(torch.float32)
    b = P[:, k].to(torch.float32) if bias else torch.zeros(n_classes, device=Z64.device)
    return W, b


def fit_multilabel_logistic(
    Z: Tensor,
    T: Tensor,
    *,
    l2: float = 1e-4,
    max_iter: int = 500,
    init_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Independent logistic regressions of every column of ``T`` on ``Z``, solved together with L-BFGS.

    Minimises ``sum_j mean_i BCE(z_i . w_j + b_j, T_ij) + l2 / 2 * ||W||^2``.

    Parameters
    ----------
    Z
        Inputs ``[n, d]``.
    T
        Binary targets ``[n, k]`` (0/1 floats).
    l2
        L2 penalty on the weights (not the biases).
    max_iter
        L-BFGS iterations.
    init_bias
        Starting biases ``[k]`` (default 0).

    Returns
    -------
    (Tensor, Tensor)
        ``W [k, d]``, ``b [k]`` (float32, on ``Z``'s device).

    Examples
    --------
    >>> Z = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    >>> W, b = fit_multilabel_logistic(Z, torch.tensor([[0.0], [0.0], [1.0], [1.0]]), l2=1e-3)
    >>> (Z @ W.T + b > 0).flatten().tolist()
    [False, False, True, True]
    """
    Z64 = Z.detach().to(torch.float64)
    T64 = T.detach().to(Z64.device, torch.float64)
    k, d = T64.shape[1], Z64.shape[1]
    W = torch.zeros(k, d, dtype=torch.float64, device=Z64.device, requires_grad=True)
    b0 = torch.zeros(k, dtype=torch.float64) if init_bias is None else init_bias.detach().to(torch.float64).cpu()
    b = b0.to(Z64.device).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=int(max_iter), tolerance_grad=1e-7, tolerance_change=1e-10,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = Z64 @ W.T + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, T64, reduction="none").mean(0).sum()
        loss = loss + 0.5 * l2 * (W**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach().to(torch.float32), b.detach().to(torch.float32)


def train_minibatch(
    loss_fn: Callable[[Tensor], Tensor],
    param_groups: Iterable[dict[str, Any]] | Iterable[Tensor],
    n: int,
    *,
    n_epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device | str = "cpu",
    weight_decay: float = 0.0,
    progress: bool = False,
    desc: str = "training",
) -> list[float]:
    """Seeded mini-batch optimisation of ``loss_fn(batch_indices)`` with Adam.

    Parameters
    ----------
    loss_fn
        ``loss_fn(idx [b]) -> scalar Tensor`` for the rows ``idx`` of the training set.
    param_groups
        Parameters, or Adam parameter groups (``{"params": [...], "lr": ...}``).
    n
        Number of training rows.
    n_epochs, batch_size, lr, weight_decay
        Schedule and Adam settings (``lr`` is the default for groups without their own).
    seed
        Seeds the row order (a private generator).
    device
        Where the batch indices live.
    progress, desc
        Progress bar over epochs.

    Returns
    -------
    list of float
        Mean loss per epoch.

    Examples
    --------
    >>> w = torch.zeros(1, requires_grad=True)
    >>> target = torch.full((8,), 3.0)
    >>> hist = train_minibatch(lambda i: ((w - target[i]) ** 2).mean(), [w], 8, n_epochs=200,
    ...                        batch_size=4, lr=0.1, seed=0)
    >>> round(w.item(), 2)
    3.0
    """
    opt = torch.optim.Adam(param_groups, lr=lr, weight_decay=weight_decay)
    g = seeded_generator(seed)
    history: list[float] = []
    dev = torch.device(device)
    bs = max(1, min(int(batch_size), n))
    bar = tqdm(range(int(n_epochs)), disable=not progress, desc=desc)
    for _ in bar:
        order = torch.randperm(n, generator=g).to(dev)
        total, count = 0.0, 0
        for lo in range(0, n, bs):
            idx = order[lo:lo + bs]
            loss = loss_fn(idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{desc}: the loss became {loss.item()}; lower the learning rate (lr={lr}) or check the inputs "
                    "for extreme values."
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history.append(total / max(count, 1))
        if progress:
            bar.set_postfix(loss=f"{history[-1]:.4f}")
    return history


def fit_temperature(logits: Tensor, y: Tensor, *, bounds: tuple[float, float] = (1e-3, 1e3)) -> float:
    """The scale ``s`` minimising ``mean CE(s * logits, y)`` (golden-section search on ``log s``).

    Examples
    --------
    >>> logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    >>> fit_temperature(logits, torch.tensor([0, 1, 1])) < 5
    True
    """
    L = logits.detach().to(torch.float64)
    yy = y.to(L.device, torch.long)

    def nll(log_s: float) -> float:
        z = math.exp(log_s) * L
        return float((torch.logsumexp(z, 1) - z.gather(1, yy[:, None])[:, 0]).mean())

    a, b = math.log(bounds[0]), math.log(bounds[1])
    phi = (math.sqrt(5) - 1) / 2
    c, d = b - phi * (b - a), a + phi * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(80):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - phi * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + phi * (b - a)
            fd = nll(d)
    return float(math.exp((a + b) / 2))
