"""Blindspots against ConceptWorld ground truth: caption parsing, planted-bias generators, the concept lens
(built-in CLIP + SAE), unit-to-concept maps, planted recovery, null comparisons and the detector referee."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from concepts.world import ConceptWorld, Vocabulary
from evaluation.blindspots import find_blindspots
from evaluation.blindspots_coder import BUILTIN_LAYER, ConceptCoder, default_layer
from evaluation.blindspots_world import (
    WorldGenerator,
    detector_agreement,
    detector_comparison,
    label_changes,
    parse_caption,
    planted_recovery,
    scene_concepts,
    unit_concept_map,
)

N = 300


# ------------------------------------------------------------------------------------------- captions and planting
def test_parse_caption_recovers_every_object_of_conceptworld_captions():
    batch = ConceptWorld(seed=3, image_size=32).sample(200, seed=4)
    for i in range(len(batch)):
        objects, background = parse_caption(batch.captions[i])
        truth = batch.objects[batch.objects["image"] == i]
        assert sorted(objects) == sorted(zip(truth["size"], truth["colour"], truth["shape"]))
        assert background == batch.backgrounds[i]
    assert parse_caption("a photo of a large red circle on dots") == ([("large", "red", "circle")], "dots")
    with pytest.raises(ValueError, match="cannot read a background"):
        parse_caption("a red circle")
    with pytest.raises(ValueError, match="cannot read object phrase"):
        parse_caption("a large red blob on dots")
    with pytest.raises(TypeError, match="string"):
        parse_caption(3)


def test_world_generator_draws_captions_faithfully_except_planted_concepts():
    batch = ConceptWorld(seed=0, image_size=32).sample(300, seed=5)
    seeds = list(range(300))
    v = Vocabulary()
    cols = [c for fam in ("colour", "shape", "colour_shape", "size", "count", "background") for c in v.families[fam]]
    faithful = WorldGenerator()
    out = faithful.generate(batch.captions, seeds)
    np.testing.assert_array_equal(faithful.concepts(out)[cols].to_numpy(), batch.concepts[cols].to_numpy())
    np.testing.assert_array_equal(out.images.numpy(), faithful.generate(batch.captions, seeds).images.numpy())
    # the drawn pixels carry the recorded colours
    red_rgb = np.array(v.colours["red"]) / 255.0
    has_red = (np.abs(out.images.numpy() - red_rgb).sum(-1) < 1e-6).any(axis=(1, 2))
    np.testing.assert_array_equal(has_red, batch.concepts["red"].to_numpy())

    planted = WorldGenerator(suppress={"red": 1.0, "stripes": 1.0}, exaggerate={"dots": 0.5})
    lab = planted.concepts(planted.generate(batch.captions, seeds))
    assert not lab["red"].any() and not lab["stripes"].any()
    assert lab["dots"].mean() > 0.5 > batch.concepts["dots"].mean()
    assert lab["count=2"].tolist() == batch.concepts["count=2"].tolist()  # counts are never touched
    assert planted.planted == {"red": "suppressed", "stripes": "suppressed", "dots": "exaggerated"}
    pair = WorldGenerator(suppress={"blue star": 1.0}).concepts(WorldGenerator(suppress={"blue star": 1.0}).generate(
        batch.captions, seeds))
    assert not pair["blue star"].any() and pair["star"].sum() == batch.concepts["star"].sum()

    copy = batch.images[0]
    mem = WorldGenerator(copies={batch.captions[0]: copy}).generate(batch.captions[:2], [0, 1])
    np.testing.assert_array_equal((mem.images[0].numpy() * 255).round().astype(np.uint8), copy)
    assert [r["copied"] for r in mem.records] == [True, False]


def test_world_generator_validates_plants():
    with pytest.raises(ValueError, match="cannot plant a bias on 'count=2'"):
        WorldGenerator(suppress={"count=2": 1.0})
    with pytest.raises(ValueError, match="unknown concept"):
        WorldGenerator(suppress={"pink": 1.0})
    with pytest.raises(ValueError, match="probability in"):
        WorldGenerator(exaggerate={"red": 2.0})
    with pytest.raises(ValueError, match="every other value"):
        WorldGenerator(suppress={"small": 1.0, "large": 1.0}).generate(["a large red circle on dots"], [0])
    with pytest.raises(ValueError, match="one seed per prompt"):
        WorldGenerator().generate(["a large red circle on dots"], [0, 1])


def test_scene_concepts_positions():
    lab = scene_concepts([{"objects": [("small", "red", "circle", 8)], "background": "grid"}])
    assert lab.loc[0, ["right", "bottom", "left", "top", "grid", "red circle"]].tolist() == [
        True, True, False, False, True, True]


def test_unit_concept_map_matches_sklearn_auroc():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = pd.DataFrame(rng.random((200, 3)) < 0.4, columns=["a", "b", "c"])
    energy = np.c_[labels["b"] * 2.0 + rng.random(200) * 0.5, rng.random(200), np.zeros(200)]
    m = unit_concept_map(energy, labels)
    assert m.loc[0, "truth"] == "b" and m.loc[0, "mapped"]
    assert m.loc[0, "auroc"] == pytest.approx(roc_auc_score(labels["b"], energy[:, 0]))
    best1 = max(roc_auc_score(labels[c], energy[:, 1]) for c in "abc")
    assert m.loc[1, "auroc"] == pytest.approx(best1) and not m.loc[1, "mapped"]
    assert np.isnan(m.loc[2, "auroc"]) and not m.loc[2, "mapped"]  # a dead unit maps to nothing
    with pytest.raises(ValueError, match="one row per image"):
        unit_concept_map(energy[:10], labels)


def test_label_changes_and_recovery_definitions():
    real = pd.DataFrame({"red": [True] * 10 + [False] * 10, "red circle": [True] * 5 + [False] * 15,
                         "dots": [True] * 2 + [False] * 18, "blue": [True] * 10 + [False] * 10})
    gen = pd.DataFrame({"red": [False] * 20, "red circle": [False] * 20, "dots": [True] * 10 + [False] * 10,
                        "blue": [True] * 12 + [False] * 8})
    truth = label_changes(real, gen)
    assert truth["change"].tolist() == ["suppressed", "suppressed", "exaggerated", ""]
    table = pd.DataFrame({"concept": [0, 1, 2, 3, 4], "status": ["suppressed", "exaggerated", "suppressed",
                                                                 "exaggerated", "aligned"]})
    units = pd.DataFrame({"concept": [0, 1, 2, 3, 4], "truth": ["red circle", "dots", "blue", "", "red"],
                          "auroc": [0.95, 0.99, 0.97, 0.6, 0.99], "mapped": [True, True, True, False, True]})
    rec = planted_recovery(table, units, truth, {"red": "suppressed", "dots": "exaggerated"})
    # flagged concepts: red circle (correct), dots (correct), blue (wrong); unit 3 is unmapped
    assert rec["precision"] == pytest.approx(2 / 3) and rec["recall"] == 1.0
    assert rec["n_unmapped_flagged"] == 1 and rec["n_flagged_concepts"] == 3
    with pytest.raises(ValueError, match="planted is empty"):
        planted_recovery(table, units, truth, {})
    with pytest.raises(ValueError, match="'suppressed' or 'exaggerated'"):
        planted_recovery(table, units, truth, {"red": "gone"})
    with pytest.raises(ValueError, match="same concept columns"):
        label_changes(real, gen[["red"]])


# ------------------------------------------------------------------------------------------- the lens
@pytest.fixture(scope="module")
def world_setup():
    """A real ConceptWorld set with rare dots (9 %), a fitted built-in lens, and a labelled reference sample."""
    torch.manual_seed(0)
    real = ConceptWorld(seed=0, image_size=32, background_probs={"dots": 0.3}).sample(N, seed=1)
    coder = ConceptCoder.builtin(n_concepts=64, top_k=4, n_epochs=8, max_train_tokens=4000,
                                 progress=False, random_state=0).fit(real.images)
    ref = ConceptWorld(seed=0, image_size=32).sample(N, seed=2)
    unit_map = unit_concept_map(coder.transform(ref.images), ref.concepts)
    return real, coder, unit_map


def test_builtin_lens_pools_tokens_and_names_units(world_setup):
    real, coder, unit_map = world_setup
    assert coder.layer_ == BUILTIN_LAYER and coder.tokens_per_image_ == 16
    e = coder.transform(real.images[:40])
    assert e.energy.shape == (40, 64) and e.embeddings.shape == (40, 64)
    np.testing.assert_array_equal(e.energy > 0, e.fired > 0)
    assert e.fired.max() <= 16
    mean = ConceptCoder(coder.encoder, BUILTIN_LAYER, pooling="mean", sae=coder.sae_, progress=False).fit(
        real.images[:40]).transform(real.images[:40])
    mx = ConceptCoder(coder.encoder, BUILTIN_LAYER, pooling="max", sae=coder.sae_, progress=False).fit(
        real.images[:40]).transform(real.images[:40])
    np.testing.assert_allclose(mean.energy * 16, e.energy, rtol=1e-4, atol=1e-5)
    assert (mx.energy <= e.energy + 1e-5).all() and (mx.energy * 16 >= e.energy - 1e-4).all()
    # the lens sees the main ConceptWorld concepts, and names read by the text tower match the truth
    visible = set(unit_map.loc[unit_map["mapped"], "truth"])
    assert {"red", "stripes", "dots"} <= visible
    named = unit_map[unit_map["mapped"]].merge(coder.names_, on="concept")
    colour = named[named["truth"].map(lambda t: t.split(" ")[0] in Vocabulary().colours)]
    assert len(colour) >= 5
    agree = colour.apply(lambda r: r["name"].split(" ")[0] == r["truth"].split(" ")[0], axis=1).mean()
    assert agree >= 0.8


def test_coder_reuses_fitted_sae_and_clones_unfitted(world_setup):
    from sklearn.exceptions import NotFittedError

    from sae import TopKSAE

    real, coder, _ = world_setup
    reused = ConceptCoder(coder.encoder, BUILTIN_LAYER, sae=coder.sae_, progress=False).fit(real.images[:30])
    assert reused.sae_ is coder.sae_
    raw = TopKSAE(n_concepts=16, top_k=2, n_epochs=1, b_dec_init="mean", random_state=0)
    fitted = ConceptCoder(coder.encoder, BUILTIN_LAYER, sae=raw, progress=False).fit(real.images[:30])
    assert fitted.sae_ is not raw and not hasattr(raw, "dictionary_") and fitted.sae_.dictionary_.shape == (16, 256)
    with pytest.raises(ValueError, match="expects 256 features"):
        ConceptCoder(coder.encoder, "visual.layer4", sae=coder.sae_, progress=False).fit(real.images[:30])
    with pytest.raises(NotFittedError, match="not fitted"):
        ConceptCoder(coder.encoder).transform(real.images[:3])
    with pytest.raises(ValueError, match="tokens must be one of"):
        ConceptCoder(coder.encoder, tokens="every").fit(real.images[:3])
    with pytest.raises(ValueError, match="no 'cls' tokens"):
        ConceptCoder(coder.encoder, BUILTIN_LAYER, tokens="cls", sae=coder.sae_, progress=False).fit(real.images[:3])
    with pytest.raises(ValueError, match="non-empty string"):
        ConceptCoder.from_spec("")
    with pytest.raises(TypeError, match="extractor"):
        ConceptCoder(object()).fit(real.images[:3])


def test_coder_selects_vit_token_types_on_a_tiny_dinov2():
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from concepts.encoders import DINOv2Encoder

    torch.manual_seed(0)
    cfg = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=8, image_size=32, num_register_tokens=4)
    enc = DINOv2Encoder(Dinov2WithRegistersModel(cfg))
    assert default_layer(enc) == "layernorm"
    images = ConceptWorld(seed=0, image_size=32).sample(12, seed=0).images
    counts = {}
    for tokens in ("patch", "all", "cls"):
        c = ConceptCoder(enc, tokens=tokens, n_concepts=8, top_k=2, n_epochs=1, vocabulary=None,
                         progress=False).fit(images)
        counts[tokens] = c.tokens_per_image_
        assert c.names[0] == "unit 0" or c.names[0].endswith("(silent on real)")
    assert counts == {"patch": 16, "all": 21, "cls": 1}


# ------------------------------------------------------------------------------------------- planted recovery
@pytest.fixture(scope="module")
def planted_run(world_setup):
    real, coder, _ = world_setup
    planted = WorldGenerator(suppress={"red": 1.0, "stripes": 1.0}, exaggerate={"dots": 0.7})
    independent = ConceptWorld(seed=0, image_size=32, background_probs={"dots": 0.3}).sample(N, seed=77)
    memorizer = WorldGenerator(copies={real.captions[i]: real.images[i] for i in (5, 50, 150)})
    analysis = find_blindspots(real.images, real.captions, generators={"planted": planted, "memorizer": memorizer},
                               generated={"independent": independent.images}, coder=coder, n_bootstrap=200,
                               progress=False)
    return planted, analysis


def test_planted_blindspots_are_found_with_full_precision_and_recall(world_setup, planted_run):
    real, _, unit_map = world_setup
    planted, analysis = planted_run
    truth = label_changes(real.concepts, planted.concepts(planted.generate(real.captions, analysis.seeds)))
    rec = planted_recovery(analysis.results["planted"].concepts, unit_map, truth, planted.planted)
    assert all(rec["visible"].values())
    assert rec["recall"] == 1.0 and rec["precision"] >= 0.9, rec["table"]
    flagged = analysis.results["planted"].flagged()
    assert set(flagged["status"]) == {"suppressed", "exaggerated"}


def test_planted_copies_are_memorization_candidates(planted_run):
    _, analysis = planted_run
    pairs = analysis.results["memorizer"].pairs
    copied = pairs.loc[[5, 50, 150]]
    assert (copied["relative_distance"] == 0).all() and (copied["pixel_similarity"] == 1.0).all()
    flagged = pairs[pairs["flag"] == "memorization_candidate"]
    assert len(set(flagged.index) & {5, 50, 150}) >= 2 and (flagged["pixel_similarity"] >= 0.95).all()
    assert analysis.results["memorizer"].summary()["suppressed"] == 0  # copies change no concept


def test_null_comparison_of_two_independent_samples_flags_nothing(planted_run):
    _, analysis = planted_run
    res = analysis.results["independent"]
    assert res.summary()["suppressed"] == 0 and res.summary()["exaggerated"] == 0
    assert res.summary()["n_tested"] >= 20
    assert len(analysis.cross) == 3


def test_detector_referee_sees_the_planted_suppression(world_setup, planted_run):
    from concepts import zoo

    real, _, unit_map = world_setup
    _, analysis = planted_run
    det = detector_comparison(zoo.load("conceptworld-detector"), real.images, analysis.generated["planted"],
                              n_bootstrap=50)
    status = det.set_index("truth")["status"]
    assert status["red"] == "suppressed" and status["stripes"] == "suppressed" and status["blue"] == "aligned"
    agree = detector_agreement(analysis.results["planted"].concepts, unit_map, det)
    assert agree["precision"] == 1.0 and agree["n_visible"] >= 10


def test_coder_from_open_clip_local_dir_spec(tmp_path):
    """``--encoder local-dir:PATH``: a tiny random open_clip ViT; patch tokens exclude the class token; names come
    from its text tower through the naming module."""
    import json

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}))
    torch.manual_seed(0)
    images = ConceptWorld(seed=0, image_size=32).sample(12, seed=0).images
    kw = {"n_concepts": 8, "top_k": 2, "n_epochs": 1, "progress": False}
    patch = ConceptCoder.from_spec(f"local-dir:{tmp_path}", **kw).fit(images)
    assert patch.layer_ == "visual.transformer.resblocks.1" and patch.tokens_per_image_ == 16
    vocabulary = set(Vocabulary().concept_names)
    assert all(n in vocabulary or n.endswith("(silent on real)") for n in patch.names)
    every = ConceptCoder(patch.encoder, tokens="all", sae=patch.sae_, progress=False).fit(images)
    assert every.tokens_per_image_ == 17
