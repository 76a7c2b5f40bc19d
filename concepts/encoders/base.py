"""The ``Encoder`` protocol and the image plumbing shared by all encoder adapters."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..images import load_image

__all__ = [
    "Encoder",
    "ResizeCropNormalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "iter_image_chunks",
    "preprocess_images",
    "maybe_normalize",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@runtime_checkable
class Encoder(Protocol):
    """Anything that turns images (and possibly texts) into feature vectors.

    Attributes
    ----------
    embed_dim : int
        Feature dimension ``d``.
    device : torch.device
        Where the model runs.

    Examples
    --------
    >>> from concepts.encoders import CallableEncoder
    >>> import torch
    >>> enc = CallableEncoder(lambda x: x.mean(dim=(2, 3)), embed_dim=3)
    >>> isinstance(enc, Encoder)
    True
    """

    embed_dim: int
    device: torch.device

    def encode_images(self, images: Any, *, batch_size: int = 64, normalize: bool = True) -> Tensor:
        """Encode images (uint8 ``[n, H, W, 3]``, float ``[n, 3, H, W]`` in [0, 1], PIL, paths) -> ``[n, d]``."""
        ...

    def encode_texts(self, texts: Sequence[str], *, normalize: bool = True) -> Tensor:
        """Encode texts -> ``[n, d]``."""
        ...


class ResizeCropNormalize:
    """Per-image preprocessing: resize the shorter side, center-crop, scale to [0, 1], normalise.

    Parameters
    ----------
    crop_size : int
        Output size ``crop_size x crop_size``.
    resize : int, optional
        Shorter side after resizing (default ``round(crop_size * 256 / 224)``, the ImageNet ratio).
    mean, std : 3-tuples of float
        Normalisation (default ImageNet).

    Examples
    --------
    >>> from PIL import Image
    >>> ResizeCropNormalize(32)(Image.new("RGB", (50, 40))).shape
    torch.Size([3, 32, 32])
    """

    def __init__(
        self,
        crop_size: int,
        resize: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.crop_size = int(crop_size)
        self.resize = int(resize) if resize is not None else round(self.crop_size * 256 / 224)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, image: Image.Image | np.ndarray) -> Tensor:
        arr = load_image(image)
        t = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
        h, w = t.shape[-2:]
        scale = self.resize / min(h, w)
        nh, nw = max(self.crop_size, round(h * scale)), max(self.crop_size, round(w * scale))
        t = F.interpolate(t, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - self.crop_size) // 2, (nw - self.crop_size) // 2
        t = t[..., top:top + self.crop_size, left:left + self.crop_size].clamp(0, 255) / 255.0
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((t - mean) / std)[0]

    def __repr__(self) -> str:
        return f"ResizeCropNormalize(crop_size={self.crop_size}, resize={self.resize}, mean={self.mean}, std={self.std})"


def iter_image_chunks(images: Any, batch_size: int) -> Iterator[Sequence[Any]]:
    """Split image inputs into chunks of at most ``batch_size`` images (no decoding).

    Parameters
    ----------
    images : array, tensor, sequence of image sources, or a single PIL image / path
    batch_size : int

    Yields
    ------
    Chunks (array/tensor slices or lists).

    Raises
    ------
    ValueError
        If there are no images or ``batch_size`` < 1.

    Examples
    --------
    >>> import numpy as np
    >>> [len(c) for c in iter_image_chunks(np.zeros((5, 2, 2, 3), np.uint8), 2)]
    [2, 2, 1]
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(images, (str, os.PathLike, bytes, Image.Image)):
        images = [images]
    elif isinstance(images, (np.ndarray, Tensor)) and images.ndim == 3 and images.shape[-1] in (3, 4) \
            and isinstance(images, np.ndarray):
        images = images[None]  # a single HWC image
    if not isinstance(images, (np.ndarray, Tensor)):
        images = list(images)
    if len(images) == 0:
        raise ValueError("No images given: the input is empty. Pass at least one image.")
    for lo in range(0, len(images), batch_size):
        yield images[lo:lo + batch_size]


def preprocess_images(chunk: Sequence[Any], preprocess: Callable[[Image.Image], Tensor]) -> Tensor:
    """Load each image with :func:`concepts.images.load_image`, convert to PIL, apply ``preprocess``, stack.

    Examples
    --------
    >>> import numpy as np
    >>> preprocess_images(np.zeros((2, 40, 40, 3), np.uint8), ResizeCropNormalize(32)).shape
    torch.Size([2, 3, 32, 32])
    """
    outs = [preprocess(Image.fromarray(load_image(src))) for src in chunk]
    if not all(isinstance(o, Tensor) for o in outs):
        raise TypeError(
            f"preprocess returned {type(outs[0]).__name__}; expected a tensor [C, H, W] per image."
        )
    return torch.stack(outs)


def maybe_normalize(x: Tensor, normalize: bool) -> Tensor:
    """L2-normalise rows when ``normalize`` is True (float32 output)."""
    x = x.float()
    return F.normalize(x, dim=-1) if normalize else x
