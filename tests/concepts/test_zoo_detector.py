"""The shipped ConceptWorld concept detector: accuracy on real and corrupted renders, inputs, loading errors."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from concepts import zoo
from concepts.world import ConceptWorld
from concepts.zoo.checkpoint import weights_dir
from concepts.zoo.detector import (
    ConceptDetector,
    DetectorNet,
    corrupt,
    heldout_prompts,
    load_detector,
    prompt_fidelity,
)

SEED = 4242  # not a training seed (training: 20000+), not the benchmark seed (777)


@pytest.fixture(scope="module")
def det() -> ConceptDetector:
    return zoo.load("conceptworld-detector")


@pytest.fixture(scope="module")
def batch32():
    return ConceptWorld(seed=0, image_size=32).sample(300, seed=SEED)


def _acc(det, images, truth: pd.DataFrame) -> pd.Series:
    return det.accuracy(images, truth)


def test_listed_and_loads(det):
    assert "conceptworld-detector" in zoo.available()
    assert zoo.entry("conceptworld-detector").kind == "detector"
    assert det.concept_names == ConceptWorld(seed=0).concept_names
    assert det.input_size == 32


def test_accuracy_on_real_renders_32_and_64(det, batch32):
    acc32 = _acc(det, batch32.images, batch32.concepts)
    assert acc32.mean() >= 0.97
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    assert acc32[colours].min() >= 0.98
    b64 = ConceptWorld(seed=0, image_size=64).sample(200, seed=SEED + 1)
    assert _acc(det, b64.images, b64.concepts).mean() >= 0.97


def test_robust_to_generation_artefacts(det, batch32):
    """Blur, noise, colour drift and down-up scaling (what small generators do) barely hurt it."""
    x = torch.from_numpy(batch32.images).permute(0, 3, 1, 2).float() / 255
    bad = corrupt(x, torch.Generator().manual_seed(1), p_blur=1.0, p_noise=1.0, p_colour=1.0)
    assert float((bad - x).abs().mean()) > 0.02  # the corruption is real
    acc = _acc(det, bad, batch32.concepts)
    assert acc.mean() >= 0.95
    assert acc[["red", "green", "blue", "yellow", "purple", "orange"]].mean() >= 0.95
    # corruption is seeded
    again = corrupt(x, torch.Generator().manual_seed(1), p_blur=1.0, p_noise=1.0, p_colour=1.0)
    assert torch.equal(bad, again)


def test_detect_and_scores_agree_across_input_formats(det, batch32):
    imgs = batch32.images[:8]
    scores = det.scores(imgs)
    found = det.detect(imgs)
    assert list(found.columns) == det.concept_names and found.dtypes.eq(bool).all()
    assert ((scores.to_numpy() >= 0) & (scores.to_numpy() <= 1)).all()
    assert (found.to_numpy() == (scores.to_numpy() >= 0.5)).all()
    as_float_cf = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255  # [n, 3, H, W]
    as_float_cl = torch.from_numpy(imgs).float() / 255  # [n, H, W, 3] like GenerationResult.images
    pil = [Image.fromarray(a) for a in imgs]
    for other in (as_float_cf, as_float_cl, pil, batch32[:8]):
        np.testing.assert_allclose(det.scores(other).to_numpy(), scores.to_numpy(), atol=1e-5)


def test_prompt_fidelity_closed_form_and_real_reference(det):
    d = pd.DataFrame({"red": [True, False, True], "circle": [True, True, False]})
    wanted = [{"colour": {"red"}, "shape": {"circle"}}, {"colour": {"red"}, "shape": {"circle"}},
              {"colour": {"red"}, "shape": set()}]
    q = prompt_fidelity(d, wanted)
    assert q["colour"] == round(2 / 3, 4) and q["shape"] == 1.0 and q["shape_all"] == 1.0
    # real renders of the held-out captions: what a perfect generator would score
    caps, wanted = heldout_prompts(120, seed=SEED)
    real = ConceptWorld(seed=0, image_size=32).sample(120, seed=SEED)
    assert caps == real.captions
    for i, w in enumerate(wanted):
        for fam in ("colour", "shape", "colour_shape", "size", "count", "background"):
            assert all(real.concepts.loc[i, c] for c in w[fam])
    q = prompt_fidelity(det.detect(real.images), wanted)
    assert q["colour"] >= 0.97 and q["shape"] >= 0.95


def test_errors(det, tmp_path, batch32):
    with pytest.raises(FileNotFoundError, match="detector folder not found"):
        load_detector(tmp_path / "missing")
    folder = tmp_path / "det"
    shutil.copytree(weights_dir("conceptworld-detector"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    bad = dict(cfg, format="something-else")
    (folder / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="key 'format'"):
        load_detector(folder)
    (folder / "config.json").write_text(json.dumps(dict(cfg, concept_names=cfg["concept_names"][:3])))
    with pytest.raises(ValueError, match="concept_names"):
        load_detector(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    raw = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(raw[:-64] + bytes(64))
    with pytest.raises(ValueError, match="SHA-256"):
        load_detector(folder)
    with pytest.raises(ValueError, match="one per concept"):
        ConceptDetector(det.net, det.concept_names, thresholds=[0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[n, 3, H, W\]"):
        det.scores(torch.rand(2, 5, 32, 32))
    with pytest.raises(ValueError, match="truth lacks concept column"):
        det.accuracy(batch32.images[:2], batch32.concepts[["red"]].iloc[:2])
    with pytest.raises(ValueError, match="one per image"):
        prompt_fidelity(det.detect(batch32.images[:2]), [{}])
    with pytest.raises(ValueError, match="divisible by 8"):
        DetectorNet(5, input_size=30)
    with pytest.raises(ValueError, match=r"corrupt expects"):
        corrupt(torch.rand(2, 32, 32), torch.Generator())


def test_detector_training_resumes_exactly_and_refuses_another_config(tmp_path):
    import dataclasses

    from concepts.zoo.train_detector import DetectorConfig, DetectorTrainer

    cfg = DetectorConfig(width=8, hidden=16, batch_32=4, batch_64=2, batch_128=1, total_steps=4, checkpoint_every=2,
                         warmup_steps=1, monitor_size=4)
    DetectorTrainer(cfg).fit(tmp_path / "ck", progress=False, max_steps=2)  # "killed" after step 2
    resumed = DetectorTrainer(cfg).fit(tmp_path / "ck", progress=False)
    straight = DetectorTrainer(cfg).fit(None, progress=False)
    assert resumed.step_index == straight.step_index == 4
    assert [h["step"] for h in resumed.history] == [2, 4]
    for a, b in zip(resumed.trained.state_dict().values(), straight.trained.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="different config"):
        DetectorTrainer(dataclasses.replace(cfg, lr=0.5)).fit(tmp_path / "ck", progress=False)
    out = resumed.export(tmp_path / "export", eval_n=8)
    loaded = load_detector(tmp_path / "export")
    assert out["weights"]["sha256"] and loaded.concept_names == resumed.concept_names
