"""transformers vision-model adapter (DINOv2, DINOv2 with registers, ViT) with cls/register/patch tokens."""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image
from torch import Tensor, nn

from ..devices import resolve_device
from ..store import TOKEN_TYPES
from .base import IMAGENET_MEAN, IMAGENET_STD, ResizeCropNormalize, iter_image_chunks, maybe_normalize, preprocess_images

if TYPE_CHECKING:
    from ..extractor import ConceptExtractor

__all__ = ["TransformersVisionEncoder", "DINOv2Encoder", "HFProcessorTransform", "pixel_values_forward"]

Pooling = Literal["cls", "mean", "cls+mean"]


def pixel_values_forward(model: nn.Module, x: Tensor) -> Any:
    """``forward_fn`` for :class:`~concepts.extractor.ConceptExtractor`: ``model(pixel_values=x)``."""
    return model(pixel_values=x)


class HFProcessorTransform:
    """Wrap a transformers image processor as a per-image transform (PIL image -> ``[3, H, W]``).

    Examples
    --------
    >>> from transformers import BitImageProcessor  # doctest: +SKIP
    >>> HFProcessorTransform(BitImageProcessor())(Image.new("RGB", (64, 64))).shape  # doctest: +SKIP
    torch.Size([3, 224, 224])
    """

    def __init__(self, processor: Any) -> None:
        if not callable(processor):
            raise TypeError(f"processor must be a callable image processor, got {type(processor).__name__}.")
        self.processor = processor

    def __call__(self, image: Image.Image) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFProcessorTransform({type(self.processor).__name__})"


class TransformersVisionEncoder:
    """Image encoder around a transformers vision backbone (``Dinov2Model``, ``Dinov2WithRegistersModel``,
    ``ViTModel``, ...) whose output has ``last_hidden_state [n, 1 + registers + patches, d]``.

    Parameters
    ----------
    model : nn.Module
        A transformers vision model called as ``model(pixel_values=x)``.
    image_processor : transformers image processor or callable, optional
        Default: resize the shorter side to ``image_size * 256 / 224``, center-crop ``image_size``
        (``model.config.image_size``), ImageNet normalisation (DINOv2's recipe).
    device : str or torch.device, default "cpu"
    pooling : {"cls", "mean", "cls+mean"}, default "cls"
        Image embedding: the cls token, the mean of the patch tokens (registers excluded), or both
        concatenated (the DINOv2 linear-probe feature, ``2 d``).
    name : str, optional
        Model name recorded in stores made by :meth:`extractor`.

    Attributes
    ----------
    embed_dim : int
    token_layout : dict
        ``{"cls": 1, "register": R}``: token order of ``last_hidden_state``.

    Examples
    --------
    >>> from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    >>> cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...     intermediate_size=64, patch_size=8, image_size=32, num_register_tokens=4)
    >>> enc = DINOv2Encoder(Dinov2WithRegistersModel(cfg))
    >>> enc.token_layout
    {'cls': 1, 'register': 4}
    """

    def __init__(
        self,
        model: nn.Module,
        image_processor: Any = None,
        device: str | torch.device = "cpu",
        *,
        pooling: Pooling = "cls",
        name: str | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a transformers nn.Module, got {type(model).__name__}.")
        if pooling not in ("cls", "mean", "cls+mean"):
            raise ValueError(f"pooling must be 'cls', 'mean' or 'cls+mean', got {pooling!r}.")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.pooling = pooling
        config = getattr(model, "config", None)
        self.name = name or getattr(config, "_name_or_path", None) or type(model).__name__
        self.token_layout = {"cls": 1, "register": int(getattr(config, "num_register_tokens", 0) or 0)}
        hidden = getattr(config, "hidden_size", None)
        if not isinstance(hidden, int):
            raise TypeError(
                f"{type(model).__name__} has no config.hidden_size; expected a transformers vision model "
                "(e.g. Dinov2Model). Use CallableEncoder for other models."
            )
        self.embed_dim = hidden * (2 if pooling == "cls+mean" else 1)
        if image_processor is None:
            size = getattr(config, "image_size", 224)
            self.preprocess: Callable[[Image.Image], Tensor] = ResizeCropNormalize(
                int(size if isinstance(size, int) else size[0]), mean=IMAGENET_MEAN, std=IMAGENET_STD
            )
        elif hasattr(image_processor, "preprocess") or hasattr(image_processor, "image_mean"):
            self.preprocess = HFProcessorTransform(image_processor)
        elif callable(image_processor):
            self.preprocess = image_processor
        else:
            raise TypeError(f"image_processor must be a transformers image processor or a callable, got "
                            f"{type(image_processor).__name__}.")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        *,
        pooling: Pooling = "cls",
        use_processor: bool = True,
        **kwargs: Any,
    ) -> TransformersVisionEncoder:
        """Load a model (and its image processor) with ``transformers.AutoModel.from_pretrained``.

        Parameters
        ----------
        name_or_path : str or path
            A local directory (``config.json`` + weights) or a hub id already in the local cache.
        device : str or torch.device, default "cpu"
        pooling : {"cls", "mean", "cls+mean"}, default "cls"
        use_processor : bool, default True
            Load the saved image processor (falls back to the default preprocessing if there is none).
        **kwargs
            Passed to ``AutoModel.from_pretrained`` (e.g. ``torch_dtype``).

        Raises
        ------
        RuntimeError
            If the model cannot be loaded (not found locally; nothing is downloaded offline).

        Examples
        --------
        >>> enc = DINOv2Encoder.from_pretrained("/models/dinov2-small")  # doctest: +SKIP
        """
        from transformers import AutoImageProcessor, AutoModel

        try:
            model = AutoModel.from_pretrained(os.fspath(name_or_path), **kwargs)
        except (OSError, ValueError) as exc:
            raise RuntimeError(
                f"Could not load a transformers model from {os.fspath(name_or_path)!r}: {exc}. Pass a local "
                "directory saved with save_pretrained(), or a hub id present in the local cache."
            ) from exc
        processor = None
        if use_processor:
            try:
                processor = AutoImageProcessor.from_pretrained(os.fspath(name_or_path))
            except (OSError, ValueError):
                processor = None
        return cls(model, processor, device, pooling=pooling, name=os.fspath(name_or_path))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}, embed_dim={self.embed_dim}, pooling={self.pooling!r}, "
                f"token_layout={self.token_layout})")

    def _dtype(self) -> torch.dtype:
        p = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    @torch.no_grad()
    def encode_tokens(self, images: Any, *, batch_size: int = 64) -> tuple[Tensor, Tensor]:
        """All output tokens of the last layer, with their types.

        Parameters
        ----------
        images : uint8 array, float tensor in [0, 1], PIL images or paths
        batch_size : int, default 64

        Returns
        -------
        tokens : Tensor
            ``float32 [n, T, d]`` (``last_hidden_state``).
        token_types : Tensor
            ``uint8 [T]`` codes of :data:`concepts.store.TOKEN_TYPES` (cls=0, register=1, patch=2).

        Examples
        --------
        >>> tokens, types = enc.encode_tokens(np.zeros((2, 32, 32, 3), np.uint8))  # doctest: +SKIP
        """
        outs = []
        for chunk in iter_image_chunks(images, batch_size):
            x = preprocess_images(chunk, self.preprocess).to(self.device, dtype=self._dtype())
            outs.append(self.model(pixel_values=x).last_hidden_state.float().cpu())
        tokens = torch.cat(outs)
        n_tok = tokens.shape[1]
        types = torch.full((n_tok,), TOKEN_TYPES["patch"], dtype=torch.uint8)
        types[0] = TOKEN_TYPES["cls"]
        types[1:1 + self.token_layout["register"]] = TOKEN_TYPES["register"]
        return tokens, types

    def encode_images(self, images: Any, *, batch_size: int = 64, normalize: bool = True) -> Tensor:
        """Image embeddings ``float32 [n, embed_dim]`` (cls token, patch mean, or both; see ``pooling``).

        Examples
        --------
        >>> enc.encode_images(np.zeros((2, 32, 32, 3), np.uint8)).shape  # doctest: +SKIP
        torch.Size([2, 32])
        """
        tokens, _ = self.encode_tokens(images, batch_size=batch_size)
        n_prefix = 1 + self.token_layout["register"]
        cls_tok = tokens[:, 0]
        mean_tok = tokens[:, n_prefix:].mean(dim=1)
        feats = {"cls": cls_tok, "mean": mean_tok, "cls+mean": torch.cat([cls_tok, mean_tok], dim=1)}[self.pooling]
        return maybe_normalize(feats, normalize)

    def encode_texts(self, texts: Sequence[str], *, normalize: bool = True) -> Tensor:
        """Not available: this is an image-only model.

        Raises
        ------
        NotImplementedError
            Always; pair the image features with a text encoder (e.g. :class:`OpenCLIPEncoder`) instead.
        """
        raise NotImplementedError(
            f"{type(self.model).__name__} is an image-only model and cannot encode texts. Use an "
            "OpenCLIPEncoder (or another text encoder) for texts."
        )

    def extractor(self, layers: str | Sequence[str], **kwargs: Any) -> ConceptExtractor:
        """A :class:`~concepts.extractor.ConceptExtractor` with this preprocessing and token layout.

        Examples
        --------
        >>> store = enc.extractor("encoder.layer.11", pooling="tokens").extract(images)  # doctest: +SKIP
        """
        from ..extractor import ConceptExtractor

        kwargs.setdefault("preprocess", self.preprocess)
        kwargs.setdefault("forward_fn", pixel_values_forward)
        kwargs.setdefault("device", self.device)
        kwargs.setdefault("token_layout", dict(self.token_layout))
        kwargs.setdefault("model_name", self.name)
        return ConceptExtractor(self.model, layers, **kwargs)


class DINOv2Encoder(TransformersVisionEncoder):
    """:class:`TransformersVisionEncoder` for ``Dinov2Model`` / ``Dinov2WithRegistersModel`` (cls pooling)."""
