"""The ``conceptkit blindspots`` job: options, config files, generators by name, and the end-to-end run.

With no options it runs on the built-in default: a ConceptWorld sample (32-pixel renders and their captions)
as the real set, both built-in generators (``conceptworld-ar`` and ``conceptworld-diffusion``) prompted with
those captions, the built-in CLIP as the encoder (tokens of :data:`~evaluation.blindspots_coder.BUILTIN_LAYER`)
with a TopK SAE trained on the fly on the real tokens; it writes ``reports/blindspots/index.html`` and the
tables (CSV + Parquet). Because ConceptWorld labels are known, the report also maps SAE units to ground-truth
concepts and compares the flags with what the built-in detector reads in the generated images.

Options come from the command line and from ``--config FILE.json`` (the same names, with ``_`` for ``-``);
command-line flags override the file, which overrides :data:`DEFAULTS`.

Generator specs (``--generator``, repeatable):

* ``conceptworld-ar`` / ``ar``, ``conceptworld-diffusion`` / ``diffusion``: the built-in models;
* ``world`` or ``world:suppress=red,stripes;exaggerate=dots@0.6``: the planted-bias ConceptWorld renderer
  (:class:`~evaluation.blindspots_world.WorldGenerator`; ``concept@p`` sets the probability, default 1);
* anything else: a diffusers pipeline or Janus checkpoint (local folder or cached hub id) loaded with
  :func:`concepts.generators.from_pretrained`.

Examples
--------
>>> # conceptkit blindspots                      (built-in default, a few minutes on a laptop CPU)
>>> # conceptkit blindspots --real photos/ --generator /models/sd-1.5 --encoder ViT-B-32:/models/clip.pt --n 2000
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["DEFAULTS", "BUILTIN_GENERATORS", "add_arguments", "resolve_options", "resolve_generator",
           "parse_world_spec", "load_real_folder", "load_generated_folder", "run_blindspots", "run_from_args"]

BUILTIN_GENERATORS: tuple[str, ...] = ("conceptworld-ar", "conceptworld-diffusion")
_ALIASES = {"ar": "conceptworld-ar", "diffusion": "conceptworld-diffusion"}

DEFAULTS: dict[str, Any] = {
    "real": None,
    "generator": None,
    "generated": None,
    "encoder": "builtin",
    "layer": None,
    "tokens": "patch",
    "pooling": "sum",
    "sae": None,
    "n_concepts": 256,
    "top_k": 8,
    "sae_epochs": 20,
    "n": 1000,
    "image_size": 32,
    "seed": 0,
    "device": "cpu",
    "out": "reports/blindspots",
    "offline": True,
    "fdr": 0.05,
    "lambda_min": 0.2,
    "lambda_max": 0.8,
    "min_support": 10,
    "n_bootstrap": 1000,
    "batch_size": 64,
    "steps": None,
    "guidance": None,
    "max_concepts": 12,
    "quiet": False,
}
"""Default value of every option (the keys are also the keys a ``--config`` JSON file may hold)."""


# ---------------------------------------------------------------------------------------------
# argparse
# ---------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the options of ``conceptkit blindspots`` on ``p`` (defaults are resolved later, see
    :func:`resolve_options`, so that a config file can fill what the command line leaves out)."""
    d = DEFAULTS
    p.add_argument("--config", metavar="FILE.json",
                   help="JSON file with any of these options (keys as below with '_' for '-'); flags override it")
    p.add_argument("--real", metavar="DIR",
                   help="folder of real images: images/ plus labels.parquet|labels.csv with 'file' and 'caption' "
                        "columns (an optional 'id' pairs them with --generated folders). Default: a ConceptWorld "
                        "sample rendered on the fly")
    p.add_argument("--generator", action="append", metavar="SPEC",
                   help="generator to prompt with the captions (repeatable): conceptworld-ar | conceptworld-diffusion "
                        "(built-in), world[:suppress=C1,C2;exaggerate=C3@0.6] (planted-bias ConceptWorld renderer), "
                        "or a diffusers pipeline / Janus folder or cached hub id. Default: both built-in generators "
                        "(when no --generated is given)")
    p.add_argument("--generated", action="append", metavar="DIR",
                   help="folder of already generated images (same layout as --real), paired with the real images by "
                        "'id' (or file name); repeatable")
    p.add_argument("--encoder", metavar="SPEC",
                   help=f"builtin (ConceptWorld CLIP), an open_clip model NAME[:PRETRAINED] (tag in the local cache or "
                        f"a checkpoint file), or dinov2[:PATH] (default {d['encoder']})")
    p.add_argument("--layer", help="encoder layer whose tokens are encoded (default: builtin visual.layer3; "
                                   "the last block of a ViT; layernorm of DINOv2)")
    p.add_argument("--tokens", choices=["patch", "all", "cls"], help=f"token types pooled (default {d['tokens']})")
    p.add_argument("--pooling", choices=["sum", "mean", "max"],
                   help=f"pooling of SAE codes over tokens into per-image energies (default {d['pooling']}: "
                        "activation mass, as in the paper)")
    p.add_argument("--sae", metavar="PATH", help="a trained SAE checkpoint folder (sae.load); default: train a TopK "
                                                 "SAE on the real images' tokens")
    p.add_argument("--n-concepts", type=int, help=f"concepts of the SAE trained on the fly (default {d['n_concepts']})")
    p.add_argument("--top-k", type=int, help=f"active concepts per token of that SAE (default {d['top_k']})")
    p.add_argument("--sae-epochs", type=int, help=f"training epochs of that SAE (default {d['sae_epochs']})")
    p.add_argument("--n", type=int, help=f"number of caption pairs (default {d['n']}; with --real, a seeded "
                                         "random subset of that size)")
    p.add_argument("--image-size", type=int, help=f"side of the ConceptWorld renders and planted 'world' generators "
                                                  f"(default {d['image_size']}, the built-in generators' size)")
    p.add_argument("--seed", type=int, help=f"seed of the sample, the generation seeds (seed + i), the SAE, the "
                                            f"bootstrap and the permutations (default {d['seed']})")
    p.add_argument("--device", help=f"cpu, cuda, mps or auto (default {d['device']})")
    p.add_argument("--out", metavar="DIR", help=f"output folder (default {d['out']})")
    p.add_argument("--offline", dest="offline", action="store_true", default=None,
                   help="never contact a model hub (default: on)")
    p.add_argument("--online", dest="offline", action="store_false",
                   help="do not force offline mode (hub access then follows HF_HUB_OFFLINE)")
    p.add_argument("--fdr", type=float, help=f"Benjamini-Hochberg false discovery rate (default {d['fdr']})")
    p.add_argument("--lambda-min", type=float, help=f"delta below which a significant concept is suppressed "
                                                    f"(default {d['lambda_min']})")
    p.add_argument("--lambda-max", type=float, help=f"delta above which a significant concept is exaggerated "
                                                    f"(default {d['lambda_max']})")
    p.add_argument("--min-support", type=int, help=f"pairs a concept must fire in to be tested "
                                                   f"(default {d['min_support']})")
    p.add_argument("--n-bootstrap", type=int, help=f"paired-bootstrap resamples (default {d['n_bootstrap']})")
    p.add_argument("--batch-size", type=int, help=f"captions per generator call (default {d['batch_size']})")
    p.add_argument("--steps", type=int, help="denoising steps of diffusion generators (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--max-concepts", type=int, help=f"flagged concepts per generator shown with image strips "
                                                    f"(default {d['max_concepts']})")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bars")
    return p


def resolve_options(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """Merge command-line values over the ``--config`` file over :data:`DEFAULTS`.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing or malformed config file, unknown keys.

    Examples
    --------
    >>> resolve_options({"n": 50})["n"], resolve_options({})["encoder"]
    (50, 'builtin')
    """
    given = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    config_path = given.pop("config", None)
    cfg: dict[str, Any] = {}
    if config_path:
        path = Path(config_path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist; pass a JSON file with option names as keys.")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
        if not isinstance(cfg, dict):
            raise ValueError(f"config file {path} must hold a JSON object of options, got {type(cfg).__name__}.")
        cfg = {k.replace("-", "_"): v for k, v in cfg.items()}
        unknown = sorted(set(cfg) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"config file {path} has unknown option(s) {unknown}; known options: {sorted(DEFAULTS)}.")
    opts = dict(DEFAULTS)
    opts.update(cfg)
    opts.update({k: v for k, v in given.items() if k in DEFAULTS and v is not None})
    for key in ("generator", "generated"):
        if isinstance(opts[key], str):
            opts[key] = [opts[key]]
    return opts


# ---------------------------------------------------------------------------------------------
# generators and folders
# ---------------------------------------------------------------------------------------------
def parse_world_spec(spec: str) -> dict[str, dict[str, float]]:
    """Parse ``"world[:suppress=C1,C2@p;exaggerate=C3@p]"`` into :class:`WorldGenerator` keyword arguments.

    Examples
    --------
    >>> parse_world_spec("world:suppress=red,blue star@0.5;exaggerate=dots@0.6")
    {'suppress': {'red': 1.0, 'blue star': 0.5}, 'exaggerate': {'dots': 0.6}}
    """
    head, _, rest = spec.partition(":")
    if head != "world":
        raise ValueError(f"a world generator spec starts with 'world', got {spec!r}.")
    out: dict[str, dict[str, float]] = {}
    for part in filter(None, (x.strip() for x in rest.split(";"))):
        key, eq, items = part.partition("=")
        key = key.strip()
        if not eq or key not in ("suppress", "exaggerate"):
            raise ValueError(
                f"cannot read {part!r} in generator spec {spec!r}; expected suppress=CONCEPT[@P],... or "
                "exaggerate=CONCEPT[@P],... separated by ';'."
            )
        for item in filter(None, (x.strip() for x in items.split(","))):
            concept, at, prob = item.partition("@")
            try:
                p = float(prob) if at else 1.0
            except ValueError as exc:
                raise ValueError(f"probability {prob!r} of {concept!r} in {spec!r} is not a number.") from exc
            out.setdefault(key, {})[concept.strip()] = p
    return out


def resolve_generator(spec: str, *, device: str = "cpu", image_size: int = 32, offline: bool = True) -> Any:
    """A generator object from a ``--generator`` spec (see the module docstring).

    Examples
    --------
    >>> resolve_generator("world:suppress=red").planted
    {'red': 'suppressed'}
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"generator spec must be a non-empty string; got {spec!r}.")
    spec = spec.strip()
    name = _ALIASES.get(spec, spec)
    if name == "world" or name.startswith("world:"):
        from .blindspots_world import WorldGenerator

        return WorldGenerator(image_size=image_size, model_id=spec, **parse_world_spec(name))
    from concepts import zoo

    if name in zoo.available() and zoo.entry(name).kind in ("diffusion", "autoregressive"):
        try:
            return zoo.load(name, device=device)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"the built-in generator {name!r} has no weights in this installation ({exc}); train them with its "
                "zoo training script or pass --generator world / a generator folder."
            ) from exc
    from concepts.generators import from_pretrained

    return from_pretrained(name, device=device, local_files_only=True if offline else None)


def _resize_all(images: list[np.ndarray]) -> np.ndarray:
    if all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    from PIL import Image

    side = int(np.median([min(im.shape[:2]) for im in images]))
    logger.info("images differ in size; resizing all to %dx%d", side, side)
    return np.stack([np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC)) for im in images])


def load_real_folder(folder: str | Path, *, n: int | None = None, seed: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """Read a real-image folder (``images/`` + a label table with ``file`` and ``caption``).

    Returns
    -------
    images : numpy.ndarray
        uint8 ``[n, H, W, 3]`` (resized to a common square size when they differ).
    table : pandas.DataFrame
        The label table rows used (``id`` added from the file names when absent).
    """
    from concepts.images import load_images
    from concepts.world import read_table

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--real folder {folder} does not exist.")
    table = read_table(folder)
    if "caption" not in table.columns:
        raise ValueError(f"{folder}: the label table has no 'caption' column (columns: {list(table.columns)}); the "
                         "captions are the prompts of the generators.")
    if "id" not in table.columns:
        table = table.assign(id=[Path(str(f)).stem for f in table["file"]])
    if n is not None and n < len(table):
        keep = np.sort(np.random.default_rng(seed).choice(len(table), size=n, replace=False))
        table = table.iloc[keep]
    table = table.reset_index(drop=True)
    images, _ = load_images([folder / str(f) for f in table["file"]], stack=False)
    return _resize_all(list(images)), table


def load_generated_folder(folder: str | Path, real_table: pd.DataFrame) -> np.ndarray:
    """Read a folder of generated images and order them like ``real_table`` (matched by ``id``, else file stem).

    Raises
    ------
    ValueError
        When some real image has no generated counterpart.
    """
    from concepts.images import load_images
    from concepts.world import read_table

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--generated folder {folder} does not exist.")
    table = read_table(folder)
    keys = table["id"].astype(str) if "id" in table.columns else table["file"].map(lambda f: Path(str(f)).stem)
    by_key = dict(zip(keys, table["file"]))
    wanted = real_table["id"].astype(str).tolist()
    missing = [k for k in wanted if k not in by_key]
    if missing:
        raise ValueError(
            f"{folder}: no generated image for {len(missing)} of {len(wanted)} real ids (e.g. {missing[:3]}); pair the "
            "folders by an 'id' column (or identical file names)."
        )
    images, _ = load_images([folder / str(by_key[k]) for k in wanted], stack=False)
    return _resize_all(list(images))


# ---------------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------------
def _world_concepts(table: pd.DataFrame) -> pd.DataFrame | None:
    from concepts.world import Vocabulary

    names = Vocabulary().concept_names
    if all(c in table.columns for c in names):
        return table[names].astype(bool).reset_index(drop=True)
    return None


def run_blindspots(**options: Any) -> Path:
    """Run the blindspot job with resolved options (keys of :data:`DEFAULTS`) and write the report.

    Returns
    -------
    pathlib.Path
        ``out/index.html``.

    Raises
    ------
    ValueError
        Invalid options (the message says which and why).
    """
    from concepts.devices import resolve_device

    from .blindspots import find_blindspots
    from .blindspots_coder import ConceptCoder
    from .blindspots_report import write_report
    from .blindspots_world import detector_agreement, detector_comparison, unit_concept_map

    o = {**DEFAULTS, **options}
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known options: {sorted(DEFAULTS)}.")
    for key in ("n", "n_concepts", "top_k", "sae_epochs", "batch_size", "n_bootstrap", "min_support", "image_size"):
        v = o[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be a positive integer; got {v!r}.")
    if o["n"] < 20:
        raise ValueError(f"--n must be at least 20 caption pairs for the statistics to mean anything; got {o['n']}.")
    if o["offline"]:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    progress = not o["quiet"]
    seed = int(o["seed"])
    device = str(resolve_device(o["device"]))
    out = Path(o["out"])

    # real set
    if o["real"]:
        real, table = load_real_folder(o["real"], n=o["n"], seed=seed)
        captions = table["caption"].astype(str).tolist()
        labels = _world_concepts(table)
        source = f"folder {o['real']}"
    else:
        from concepts.world import ConceptWorld

        batch = ConceptWorld(seed=seed, image_size=o["image_size"]).sample(o["n"], seed=seed)
        real, captions, labels = batch.images, list(batch.captions), batch.concepts
        table = pd.DataFrame({"id": [f"{i:06d}" for i in range(len(real))], "caption": captions})
        source = f"ConceptWorld (seed {seed}, {o['image_size']} px)"

    # generators
    specs = list(o["generator"] or [])
    if not specs and not o["generated"]:
        specs = list(BUILTIN_GENERATORS)
    generators = {s: resolve_generator(s, device=device, image_size=o["image_size"], offline=o["offline"])
                  for s in specs}
    generated = {Path(d).name or str(d): load_generated_folder(d, table) for d in (o["generated"] or [])}
    settings = {k: o[k] for k in ("steps", "guidance") if o[k] is not None}

    # lens
    sae = None
    if o["sae"]:
        import sae as sae_pkg

        sae = sae_pkg.load(o["sae"])
    coder = ConceptCoder.from_spec(
        o["encoder"], device=device, layer=o["layer"], tokens=o["tokens"], pooling=o["pooling"], sae=sae,
        n_concepts=o["n_concepts"], top_k=o["top_k"], n_epochs=o["sae_epochs"], random_state=seed, progress=progress)

    analysis = find_blindspots(
        real, captions, generators=generators, generated=generated, coder=coder, seed=seed,
        generation_batch_size=o["batch_size"], generation_settings=settings, progress=progress,
        fdr=o["fdr"], lambda_min=o["lambda_min"], lambda_max=o["lambda_max"], min_support=o["min_support"],
        n_bootstrap=o["n_bootstrap"])

    notes = []
    if labels is not None:
        unit_map = unit_concept_map(analysis.real_energy, labels)
        analysis.extras["unit_map"] = unit_map
        notes.append(f"Ground truth: the real images carry ConceptWorld labels; {int(unit_map['mapped'].sum())} of "
                     f"{len(unit_map)} units predict one concept with AUROC >= 0.9 "
                     f"({unit_map.loc[unit_map['mapped'], 'truth'].nunique()} distinct concepts are visible to the "
                     "SAE).")
        try:
            from concepts import zoo

            detector = zoo.load("conceptworld-detector", device=device)
        except (FileNotFoundError, KeyError) as exc:  # pragma: no cover - detector shipped with the package
            detector = None
            notes.append(f"The ConceptWorld detector is unavailable ({exc}); no detector agreement.")
        if detector is not None:
            analysis.extras["detector"] = {}
            analysis.extras["agreement"] = {}
            for g, imgs in analysis.generated.items():
                det = detector_comparison(detector, analysis.real_images, imgs, fdr=o["fdr"],
                                          lambda_min=o["lambda_min"], lambda_max=o["lambda_max"],
                                          min_support=o["min_support"], n_bootstrap=200, seed=seed)
                analysis.extras["detector"][g] = det
                analysis.extras["agreement"][g] = detector_agreement(analysis.results[g].concepts, unit_map, det)
    analysis.extras["notes"] = notes
    meta = {"real": source, "pairs": len(real), "generators": ", ".join(analysis.results), "seed": seed,
            "device": device, **{f"lens {k}": v for k, v in coder.describe().items()}}
    path = write_report(analysis, out, title="conceptkit blindspots", meta=meta, max_concepts=o["max_concepts"])
    summary = {g: r.summary() for g, r in analysis.results.items()}
    (out / "blindspots_summary.json").write_text(json.dumps(_json(summary | {
        "agreement": {g: {k: v for k, v in d.items() if not isinstance(v, (pd.DataFrame, dict))}
                      for g, d in analysis.extras.get("agreement", {}).items()}}), indent=2))
    return path


def _json(obj: Any) -> Any:
    from .report import json_safe

    return json_safe(obj)


def run_from_args(args: argparse.Namespace) -> Path:
    """Entry of the CLI subcommand: resolve options (flags > config > defaults) and run."""
    return run_blindspots(**resolve_options(args))
