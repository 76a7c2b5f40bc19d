"""The built-in ConceptWorld CLIP (concepts.zoo): quality against ConceptWorld labels, open_clip-compatible
tokenizer and preprocessing, verified loading, determinism, and the training step."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from concepts import zoo
from concepts.world import ConceptWorld
from concepts.zoo.checkpoint import weights_dir
from concepts.zoo.clip import build_preprocess, fast_normalize, load_clip
from concepts.zoo.prompts import (
    CaptionSpec, Phrase, SceneTable, caption_words, concept_prompt, sample_spec, truth_matrix,
)
from concepts.zoo.quality import encode_images, encode_texts, retrieval_recall, zero_shot_auroc
from concepts.zoo.tokenizer import WordTokenizer
from concepts.zoo.train_clip import ClipTrainer, TrainConfig, multi_positive_losses

SHIPPED = weights_dir("conceptworld-clip")


@pytest.fixture(scope="module")
def clip():
    return zoo.load("conceptworld-clip")


@pytest.fixture(scope="module")
def fresh():
    # sample seed 31: not the training stream (10000), the monitor (5000) or the benchmark (777/778)
    return ConceptWorld(seed=0, image_size=64).sample(200, seed=31)


@pytest.fixture(scope="module")
def fresh_features(clip, fresh):
    model, preprocess, _ = clip
    return encode_images(model, preprocess, fresh.images)


def _tiny_config(**kw) -> TrainConfig:
    # the shipped image tower is open_clip's ModifiedResNet (vision_layers as a tuple); the doctest of
    # ClipTrainer covers the VisionTransformer path (vision_layers as an int)
    base = dict(image_size=32, vision_layers=(1, 1, 1, 1), vision_width=8, vision_head_width=16, text_width=32,
                text_layers=1, text_heads=2, embed_dim=16, batch_size=32, warmup_steps=1, lr=3e-3, monitor_size=100,
                epochs=2, steps_per_epoch=1)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------- registry
def test_registry_lists_and_loads_clip(clip):
    assert "conceptworld-clip" in zoo.available()
    assert "conceptworld-clip" in zoo.available(kind="clip")
    model, preprocess, tokenizer = clip
    import open_clip

    assert isinstance(model, open_clip.CLIP)
    assert not model.training
    assert clip.config["name"] == "conceptworld-clip"


def test_registry_unknown_name_suggests_close_match():
    with pytest.raises(KeyError, match="conceptworld-clip"):
        zoo.load("conceptworld-clp")


def test_registry_register_rules():
    zoo.register("test-dummy", lambda device="cpu", **kw: ("dummy", device), kind="test", overwrite=True)
    assert zoo.load("test-dummy", device="meta") == ("dummy", "meta")
    assert zoo.available(kind="test") == ["test-dummy"]
    with pytest.raises(ValueError, match="already registered"):
        zoo.register("test-dummy", lambda device="cpu": None, kind="test")
    with pytest.raises(TypeError, match="package.module:function"):
        zoo.register("test-bad", "no_colon_here", kind="test")
    with pytest.raises(ValueError, match="non-empty string"):
        zoo.register("", lambda device="cpu": None, kind="test")


# ---------------------------------------------------------------------------------------------- quality
def test_zero_shot_detection_matches_conceptworld_labels(clip, fresh, fresh_features):
    model, _, tokenizer = clip
    auroc = zero_shot_auroc(model, tokenizer, fresh_features, fresh.concepts, families=("colour", "shape"))
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star", "cross"]
    assert auroc[colours].mean() > 0.9, auroc
    assert auroc[shapes].mean() > 0.85, auroc
    # a prompt for the wrong concept must not detect: "red" prompt vs "blue" labels is near chance or worse
    text = encode_texts(model, tokenizer, [concept_prompt("red")])
    from sklearn.metrics import roc_auc_score

    wrong = roc_auc_score(fresh.concepts["blue"] & ~fresh.concepts["red"], (fresh_features @ text.T)[:, 0])
    assert wrong < 0.6


def test_caption_retrieval_far_above_chance(clip, fresh, fresh_features):
    model, _, tokenizer = clip
    caps = encode_texts(model, tokenizer, fresh.captions)
    r5 = retrieval_recall(fresh_features, caps, k=5, group_size=100)
    assert r5 > 0.6  # chance is 0.05
    # shuffled pairing destroys it
    perm = torch.randperm(len(caps), generator=torch.Generator().manual_seed(0))
    assert retrieval_recall(fresh_features, caps[perm], k=5, group_size=100) < 0.25


def test_embeddings_are_deterministic(clip, fresh):
    model, preprocess, tokenizer = clip
    a = encode_images(model, preprocess, fresh.images[:16])
    b = encode_images(model, preprocess, fresh.images[:16])
    assert torch.equal(a, b)
    again, _, _ = zoo.load("conceptworld-clip")
    c = encode_images(again, preprocess, fresh.images[:16])
    assert torch.equal(a, c)
    t1 = model.encode_text(tokenizer(fresh.captions[:8]))
    t2 = again.encode_text(tokenizer(fresh.captions[:8]))
    assert torch.equal(t1, t2)


# ---------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_open_clip_layout_and_round_trip(clip):
    _, _, tok = clip
    texts = ["a photo of two small red circles and a large blue star on stripes", "a star"]
    out = tok(texts)
    assert out.dtype == torch.long and out.shape == (2, tok.context_length)
    for row, text in zip(out, texts):
        n = len(text.split()) + 2
        assert row[0] == tok.sot_token_id
        assert row[n - 1] == tok.eot_token_id and int(row.argmax()) == n - 1  # open_clip's argmax pooling
        assert (row[n:] == tok.pad_token_id).all()
        assert tok.decode(row) == text
    assert torch.equal(tok("a star"), tok(["a star"]))
    # same layout as open_clip's own tokenizer on words that are single BPE tokens
    import open_clip

    ref = open_clip.tokenize(["a red star"], context_length=tok.context_length)
    ours = tok(["a red star"])
    assert torch.equal(ref != 0, ours != 0) and int(ref.argmax()) == int(ours.argmax())


def test_tokenizer_unknown_words_and_truncation(clip):
    _, _, tok = clip
    row = tok(["a zebra star"])[0]
    assert row[2] == tok.unk_token_id and tok.decode(row) == "a <unk> star"
    long = " ".join(["red"] * 100)
    t = tok([long])[0]
    assert t[-1] == tok.eot_token_id and (t[1:-1] == tok.encode("red")[0]).all()
    assert tok([long], context_length=8).shape == (1, 8)
    assert tok("A, RED star")[0, 1:5].tolist() == tok.encode("a , red star")


def test_tokenizer_errors_and_json_round_trip(tmp_path):
    with pytest.raises(ValueError, match="context_length must be an integer >= 2"):
        WordTokenizer(["a"], context_length=1)
    with pytest.raises(TypeError, match="vocabulary words must be strings"):
        WordTokenizer(["a", 3])
    tok = WordTokenizer(caption_words(), context_length=16)
    with pytest.raises(TypeError, match="str or a sequence of str"):
        tok(42)
    with pytest.raises(TypeError, match="expected a str"):
        tok.encode(None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.sot_token_id, 999])
    with pytest.raises(ValueError, match=">= 2"):
        tok(["a"], context_length=1)
    tok.save(tmp_path / "t.json")
    back = WordTokenizer.from_file(tmp_path / "t.json")
    assert back.vocab == tok.vocab and torch.equal(back(["a red star"]), tok(["a red star"]))
    spec = json.loads((tmp_path / "t.json").read_text())
    spec["special_tokens"]["<eot>"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="bad.json.*special_tokens"):
        WordTokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="format"):
        WordTokenizer.from_dict({"vocab": []})
    with pytest.raises(ValueError, match="missing key 'vocab'"):
        WordTokenizer.from_dict({"format": "conceptkit.zoo.word_tokenizer"})
    with pytest.raises(ValueError, match="key 'vocab' must be a list"):
        WordTokenizer.from_dict({"format": "conceptkit.zoo.word_tokenizer", "vocab": ["x"], "context_length": 4,
                                 "special_tokens": {}})
    dup = tok.to_dict()
    dup["vocab"] = dup["vocab"][:2] + ["red", "red"] + dup["vocab"][-2:]
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer.from_dict(dup)


# ---------------------------------------------------------------------------------------------- preprocessing
def test_preprocess_accepts_pil_arrays_and_tensors_and_matches_fast_path(clip, fresh):
    from PIL import Image

    _, preprocess, _ = clip
    imgs = fresh.images[:4]
    via_array = torch.stack([preprocess(im) for im in imgs])
    via_pil = torch.stack([preprocess(Image.fromarray(im)) for im in imgs])
    via_tensor = torch.stack([preprocess(torch.from_numpy(im).permute(2, 0, 1)) for im in imgs])
    spec = json.loads((SHIPPED / "preprocess.json").read_text())
    fast = fast_normalize(imgs, spec)
    assert via_array.shape == (4, 3, 64, 64)
    assert torch.equal(via_array, via_pil) and torch.equal(via_array, via_tensor)
    torch.testing.assert_close(via_array, fast)
    # un-normalising recovers the pixels
    mean, std = torch.tensor(spec["mean"]).view(3, 1, 1), torch.tensor(spec["std"]).view(3, 1, 1)
    pixels = ((via_array[0] * std + mean) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(pixels, imgs[0])
    # other image sizes are resized to the model's input
    big = ConceptWorld(seed=0, image_size=128).sample(1, seed=3).images[0]
    assert preprocess(big).shape == (3, 64, 64)


def test_preprocess_rejects_wrong_inputs(clip):
    _, preprocess, _ = clip
    with pytest.raises(TypeError, match="uint8 array"):
        preprocess(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="uint8 tensor"):
        preprocess(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="PIL image"):
        preprocess("not an image")
    spec = json.loads((SHIPPED / "preprocess.json").read_text())
    with pytest.raises(TypeError, match="uint8 images"):
        fast_normalize(np.zeros((1, 64, 64, 3), dtype=np.float32), spec)
    with pytest.raises(ValueError, match="64x64"):
        fast_normalize(np.zeros((1, 32, 32, 3), dtype=np.uint8), spec)
    with pytest.raises(ValueError, match="mode"):
        build_preprocess({**spec, "mode": "L"})
    with pytest.raises(ValueError, match="missing key 'std'"):
        build_preprocess({k: v for k, v in spec.items() if k != "std"})
    with pytest.raises(ValueError, match="'mean' must be a list of 3"):
        build_preprocess({**spec, "mean": [0.5]})


# ---------------------------------------------------------------------------------------------- loading errors
@pytest.fixture()
def copy(tmp_path) -> Path:
    dst = tmp_path / "clip"
    shutil.copytree(SHIPPED, dst)
    return dst


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_load_copy_round_trip(copy, clip, fresh):
    model, preprocess, tokenizer = load_clip(copy)
    x = torch.stack([preprocess(im) for im in fresh.images[:4]])
    assert torch.equal(model.encode_image(x), clip.model.encode_image(x))


def test_load_missing_files(copy):
    (copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_clip(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_clip(copy)
    (copy / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip(copy)
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load_clip(copy / "nope")


def test_load_config_mismatch_names_file_and_key(copy):
    _edit_json(copy / "config.json", lambda c: c["model"]["vision_cfg"].update(width=c["model"]["vision_cfg"]["width"] * 2))
    with pytest.raises(ValueError, match=r"model\.safetensors.*(tensor|missing) '.*'"):
        load_clip(copy)


def test_load_wrong_tensor_shape_names_key(copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(copy / "model.safetensors"))
    tensors["text_projection"] = tensors["text_projection"][:, :-1].contiguous()
    save_file(tensors, str(copy / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'text_projection' has shape"):
        load_clip(copy)


def test_load_extra_tensor_and_checksum(copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(copy / "model.safetensors"))
    tensors["text_projection"][0, 0] += 1.0
    save_file(tensors, str(copy / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.safetensors: SHA-256 .*weights\.sha256"):
        load_clip(copy)
    tensors["surplus"] = torch.zeros(1)
    save_file(tensors, str(copy / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor 'surplus'"):
        load_clip(copy)


def test_load_corrupt_files(copy):
    (copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors"):
        load_clip(copy)
    (copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_clip(copy)
    (copy / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_clip(copy)


def test_load_inconsistent_specs(copy):
    cfg = json.loads((copy / "config.json").read_text())
    _edit_json(copy / "config.json", lambda c: c["model"]["text_cfg"].update(vocab_size=c["model"]["text_cfg"]["vocab_size"] + 1))
    with pytest.raises(ValueError, match=r"tokenizer\.json: key 'vocab'.*vocab_size"):
        load_clip(copy)
    (copy / "config.json").write_text(json.dumps(cfg))
    _edit_json(copy / "preprocess.json", lambda p: p.update(size=32))
    with pytest.raises(ValueError, match=r"preprocess\.json: key 'size'"):
        load_clip(copy)
    (copy / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "model"}))
    with pytest.raises(ValueError, match=r"config\.json: missing key 'model'"):
        load_clip(copy)
    (copy / "config.json").write_text(json.dumps({**cfg, "format": "other"}))
    with pytest.raises(ValueError, match="key 'format'"):
        load_clip(copy)
    bad = json.loads(json.dumps(cfg))
    bad["model"]["vision_cfg"]["wdth"] = 3
    (copy / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="vision_cfg"):
        load_clip(copy)
    bad = json.loads(json.dumps(cfg))
    bad["model"]["text_cfg"]["bogus"] = 3
    (copy / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="text_cfg"):
        load_clip(copy)
    bad = json.loads(json.dumps(cfg))
    bad["model"]["extra"] = 1
    (copy / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown key 'extra'"):
        load_clip(copy)


# ---------------------------------------------------------------------------------------------- caption truth
@pytest.mark.parametrize("concept", ["red", "star", "orange cross", "small", "count=1", "count=3", "stripes", "grid"])
def test_prompt_truth_equals_concept_labels(fresh, concept):
    from concepts.zoo.prompts import CaptionSpec

    fam_spec = {
        "red": CaptionSpec(phrases=(Phrase(1, colour="red"),)),
        "star": CaptionSpec(phrases=(Phrase(1, shape="star"),)),
        "orange cross": CaptionSpec(phrases=(Phrase(1, colour="orange", shape="cross"),)),
        "small": CaptionSpec(phrases=(Phrase(1, size="small"),)),
        "count=1": CaptionSpec(total=1),
        "count=3": CaptionSpec(total=3),
        "stripes": CaptionSpec(background="stripes"),
        "grid": CaptionSpec(background="grid"),
    }[concept]
    truth = truth_matrix([fam_spec], SceneTable.from_batch(fresh))[:, 0]
    assert np.array_equal(truth, fresh.concepts[concept].to_numpy())
    assert concept_prompt(concept, "{}") == fam_spec.text()


def test_sampled_captions_are_true_of_their_image_and_full_captions_match(fresh):
    rng = np.random.default_rng(0)
    objs = [[] for _ in range(len(fresh))]
    for i, size, colour, shape in fresh.objects[["image", "size", "colour", "shape"]].itertuples(index=False):
        objs[i].append((size, colour, shape))
    specs = [sample_spec(objs[i], fresh.backgrounds[i], rng) for i in range(len(fresh))]
    truth = truth_matrix(specs, SceneTable.from_batch(fresh))
    assert truth.diagonal().all()
    assert 0.02 < truth.mean() < 0.5  # partial captions are true of many images, full ones of few
    full = [CaptionSpec(objects=tuple(objs[i]), background=fresh.backgrounds[i]) for i in range(len(fresh))]
    assert [s.text() for s in full] == fresh.captions
    t_full = truth_matrix(full, SceneTable.from_batch(fresh))
    # a full caption is true exactly of the images with the same objects (any order) on the same background
    keys = [(tuple(sorted(objs[i])), fresh.backgrounds[i]) for i in range(len(fresh))]
    same_scene = np.array([[a == b for b in keys] for a in keys])
    assert np.array_equal(t_full, same_scene)
    same_caption = np.array([[a == b for b in fresh.captions] for a in fresh.captions])
    assert not (same_caption & ~t_full).any()
    # every word the sampler emits is in the tokenizer vocabulary
    words = set(caption_words())
    for s in specs:
        assert set(WordTokenizer.split(s.text())) <= words, s.text()
    with pytest.raises(ValueError, match="no prompt"):
        concept_prompt("left")
    with pytest.raises(ValueError, match="unknown caption kind"):
        sample_spec(objs[0], "plain", rng, mix={"nonsense": 1.0})


# ---------------------------------------------------------------------------------------------- training
def test_multi_positive_loss_prefers_true_pairs():
    torch.manual_seed(0)
    img = torch.randn(6, 8)
    truth = torch.eye(6, dtype=torch.bool)
    truth[0, 1] = truth[1, 0] = True
    good = multi_positive_losses(img, img.clone(), truth, torch.tensor(2.0), torch.tensor(-2.0))
    bad = multi_positive_losses(img, img[torch.randperm(6)], truth, torch.tensor(2.0), torch.tensor(-2.0))
    assert good["softmax"] < bad["softmax"] and good["sigmoid"] < bad["sigmoid"]
    none = multi_positive_losses(img, img, truth, torch.tensor(2.0), None)
    assert float(none["sigmoid"]) == 0.0


def test_training_step_decreases_loss_on_the_same_batch():
    trainer = ClipTrainer(_tiny_config())
    first = trainer.step(0)
    second = trainer.step(0)
    assert set(first) >= {"loss", "softmax", "sigmoid", "aux"}
    assert second["loss"] < first["loss"]


def test_training_resumes_exactly_and_exports_loadable_folder(tmp_path):
    cfg = _tiny_config()
    straight = ClipTrainer(cfg).fit(tmp_path / "a", progress=False)
    # interrupted after one step (epoch), then a fresh trainer resumes from the checkpoint
    ClipTrainer(cfg).fit(tmp_path / "b", progress=False, max_steps=1)
    resumed = ClipTrainer(cfg)
    assert resumed.load_checkpoint(tmp_path / "b") and resumed.step_index == 1
    resumed.fit(tmp_path / "b", progress=False)
    assert resumed.step_index == 2 and len(resumed.history) == 2
    for (k, v), w in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)
    with pytest.raises(ValueError, match="different config"):
        ClipTrainer(_tiny_config(lr=1e-2)).load_checkpoint(tmp_path / "b")

    config = resumed.export(tmp_path / "out", command="test", dtype=torch.float32)
    assert config["weights"]["n_parameters"] == sum(p.numel() for p in resumed.clip.parameters())
    model, preprocess, tokenizer = load_clip(tmp_path / "out")
    imgs = ConceptWorld(seed=0, image_size=32).sample(4, seed=1).images
    x = torch.stack([preprocess(im) for im in imgs])
    resumed.clip.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), resumed.clip.encode_image(x))
        tokens = tokenizer(["a red star", "two small blue circles on dots"])
        assert torch.equal(model.encode_text(tokens), resumed.clip.encode_text(tokens))
        # the default float16 export halves the file and keeps the embeddings (cosine > 0.999)
        resumed.export(tmp_path / "half", command="test")
        half, _, _ = load_clip(tmp_path / "half")
        cos = torch.nn.functional.cosine_similarity(half.encode_image(x), model.encode_image(x))
        assert cos.min() > 0.999
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (tmp_path / "out" / "model.safetensors").stat().st_size
