"""Data-parallel SAE training and sharded extraction: 2 gloo CPU processes vs 1 process.

Runs each configuration in fresh subprocesses with torchrun's environment variables (loopback
rendezvous), times the training / extraction inside the workers (imports excluded), and compares
the 2-process SAE with the single-process one trained on the same global batches and seed.

Usage::

    .venv/bin/python benchmarks/distributed.py            # default sizes
    .venv/bin/python benchmarks/distributed.py --n 65536

The machine may be shared: the table prints the 1-minute load average next to the timings.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(out: Path, n: int, d: int, n_concepts: int, n_images: int) -> None:
    import torch
    import torch.nn as nn
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO))
    from concepts.distributed import extract_distributed, init_distributed
    from concepts.extractor import ConceptExtractor
    from concepts.world import ConceptWorld
    from sae import TopKSAE
    from sae.distributed import fit_distributed
    from sae.synthetic import sparse_dictionary_data

    torch.set_num_threads(1)
    info = init_distributed("gloo")
    X = sparse_dictionary_data(n=n, d=d, n_atoms=4 * d, k=8, seed=0).X
    sae = TopKSAE(n_concepts=n_concepts, top_k=16, batch_size=1024, n_epochs=1, random_state=0)
    TopKSAE(n_concepts=32, top_k=4, batch_size=64, random_state=0).fit(X[:256])  # one-off first-fit warm-up
    if info.initialized:
        torch.distributed.barrier()
    t = time.perf_counter()
    fit_distributed(sae, X)
    t_fit = time.perf_counter() - t

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(1024, 128))
    ext = ConceptExtractor(model, ["3", "6"], batch_size=64, shard_size=256, progress=False)
    data = ConceptWorld(seed=0, image_size=64).dataset(n_images, seed=0, target="concepts")
    if info.initialized:
        torch.distributed.barrier()
    t = time.perf_counter()
    extract_distributed(ext, data, out / f"store-{info.world_size}", overwrite=True)
    t_ext = time.perf_counter() - t
    if info.rank == 0:
        save_file({"dictionary": sae.dictionary_.contiguous()}, str(out / f"sae-{info.world_size}.safetensors"))
        (out / f"times-{info.world_size}.json").write_text(json.dumps({"fit_s": t_fit, "extract_s": t_ext}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nprocs: int, out: Path, args: argparse.Namespace) -> None:
    port = _free_port()
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1",
                   PYTHONPATH=str(REPO))
        if nprocs == 1:
            for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
                env.pop(k)
        cmd = [sys.executable, __file__, "--worker", str(out), "--n", str(args.n), "--d", str(args.d),
               "--n-concepts", str(args.n_concepts), "--n-images", str(args.n_images)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO))
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"worker failed with exit code {p.returncode}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32768, help="SAE training rows")
    ap.add_argument("--d", type=int, default=128, help="feature dimension")
    ap.add_argument("--n-concepts", type=int, default=1024)
    ap.add_argument("--n-images", type=int, default=1024, help="ConceptWorld images to extract")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(Path(args.worker), args.n, args.d, args.n_concepts, args.n_images)
        return
    import torch
    from safetensors.torch import load_file

    from concepts.store import ActivationStore

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        load = [os.getloadavg()[0]]
        launch(1, out, args)
        load.append(os.getloadavg()[0])
        launch(2, out, args)
        load.append(os.getloadavg()[0])
        t1, t2 = (json.loads((out / f"times-{w}.json").read_text()) for w in (1, 2))
        d1, d2 = (load_file(str(out / f"sae-{w}.safetensors"))["dictionary"] for w in (1, 2))
        max_diff = float((d1 - d2).abs().max())
        s1, s2 = ActivationStore.open(out / "store-1"), ActivationStore.open(out / "store-2")
        store_diff = max(float((s1.read(layer) - s2.read(layer)).abs().max()) for layer in s1.layers)
    speedup = t1["fit_s"] / t2["fit_s"]
    ext_speedup = t1["extract_s"] / t2["extract_s"]
    print(f"cores: {os.cpu_count()}   1-min load average before/between/after: "
          + " / ".join(f"{x:.1f}" for x in load))
    print(f"{'job':<34}{'1 process (s)':>15}{'2 processes (s)':>17}{'speedup':>9}")
    print(f"{'TopKSAE fit ' + str(args.n) + 'x' + str(args.d) + ', 1 epoch':<34}{t1['fit_s']:>15.2f}"
          f"{t2['fit_s']:>17.2f}{speedup:>9.2f}")
    print(f"{'extract ' + str(args.n_images) + ' ConceptWorld images':<34}{t1['extract_s']:>15.2f}"
          f"{t2['extract_s']:>17.2f}{ext_speedup:>9.2f}")
    print(f"max |dictionary(2 procs) - dictionary(1 proc)| = {max_diff:.2e}")
    print(f"max |merged store - single store| = {store_diff:.2e}")
    print("RESULT " + json.dumps({"speedup": round(speedup, 3), "extract_speedup": round(ext_speedup, 3),
                                  "max_diff": max_diff, "store_max_diff": store_diff,
                                  "load_avg": round(max(load), 2), "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
