"""Sparse codes and the sparse encode/decode autograd functions.

A TopK-style SAE keeps ``k`` of ``n_concepts`` latents per sample, so the decoder product and the
whole backward pass only need the selected latents. A :class:`Selection` holds the selected
``(sample, latent)`` entries in CSR order (row = sample); two autograd functions exploit it:

* :class:`SelectedPreActivations` returns the selected entries of ``pre = xc @ W_enc.T + b_enc``
  (computed densely, without a graph, by the caller) and back-propagates through them only:
  ``d xc = G @ W_enc``, ``d W_enc = G.T @ xc``, ``d b_enc = bincount(col, g)`` for the sparse
  matrix ``G`` of incoming gradients.
* :class:`SparseDecode` computes ``Z @ W_dec``; its backward needs the gradient at the selected
  entries only (a sampled dense-dense product) and ``Z.T @ g`` for the dictionary.

Every sparse product is an ``embedding_bag`` (sum mode with per-sample weights): ``Z @ W`` bags
the selected rows of ``W`` per sample, and ``Z.T @ g`` bags rows of ``g`` per latent after one
``argsort`` of the selected latent indices. These kernels exist on every device and do not
degrade with threads the way generic sparse-matrix kernels do. ``use_sparse=False`` runs the same
functions with dense products (reference path; ``tests/sae/test_sparse.py`` checks both against
plain autograd).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SparseCodes",
    "Selection",
    "SelectedPreActivations",
    "SparseDecode",
    "crow_from_counts",
    "rows_from_crow",
    "selection_from_topk",
    "selection_from_mask",
    "selected_pre_activations",
    "sparse_decode",
    "to_padded",
]


class SparseCodes(NamedTuple):
    """Padded sparse codes: for every sample, the active latents and their values.

    Attributes
    ----------
    indices : Tensor
        [n_samples, m] int64 latent indices, ascending within a row. ``m`` is the largest number
        of active latents of any sample; shorter rows are padded with index 0 and value 0.
    values : Tensor
        [n_samples, m] activation values (0 for padding).

    Examples
    --------
    >>> import torch
    >>> codes = SparseCodes(torch.tensor([[1, 3]]), torch.tensor([[0.5, 2.0]]))
    >>> codes.to_dense(4)
    tensor([[0.0000, 0.5000, 0.0000, 2.0000]])
    """

    indices: Tensor
    values: Tensor

    def to_dense(self, n_concepts: int) -> Tensor:
        """Scatter into a dense ``[n_samples, n_concepts]`` tensor."""
        out = torch.zeros(
            self.values.shape[0], n_concepts, dtype=self.values.dtype, device=self.values.device
        )
        return out.scatter_add_(1, self.indices, self.values)

    def l0(self) -> Tensor:
        """Number of non-zero codes per sample, [n_samples]."""
        return (self.values != 0).sum(1)


# --------------------------------------------------------------------------------------------
# selections
# --------------------------------------------------------------------------------------------


def crow_from_counts(counts: Tensor) -> Tensor:
    """CSR row pointer ``[B + 1]`` from per-row counts ``[B]``."""
    crow = torch.zeros(counts.shape[0] + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow


def rows_from_crow(crow: Tensor) -> Tensor:
    """Row index of every stored entry, from a CSR row pointer."""
    counts = crow[1:] - crow[:-1]
    return torch.repeat_interleave(torch.arange(counts.shape[0], device=crow.device), counts)


class Selection:
    """Selected ``(row, col)`` entries of a ``[n_rows, n_cols]`` matrix in CSR order.

    Caches the row index of every entry and the column-sorted (transposed) order, which the
    backward passes share.
    """

    def __init__(self, crow: Tensor, col: Tensor, n_cols: int) -> None:
        self.crow = crow
        self.col = col
        self.n_rows = int(crow.shape[0] - 1)
        self.n_cols = int(n_cols)
        self._rows: Tensor | None = None
        self._t: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def offsets(self) -> Tensor:
        """Start of every row's entries, [n_rows] (``embedding_bag`` offsets)."""
        return self.crow[:-1]

    @property
    def rows(self) -> Tensor:
        if self._rows is None:
            self._rows = rows_from_crow(self.crow)
        return self._rows

    def transposed(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(order, offsets_T [n_cols], rows[order])``: the entries grouped by column."""
        if self._t is None:
            order = torch.argsort(self.col, stable=True)
            counts = torch.bincount(self.col, minlength=self.n_cols)
            self._t = (order, crow_from_counts(counts)[:-1], self.rows[order])
        return self._t

    def subset(self, keep: Tensor) -> Selection:
        """The entries where ``keep`` [nnz] is true."""
        counts = torch.bincount(self.rows[keep], minlength=self.n_rows)
        return Selection(crow_from_counts(counts), self.col[keep], self.n_cols)


def selection_from_topk(pre: Tensor, k: int, *, sort: bool = True) -> tuple[Selection, Tensor]:
    """Per-row top-``k`` of ``pre`` [B, n]: ``(selection, raw values [B*k])``.

    With ``sort=True`` the columns are ascending within each row (needed for
    :class:`SparseCodes`); the kernels do not need it, so training skips the sort.
    """
    b, n = pre.shape
    vals, idx = pre.topk(k, dim=1, sorted=False)
    if sort:
        idx, order = idx.sort(dim=1)
        vals = vals.gather(1, order)
    crow = torch.arange(0, b * k + 1, k, dtype=torch.int64, device=pre.device)
    return Selection(crow, idx.reshape(-1), n), vals.reshape(-1)


def selection_from_mask(pre: Tensor, mask: Tensor) -> tuple[Selection, Tensor]:
    """The entries where ``mask`` [B, n] is true: ``(selection, raw values)``."""
    rows, cols = mask.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=pre.shape[0])
    sel = Selection(crow_from_counts(counts), cols, pre.shape[1])
    sel._rows = rows
    return sel, pre[rows, cols]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse CSR tensor support is in beta state"
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _dense_from_selection(sel: Selection, values: Tensor) -> Tensor:
    out = torch.zeros(sel.n_rows, sel.n_cols, dtype=values.dtype, device=values.device)
    out[sel.rows, sel.col] = values
    return out


def _bag(index: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """``out[i] = sum_{e in bag i} weights[e] * table[index[e]]`` (``embedding_bag``, sum mode)."""
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


def _rowsum_products(sel: Selection, left: Tensor, right: Tensor) -> Tensor:
    """``out[e] = <left[row_e], right[col_e]>`` for every selected entry (SDDMM)."""
    try:
        pattern = _csr(sel.crow, sel.col, torch.zeros(sel.col.shape[0], dtype=left.dtype, device=left.device),
                       (sel.n_rows, sel.n_cols))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse.sampled_addmm(pattern, left, right.t(), beta=0.0).values()
    except (RuntimeError, NotImplementedError, TypeError):
        return (left[sel.rows] * right[sel.col]).sum(-1)


def _transposed_bag(sel: Selection, weights: Tensor, table: Tensor) -> Tensor:
    """``Z.T @ table`` [n_cols, d] for the sparse ``Z`` holding ``weights`` at ``sel``."""
    order, offsets_t, rows_sorted = sel.transposed()
    return _bag(rows_sorted, table, offsets_t, weights[order])


class SelectedPreActivations(torch.autograd.Function):
    """Selected pre-activations with a backward pass through the selected entries only.

    ``forward(xc [B, d], W_enc [n, d], b_enc [n], selection, pre_values [nnz], use_sparse)``
    returns ``pre_values`` with a graph to ``xc``, ``W_enc`` and ``b_enc``.
    """

    @staticmethod
    def forward(ctx, xc, w_enc, b_enc, sel, pre_values, use_sparse):  # type: ignore[override]
        ctx.save_for_backward(xc, w_enc)
        ctx.sel = sel
        ctx.use_sparse = bool(use_sparse)
        return pre_values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xc, w_enc = ctx.saved_tensors
        sel: Selection = ctx.sel
        grad = grad.to(w_enc.dtype)
        g_x = g_w = g_b = None
        if ctx.use_sparse:
            if ctx.needs_input_grad[0]:
                g_x = _bag(sel.col, w_enc, sel.offsets, grad)
            if ctx.needs_input_grad[1]:
                g_w = _transposed_bag(sel, grad, xc.to(w_enc.dtype))
        else:
            gz = _dense_from_selection(sel, grad)
            if ctx.needs_input_grad[0]:
                g_x = gz @ w_enc
            if ctx.needs_input_grad[1]:
                g_w = gz.t() @ xc.to(w_enc.dtype)
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(sel.n_cols, dtype=grad.dtype, device=grad.device).index_add_(0, sel.col, grad)
        if g_x is not None:
            g_x = g_x.to(xc.dtype)
        return g_x, g_w, g_b, None, None, None


class SparseDecode(torch.autograd.Function):
    """``Z @ W_dec`` for the sparse ``Z`` [B, n] holding ``values`` at ``selection``.

    ``forward(values [nnz], selection, W_dec [n, d], use_sparse) -> [B, d]``.
    """

    @staticmethod
    def forward(ctx, values, sel, w_dec, use_sparse):  # type: ignore[override]
        values = values.to(w_dec.dtype)
        ctx.save_for_backward(values, w_dec)
        ctx.sel = sel
        ctx.use_sparse = bool(use_sparse)
        if use_sparse:
            return _bag(sel.col, w_dec, sel.offsets, values)
        return _dense_from_selection(sel, values) @ w_dec

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, w_dec = ctx.saved_tensors
        sel: Selection = ctx.sel
        grad = grad.to(w_dec.dtype).contiguous()
        g_v = g_w = None
        if ctx.use_sparse:
            if ctx.needs_input_grad[0]:
                g_v = _rowsum_products(sel, grad, w_dec)
            if ctx.needs_input_grad[2]:
                g_w = _transposed_bag(sel, values, grad)
        else:
            if ctx.needs_input_grad[0]:
                g_v = (grad @ w_dec.t())[sel.rows, sel.col]
            if ctx.needs_input_grad[2]:
                g_w = _dense_from_selection(sel, values).t() @ grad
        return g_v, None, g_w, None


def selected_pre_activations(
    xc: Tensor, w_enc: Tensor, b_enc: Tensor, sel: Selection, pre_values: Tensor, *, use_sparse: bool = True
) -> Tensor:
    """Functional form of :class:`SelectedPreActivations`."""
    return SelectedPreActivations.apply(xc, w_enc, b_enc, sel, pre_values, use_sparse)


def sparse_decode(values: Tensor, sel: Selection, w_dec: Tensor, *, use_sparse: bool = True) -> Tensor:
    """Functional form of :class:`SparseDecode`: the ``[B, d]`` reconstruction without bias."""
    return SparseDecode.apply(values, sel, w_dec, use_sparse)


def to_padded(sel: Selection, values: Tensor) -> SparseCodes:
    """Convert a selection and its values into padded :class:`SparseCodes`."""
    counts = sel.crow[1:] - sel.crow[:-1]
    b = sel.n_rows
    m = int(counts.max().item()) if b > 0 else 0
    idx = torch.zeros(b, m, dtype=torch.int64, device=sel.col.device)
    val = torch.zeros(b, m, dtype=values.dtype, device=values.device)
    if m > 0 and sel.col.numel() > 0:
        rows = sel.rows
        pos = torch.arange(sel.col.shape[0], device=sel.col.device) - sel.crow[rows]
        idx[rows, pos] = sel.col
        val[rows, pos] = values
    return SparseCodes(idx, val)
