"""The one image loader of conceptkit: files, bytes, PIL images, numpy arrays and tensors -> RGB uint8.

Every entry point that accepts user images (the extractor, the encoders, the analysis layer) goes
through :func:`load_image` / :func:`load_images`, so all of them handle the same pitfalls:

* transparency (``RGBA``, ``LA``, ``PA``, ``P``/``L``/``RGB`` with a transparency key) is composited
  on a background colour instead of being dropped (Pillow's ``convert("RGB")`` keeps the colour of
  fully transparent pixels);
* 16-bit images (``I;16`` modes, ``uint16`` arrays) are rescaled ``0..65535 -> 0..255`` instead of
  saturating; 32-bit integer ``I`` images holding values above 255 are treated as 16-bit;
* float images (``F`` mode, float arrays/tensors) are expected in ``[0, 1]`` (or in ``value_range``)
  and rescaled instead of turning black;
* EXIF orientation is applied;
* pixel counts are capped: images above ``max_pixels`` are downscaled (JPEGs are decoded at a reduced
  scale), files whose header announces more than ``max_decode_pixels`` are refused before decoding;
* unreadable files are reported by name, raised or counted and skipped (``on_error``).
"""
from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageLoadError",
    "LoadReport",
    "load_image",
    "load_images",
    "images_to_tensor",
    "describe_source",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_DECODE_PIXELS",
]

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor]

#: Images with more pixels than this are downscaled (keeping the aspect ratio) on load.
DEFAULT_MAX_PIXELS: int = 4096 * 4096
#: Files whose header announces more pixels than this are refused (decompression-bomb guard).
DEFAULT_MAX_DECODE_PIXELS: int = 89_478_485  # Pillow's own warning threshold


class ImageLoadError(ValueError):
    """An image could not be read or converted; the message names the source."""

    def __init__(self, message: str, source: str | None = None):
        super().__init__(message)
        self.source = source


@dataclass
class LoadReport:
    """What :func:`load_images` loaded and what it skipped.

    Attributes
    ----------
    n_requested : int
        Number of sources given.
    loaded : list of int
        Positions (in the input) of the images that were loaded, in output order.
    skipped : list of (int, str, str)
        ``(position, source name, reason)`` for every source that could not be loaded.
    """

    n_requested: int
    loaded: list[int] = field(default_factory=list)
    skipped: list[tuple[int, str, str]] = field(default_factory=list)

    @property
    def n_loaded(self) -> int:
        """Number of images loaded."""
        return len(self.loaded)

    @property
    def n_skipped(self) -> int:
        """Number of sources skipped."""
        return len(self.skipped)

    def __str__(self) -> str:
        head = f"loaded {self.n_loaded}/{self.n_requested} images, skipped {self.n_skipped}"
        if not self.skipped:
            return head
        lines = [f"  [{i}] {name}: {reason}" for i, name, reason in self.skipped[:20]]
        if self.n_skipped > 20:
            lines.append(f"  ... and {self.n_skipped - 20} more")
        return head + ":\n" + "\n".join(lines)


def describe_source(src: Any) -> str:
    """Short human-readable name of an image source (file path or type and shape).

    Examples
    --------
    >>> import numpy as np
    >>> describe_source(np.zeros((4, 5, 3), dtype=np.uint8))
    'ndarray[4, 5, 3] uint8'
    """
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    if isinstance(src, np.ndarray):
        return f"ndarray[{', '.join(map(str, src.shape))}] {src.dtype}"
    if isinstance(src, torch.Tensor):
        return f"Tensor[{', '.join(map(str, src.shape))}] {str(src.dtype).replace('torch.', '')}"
    if isinstance(src, Image.Image):
        name = getattr(src, "filename", "") or ""
        return name or f"PIL.Image mode={src.mode} size={src.size}"
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return type(src).__name__


def _background(background: Sequence[int]) -> tuple[int, int, int]:
    try:
        bg = tuple(int(v) for v in background)
    except TypeError as exc:
        raise TypeError(
            f"background must be an (R, G, B) tuple of ints in 0..255, got {background!r}."
        ) from exc
    if len(bg) != 3 or any(not 0 <= v <= 255 for v in bg):
        raise ValueError(f"background must be an (R, G, B) tuple of ints in 0..255, got {background!r}.")
    return bg  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# numpy path
# ---------------------------------------------------------------------------------------------
def _scale_to_uint8(arr: np.ndarray, name: str, value_range: tuple[float, float] | None) -> np.ndarray:
    """Rescale any numeric array to uint8 (float32 in 0..255 before rounding)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return np.rint(arr.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageLoadError(
                f"{name}: integer image values range [{lo}, {hi}]; expected 0..255 (8-bit) or 0..65535 "
                "(16-bit). Convert the image to uint8 or uint16 first.",
                name,
            )
        if hi > 255:  # 16-bit data in a wider integer container
            return np.rint(arr.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float32, copy=False)
        if not np.isfinite(a).all():
            raise ImageLoadError(f"{name}: float image contains NaN or Inf values.", name)
        lo, hi = (0.0, 1.0) if value_range is None else (float(value_range[0]), float(value_range[1]))
        amin, amax = (float(a.min()), float(a.max())) if a.size else (lo, hi)
        tol = 1e-3 * (hi - lo)
        if amin < lo - tol or amax > hi + tol:
            raise ImageLoadError(
                f"{name}: float image values range [{amin:.4g}, {amax:.4g}], outside the expected "
                f"[{lo:g}, {hi:g}]. Pass value_range=(min, max) for other scales (e.g. (0, 255)), "
                "or un-normalise the image first.",
                name,
            )
        scaled = (np.clip(a, lo, hi) - lo) * (255.0 / (hi - lo))
        return np.rint(scaled).astype(np.uint8)
    raise ImageLoadError(f"{name}: unsupported array dtype {arr.dtype}; expected uint8, uint16, bool or float.", name)


def _array_to_rgb(
    arr: np.ndarray,
    name: str,
    background: tuple[int, int, int],
    value_range: tuple[float, float] | None,
    channels_first: bool | None,
) -> np.ndarray:
    if arr.ndim == 3:
        first, last = arr.shape[0], arr.shape[-1]
        cf = channels_first
        if cf is None:
            cf = last not in (1, 2, 3, 4) and first in (1, 2, 3, 4)
        if cf:
            arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise ImageLoadError(
            f"{name}: expected an image array [H, W], [H, W, C] or [C, H, W] with C in 1..4, "
            f"got shape {tuple(arr.shape)}.",
            name,
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageLoadError(f"{name}: image has zero width or height (shape {tuple(arr.shape)}).", name)
    u8 = _scale_to_uint8(arr, name, value_range)
    c = u8.shape[-1]
    if c in (2, 4):  # gray+alpha / RGBA: composite on the background
        color = u8[..., :-1]
        if c == 2:
            color = np.repeat(color, 3, axis=-1)
        alpha = u8[..., -1:].astype(np.float32) / 255.0
        bg = np.asarray(background, dtype=np.float32)
        out = color.astype(np.float32) * alpha + bg * (1.0 - alpha)
        return np.ascontiguousarray(np.rint(out).astype(np.uint8))
    if c == 1:
        return np.ascontiguousarray(np.repeat(u8, 3, axis=-1))
    return np.ascontiguousarray(u8)


# ---------------------------------------------------------------------------------------------
# PIL path
# ---------------------------------------------------------------------------------------------
def _pil_to_rgb(
    im: Image.Image,
    name: str,
    background: tuple[int, int, int],
    value_range: tuple[float, float] | None,
) -> np.ndarray:
    im = ImageOps.exif_transpose(im)  # returns a transposed copy (no-op copy without EXIF)
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if mode == "I":
            arr = arr.astype(np.int64)
        return _array_to_rgb(arr, name, background, None, False)
    if mode == "F":
        return _array_to_rgb(np.asarray(im), name, background, value_range, False)
    has_alpha = "A" in mode or "a" in mode or im.has_transparency_data
    if has_alpha:
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return np.array(Image.alpha_composite(base, rgba).convert("RGB"))
    if mode != "RGB":
        im = im.convert("RGB")
    return np.array(im)


def _target_size(w: int, h: int, max_pixels: int) -> tuple[int, int]:
    scale = math.sqrt(max_pixels / float(w * h))
    return max(1, int(w * scale)), max(1, int(h * scale))


def _open_file(src: Any, name: str, max_pixels: int | None, max_decode_pixels: int | None) -> Image.Image:
    fp = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray)) else src
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(
            f"{name}: refused to decode a possible decompression bomb ({exc}). If the file is "
            "trusted, raise max_decode_pixels.",
            name,
        ) from exc
    except FileNotFoundError as exc:
        raise ImageLoadError(f"{name}: file not found.", name) from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(f"{name}: not a readable image file (unidentified format or garbage bytes).", name) from exc
    except OSError as exc:
        raise ImageLoadError(f"{name}: could not open image ({exc}).", name) from exc
    w, h = im.size
    if max_decode_pixels is not None and w * h > max_decode_pixels:
        im.close()
        raise ImageLoadError(
            f"{name}: image header announces {w}x{h} = {w * h:,} pixels, above max_decode_pixels="
            f"{max_decode_pixels:,}; refusing to decode a possible decompression bomb. If the file is "
            "trusted, raise max_decode_pixels.",
            name,
        )
    if max_pixels is not None and w * h > max_pixels and im.format == "JPEG":
        im.draft("RGB", _target_size(w, h, max_pixels))  # decode at a reduced scale (>= target)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()  # Image.open is lazy: truncation shows up here
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"{name}: could not decode image ({exc}).", name) from exc
    return im


def load_image(
    src: ImageSource,
    *,
    background: Sequence[int] = (255, 255, 255),
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_decode_pixels: int | None = DEFAULT_MAX_DECODE_PIXELS,
    value_range: tuple[float, float] | None = None,
    channels_first: bool | None = None,
) -> np.ndarray:
    """Load one image as an RGB ``uint8`` array ``[H, W, 3]``.

    Parameters
    ----------
    src : path, bytes, PIL.Image, ndarray or Tensor
        A file path, the encoded bytes of a file, a PIL image, or an array/tensor shaped
        ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]`` (C in 1..4; alpha last). Integer arrays are
        8-bit (uint8) or 16-bit (uint16, or values above 255); float arrays are in ``[0, 1]``.
    background : (int, int, int), default white
        Colour that transparent pixels are composited on.
    max_pixels : int or None, default 4096*4096
        Larger images are downscaled to about this many pixels, keeping the aspect ratio.
    max_decode_pixels : int or None, default 89,478,485
        Files whose header announces more pixels are refused before decoding.
    value_range : (float, float), optional
        Value range of float images (default ``(0, 1)``); e.g. ``(0, 255)``.
    channels_first : bool, optional
        Layout of 3-D arrays. Default: tensors are ``[C, H, W]`` when the first dim is 1..4;
        numpy arrays are ``[H, W, C]`` unless only the first dim looks like channels.

    Returns
    -------
    ndarray
        ``uint8 [H, W, 3]``.

    Raises
    ------
    ImageLoadError
        For unreadable, truncated, oversized or malformed images; the message names the source.
    TypeError
        For unsupported source types.

    Examples
    --------
    >>> import numpy as np
    >>> rgba = np.zeros((1, 1, 4), dtype=np.uint8); rgba[..., 0] = 255   # transparent red
    >>> load_image(rgba, background=(0, 255, 0)).tolist()
    [[[0, 255, 0]]]
    >>> load_image(np.full((2, 2), 0.5, dtype=np.float32))[0, 0].tolist()
    [128, 128, 128]
    """
    bg = _background(background)
    name = describe_source(src)
    if isinstance(src, torch.Tensor):
        t = src.detach().cpu()
        if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
            t = t.float()
        cf = channels_first
        if cf is None and t.ndim == 3:
            cf = t.shape[0] in (1, 2, 3, 4)
        out = _array_to_rgb(t.numpy(), name, bg, value_range, cf)
    elif isinstance(src, np.ndarray):
        out = _array_to_rgb(src, name, bg, value_range, channels_first)
    elif isinstance(src, Image.Image):
        out = _pil_to_rgb(src, name, bg, value_range)
    elif isinstance(src, (str, os.PathLike, bytes, bytearray)):
        im = _open_file(src, name, max_pixels, max_decode_pixels)
        try:
            out = _pil_to_rgb(im, name, bg, value_range)
        finally:
            im.close()
    else:
        raise TypeError(
            f"Unsupported image source {type(src).__name__}: expected a file path, bytes, PIL.Image, "
            "numpy array or torch tensor."
        )
    h, w = out.shape[:2]
    if max_pixels is not None and h * w > max_pixels:
        tw, th = _target_size(w, h, max_pixels)
        logger.debug("downscaling %s from %dx%d to %dx%d", name, w, h, tw, th)
        out = np.asarray(Image.fromarray(out).resize((tw, th), Image.Resampling.LANCZOS, reducing_gap=3.0))
    return out


def load_images(
    sources: Sequence[ImageSource] | np.ndarray | torch.Tensor,
    *,
    on_error: Literal["raise", "skip"] = "raise",
    stack: bool = True,
    **kwargs: Any,
) -> tuple[np.ndarray | list[np.ndarray], LoadReport]:
    """Load many images with :func:`load_image`, raising on or skipping unreadable ones.

    Parameters
    ----------
    sources : sequence of image sources, or a batch array/tensor
        A list of paths / PIL images / arrays, a ``uint8 [n, H, W, 3]`` array or a
        ``[n, C, H, W]`` tensor.
    on_error : {"raise", "skip"}, default "raise"
        ``"raise"``: the first unreadable image raises :class:`ImageLoadError` naming it.
        ``"skip"``: unreadable images are left out, counted and named in the report (and logged).
    stack : bool, default True
        Return one ``[n, H, W, 3]`` array when all images share a size (otherwise a list).
    **kwargs
        Passed to :func:`load_image` (``background``, ``max_pixels``, ...).

    Returns
    -------
    images : ndarray ``uint8 [n, H, W, 3]`` or list of ``uint8 [H, W, 3]``
    report : LoadReport
        Which inputs were loaded (``report.loaded``) and which were skipped, with reasons.

    Raises
    ------
    ImageLoadError
        With ``on_error="raise"``, for the first unreadable image.
    ValueError
        For an unknown ``on_error`` or an empty input.

    Examples
    --------
    >>> import numpy as np
    >>> imgs, report = load_images([np.zeros((4, 4, 3), np.uint8), b"not an image"], on_error="skip")
    >>> imgs.shape, report.n_skipped
    ((1, 4, 4, 3), 1)
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    if isinstance(sources, (np.ndarray, torch.Tensor)):
        if sources.ndim not in (3, 4):
            raise ValueError(
                f"A batch of images must be 3-D [n, H, W] or 4-D [n, H, W, C] / [n, C, H, W], "
                f"got shape {tuple(sources.shape)}."
            )
        if isinstance(sources, np.ndarray) and sources.ndim == 4 and sources.dtype == np.uint8 and sources.shape[-1] == 3:
            if len(sources) == 0:
                raise ValueError("No images given: the input batch is empty.")
            return np.ascontiguousarray(sources), LoadReport(len(sources), loaded=list(range(len(sources))))
        items: Sequence[Any] = list(sources)
    elif isinstance(sources, (str, os.PathLike, bytes, Image.Image)):
        items = [sources]
    else:
        items = list(sources)
    if len(items) == 0:
        raise ValueError("No images given: the input is empty. Pass at least one image.")
    report = LoadReport(n_requested=len(items))
    out: list[np.ndarray] = []
    for i, src in enumerate(items):
        try:
            out.append(load_image(src, **kwargs))
        except ImageLoadError as exc:
            if on_error == "raise":
                raise
            report.skipped.append((i, describe_source(src), str(exc)))
            continue
        report.loaded.append(i)
    if report.skipped:
        logger.warning("%s", report)
    if stack and out and all(a.shape == out[0].shape for a in out):
        return np.stack(out), report
    if stack and not out:
        return np.zeros((0, 0, 0, 3), dtype=np.uint8), report
    return out, report


def images_to_tensor(
    images: Sequence[ImageSource] | np.ndarray | torch.Tensor,
    *,
    size: int | tuple[int, int] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Load images and return a float tensor ``[n, 3, H, W]`` in ``[0, 1]``.

    Parameters
    ----------
    images : sequence of image sources, or a batch array/tensor
        Anything :func:`load_images` accepts.
    size : int or (int, int), optional
        Resize every image to ``(size, size)`` / ``(H, W)`` (bilinear, antialiased). Required when
        the images differ in size.
    **kwargs
        Passed to :func:`load_images` / :func:`load_image`.

    Returns
    -------
    Tensor
        ``float32 [n, 3, H, W]`` in ``[0, 1]``.

    Raises
    ------
    ValueError
        When images differ in size and ``size`` is None.

    Examples
    --------
    >>> import numpy as np
    >>> images_to_tensor(np.full((2, 8, 8, 3), 255, np.uint8), size=4).shape
    torch.Size([2, 3, 4, 4])
    """
    arrs, _ = load_images(images, stack=False, **kwargs)
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in arrs]
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        tensors = [
            t if tuple(t.shape[1:]) == hw else
            torch.nn.functional.interpolate(
                t[None].float(), size=hw, mode="bilinear", antialias=True, align_corners=False
            )[0].round().clamp(0, 255).to(torch.uint8)
            for t in tensors
        ]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(
            f"Images have different sizes {sorted(s[1:] for s in shapes)[:4]}...; pass size=(H, W) "
            "to resize them, or a preprocess transform."
        )
    return torch.stack(tensors).float().div_(255.0)
