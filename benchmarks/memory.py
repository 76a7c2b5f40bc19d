"""Peak memory of extraction and SAE training over a store stream, at 1x and 10x the images.

Each measurement runs in a fresh subprocess, which reports its peak resident set size (``VmHWM``
from ``/proc/self/status``; ``ru_maxrss`` elsewhere). The extraction renders ConceptWorld images
lazily (a map-style Dataset), runs a small conv net, and stores spatial activations (every position
of a conv map is a row, so the store grows ~64 KB per image); the SAE then streams the store with
``fit(store)``. With bounded-memory streaming the peak RSS stays roughly flat while the store grows
10x. ``rss_growth`` is the larger of the two ratios peak(10x) / peak(1x).

Usage::

    .venv/bin/python benchmarks/memory.py              # 200 and 2000 images
    .venv/bin/python benchmarks/memory.py --n 500
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(phase: str, n_images: int, store: Path) -> None:
    import torch
    import torch.nn as nn

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    if phase == "baseline":
        from concepts.extractor import ConceptExtractor  # noqa: F401  (import cost only)
        from sae import TopKSAE  # noqa: F401
    elif phase == "extract":
        from concepts.extractor import ConceptExtractor
        from concepts.world import ConceptWorld

        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=4, padding=1))
        data = ConceptWorld(seed=0, image_size=64).dataset(n_images, seed=0, target="concepts")
        ext = ConceptExtractor(model, ["2"], pooling="spatial", batch_size=32, shard_size=64, progress=False)
        ext.extract(data, store, overwrite=True)
    else:
        from concepts.store import ActivationStore
        from sae import TopKSAE

        st = ActivationStore.open(store)
        TopKSAE(n_concepts=256, top_k=16, batch_size=1024, n_epochs=1, random_state=0).fit(st)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def measure(phase: str, n_images: int, store: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, __file__, "--child", phase, "--n", str(n_images), "--store", str(store)],
                         env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{phase} with {n_images} images failed:\n{res.stderr[-3000:]}")
    return float(json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="images at 1x (10x is 10 times this)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n, Path(args.store))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = measure("baseline", 0, Path(tmp) / "none")
        for n in (args.n, 10 * args.n):
            store = Path(tmp) / f"store-{n}"
            ext = measure("extract", n, store)
            size = sum(p.stat().st_size for p in store.iterdir()) / 2**20
            fit = measure("fit", n, store)
            rows.append((n, size, ext, fit))
    print(f"baseline (imports only): peak RSS {base:.0f} MB")
    print(f"{'images':>8}{'store (MB)':>12}{'extract peak RSS (MB)':>24}{'SAE fit peak RSS (MB)':>24}")
    for n, size, ext, fit in rows:
        print(f"{n:>8}{size:>12.1f}{ext:>24.0f}{fit:>24.0f}")
    (n1, s1, e1, f1), (n10, s10, e10, f10) = rows
    growth = max(e10 / e1, f10 / f1)
    print(f"store grew {s10 / s1:.1f}x; extract RSS grew {e10 / e1:.3f}x, SAE fit RSS grew {f10 / f1:.3f}x")
    print("RESULT " + json.dumps({"rss_growth": round(growth, 3), "extract_rss_growth": round(e10 / e1, 3),
                                  "fit_rss_growth": round(f10 / f1, 3), "store_growth": round(s10 / s1, 2),
                                  "peak_rss_mb_1x": round(max(e1, f1), 1), "peak_rss_mb_10x": round(max(e10, f10), 1),
                                  "baseline_rss_mb": round(base, 1)}))


if __name__ == "__main__":
    main()
