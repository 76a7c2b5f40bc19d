"""Data-parallel SAE training over 2 gloo processes equals single-process training."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from concepts.extractor import ConceptExtractor
from concepts.store import ActivationStore
from sae import ReLUSAE, TopKSAE
from sae.data import TensorSource
from sae.distributed import RankBatchView, fit_distributed
from sae.synthetic import sparse_dictionary_data

REPO = Path(__file__).resolve().parents[2]


def _data() -> torch.Tensor:
    return sparse_dictionary_data(n=512, d=16, n_atoms=32, k=3, seed=0).X


def _sae(**kw) -> TopKSAE:
    params = dict(n_concepts=32, top_k=3, batch_size=64, n_epochs=2, random_state=0)
    return TopKSAE(**{**params, **kw})


def _extractor() -> ConceptExtractor:
    torch.manual_seed(0)
    return ConceptExtractor(nn.Sequential(nn.Linear(16, 12)), ["0"], batch_size=50, shard_size=100, progress=False)


def test_rank_views_partition_every_global_batch():
    x = _data()
    single = list(TensorSource(x, device=torch.device("cpu"), dtype=torch.float32).iter_batches(
        60, epoch=1, seed=5, drop_last=True))
    from sae.data import _epoch_seed

    seed = _epoch_seed(5, 1)  # what StoreSource passes on to a store
    views = [RankBatchView(x, rank=r, world_size=3) for r in range(3)]
    chunks = [list(v.iter_batches(60, shuffle=True, seed=seed, drop_last=True)) for v in views]
    assert len(chunks[0]) == len(single) == 8
    for i, b in enumerate(single):
        assert torch.equal(torch.cat([c[i] for c in chunks]), b)
    assert views[2].last_rows == (20, 60)
    # unshuffled reads (initialisation) see the full data on every rank
    assert torch.equal(next(views[1].iter_batches(512, shuffle=False)), x)


def test_without_process_group_is_plain_fit():
    x = _data()
    a = fit_distributed(_sae(), x)
    b = _sae().fit(x)
    assert torch.equal(a.dictionary_, b.dictionary_)
    with pytest.raises(ValueError, match="needs a checkpoint directory"):
        fit_distributed(_sae(), x, resume=True)


_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from safetensors.torch import save_file
    from test_distributed_sae import _data, _extractor, _sae
    from concepts.distributed import extract_distributed, init_distributed
    from concepts.store import ActivationStore
    from sae import ReLUSAE
    from sae.distributed import fit_distributed
    info = init_distributed("gloo")
    out = Path(sys.argv[1]); rank = info.rank
    x = _data()
    res = {}
    res["tensor"] = fit_distributed(_sae(), x).dictionary_
    relu = ReLUSAE(n_concepts=24, batch_size=64, n_epochs=1, random_state=0)
    res["relu"] = fit_distributed(relu, x).dictionary_
    store = extract_distributed(_extractor(), x, out / "store")  # sharded: rank-00000/, rank-00001/
    res["store"] = fit_distributed(_sae(), store).dictionary_
    def kill(est, step, metrics):
        if step == 7:
            raise KeyboardInterrupt("killed")
    try:
        fit_distributed(_sae(checkpoint_every=3), x, checkpoint_dir=out / "ck", callbacks=[kill])
    except KeyboardInterrupt:
        pass
    steps = json.loads((out / "ck" / "latest.json").read_text())["step"]
    resumed = fit_distributed(_sae(checkpoint_every=3), x, checkpoint_dir=out / "ck", resume=True)
    res["resumed"] = resumed.dictionary_
    try:
        fit_distributed(_sae(), x[: 500 + rank])
        err = ""
    except ValueError as e:
        err = str(e)
    save_file({k: v.contiguous() for k, v in res.items()}, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps({"err": err, "killed_at_checkpoint": steps,
        "world_size": resumed.training_stats_["world_size"]}))
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], nprocs: int = 2, timeout: float = 180) -> None:
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


def test_two_process_ddp_matches_single_process_and_resumes(tmp_path):
    launch(_WORKER, [str(tmp_path), str(Path(__file__).parent)])
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    for key in r0:  # every rank ends with the same parameters
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=1e-6)
    x = _data()
    single = _sae().fit(x).dictionary_
    assert not torch.allclose(single, _sae(batch_size=32).fit(x).dictionary_, atol=1e-3)  # batch matters
    torch.testing.assert_close(r0["tensor"], single, rtol=1e-4, atol=1e-5)
    relu = ReLUSAE(n_concepts=24, batch_size=64, n_epochs=1, random_state=0).fit(x).dictionary_
    torch.testing.assert_close(r0["relu"], relu, rtol=1e-4, atol=1e-5)
    store = ActivationStore.open(tmp_path / "store")
    assert {s["rank"] for s in store.shards} == {0, 1}
    torch.testing.assert_close(store.read(), _extractor().extract(x).read(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["store"], _sae().fit(store).dictionary_, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r0["resumed"], single, rtol=1e-4, atol=1e-5)
    info = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert info[0]["killed_at_checkpoint"] == 6 and info[0]["world_size"] == 2
    assert all("same data set" in i["err"] and "[500, 501]" in i["err"] for i in info)
    # checkpoints are written once, by rank 0, into the shared directory
    files = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert "latest.json" in files and not [f for f in files if f.endswith(".tmp")]
