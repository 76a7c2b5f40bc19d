"""Sharded extraction over ranks: the merged store equals a single-process extraction."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from concepts.distributed import (
    dist_info,
    extract_distributed,
    init_distributed,
    merge_rank_stores,
    rank_range,
    rank_store_path,
)
from concepts.extractor import ConceptExtractor
from concepts.store import ActivationStore, StoreError, StoreMismatchError

REPO = Path(__file__).resolve().parents[2]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 6))


def _inputs(n: int = 37) -> torch.Tensor:
    return torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def _extractor(model: nn.Module, forward_fn=None) -> ConceptExtractor:
    return ConceptExtractor(model, ["1", "3"], batch_size=4, shard_size=5, progress=False, forward_fn=forward_fn)


def _assert_same(a: ActivationStore, b: ActivationStore) -> None:
    assert len(a) == len(b) and a.num_samples == b.num_samples
    for layer in ("1", "3"):
        # equal up to float rounding (batches start at other rows, so BLAS may sum in another order)
        torch.testing.assert_close(a.read(layer), b.read(layer), rtol=1e-5, atol=1e-6)
        assert torch.equal(a.read_meta("image_index", layer), b.read_meta("image_index", layer))
    # shuffled streaming covers every row exactly once
    rows = torch.cat(list(a.iter_batches(8, layer="3", seed=3)))
    assert not torch.equal(rows, a.read("3"))  # shuffled
    torch.testing.assert_close(rows[rows[:, 0].argsort()], a.read("3")[a.read("3")[:, 0].argsort()])


def test_rank_range_partitions_exactly():
    n, w = 37, 3
    parts = [rank_range(n, r, w) for r in range(w)]
    assert [len(p) for p in parts] == [13, 12, 12]
    assert sum((list(p) for p in parts), []) == list(range(n))
    with pytest.raises(ValueError, match="rank must be in"):
        rank_range(10, 2, 2)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        rank_range(10, 0, 0)


def test_sequential_ranks_merge_to_single_process_store(tmp_path):
    x = _inputs()
    single = _extractor(_model()).extract(x, tmp_path / "single")
    first = extract_distributed(_extractor(_model()), x, tmp_path / "dist", rank=0, world_size=2)
    assert first.path == rank_store_path(tmp_path / "dist", 0)  # rank 1 not done yet: own sub-store
    merged = extract_distributed(_extractor(_model()), x, tmp_path / "dist", rank=1, world_size=2)
    assert merged.path == tmp_path / "dist" and merged.complete
    assert merged.metadata["n_inputs"] == 37 and "rank" not in merged.metadata.get("extra", {})
    _assert_same(ActivationStore.open(tmp_path / "dist"), single)
    assert ActivationStore.open(tmp_path / "dist").verify() is None


def test_killed_rank_resumes_its_shards(tmp_path):
    x = _inputs()
    single = _extractor(_model()).extract(x, tmp_path / "single")
    extract_distributed(_extractor(_model()), x, tmp_path / "dist", rank=0, world_size=2)
    calls = {"n": 0, "die_at": 4}

    def forward(m, inp):
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise RuntimeError("rank killed")
        return m(inp)

    with pytest.raises(RuntimeError, match="rank killed"):
        extract_distributed(_extractor(_model(), forward), x, tmp_path / "dist", rank=1, world_size=2)
    partial = ActivationStore.open(rank_store_path(tmp_path / "dist", 1))
    assert not partial.complete and 0 < partial.num_samples < 18
    assert merge_rank_stores(tmp_path / "dist", 2) is None  # incomplete: no merged index yet
    calls.update(n=0, die_at=-1)
    merged = extract_distributed(_extractor(_model(), forward), x, tmp_path / "dist", rank=1, world_size=2,
                                 resume=True)
    assert calls["n"] < 5  # 18 inputs = 5 batches of 4; the stored shards were not recomputed
    _assert_same(merged, single)


def test_errors(tmp_path):
    loader = torch.utils.data.DataLoader(_inputs(8), batch_size=4)
    with pytest.raises(TypeError, match="split by position"):
        extract_distributed(_extractor(_model()), loader, tmp_path / "a", rank=0, world_size=2)
    with pytest.raises(StoreError, match="No rank sub-stores"):
        merge_rank_stores(tmp_path / "empty", 2, sizes=[0, 0])
    x = _inputs(10)
    extract_distributed(_extractor(_model(0)), x, tmp_path / "m", rank=0, world_size=2)
    other = ConceptExtractor(_model(0), ["1"], batch_size=4, shard_size=5, progress=False)
    with pytest.raises(StoreMismatchError, match="field 'layers' differs"):
        extract_distributed(other, x, tmp_path / "m", rank=1, world_size=2)  # different layers
    with pytest.raises(StoreMismatchError, match="field 'layers' differs"):
        merge_rank_stores(tmp_path / "m", 2)
    assert init_distributed().world_size == dist_info().world_size


_WORKER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[2])
    from test_distributed_extract import _extractor, _inputs, _model
    from concepts.distributed import extract_distributed, init_distributed
    info = init_distributed("gloo")
    assert info.initialized and info.world_size == 2
    store = extract_distributed(_extractor(_model()), _inputs(), sys.argv[1])
    assert len(store) == 37
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], nprocs: int = 2, timeout: float = 120) -> None:
    """Run ``script`` in ``nprocs`` processes with torchrun's environment variables (gloo, loopback).

    The free port can be taken by another process between probing and binding; a rendezvous failure
    (and only that) is retried once on a new port.
    """
    for attempt in range(2):
        outs, codes = _run(script, args, nprocs, timeout)
        if all(c == 0 for c in codes) or attempt == 1 or not any(
                "DistNetworkError" in o or "ddress already in use" in o for o in outs):
            break
    for rank, (code, out) in enumerate(zip(codes, outs)):
        assert code == 0, f"rank {rank} failed:\n{out}"


def _run(script: str, args: list[str], nprocs: int, timeout: float) -> tuple[list[str], list[int]]:
    port = free_port()
    procs = []
    for rank in range(nprocs):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nprocs),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return outs, [p.returncode for p in procs]


def test_two_process_gloo_extraction_equals_single_process(tmp_path):
    launch(_WORKER, [str(tmp_path / "dist"), str(Path(__file__).parent)])
    merged = ActivationStore.open(tmp_path / "dist")
    assert [s["rank"] for s in merged.shards] == [0] * 4 + [1] * 4  # 19 + 18 samples, 5 per shard
    _assert_same(merged, _extractor(_model()).extract(_inputs(), tmp_path / "single"))


@pytest.mark.slow  # loads the zoo CLIP (~10-20 s on a loaded 2-core machine)
def test_cli_extract_equals_direct_extraction(tmp_path, capsys):
    from concepts.distributed import _encode_image, run_extract_job
    from concepts.world import ConceptWorld
    from concepts.zoo import load
    from evaluation.cli import main

    assert main(["extract", "--num-images", "12", "--out", str(tmp_path / "cli"), "--quiet", "--shard-size", "4"]) == 0
    store = ActivationStore.open(tmp_path / "cli")
    assert store.metadata["n_inputs"] == 12 and store.metadata["extra"]["dataset"] == "ConceptWorld"
    clip = load("conceptworld-clip")
    direct = ConceptExtractor(clip.model, [""], pooling={"": "cls"}, preprocess=clip.preprocess,
                              forward_fn=_encode_image, progress=False).extract(
        ConceptWorld(seed=0, image_size=64).sample(12, seed=0).images)
    torch.testing.assert_close(store.read(""), direct.read(""), rtol=1e-5, atol=1e-6)


def test_extract_job_errors(tmp_path, capsys):
    from concepts.distributed import run_extract_job
    from evaluation.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No image files"):
        run_extract_job(tmp_path / "out", images=tmp_path / "empty")
    with pytest.raises(ValueError, match="n must be a positive number"):
        run_extract_job(tmp_path / "out", n=0)
    assert main(["extract", "--out", str(tmp_path / "o2"), "--images", str(tmp_path / "empty"), "--quiet"]) == 1
    assert "No image files" in capsys.readouterr().err
