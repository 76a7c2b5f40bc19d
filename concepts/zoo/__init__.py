"""Built-in tiny models trained on ConceptWorld, shipped as safetensors + JSON inside the package.

Examples
--------
>>> from concepts import zoo
>>> "conceptworld-clip" in zoo.available()
True
>>> model, preprocess, tokenizer = zoo.load("conceptworld-clip", device="cpu")
"""
from .registry import ZooEntry, available, entry, load, register

__all__ = ["ZooEntry", "available", "entry", "load", "register"]
