"""transformers Janus adapter on a tiny random JanusForConditionalGeneration, offline."""
from __future__ import annotations

import pytest
import torch

from concepts.generators import AddVector, Generator, JanusGenerator, from_pretrained

PROMPTS = ["a red circle", "blue square on stripes"]  # 3 and 4 words: prompts of different lengths
LAYER = "model.language_model.layers.0"


def _ids(processor, prompt):
    return processor(text=[prompt], generation_mode="image", return_tensors="pt")


def test_janus_determinism_records_and_batch_independence(janus_gen):
    assert isinstance(janus_gen, Generator)
    a = janus_gen.generate(PROMPTS, [0, 1])
    b = janus_gen.generate(PROMPTS, [0, 1])
    assert a.images.shape == (2, 8, 8, 3) and a.tokens.shape == (2, 16)
    assert torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens)
    assert float(a.images.min()) >= 0 and float(a.images.max()) <= 1
    alone = janus_gen.generate(PROMPTS[1:], [1])  # no padding, other batch: same tokens
    assert torch.equal(alone.tokens[0], a.tokens[1])
    other_seed = janus_gen.generate(PROMPTS, [0, 2])
    assert torch.equal(other_seed.tokens[0], a.tokens[0]) and not torch.equal(other_seed.tokens[1], a.tokens[1])
    df = a.to_frame()
    assert df.guidance.tolist() == [5.0, 5.0] and df.steps.tolist() == [16, 16] and df.n_tokens.tolist() == [16, 16]
    assert set(df.family) == {"janus"} and df.prompt.tolist() == PROMPTS and df.temperature.tolist() == [1.0, 1.0]


def test_janus_greedy_matches_transformers_generate(janus_gen, janus_model, janus_processor):
    """Our loop (batched, left-padded) reproduces JanusForConditionalGeneration.generate token for token."""
    ours = janus_gen.generate(PROMPTS, [0, 1], temperature=0, guidance=3.0)
    for i, prompt in enumerate(PROMPTS):
        enc = _ids(janus_processor, prompt)
        with torch.no_grad():
            ref = janus_model.generate(enc.input_ids, attention_mask=enc.attention_mask, generation_mode="image",
                                       do_sample=False, guidance_scale=3.0)
        assert torch.equal(ref[0], ours.tokens[i])
        with torch.no_grad():
            img = janus_model.decode_image_tokens(ref)
        assert torch.allclose(ours.images[i], ((img[0] + 1) / 2).clamp(0, 1), atol=1e-5)


def test_janus_call_map_and_cache_layout(janus_gen, janus_processor):
    layers = [LAYER, "model.language_model.embed_tokens", "model.generation_head", "model.vqmodel.decoder"]
    cache = janus_gen.run_with_cache(PROMPTS, [0, 1], layers)
    cm = cache.call_map
    lm = cm[cm.layer == LAYER]
    assert len(lm) == 16  # prefill + one call per fed image token (16 tokens, the last is not fed)
    assert lm.phase.tolist() == ["prefill"] + ["token"] * 15
    assert lm.step.tolist() == list(range(16)) and lm.token_offset.tolist() == list(range(16))
    assert set(lm.rows) == {4} and set(lm.cfg) == {"cond_uncond"}
    lengths = [_ids(janus_processor, p).input_ids.shape[1] for p in PROMPTS]
    assert lengths == [5, 6]
    assert cache[LAYER].shape == (4, 6 + 15, 32)  # prompt positions then fed image tokens
    assert cache["model.generation_head"].shape == (4, 16, 64)  # one logit row per sampled token
    assert cm[cm.layer == "model.vqmodel.decoder"].phase.tolist() == ["decode"]
    # the generation head's logits reproduce the sampled tokens under greedy decoding
    greedy = janus_gen.run_with_cache(PROMPTS, [0, 1], ["model.generation_head"], temperature=0)
    cond, uncond = greedy.split_cfg("model.generation_head")
    assert torch.equal((uncond + 5.0 * (cond - uncond)).argmax(-1), greedy.result.tokens)


def test_janus_cfg_rows_marker(janus_gen, janus_processor):
    """Prefill rows are [cond; uncond]; uncond prompts keep BOS/BOI and pad everything else."""
    cache = janus_gen.run_with_cache(PROMPTS, [0, 1], ["model.language_model.embed_tokens"])
    emb = janus_gen.model.get_input_embeddings()
    x = cache.calls["model.language_model.embed_tokens"][0]  # [4, 6, 32]
    cond, uncond = cache.split_cfg("model.language_model.embed_tokens")
    for i, prompt in enumerate(PROMPTS):
        ids = _ids(janus_processor, prompt).input_ids[0]
        pad = 6 - len(ids)
        with torch.no_grad():
            assert torch.equal(cond[i, pad:], emb(ids))
            un_ids = torch.where((ids == 1) | (ids == 4), ids, torch.zeros_like(ids))
            assert torch.equal(uncond[i, pad:], emb(un_ids))
            assert torch.equal(x[i, pad:], emb(ids)) and torch.equal(x[2 + i, pad:], emb(un_ids))  # rows 0..N-1 cond


def test_janus_noop_edits_exact(janus_gen, check_noops):
    check_noops(janus_gen, LAYER, 32, -1, PROMPTS, [0, 1])


def test_janus_edits_cond_rows_and_token_range(janus_gen):
    v = torch.randn(32, generator=torch.Generator().manual_seed(0)) * 5
    base = janus_gen.run_with_cache(PROMPTS, [0, 1], [LAYER])
    edited = janus_gen.run_with_cache(PROMPTS, [0, 1], [LAYER], hooks={LAYER: AddVector(v, rows="cond")})
    b0, e0 = base.calls[LAYER][0], edited.calls[LAYER][0]  # prefill
    assert torch.equal(e0[2:], b0[2:])  # uncond rows untouched
    assert torch.allclose(e0[:2], b0[:2] + v, atol=1e-5)
    assert not torch.equal(edited.result.tokens, base.result.tokens)
    late = janus_gen.run_with_hooks(PROMPTS, [0, 1], {LAYER: AddVector(v, steps=range(8, 16))})
    assert torch.equal(late.tokens[:, :8], base.result.tokens[:, :8])  # tokens before the edited steps
    assert not torch.equal(late.tokens, base.result.tokens)
    assert late.call_map.token_offset.tolist() == list(range(16))
    by_token = janus_gen.run_with_hooks(PROMPTS, [0, 1], {LAYER: AddVector(v, tokens=range(8, 16))})
    assert torch.equal(by_token.tokens, late.tokens)  # raster AR: token index == step


def test_janus_tokenize_fn_and_plain_tokenizer_paths(janus_model, janus_processor, janus_gen, builders):
    ref = janus_gen.generate(PROMPTS, [0, 1])

    def tokenize(prompts):  # ids without BOI: the adapter appends it
        return [_ids(janus_processor, p).input_ids[0, :-1].tolist() for p in prompts]

    via_fn = JanusGenerator(janus_model, tokenize_fn=tokenize)
    assert torch.equal(via_fn.generate(PROMPTS, [0, 1]).tokens, ref.tokens)
    via_tok = JanusGenerator(janus_model, janus_processor.tokenizer)  # plain tokenizer: BOI appended
    assert torch.equal(via_tok.generate(PROMPTS, [0, 1]).tokens, ref.tokens)


def test_janus_chat_template_formats_prompts(janus_model, builders):
    processor = builders.janus_processor()
    processor.chat_template = "{% for m in messages %}photo of {{ m['content'][0]['text'] }}{% endfor %}"
    templated = JanusGenerator(janus_model, processor).generate(PROMPTS, [0, 1])

    def tokenize(prompts):
        return [_ids(processor, "photo of " + p).input_ids[0].tolist() for p in prompts]

    assert torch.equal(templated.tokens, JanusGenerator(janus_model, tokenize_fn=tokenize).generate(PROMPTS, [0, 1]).tokens)
    raw = JanusGenerator(janus_model, processor, use_chat_template=False).generate(PROMPTS, [0, 1])
    assert not torch.equal(raw.tokens, templated.tokens)


def test_janus_from_pretrained_round_trip(tmp_path, janus_model, janus_processor, janus_gen):
    folder = tmp_path / "janus"
    janus_model.save_pretrained(folder)
    janus_processor.save_pretrained(folder)
    gen = from_pretrained(str(folder))
    assert isinstance(gen, JanusGenerator) and gen.model_id == str(folder)
    a, b = gen.generate(PROMPTS, [0, 1]), janus_gen.generate(PROMPTS, [0, 1])
    assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.images, b.images, atol=1e-5)
    bare = tmp_path / "bare"
    janus_model.save_pretrained(bare)  # no processor files
    with pytest.raises(ValueError, match="needs a way to tokenize prompts"):
        JanusGenerator.from_pretrained(str(bare))
    gen2 = JanusGenerator.from_pretrained(str(bare), processor=janus_processor, dtype="float32")
    assert torch.equal(gen2.generate(PROMPTS, [0, 1]).tokens, b.tokens)


def test_janus_errors(janus_model, janus_processor, janus_gen, builders):
    with pytest.raises(TypeError, match="expects a transformers JanusForConditionalGeneration"):
        JanusGenerator(torch.nn.Linear(2, 2), janus_processor)
    with pytest.raises(ValueError, match="needs a way to tokenize prompts"):
        JanusGenerator(janus_model)
    with pytest.raises(TypeError, match="tokenize_fn must be callable"):
        JanusGenerator(janus_model, tokenize_fn=3)
    model = builders.janus()
    model.generation_config.generation_kwargs = {}
    with pytest.raises(ValueError, match="Could not find the boi_token_id"):
        JanusGenerator(model, tokenize_fn=lambda p: [[1, 5]] * len(p))
    assert JanusGenerator(model, tokenize_fn=lambda p: [[1, 5]] * len(p), boi_token_id=4).boi_token_id == 4
    with pytest.raises(ValueError, match="tokenized to an empty sequence"):
        JanusGenerator(janus_model, tokenize_fn=lambda p: [[] for _ in p]).generate(["a"], [0])
    with pytest.raises(ValueError, match="returned 1 sequences for 2 prompts"):
        JanusGenerator(janus_model, tokenize_fn=lambda p: [[1]]).generate(PROMPTS, [0, 1])
    with pytest.raises(TypeError, match="unknown setting"):
        janus_gen.generate(PROMPTS, [0, 1], steps=3)
    with pytest.raises(ValueError, match="is text-conditional"):
        janus_gen.generate(None, [0])
    bad = builders.janus()
    bad.config.vision_config.num_image_tokens = 9
    with pytest.raises(ValueError, match="does not match the VQ grid"):
        JanusGenerator(bad, janus_processor)
