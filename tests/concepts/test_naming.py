"""Discover-then-name against ground truth: text embeddings of ConceptWorld concepts are named back exactly
by a (tiny, random-init, injective) open_clip text encoder; image-derived class-mean differences are named
by an oracle image encoder with planted features; flags, margins, vocabularies and errors."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch

from concepts.bank import ConceptBank
from concepts.encoders import OpenCLIPEncoder
from concepts.naming import (
    NamingAccuracy,
    name_concepts,
    naming_accuracy,
    naming_summary,
    top_names,
    world_naming_accuracy,
)
from concepts.vocabularies import (
    ConceptVocabulary,
    conceptworld_vocabulary,
    english_vocabulary,
    get_vocabulary,
    user_vocabulary,
)
from concepts.world import ConceptWorld
from concepts.world.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def tiny_clip():
    """A tiny random-init open_clip CLIP (offline: the BPE vocabulary ships with open_clip)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16),
            text_cfg=dict(context_length=16, vocab_size=49408, width=32, layers=1, heads=2),
        ).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    return OpenCLIPEncoder(model, open_clip.image_transform(32, is_train=False), tokenizer, device="cpu")


def shuffled_bank(encoder, vocab: ConceptVocabulary, seed: int = 0, templates=None) -> ConceptBank:
    perm = np.random.default_rng(seed).permutation(len(vocab))
    return ConceptBank.from_texts(encoder, [vocab.phrases[i] for i in perm], templates,
                                  names=[vocab.names[i] for i in perm])


# ----------------------------------------------------------------------------- ground truth: text banks
def test_text_bank_of_conceptworld_concepts_is_named_back_exactly(tiny_clip):
    vocab = conceptworld_vocabulary()
    bank = shuffled_bank(tiny_clip, vocab)
    table = name_concepts(bank, tiny_clip, "conceptworld", top_m=3)
    assert top_names(table) == list(bank.names)
    top = table[table["rank"] == 1]
    assert np.allclose(top["similarity"], 1.0, atol=1e-5)
    assert (top["margin"] > 0).all() and not top["duplicate"].any()
    assert (top["phrase"].tolist() == [vocab.phrase(n) for n in bank.names])
    assert table.attrs["vocabulary"] == "conceptworld" and table.attrs["vocabulary_size"] == 55
    acc = naming_accuracy(bank, tiny_clip, "conceptworld")
    assert acc.top1 == 1.0 and acc.top_m == 1.0 and acc.mean_rank == 1.0
    assert set(acc.by_family["family"]) == set(Vocabulary().families) and (acc.by_family["top1"] == 1.0).all()


def test_naming_with_templates_and_bare_words_recovers_every_name(tiny_clip):
    templates = ["a picture of {}.", lambda c: f"an image showing {c}"]
    vocab = conceptworld_vocabulary(style="bare")
    bank = shuffled_bank(tiny_clip, vocab, seed=1, templates=templates)
    table = name_concepts(bank, tiny_clip, vocab, templates=templates)
    assert top_names(table) == list(bank.names)
    assert table.attrs["templates"] == ["a picture of {}.", "an image showing {}"]
    # without the templates the embeddings differ, so the similarities are no longer 1
    plain = name_concepts(bank, tiny_clip, vocab, top_m=1)
    assert plain["similarity"].max() < 0.9999


def test_english_vocabulary_names_a_bank_of_imagenet_words(tiny_clip):
    vocab = english_vocabulary()
    assert len(vocab) == 998 and len(set(vocab.names)) == 998 and "goldfish" in vocab.names
    words = [vocab.names[i] for i in np.random.default_rng(0).choice(len(vocab), 40, replace=False)]
    bank = ConceptBank.from_texts(tiny_clip, words)
    embedded = vocab.embed(tiny_clip)  # embed once, reuse
    assert top_names(name_concepts(bank, vocabulary=embedded, top_m=2)) == words
    assert naming_accuracy(bank, vocabulary=embedded).top1 == 1.0
    # the true names are the truth: a wrong assignment scores as wrong
    wrong = naming_accuracy(bank, vocabulary=embedded, true_names=words[1:] + words[:1])
    assert wrong.top1 == 0.0 and wrong.mean_rank > 1


def test_similarities_margins_and_flags_match_a_direct_computation(monkeypatch):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(12)]
    E = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(12, 8)), dtype=torch.float32), dim=1)
    encoder = lambda texts: E[[words.index(t) for t in texts]]  # noqa: E731
    V = torch.tensor(rng.normal(size=(6, 8)), dtype=torch.float32)
    V[5] = V[4] * 2.0  # two concepts share their top name
    table = name_concepts(V, encoder, words, top_m=4, min_similarity=0.5)
    S = torch.nn.functional.normalize(V, dim=1) @ E.T
    order = torch.argsort(S, dim=1, descending=True)
    for c in range(6):
        rows = table[table["concept"] == c].sort_values("rank")
        assert rows["name"].tolist() == [words[j] for j in order[c, :4]]
        sims = S[c, order[c, :5]].numpy()
        np.testing.assert_allclose(rows["similarity"], sims[:4], atol=1e-6)
        np.testing.assert_allclose(rows["margin"], sims[:4] - sims[1:5], atol=1e-6)
        np.testing.assert_array_equal(rows["low_similarity"], sims[:4] < 0.5)
    top = table[table["rank"] == 1].set_index("concept")
    assert top.loc[4, "duplicate"] and top.loc[5, "duplicate"] and top.loc[4, "name"] == top.loc[5, "name"]
    assert top.loc[:3, "duplicate"].sum() == sum(
        top.loc[c, "name"] in set(top.drop(index=c)["name"]) for c in range(4)
    )
    assert not table[table["rank"] > 1]["duplicate"].any()
    summary = naming_summary(table)
    assert summary["n_concepts"] == 6 and summary["duplicate_rate"] == top["duplicate"].mean() >= 2 / 6
    assert summary["low_similarity_rate"] == pytest.approx(float((S.max(dim=1).values < 0.5).float().mean()))
    # centring: cosine to the renormalised, mean-subtracted vocabulary embeddings
    Ec = torch.nn.functional.normalize(E - E.mean(0), dim=1)
    centred = name_concepts(V, encoder, words, top_m=1, center=True)
    Sc = torch.nn.functional.normalize(V, dim=1) @ Ec.T
    np.testing.assert_allclose(centred["similarity"], Sc.max(dim=1).values.numpy(), atol=1e-6)
    # large banks are processed in blocks of concept rows: same table, same accuracy
    import concepts.naming as naming_module

    acc = naming_accuracy(V, encoder, words, true_names=[words[j] for j in order[:, 1]], top_m=4)
    monkeypatch.setattr(naming_module, "_CHUNK", 4)
    blocked_table = name_concepts(V, encoder, words, top_m=4, min_similarity=0.5)
    pd.testing.assert_frame_equal(blocked_table, table, check_exact=False, atol=1e-6)
    blocked = naming_accuracy(V, encoder, words, true_names=[words[j] for j in order[:, 1]], top_m=4)
    pd.testing.assert_frame_equal(blocked.table, acc.table, check_exact=False, atol=1e-6)
    assert (blocked.table["true_rank"] == 2).all()
    assert blocked.top1 == 0.0 and blocked.top_m == 1.0 and blocked.mean_rank == 2.0
    # top_m is capped at the vocabulary size; the last margin is then undefined
    small = name_concepts(V[:1], encoder, words[:3], top_m=10)
    assert small["rank"].tolist() == [1, 2, 3] and np.isnan(small["margin"].iloc[-1])


# ----------------------------------------------------------------------------- image-derived concept vectors
class OracleImageEncoder:
    """Image features planted from the true concepts: f(x) = sum of the text embeddings of the concepts the
    image shows, plus noise. The text embeddings are near-orthogonal random vectors in 256 dimensions."""

    def __init__(self, world: ConceptWorld, n: int, seed: int, noise: float, dim: int = 256):
        self.vocab = conceptworld_vocabulary(world.vocabulary)
        batch = world.sample(n, seed=seed)
        self.truth = {hashlib.sha1(im.tobytes()).hexdigest(): row
                      for im, row in zip(batch.images, batch.concepts[list(self.vocab.names)].to_numpy())}
        rng = np.random.default_rng(123)
        self.T = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(len(self.vocab), dim)),
                                                            dtype=torch.float32), dim=1)
        self.noise, self.dim, self.embed_dim = noise, dim, dim
        self.device = torch.device("cpu")

    def encode_texts(self, texts, *, normalize=True):
        return self.T[[self.vocab.phrases.index(t) for t in texts]]

    def encode_images(self, images, *, batch_size=64, normalize=True):
        Z = torch.tensor(np.stack([self.truth[hashlib.sha1(im.tobytes()).hexdigest()] for im in images]),
                         dtype=torch.float32)
        g = torch.Generator().manual_seed(0)
        F = Z @ self.T + self.noise * torch.randn(len(Z), self.dim, generator=g)
        return torch.nn.functional.normalize(F, dim=1) if normalize else F


def test_world_naming_accuracy_recovers_planted_concepts():
    world = ConceptWorld(seed=0, image_size=32)
    exact = world_naming_accuracy(OracleImageEncoder(world, 500, 3, noise=0.0), world=world, n=500, seed=3)
    assert isinstance(exact, NamingAccuracy)
    assert exact.top1 == 1.0 and len(exact.table) == 55
    assert set(exact.table["family"]) == set(Vocabulary().families)
    # drowning the planted signal in noise makes names wrong: the accuracy measures something
    noisy = world_naming_accuracy(OracleImageEncoder(world, 500, 3, noise=4.0), world=world, n=500, seed=3)
    assert noisy.top1 < 0.7 and noisy.mean_rank > 2 * exact.mean_rank
    subset = world_naming_accuracy(OracleImageEncoder(world, 300, 4, noise=0.0), world=world, n=300, seed=4,
                                   families=["colour", "shape"], method="logistic")
    assert subset.top1 == 1.0 and sorted(subset.by_family["family"]) == ["colour", "shape"]
    assert json.loads(json.dumps(subset.to_dict()))["naming_top1"] == 1.0


def test_world_naming_accuracy_on_the_builtin_clip():
    from concepts.zoo import load

    try:
        model, preprocess, tokenizer = load("conceptworld-clip")
    except FileNotFoundError as e:
        pytest.skip(f"the built-in ConceptWorld CLIP has not been trained/exported yet: {e}")
    encoder = OpenCLIPEncoder(model, preprocess, tokenizer, device="cpu")
    acc = world_naming_accuracy(encoder, n=1000, seed=0)
    # names of image-derived concept vectors (class-mean differences) are far better than chance (1/55)
    assert acc.top1 > 10 / 55, acc.by_family
    assert acc.top_m >= acc.top1 and acc.mean_rank < 55 / 4


# ----------------------------------------------------------------------------- vocabularies
def test_conceptworld_vocabulary_covers_the_world():
    v = conceptworld_vocabulary()
    assert list(v.names) == Vocabulary().concept_names
    assert len(set(v.phrases)) == len(v)
    assert v.phrase("count=1") == "one shape" and v.phrase("orange") == "an orange shape"
    assert v.phrase("grid") == "shapes on a grid" and v.phrase("left") == "on the left"
    # apart from positions, the phrases speak the built-in CLIP's caption language (its tokenizer's words)
    from concepts.zoo.prompts import caption_words

    spoken = {w for p, f in zip(v.phrases, v.families) if f != "position" for w in p.split()}
    assert spoken <= set(caption_words())
    assert v.family_of()["red circle"] == "colour_shape"
    sub = conceptworld_vocabulary(families="count")
    assert sub.names == ("count=1", "count=2", "count=3", "count=4") and set(sub.families) == {"count"}
    assert conceptworld_vocabulary(style="bare").phrases == v.names
    assert list(v.to_frame().columns) == ["name", "phrase", "family"]
    with pytest.raises(ValueError, match="unknown ConceptWorld families"):
        conceptworld_vocabulary(families=["texture"])
    with pytest.raises(ValueError, match="style"):
        conceptworld_vocabulary(style="fancy")
    with pytest.raises(KeyError, match="not in the 'conceptworld' vocabulary"):
        v.phrase("magenta")


def test_get_vocabulary_and_user_vocabularies(tmp_path):
    assert get_vocabulary(["sky", "sky", "sea"]).names == ("sky", "sea")
    assert get_vocabulary("ConceptWorld").source == "conceptworld"
    assert len(get_vocabulary("imagenet")) == 998
    txt = tmp_path / "words.txt"
    txt.write_text("sky\nsea\n# not a word\n")
    assert get_vocabulary(txt).names == ("sky", "sea") and get_vocabulary(str(txt)).source == str(txt)
    js = tmp_path / "classes.json"
    js.write_text(json.dumps({"beach": ["sand", "sea"], "harbour": ["sea", "boats"]}))
    assert get_vocabulary(js).names == ("sand", "sea", "boats")
    v = user_vocabulary(["a", "b", "a"], phrases=["pa", "pb", "pa2"])
    assert v.names == ("a", "b") and v.phrases == ("pa", "pb")
    assert get_vocabulary(v) is v
    with pytest.raises(ValueError, match="unknown vocabulary 'klingon'"):
        get_vocabulary("klingon")
    with pytest.raises(TypeError, match="vocabulary must be"):
        get_vocabulary(42)
    with pytest.raises(ValueError, match="unique"):
        ConceptVocabulary(("a", "a"))
    with pytest.raises(ValueError, match="1 phrases for 2 names"):
        ConceptVocabulary(("a", "b"), phrases=("x",))
    with pytest.raises(ValueError, match="at least one name"):
        ConceptVocabulary(())
    with pytest.raises(ValueError, match="non-empty strings"):
        ConceptVocabulary(("a", " "))
    with pytest.raises(ValueError, match="phrases must be non-empty"):
        ConceptVocabulary(("a",), phrases=("",))
    with pytest.raises(ValueError, match="families for 1 names"):
        ConceptVocabulary(("a",), families=("x", "y"))
    with pytest.raises(TypeError, match="list of strings"):
        ConceptVocabulary("abc")
    with pytest.raises(ValueError, match="2 phrases for 1 names"):
        user_vocabulary(["a"], phrases=["x", "y"])


# ----------------------------------------------------------------------------- errors
def test_naming_errors(tiny_clip):
    bank = ConceptBank.from_texts(tiny_clip, ["a red shape", "a circle"], names=["red", "circle"])
    with pytest.raises(ValueError, match="needs a text encoder"):
        name_concepts(bank, None, "conceptworld")
    with pytest.raises(ValueError, match="have 8 features, but the vocabulary embeddings have 32"):
        name_concepts(torch.ones(2, 8), tiny_clip, ["red", "blue"])
    embedded = conceptworld_vocabulary().embed(tiny_clip)
    with pytest.raises(ValueError, match="templates only apply"):
        name_concepts(bank, vocabulary=embedded, templates="a photo of {}.")
    with pytest.raises(ValueError, match="top_m must be a positive integer"):
        name_concepts(bank, tiny_clip, top_m=0)
    with pytest.raises(TypeError, match="min_similarity"):
        name_concepts(bank, tiny_clip, min_similarity="high")
    with pytest.raises(TypeError, match="ConceptBank or a Tensor"):
        name_concepts([[1.0] * 32], tiny_clip)
    with pytest.raises(ValueError, match="NaN"):
        name_concepts(torch.full((1, 32), float("nan")), tiny_clip)
    with pytest.raises(ValueError, match="center=True needs a vocabulary of at least 2"):
        name_concepts(bank, tiny_clip, ["red"], center=True)
    with pytest.raises(ValueError, match=r"true names \['magenta'\] are not in the 'conceptworld' vocabulary"):
        naming_accuracy(bank, tiny_clip, true_names=["red", "magenta"])
    with pytest.raises(ValueError, match="1 true names for 2 concept vectors"):
        naming_accuracy(bank, tiny_clip, true_names=["red"])
    with pytest.raises(ValueError, match="pass true_names"):
        naming_accuracy(bank.vectors, tiny_clip)
    with pytest.raises(TypeError, match="name_concepts"):
        top_names(bank.to_frame())
    with pytest.raises(TypeError, match="encode_images"):
        world_naming_accuracy(lambda texts: torch.ones(len(texts), 4))
    world = ConceptWorld(seed=0, image_size=32)
    with pytest.raises(ValueError, match="no concept has at least 50 positives"):
        world_naming_accuracy(OracleImageEncoder(world, 20, 0, 0.0), world=world, n=20, min_count=50)
