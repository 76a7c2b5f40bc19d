"""open_clip adapter: any ``create_model_and_transforms`` model, a ``pretrained=`` tag or a local file."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor, nn

from ..devices import resolve_device
from .base import iter_image_chunks, maybe_normalize, preprocess_images

if TYPE_CHECKING:
    from ..extractor import ConceptExtractor

__all__ = ["OpenCLIPEncoder", "encode_image_forward", "encode_text_forward"]

logger = logging.getLogger(__name__)


def encode_image_forward(model: Any, x: Tensor) -> Tensor:
    """``forward_fn`` for :class:`~concepts.extractor.ConceptExtractor`: ``model.encode_image(x)``."""
    return model.encode_image(x)


def encode_text_forward(model: Any, tokens: Tensor) -> Tensor:
    """``forward_fn`` for :class:`~concepts.extractor.ConceptExtractor`: ``model.encode_text(tokens)``."""
    return model.encode_text(tokens)


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt"))


class OpenCLIPEncoder:
    """Image and text encoder around an open_clip model (or anything with ``encode_image``/``encode_text``).

    Parameters
    ----------
    model : object
        An open_clip ``CLIP`` / ``CustomTextCLIP`` / ``CoCa`` or any object with ``encode_image(x)`` and
        ``encode_text(tokens)``. ``nn.Module`` models are moved to ``device`` and put in eval mode.
    preprocess : callable
        Per-image transform (PIL image -> tensor ``[3, H, W]``), e.g. the one returned by
        ``open_clip.create_model_and_transforms``.
    tokenizer : callable
        ``tokenizer(list_of_str) -> LongTensor [n, context_length]``.
    device : str or torch.device, default "cpu"
        ``"auto"`` picks cuda, then mps, then cpu.
    name : str, optional
        Model name recorded in stores made by :meth:`extractor`.

    Attributes
    ----------
    embed_dim : int
        Dimension of the joint embedding space.

    Examples
    --------
    >>> enc = OpenCLIPEncoder.from_pretrained("ViT-B-32", pretrained="/models/vit-b-32.safetensors")  # doctest: +SKIP
    >>> img = enc.encode_images(images)           # [n, 512], unit norm  # doctest: +SKIP
    >>> txt = enc.encode_texts(["a red circle"])  # [1, 512]  # doctest: +SKIP
    >>> (img @ txt.T).shape  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Any,
        preprocess: Callable[[Image.Image], Tensor],
        tokenizer: Callable[[Sequence[str]], Tensor],
        device: str | torch.device = "cpu",
        *,
        name: str | None = None,
    ) -> None:
        for attr in ("encode_image", "encode_text"):
            if not callable(getattr(model, attr, None)):
                raise TypeError(
                    f"model must have an {attr}() method (an open_clip model), got {type(model).__name__}. "
                    "Use CallableEncoder for other models."
                )
        if not callable(preprocess):
            raise TypeError(f"preprocess must be callable (PIL image -> tensor), got {type(preprocess).__name__}.")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable (list of str -> token tensor), got {type(tokenizer).__name__}.")
        self.device = resolve_device(device)
        if isinstance(model, nn.Module):
            model = model.to(self.device).eval()
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self._embed_dim: int | None = self._infer_embed_dim()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name: str,
        pretrained: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> OpenCLIPEncoder:
        """Build an open_clip model by name, with weights from a tag, a local file, or none (random).

        Parameters
        ----------
        name : str
            Any ``open_clip.list_models()`` name, or ``"local-dir:/path"`` (a directory with
            ``open_clip_config.json`` and ``open_clip_model.safetensors``).
        pretrained : str or path, optional
            A pretrained tag (e.g. ``"laion2b_s34b_b79k"``; needs the weights in the local cache, nothing
            is downloaded offline), a local checkpoint file, or None for random initialisation.
        device : str or torch.device, default "cpu"
        **kwargs
            Passed to ``open_clip.create_model_and_transforms`` (``precision``, ``force_image_size``...).

        Returns
        -------
        OpenCLIPEncoder

        Raises
        ------
        FileNotFoundError
            If ``pretrained`` looks like a path but the file does not exist.
        RuntimeError
            If the weights cannot be loaded (unknown tag, not in the cache, incompatible file).

        Examples
        --------
        >>> enc = OpenCLIPEncoder.from_pretrained("ViT-B-32")  # random weights  # doctest: +SKIP
        """
        import open_clip

        dev = resolve_device(device)
        if pretrained is not None:
            pretrained = os.fspath(pretrained)
            if _looks_like_path(pretrained) and not os.path.isfile(pretrained):
                raise FileNotFoundError(
                    f"pretrained={pretrained!r} looks like a file path but no such file exists. Pass an existing "
                    "checkpoint (.safetensors / .pt / .bin), a pretrained tag, or None for random weights."
                )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=dev, **kwargs
            )
        except RuntimeError as exc:
            if pretrained is None:
                raise
            tags: list[str] = []
            try:
                tags = open_clip.list_pretrained_tags_by_model(name)
            except Exception:  # pragma: no cover - name may be a schema
                pass
            raise RuntimeError(
                f"Could not load pretrained weights {pretrained!r} for open_clip model {name!r}: {exc}. "
                f"Known tags for this model: {tags}. Tags need the weights in the local Hugging Face cache "
                "(nothing is downloaded offline); otherwise pass a local checkpoint file as pretrained=... or "
                "a 'local-dir:' model name."
            ) from exc
        tokenizer = open_clip.get_tokenizer(name)
        if pretrained is None:
            label = name
        elif os.path.isfile(pretrained):
            label = f"{name}:{os.path.basename(pretrained)}"
        else:
            label = f"{name}/{pretrained}"
        return cls(model, preprocess, tokenizer, dev, name=label)

    # -- properties -------------------------------------------------------------------------------
    def _infer_embed_dim(self) -> int | None:
        visual = getattr(self.model, "visual", None)
        out = getattr(visual, "output_dim", None)
        if isinstance(out, int):
            return out
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, Tensor) and proj.ndim == 2:
            return int(proj.shape[1])
        return None

    @property
    def embed_dim(self) -> int:
        """Dimension of the joint embedding space."""
        if self._embed_dim is None:
            self._embed_dim = int(self.encode_texts(["a"], normalize=False).shape[1])
        return self._embed_dim

    def __repr__(self) -> str:
        return f"OpenCLIPEncoder({self.name or type(self.model).__name__}, embed_dim={self._embed_dim}, device={self.device})"

    # -- encoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Any, *, batch_size: int = 64, normalize: bool = True) -> Tensor:
        """Encode images into the joint space.

        Parameters
        ----------
        images : uint8 array ``[n, H, W, 3]``, float tensor ``[n, 3, H, W]`` in [0, 1], PIL images or paths
            Converted by :func:`concepts.images.load_image`, then ``preprocess``.
        batch_size : int, default 64
        normalize : bool, default True
            L2-normalise the embeddings.

        Returns
        -------
        Tensor
            ``float32 [n, embed_dim]`` on the CPU.

        Examples
        --------
        >>> enc.encode_images(np.zeros((2, 224, 224, 3), np.uint8)).shape  # doctest: +SKIP
        torch.Size([2, 512])
        """
        dtype = _param_dtype(self.model)
        outs = []
        for chunk in iter_image_chunks(images, batch_size):
            x = preprocess_images(chunk, self.preprocess).to(self.device, dtype=dtype)
            outs.append(maybe_normalize(self.model.encode_image(x), normalize).cpu())
        return torch.cat(outs)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], *, normalize: bool = True, batch_size: int = 256) -> Tensor:
        """Encode texts into the joint space.

        Parameters
        ----------
        texts : sequence of str
        normalize : bool, default True
        batch_size : int, default 256

        Returns
        -------
        Tensor
            ``float32 [n, embed_dim]`` on the CPU.

        Raises
        ------
        TypeError
            If ``texts`` is a single string or contains non-strings.
        ValueError
            If ``texts`` is empty.

        Examples
        --------
        >>> enc.encode_texts(["a red circle", "a blue star"]).shape  # doctest: +SKIP
        torch.Size([2, 512])
        """
        texts = _check_texts(texts)
        outs = []
        for lo in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[lo:lo + batch_size]).to(self.device)
            outs.append(maybe_normalize(self.model.encode_text(tokens), normalize).cpu())
        return torch.cat(outs)

    def extractor(self, layers: str | Sequence[str], **kwargs: Any) -> ConceptExtractor:
        """A :class:`~concepts.extractor.ConceptExtractor` on the image tower with this preprocessing.

        Parameters
        ----------
        layers : str or sequence of str
            Layer names of the full model (e.g. ``"visual.transformer.resblocks.11"``).
        **kwargs
            Passed to ``ConceptExtractor`` (``pooling``, ``batch_size``, ...).

        Examples
        --------
        >>> store = enc.extractor("visual.transformer.resblocks.6", pooling="tokens").extract(images)  # doctest: +SKIP
        """
        from ..extractor import ConceptExtractor

        if not isinstance(self.model, nn.Module):
            raise TypeError("extractor() needs the model to be a torch.nn.Module to register hooks.")
        kwargs.setdefault("preprocess", self.preprocess)
        kwargs.setdefault("forward_fn", encode_image_forward)
        kwargs.setdefault("device", self.device)
        kwargs.setdefault("model_name", self.name)
        return ConceptExtractor(self.model, layers, **kwargs)


def _param_dtype(model: Any) -> torch.dtype:
    if isinstance(model, nn.Module):
        p = next((p for p in model.parameters() if p.is_floating_point()), None)
        if p is not None:
            return p.dtype
    return torch.float32


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, got a single str; wrap it in a list: [text].")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; pass at least one string.")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must all be strings, got {type(bad[0]).__name__} ({bad[0]!r}).")
    return texts
