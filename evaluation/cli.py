"""The ``conceptkit`` command.

Each subcommand is a thin layer over the Python API: it parses options, runs one job, prints where the
output is, and exits non-zero with a one-line reason on failure (``--debug`` shows the traceback).

Examples
--------
.. code-block:: bash

    conceptkit demo --out reports/demo
    conceptkit world --n 500 --out data/world
    conceptkit blindspots --out reports/blindspots
    conceptkit audit --out reports/audit --concept red
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("conceptkit")


def _cmd_world(args: argparse.Namespace) -> Path:
    from concepts.world import ConceptWorld, save_folder

    world = ConceptWorld(seed=args.seed, image_size=args.image_size)
    batch = world.sample(args.n, seed=args.seed)
    return save_folder(batch, args.out, world=world, fmt=args.format)


def _cmd_demo(args: argparse.Namespace) -> Path:
    from .demo import run_demo

    return run_demo(out=args.out, n=args.n, seed=args.seed, device=args.device, progress=not args.quiet)


def _cmd_extract(args: argparse.Namespace) -> Path:
    from concepts.distributed import run_extract_job

    layers = [x for x in args.layers.split(",")] if args.layers is not None else None
    return run_extract_job(args.out, n=args.n, images=args.images, model=args.model, layers=layers,
                           pooling=args.pooling, seed=args.seed, image_size=args.image_size,
                           batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
                           resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)


def _cmd_audit(args: argparse.Namespace) -> Path:
    from .audit import audit

    def none(v: str | None) -> str | None:
        return None if v is None or v.strip().lower() in ("", "none") else v

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive integer; got {args.threads}.")
        import torch

        torch.set_num_threads(args.threads)
    gens = [g for g in (args.generator or ["conceptworld-diffusion"]) if none(g) is not None]
    result = audit(args.encoder, none(args.sae), generators=gens, concept=none(args.concept), n=args.n, seed=args.seed,
                   device=args.device, layer=args.layer, n_concepts=args.n_concepts, top_k=args.top_k,
                   sae_epochs=args.sae_epochs, erasure_strength=args.strength, offline=args.offline,
                   progress=not args.quiet)
    return result.save(args.out)


def _cmd_blindspots(args: argparse.Namespace) -> Path:
    from .blindspots_job import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``conceptkit`` (all subcommands)."""
    parser = argparse.ArgumentParser(
        prog="conceptkit",
        description="Concept-based interpretability for PyTorch models (offline; built-in models included).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument("--offline", action="store_true", default=True,
                        help="never contact a model hub (default: on; set HF_HUB_OFFLINE=0 to allow downloads)")

    p = sub.add_parser("demo", parents=[common], help="run the main job on the built-in ConceptWorld and write a report",
                       description="Render ConceptWorld, extract activations from the built-in CLIP into an "
                                   "ActivationStore, measure what they encode, and write an HTML report.")
    p.add_argument("--out", default="reports/demo", help="output folder (default reports/demo)")
    p.add_argument("--n", type=int, default=1024, help="number of ConceptWorld images (default 1024)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("world", parents=[common], help="render a ConceptWorld sample to a folder of PNGs + labels",
                       description="Write images/, masks/, labels.parquet (or .csv), objects.csv and world.json.")
    p.add_argument("--n", type=int, default=500, help="number of images (default 500)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--format", choices=["parquet", "csv"], default="parquet", help="label table format")
    p.add_argument("--out", required=True, help="output folder (must be empty or absent)")
    p.set_defaults(func=_cmd_world)

    p = sub.add_parser("extract", parents=[common], help="extract activations into a sharded ActivationStore "
                       "(runs split over ranks under torchrun)",
                       description="Run a zoo model over ConceptWorld images (or an image folder) and store its "
                                   "activations. Under `torchrun --nproc-per-node N -m evaluation.cli extract ...` "
                                   "each rank extracts a slice into OUT/rank-<r>/ and rank 0 writes the merged "
                                   "index; restart with --resume after a failure.")
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--num-images", "--n", dest="n", type=int, default=1000,
                   help="number of ConceptWorld images (default 1000; under torchrun spell it --num-images)")
    p.add_argument("--images", default=None, help="folder of image files to use instead of ConceptWorld")
    p.add_argument("--image-size", type=int, default=64, help="ConceptWorld image side (default 64)")
    p.add_argument("--model", default="conceptworld-clip", help="zoo model (default conceptworld-clip)")
    p.add_argument("--layers", default=None, help="comma-separated module names ('' = image embedding; default)")
    p.add_argument("--pooling", default="mean", help="pooling of --layers other than '' (default mean)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--shard-size", type=int, default=None, help="images per shard (default: automatic)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:<LOCAL_RANK> per rank under torchrun)")
    p.add_argument("--resume", action="store_true", help="continue this rank's partial sub-store")
    p.add_argument("--overwrite", action="store_true", help="replace existing sub-stores")
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser(
        "audit", parents=[common], help="audit one model and one concept dictionary; write one HTML report",
        description="Discovered concepts (names, exemplars, quality against ConceptWorld labels), blindspots of "
                    "generators, concept importance for a downstream head, and the effect of erasing one concept "
                    "(its delta collapsing, its importance vanishing, the utility cost), in one self-contained "
                    "report. With no options: the built-in CLIP, an SAE trained on the fly, the built-in diffusion "
                    "generator and 'red' erased; writes reports/audit/index.html in a few minutes on a CPU.")
    p.add_argument("--out", default="reports/audit", metavar="DIR",
                   help="output folder: index.html, CSV/Parquet tables, audit.json (default reports/audit)")
    p.add_argument("--n", type=int, default=400, help="number of ConceptWorld renders, at least 60 (default 400)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto (default cpu)")
    p.add_argument("--concept", default="red",
                   help="ConceptWorld colour or shape erased in the first generator, or 'none' (default red)")
    p.add_argument("--generator", action="append", metavar="SPEC",
                   help="generator to audit (repeatable): conceptworld-diffusion | conceptworld-ar (built-in), "
                        "world[:suppress=C;exaggerate=C] (planted), a diffusers pipeline or Janus folder, or 'none' "
                        "(default conceptworld-diffusion)")
    p.add_argument("--encoder", default="builtin", metavar="SPEC",
                   help="builtin (ConceptWorld CLIP), an open_clip NAME[:PRETRAINED] or dinov2[:PATH] (default builtin)")
    p.add_argument("--layer", default=None, help="encoder layer whose tokens the SAE reads (default: per encoder)")
    p.add_argument("--sae", default=None, metavar="PATH",
                   help="trained SAE checkpoint folder (sae.save); default: train a TopK SAE on the renders")
    p.add_argument("--n-concepts", type=int, default=128, help="units of the SAE trained on the fly (default 128)")
    p.add_argument("--top-k", type=int, default=8, help="active units per token of that SAE (default 8)")
    p.add_argument("--sae-epochs", type=int, default=10, help="training epochs of that SAE (default 10)")
    p.add_argument("--strength", type=float, default=None,
                   help="strength of the erasure edit (default: 4 for conceptworld-diffusion, 1.5 for conceptworld-ar, "
                        "2 otherwise)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the built-in models are tiny, and one thread is the fastest "
                        "on a busy CPU; raise it for large real models)")
    p.add_argument("--online", dest="offline", action="store_false",
                   help="do not force offline mode (hub access then follows HF_HUB_OFFLINE)")
    p.set_defaults(func=_cmd_audit)

    from .blindspots_job import add_arguments as _blindspots_arguments

    p = sub.add_parser(
        "blindspots", help="find concepts generators suppress or exaggerate; write an HTML report",
        description="Prompt generators with the captions of real images, encode real and generated images with an "
                    "encoder + sparse autoencoder, and test every concept for suppression / exaggeration (paired "
                    "bootstrap CIs, sign-flip tests, BH-FDR). With no options: ConceptWorld, both built-in "
                    "generators, the built-in CLIP and an SAE trained on the fly; writes reports/blindspots/.")
    _blindspots_arguments(p)
    p.set_defaults(func=_cmd_blindspots)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``conceptkit`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "offline", False):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"
    try:
        out = args.func(args)
    except KeyboardInterrupt:
        print("conceptkit: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one-line reason, traceback on --debug
        if args.debug:
            raise
        print(f"conceptkit {args.command}: error: {exc}", file=sys.stderr)
        return 1
    print(f"conceptkit {args.command}: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
