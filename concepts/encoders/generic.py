"""Generic adapter: any callable or ``nn.Module`` (torchvision, timm, your own) as an :class:`Encoder`."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn

from ..devices import resolve_device
from ..hooks import primary_output
from ..images import images_to_tensor
from .base import iter_image_chunks, maybe_normalize, preprocess_images

if TYPE_CHECKING:
    from ..extractor import ConceptExtractor

__all__ = ["CallableEncoder"]


class CallableEncoder:
    """Wrap any image function or module (and optionally a text function) as an :class:`Encoder`.

    Parameters
    ----------
    image_fn : callable or nn.Module
        ``image_fn(x)`` with ``x`` a float tensor ``[n, 3, H, W]`` (after ``preprocess``). It may return
        ``[n, d]``, tokens ``[n, T, d]`` or a conv map ``[n, C, H, W]`` (pooled with ``pooling``), or
        a tuple / ``ModelOutput`` whose first tensor is one of these.
    text_fn : callable, optional
        ``text_fn(list_of_str) -> [n, d]``. Without it :meth:`encode_texts` raises.
    preprocess : callable, optional
        Per-image transform (PIL image -> ``[3, H, W]``). Default: float ``[0, 1]``, resized to
        ``image_size`` when given.
    image_size : int or (int, int), optional
        Resize used by the default preprocessing.
    device : str or torch.device, default "cpu"
    embed_dim : int, optional
        Feature dimension; found by encoding one blank image when not given.
    pooling : {"mean", "cls"}, default "mean"
        Pooling of 3-d / 4-d outputs (``cls``: token 0).

    Examples
    --------
    >>> import numpy as np
    >>> enc = CallableEncoder(lambda x: x.mean(dim=(2, 3)))
    >>> enc.encode_images(np.full((2, 4, 4, 3), 255, np.uint8), normalize=False)
    tensor([[1., 1., 1.],
            [1., 1., 1.]])
    """

    def __init__(
        self,
        image_fn: Callable[[Tensor], Any],
        *,
        text_fn: Callable[[list[str]], Tensor] | None = None,
        preprocess: Callable[[Image.Image], Tensor] | None = None,
        image_size: int | tuple[int, int] | None = None,
        device: str | torch.device = "cpu",
        embed_dim: int | None = None,
        pooling: Literal["mean", "cls"] = "mean",
    ) -> None:
        if not callable(image_fn):
            raise TypeError(f"image_fn must be callable (tensor [n, 3, H, W] -> features), got {type(image_fn).__name__}.")
        if text_fn is not None and not callable(text_fn):
            raise TypeError(f"text_fn must be callable (list of str -> [n, d]), got {type(text_fn).__name__}.")
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}.")
        self.device = resolve_device(device)
        if isinstance(image_fn, nn.Module):
            image_fn = image_fn.to(self.device).eval()
        self.image_fn = image_fn
        self.text_fn = text_fn
        self.preprocess = preprocess
        self.image_size = image_size
        self.pooling = pooling
        self._embed_dim = embed_dim

    @property
    def model(self) -> Any:
        """The wrapped image function / module."""
        return self.image_fn

    @property
    def embed_dim(self) -> int:
        """Feature dimension (probed with one blank image when not given)."""
        if self._embed_dim is None:
            size = self.image_size or 32
            hw = (size, size) if isinstance(size, int) else tuple(size)
            blank = torch.full((1, 3, *hw), 0.5)
            self._embed_dim = int(self.encode_images(blank, normalize=False).shape[1])
        return self._embed_dim

    def _pool(self, out: Any, n: int) -> Tensor:
        t = primary_output(out)
        if t.ndim == 2:
            return t
        if t.ndim == 3:
            return t[:, 0] if self.pooling == "cls" else t.mean(dim=1)
        if t.ndim == 4:
            if self.pooling == "cls":
                raise ValueError(f"image_fn returned a conv map {tuple(t.shape)}, which has no cls token; use pooling='mean'.")
            return t.mean(dim=(2, 3))
        raise ValueError(
            f"image_fn returned shape {tuple(t.shape)}; expected [n, d], [n, T, d] or [n, C, H, W] with n={n}."
        )

    def _dtype(self) -> torch.dtype:
        if isinstance(self.image_fn, nn.Module):
            p = next((p for p in self.image_fn.parameters() if p.is_floating_point()), None)
            if p is not None:
                return p.dtype
        return torch.float32

    @torch.no_grad()
    def encode_images(self, images: Any, *, batch_size: int = 64, normalize: bool = True) -> Tensor:
        """Encode images -> ``float32 [n, d]`` on the CPU.

        Examples
        --------
        >>> enc.encode_images(np.zeros((2, 32, 32, 3), np.uint8)).shape  # doctest: +SKIP
        """
        outs = []
        for chunk in iter_image_chunks(images, batch_size):
            if self.preprocess is not None:
                x = preprocess_images(chunk, self.preprocess)
            else:
                x = images_to_tensor(chunk, size=self.image_size)
            x = x.to(self.device, dtype=self._dtype())
            out = self._pool(self.image_fn(x), len(x))
            if out.shape[0] != len(x):
                raise ValueError(f"image_fn returned {out.shape[0]} rows for {len(x)} images.")
            outs.append(maybe_normalize(out, normalize).cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], *, normalize: bool = True) -> Tensor:
        """Encode texts with ``text_fn`` -> ``float32 [n, d]``.

        Raises
        ------
        NotImplementedError
            If no ``text_fn`` was given.
        """
        if self.text_fn is None:
            raise NotImplementedError(
                "This CallableEncoder has no text_fn; pass text_fn=... (list of str -> [n, d]) to encode texts."
            )
        from .openclip import _check_texts

        return maybe_normalize(primary_output(self.text_fn(_check_texts(texts))), normalize).cpu()

    def extractor(self, layers: str | Sequence[str], **kwargs: Any) -> ConceptExtractor:
        """A :class:`~concepts.extractor.ConceptExtractor` on ``image_fn`` (which must be an ``nn.Module``).

        Examples
        --------
        >>> store = enc.extractor("layer4", pooling="spatial").extract(images)  # doctest: +SKIP
        """
        from ..extractor import ConceptExtractor

        if not isinstance(self.image_fn, nn.Module):
            raise TypeError("extractor() needs image_fn to be a torch.nn.Module to register hooks.")
        kwargs.setdefault("preprocess", self.preprocess)
        kwargs.setdefault("device", self.device)
        return ConceptExtractor(self.image_fn, layers, **kwargs)

    def __repr__(self) -> str:
        name = getattr(self.image_fn, "__name__", type(self.image_fn).__name__)
        return f"CallableEncoder({name}, embed_dim={self._embed_dim}, device={self.device})"
