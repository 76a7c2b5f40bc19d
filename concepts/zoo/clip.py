"""The built-in ConceptWorld CLIP: an ``open_clip.CLIP`` dual encoder shipped with the package.

``load_clip(path)`` rebuilds the exact open_clip model from ``config.json``, loads ``model.safetensors``
(checked key by key and against the recorded SHA-256), and returns ``(model, preprocess, tokenizer)``
with the same interface as ``open_clip.create_model_and_transforms`` + ``open_clip.get_tokenizer``:

* ``model.encode_image(x [n, 3, 64, 64] normalised) -> [n, d]``, ``model.encode_text(tokens [n, 32]) -> [n, d]``
  (it *is* an ``open_clip.CLIP``);
* ``preprocess(image) -> FloatTensor [3, 64, 64]`` for a PIL image or a uint8 array ``[H, W, 3]`` (the
  transform open_clip builds for its own models, with a leading array-to-PIL step);
* ``tokenizer(list[str]) -> LongTensor [n, 32]`` (a :class:`~concepts.zoo.tokenizer.WordTokenizer`).

The shipped model has open_clip's ``ModifiedResNet`` image tower (64 px input, width 16, stages
``visual.layer1`` .. ``visual.layer4`` then ``visual.attnpool``) and a 2-layer text transformer (width 64)
over a 50-token word vocabulary; embeddings are 64-dimensional (see :mod:`concepts.zoo.train_clip`).

The shipped folder ``concepts/zoo/weights/conceptworld-clip/`` holds ``config.json`` (architecture,
checksum, training record; its ``quality`` block was added from ``benchmarks/zoo_quality.py``),
``model.safetensors`` (float16), ``tokenizer.json`` and ``preprocess.json``. It is produced by
:mod:`concepts.zoo.train_clip`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import load_state_dict_checked, read_json, require_keys, weights_dir
from .tokenizer import WordTokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "ZooCLIP", "ToRGBImage", "build_clip", "build_preprocess", "fast_normalize", "load_clip",
    "load_conceptworld_clip", "load_builtin_clip_encoder", "CONFIG_FORMAT", "CLIP_NAME",
]

CONFIG_FORMAT = "conceptkit.zoo.clip"
CLIP_NAME = "conceptworld-clip"
_PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")


class ZooCLIP(tuple):
    """``(model, preprocess, tokenizer)`` — unpacks like open_clip's pieces; ``.config`` is the parsed config.json.

    Attributes
    ----------
    model : open_clip.CLIP
    preprocess : torchvision.transforms.Compose
    tokenizer : WordTokenizer
    config : dict
    """

    def __new__(cls, model: nn.Module, preprocess: Any, tokenizer: WordTokenizer, config: dict) -> ZooCLIP:
        obj = super().__new__(cls, (model, preprocess, tokenizer))
        obj.config = config
        return obj

    @property
    def model(self) -> nn.Module:
        return self[0]

    @property
    def preprocess(self) -> Any:
        return self[1]

    @property
    def tokenizer(self) -> WordTokenizer:
        return self[2]

    def __repr__(self) -> str:
        return f"ZooCLIP(model=open_clip.CLIP(embed_dim={self.config['model']['embed_dim']}), tokenizer={self.tokenizer!r})"


class ToRGBImage:
    """Accept a PIL image, a uint8 array ``[H, W, 3]`` / ``[H, W]`` or a uint8 tensor ``[3, H, W]``; return PIL RGB.

    Examples
    --------
    >>> import numpy as np
    >>> ToRGBImage()(np.zeros((4, 4, 3), dtype=np.uint8)).size
    (4, 4)
    """

    def __call__(self, image):
        from PIL import Image

        if isinstance(image, Image.Image):
            return image.convert("RGB") if image.mode != "RGB" else image
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
                raise TypeError(
                    f"expected a uint8 tensor [3, H, W], got dtype {image.dtype} and shape {list(image.shape)}; "
                    "convert float images with (x * 255).round().to(torch.uint8)."
                )
            image = image.permute(1, 2, 0).cpu().numpy()
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
                raise TypeError(
                    f"expected a uint8 array [H, W, 3], got dtype {image.dtype} and shape {list(image.shape)}; "
                    "convert float images in [0, 1] with (x * 255).round().astype(np.uint8)."
                )
            if image.ndim == 3 and image.shape[2] == 1:
                image = image[..., 0]
            return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
        raise TypeError(
            f"expected a PIL image, a uint8 numpy array [H, W, 3] or a uint8 tensor [3, H, W], got {type(image).__name__}."
        )

    def __repr__(self) -> str:
        return "ToRGBImage()"


def build_preprocess(spec: dict, *, source: str = "preprocess spec"):
    """Inference transform from an open_clip ``PreprocessCfg``-style dict (see ``preprocess.json``).

    Returns a ``torchvision.transforms.Compose``: ``ToRGBImage`` then open_clip's own
    ``image_transform(size, is_train=False, ...)`` (resize, centre crop, to tensor, normalise).
    """
    from open_clip import image_transform
    from torchvision.transforms import Compose

    require_keys(spec, _PREPROCESS_KEYS, source=source)
    if spec["mode"] != "RGB":
        raise ValueError(f"{source}: key 'mode' must be 'RGB', got {spec['mode']!r}.")
    for key in ("mean", "std"):
        if not (isinstance(spec[key], list) and len(spec[key]) == 3):
            raise ValueError(f"{source}: key {key!r} must be a list of 3 numbers, got {spec[key]!r}.")
    base = image_transform(
        spec["size"], is_train=False, mean=tuple(spec["mean"]), std=tuple(spec["std"]),
        resize_mode=spec["resize_mode"], interpolation=spec["interpolation"], fill_color=spec["fill_color"],
    )
    return Compose([ToRGBImage(), *base.transforms])


def fast_normalize(images: np.ndarray | torch.Tensor, spec: dict, device: str | torch.device = "cpu") -> torch.Tensor:
    """Batch fast path of :func:`build_preprocess` for uint8 images already at ``spec['size']``.

    ``images`` is uint8 ``[n, H, W, 3]``; returns float ``[n, 3, H, W]`` equal to stacking ``preprocess`` over
    the images (used for training; tested against the PIL path).
    """
    x = torch.as_tensor(np.asarray(images)).to(device)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise TypeError(f"expected uint8 images [n, H, W, 3], got dtype {x.dtype} and shape {list(x.shape)}.")
    size = spec["size"]
    if tuple(x.shape[1:3]) != (size, size):
        raise ValueError(
            f"fast_normalize needs images of {size}x{size}, got {tuple(x.shape[1:3])}; use preprocess for other sizes."
        )
    mean = torch.tensor(spec["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"], device=x.device).view(1, 3, 1, 1)
    return (x.permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def build_clip(model_cfg: dict, *, source: str = "model config") -> nn.Module:
    """Build an (untrained) ``open_clip.CLIP`` from the ``"model"`` block of ``config.json``.

    ``model_cfg`` has ``embed_dim``, ``vision_cfg`` and ``text_cfg`` (dicts of ``CLIPVisionCfg`` /
    ``CLIPTextCfg`` fields) and optionally ``quick_gelu``, ``init_logit_scale``, ``init_logit_bias``.

    Examples
    --------
    >>> m = build_clip({"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "head_width": 16,
    ...     "patch_size": 8, "image_size": 32}, "text_cfg": {"context_length": 8, "vocab_size": 10,
    ...     "width": 16, "heads": 2, "layers": 1}})
    >>> m.encode_text(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 16])
    """
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    require_keys(model_cfg, ("embed_dim", "vision_cfg", "text_cfg"), source=source)
    extra = set(model_cfg) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias"}
    if extra:
        raise ValueError(f"{source}: unknown key {sorted(extra)[0]!r} in the model block.")
    try:
        vision = CLIPVisionCfg(**model_cfg["vision_cfg"])
    except TypeError as err:
        raise ValueError(f"{source}: key 'vision_cfg' is not a valid open_clip CLIPVisionCfg ({err}).") from err
    try:
        text = CLIPTextCfg(**model_cfg["text_cfg"])
    except TypeError as err:
        raise ValueError(f"{source}: key 'text_cfg' is not a valid open_clip CLIPTextCfg ({err}).") from err
    kwargs = {k: model_cfg[k] for k in ("quick_gelu", "init_logit_scale", "init_logit_bias") if k in model_cfg}
    return open_clip.CLIP(embed_dim=int(model_cfg["embed_dim"]), vision_cfg=vision, text_cfg=text, **kwargs)


def load_clip(path: str | Path, device: str | torch.device = "cpu", *, verify_checksum: bool = True) -> ZooCLIP:
    """Load a zoo CLIP folder (``config.json`` + weights + ``tokenizer.json`` + ``preprocess.json``).

    Parameters
    ----------
    path
        The folder written by :mod:`concepts.zoo.train_clip`.
    device
        Where the model is put (it is returned in eval mode).
    verify_checksum
        Compare the weights' SHA-256 with ``config.json['weights']['sha256']``.

    Returns
    -------
    ZooCLIP
        ``(model, preprocess, tokenizer)`` (plus ``.config``); the model is an ``open_clip.CLIP`` in eval mode.

    Raises
    ------
    FileNotFoundError
        A file of the folder is missing.
    ValueError
        A file is corrupt or does not match the config; the message names the file and the key.

    Examples
    --------
    >>> from concepts.zoo.checkpoint import weights_dir
    >>> model, preprocess, tokenizer = load_clip(weights_dir("conceptworld-clip"))
    >>> model.encode_text(tokenizer(["a red shape"])).shape[0]
    1
    """
    from concepts.devices import resolve_device

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: zoo model folder not found (expected config.json and weights inside).")
    cfg_path = folder / "config.json"
    config = read_json(cfg_path)
    src = str(cfg_path)
    require_keys(config, ("format", "model", "weights", "tokenizer", "preprocess"), source=src)
    if config["format"] != CONFIG_FORMAT:
        raise ValueError(f"{src}: key 'format' is {config['format']!r}, expected {CONFIG_FORMAT!r}.")
    require_keys(config["weights"], ("file",), source=f"{src} ['weights']")
    model = build_clip(config["model"], source=f"{src} ['model']")

    tok_path = folder / config["tokenizer"]
    tokenizer = WordTokenizer.from_file(tok_path)
    text_cfg = config["model"]["text_cfg"]
    if tokenizer.vocab_size != text_cfg.get("vocab_size"):
        raise ValueError(
            f"{tok_path}: key 'vocab' has {tokenizer.vocab_size} tokens, but {src} key "
            f"'model.text_cfg.vocab_size' is {text_cfg.get('vocab_size')}; the files do not belong together."
        )
    if tokenizer.context_length != text_cfg.get("context_length"):
        raise ValueError(
            f"{tok_path}: key 'context_length' is {tokenizer.context_length}, but {src} key "
            f"'model.text_cfg.context_length' is {text_cfg.get('context_length')}."
        )
    pre_path = folder / config["preprocess"]
    pre_spec = read_json(pre_path)
    image_size = config["model"]["vision_cfg"].get("image_size")
    if pre_spec.get("size") != image_size:
        raise ValueError(
            f"{pre_path}: key 'size' is {pre_spec.get('size')!r}, but {src} key 'model.vision_cfg.image_size' is "
            f"{image_size!r}."
        )
    preprocess = build_preprocess(pre_spec, source=str(pre_path))

    sha = config["weights"].get("sha256") if verify_checksum else None
    load_state_dict_checked(model, folder / config["weights"]["file"], sha256=sha)
    model = model.to(resolve_device(device)).eval()
    logger.debug("loaded zoo CLIP from %s", folder)
    return ZooCLIP(model, preprocess, tokenizer, config)


def load_conceptworld_clip(device: str | torch.device = "cpu", path: str | Path | None = None) -> ZooCLIP:
    """Registry loader of ``"conceptworld-clip"``: :func:`load_clip` on the shipped folder (or ``path``)."""
    return load_clip(weights_dir(CLIP_NAME) if path is None else path, device=device)


def load_builtin_clip_encoder(device: str | torch.device = "cpu") -> Any:
    """The built-in ``conceptworld-clip`` as a :class:`concepts.encoders.OpenCLIPEncoder` (float32, named
    ``"conceptworld-clip"``): what the blindspot coder, the erasure metrics and the benchmarks encode images with.

    Examples
    --------
    >>> enc = load_builtin_clip_encoder()
    >>> enc.encode_images(np.zeros((2, 32, 32, 3), dtype=np.uint8)).shape[0]
    2
    """
    from concepts.encoders import OpenCLIPEncoder

    model, preprocess, tokenizer = load_conceptworld_clip(device)
    return OpenCLIPEncoder(model.float(), preprocess, tokenizer, device=device, name=CLIP_NAME)
