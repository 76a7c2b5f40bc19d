"""Blindspot statistics: closed forms, planted effects, null calibration, peer libraries (scipy, exact enumeration)."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from evaluation.blindspots import (
    BlindspotResult,
    benjamini_hochberg,
    bootstrap_intervals,
    compare_energies,
    compare_generators,
    generate_images,
    pair_table,
    pixel_similarity,
    sign_flip_pvalues,
)


def _sparse_energies(rng, n, k, rate=0.3):
    """Non-negative, SAE-like energies: each concept fires in a fraction of images with exponential mass."""
    return rng.exponential(1.0, (n, k)) * (rng.random((n, k)) < rate)


# ------------------------------------------------------------------------------------------- p-values and q-values
def test_benjamini_hochberg_matches_scipy_and_ignores_untested():
    from scipy.stats import false_discovery_control

    rng = np.random.default_rng(0)
    p = np.r_[rng.uniform(size=40), rng.uniform(0, 1e-3, size=10)]
    np.testing.assert_allclose(benjamini_hochberg(p), false_discovery_control(p, method="bh"), rtol=1e-12)
    with_nan = np.r_[p, np.nan, np.nan]
    q = benjamini_hochberg(with_nan)
    assert np.isnan(q[-2:]).all()
    np.testing.assert_allclose(q[:-2], false_discovery_control(p, method="bh"), rtol=1e-12)
    with pytest.raises(ValueError, match="must lie in"):
        benjamini_hochberg([0.5, 1.5])
    with pytest.raises(ValueError, match="1-D"):
        benjamini_hochberg(np.zeros((2, 2)))


def test_sign_flip_pvalue_matches_exact_enumeration():
    rng = np.random.default_rng(1)
    d = rng.normal(0.4, 1.0, size=(10, 3))
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=10)))  # all 1024 sign patterns
    exact = (np.abs(signs @ d) >= np.abs(d.sum(0)) - 1e-12).mean(0)
    mc = sign_flip_pvalues(d, n_permutations=20000, seed=0)
    np.testing.assert_allclose(mc, exact, atol=0.012)  # Monte-Carlo error ~ sqrt(p(1-p)/B) <= 0.0036
    # the normal approximation is close for many pairs
    big = rng.normal(0.1, 1.0, size=(400, 3))
    np.testing.assert_allclose(sign_flip_pvalues(big, test="normal"),
                               sign_flip_pvalues(big, n_permutations=20000, seed=1), atol=0.02)
    assert sign_flip_pvalues(np.zeros((5, 1)))[0] == 1.0
    with pytest.raises(ValueError, match="'permutation' or 'normal'"):
        sign_flip_pvalues(d, test="t")


def test_sign_flip_test_is_calibrated_under_the_null():
    rng = np.random.default_rng(2)
    real = _sparse_energies(rng, 60, 400)
    gen = _sparse_energies(rng, 60, 400)
    p = sign_flip_pvalues(gen - real, n_permutations=999, seed=3)
    # 400 independent null tests: the share below 0.05 is binomial(400, 0.05): mean 20, sd 4.4
    assert 5 <= int((p < 0.05).sum()) <= 35
    assert 0.4 < float(np.mean(p)) < 0.6


# ------------------------------------------------------------------------------------------- delta and status
def test_delta_is_the_scale_free_mass_ratio():
    rng = np.random.default_rng(3)
    real = _sparse_energies(rng, 200, 6)
    gen = real[rng.permutation(200)] * np.array([1.0, 0.1, 1.0, 5.0, 1.0, 1.0])
    res = compare_energies(real, gen, n_bootstrap=200, seed=0)
    c = res.concepts
    np.testing.assert_allclose(c["delta"], gen.mean(0) / (real.mean(0) + gen.mean(0)))
    np.testing.assert_allclose(c["rel_diff"], 2 * c["delta"] - 1, atol=1e-12)
    np.testing.assert_allclose(c["diff"], gen.mean(0) - real.mean(0))
    scaled = compare_energies(real * 37.0, gen * 37.0, n_bootstrap=200, seed=0).concepts
    np.testing.assert_allclose(scaled["delta"], c["delta"])
    assert scaled["status"].tolist() == c["status"].tolist()
    assert c["status"].tolist()[1] == "suppressed" and c["status"].tolist()[3] == "exaggerated"
    # the bootstrap interval holds the point estimate
    assert ((c["delta_ci_low"] <= c["delta"]) & (c["delta"] <= c["delta_ci_high"])).all()


def test_planted_suppression_and_exaggeration_are_found_and_nothing_else():
    rng = np.random.default_rng(4)
    n, k = 400, 120
    real = _sparse_energies(rng, n, k)
    gen = _sparse_energies(rng, n, k)
    suppressed, exaggerated = [3, 17, 40], [8, 66]
    gen[:, suppressed] *= 0.05
    gen[:, exaggerated] *= 8.0
    res = compare_energies(real, gen, n_bootstrap=300, seed=0)
    status = res.concepts["status"]
    assert set(np.flatnonzero(status == "suppressed")) == set(suppressed)
    assert set(np.flatnonzero(status == "exaggerated")) == set(exaggerated)
    assert res.settings["test"] == "permutation" and res.settings["n_permutations"] >= 2 * k / 0.05
    assert res.summary()["suppressed"] == 3 and list(res.flagged()["concept"])[:1] in ([3], [17], [40], [8], [66])


def test_null_comparison_flags_nothing():
    rng = np.random.default_rng(5)
    real = _sparse_energies(rng, 500, 300)
    gen = _sparse_energies(rng, 500, 300)
    res = compare_energies(real, gen, n_bootstrap=200, seed=1)
    assert set(res.concepts["status"]) == {"aligned"}
    assert res.concepts["q_value"].min() > 0.05


def test_status_needs_both_significance_and_effect_size():
    rng = np.random.default_rng(6)
    real = rng.exponential(1.0, (4000, 1))
    small_shift = compare_energies(real, real * 1.3, n_bootstrap=100, n_permutations=999).concepts.iloc[0]
    assert small_shift["q_value"] <= 1 / 1000 and small_shift["status"] == "aligned"  # significant, small effect
    # a large effect carried by one pair is not significant: d = [-20, +4 x 11], P(|T*| >= 24) is large
    few = np.array([[20.0]] + [[1.0]] * 11)
    gen = np.array([[0.0]] + [[5.0]] * 11)
    weak = compare_energies(few, gen, n_bootstrap=100, lambda_max=0.6, min_support=5).concepts.iloc[0]
    assert weak["delta"] > 0.6 and weak["q_value"] > 0.05 and weak["status"] == "aligned"


def test_support_filter_and_untested_concepts():
    real = np.zeros((100, 3))
    gen = np.zeros((100, 3))
    real[:50, 0] = 1.0  # fires in 50 pairs
    gen[:5, 1] = 1.0  # fires in 5 pairs only: big delta, too little support
    res = compare_energies(real, gen, n_bootstrap=100, min_support=10)
    c = res.concepts
    assert c["status"].tolist() == ["suppressed", "insufficient_support", "insufficient_support"]
    assert np.isnan(c["q_value"].iloc[1]) and np.isnan(c["delta"].iloc[2])
    assert c["support"].tolist() == [50, 5, 0] and c["nb_fire_real"].tolist() == [50, 0, 0]


def test_bootstrap_interval_covers_the_population_delta():
    rng = np.random.default_rng(7)
    n, k = 150, 200  # 200 independent replicate concepts with the same population delta = 2/3
    real = rng.exponential(1.0, (n, k))
    gen = rng.exponential(2.0, (n, k))
    iv = bootstrap_intervals(real, gen, n_bootstrap=400, ci=0.9, seed=0)
    covered = (iv["delta_low"] <= 2 / 3) & (2 / 3 <= iv["delta_high"])
    assert 0.8 <= covered.mean() <= 0.97


def test_normal_test_and_auto_switch():
    rng = np.random.default_rng(8)
    real = _sparse_energies(rng, 200, 50)
    gen = real.copy()
    gen[:, 0] *= 0.05
    res = compare_energies(real, gen, n_bootstrap=100, max_permutations=100)  # forces the normal approximation
    assert res.settings["test"] == "normal" and res.concepts["status"].iloc[0] == "suppressed"
    assert compare_energies(real, gen, n_bootstrap=100, test="permutation", n_permutations=500).settings[
        "n_permutations"] == 500


def test_compare_energies_validates_input():
    a = np.ones((10, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        compare_energies(a, np.ones((9, 3)))
    with pytest.raises(ValueError, match="negative energies"):
        compare_energies(a, -a)
    with pytest.raises(ValueError, match="NaN or infinite"):
        compare_energies(a, a * np.nan)
    with pytest.raises(ValueError, match="2-D"):
        compare_energies(np.ones(10), np.ones(10))
    with pytest.raises(ValueError, match="lambda_min < 0.5 < lambda_max"):
        compare_energies(a, a, lambda_min=0.6, lambda_max=0.9)
    with pytest.raises(ValueError, match="strictly between"):
        compare_energies(a, a, fdr=1.5)
    with pytest.raises(ValueError, match="one name per concept"):
        compare_energies(a, a, names=["x"])
    with pytest.raises(ValueError, match="'auto', 'permutation' or 'normal'"):
        compare_energies(a, a, test="z")
    with pytest.raises(ValueError, match="min_support must be an integer"):
        compare_energies(a, a, min_support=0)
    with pytest.raises(TypeError, match="numeric array"):
        compare_energies([["a"]], [["b"]])


# ------------------------------------------------------------------------------------------- pairs
def test_pair_table_lists_changed_concepts_and_flags_copies():
    rng = np.random.default_rng(9)
    n = 200
    real = _sparse_energies(rng, n, 5, rate=0.6)
    gen = real * rng.uniform(0.5, 1.5, size=real.shape)
    gen[7] = real[7]  # identical codes ...
    gen[11] = 0.0  # everything missing: the largest distance
    gen[11, 2] = 50.0
    real_img = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    gen_img = rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8)
    gen_img[7] = np.repeat(np.repeat(real_img[7], 2, 0), 2, 1)  # ... and a pixel copy (at twice the size)
    t = pair_table(real, gen, names=list("abcde"), real_images=real_img, gen_images=gen_img,
                   candidate_quantile=0.01, top_k=2)
    assert t.loc[7, "flag"] == "memorization_candidate" and t.loc[7, "pixel_similarity"] > 0.99
    assert t.loc[11, "flag"] == "blindspot_candidate" and t.loc[11, "top_exaggerated"] == "c (#2)"
    lost = [j for j in np.argsort(-(real[11] - gen[11]))[:2] if real[11, j] - gen[11, j] > 0]
    assert t.loc[11, "top_suppressed"] == "; ".join(f"{'abcde'[j]} (#{j})" for j in lost)
    assert (t["flag"] == "blindspot_candidate").sum() == 2  # ceil(1 % of 200)
    no_img = pair_table(real, gen)
    assert set(no_img.loc[no_img["flag"] != "blindspot_candidate", "flag"]) == {"", "closest_pair"}
    with pytest.raises(ValueError, match="one per pair"):
        pair_table(real, gen, captions=["x"])


def test_pixel_similarity_closed_form():
    a = np.zeros((3, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 255
    b[2, :2] = 255  # half the pixels differ fully: RMSE = sqrt(1/2)
    np.testing.assert_allclose(pixel_similarity(a, b), [1.0, 0.0, 1 - np.sqrt(0.5)], atol=1e-6)
    with pytest.raises(ValueError, match="one generated image per real one"):
        pixel_similarity(a, b[:2])
    with pytest.raises(ValueError, match="RGB images"):
        pixel_similarity(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))


# ------------------------------------------------------------------------------------------- across generators
def test_cross_generator_correlation_follows_shared_biases():
    rng = np.random.default_rng(10)
    n, k = 300, 60
    real = _sparse_energies(rng, n, k)
    scale = np.exp(rng.normal(0, 1.0, k))  # a shared per-concept bias
    res = {
        "a": compare_energies(real, _sparse_energies(rng, n, k) * scale, n_bootstrap=50),
        "b": compare_energies(real, _sparse_energies(rng, n, k) * scale, n_bootstrap=50),
        "inverse": compare_energies(real, _sparse_energies(rng, n, k) / scale, n_bootstrap=50),
    }
    cross = compare_generators(res).set_index(["model_a", "model_b"])
    assert cross.loc[("a", "b"), "pearson_r"] > 0.8 and cross.loc[("a", "b"), "spearman_rho"] > 0.8
    assert cross.loc[("a", "inverse"), "pearson_r"] < -0.6
    assert cross.loc[("a", "b"), "n_flagged_both"] >= 1
    with pytest.raises(TypeError, match="mapping"):
        compare_generators([res["a"]])
    with pytest.raises(ValueError, match="same encoder and SAE"):
        compare_generators({"a": res["a"], "c": compare_energies(real[:, :5], real[:, :5], n_bootstrap=10)})


def test_generate_images_records_seeds_and_checks_input():
    from evaluation.blindspots_world import WorldGenerator

    caps = ["a large red circle on dots", "two small blue stars on stripes", "a small green cross on a grid"]
    imgs, rec = generate_images(WorldGenerator(), caps, [5, 6, 7], batch_size=2, progress=False)
    assert imgs.dtype == np.uint8 and imgs.shape == (3, 32, 32, 3)
    assert rec["seed"].tolist() == [5, 6, 7] and rec["prompt"].tolist() == caps
    again, _ = generate_images(WorldGenerator(), caps, [5, 6, 7], batch_size=3, progress=False)
    np.testing.assert_array_equal(imgs, again)  # same seeds, same images, whatever the batching
    with pytest.raises(ValueError, match="one seed per caption"):
        generate_images(WorldGenerator(), caps, [1], progress=False)
    with pytest.raises(TypeError, match="generate"):
        generate_images(object(), caps, [1, 2, 3], progress=False)


def test_result_tables_are_dataframes():
    rng = np.random.default_rng(11)
    res = compare_energies(_sparse_energies(rng, 50, 4), _sparse_energies(rng, 50, 4), n_bootstrap=20)
    assert isinstance(res, BlindspotResult)
    assert isinstance(res.concepts, pd.DataFrame) and isinstance(res.pairs, pd.DataFrame) and len(res.pairs) == 50
    assert {"delta", "delta_ci_low", "delta_ci_high", "p_value", "q_value", "status", "support"} <= set(res.concepts)
