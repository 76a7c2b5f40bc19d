"""The Generator protocol across adapters, results and caches."""
from __future__ import annotations

import logging

import pytest
import torch

from concepts.generators import ActivationCache, CallContext, CFGLayout, GenerationResult, Generator


@pytest.mark.parametrize(
    "fixture, prompts, layer, order",
    [
        ("sd_gen", ["a red circle"], "unet.mid_block", "uncond_cond"),
        ("pixart_gen", ["a red circle"], "transformer.transformer_blocks.1", "uncond_cond"),
        ("ddpm_gen", None, "unet.mid_block", None),
        ("janus_gen", ["a red circle"], "model.language_model.layers.1", "cond_uncond"),
        ("toy_ar_gen", ["red"], "backbone.layers.1", "cond_uncond"),
    ],
)
def test_every_adapter_follows_the_protocol(request, fixture, prompts, layer, order):
    gen = request.getfixturevalue(fixture)
    assert isinstance(gen, Generator)
    assert layer in gen.module_names() and all("mid_block" in n for n in gen.module_names("mid_block"))
    assert (gen.cfg_layout.order if gen.cfg_layout else None) == order
    cache = gen.run_with_cache(prompts, [5], [layer])
    out = gen.generate(prompts, [5])
    assert torch.equal(cache.images, out.images)  # caching does not change the generation
    assert out.images.shape[0] == 1 and out.images.shape[-1] == 3 and out.images.dtype == torch.float32
    rec = out.records[0]
    for key in ("index", "prompt", "seed", "family", "model_id", "steps", "guidance", "height", "width"):
        assert key in rec
    assert rec["seed"] == 5 and rec["edited_layers"] == "" and out.call_map is None
    n_calls = len(cache.calls[layer])
    assert n_calls == rec["steps"]  # one call per denoising step / per sampled image token


def test_unused_layer_is_reported(janus_gen, caplog):
    layer = "model.vision_model.encoder"  # the understanding tower is not used to generate
    with caplog.at_level(logging.WARNING, logger="concepts.generators.base"):
        cache = janus_gen.run_with_cache(["a red circle"], [0], [layer])
    assert "never called" in caplog.text
    with pytest.raises(ValueError, match="was never called during the generation"):
        cache[layer]
    with pytest.raises(KeyError, match="was not cached"):
        cache["model.language_model"]


def _ctx(layer, call, phase="denoise", rows=2, branch=None):
    return CallContext(layer, call, phase, call, None, None, 1, rows, CFGLayout("uncond_cond"), branch)


def test_activation_cache_assembly_rules():
    calls = {"a": [torch.full((2, 3), float(i)) for i in range(3)], "b": [torch.zeros(2, 3), torch.zeros(2, 4)]}
    ctxs = {k: [_ctx(k, i) for i in range(len(v))] for k, v in calls.items()}
    cache = ActivationCache(calls, ctxs, result=None, layout="steps", cfg=CFGLayout("uncond_cond"))
    assert cache["a"].shape == (2, 3, 3) and cache["a"][:, 2].eq(2).all()
    assert len(cache) == 2 and list(cache) == ["a", "b"] and cache.images is None
    assert cache.call_map.layer.tolist() == ["a"] * 3 + ["b"] * 2
    with pytest.raises(ValueError, match="cannot be assembled into one tensor"):
        cache["b"]
    seq = ActivationCache({"s": [torch.zeros(2, 5, 4), torch.ones(2, 1, 4)]},
                          {"s": [_ctx("s", 0, "prefill"), _ctx("s", 1, "token")]},
                          result=None, layout="sequence", cfg=None)
    assert seq["s"].shape == (2, 6, 4) and seq["s"][:, 5].eq(1).all()
    with pytest.raises(ValueError, match="did not use classifier-free guidance"):
        seq.split_cfg("s")
    enc = ActivationCache({"t": [torch.ones(1, 3), torch.zeros(1, 3)]},
                          {"t": [_ctx("t", 0, "encode", 1, "cond"), _ctx("t", 1, "encode", 1, "uncond")]},
                          result=None, layout="steps", cfg=CFGLayout("uncond_cond"))
    assert enc["t"][:, 0].tolist() == [0.0, 1.0]  # merged in the family order: uncond row first
    with pytest.raises(ValueError, match="layout must be"):
        ActivationCache({}, {}, result=None, layout="calls", cfg=None)


def test_generation_result_helpers():
    imgs = torch.tensor([[[[0.0, 0.5, 1.0]]]])
    r = GenerationResult(imgs, [{"prompt": "x", "seed": 3}])
    assert len(r) == 1 and r.to_uint8().tolist() == [[[[0, 128, 255]]]]
    assert r.to_frame().to_dict("records") == [{"prompt": "x", "seed": 3}]
    assert r.to_pil()[0].size == (1, 1)
    assert _ctx("l", 0).as_dict()["cfg"] == "uncond_cond"
