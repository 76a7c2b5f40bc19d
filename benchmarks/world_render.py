"""ConceptWorld rendering throughput on one core (target: >= 2,000 64x64 images per second).

Run: ``.venv/bin/python benchmarks/world_render.py``
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from concepts.world import ConceptWorld


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for size in (32, 64, 128):
        world = ConceptWorld(seed=0, image_size=size)
        world.sample(50, seed=0)  # warm caches
        times = []
        for rep in range(5):
            t0 = time.perf_counter()
            world.sample(2000, seed=rep)
            times.append(time.perf_counter() - t0)
        rows.append((size, 2000 / statistics.median(times)))
    print(f"{'image size':>10} | {'images/s (median of 5)':>22}")
    for size, ips in rows:
        print(f"{size:>10} | {ips:>22.0f}")
    result = {f"images_per_second_{s}": round(v, 1) for s, v in rows}
    result["images_per_second"] = result["images_per_second_64"]
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
