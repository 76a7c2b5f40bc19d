"""Encoders: adapters that turn images (and texts) into feature vectors.

* :class:`OpenCLIPEncoder` — any open_clip model (``create_model_and_transforms`` name with a
  ``pretrained=`` tag, a local checkpoint file, or random weights); images and texts.
* :class:`DINOv2Encoder` / :class:`TransformersVisionEncoder` — transformers vision backbones
  (``Dinov2Model``, ``Dinov2WithRegistersModel``, ...), with cls / register / patch token types.
* :class:`CallableEncoder` — any callable or ``nn.Module`` (torchvision, timm, your own).

All follow the :class:`Encoder` protocol and load images through :mod:`concepts.images`.
"""
from .base import Encoder, ResizeCropNormalize
from .generic import CallableEncoder
from .openclip import OpenCLIPEncoder
from .transformers_vision import DINOv2Encoder, HFProcessorTransform, TransformersVisionEncoder

__all__ = [
    "Encoder",
    "OpenCLIPEncoder",
    "DINOv2Encoder",
    "TransformersVisionEncoder",
    "CallableEncoder",
    "HFProcessorTransform",
    "ResizeCropNormalize",
]
