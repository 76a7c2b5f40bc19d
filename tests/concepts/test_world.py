"""ConceptWorld: the labels must match what is drawn, rules must give the documented classes, and planted
frequencies must come out within sampling error."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from concepts.world import ConceptWorld, Correlation, Rule, load_folder, save_folder
from concepts.world.render import shape_stamp
from concepts.world.vocabulary import BACKGROUND_BASE, BACKGROUND_PATTERN, COLOURS, SHAPES


@pytest.fixture(scope="module")
def batch():
    return ConceptWorld(seed=0, image_size=64).sample(300, seed=11)


def _colours_in_pixels(image: np.ndarray) -> set[str]:
    found = set()
    flat = image.reshape(-1, 3)
    uniq = {tuple(int(v) for v in px) for px in np.unique(flat, axis=0)}
    for name, rgb in COLOURS.items():
        if tuple(rgb) in uniq:
            found.add(name)
    allowed = set(map(tuple, COLOURS.values())) | {BACKGROUND_BASE, BACKGROUND_PATTERN}
    assert uniq <= allowed, f"unexpected pixel values {uniq - allowed}"
    return found


def test_colour_labels_match_pixels(batch):
    for i in range(len(batch)):
        truth = {c for c in COLOURS if batch.concepts.loc[i, c]}
        assert _colours_in_pixels(batch.images[i]) == truth


def test_masks_are_disjoint_and_carry_their_object_colour(batch):
    for row in batch.objects.itertuples():
        mask = batch.masks[row.image, row.slot]
        assert mask.any()
        pixels = batch.images[row.image][mask]
        assert (pixels == np.array(COLOURS[row.colour], dtype=np.uint8)).all()
    overlap = batch.masks.sum(axis=1) > 1
    assert not overlap.any()
    # pixels outside every mask are background
    outside = ~batch.masks.any(axis=1)
    bg = batch.images[outside]
    is_bg = (bg == BACKGROUND_BASE).all(-1) | (bg == BACKGROUND_PATTERN).all(-1)
    assert is_bg.all()


def test_counts_match_masks(batch):
    n_objects = batch.masks.any(axis=(2, 3)).sum(axis=1)
    for n in range(1, 5):
        np.testing.assert_array_equal(batch.concepts[f"count={n}"].to_numpy(), n_objects == n)


def test_shape_labels_match_drawn_shapes(batch):
    """Re-derive each object's shape by matching its mask to every shape stamp of its side."""
    for row in batch.objects.itertuples():
        crop = batch.masks[row.image, row.slot][row.y0:row.y0 + row.side, row.x0:row.x0 + row.side]
        scores = {s: (crop == shape_stamp(s, row.side)).mean() for s in SHAPES}
        assert max(scores, key=scores.get) == row.shape
        assert scores[row.shape] == 1.0


def test_position_and_size_concepts(batch):
    for i in range(len(batch)):
        objs = batch.objects[batch.objects["image"] == i]
        ys, xs = np.nonzero(batch.masks[i].any(axis=0))
        assert batch.concepts.loc[i, "left"] == bool((objs["col"] == 0).any())
        assert batch.concepts.loc[i, "top"] == bool((objs["row"] == 0).any())
        if batch.concepts.loc[i, "left"]:
            assert xs.min() < 64 / 3
        areas = [batch.masks[i, j].sum() for j in objs["slot"]]
        for area, size in zip(areas, objs["size"]):
            assert (area > 105) == (size == "large")  # smallest large stamp > largest small one


def test_conjunction_concepts(batch):
    for c in COLOURS:
        for s in SHAPES:
            expected = batch.objects.groupby("image").apply(
                lambda g: bool(((g["colour"] == c) & (g["shape"] == s)).any()), include_groups=False
            ).reindex(range(len(batch)), fill_value=False)
            np.testing.assert_array_equal(batch.concepts[f"{c} {s}"].to_numpy(), expected.to_numpy())


def test_default_rules_give_documented_classes(batch):
    c = batch.concepts
    for i in range(len(batch)):
        r = c.loc[i]
        if r["red"] and (r["count=3"] or r["count=4"]):
            want = "red crowd"
        elif r["star"] and r["stripes"]:
            want = "star on stripes"
        elif r["blue circle"]:
            want = "blue circle"
        elif r["green"] and r["yellow"]:
            want = "green and yellow"
        elif r["triangle"] and r["grid"]:
            want = "triangle on grid"
        elif r["count=1"] and r["large"]:
            want = "lonely large"
        elif r["purple cross"]:
            want = "purple cross"
        elif r["dots"]:
            want = "dotted"
        else:
            want = "other"
        assert batch.class_names[batch.labels[i]] == want
    assert len(batch.class_names) >= 9
    assert len(set(batch.labels)) == len(batch.class_names)


def test_captions_describe_objects(batch):
    for i in (0, 1, 2, 3):
        cap = batch.captions[i]
        for row in batch.objects[batch.objects["image"] == i].itertuples():
            assert row.colour in cap and row.size in cap
            assert row.shape in cap or (row.shape == "cross" and "crosses" in cap)
        assert batch.backgrounds[i] in cap or (batch.backgrounds[i] == "plain" and "plain" in cap)
    assert ConceptWorld().sample(1, seed=0).captions[0].endswith(
        ("on stripes", "on dots", "on a grid", "on a plain background"))


def test_seeded_and_independent_of_n():
    w = ConceptWorld(seed=3)
    a, b = w.sample(20, seed=5), w.sample(5, seed=5)
    np.testing.assert_array_equal(a.images[:5], b.images)
    c = w.sample(5, seed=5, start=5)
    np.testing.assert_array_equal(a.images[5:10], c.images)
    assert not np.array_equal(w.sample(5, seed=6).images, b.images)
    assert not np.array_equal(ConceptWorld(seed=4).sample(5, seed=5).images, b.images)
    # seed=None advances
    assert not np.array_equal(w.sample(5).images, w.sample(5).images)


def test_batch_indexing_keeps_ground_truth(batch):
    sub = batch[[3, 7]]
    np.testing.assert_array_equal(sub.images[1], batch.images[7])
    assert sub.captions[1] == batch.captions[7]
    assert (sub.objects["image"].unique() == [0, 1]).all()
    assert sub.concepts.loc[1].equals(batch.concepts.loc[7].rename(1))


@pytest.mark.parametrize("size", [32, 128])
def test_other_image_sizes(size):
    b = ConceptWorld(seed=0, image_size=size).sample(40, seed=0)
    assert b.images.shape == (40, size, size, 3)
    for i in range(40):
        assert _colours_in_pixels(b.images[i]) == {c for c in COLOURS if b.concepts.loc[i, c]}
    assert (b.masks.any(axis=(2, 3)).sum(1) == b.objects.groupby("image").size().to_numpy()).all()


def _se(p, n):
    return np.sqrt(p * (1 - p) / n)


def test_planted_frequencies_within_sampling_error():
    w = ConceptWorld(seed=1, colour_probs={"red": 4.0, "blue": 0.0}, background_probs={"grid": 3.0})
    b = w.sample(2000, seed=0)
    assert not b.concepts["blue"].any()
    p_red = 4 / 8  # 4 / (4 + 4 other colours at weight 1 + blue at 0)
    frac = (b.objects["colour"] == "red").mean()
    assert abs(frac - p_red) < 4 * _se(p_red, len(b.objects))
    p_grid = 3 / 6
    assert abs(b.concepts["grid"].mean() - p_grid) < 4 * _se(p_grid, 2000)


def test_planted_correlation_and_joint_weights():
    w = ConceptWorld(seed=2, correlations=[Correlation("red", "stripes", 0.9)],
                     colour_shape_weights={("blue", "star"): 0.0})
    b = w.sample(1500, seed=0)
    c = b.concepts
    assert not c["blue star"].any()
    p = c.loc[c["red"], "stripes"].mean()
    # P(stripes | red) = 1/4 + 3/4 * 0.9
    expected = 0.25 + 0.75 * 0.9
    assert abs(p - expected) < 4 * _se(expected, int(c["red"].sum()))
    assert c.loc[~c["red"], "stripes"].mean() < 0.3
    # object-level correlation keeps the condition
    w2 = ConceptWorld(seed=2, correlations=[("circle", "red", 1.0)])
    b2 = w2.sample(500, seed=0)
    assert (b2.concepts.loc[b2.concepts["circle"], "red"]).all()
    w3 = ConceptWorld(seed=2, correlations=[("red", "blue", 1.0)])
    c3 = w3.sample(500, seed=0).concepts
    assert c3.loc[c3["red"] & ~c3["count=1"], "blue"].all()


def test_custom_rules_and_missing_fallback():
    rules = [Rule("has red", all_of=("red",)), Rule("rest", none_of=("red",))]
    w = ConceptWorld(seed=0, rules=rules, fallback_class=None)
    b = w.sample(100, seed=0)
    np.testing.assert_array_equal(b.labels == 0, b.concepts["red"].to_numpy())
    with pytest.raises(ValueError, match="match no class rule"):
        ConceptWorld(seed=0, rules=rules[:1], fallback_class=None).sample(50, seed=0)


def test_dataset_view_matches_sample():
    w = ConceptWorld(seed=0, image_size=32)
    b = w.sample(6, seed=9)
    ds = w.dataset(6, seed=9, target="all")
    for i in range(6):
        x, t = ds[i]
        np.testing.assert_array_equal((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), b.images[i])
        assert t["label"] == b.labels[i]
        assert t["caption"] == b.captions[i]
        np.testing.assert_array_equal(t["concepts"].bool().numpy(), b.concepts.loc[i].to_numpy())
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError, match="target must be"):
        w.dataset(3, target="nope")


def test_save_and_load_folder_round_trip(tmp_path):
    w = ConceptWorld(seed=0, image_size=32)
    b = w.sample(10, seed=1)
    save_folder(b, tmp_path / "s", world=w)
    back = load_folder(tmp_path / "s")
    np.testing.assert_array_equal(back.images, b.images)
    np.testing.assert_array_equal(back.masks, b.masks)
    np.testing.assert_array_equal(back.labels, b.labels)
    assert back.captions == b.captions
    pd.testing.assert_frame_equal(back.concepts, b.concepts)
    with pytest.raises(FileExistsError, match="not empty"):
        save_folder(b, tmp_path / "s")
    save_folder(b, tmp_path / "c", fmt="csv")
    np.testing.assert_array_equal(load_folder(tmp_path / "c").labels, b.labels)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=10), "image_size must be"),
        (dict(colour_probs={"pink": 1.0}), "unknown colour 'pink'"),
        (dict(shape_probs={"circle": -1}), "finite weight >= 0"),
        (dict(colour_probs={c: 0 for c in COLOURS}), "all colour weights are zero"),
        (dict(colour_shape_weights={"red": 0}), r"\(colour, shape\) tuples"),
        (dict(correlations=[("red", "count=2", 1.0)]), "colour, shape, size or background"),
        (dict(correlations=[("magenta", "red", 1.0)]), "unknown concept 'magenta'"),
        (dict(rules=[Rule("x", all_of=("pink",))]), "unknown concepts"),
        (dict(seed=-1), "seed must be"),
    ],
)
def test_bad_configuration_raises_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConceptWorld(**kwargs)


def test_bad_sample_size():
    with pytest.raises(ValueError, match="positive integer"):
        ConceptWorld().sample(0)
