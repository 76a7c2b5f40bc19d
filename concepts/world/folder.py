"""Save a ConceptWorld sample to a folder of PNGs plus a label table, and load such folders back.

The layout is the one a user would use for their own images, and the one ``conceptkit`` commands read::

    folder/
      images/000000.png ...        one RGB PNG per image
      masks/000000.png ...         (ConceptWorld only) instance label map: 0 = background, j+1 = object j
      labels.parquet | labels.csv  columns: id, file, caption, label, class_name, background, <concepts...>
      objects.csv                  (ConceptWorld only) one row per object
      world.json                   (ConceptWorld only) class names and the world's configuration

Only ``images/`` and a table with ``file`` and ``caption`` columns are required for user folders.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .world import MAX_OBJECTS, ConceptBatch


def save_folder(batch: ConceptBatch, folder: str | Path, *, world=None, fmt: str = "parquet") -> Path:
    """Write ``batch`` to ``folder`` (created; must be empty or absent).

    Parameters
    ----------
    batch
        A :class:`~concepts.world.ConceptBatch`.
    folder
        Destination folder.
    world
        The world that made the batch; its configuration is recorded in ``world.json``.
    fmt
        ``'parquet'`` or ``'csv'`` for the label table.

    Returns
    -------
    pathlib.Path
        The folder.
    """
    if fmt not in ("parquet", "csv"):
        raise ValueError(f"fmt must be 'parquet' or 'csv', got {fmt!r}.")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty; choose a new folder or empty it first (nothing was written).")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    ids = [f"{i:06d}" for i in range(len(batch))]
    for i, name in enumerate(ids):
        Image.fromarray(batch.images[i]).save(folder / "images" / f"{name}.png")
        label_map = np.zeros(batch.images.shape[1:3], dtype=np.uint8)
        for j in range(MAX_OBJECTS):
            label_map[batch.masks[i, j]] = j + 1
        Image.fromarray(label_map).save(folder / "masks" / f"{name}.png")
    table = batch.to_frame()
    table.insert(0, "file", [f"images/{name}.png" for name in ids])
    table.insert(0, "id", ids)
    if fmt == "parquet":
        table.to_parquet(folder / "labels.parquet", index=False)
    else:
        table.to_csv(folder / "labels.csv", index=False)
    batch.objects.to_csv(folder / "objects.csv", index=False)
    meta = {"class_names": batch.class_names, "concept_names": batch.concept_names,
            "world": world.get_params() if world is not None else None}
    (folder / "world.json").write_text(json.dumps(meta, indent=2))
    return folder


def read_table(folder: str | Path) -> pd.DataFrame:
    """Read the label table of an image folder (``labels.parquet`` or ``labels.csv``)."""
    folder = Path(folder)
    for name, reader in (("labels.parquet", pd.read_parquet), ("labels.csv", pd.read_csv)):
        if (folder / name).exists():
            table = reader(folder / name)
            break
    else:
        raise FileNotFoundError(
            f"{folder} has no labels.parquet or labels.csv; an image folder needs images/ plus a table with "
            "'file' and 'caption' columns."
        )
    if "file" not in table.columns:
        raise ValueError(f"{folder}: the label table has no 'file' column (columns: {list(table.columns)}).")
    if "id" in table.columns:
        table["id"] = table["id"].astype(str).str.zfill(6) if table["id"].dtype != object else table["id"]
    return table


def load_folder(folder: str | Path) -> ConceptBatch:
    """Load a folder written by :func:`save_folder` back into a :class:`~concepts.world.ConceptBatch`."""
    folder = Path(folder)
    table = read_table(folder)
    meta_path = folder / "world.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} is missing: load_folder reads ConceptWorld folders; "
                                "for your own images use concepts.images.load_images on the files.")
    meta = json.loads(meta_path.read_text())
    images = np.stack([np.asarray(Image.open(folder / f).convert("RGB")) for f in table["file"]])
    masks = np.zeros((len(table), MAX_OBJECTS) + images.shape[1:3], dtype=bool)
    for i, f in enumerate(table["file"]):
        mp = folder / "masks" / Path(f).name
        if mp.exists():
            label_map = np.asarray(Image.open(mp))
            for j in range(MAX_OBJECTS):
                masks[i, j] = label_map == j + 1
    concept_names = meta["concept_names"]
    objects_path = folder / "objects.csv"
    objects = pd.read_csv(objects_path) if objects_path.exists() else pd.DataFrame()
    return ConceptBatch(
        images=images,
        concepts=table[concept_names].astype(bool).reset_index(drop=True),
        masks=masks,
        captions=table["caption"].astype(str).tolist(),
        labels=table["label"].to_numpy(dtype=np.int64),
        class_names=list(meta["class_names"]),
        objects=objects,
        backgrounds=table["background"].astype(str).tolist(),
        seeds=np.zeros((len(table), 3), dtype=np.int64),
    )
