"""Overhead of ConceptExtractor (hooks + pooling + checks + writing shards) over a bare forward pass.

Runs a randomly initialised torchvision ResNet-18 over the same batches of 64x64 images twice:
once as a bare ``model(x)`` loop under ``torch.no_grad()``, once through
``ConceptExtractor(...).extract(..., store_path=tmp)`` recording three layers (``layer3`` mean,
``layer4`` spatial, ``avgpool`` mean) into safetensors shards on disk. Repeats are interleaved and
the medians compared. Target: ``overhead_ratio <= 1.10``.

Usage::

    .venv/bin/python benchmarks/extract_overhead.py [--images 2048] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision  # noqa: E402

from concepts.extractor import ConceptExtractor  # noqa: E402


def timed(fn, *args) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds over all threads, result)."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0, out


def bare(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> None:
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])


def extract(model: torch.nn.Module, x: torch.Tensor, batch_size: int, path: str | None) -> int:
    ext = ConceptExtractor(model, ["layer3", "layer4", "avgpool"],
                           pooling={"layer3": "mean", "layer4": "spatial", "avgpool": "mean"},
                           batch_size=batch_size, shard_size=512, progress=False)
    store = ext.extract(x, path, overwrite=True)
    return sum(f["bytes"] for s in store.shards for f in s["files"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))

    bare(model, x[: 4 * args.batch_size], args.batch_size)  # warm-up
    modes = ["bare forward", "ConceptExtractor -> disk (safetensors)", "ConceptExtractor -> memory"]
    wall: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    nbytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            modes[0]: lambda: bare(model, x, args.batch_size),
            modes[1]: lambda: extract(model, x, args.batch_size, os.path.join(tmp, "store")),
            modes[2]: lambda: extract(model, x, args.batch_size, None),
        }
        for r in range(args.repeats):
            order = modes[r % 3:] + modes[: r % 3]  # rotate the order to cancel drift in machine load
            for m in order:
                w, c, out = timed(runs[m])
                wall[m].append(w)
                cpu[m].append(c)
                if m == modes[1]:
                    nbytes = int(out)  # type: ignore[arg-type]
            print(f"repeat {r}: " + "  ".join(f"{m.split(' (')[0]} {wall[m][-1]:.2f}s" for m in modes), flush=True)

    med = {m: statistics.median(wall[m]) for m in modes}
    medc = {m: statistics.median(cpu[m]) for m in modes}
    mb = med[modes[0]]
    print()
    print(f"ResNet-18 (random init), {args.images} images {args.size}x{args.size}, batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.repeats} repeats; store {nbytes / 2**20:.1f} MiB")
    print(f"{'mode':<40}{'wall s':>9}{'img/s':>8}{'ratio':>8}{'cpu s':>9}{'cpu ratio':>11}")
    for m in modes:
        print(f"{m:<40}{med[m]:>9.2f}{args.images / med[m]:>8.0f}{med[m] / mb:>8.3f}"
              f"{medc[m]:>9.2f}{medc[m] / medc[modes[0]]:>11.3f}")
    ratio = med[modes[1]] / mb
    print(f"target overhead_ratio <= 1.10 (wall, median): {'met' if ratio <= 1.10 else 'NOT met'}")
    print("RESULT " + json.dumps({
        "overhead_ratio": round(ratio, 4),
        "overhead_ratio_memory": round(med[modes[2]] / mb, 4),
        "cpu_time_ratio": round(medc[modes[1]] / medc[modes[0]], 4),
        "bare_s": round(mb, 3),
        "extract_s": round(med[modes[1]], 3),
        "images": args.images,
        "store_mib": round(nbytes / 2**20, 2),
    }))


if __name__ == "__main__":
    main()
