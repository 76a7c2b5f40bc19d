"""The sparse kernels agree with plain dense autograd (values and all gradients)."""
from __future__ import annotations

import pytest
import torch

from sae.sparse import (
    Selection,
    SparseCodes,
    selected_pre_activations,
    selection_from_mask,
    selection_from_topk,
    sparse_decode,
    to_padded,
)


def _problem(seed=0, b=7, n=12, d=5):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return mk(b, d), mk(n, d), mk(n), mk(n, d), mk(d), mk(b, d)


def _reference(x, w_enc, b_enc, w_dec, b_dec, target, select):
    """Plain autograd: dense pre-activations, dense codes, dense decode."""
    params = [t.clone().requires_grad_() for t in (w_enc, b_enc, w_dec, b_dec)]
    we, be, wd, bd = params
    pre = (x - bd) @ we.T + be
    mask = select(pre.detach())
    z = torch.relu(pre) * mask
    x_hat = z @ wd + bd
    loss = ((x_hat - target) ** 2).sum() + 0.3 * z.sum()
    loss.backward()
    return x_hat.detach(), [p.grad for p in params]


def _ours(x, w_enc, b_enc, w_dec, b_dec, target, selector, use_sparse):
    params = [t.clone().requires_grad_() for t in (w_enc, b_enc, w_dec, b_dec)]
    we, be, wd, bd = params
    xc = x - bd
    with torch.no_grad():
        pre = xc @ we.T + be
        sel, raw = selector(pre)
    v = torch.relu(selected_pre_activations(xc, we, be, sel, raw, use_sparse=use_sparse))
    x_hat = sparse_decode(v, sel, wd, use_sparse=use_sparse) + bd
    loss = ((x_hat - target) ** 2).sum() + 0.3 * v.sum()
    loss.backward()
    return x_hat.detach(), [p.grad for p in params]


@pytest.mark.parametrize("use_sparse", [True, False])
@pytest.mark.parametrize("kind", ["topk", "mask"])
def test_sparse_kernels_match_dense_autograd(kind, use_sparse):
    x, we, be, wd, bd, target = _problem()
    if kind == "topk":
        selector = lambda pre: selection_from_topk(pre, 3)  # noqa: E731

        def select(pre):
            m = torch.zeros_like(pre)
            return m.scatter_(1, pre.topk(3, dim=1).indices, 1.0)
    else:
        selector = lambda pre: selection_from_mask(pre, pre > 0.5)  # noqa: E731
        select = lambda pre: (pre > 0.5).to(pre.dtype)  # noqa: E731
    ref_out, ref_grads = _reference(x, we, be, wd, bd, target, select)
    out, grads = _ours(x, we, be, wd, bd, target, selector, use_sparse)
    torch.testing.assert_close(out, ref_out)
    for name, g, r in zip(["W_enc", "b_enc", "W_dec", "b_dec"], grads, ref_grads):
        torch.testing.assert_close(g, r, msg=name)


def test_selection_orders_columns_and_counts_rows():
    pre = torch.tensor([[0.1, 3.0, 2.0, -1.0], [5.0, 0.0, 4.0, 1.0]])
    sel, raw = selection_from_topk(pre, 2)
    assert sel.crow.tolist() == [0, 2, 4]
    assert sel.col.tolist() == [1, 2, 0, 2]          # ascending within each row
    assert raw.tolist() == [3.0, 2.0, 5.0, 4.0]
    order, offsets_t, rows_sorted = sel.transposed()
    assert sel.col[order].tolist() == [0, 1, 2, 2]
    assert offsets_t.tolist() == [0, 1, 2, 4]
    assert rows_sorted.tolist() == [1, 0, 0, 1]
    sub = sel.subset(sel.col != 2)
    assert sub.crow.tolist() == [0, 1, 2] and sub.col.tolist() == [1, 0]


def test_mask_selection_handles_empty_rows():
    pre = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 3.0]])
    sel, raw = selection_from_mask(pre, pre > 0)
    assert sel.crow.tolist() == [0, 0, 2, 3]
    codes = to_padded(sel, raw)
    assert codes.indices.shape == (3, 2)
    torch.testing.assert_close(codes.to_dense(2), pre)
    assert codes.l0().tolist() == [0, 2, 1]
    w = torch.randn(2, 4, dtype=torch.float32)
    out = sparse_decode(raw, sel, w)
    torch.testing.assert_close(out, pre @ w)


def test_sparse_codes_to_dense_and_padding():
    codes = SparseCodes(torch.tensor([[0, 2], [1, 0]]), torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    torch.testing.assert_close(codes.to_dense(3), torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]]))
    assert codes.l0().tolist() == [2, 1]


def test_selection_properties_are_cached():
    sel = Selection(torch.tensor([0, 1, 3]), torch.tensor([2, 0, 1]), 3)
    assert sel.rows is sel.rows
    assert sel.transposed() is sel.transposed()
