"""A torch ``Dataset`` view of ConceptWorld that renders images lazily, one index at a time."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .captions import caption


class ConceptWorldDataset(Dataset):
    """Item ``i`` equals image ``start + i`` of ``world.sample(n, seed)``, rendered on demand.

    Parameters
    ----------
    world
        The :class:`~concepts.world.ConceptWorld`.
    n
        Number of items.
    seed
        Sample seed.
    start
        Index of the first image.
    transform
        Applied to the uint8 image ``[H, W, 3]``; default converts to a float tensor ``[3, H, W]`` in [0, 1].
    target
        ``'label'`` (class index), ``'concepts'`` (float multi-hot ``[n_concepts]``), ``'caption'`` or
        ``'all'`` (a dict with the three).

    Examples
    --------
    >>> from concepts.world import ConceptWorld
    >>> ds = ConceptWorld(seed=0).dataset(10, seed=3)
    >>> x, y = ds[0]
    >>> tuple(x.shape), int(y) == int(ConceptWorld(seed=0).sample(1, seed=3).labels[0])
    ((3, 64, 64), True)
    """

    def __init__(self, world, n: int, seed: int = 0, *, start: int = 0,
                 transform: Callable[[np.ndarray], Any] | None = None, target: str = "label") -> None:
        if target not in ("label", "concepts", "caption", "all"):
            raise ValueError(f"target must be 'label', 'concepts', 'caption' or 'all', got {target!r}.")
        if n < 1:
            raise ValueError(f"n must be a positive number of items, got {n!r}.")
        self.world, self.n, self.seed, self.start = world, int(n), int(seed), int(start)
        self.transform = transform
        self.target = target

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for a ConceptWorldDataset of {self.n} items")
        i = i % self.n
        w = self.world
        image, _, rows, background = w.render_one(self.seed, self.start + i)
        x = self.transform(image) if self.transform else torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        if self.target == "caption":
            return x, caption([(r[3], r[2], r[1]) for r in rows], background)
        present = w._present([r[:4] for r in rows], background)
        multi_hot = torch.zeros(len(w.concept_names))
        multi_hot[[w._col[c] for c in present]] = 1.0
        if self.target == "concepts":
            return x, multi_hot
        import pandas as pd

        from .rules import assign_classes

        label = int(assign_classes(pd.DataFrame(multi_hot.bool().numpy()[None], columns=w.concept_names),
                                   w.rules, w.fallback_class)[0])
        if self.target == "label":
            return x, label
        return x, {"label": label, "concepts": multi_hot,
                   "caption": caption([(r[3], r[2], r[1]) for r in rows], background)}
