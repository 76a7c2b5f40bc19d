"""Concept-to-pixel checks (evaluation.pixel_checks) against ConceptWorld masks."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from concepts.world import ConceptWorld
from concepts.world.vocabulary import COLOURS
from evaluation.pixel_checks import (
    concept_input_attribution,
    concept_masks,
    mask_scores,
    pixel_check,
    summarize_pixel_checks,
)

COLOUR_NAMES = list(COLOURS)


class ColourReader(nn.Module):
    """Reads each colour concept from the pixels that have that colour: score_c = mean_p relu(1 - |x_p - c|^2 / r^2).

    Along the integrated-gradients path from a black image only pixels of colour ``c`` ever activate the ReLU, so
    the attribution of concept ``c`` lies exactly on the objects of colour ``c``.
    """

    def __init__(self, radius: float = 0.12) -> None:
        super().__init__()
        self.register_buffer("centres", torch.tensor([COLOURS[c] for c in COLOUR_NAMES], dtype=torch.float32) / 255)
        self.r2 = radius ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d2 = ((x[:, None] - self.centres[None, :, :, None, None]) ** 2).sum(2)  # [n, 6, H, W]
        return torch.relu(1 - d2 / self.r2).mean((2, 3)) * 100


class RedReader(nn.Module):
    """Reads "red" (output 0) as the mean of relu(R - G - B - 0.4): only red pixels pass (orange gives -0.07)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(x[:, 0] - x[:, 1] - x[:, 2] - 0.4).mean((1, 2))
        return torch.stack([r, -r], 1)


class CornerReader(nn.Module):
    """A wrong concept model: reads every concept from the top-left 4x4 corner."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x[:, :, :4, :4].mean((1, 2, 3))
        return v[:, None].expand(-1, len(COLOUR_NAMES)) * torch.arange(1, 7, dtype=x.dtype)


@pytest.fixture(scope="module")
def batch():
    return ConceptWorld(seed=0, image_size=32).sample(12, seed=5)


def test_colour_masks_are_exactly_the_pixels_of_that_colour(batch) -> None:
    for colour in ("red", "blue", "yellow"):
        m = concept_masks(batch, colour)
        pix = (batch.images == np.array(COLOURS[colour], dtype=np.uint8)).all(-1)
        assert np.array_equal(m, pix)
        assert np.array_equal(m.any((1, 2)), batch.concepts[colour].to_numpy())


def test_position_background_and_count_masks(batch) -> None:
    left = concept_masks(batch, "left")
    for i in range(len(batch)):
        objs = batch.objects[batch.objects.image == i]
        expected = np.zeros(batch.masks.shape[2:], bool)
        for slot in objs.loc[objs.col == 0, "slot"]:
            expected |= batch.masks[i, slot]
        assert np.array_equal(left[i], expected)
    any_obj = batch.masks.any(1)
    bg = concept_masks(batch, batch.backgrounds[0])
    assert np.array_equal(bg[0], ~any_obj[0])
    assert not bg[[b != batch.backgrounds[0] for b in batch.backgrounds]].any()
    n0 = int((batch.objects.image == 0).sum())
    assert np.array_equal(concept_masks(batch, f"count={n0}")[0], any_obj[0])
    small = concept_masks(batch, "red", size=16)
    assert small.shape == (len(batch), 16, 16)
    with pytest.raises(ValueError, match="unknown concept"):
        concept_masks(batch, "magenta")


def test_mask_scores_closed_form() -> None:
    a = np.zeros((2, 6, 6))
    a[0, 1, 1] = 3.0
    a[0, 4, 4] = 1.0
    a[1, 3, 3] = 1.0
    m = np.zeros((2, 6, 6), bool)
    m[0, 1, 1] = True
    m[1, 2, 2] = True
    s = mask_scores(a, m, tolerance=0)
    assert s["hit"].tolist() == [True, False]
    assert s["mass_in_mask"].tolist() == [0.75, 0.0]
    assert s["mask_area"].tolist() == [1 / 36, 1 / 36]
    assert mask_scores(a, m, tolerance=1)["hit"].tolist() == [True, True]  # (3,3) is next to (2,2)
    half = mask_scores(a, np.repeat(np.repeat(m, 2, 1), 2, 2)[:, :6, :6] | m, tolerance=0)
    assert len(half) == 2
    with pytest.raises(ValueError, match="non-negative"):
        mask_scores(-a, m)
    with pytest.raises(ValueError, match="same n"):
        mask_scores(a[:1], m)
    with pytest.raises(ValueError, match="tolerance"):
        mask_scores(a, m, tolerance=-1)


def test_attribution_of_a_colour_reader_lies_on_its_objects(batch) -> None:
    model = ColourReader()
    df = pixel_check(model, batch, concept_names=COLOUR_NAMES, noise_tunnel=False, tolerance=0, n_steps=8)
    assert set(df["family"]) == {"colour"}
    assert df["hit"].all()
    assert np.allclose(df["mass_in_mask"], 1.0)
    # every (image, colour) pair where the colour is present is scored once
    assert len(df) == int(batch.concepts[COLOUR_NAMES].to_numpy().sum())
    smooth = pixel_check(model, batch, concepts=["red", "blue"], concept_names=COLOUR_NAMES, nt_samples=3,
                         stdevs=0.02, seed=0, n_steps=8)
    assert smooth["hit"].mean() >= 0.9 and smooth["mass_in_mask"].mean() > 0.8
    sal = pixel_check(RedReader(), batch, concepts=["red"], concept_names=["red", "not red"], method="saliency",
                      noise_tunnel=False, tolerance=0)
    assert sal["hit"].all() and np.allclose(sal["mass_in_mask"], 1.0)
    summary = summarize_pixel_checks(df, by="concept")
    assert (summary["pointing_game"] == 1.0).all() and (summary["lift"] > 5).all()


def test_a_model_reading_the_wrong_pixels_fails_the_check(batch) -> None:
    df = pixel_check(CornerReader(), batch, concepts=["red", "blue", "green"], concept_names=COLOUR_NAMES,
                     noise_tunnel=False, tolerance=0, n_steps=4)
    s = summarize_pixel_checks(df, by="family")
    assert s.loc["colour", "pointing_game"] < 0.2
    assert s.loc["colour", "mass_in_mask"] < 0.1


def test_concept_input_attribution_is_seeded_and_shaped(batch) -> None:
    x = torch.from_numpy(batch.images[:3]).permute(0, 3, 1, 2).float() / 255
    a = concept_input_attribution(ColourReader(), x, 0, nt_samples=3, stdevs=0.05, seed=1, n_steps=4)
    b = concept_input_attribution(ColourReader(), x, [0, 0, 0], nt_samples=3, stdevs=0.05, seed=1, n_steps=4)
    assert a.shape == (3, 32, 32) and torch.equal(a, b)
    assert (a >= 0).all()
    signed = concept_input_attribution(ColourReader(), batch.images[:3], 0, noise_tunnel=False, aggregate="signed",
                                       n_steps=4)
    assert signed.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="method must be"):
        concept_input_attribution(ColourReader(), x, 0, method="lime")
    with pytest.raises(ValueError, match="aggregate"):
        concept_input_attribution(ColourReader(), x, 0, aggregate="max")
    with pytest.raises(ValueError, match="one index or one per image"):
        concept_input_attribution(ColourReader(), x, [0, 1])
    with pytest.raises(TypeError, match="float tensors"):
        concept_input_attribution(ColourReader(), [1, 2], 0)
    with pytest.raises(ValueError, match="nt_samples"):
        concept_input_attribution(ColourReader(), x, 0, nt_samples=0)


def test_pixel_check_errors(batch) -> None:
    with pytest.raises(ValueError, match="not an output of the concept model"):
        pixel_check(ColourReader(), batch, concepts=["circle"], concept_names=COLOUR_NAMES)
    with pytest.raises(ValueError, match="not a column"):
        pixel_check(ColourReader(), batch, concepts=["teal"], concept_names=COLOUR_NAMES[:5] + ["teal"])
    with pytest.raises(ValueError, match="non-negative maps"):
        pixel_check(ColourReader(), batch, concept_names=COLOUR_NAMES, aggregate="signed")
    with pytest.raises(ValueError, match="images has 2 rows"):
        pixel_check(ColourReader(), batch, concept_names=COLOUR_NAMES, images=torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="by must be"):
        summarize_pixel_checks(pd.DataFrame(), by="image")
    with pytest.raises(ValueError, match="pixel_check"):
        summarize_pixel_checks(pd.DataFrame({"a": [1]}))


@pytest.mark.slow
def test_a_trained_cnn_reads_colours_from_their_objects() -> None:
    """A tiny CNN concept predictor trained for a few hundred steps on 32-pixel renders points at its objects."""
    from concepts.zoo.detector import DetectorNet

    world = ConceptWorld(seed=0, image_size=32)
    names = world.concept_names
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = DetectorNet(len(names), width=8, hidden=64, input_size=32)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        for step in range(300):
            b = world.sample(64, seed=50, start=64 * step)
            x = torch.from_numpy(b.images).permute(0, 3, 1, 2).float() / 255
            loss = nn.functional.binary_cross_entropy_with_logits(net(x), torch.tensor(b.concepts.to_numpy(np.float32)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    test = world.sample(60, seed=51)
    df = pixel_check(net, test, concepts=COLOUR_NAMES, concept_names=names, baseline=28 / 255, nt_samples=4,
                     stdevs=0.05, n_steps=16, seed=0)
    s = summarize_pixel_checks(df, by="family")
    assert s.loc["colour", "pointing_game"] >= 0.8
    assert s.loc["colour", "lift"] > 5
