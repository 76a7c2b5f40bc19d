"""Erasure metrics against a planted truth: a 'generator' that renders ConceptWorld scenes from captions."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from concepts import zoo
from concepts.generators import GenerationResult
from concepts.world import ConceptWorld
from evaluation.erasure.metrics import (
    PromptSet,
    SAEConceptProbe,
    erasure_prompt_sets,
    erasure_sweep,
    evaluate_erasure,
)

PATTERN = re.compile(r"an? (small|large) (\w+) (\w+) (on .*)$")
BG = {"on a plain background": "plain", "on stripes": "stripes", "on dots": "dots", "on a grid": "grid"}


class RenderGenerator:
    """Draws exactly what a single-object caption asks for; ``swap`` replaces colours (a perfect eraser)."""

    family = "render"
    cfg_layout = None

    def __init__(self, swap: dict | None = None, name: str = "render"):
        self.swap = swap or {}
        self.model_id = name

    def generate(self, prompts, seeds, **settings):
        images = []
        for p, s in zip(prompts, seeds):
            size, colour, shape, bg = PATTERN.match(p).groups()
            colour = self.swap.get(colour, colour)
            world = ConceptWorld(seed=0, image_size=32, shape_probs={k: float(k == shape) for k in
                                 ("circle", "square", "triangle", "star", "cross")},
                                 colour_probs={k: float(k == colour) for k in
                                               ("red", "green", "blue", "yellow", "purple", "orange")},
                                 size_probs={"small": float(size == "small"), "large": float(size == "large")},
                                 count_probs={1: 1.0, 2: 0.0, 3: 0.0, 4: 0.0},
                                 background_probs={k: float(k == BG[bg]) for k in BG.values()})
            images.append(world.sample(1, seed=int(s)).images[0])
        x = torch.as_tensor(np.stack(images)).float() / 255.0
        return GenerationResult(x, [{"prompt": p, "seed": s} for p, s in zip(prompts, seeds)])


@pytest.fixture(scope="module")
def detector():
    return zoo.load("conceptworld-detector")


@pytest.fixture(scope="module")
def sets():
    base = erasure_prompt_sets("red", n_target=12, n_retain=10, n_utility=1, seed=3)
    retain = base["retain"]
    # single-object "utility" prompts of a colour the eraser leaves alone
    util = PromptSet("utility", [p.replace(w["colour"].copy().pop(), "blue") for p, w in zip(retain.prompts,
                     retain.wanted)][:6], list(range(100, 106)),
                     [dict(w, colour={"blue"}) for w in retain.wanted][:6])
    return {"target": base["target"], "retain": retain, "utility": util}


def test_prompt_sets_ask_for_what_they_say():
    s = erasure_prompt_sets("circle", n_target=6, n_retain=8, n_utility=5, seed=1, seed_offset=10)
    assert all(w["shape"] == {"circle"} for w in s["target"].wanted)
    assert all("circle" in p for p in s["target"].prompts)
    assert all("circle" not in p for p in s["retain"].prompts + s["utility"].prompts)
    assert sorted({next(iter(w["shape"])) for w in s["retain"].wanted}) == ["cross", "square", "star", "triangle"]
    seeds = s["target"].seeds + s["retain"].seeds + s["utility"].seeds
    assert seeds == list(range(10, 29))  # disjoint, consecutive
    with pytest.raises(ValueError, match="ConceptWorld colour"):
        erasure_prompt_sets("dots")
    with pytest.raises(ValueError, match="n_target must be a positive int"):
        erasure_prompt_sets("red", n_target=0)
    with pytest.raises(ValueError, match="sizes must be a non-empty subset"):
        erasure_prompt_sets("red", sizes=("huge",))
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        PromptSet("target", ["a", "b"], [0])
    with pytest.raises(ValueError, match="is empty"):
        PromptSet("target", [], [])
    with pytest.raises(ValueError, match="wanted sets"):
        PromptSet("target", ["a"], [0], [{}, {}])


def test_planted_perfect_eraser_is_measured_as_such(detector, sets):
    orig = RenderGenerator()
    erased = RenderGenerator(swap={"red": "green"}, name="no-red")
    res = evaluate_erasure(orig, erased, "red", sets, detector=detector)
    s = res.summary().set_index("metric")
    assert s.loc["target_detection", "original"] >= 0.9
    assert s.loc["target_detection", "erased"] <= 0.1
    assert abs(s.loc["target_shape", "delta"]) <= 0.1  # shapes of the target prompts still drawn
    # retain and utility prompts render the same images: no change at all
    assert s.loc["retain_colour", "original"] >= 0.9 and s.loc["retain_colour", "delta"] == 0.0
    assert s.loc["retain_pixel_rmse", "erased"] == 0.0 and s.loc["utility_concept_shift", "erased"] == 0.0
    f = res.frame
    assert set(f.model) == {"original", "erased"} and len(f) == 2 * (12 + 10 + 6)
    assert (f[(f.set == "target") & (f.model == "erased")].pixel_rmse > 0.05).all()
    ims, caps = res.grid("target", n=3)
    assert len(ims) == 6 and caps[1] == "erased" and ims[0].shape == (32, 32, 3)
    assert res.value("target_detection", "delta") <= -0.8


def test_a_leaky_eraser_is_caught_on_retain(detector, sets):
    """Swapping blue for red as well breaks specificity: retain_colour drops, leak shows red on retain prompts."""
    res = evaluate_erasure(RenderGenerator(), RenderGenerator(swap={"red": "green", "blue": "red"}), "red", sets,
                           detector=detector)
    s = res.summary().set_index("metric")
    assert s.loc["retain_colour", "delta"] <= -0.15
    assert s.loc["retain_target_detection", "erased"] >= 0.15
    assert s.loc["utility_concept_shift", "erased"] > 0.0


def test_sweep_clip_and_sae_probe(detector, sets):
    from evaluation.erasure.metrics import load_builtin_clip_encoder

    enc = load_builtin_clip_encoder()
    probe = SAEConceptProbe.from_conceptworld(enc, n_images=300)
    assert probe.balanced_accuracy_["red"] >= 0.7  # the CLIP embedding carries the colour
    assert probe.balanced_accuracy_["stripes"] >= 0.9
    small = {k: PromptSet(k, v.prompts[:5], v.seeds[:5], v.wanted[:5]) for k, v in sets.items()}
    sweep = erasure_sweep(RenderGenerator(), lambda s: RenderGenerator({"red": "green"} if s > 0 else {}),
                          [0.0, 1.0], "red", small, detector=detector, encoder=enc, sae_probe=probe)
    t = sweep.table()
    assert list(t.strength) == [0.0, 1.0]
    assert t.target_detection.tolist()[0] >= 0.8 and t.target_detection.tolist()[1] <= 0.2
    assert t.target_sae_energy.iloc[1] < t.target_sae_energy.iloc[0]
    assert t.target_sae_detection.iloc[1] <= t.target_sae_detection.iloc[0]
    assert t.utility_clip_distance.iloc[0] == pytest.approx(0.0, abs=1e-6)
    f = sweep.frame()
    assert {"clip_score", "sae_energy", "strength"} <= set(f.columns)
    # the CLIP score prefers the prompt's own image
    assert f[(f.set == "target") & (f.strength == 0)].clip_score.mean() > f[(f.set == "target") & (f.strength == 1)
                                                                             & (f.model == "erased")].clip_score.mean()
    ax = sweep.plot("target_detection", "retain_colour")
    assert ax.get_xlabel().startswith("target_detection")
    with pytest.raises(KeyError, match="unknown metric"):
        sweep.plot("nope")


def test_errors(detector, sets):
    g = RenderGenerator()
    with pytest.raises(ValueError, match="does not know concept"):
        evaluate_erasure(g, g, "magenta", sets, detector=detector)
    with pytest.raises(TypeError, match="non-empty mapping"):
        evaluate_erasure(g, g, "red", [], detector=detector)
    with pytest.raises(ValueError, match="unknown prompt set"):
        evaluate_erasure(g, g, "red", {"other": sets["target"]}, detector=detector)
    with pytest.raises(TypeError, match="must be a PromptSet"):
        evaluate_erasure(g, g, "red", {"target": ["a"]}, detector=detector)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate_erasure(g, g, "red", sets, detector=detector, batch_size=0)
    with pytest.raises(TypeError, match="sae_probe must be an SAEConceptProbe"):
        evaluate_erasure(g, g, "red", sets, detector=detector, sae_probe=object())
    with pytest.raises(TypeError, match="make_erased must be callable"):
        erasure_sweep(g, None, [1.0], "red", sets, detector=detector)
    with pytest.raises(ValueError, match="strengths is empty"):
        erasure_sweep(g, lambda s: g, [], "red", sets, detector=detector)
    res = evaluate_erasure(g, g, "red", {"target": sets["target"]}, detector=detector, keep_images=False)
    with pytest.raises(KeyError, match="no images kept"):
        res.grid("target")
    with pytest.raises(KeyError, match="unknown metric"):
        res.value("nope")
    with pytest.raises(ValueError, match="which must be"):
        res.value("target_detection", "before")
    with pytest.raises(TypeError, match="encoder must have encode_images"):
        SAEConceptProbe(object(), object())
    with pytest.raises(TypeError, match="fitted SAE"):
        SAEConceptProbe(type("E", (), {"encode_images": lambda self, x: x})(), object())
    from sklearn.exceptions import NotFittedError

    class Fake:
        dictionary_ = torch.eye(2)

        def transform(self, x):
            return x

    enc = type("E", (), {"encode_images": lambda self, x, batch_size=1: torch.as_tensor(np.asarray(x), dtype=torch.float32)})()
    probe = SAEConceptProbe(enc, Fake(), n_features=1)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        probe.energy(np.ones((1, 2)))
    with pytest.raises(ValueError, match="n_features must be a positive int"):
        SAEConceptProbe(enc, Fake(), n_features=0)
    with pytest.raises(TypeError, match="DataFrame of booleans"):
        probe.fit(np.ones((2, 2)), np.ones(2))
    with pytest.raises(ValueError, match="one row per image"):
        probe.fit(np.ones((2, 2)), pd.DataFrame({"a": [True, False, True]}))
    with pytest.raises(ValueError, match="both positive and negative"):
        probe.fit(np.ones((2, 2)), pd.DataFrame({"a": [True, True]}))
    probe.fit(np.array([[1.0, 0.0], [0.0, 1.0]]), pd.DataFrame({"a": [True, False]}))
    assert probe.detect(np.array([[2.0, 0.0], [0.0, 2.0]]))["a"].tolist() == [True, False]
    with pytest.raises(KeyError, match="no features for"):
        probe.energy(np.ones((1, 2)), ["b"])


def test_report_section(detector, sets, tmp_path):
    from evaluation.erasure.report import erasure_section, leace_section
    from evaluation.report import Report

    small = {k: PromptSet(k, v.prompts[:3], v.seeds[:3], v.wanted[:3]) for k, v in sets.items()}
    res = evaluate_erasure(RenderGenerator(), RenderGenerator({"red": "green"}, name="no-red"), "red", small,
                           detector=detector)
    rep = erasure_section(Report("erasure"), res, title="Swap red", description="planted", table_name="red")
    leace_section(rep, {"probe_accuracy_after": 0.5, "majority_baseline": 0.5})
    html = rep.to_html()
    assert "Swap red" in html and "target_detection" in html and html.count("<img") >= 1 + 3 * 2 * 3
    path = rep.save(tmp_path / "rep", tables="csv")
    saved = pd.read_csv(tmp_path / "rep" / "red.csv")
    assert len(saved) == len(res.frame) and path.is_file()
    sweep = erasure_sweep(RenderGenerator(), lambda s: RenderGenerator({"red": "green"} if s else {}), [0.0, 1.0],
                          "red", small, detector=detector, keep_images=True)
    html = erasure_section(None, sweep, title="sweep").to_html()
    assert "Strength sweep" in html and "Details at strength 1" in html
    with pytest.raises(TypeError, match="ErasureResult or a SweepResult"):
        erasure_section(None, object())
    with pytest.raises(TypeError, match="must be an evaluation.report.Report"):
        erasure_section("report", res)
    with pytest.raises(ValueError, match="no kept images at strength"):
        erasure_section(None, sweep, strength_for_images=0.5)
    with pytest.raises(TypeError, match="numbers must be a mapping"):
        leace_section(None, [1])
