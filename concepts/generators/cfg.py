"""Classifier-free-guidance (CFG) row layouts: which rows of a batch are conditional.

With CFG a generator runs its network on a batch holding, for every image, one *conditional*
row (the prompt) and one *unconditional* row (empty / null prompt), then mixes the two
predictions. Families stack the two halves differently:

================================  ===================  =========================================
family                            order                rows for N images
================================  ===================  =========================================
diffusers Stable Diffusion        ``"uncond_cond"``    ``[uncond_0..uncond_{N-1}, cond_0..cond_{N-1}]``
diffusers PixArt-alpha / sigma    ``"uncond_cond"``    same as Stable Diffusion
transformers ``Janus`` generate   ``"cond_uncond"``    ``[cond_0..cond_{N-1}, uncond_0..uncond_{N-1}]``
LlamaGen, VAR                     ``"cond_uncond"``    same as transformers Janus
deepseek-ai/Janus repository      ``"interleaved"``    ``[cond_0, uncond_0, cond_1, uncond_1, ...]``
================================  ===================  =========================================

(``"interleaved_uncond_first"`` covers the remaining order ``[uncond_0, cond_0, ...]``.)

:class:`CFGLayout` turns an order into row indices, splits a tensor into its conditional and
unconditional parts, and merges them back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["CFG_ORDERS", "CFGLayout", "split_cfg"]

CFGOrder = Literal["uncond_cond", "cond_uncond", "interleaved", "interleaved_uncond_first"]
CFG_ORDERS: tuple[str, ...] = ("uncond_cond", "cond_uncond", "interleaved", "interleaved_uncond_first")


@dataclass(frozen=True)
class CFGLayout:
    """Row order of a classifier-free-guidance batch.

    Parameters
    ----------
    order : {"uncond_cond", "cond_uncond", "interleaved", "interleaved_uncond_first"}
        ``"uncond_cond"``: the first half of the rows is unconditional, the second half
        conditional (diffusers). ``"cond_uncond"``: the reverse (transformers Janus, LlamaGen,
        VAR). ``"interleaved"``: even rows conditional, odd rows unconditional (deepseek-ai/Janus
        repository). ``"interleaved_uncond_first"``: even rows unconditional, odd rows conditional.

    Examples
    --------
    >>> import torch
    >>> layout = CFGLayout("uncond_cond")
    >>> x = torch.tensor([[0.0], [0.0], [1.0], [1.0]])   # 2 images: [uncond; cond]
    >>> cond, uncond = layout.split(x)
    >>> cond.flatten().tolist(), uncond.flatten().tolist()
    ([1.0, 1.0], [0.0, 0.0])
    >>> torch.equal(layout.merge(cond, uncond), x)
    True
    """

    order: str

    def __post_init__(self) -> None:
        if self.order not in CFG_ORDERS:
            raise ValueError(
                f"Unknown CFG row order {self.order!r}: expected one of {list(CFG_ORDERS)}. "
                "Use 'uncond_cond' for diffusers pipelines and 'cond_uncond' for transformers Janus / LlamaGen."
            )

    # -- indices --------------------------------------------------------------------------------
    def _check_rows(self, n_rows: int) -> int:
        if not isinstance(n_rows, int) or n_rows < 0 or n_rows % 2:
            raise ValueError(
                f"A CFG batch has an even number of rows (one conditional and one unconditional row per "
                f"image); got {n_rows} rows. Split only tensors whose batch dimension holds both branches."
            )
        return n_rows // 2

    def cond_index(self, n_rows: int) -> Tensor:
        """Indices of the conditional rows among ``n_rows`` CFG rows, in image order.

        Parameters
        ----------
        n_rows : int
            Number of rows of the CFG batch (``2 * n_images``).

        Returns
        -------
        Tensor
            Long tensor [n_rows // 2].

        Examples
        --------
        >>> CFGLayout("interleaved").cond_index(6).tolist()
        [0, 2, 4]
        """
        n = self._check_rows(n_rows)
        if self.order == "uncond_cond":
            return torch.arange(n, 2 * n)
        if self.order == "cond_uncond":
            return torch.arange(0, n)
        if self.order == "interleaved":
            return torch.arange(0, 2 * n, 2)
        return torch.arange(1, 2 * n, 2)

    def uncond_index(self, n_rows: int) -> Tensor:
        """Indices of the unconditional rows among ``n_rows`` CFG rows, in image order.

        Parameters
        ----------
        n_rows : int
            Number of rows of the CFG batch (``2 * n_images``).

        Returns
        -------
        Tensor
            Long tensor [n_rows // 2].

        Examples
        --------
        >>> CFGLayout("uncond_cond").uncond_index(4).tolist()
        [0, 1]
        """
        n = self._check_rows(n_rows)
        if self.order == "uncond_cond":
            return torch.arange(0, n)
        if self.order == "cond_uncond":
            return torch.arange(n, 2 * n)
        if self.order == "interleaved":
            return torch.arange(1, 2 * n, 2)
        return torch.arange(0, 2 * n, 2)

    # -- tensors --------------------------------------------------------------------------------
    def split(self, x: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
        """Split a CFG batch into ``(cond, uncond)``, each in image order.

        Parameters
        ----------
        x : Tensor
            [..., 2N (at ``dim``), ...] a tensor whose ``dim`` holds the CFG rows.
        dim : int, default 0
            The row dimension.

        Returns
        -------
        cond, uncond : Tensor
            Each [..., N, ...].

        Examples
        --------
        >>> import torch
        >>> CFGLayout("cond_uncond").split(torch.arange(4))
        (tensor([0, 1]), tensor([2, 3]))
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}.")
        n_rows = x.shape[dim]
        ci = self.cond_index(n_rows).to(x.device)
        ui = self.uncond_index(n_rows).to(x.device)
        return x.index_select(dim, ci), x.index_select(dim, ui)

    def merge(self, cond: Tensor, uncond: Tensor, dim: int = 0) -> Tensor:
        """Inverse of :meth:`split`: build the CFG batch from its two halves.

        Parameters
        ----------
        cond, uncond : Tensor
            [..., N, ...] conditional and unconditional rows in image order.
        dim : int, default 0
            The row dimension.

        Returns
        -------
        Tensor
            [..., 2N, ...] rows in this layout's order.

        Examples
        --------
        >>> import torch
        >>> CFGLayout("interleaved").merge(torch.tensor([1, 2]), torch.tensor([-1, -2])).tolist()
        [1, -1, 2, -2]
        """
        if cond.shape != uncond.shape:
            raise ValueError(
                f"cond and uncond must have the same shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}."
            )
        if self.order == "uncond_cond":
            return torch.cat([uncond, cond], dim=dim)
        if self.order == "cond_uncond":
            return torch.cat([cond, uncond], dim=dim)
        first, second = (cond, uncond) if self.order == "interleaved" else (uncond, cond)
        stacked = torch.stack([first, second], dim=dim + 1 if dim >= 0 else dim)
        shape = list(cond.shape)
        d = dim if dim >= 0 else cond.dim() + dim
        shape[d] = 2 * shape[d]
        return stacked.reshape(shape)

    def guide(self, x: Tensor, scale: float, dim: int = 0) -> Tensor:
        """Classifier-free guidance ``uncond + scale * (cond - uncond)`` on a CFG batch.

        Parameters
        ----------
        x : Tensor
            [..., 2N, ...] predictions (noise, logits) for the CFG rows.
        scale : float
            Guidance scale (1 returns the conditional prediction).
        dim : int, default 0
            The row dimension.

        Returns
        -------
        Tensor
            [..., N, ...] guided predictions in image order.

        Examples
        --------
        >>> import torch
        >>> CFGLayout("cond_uncond").guide(torch.tensor([2.0, 0.0]), 3.0)
        tensor([6.])
        """
        cond, uncond = self.split(x, dim=dim)
        return uncond + scale * (cond - uncond)


def split_cfg(x: Tensor, order: str, dim: int = 0) -> tuple[Tensor, Tensor]:
    """Split a CFG batch into ``(cond, uncond)`` for a family's row order.

    Parameters
    ----------
    x : Tensor
        [..., 2N (at ``dim``), ...] CFG rows.
    order : str
        One of :data:`CFG_ORDERS` (see :class:`CFGLayout`).
    dim : int, default 0
        The row dimension.

    Returns
    -------
    cond, uncond : Tensor

    Examples
    --------
    >>> import torch
    >>> split_cfg(torch.arange(4), "uncond_cond")
    (tensor([2, 3]), tensor([0, 1]))
    """
    return CFGLayout(order).split(x, dim=dim)
