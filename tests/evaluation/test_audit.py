"""The audit: one tiny end-to-end run checked against ConceptWorld's truth, the report file, and the command.

One module-scoped audit (100 renders, a 128-unit SAE, the built-in diffusion generator with 'red' erased) is shared
by the tests below; it takes well under a minute on two cores. Its numbers are checked against what must hold:
erasing 'red' collapses the red units' delta and the detector's, the head's importance of the red units vanishes,
other colours are still drawn, and the linear head's additive importance methods coincide.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from concepts import zoo
from concepts.vocabularies import get_vocabulary
from concepts.world import ConceptWorld
from evaluation import audit as audit_mod
from evaluation.audit import AuditResult, audit, concept_units, counterfactual_captions
from evaluation.cli import main

TINY = dict(n=100, n_concepts=128, top_k=4, sae_epochs=15, n_erasure_prompts=16, n_eval_prompts=4, n_bootstrap=20,
            progress=False)


@pytest.fixture(scope="module")
def result() -> AuditResult:
    try:
        zoo.load("conceptworld-diffusion")
    except (FileNotFoundError, ValueError) as exc:  # weights not shipped in this installation
        pytest.skip(f"conceptworld-diffusion is not available: {exc}")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared machine: one thread is several times faster than two
    try:
        return audit(generators=["conceptworld-diffusion"], concept="red", seed=0, **TINY)
    finally:
        torch.set_num_threads(threads)


def _erasure(result: AuditResult) -> pd.DataFrame:
    return result.erasure.set_index("metric")


# ----------------------------------------------------------------------------------------------- truth
def test_erasing_red_collapses_its_delta_in_units_and_detector(result):
    e = _erasure(result)
    assert result.settings["concept_units"], "the dictionary should have units for 'red' (AUROC >= 0.9)"
    # the red units are really red units: their ConceptWorld label involves 'red'
    truth = result.concepts.set_index("concept").loc[result.settings["concept_units"], "truth"]
    assert all("red" in str(t).split() for t in truth)
    sae_before, sae_after = e.loc["concept delta (SAE units)", ["before", "after"]]
    det_before, det_after = e.loc["concept delta (detector)", ["before", "after"]]
    assert sae_before > 0.25 and sae_after < sae_before - 0.2
    assert det_before > 0.25 and det_after < det_before - 0.15
    assert e.loc["single-object prompts: concept detected", "after"] <= 0.25
    # the blindspot test on those pairs flags the red units as suppressed only after the erasure
    flags_before, flags_after = e.loc["concept units flagged suppressed", ["before", "after"]]
    assert flags_after >= 1 and flags_after > flags_before


def test_erasing_red_makes_its_importance_vanish(result):
    e = _erasure(result)
    before, after = e.loc["importance of the concept's units", ["before", "after"]]
    assert before > 0 and after < 0.5 * before
    share_before, share_after = e.loc["share of |importance| on the concept's units", ["before", "after"]]
    assert share_after < share_before


def test_erasure_utility_cost_is_small_for_other_colours(result):
    e = _erasure(result)
    assert abs(e.loc["retain prompts: asked colour drawn", "change"]) <= 0.2
    assert e.loc["retain prompts: asked colour drawn", "before"] >= 0.6


def test_concept_names_come_from_the_vocabulary(result):
    vocab = set(get_vocabulary("conceptworld").names)
    alive = result.concepts[result.concepts["alive"]]
    assert len(alive) > 10
    assert set(alive["name"]) <= vocab
    dead = result.concepts[~result.concepts["alive"]]
    assert all(re.fullmatch(r"unit \d+ \(silent on real\)", nm) for nm in dead["name"])


def test_dictionary_quality_against_labels(result):
    q = result.quality.set_index("metric")["value"]
    assert 0 <= q["fvu"] < 0.5
    assert q["units_mapped_auroc_0.9"] >= 10
    cov = result.coverage.set_index("truth")
    # colours are what the built-in CLIP's tokens carry most clearly
    assert cov.loc["red", "auroc"] >= 0.9
    assert cov.loc[cov["family"] == "colour", "auroc"].mean() >= 0.8
    # a mapped unit's AUROC is recomputable from the saved energies' ranks: check one against sklearn
    from sklearn.metrics import roc_auc_score

    batch = result.artifacts["batch"]
    energy = result.artifacts["analysis"].real_energy.energy
    u = int(cov.loc["red", "best_unit"])
    assert roc_auc_score(batch.concepts["red"], energy[:, u]) == pytest.approx(cov.loc["red", "auroc"], abs=1e-9)


def test_linear_head_additive_importance_methods_coincide(result):
    t = result.importance
    for m in ("integrated_gradients", "occlusion"):
        assert t.loc[m, "c_deletion"] == pytest.approx(t.loc["gradient_input", "c_deletion"], rel=1e-4, abs=1e-6)
        assert t.loc[m, "c_insertion"] == pytest.approx(t.loc["gradient_input", "c_insertion"], rel=1e-4, abs=1e-6)


def test_blindspots_table_covers_the_original_and_the_erased_generator(result):
    gens = set(result.blindspots["generator"])
    assert gens == {"conceptworld-diffusion", "conceptworld-diffusion (erased 'red')"}
    assert len(result.blindspots) == 2 * len(result.concepts)


# ----------------------------------------------------------------------------------------------- files
def test_report_is_self_contained_and_saved(result, tmp_path):
    path = result.save(tmp_path / "audit")
    html = path.read_text()
    assert path.name == "index.html"
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    for anchor in ("glance", "concepts", "blindspots", "importance", "erasure"):
        assert f'id="{anchor}"' in html
    meta = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert meta["concept"] == "red" and meta["headline"]["concept_delta_after"] < meta["headline"]["concept_delta_before"]
    back = pd.read_parquet(tmp_path / "audit" / "erasure.parquet")
    pd.testing.assert_frame_equal(back, result.erasure.reset_index(drop=True), check_dtype=False)
    assert (tmp_path / "audit" / "concepts.csv").exists() and (tmp_path / "audit" / "importance.csv").exists()
    assert "Erasure" in result._repr_html_()


# ----------------------------------------------------------------------------------------------- helpers
def test_counterfactual_captions_swap_only_the_concept():
    batch = ConceptWorld(seed=0, image_size=32).sample(60, seed=3)
    target, other = counterfactual_captions(batch, "circle", seed=1)
    assert len(target) == int(batch.concepts["circle"].sum())
    for a, b in zip(target, other):
        assert re.search(r"\bcircles?\b", a) and not re.search(r"\bcircles?\b", b)
        assert a.split()[-1] == b.split()[-1]  # same background


def test_counterfactual_captions_errors():
    batch = ConceptWorld(seed=0, image_size=32).sample(10, seed=0)
    with pytest.raises(ValueError, match="ConceptWorld colour"):
        counterfactual_captions(batch, "pink")
    no_red = ConceptWorld(seed=0, image_size=32, colour_probs={"red": 0.0}).sample(20, seed=0)
    with pytest.raises(ValueError, match="no image of the fitting sample shows 'red'"):
        counterfactual_captions(no_red, "red")


def test_concept_units_uses_mapped_units_involving_the_concept():
    um = pd.DataFrame({"concept": [0, 1, 2, 3], "truth": ["red circle", "blue", "red", "stripes"],
                       "mapped": [True, True, False, True]})
    assert concept_units(um, "red") == [0]
    assert concept_units(um, "circle") == [0]
    assert concept_units(um, "green") == []


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"n": 10}, ValueError, r"n must be an integer >= 60; got 10"),
    ({"seed": -1}, ValueError, r"seed must be an integer >= 0"),
    ({"concept": "pink"}, ValueError, r"concept must be a ConceptWorld colour .* got 'pink'"),
    ({"erasure_strength": 0.0}, ValueError, r"erasure_strength must be a number > 0"),
    ({"top_k": 40, "n_concepts": 8}, ValueError, r"top_k \(40\) cannot exceed n_concepts \(8\)"),
    ({"generators": [], "concept": "red"}, ValueError, r"erasing 'red' needs a generator"),
    ({"generators": 3}, TypeError, r"generators must be a list"),
    ({"generators": [object()]}, TypeError, r"has no generate\(prompts, seeds\) method"),
    ({"generators": ["  "]}, ValueError, r"generator names must be non-empty"),
    ({"generators": ["world", "world"]}, ValueError, r"generator names must be unique"),
    ({"head": "forest"}, ValueError, r"head must be 'linear' or a cbm head"),
    ({"head": object()}, TypeError, r"head must be 'linear' or a cbm ConceptHead"),
    ({"world": object()}, TypeError, r"world must be a concepts.world.ConceptWorld"),
    ({"sae": "/nonexistent/sae", "generators": [], "concept": None}, FileNotFoundError, r"SAE checkpoint .* does not exist"),
    ({"encoder": 3.5, "generators": [], "concept": None}, TypeError, r"encoder must be a spec string"),
])
def test_audit_rejects_bad_settings(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        audit(**{"progress": False, **kwargs})


def test_audit_rejects_a_world_with_one_class():
    world = ConceptWorld(seed=0, image_size=32, rules=())
    with pytest.raises(ValueError, match="all have one class"):
        audit(world=world, generators=[], concept=None, n=60, progress=False)


def test_audit_rejects_an_erasure_it_cannot_run(result):
    with pytest.raises(ValueError, match="has no layer 'no.such.layer'"):
        audit(generators=["conceptworld-diffusion"], concept="red", erasure_layer="no.such.layer", n=60,
              progress=False)
    with pytest.raises(ValueError, match="exposes no layers"):
        audit(generators=["world"], concept="red", n=60, progress=False)


# ----------------------------------------------------------------------------------------------- command
def test_cli_audit_writes_the_report(result, tmp_path, monkeypatch, capsys):
    seen = {}

    def fake_audit(*args, **kwargs):
        seen.update(kwargs, encoder=args[0], sae=args[1])
        return result

    monkeypatch.setattr(audit_mod, "audit", fake_audit)
    out = tmp_path / "cli"
    assert main(["audit", "--out", str(out), "--n", "120", "--concept", "blue", "--generator", "conceptworld-ar",
                 "--generator", "conceptworld-diffusion", "--quiet"]) == 0
    assert f"wrote {out / 'index.html'}" in capsys.readouterr().out
    assert (out / "index.html").exists()
    assert seen["n"] == 120 and seen["concept"] == "blue" and seen["encoder"] == "builtin" and seen["sae"] is None
    assert seen["generators"] == ["conceptworld-ar", "conceptworld-diffusion"]
    assert main(["audit", "--out", str(out), "--concept", "none", "--generator", "none", "--quiet"]) == 0
    assert seen["concept"] is None and seen["generators"] == []


@pytest.mark.parametrize("argv, message", [
    (["--n", "10"], "n must be an integer >= 60; got 10."),
    (["--concept", "pink"], "concept must be a ConceptWorld colour"),
    (["--generator", "none"], "erasing 'red' needs a generator"),
    (["--sae", "/nonexistent/sae", "--generator", "none", "--concept", "none"], "does not exist"),
    (["--threads", "0"], "--threads must be a positive integer; got 0."),
])
def test_cli_audit_fails_with_a_one_line_reason(argv, message, capsys):
    assert main(["audit", "--quiet", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("conceptkit audit: error: ") and message in err
    assert len(err.splitlines()) == 1


def test_cli_audit_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["audit", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--n", "--seed", "--device", "--concept", "--generator", "--encoder", "--sae", "--offline"):
        assert opt in text
    assert "reports/audit" in text


def test_audit_without_generators_reports_concepts_and_importance_only(tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = audit(generators=None, concept=None, n=60, n_concepts=32, top_k=4, sae_epochs=3, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert res.erasure.empty and res.blindspots.empty and res.blindspot_summary.empty
    assert len(res.concepts) == 32 and res.settings["generators"] == []
    html = res.save(tmp_path / "a").read_text()
    assert 'id="concepts"' in html and 'id="importance"' in html
    assert 'id="erasure"' not in html and 'id="blindspots"' not in html


def test_audit_uses_the_given_sae_checkpoint(tmp_path):
    import torch

    import sae as sae_pkg
    from evaluation.blindspots_coder import ConceptCoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = ConceptWorld(seed=5, image_size=32).sample(60, seed=5).images
        trained = ConceptCoder.builtin(n_concepts=24, top_k=3, n_epochs=2, progress=False).fit(images).sae_
        path = sae_pkg.save(trained, tmp_path / "sae")
        res = audit(sae=path, generators=None, concept=None, n=60, progress=False)
    finally:
        torch.set_num_threads(threads)
    used = res.artifacts["coder"].sae_
    assert len(res.concepts) == 24 and res.settings["sae_given"]
    assert torch.allclose(torch.as_tensor(used.dictionary_), torch.as_tensor(trained.dictionary_))
    # the audit's energies are the given dictionary's codes of the renders' tokens, pooled per image
    batch = res.artifacts["batch"]
    direct = ConceptCoder.builtin(sae=trained, progress=False).fit(batch.images).transform(batch.images)
    assert np.allclose(res.concepts["mean_energy"], direct.energy.mean(0), rtol=1e-5, atol=1e-6)
