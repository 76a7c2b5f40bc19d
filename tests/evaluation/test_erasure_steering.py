"""Inference-time erasure on tiny random Stable Diffusion and Janus generators (real architectures, offline)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from concepts.generators import ClampFeatures, Generator, ProjectOut
from evaluation.erasure.leace import LeaceEraser
from evaluation.erasure.steering import (
    EditedGenerator,
    InferenceErasure,
    LeaceEdit,
    ablate_features,
    clamp_features,
    collect_activations,
    concept_feature_scores,
    fit_inference_erasure,
    fit_layer_sae,
    select_features,
)


def _builders():
    """The tiny-model builders of the generator tests (loaded by path: conftest modules are not importable)."""
    path = Path(__file__).parents[1] / "concepts" / "generators" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_erasure_tiny_generators", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _builders()
TEXT_LAYER = "text_encoder.final_layer_norm"
LM_LAYER = "model.language_model.layers.1"
RED = ["a red circle", "a red square on stripes", "a photo of a red star", "a red circle on dots"]
OTHER = ["a blue circle", "a green square on stripes", "a photo of a blue star", "a green circle on dots"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from concepts.generators import StableDiffusionGenerator

    pipe = B.build_sd(str(tmp_path_factory.mktemp("sd")))
    return StableDiffusionGenerator(pipe, model_id="tiny-sd", settings={"steps": 2})


@pytest.fixture(scope="module")
def janus():
    from concepts.generators import JanusGenerator

    return JanusGenerator(B.build_janus(), B.build_janus_processor(), model_id="tiny-janus")


@pytest.fixture(scope="module")
def janus_sae(janus):
    return fit_layer_sae(janus, LM_LAYER, RED + OTHER, seeds=100, phases="token", n_concepts=48, top_k=4, n_epochs=3,
                         sae_batch_size=64)


def _class_gap(X_t: torch.Tensor, X_o: torch.Tensor) -> float:
    return float((X_t.double().mean(0) - X_o.double().mean(0)).abs().max())


@pytest.mark.parametrize("method", ["leace", "orth", "direction", "leace-other"])
def test_text_layer_erasure_removes_the_linear_concept(sd, method):
    """Fitted on the text tower's token states, the edit equalises red and other prompts there."""
    anchor = "other" if method.endswith("other") else "mean"
    er = fit_inference_erasure(sd, TEXT_LAYER, RED, OTHER, method=method.split("-")[0], seeds=0, anchor=anchor)
    before_t = collect_activations(sd, TEXT_LAYER, RED, seeds=0)
    before_o = collect_activations(sd, TEXT_LAYER, OTHER, seeds=4)
    after_t = collect_activations(sd, TEXT_LAYER, RED, seeds=0, hooks=er.hooks(1.0))
    after_o = collect_activations(sd, TEXT_LAYER, OTHER, seeds=4, hooks=er.hooks(1.0))
    assert _class_gap(before_t, before_o) > 0.1
    if method == "direction":  # the mean-difference direction is gone from every row
        u = er.info["direction"].double()
        assert float((after_t.double() @ u).abs().max()) < 1e-4
        assert float((after_o.double() @ u).abs().max()) < 1e-4
    else:
        assert _class_gap(after_t, after_o) < 1e-4
        assert er.info["eraser"].rank == 1
    if anchor == "other":  # the rows without the concept keep their mean; the concept's rows move to it
        assert _class_gap(after_o, before_o) < 1e-4
    # the text edit changes the images of the red prompts
    base = sd.generate(RED[:2], seeds=[0, 1])
    erased = er.apply(sd).generate(RED[:2], seeds=[0, 1])
    assert not torch.equal(base.images, erased.images)


def test_zero_strength_is_the_identity_on_every_method(sd, janus, janus_sae):
    cases = [
        (sd, fit_inference_erasure(sd, TEXT_LAYER, RED, OTHER, method="leace")),
        (sd, fit_inference_erasure(sd, "unet.mid_block", RED, OTHER, method="orth", dim=1, steps=range(0, 2))),
        (janus, fit_inference_erasure(janus, LM_LAYER, RED, OTHER, method="direction", phases="token")),
        (janus, fit_inference_erasure(janus, LM_LAYER, RED, OTHER, method="sae-ablate", sae=janus_sae,
                                      phases="token", n_features=4)),
        (janus, fit_inference_erasure(janus, LM_LAYER, RED, OTHER, method="sae-clamp", sae=janus_sae,
                                      rows="cond", tokens=range(3, 16), multiplier=2.0)),
    ]
    for gen, er in cases:
        base = gen.generate(RED[:2], seeds=[5, 6])
        same = er.apply(gen, strength=0.0).generate(RED[:2], seeds=[5, 6])
        assert torch.equal(base.images, same.images), er
        if base.tokens is not None:
            assert torch.equal(base.tokens, same.tokens)
        moved = er.apply(gen, strength=3.0).generate(RED[:2], seeds=[5, 6])
        assert not torch.equal(base.images, moved.images), er


def test_sae_feature_selection_finds_the_concept_features(janus, janus_sae):
    er = fit_inference_erasure(janus, LM_LAYER, RED, OTHER, method="sae-clamp", sae=janus_sae, phases="token",
                               n_features=3, multiplier=1.5)
    scores = er.info["scores"]
    feats = er.info["features"]
    assert feats == scores.feature.head(len(feats)).tolist()
    top = scores.set_index("feature").loc[feats]
    assert (top.share_target > top.share_other).all()
    assert torch.allclose(er.info["value"], -1.5 * torch.tensor(top.mean_target.to_numpy(), dtype=torch.float32))
    assert isinstance(er.edit(1.0), ClampFeatures)
    # planted: a feature that only fires with the concept ranks first
    g = torch.Generator().manual_seed(0)
    zt, zo = torch.rand(50, 6, generator=g), torch.rand(50, 6, generator=g)
    zt[:, 4] += 3.0
    assert select_features(concept_feature_scores(zt, zo), 1) == [4]


def test_collect_activations_rows_and_restrictions(sd, janus):
    n = 2
    X = collect_activations(janus, LM_LAYER, RED[:n], seeds=0, phases="token")
    assert X.shape == (n * 15, 32)  # 16 image tokens -> 15 fed tokens, cond rows only
    both = collect_activations(janus, LM_LAYER, RED[:n], seeds=0, phases="token", rows="all")
    assert both.shape == (2 * n * 15, 32)
    cache = janus.run_with_cache(RED[:n], [0, 1], [LM_LAYER])
    cond, _ = cache.split_cfg(LM_LAYER)
    prefix = cond.shape[1] - 15
    assert torch.allclose(X.reshape(15, n, 32).transpose(0, 1), cond[:, prefix:], atol=1e-6)  # call-major rows
    conv = collect_activations(sd, "unet.mid_block", RED[:n], seeds=0, dim=1, steps=[1])
    c, h, w = sd.run_with_cache(RED[:1], [0], ["unet.mid_block"]).calls["unet.mid_block"][0].shape[1:]
    assert conv.shape == (n * h * w, c)


def test_edited_generator_protocol_and_hook_merging(sd):
    er = fit_inference_erasure(sd, TEXT_LAYER, RED, OTHER, method="leace")
    erased = er.apply(sd)
    assert isinstance(erased, Generator) and erased.model_id == "tiny-sd+leace@1"
    assert erased.cfg_layout == sd.cfg_layout and erased.module_names("mid_block") == sd.module_names("mid_block")
    seen = []
    out = erased.run_with_hooks(RED[:1], [0], {TEXT_LAYER: lambda x: seen.append(x.clone())})
    assert torch.equal(out.images, erased.generate(RED[:1], [0]).images)
    eraser: LeaceEraser = er.info["eraser"]
    raw = sd.run_with_cache(RED[:1], [0], [TEXT_LAYER]).calls[TEXT_LAYER][0]
    assert torch.allclose(seen[0], eraser(raw), atol=1e-5)  # later hooks see the erased output
    cached = erased.run_with_cache(RED[:1], [0], [TEXT_LAYER])
    assert torch.allclose(cached.calls[TEXT_LAYER][0], eraser(raw), atol=1e-5)
    a, b = erased.split_cfg(torch.arange(4))
    assert a.tolist() == [2, 3] and b.tolist() == [0, 1]


def test_edit_helpers_closed_forms():
    class Lin:
        def encode(self, x):
            return x

        def decode(self, z):
            return z

    x = torch.tensor([[2.0, -1.0, 3.0]])
    assert ablate_features(Lin(), [0, 2], 2.0)(x).tolist() == [[-2.0, -1.0, -3.0]]
    assert ablate_features(Lin(), [0], 0.0)(x).tolist() == x.tolist()
    assert clamp_features(Lin(), [0, 1], torch.tensor([4.0, 4.0]), 0.5)(x).tolist() == [[3.0, -1.0, 3.0]]
    e = LeaceEraser(torch.tensor([[1.0], [0.0], [0.0]]), torch.tensor([[1.0, 0.0, 0.0]]), None, "orth")
    assert LeaceEdit(e, 0.5)(x).tolist() == [[1.0, -1.0, 3.0]]
    assert LeaceEdit(e, 0.0)(x) is None
    er = InferenceErasure.from_direction("l", torch.tensor([0.0, 0.0, 1.0]))
    assert isinstance(er.edit(), ProjectOut) and er.edit(1.0)(x).tolist() == [[2.0, -1.0, 0.0]]
    assert "direction" in repr(er) and "LeaceEdit(rank=1" in repr(LeaceEdit(e))


def test_errors(sd):
    with pytest.raises(ValueError, match="method must be one of"):
        fit_inference_erasure(sd, TEXT_LAYER, RED, OTHER, method="esd")
    with pytest.raises(ValueError, match="needs sae="):
        fit_inference_erasure(sd, TEXT_LAYER, RED, OTHER, method="sae-ablate")
    with pytest.raises(ValueError, match="must both be non-empty"):
        fit_inference_erasure(sd, TEXT_LAYER, [], OTHER)
    with pytest.raises(ValueError, match="anchor must be 'mean' or 'other'"):
        fit_inference_erasure(sd, TEXT_LAYER, RED, OTHER, anchor="red")
    with pytest.raises(ValueError, match="fit_rows must be"):
        fit_inference_erasure(sd, TEXT_LAYER, RED, OTHER, fit_rows="uncond")
    with pytest.raises(TypeError, match="seeds must be an int or a pair"):
        fit_inference_erasure(sd, TEXT_LAYER, RED, OTHER, seeds="0")
    with pytest.raises(ValueError, match="got 1 seeds for 4 target prompts"):
        fit_inference_erasure(sd, TEXT_LAYER, RED, OTHER, seeds=([0], 0))
    with pytest.raises(ValueError, match="rows must be"):
        fit_inference_erasure(sd, TEXT_LAYER, RED, OTHER, rows="both")
    with pytest.raises(ValueError, match="No call of layer"):
        collect_activations(sd, "unet.mid_block", RED[:1], phases="decode")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        collect_activations(sd, TEXT_LAYER, RED[:1], batch_size=0)
    with pytest.raises(ValueError, match="prompts is empty"):
        collect_activations(sd, TEXT_LAYER, [])
    with pytest.raises(ValueError, match="No SAE feature scores above"):
        select_features(pd.DataFrame({"feature": [0], "score": [-1.0]}))
    with pytest.raises(ValueError, match="n_features must be a positive int"):
        select_features(pd.DataFrame({"feature": [0], "score": [1.0]}), 0)
    with pytest.raises(TypeError, match="scores must be the DataFrame"):
        select_features({"feature": [0]})
    with pytest.raises(ValueError, match="same k"):
        concept_feature_scores(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="at least one row"):
        concept_feature_scores(np.ones((0, 3)), np.ones((2, 3)))
    with pytest.raises(TypeError, match="Generator protocol"):
        EditedGenerator(object(), {})
    with pytest.raises(TypeError, match="hooks must be a mapping"):
        EditedGenerator(sd, [])
    with pytest.raises(TypeError, match="hooks must be a mapping"):
        EditedGenerator(sd, {}).run_with_hooks(RED[:1], [0], [])
    with pytest.raises(TypeError, match="eraser must be a LeaceEraser"):
        LeaceEdit(torch.eye(2))
    with pytest.raises(TypeError, match="eraser must be a LeaceEraser"):
        InferenceErasure.from_eraser("l", torch.eye(2))
    with pytest.raises(TypeError, match="strength must be a real number"):
        ablate_features(object(), [0], "1")
    with pytest.raises(TypeError, match="value must be a number or a tensor"):
        clamp_features(object(), [0], "x")
    with pytest.raises(ValueError, match="mode must be 'ablate' or 'clamp'"):
        InferenceErasure.from_sae("l", object(), [0], mode="zero")
    with pytest.raises(ValueError, match="class means coincide"):
        fit_inference_erasure(sd, TEXT_LAYER, RED[:1], RED[:1], method="direction", seeds=(0, 0))
