"""ARLoopGenerator with a LlamaGen-style toy loop and a VAR-style (multi-token, scheduled CFG) loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from concepts.generators import AddVector, ARLoopGenerator, CFGLayout, ClampFeatures, Generator

CLASSES = ["red", "blue"]
LAYER = "backbone.layers.0"


def test_toy_llamagen_determinism_and_records(toy_ar_gen):
    assert isinstance(toy_ar_gen, Generator)
    a = toy_ar_gen.generate(CLASSES, [0, 1])
    assert a.images.shape == (2, 3, 3, 3) and a.tokens.shape == (2, 9)
    assert torch.equal(a.tokens, toy_ar_gen.generate(CLASSES, [0, 1]).tokens)
    assert torch.equal(toy_ar_gen.generate(CLASSES[1:], [1]).tokens[0], a.tokens[1])  # per-image generator
    assert not torch.equal(toy_ar_gen.generate(CLASSES, [0, 2]).tokens[1], a.tokens[1])
    df = a.to_frame()
    assert df.guidance.tolist() == [3.0, 3.0] and df.steps.tolist() == [9, 9] and set(df.family) == {"autoregressive"}
    # images are the decoded tokens mapped from [-1, 1] to [0, 1]
    with torch.no_grad():
        expected = (toy_ar_gen.model.decode(a.tokens).permute(0, 2, 3, 1) + 1) / 2
    assert torch.allclose(a.images, expected, atol=1e-6)


def test_toy_llamagen_call_map_cache_and_cfg_rows(toy_ar_gen, toy_ar):
    cache = toy_ar_gen.run_with_cache(CLASSES, [0, 1], [LAYER, "head", "cls_emb", "codebook"])
    cm = cache.call_map
    lay = cm[cm.layer == LAYER]
    assert lay.phase.tolist() == ["prefill"] + ["token"] * 8 and lay.step.tolist() == list(range(9))
    assert cache[LAYER].shape == (4, 1 + 8, 32)  # class token + 8 fed image tokens
    assert cache["head"].shape == (4, 9, 16)  # one logit row per sampled token (2-D calls are stacked)
    assert cm[cm.layer == "codebook"].phase.tolist() == ["decode"]
    # cond_uncond: the unconditional rows carry the null class embedding
    cond, uncond = cache.split_cfg("cls_emb")
    null = toy_ar.cls_emb.weight[len(toy_ar.classes)].detach()  # the null class
    assert torch.equal(uncond[:, 0], null.expand(2, -1))
    assert torch.equal(cond[:, 0], toy_ar.cls_emb.weight[:2].detach())
    # the guided head logits reproduce greedy tokens: uncond + 3 (cond - uncond)
    greedy = toy_ar_gen.run_with_cache(CLASSES, [0, 1], ["head"], temperature=0)
    c, u = greedy.split_cfg("head")
    assert torch.equal((u + 3.0 * (c - u)).argmax(-1), greedy.result.tokens)
    # guidance 1: no CFG batch, one row per image
    nocfg = toy_ar_gen.run_with_cache(CLASSES, [0, 1], ["head"], guidance=1.0)
    assert nocfg["head"].shape == (2, 9, 16)


def test_toy_llamagen_edits(toy_ar_gen, check_noops):
    check_noops(toy_ar_gen, LAYER, 32, -1, CLASSES, [0, 1], separately=True)
    v = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 3
    base = toy_ar_gen.run_with_cache(CLASSES, [0, 1], [LAYER])
    edited = toy_ar_gen.run_with_cache(CLASSES, [0, 1], [LAYER], hooks={LAYER: AddVector(v, rows="cond")})
    b0, e0 = base.calls[LAYER][0], edited.calls[LAYER][0]
    assert torch.equal(e0[2:], b0[2:]) and torch.allclose(e0[:2], b0[:2] + v, atol=1e-5)
    assert not torch.equal(edited.result.tokens, base.result.tokens)
    late = toy_ar_gen.run_with_hooks(CLASSES, [0, 1], {LAYER: AddVector(v, steps=range(5, 9))})
    assert torch.equal(late.tokens[:, :5], base.result.tokens[:, :5])
    assert not torch.equal(late.tokens, base.result.tokens)


class ToyVAR(nn.Module):
    """Next-scale toy: stage s predicts sizes[s] tokens at once; V = 3.

    Conditional rows put logit 1 on token 1, unconditional rows on token 2, so the guided argmax
    is token 1 for a positive guidance scale and token 2 for a negative one.
    """

    sizes = (1, 4, 9)

    def __init__(self, order: str):
        super().__init__()
        self.layout = CFGLayout(order)
        self.proj = nn.Linear(3, 8)
        self.fed: list[torch.Tensor] = []

    def _logits(self, rows: int, n: int, cfg: bool, tokens_in: torch.Tensor) -> torch.Tensor:
        self.proj(nn.functional.one_hot(tokens_in, 3).float())  # hooked activation [rows, n_in, 8]
        cond = torch.tensor([0.0, 1.0, 0.0]).expand(rows // 2 if cfg else rows, n, 3)
        if not cfg:
            return cond
        uncond = torch.tensor([0.0, 0.0, 1.0]).expand_as(cond)
        return self.layout.merge(cond, uncond)

    def prefill(self, prompts, cfg):
        rows = 2 * len(prompts) if cfg else len(prompts)
        return self._logits(rows, self.sizes[0], cfg, torch.zeros(rows, 1, dtype=torch.long)), {"cfg": cfg}

    def step(self, tokens, s, state):
        self.fed.append(tokens.clone())
        return self._logits(tokens.shape[0], self.sizes[s], state["cfg"], tokens), state

    def decode(self, tokens):  # [N, 14] -> a 1 x 14 strip, channels last
        return (tokens.float() / 2)[:, None, :, None].expand(-1, 1, -1, 3)


@pytest.mark.parametrize("order", ["cond_uncond", "interleaved", "uncond_cond"])
def test_var_style_multi_token_steps_and_cfg_schedule(order):
    toy = ToyVAR(order)
    gen = ARLoopGenerator(toy, prefill=toy.prefill, step=toy.step, decode=toy.decode, num_steps=3, cfg_order=order,
                          image_range=(0.0, 1.0), channels_last=True,
                          cfg_schedule=lambda s, g: -1.0 if s == 1 else g, settings={"guidance": 2.0})
    cache = gen.run_with_cache(["a", "b"], [0, 1], ["proj"], temperature=0)
    tokens = cache.result.tokens
    assert tokens.shape == (2, 14)
    assert tokens[:, :1].eq(1).all() and tokens[:, 1:5].eq(2).all() and tokens[:, 5:].eq(1).all()
    cm = cache.call_map
    assert cm.phase.tolist() == ["prefill", "token", "token"]
    assert cm.step.tolist() == [0, 1, 2] and cm.token_offset.tolist() == [0, 1, 5]
    assert cache["proj"].shape == (4, 1 + 1 + 4, 8)  # start token, stage-0 token, stage-1 tokens
    # fed tokens are duplicated to both CFG rows of each image in the loop's row order
    for fed in toy.fed:
        cond, uncond = CFGLayout(order).split(fed)
        assert torch.equal(cond, uncond)
    assert torch.equal(cache.result.images[..., 0], tokens.float()[:, None, :] / 2)


def test_unconditional_loop():
    toy = ToyVAR("cond_uncond")
    gen = ARLoopGenerator(toy, prefill=toy.prefill, step=toy.step, decode=toy.decode, num_steps=3,
                          image_range=(0.0, 1.0), channels_last=True, conditional=False)
    out = gen.generate(None, [0, 1], temperature=0)
    assert out.tokens.eq(1).all() and gen.cfg_layout is None and out.records[0]["guidance"] is None
    with pytest.raises(ValueError, match="is unconditional and cannot follow prompts"):
        gen.generate(["a", "b"], [0, 1])


def test_ar_loop_errors(toy_ar):
    kw = {"prefill": toy_ar.prefill, "step": toy_ar.step, "decode": toy_ar.decode, "num_steps": 9}
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        ARLoopGenerator("gpt", **kw)
    with pytest.raises(TypeError, match="needs a prefill callable"):
        ARLoopGenerator(toy_ar, **{**kw, "prefill": None})
    with pytest.raises(TypeError, match="step must be callable"):
        ARLoopGenerator(toy_ar, **{**kw, "step": 3})
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        ARLoopGenerator(toy_ar, **{**kw, "num_steps": 0})
    with pytest.raises(ValueError, match="cfg_order must be one of"):
        ARLoopGenerator(toy_ar, **kw, cfg_order="pairs")
    with pytest.raises(ValueError, match="image_range must be"):
        ARLoopGenerator(toy_ar, **kw, image_range=(1.0, 0.0))
    with pytest.raises(TypeError, match="cfg_schedule must be callable"):
        ARLoopGenerator(toy_ar, **kw, cfg_schedule=2.0)
    with pytest.raises(TypeError, match="unknown setting"):
        ARLoopGenerator(toy_ar, **kw, settings={"cfg": 2.0})

    def wrong_rows(prompts, cfg):  # forgets the unconditional rows
        return toy_ar.prefill(prompts, False)

    gen = ARLoopGenerator(toy_ar, **{**kw, "prefill": wrong_rows}, settings={"guidance": 2.0})
    with pytest.raises(ValueError, match=r"expected \[4, V\] or \[4, n, V\] \(2 x N images, CFG on"):
        gen.generate(CLASSES, [0, 1])
    gen = ARLoopGenerator(toy_ar, **{**kw, "prefill": lambda p, cfg: ((1, 2), None)})
    with pytest.raises(TypeError, match="returned tuple as logits"):
        gen.generate(CLASSES, [0, 1])
    gen = ARLoopGenerator(toy_ar, **{**kw, "decode": lambda t: t.float()})
    with pytest.raises(ValueError, match="decode must return images"):
        gen.generate(CLASSES, [0, 1])
    gen = ARLoopGenerator(toy_ar, **{**kw, "decode": lambda t: torch.zeros(len(t), 4, 3, 3)})
    with pytest.raises(ValueError, match="decoded images have 4 channels"):
        gen.generate(CLASSES, [0, 1])


def test_clamp_with_a_fitted_topk_sae(toy_ar_gen):
    """Integration with sae.TopKSAE (transform / inverse_transform): identity and closed form."""
    sae_pkg = pytest.importorskip("sae")
    cache = toy_ar_gen.run_with_cache(CLASSES, [0, 1], [LAYER])
    acts = cache[LAYER].reshape(-1, 32)
    sae = sae_pkg.TopKSAE(n_concepts=16, top_k=4, n_epochs=1, batch_size=16, random_state=0).fit(acts)
    same = toy_ar_gen.run_with_hooks(CLASSES, [0, 1], {LAYER: ClampFeatures(sae, [0, 5], value=lambda z: z)})
    assert torch.equal(same.tokens, cache.result.tokens) and torch.equal(same.images, cache.images)
    z = sae.transform(acts)
    feat = int(z.abs().sum(0).argmax())  # the most used concept
    zc = z.clone()
    zc[:, feat] = 0.0
    out = ClampFeatures(sae, [feat], value=0.0)(acts)
    assert torch.allclose(out, acts - sae.inverse_transform(z) + sae.inverse_transform(zc), atol=1e-5)
    assert not torch.allclose(out, acts)
    erased = toy_ar_gen.run_with_hooks(CLASSES, [0, 1], {LAYER: ClampFeatures(sae, [feat], value=0.0, rows="cond")})
    assert erased.call_map is not None and len(erased.call_map) == 9
