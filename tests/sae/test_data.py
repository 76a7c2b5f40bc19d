"""Input handling: arrays, tensors, stores (duck-typed and the real ActivationStore), validation."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sae import TopKSAE
from sae.data import TensorSource, as_batch_source


def test_tensor_source_is_deterministic_and_resumable():
    x = torch.arange(40.0).reshape(20, 2)
    src = TensorSource(x, device=torch.device("cpu"), dtype=torch.float32)
    full = list(src.iter_batches(4, epoch=1, seed=3))
    again = list(src.iter_batches(4, epoch=1, seed=3))
    tail = list(src.iter_batches(4, epoch=1, seed=3, start_batch=2))
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    assert all(torch.equal(a, b) for a, b in zip(full[2:], tail))
    other = torch.cat(list(src.iter_batches(4, epoch=2, seed=3)))
    assert not torch.equal(torch.cat(full), other)
    assert sorted(torch.cat(full)[:, 0].tolist()) == sorted(x[:, 0].tolist())  # a permutation
    assert len(list(src.iter_batches(6, drop_last=True))) == 3 and len(list(src.iter_batches(6))) == 4


@pytest.mark.parametrize("bad,exc,msg", [
    (np.zeros((2, 3, 4)), ValueError, r"expects a 2-D array \[n_samples, n_features\]; got shape \(2, 3, 4\)"),
    (np.zeros((0, 4)), ValueError, "empty array"),
    (np.array([[1.0, np.nan]]), ValueError, "NaN or infinity"),
    (np.array([["a", "b"]]), TypeError, "expects numeric data"),
])
def test_invalid_inputs_raise(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        TopKSAE(n_concepts=8, top_k=2).fit(bad)


def test_accepts_lists_dataframes_and_integer_arrays():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(64, 4))
    a = TopKSAE(n_concepts=8, top_k=2, batch_size=16, random_state=0).fit(x)
    b = TopKSAE(n_concepts=8, top_k=2, batch_size=16, random_state=0).fit(pd.DataFrame(x.astype(float)))
    c = TopKSAE(n_concepts=8, top_k=2, batch_size=16, random_state=0).fit(x.tolist())
    torch.testing.assert_close(a.dictionary_, b.dictionary_)
    torch.testing.assert_close(a.dictionary_, c.dictionary_)


class FakeStore:
    """Duck-typed ActivationStore over a tensor that records how it is read."""

    def __init__(self, x, metadata=None):
        self.x = x
        self.metadata = metadata or {}
        self.max_rows_yielded = 0
        self.calls = []

    def __len__(self):
        return self.x.shape[0]

    def dim(self, layer=None):
        return self.x.shape[1]

    def iter_batches(self, batch_size, *, shuffle=True, seed=0, drop_last=False, start_batch=0, dtype=torch.float32,
                     device="cpu", layer=None):
        self.calls.append(dict(batch_size=batch_size, shuffle=shuffle, seed=seed, start_batch=start_batch))
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(self))
        n_b = len(self) // batch_size if drop_last else -(-len(self) // batch_size)
        for i in range(start_batch, n_b):
            b = self.x[order[i * batch_size:(i + 1) * batch_size]]
            self.max_rows_yielded = max(self.max_rows_yielded, b.shape[0])
            yield b.to(dtype=dtype, device=device)

    def read(self, *a, **k):  # pragma: no cover - must not be called
        raise AssertionError("the SAE must stream, not materialise the store")


def test_fit_streams_a_duck_typed_store_with_bounded_batches(tiny_data, tmp_path):
    store = FakeStore(tiny_data.X, metadata={"model": "toy", "pooling": "mean"})
    est = TopKSAE(n_concepts=32, top_k=3, n_epochs=2, batch_size=32, random_state=0).fit(store)
    assert est.score(tiny_data.X) > 0.3
    assert store.max_rows_yielded <= 4096  # initialisation reads a bounded head, training batches are 32
    train_calls = [c for c in store.calls if c["shuffle"]]
    assert [c["batch_size"] for c in train_calls] == [32, 32]
    assert len({c["seed"] for c in train_calls}) == 2  # a new shuffle per epoch
    assert est.source_ == {"model": "toy", "pooling": "mean"}
    # transform streams too, in storage order
    torch.testing.assert_close(est.transform(store), est.transform(tiny_data.X))


def _real_store(tmp_path, n=384):
    extractor = pytest.importorskip("concepts.extractor")
    from concepts.store import ActivationStore

    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(16, 12, generator=g))
    images = torch.rand(n, 3, 2, 2, generator=g)
    ext = extractor.ConceptExtractor(model, "1", pooling="mean", progress=False, shard_size=64, model_name="toy-linear")
    path = tmp_path / "store"
    ext.extract(images, store_path=path)
    return ActivationStore.open(path), images, model


def test_fit_on_a_real_activation_store_records_its_source_and_resumes(tmp_path):
    store, images, model = _real_store(tmp_path)
    X = store.read()
    with torch.no_grad():
        torch.testing.assert_close(X, model(images), rtol=1e-5, atol=1e-5)
    kw = dict(n_concepts=32, top_k=4, n_epochs=2, batch_size=32, random_state=0)
    a = TopKSAE(**kw).fit(store)
    b = TopKSAE(**kw).fit(store)
    torch.testing.assert_close(a.dictionary_, b.dictionary_, rtol=0, atol=0)
    assert a.score(X) > 0.5
    assert a.source_.get("layer") == "1" and a.source_.get("pooling") == "mean"
    cfg = a.config()
    assert cfg["source"]["layer"] == "1"

    class Stop(Exception):
        pass

    def stop(est, step, m):
        if step == 13:
            raise Stop

    ck = tmp_path / "ck"
    with pytest.raises(Stop):
        TopKSAE(checkpoint_dir=ck, checkpoint_every=1, **kw).fit(store, callbacks=[stop])
    c = TopKSAE(checkpoint_dir=ck, **kw).fit(store, resume=True)
    torch.testing.assert_close(c.dictionary_, a.dictionary_, rtol=0, atol=1e-6)
    torch.testing.assert_close(c.transform(store), a.transform(X), rtol=1e-6, atol=1e-6)


def test_as_batch_source_wraps_layers(tmp_path):
    store, _, _ = _real_store(tmp_path, n=64)
    src = as_batch_source(store, device=torch.device("cpu"), dtype=torch.float32, layer="1")
    assert src.n_samples == 64 and src.n_features == 16
    with pytest.raises(KeyError, match="not in this store"):
        as_batch_source(store, device=torch.device("cpu"), dtype=torch.float32, layer="nope")
