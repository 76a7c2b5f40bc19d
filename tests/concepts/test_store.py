"""Tests of concepts.store: sharded writing, validation, bounded shuffled streaming."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from concepts.store import (
    INDEX_FILE,
    ActivationStore,
    StoreCorruptError,
    StoreMismatchError,
    StoreWriter,
    meta_key,
)

D = 6


def header(fingerprint: str = "abc", storage: str = "safetensors", dtype: str = "float32", layers=("a", "b")):
    return {
        "model": {"name": "toy", "class": "toy.Toy", "n_params": 1, "fingerprint": fingerprint},
        "layers": list(layers),
        "pooling": {l: "mean" for l in layers},
        "preprocessing": None,
        "forward_fn": "model(x)",
        "dtype": dtype,
        "storage": storage,
        "token_layout": {"cls": 0, "register": 0},
        "n_inputs": None,
    }


def make_rows(n: int, start: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Row r of layer a is [r, r, ...]; layer b has 2 rows per sample (token-like)."""
    idx = torch.arange(start, start + n)
    a = idx[:, None].repeat(1, D).to(dtype)
    b_idx = idx.repeat_interleave(2)
    b = torch.stack([b_idx * 10 + torch.arange(2 * n) % 2] * 3, dim=1).to(dtype)
    return {
        "a": a,
        meta_key("a", "image_index"): idx,
        "b": b,
        meta_key("b", "image_index"): b_idx,
        meta_key("b", "token_type"): torch.tensor([0, 2] * n, dtype=torch.uint8),
        meta_key("b", "position"): torch.tensor([0, 1] * n, dtype=torch.int32),
    }


def write_store(path, n_shards=5, per_shard=7, **kw) -> ActivationStore:
    w = StoreWriter(path, header(**kw))
    dtype = getattr(torch, kw.get("dtype", "float32"))
    for s in range(n_shards):
        w.write_shard(make_rows(per_shard, s * per_shard, dtype), per_shard, s * per_shard)
    return w.finish()


@pytest.fixture
def store_dir(tmp_path):
    write_store(tmp_path / "s")
    return tmp_path / "s"


def test_roundtrip_counts_and_metadata(store_dir):
    store = ActivationStore.open(store_dir)
    assert store.layers == ["a", "b"] and store.complete
    assert len(store) == 35 and store.num_rows("b") == 70 and store.num_samples == 35
    assert store.dim("a") == D and store.dim("b") == 3
    assert torch.equal(store.read("a")[:, 0], torch.arange(35, dtype=torch.float32))
    assert torch.equal(store.read_meta("image_index", "b"), torch.arange(35).repeat_interleave(2))
    assert torch.equal(store.read("b", token_types=["patch"])[:, 0], torch.arange(35) * 10 + 1.0)
    assert torch.equal(store.read("a", rows=[3, 0, 34])[:, 0], torch.tensor([3.0, 0.0, 34.0]))
    assert store.read("a", rows=slice(5, 8), dtype=None).dtype == torch.float32
    meta = store.metadata
    assert meta["counts"] == {"samples": 35, "rows": {"a": 35, "b": 70}} and "shards" not in meta
    shards = store.shards
    assert [s["samples"] for s in shards] == [7] * 5
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for s in shards for f in s["files"])
    with pytest.raises(KeyError, match=r"Layer 'c' is not in this store"):
        store.read("c")
    with pytest.raises(KeyError, match="no 'token_type' metadata"):
        store.read_meta("token_type", "a")
    with pytest.raises(ValueError, match="needs pooling='tokens'"):
        store.read("a", token_types=["patch"])
    with pytest.raises(ValueError, match="Unknown token type"):
        store.read("b", token_types=["cls", "pach"])
    with pytest.raises(IndexError, match="out of range"):
        store.read("a", rows=[35])
    assert "35 samples, 5 shards" in repr(store)


def test_iter_batches_order_shuffle_determinism_and_resume(store_dir):
    store = ActivationStore.open(store_dir)
    plain = torch.cat(list(store.iter_batches(8, shuffle=False)))
    assert torch.equal(plain, store.read("a"))
    batches = list(store.iter_batches(8, seed=3, window_shards=2))
    assert [len(b) for b in batches] == [8, 8, 8, 8, 3]
    allrows = torch.cat(batches)
    assert not torch.equal(allrows, plain)  # shuffled ...
    assert torch.equal(allrows[:, 0].sort().values, plain[:, 0])  # ... a permutation of all rows
    again = torch.cat(list(store.iter_batches(8, seed=3, window_shards=2)))
    assert torch.equal(allrows, again)  # deterministic for a seed
    other = torch.cat(list(store.iter_batches(8, seed=4, window_shards=2)))
    assert not torch.equal(allrows, other)
    # start_batch continues the same stream
    tail = list(store.iter_batches(8, seed=3, window_shards=2, start_batch=2))
    assert torch.equal(torch.cat(tail), allrows[16:])
    assert len(list(store.iter_batches(8, seed=3, drop_last=True))) == 4
    assert len(torch.cat(list(store.iter_batches(8, seed=-5)))) == 35  # any int seed
    b16 = next(store.iter_batches(4, dtype="float16", layer="b", token_types=["cls"]))
    assert b16.dtype == torch.float16 and b16.shape == (4, 3) and (b16[:, 0] % 10 == 0).all()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        store.iter_batches(0)
    with pytest.raises(ValueError, match="start_batch"):
        store.iter_batches(4, start_batch=-1)
    with pytest.raises(ValueError, match="window_shards"):
        store.iter_batches(4, window_shards=0)


def test_iter_batches_memory_is_bounded_by_the_window(store_dir, monkeypatch):
    store = ActivationStore.open(store_dir)
    loaded: list[int] = []
    orig = ActivationStore._load

    def spy(self, sid, names):
        loaded.append(sid)
        return orig(self, sid, names)

    monkeypatch.setattr(ActivationStore, "_load", spy)
    it = store.iter_batches(4, seed=0, window_shards=2)
    next(it)
    assert len(set(loaded)) == 2  # only the first window is in memory
    list(it)
    assert sorted(set(loaded)) == [0, 1, 2, 3, 4] and len(loaded) == 5
    loaded.clear()
    list(store.iter_batches(7, seed=0, window_shards=2, start_batch=4))  # skip 28 rows = 2 windows
    assert len(loaded) == 1  # skipped windows are not read


def test_npy_storage_and_memmap(tmp_path):
    store = write_store(tmp_path / "n", storage="npy", dtype="float16", n_shards=2)
    files = sorted(p.name for p in (tmp_path / "n").iterdir())
    assert INDEX_FILE in files and sum(f.endswith(".npy") for f in files) == 2 * 6
    store = ActivationStore.open(tmp_path / "n")
    assert store.dtype == torch.float16
    assert torch.equal(store.read("a", dtype=None)[:, 0], torch.arange(14, dtype=torch.float16))
    arr = np.load(tmp_path / "n" / store.shards[1]["files"][0]["name"], mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr[0, 0] == 7
    with pytest.raises(ValueError, match="cannot hold bfloat16"):
        StoreWriter(tmp_path / "bf", header(storage="npy", dtype="bfloat16"))


def test_in_memory_store(tmp_path):
    store = write_store(None, n_shards=2)
    assert store.path is None and len(store) == 14
    assert torch.equal(torch.cat(list(store.iter_batches(5, shuffle=False))), store.read())


def first_shard(store_dir):
    index = json.loads((store_dir / INDEX_FILE).read_text())
    return index, store_dir / index["shards"][1]["files"][0]["name"]


def update_index(store_dir, index, path):
    import hashlib

    data = path.read_bytes()
    index["shards"][1]["files"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (store_dir / INDEX_FILE).write_text(json.dumps(index))


def test_truncated_shard_is_refused(store_dir):
    _, path = first_shard(store_dir)
    path.write_bytes(path.read_bytes()[:-10])
    store = ActivationStore.open(store_dir)
    with pytest.raises(StoreCorruptError, match=r"shard_00001\.safetensors is corrupt: field 'bytes'"):
        store.read("a")
    # a truncated file whose index entry was also updated: the header no longer fits
    index, _ = first_shard(store_dir)
    update_index(store_dir, index, path)
    with pytest.raises(StoreCorruptError, match=r"shard_00001\.safetensors is corrupt: field 'data_offsets'"):
        ActivationStore.open(store_dir).read("a")


def test_wrong_shape_and_dtype_are_refused(store_dir):
    index, path = first_shard(store_dir)
    good = make_rows(7, 7)
    bad = dict(good, a=good["a"].reshape(14, 3))  # same bytes, other shape
    save_file(bad, str(path))
    update_index(store_dir, index, path)
    with pytest.raises(StoreCorruptError, match=r"shard_00001.*field 'shape' of 'a' is \(14, 3\).*\(7, 6\)"):
        ActivationStore.open(store_dir).read("a")
    bad = dict(good, a=good["a"].view(torch.int32))  # same bytes, other dtype
    save_file(bad, str(path))
    update_index(store_dir, index, path)
    with pytest.raises(StoreCorruptError, match=r"shard_00001.*field 'dtype' of 'a' is I32.*float32"):
        list(ActivationStore.open(store_dir).iter_batches(4))


def test_shard_of_another_model_or_layers_is_refused(tmp_path, store_dir):
    write_store(tmp_path / "other", fingerprint="xyz")
    index, path = first_shard(store_dir)
    shutil.copy(tmp_path / "other" / path.name, path)
    update_index(store_dir, index, path)  # sizes and checksums agree, the model does not
    with pytest.raises(StoreCorruptError, match=r"shard_00001.*does not belong.*field 'model_fingerprint'"):
        ActivationStore.open(store_dir).read("a")
    write_store(tmp_path / "other2", layers=("b", "a"))
    shutil.copy(tmp_path / "other2" / path.name, path)
    update_index(store_dir, index, path)
    with pytest.raises(StoreCorruptError, match=r"field 'layers'"):
        ActivationStore.open(store_dir).verify()


def test_bit_flip_missing_file_and_bad_index(store_dir):
    _, path = first_shard(store_dir)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorruptError, match=r"shard_00001.*field 'sha256'"):
        ActivationStore.open(store_dir).verify()
    ActivationStore.open(store_dir, verify="size").read("a")  # size-only validation passes
    path.unlink()
    with pytest.raises(StoreCorruptError, match=r"shard_00001.safetensors is missing"):
        ActivationStore.open(store_dir).read("a")
    (store_dir / INDEX_FILE).write_text("{not json")
    with pytest.raises(StoreCorruptError, match="index.json is corrupt"):
        ActivationStore.open(store_dir)
    (store_dir / INDEX_FILE).write_text(json.dumps({"format_version": 1}))
    with pytest.raises(StoreCorruptError, match="field 'layers' is missing"):
        ActivationStore.open(store_dir)
    with pytest.raises(FileNotFoundError, match="No activation store"):
        ActivationStore.open(store_dir / "nope")
    with pytest.raises(ValueError, match="verify must be"):
        ActivationStore(None, {}, verify="md5")


def test_existing_store_requires_resume_or_overwrite(tmp_path, store_dir):
    with pytest.raises(FileExistsError, match="resume=True.*overwrite=True"):
        StoreWriter(store_dir, header())
    with pytest.raises(StoreMismatchError, match=r"index.json: field 'model.fingerprint' is 'abc'.*'zzz'"):
        StoreWriter(store_dir, header(fingerprint="zzz"), resume=True)
    with pytest.raises(StoreMismatchError, match=r"field 'layers'"):
        StoreWriter(store_dir, header(layers=("a",)), resume=True)
    w = StoreWriter(store_dir, header(), resume=True)
    assert w.samples_done == 35
    w.close()
    w = StoreWriter(store_dir, header(), overwrite=True)
    assert w.samples_done == 0 and not list(store_dir.glob("shard_*"))
    w.close()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty and holds no activation store"):
        StoreWriter(tmp_path / "notes", header())
    with pytest.raises(ValueError, match="storage must be"):
        StoreWriter(None, header(storage="hdf5"))


def test_malformed_shard_headers_are_refused(store_dir):
    index, path = first_shard(store_dir)
    cases = [
        (b"abcd", r"field 'bytes': only 4 bytes"),
        ((10**12).to_bytes(8, "little") + b"{}", r"field 'header': header length"),
        ((4).to_bytes(8, "little") + b"{no}", r"field 'header' is not valid JSON"),
    ]
    for data, pattern in cases:
        path.write_bytes(data)
        update_index(store_dir, index, path)
        with pytest.raises(StoreCorruptError, match=r"shard_00001\.safetensors.*" + pattern):
            ActivationStore.open(store_dir).read("a")
    rows = make_rows(7, 7)
    del rows["a::image_index"]
    save_file(rows, str(path))
    update_index(store_dir, index, path)
    with pytest.raises(StoreCorruptError, match=r"tensor 'a::image_index' is missing"):
        ActivationStore.open(store_dir).read("a")


def test_malformed_npy_shards_are_refused(tmp_path):
    write_store(tmp_path / "n", storage="npy", n_shards=2)
    index = json.loads((tmp_path / "n" / INDEX_FILE).read_text())
    path = tmp_path / "n" / index["shards"][1]["files"][0]["name"]  # layer 'a' of shard 1

    def check(arr_or_bytes, pattern):
        if isinstance(arr_or_bytes, bytes):
            path.write_bytes(arr_or_bytes)
        else:
            np.save(path, arr_or_bytes)
        update_index(tmp_path / "n", index, path)
        with pytest.raises(StoreCorruptError, match=r"shard_00001\.a0\.npy is corrupt: " + pattern):
            ActivationStore.open(tmp_path / "n").read("a")

    good = make_rows(7, 7)["a"].numpy()
    check(good.astype(np.float64), r"field 'dtype' is float64 but the index says float32")
    check(good.reshape(14, 3), r"field 'shape' is \(14, 3\)")
    np.save(path, good)
    check(path.read_bytes()[:-8], r"field 'bytes'")
    check(b"garbage bytes, not npy", r"field 'header' could not be read")


def test_index_version_dims_and_writer_checks(tmp_path, store_dir):
    index = json.loads((store_dir / INDEX_FILE).read_text())
    index["format_version"] = 99
    (store_dir / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(StoreCorruptError, match="field 'format_version' is 99"):
        ActivationStore.open(store_dir)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="is not a directory"):
        StoreWriter(tmp_path / "afile", header())
    w = StoreWriter(None, header(), async_write=False)
    w.write_shard(make_rows(3, 0), 3, 0)
    bad = make_rows(3, 3)
    bad["a"] = torch.zeros(3, D + 1)
    with pytest.raises(StoreMismatchError, match=r"dimension 7 in this extraction but 6.*field 'dims'"):
        w.write_shard(bad, 3, 3)
    bad["a"] = torch.zeros(3, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected a 2-d float32 tensor"):
        w.write_shard(bad, 3, 3)
    empty = StoreWriter(None, header()).finish()
    assert len(empty) == 0 and empty.read("a").shape == (0,)
    with pytest.raises(ValueError, match="holds no rows yet"):
        empty.dim("a")
