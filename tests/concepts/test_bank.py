"""ConceptBank: constructors against closed forms and planted directions, immutability, selection and
concatenation, safetensors + JSON round trips and corrupt files; concept lists from files and filters."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.metrics.pairwise import cosine_similarity

from concepts.bank import ConceptBank, describe_templates, embed_texts
from concepts.vocabularies import (
    filter_class_concepts,
    filter_concepts,
    read_class_concepts,
    read_concept_list,
)


class HashEncoder:
    """Deterministic text encoder: a seeded Gaussian vector per text (injective in practice)."""

    def __init__(self, dim: int = 16, table: dict[str, list[float]] | None = None):
        self.dim, self.table, self.calls = dim, table or {}, 0
        self.embed_dim = dim

    def vector(self, text: str) -> torch.Tensor:
        if text in self.table:
            return torch.tensor(self.table[text], dtype=torch.float32)
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        return torch.from_numpy(np.random.default_rng(seed).normal(size=self.dim).astype(np.float32))

    def encode_texts(self, texts, *, normalize=True):
        self.calls += 1
        out = torch.stack([self.vector(t) for t in texts])
        return torch.nn.functional.normalize(out, dim=1) if normalize else out


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


# ----------------------------------------------------------------------------- from_texts
def test_from_texts_equals_the_encoder_embeddings():
    enc = HashEncoder()
    bank = ConceptBank.from_texts(enc, ["red", "blue", "a big dog"])
    expected = unit(torch.stack([enc.vector(t) for t in ["red", "blue", "a big dog"]]))
    torch.testing.assert_close(bank.vectors, expected)
    assert bank.names == ("red", "blue", "a big dog")
    assert bank.metadata["how"] == "texts" and bank.metadata["encoder"] == "HashEncoder"
    assert bank.metadata["templates"] is None


def test_from_texts_averages_normalised_template_embeddings():
    enc = HashEncoder()
    templates = ["a photo of {}.", lambda c: f"a drawing of {c}"]
    bank = ConceptBank.from_texts(enc, ["cat", "dog"], templates, names=["c", "d"])
    for i, word in enumerate(["cat", "dog"]):
        mean = (unit(enc.vector(f"a photo of {word}.")) + unit(enc.vector(f"a drawing of {word}"))) / 2
        torch.testing.assert_close(bank.vectors[i], unit(mean))
    assert bank.metadata["templates"] == ("a photo of {}.", "a drawing of {}")  # frozen: lists -> tuples
    assert bank.metadata["texts"] == ("cat", "dog") and bank.names == ("c", "d")
    assert describe_templates("x {} y") == ["x {} y"]


def test_from_texts_batches_and_accepts_plain_callables():
    enc = HashEncoder()
    texts = [f"word {i}" for i in range(10)]
    full = embed_texts(enc, texts)
    enc.calls = 0
    batched = embed_texts(enc, texts, batch_size=3)
    assert enc.calls == 4
    torch.testing.assert_close(full, batched)
    as_numpy = ConceptBank.from_texts(lambda ts: np.stack([enc.vector(t).numpy() * 5 for t in ts]), texts)
    torch.testing.assert_close(as_numpy.vectors, full)
    raw = embed_texts(enc, texts, normalize=False)
    torch.testing.assert_close(raw, torch.stack([enc.vector(t) for t in texts]))


def test_embed_texts_errors():
    enc = HashEncoder()
    with pytest.raises(ValueError, match="placeholder"):
        embed_texts(enc, ["a"], templates="a photo")
    with pytest.raises(ValueError, match="empty list"):
        embed_texts(enc, ["a"], templates=[])
    with pytest.raises(TypeError, match="each template"):
        embed_texts(enc, ["a"], templates=[3])
    with pytest.raises(TypeError, match="encode_texts"):
        embed_texts(42, ["a"])

    class RawCLIP:
        def encode_text(self, tokens):
            return tokens

    with pytest.raises(TypeError, match="wrap it as concepts.encoders.OpenCLIPEncoder"):
        embed_texts(RawCLIP(), ["a"])
    with pytest.raises(ValueError, match=r"shape \(1, 4\) for 2 texts"):
        embed_texts(lambda ts: torch.ones(1, 4), ["a", "b"])
    with pytest.raises(ValueError, match="NaN"):
        embed_texts(lambda ts: torch.full((len(ts), 4), float("nan")), ["a"])
    with pytest.raises(TypeError, match="returned str"):
        embed_texts(lambda ts: "oops", ["a"])
    with pytest.raises(TypeError, match="list of strings"):
        embed_texts(enc, "a single string")
    with pytest.raises(TypeError, match="all be strings"):
        embed_texts(enc, ["a", 3])
    with pytest.raises(ValueError, match="empty"):
        embed_texts(enc, [])
    with pytest.raises(ValueError, match="batch_size"):
        embed_texts(enc, ["a"], batch_size=0)


# ----------------------------------------------------------------------------- construction and immutability
def test_constructor_validates_and_copies():
    data = torch.randn(3, 4)
    bank = ConceptBank(data, names=["a", "b", "c"], scores=np.array([0.1, 0.2, 0.3]), metadata={"layer": "x"})
    data[0] = 100.0
    assert bank.vectors[0].abs().max() < 100
    with pytest.raises(dataclasses.FrozenInstanceError):
        bank.names = ("x", "y", "z")
    with pytest.raises(TypeError):
        bank.metadata["layer"] = "y"
    assert bank.n_concepts == 3 and bank.dim == 4 and len(bank) == 3 and "b" in bank
    assert "ConceptBank(n_concepts=3, dim=4" in repr(bank)
    clone = copy.deepcopy(bank)  # in-memory copies work (metadata is a read-only mapping)
    assert torch.equal(clone.vectors, bank.vectors) and clone.names == bank.names
    assert dict(clone.metadata) == {"layer": "x"} and torch.equal(clone.scores, bank.scores)
    with pytest.raises(ValueError, match=r"shape \[k, d\]"):
        ConceptBank(torch.randn(4))
    with pytest.raises(ValueError, match="at least one concept"):
        ConceptBank(torch.randn(0, 4))
    with pytest.raises(ValueError, match="2 names for 3"):
        ConceptBank(torch.randn(3, 2), names=["a", "b"])
    with pytest.raises(ValueError, match="unique.*deduplicate=True"):
        ConceptBank(torch.randn(2, 2), names=["a", "a"])
    with pytest.raises(TypeError, match="names must be strings"):
        ConceptBank(torch.randn(2, 2), names=["a", 1])
    with pytest.raises(TypeError, match="list of 2 strings"):
        ConceptBank(torch.randn(2, 2), names="ab")
    with pytest.raises(ValueError, match="NaN"):
        ConceptBank(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"scores must have shape \[2\]"):
        ConceptBank(torch.randn(2, 2), scores=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="scores must be"):
        ConceptBank(torch.randn(2, 2), scores=3.0)
    with pytest.raises(TypeError, match=r"metadata\['model'\] is not JSON-serialisable"):
        ConceptBank(torch.randn(2, 2), metadata={"model": torch.nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="metadata must be a dict"):
        ConceptBank(torch.randn(2, 2), metadata=[1])
    with pytest.raises(TypeError, match="Tensor or numpy array"):
        ConceptBank([[1.0, 2.0]])


def test_select_concat_rename():
    V = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    bank = ConceptBank(V, names=["a", "b", "c", "d"], scores=[1, 2, 3, 4], metadata={"layer": "L"})
    for sel in (["c", "a"], [2, 0], np.array([2, 0]), torch.tensor([2, 0]), [-2, 0]):
        sub = bank.select(sel)
        assert sub.names == ("c", "a")
        torch.testing.assert_close(sub.vectors, V[[2, 0]])
        assert sub.scores.tolist() == [3.0, 1.0] and sub.metadata["layer"] == "L"
    assert bank.select(np.array([True, False, False, True])).names == ("a", "d")
    assert bank.select(slice(1, 3)).names == ("b", "c")
    assert bank.select("b").names == ("b",) and bank.index(["d", "a"]) == [3, 0]
    with pytest.raises(KeyError, match="Closest names"):
        bank.select(["bb"])
    with pytest.raises(IndexError, match="out of range"):
        bank.select([4])
    with pytest.raises(ValueError, match="empty"):
        bank.select([])
    with pytest.raises(ValueError, match="one entry per concept"):
        bank.select(np.array([True, False]))
    with pytest.raises(TypeError, match="names, integer indices"):
        bank.select([1.5])

    other = ConceptBank(torch.ones(2, 3), names=["e", "a"], metadata={"layer": "M"})
    with pytest.raises(ValueError, match="unique"):
        bank.concat(other)
    both = bank.concat(other, deduplicate=True)
    assert both.names == ("a", "b", "c", "d", "e", "a (2)")
    torch.testing.assert_close(both.vectors, torch.cat([V, torch.ones(2, 3)]))
    assert both.scores[:4].tolist() == [1, 2, 3, 4] and torch.isnan(both.scores[4:]).all()
    assert both.metadata["how"] == "concat" and both.metadata["sources"][1]["layer"] == "M"
    same = ConceptBank.concat(bank.select([0]), bank.select([1]))
    assert same.metadata["layer"] == "L" and same.names == ("a", "b")
    with pytest.raises(ValueError, match="2-dimensional vectors, but the first bank has 3"):
        bank.concat(ConceptBank(torch.ones(1, 2)))
    with pytest.raises(TypeError, match="argument 1"):
        bank.concat("not a bank")

    assert bank.rename(["w", "x", "y", "z"]).names == ("w", "x", "y", "z")
    assert bank.rename({"b": "blue"}).names == ("a", "blue", "c", "d")
    assert bank.rename(str.upper).names == ("A", "B", "C", "D")
    assert bank.rename(["s", "s", "t", "s"], deduplicate=True).names == ("s", "s (2)", "t", "s (3)")
    with pytest.raises(ValueError, match="unique"):
        bank.rename(["s", "s", "t", "u"])
    with pytest.raises(KeyError, match="cannot rename 'q'"):
        bank.rename({"q": "r"})
    with pytest.raises(ValueError, match="3 names for a bank of 4"):
        bank.rename(["a", "b", "c"])
    with pytest.raises(TypeError, match="single string"):
        bank.rename("abcd")


def test_similarity_to_frame_and_html():
    rng = np.random.default_rng(0)
    V, X = rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    bank = ConceptBank(V * 3, names=[f"<b>c{i}</b>" for i in range(5)], scores=np.arange(5.0))
    np.testing.assert_allclose(bank.similarity(torch.tensor(X)).numpy(), cosine_similarity(X, V), atol=1e-5)
    np.testing.assert_allclose(bank.similarity(X[0]).numpy(), cosine_similarity(X[:1], V), atol=1e-5)
    with pytest.raises(ValueError, match="X has 5 features, but this ConceptBank has 8-dimensional"):
        bank.similarity(np.ones((2, 5)))
    frame = bank.to_frame()
    np.testing.assert_allclose(frame["norm"], 3 * np.linalg.norm(V, axis=1), rtol=1e-5)
    assert frame["score"].tolist() == [0, 1, 2, 3, 4] and frame.index.name == "concept"
    np.testing.assert_allclose(bank.normalized().vectors.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    html = bank._repr_html_(max_rows=3)
    assert "&lt;b&gt;c0&lt;/b&gt;" in html and "<b>c0</b>" not in html
    assert "2 more concepts" in html and "5 concepts" in html


# ----------------------------------------------------------------------------- dictionary
class FakeSAE:
    def __init__(self, n_concepts=6, d_in=4):
        self.n_concepts, self.d_in = n_concepts, d_in

    def get_params(self, deep=True):
        return {"n_concepts": self.n_concepts, "d_in": self.d_in}

    def fit(self, X):
        self.dictionary_ = torch.randn(self.n_concepts, self.d_in) * 2
        return self


def test_from_dictionary():
    sae = FakeSAE()
    with pytest.raises(NotFittedError, match="not fitted yet"):
        ConceptBank.from_dictionary(sae)
    sae.fit(None)
    bank = ConceptBank.from_dictionary(sae, names=[f"atom {i}" for i in range(6)])
    torch.testing.assert_close(bank.vectors, sae.dictionary_)
    assert bank.metadata["sae"] == "FakeSAE" and bank.metadata["params"] == {"n_concepts": 6, "d_in": 4}
    unit_bank = ConceptBank.from_dictionary(sae.dictionary_.numpy(), normalize=True)
    torch.testing.assert_close(unit_bank.vectors, unit(sae.dictionary_))
    assert unit_bank.metadata["normalized"] is True and unit_bank.names[0] == "concept_0"
    with pytest.raises(TypeError, match="fitted SAE"):
        ConceptBank.from_dictionary("sae")
    with pytest.raises(ValueError, match=r"\[n_concepts, d_in\]"):
        ConceptBank.from_dictionary(torch.ones(3))


def test_from_dictionary_of_a_fitted_topk_sae():
    from sae import TopKSAE

    X = torch.randn(128, 8, generator=torch.Generator().manual_seed(0))
    sae = TopKSAE(n_concepts=16, top_k=2, random_state=0).fit(X)
    bank = ConceptBank.from_dictionary(sae)
    torch.testing.assert_close(bank.vectors, sae.dictionary_.float())
    assert bank.metadata["sae"] == "TopKSAE" and bank.metadata["params"]["top_k"] == 2
    np.testing.assert_allclose(bank.similarity(sae.dictionary_).diagonal().numpy(), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- CAVs
def planted_concepts(n=600, d=12, seed=0):
    rng = np.random.default_rng(seed)
    W = np.linalg.qr(rng.normal(size=(d, d)))[0][:3]  # three orthonormal concept directions
    Z = rng.random((n, 3)) < 0.4
    X = Z @ (2.0 * W) + 0.3 * rng.normal(size=(n, d)) + 5.0
    labels = pd.DataFrame(Z, columns=["red", "circle", "striped"])
    labels["noise"] = rng.random(n) < 0.5  # a concept the features do not carry
    return X, labels, W


@pytest.mark.parametrize("method", ["mean_difference", "logistic"])
def test_from_cavs_recovers_planted_directions(method):
    X, labels, W = planted_concepts()
    bank = ConceptBank.from_cavs(torch.tensor(X, dtype=torch.float32), labels, method=method)
    assert bank.names == ("red", "circle", "striped", "noise")
    cos = bank.vectors[:3].numpy() @ W.T
    assert np.all(np.diag(cos) > 0.95), cos
    assert np.all(np.abs(cos - np.diag(np.diag(cos))) < 0.2)
    scores = bank.scores.numpy()
    assert np.all(scores[:3] > 0.95) and scores[3] < 0.65  # in-sample AUC: visible vs not visible
    assert bank.metadata["method"] == method and bank.metadata["n_positive"][0] == int(labels["red"].sum())


def test_from_cavs_mean_difference_is_the_class_mean_difference():
    X, labels, _ = planted_concepts(n=50)
    bank = ConceptBank.from_cavs(X, labels.astype(int), method="mean_difference", normalize=False)
    y = labels["circle"].to_numpy()
    np.testing.assert_allclose(bank.vectors[1].numpy(), X[y].mean(0) - X[~y].mean(0), rtol=1e-5)


def test_from_cavs_errors():
    X, labels, _ = planted_concepts(n=40)
    with pytest.raises(TypeError, match="pandas DataFrame"):
        ConceptBank.from_cavs(X, labels.to_numpy())
    with pytest.raises(ValueError, match="X has 39 rows but concept_labels has 40"):
        ConceptBank.from_cavs(X[:39], labels)
    constant = labels.assign(red=True)
    with pytest.raises(ValueError, match="concept 'red' has 40 positives out of 40"):
        ConceptBank.from_cavs(X, constant)
    with pytest.raises(ValueError, match="boolean or 0/1"):
        ConceptBank.from_cavs(X, labels.assign(red=2))
    with pytest.raises(ValueError, match="method"):
        ConceptBank.from_cavs(X, labels, method="svm")
    with pytest.raises(ValueError, match="NaN"):
        ConceptBank.from_cavs(np.full_like(X, np.nan), labels)
    with pytest.raises(ValueError, match="no columns"):
        ConceptBank.from_cavs(X, labels[[]])
    with pytest.raises(ValueError, match=r"shape \[n, d\]"):
        ConceptBank.from_cavs(X[0], labels)


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path):
    bank = ConceptBank(torch.randn(5, 7), names=list("abcde"), scores=torch.rand(5),
                       metadata={"model": "tiny", "layer": "visual.proj", "nested": {"k": [1, 2]}})
    folder = bank.save(tmp_path / "bank")
    assert sorted(p.name for p in folder.iterdir()) == ["bank.json", "vectors.safetensors"]
    for path in (folder, folder / "bank.json", folder / "vectors.safetensors"):
        back = ConceptBank.load(path)
        assert torch.equal(back.vectors, bank.vectors) and torch.equal(back.scores, bank.scores)
        assert back.names == bank.names and dict(back.metadata) == dict(bank.metadata)
        assert back.metadata["nested"]["k"] == (1, 2)
    no_scores = ConceptBank.load(ConceptBank(torch.ones(1, 2)).save(tmp_path / "b2"))
    assert no_scores.scores is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        bank.save(tmp_path / "file")


def _edit_json(folder, **changes):
    doc = json.loads((folder / "bank.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del doc[key]
        else:
            doc[key] = value
    (folder / "bank.json").write_text(json.dumps(doc))


def test_load_reports_the_file_and_field(tmp_path):
    def fresh(name):
        return ConceptBank(torch.randn(3, 4), names=["a", "b", "c"], scores=[1, 2, 3]).save(tmp_path / name)

    with pytest.raises(FileNotFoundError, match="no ConceptBank folder"):
        ConceptBank.load(tmp_path / "missing")
    f = fresh("nojson")
    (f / "bank.json").unlink()
    with pytest.raises(FileNotFoundError, match="bank.json is missing"):
        ConceptBank.load(f)
    f = fresh("badjson")
    (f / "bank.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bank\.json: not valid JSON"):
        ConceptBank.load(f)
    f = fresh("list")
    (f / "bank.json").write_text("[]")
    with pytest.raises(ValueError, match="JSON object at the top level"):
        ConceptBank.load(f)
    f = fresh("format")
    _edit_json(f, format="something.else")
    with pytest.raises(ValueError, match="field 'format' is 'something.else'"):
        ConceptBank.load(f)
    f = fresh("version")
    _edit_json(f, version=99)
    with pytest.raises(ValueError, match="field 'version' is 99"):
        ConceptBank.load(f)
    f = fresh("nonames")
    _edit_json(f, names=...)
    with pytest.raises(ValueError, match=r"bank\.json: field 'names' is missing"):
        ConceptBank.load(f)
    f = fresh("names")
    _edit_json(f, names=["a", "b"])
    with pytest.raises(ValueError, match="field 'names' has 2 entries but field 'n_concepts' is 3"):
        ConceptBank.load(f)
    f = fresh("namestype")
    _edit_json(f, names=[1, 2, 3])
    with pytest.raises(ValueError, match="field 'names' must be a list of strings"):
        ConceptBank.load(f)
    f = fresh("dimtype")
    _edit_json(f, dim="4")
    with pytest.raises(ValueError, match="field 'dim' must be int"):
        ConceptBank.load(f)
    f = fresh("shape")
    _edit_json(f, dim=5)
    with pytest.raises(ValueError, match=r"vectors\.safetensors: tensor 'vectors' has shape \(3, 4\).*dim=5"):
        ConceptBank.load(f)
    f = fresh("corrupt")
    (f / "vectors.safetensors").write_bytes(b"\x00garbage" * 5)
    with pytest.raises(ValueError, match=r"vectors\.safetensors: cannot read the safetensors file"):
        ConceptBank.load(f)
    f = fresh("noscores")
    ConceptBank(torch.randn(3, 4)).save(tmp_path / "other")
    (f / "vectors.safetensors").write_bytes((tmp_path / "other" / "vectors.safetensors").read_bytes())
    with pytest.raises(ValueError, match="tensor 'scores' is missing"):
        ConceptBank.load(f)
    f = fresh("dupnames")
    _edit_json(f, names=["a", "a", "c"])
    with pytest.raises(ValueError, match="saved bank is invalid: concept names must be unique"):
        ConceptBank.load(f)


# ----------------------------------------------------------------------------- concept lists from files
def test_read_concept_lists(tmp_path):
    txt = tmp_path / "concepts.txt"
    txt.write_text("# header\nstriped fur\n\n  whiskers  \npointy ears\n")
    assert read_concept_list(txt) == ["striped fur", "whiskers", "pointy ears"]
    js = tmp_path / "results.json"
    js.write_text(json.dumps({"cat": ["whiskers", " "], "dog": ["floppy ears"]}))
    assert read_concept_list(js) == {"cat": ["whiskers"], "dog": ["floppy ears"]}
    assert read_class_concepts(js)["dog"] == ["floppy ears"]
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        read_concept_list(bad)
    bad.write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_class_concepts(bad)
    bad.write_text(json.dumps({"cat": "whiskers"}))
    with pytest.raises(ValueError, match="class 'cat' must map to a list of strings"):
        read_class_concepts(bad)
    with pytest.raises(FileNotFoundError, match="no concept list"):
        read_concept_list(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="no concept list"):
        read_class_concepts(tmp_path / "missing.json")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        read_concept_list(binary)


def planted_encoder() -> HashEncoder:
    """Texts with planted cosines: crimson~red 0.98, scarlet~red 0.90, 'a dog'~dog 0.92."""
    def v(*xs):
        return list(xs) + [0.0] * (6 - len(xs))

    table = {
        "red": v(1, 0), "crimson": v(0.98, np.sqrt(1 - 0.98**2)), "scarlet": v(0.9, 0, np.sqrt(1 - 0.81)),
        "dog": v(0, 0, 0, 1), "a dog": v(0, 0, 0, 0.92, np.sqrt(1 - 0.92**2)), "fur": v(0, 0, 0, 0, 0, 1),
        "cat": v(0, 0.3, 0, 0, 0, -0.954),
    }
    return HashEncoder(dim=6, table=table)


def test_filter_concepts_drops_duplicates_near_duplicates_and_class_names():
    enc = planted_encoder()
    concepts = ["red", "Red ", "crimson", "scarlet", "a dog", "fur"]
    r = filter_concepts(concepts, enc, class_names=["dog", "cat"])
    assert r.kept == ["red", "scarlet", "fur"]
    d = r.dropped.set_index("concept")
    assert d.loc["Red", "reason"] == "duplicate" and d.loc["Red", "similar_to"] == "red"
    assert d.loc["crimson", "reason"] == "near_duplicate" and d.loc["crimson", "similar_to"] == "red"
    assert d.loc["crimson", "similarity"] == pytest.approx(0.98, abs=1e-5)
    assert d.loc["a dog", "reason"] == "class_name" and d.loc["a dog", "similar_to"] == "dog"
    assert d.loc["a dog", "similarity"] == pytest.approx(0.92, abs=1e-5)
    # thresholds are arguments: a stricter near-duplicate threshold also drops scarlet (0.90)
    r2 = filter_concepts(concepts, enc, class_names=["dog"], near_duplicate_threshold=0.85,
                         class_similarity_threshold=0.95)
    assert r2.kept == ["red", "a dog", "fur"]
    assert set(r2.dropped["reason"]) == {"duplicate", "near_duplicate"}
    # exact duplicates only: no encoder needed
    r3 = filter_concepts(concepts, near_duplicate_threshold=None, class_similarity_threshold=None)
    assert r3.kept == ["red", "crimson", "scarlet", "a dog", "fur"]
    assert list(r3.dropped.columns) == ["concept", "reason", "similar_to", "similarity"]


def test_filter_class_concepts_filters_within_each_class():
    enc = planted_encoder()
    r = filter_class_concepts({"dog": ["fur", "a dog", "red", "crimson"], "cat": ["fur", "red", "red"]}, enc)
    assert r.kept == {"dog": ["fur", "red"], "cat": ["fur", "red"]}
    rows = {(row["class"], row["concept"]): row["reason"] for _, row in r.dropped.iterrows()}
    assert rows == {("dog", "a dog"): "class_name", ("dog", "crimson"): "near_duplicate", ("cat", "red"): "duplicate"}


def test_filter_errors():
    enc = planted_encoder()
    with pytest.raises(ValueError, match="needs a text encoder"):
        filter_concepts(["red"])
    with pytest.raises(ValueError, match="needs a text encoder"):
        filter_class_concepts({"dog": ["red"]})
    with pytest.raises(ValueError, match=r"near_duplicate_threshold must be a cosine in \[-1, 1\]"):
        filter_concepts(["red"], enc, near_duplicate_threshold=1.5)
    with pytest.raises(ValueError, match="class_similarity_threshold"):
        filter_class_concepts({"dog": ["red"]}, enc, class_similarity_threshold=2)
    with pytest.raises(TypeError, match="dict"):
        filter_class_concepts(["red"], enc)
    with pytest.raises(TypeError, match="list of strings"):
        filter_concepts("red", enc)
    with pytest.raises(TypeError, match=r"class_concepts\['dog'\] must contain only strings"):
        filter_class_concepts({"dog": ["red", 1]}, enc)
