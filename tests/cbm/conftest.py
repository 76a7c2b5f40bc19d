"""Fixtures for the cbm tests.

* ``planted``: ConceptWorld concept labels turned into features with a *planted* linear structure
  (``X = C @ A + noise``) and a text encoder that embeds every ConceptWorld concept phrase as its planted
  direction: the truth of every concept score is known exactly. Cheap (no image encoder).
* ``cw``: the built-in ConceptWorld CLIP on real ConceptWorld images (features cached once per session);
  skipped while the zoo weights are not shipped.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from concepts.vocabularies import conceptworld_vocabulary
from concepts.world import DEFAULT_RULES, ConceptWorld

from cbm_testing import RULE_CONCEPTS  # noqa: E402,F401  (re-exported for fixtures)


@pytest.fixture(autouse=True)
def _one_thread(_torch_threads):
    """The heads' tensors are tiny: one thread avoids oversubscription stalls on a shared machine."""
    torch.set_num_threads(1)


@dataclass
class Split:
    X: np.ndarray
    y: np.ndarray
    concepts: pd.DataFrame
    images: np.ndarray | None = None


@dataclass
class Planted:
    train: Split
    test: Split
    class_names: list[str]
    directions: np.ndarray  # [n_concepts, d]
    names: list[str]
    encoder: object


class PlantedTextEncoder:
    """Embeds ConceptWorld concept names/phrases as their planted directions; other texts as a seeded hash."""

    def __init__(self, directions: np.ndarray, names: list[str]):
        vocab = conceptworld_vocabulary()
        self._table = {}
        for name, phrase in zip(vocab.names, vocab.phrases):
            self._table[name] = self._table[phrase] = directions[names.index(name)]
        self.dim = directions.shape[1]
        self.calls = 0

    def encode_texts(self, texts, normalize=True):
        self.calls += 1
        out = []
        for t in texts:
            if t in self._table:
                v = self._table[t]
            else:
                seed = zlib.crc32(t.encode())
                v = np.random.default_rng(seed).normal(size=self.dim)
            out.append(v)
        x = torch.tensor(np.array(out), dtype=torch.float32)
        return torch.nn.functional.normalize(x, dim=1) if normalize else x


def _split(world: ConceptWorld, n: int, seed: int, A: np.ndarray, noise: float) -> Split:
    b = world.sample(n, seed=seed)
    rng = np.random.default_rng(seed + 100)
    X = b.concepts.to_numpy(np.float64) @ A + rng.normal(scale=noise, size=(n, A.shape[1]))
    return Split(X.astype(np.float32), b.labels, b.concepts)


@pytest.fixture(scope="session")
def planted() -> Planted:
    torch.set_num_threads(1)  # session fixtures run before the per-test thread setting
    world = ConceptWorld(seed=0, image_size=32)
    names = list(world.concept_names)
    rng = np.random.default_rng(0)
    A = rng.normal(size=(len(names), 64))
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    train = _split(world, 1500, 1, A, 0.15)
    test = _split(world, 600, 2, A, 0.15)
    return Planted(train, test, list(world.sample(1, seed=0).class_names), A, names, PlantedTextEncoder(A, names))


@dataclass
class CW:
    train: Split
    test: Split
    class_names: list[str]
    encoder: object


@pytest.fixture(scope="session")
def cw() -> CW:
    """Built-in CLIP features of 3,000 training and 800 test ConceptWorld images."""
    torch.set_num_threads(1)
    from concepts.encoders import OpenCLIPEncoder
    from concepts.zoo import load

    folder = os.environ.get("CONCEPTKIT_TEST_CLIP")  # another CLIP folder (development of the zoo model)
    try:
        if folder:
            from concepts.zoo.clip import load_clip

            model, preprocess, tokenizer = load_clip(folder)
        else:
            model, preprocess, tokenizer = load("conceptworld-clip")
    except (FileNotFoundError, ValueError) as exc:  # weights not shipped yet
        pytest.skip(f"conceptworld-clip weights are not available: {exc}")
    enc = OpenCLIPEncoder(model, preprocess, tokenizer, name="conceptworld-clip")
    world = ConceptWorld(seed=0)
    out = []
    for n, seed in ((3000, 1), (800, 2)):
        b = world.sample(n, seed=seed)
        X = enc.encode_images(b.images, batch_size=256).numpy()
        out.append(Split(X, b.labels, b.concepts, b.images))
    return CW(out[0], out[1], list(b.class_names), enc)
