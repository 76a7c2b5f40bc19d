"""Diffusers adapters (Stable Diffusion, PixArt, DDPM) on tiny random pipelines, offline."""
from __future__ import annotations

import pytest
import torch

from concepts.generators import (
    AddVector,
    ClampFeatures,
    Generator,
    PixArtGenerator,
    StableDiffusionGenerator,
    UnconditionalDiffusionGenerator,
    from_pretrained,
)
from concepts.hooks import LayerNotFoundError

PROMPTS = ["a red circle", "blue square on stripes"]
SD_TO_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


# ---------------------------------------------------------------------------------------------
# Stable Diffusion
# ---------------------------------------------------------------------------------------------
def test_sd_seeded_determinism_and_records(sd_gen):
    assert isinstance(sd_gen, Generator)
    a = sd_gen.generate(PROMPTS, seeds=[3, 4])
    b = sd_gen.generate(PROMPTS, seeds=[3, 4])
    assert a.images.shape == (2, 16, 16, 3) and a.images.dtype == torch.float32
    assert float(a.images.min()) >= 0.0 and float(a.images.max()) <= 1.0
    assert torch.equal(a.images, b.images)
    c = sd_gen.generate(PROMPTS, seeds=[3, 5])
    assert torch.allclose(a.images[0], c.images[0], atol=1e-5)
    assert (a.images[1] - c.images[1]).abs().mean() > 1e-3
    alone = sd_gen.generate(PROMPTS[1:], seeds=[4])  # the batch does not matter
    assert torch.allclose(alone.images[0], a.images[1], atol=1e-5)
    expanded = sd_gen.generate(PROMPTS, seeds=3)  # int -> consecutive seeds
    assert torch.equal(expanded.images, a.images)
    df = a.to_frame()
    assert df.prompt.tolist() == PROMPTS and df.seed.tolist() == [3, 4]
    assert df.steps.tolist() == [3, 3] and df.guidance.tolist() == [7.5, 7.5]
    assert set(df.model_id) == {"tiny-sd"} and set(df.family) == {"stable-diffusion"}
    assert df.height.tolist() == [16, 16] and df.scheduler.iloc[0] == "DDIMScheduler"
    assert a.to_uint8().shape == (2, 16, 16, 3) and len(a.to_pil()) == 2


def test_sd_call_map_steps_timesteps_and_phases(sd_gen):
    layers = ["unet.mid_block", "text_encoder.encoder.layers.0", "vae.decoder.mid_block"]
    cache = sd_gen.run_with_cache(PROMPTS[:1], [0], layers, steps=4)
    cm = cache.call_map
    mid = cm[cm.layer == "unet.mid_block"]
    assert mid.step.tolist() == [0, 1, 2, 3] and set(mid.phase) == {"denoise"}
    expected_t = [float(t) for t in sd_gen.pipeline.scheduler.timesteps]
    assert len(expected_t) == 4 and mid.timestep.tolist() == expected_t
    assert cache["unet.mid_block"].shape == (2, 4, 16, 4, 4)  # [uncond; cond] rows, 4 steps, C, H, W
    te = cm[cm.layer == "text_encoder.encoder.layers.0"]
    assert te.phase.tolist() == ["encode", "encode"] and te.branch.tolist() == ["cond", "uncond"]
    te_calls = cache.calls["text_encoder.encoder.layers.0"]
    assembled = cache["text_encoder.encoder.layers.0"]  # merged in diffusers order: uncond row first
    assert torch.equal(assembled[1], te_calls[0][0]) and torch.equal(assembled[0], te_calls[1][0])
    vae = cm[cm.layer == "vae.decoder.mid_block"]
    assert vae.phase.tolist() == ["decode"]

    seen = []

    def spy(x, ctx):
        seen.append((ctx.phase, ctx.step, ctx.rows))

    out = sd_gen.run_with_hooks(PROMPTS, [0, 1], {"unet.mid_block": spy}, steps=2)
    assert seen == [("denoise", 0, 4), ("denoise", 1, 4)]
    assert out.call_map.step.tolist() == [0, 1]
    assert out.to_frame().edited_layers.iloc[0] == "unet.mid_block"


def test_sd_cfg_split_marker(sd_fn_gen):
    """Cond prompts embed to random matrices and '' to zeros: to_k(uncond) == 0 marks the rows."""
    cache = sd_fn_gen.run_with_cache(PROMPTS, [0, 1], [SD_TO_K], steps=2)
    x = cache[SD_TO_K]  # [4, 2 steps, L, inner]
    assert x.shape[:2] == (4, 2)
    assert x[:2].abs().sum() == 0 and x[2:].abs().min(dim=-1).values.sum() > 0  # rows 0..N-1 are uncond
    cond, uncond = cache.split_cfg(SD_TO_K)
    assert uncond.abs().sum() == 0
    to_k = sd_fn_gen.pipeline.unet.get_submodule(SD_TO_K.removeprefix("unet."))
    emb = sd_fn_gen.text_encoder_fn(PROMPTS)
    with torch.no_grad():
        expected = to_k(emb)
    for s in range(2):
        assert torch.allclose(cond[:, s], expected, atol=1e-5)
    c2, u2 = sd_fn_gen.split_cfg(cache.calls[SD_TO_K][0])
    assert torch.equal(c2, cond[:, 0]) and torch.equal(u2, uncond[:, 0])
    # guidance 1: no unconditional rows at all
    nocfg = sd_fn_gen.run_with_cache(PROMPTS, [0, 1], [SD_TO_K], steps=1, guidance=1.0)
    assert nocfg[SD_TO_K].shape[0] == 2 and torch.allclose(nocfg[SD_TO_K][:, 0], expected, atol=1e-5)
    with pytest.raises(ValueError, match="did not use classifier-free guidance"):
        nocfg.split_cfg(SD_TO_K)


def test_sd_noop_edits_exact(sd_gen, check_noops):
    check_noops(sd_gen, "unet.mid_block", 16, 1, PROMPTS, [0, 1], separately=True, steps=2)


def test_sd_edits_change_output_cond_rows_and_steps(sd_gen, builders):
    layer = "unet.mid_block"
    v = torch.randn(16, generator=torch.Generator().manual_seed(0)) * 3
    base = sd_gen.run_with_cache(PROMPTS, [0, 1], [layer])
    edited = sd_gen.run_with_cache(PROMPTS, [0, 1], [layer], hooks={layer: AddVector(v, rows="cond", dim=1)})
    b0, e0 = base[layer][:, 0], edited[layer][:, 0]  # step 0
    assert torch.equal(e0[:2], b0[:2])  # uncond rows untouched
    assert torch.allclose(e0[2:], b0[2:] + v[None, :, None, None], atol=1e-5)
    assert (edited.images - base.images).abs().mean() > 1e-3
    later = sd_gen.run_with_cache(PROMPTS, [0, 1], [layer], hooks={layer: AddVector(v, steps=[1], dim=1)})
    assert torch.equal(later[layer][:, 0], base[layer][:, 0])
    assert not torch.equal(later[layer][:, 1], base[layer][:, 1])
    sae = builders.tiny_sae(16)
    clamped = sd_gen.run_with_hooks(PROMPTS, [0, 1], {layer: ClampFeatures(sae, [0, 1], value=50.0, dim=1)})
    assert (clamped.images - base.images).abs().mean() > 1e-3


def test_sd_pipeline_tokenizer_path_matches_text_encoder_fn(sd_gen):
    """The pipeline's own encode_prompt and an equivalent text_encoder_fn give the same images."""
    pipe = sd_gen.pipeline

    def fn(prompts):
        emb, _ = pipe.encode_prompt(prompts, torch.device("cpu"), 1, False)
        return emb

    other = StableDiffusionGenerator(pipe, text_encoder_fn=fn, model_id="x")
    assert torch.equal(other.generate(PROMPTS, [0, 1], steps=2).images, sd_gen.generate(PROMPTS, [0, 1], steps=2).images)
    neg = sd_gen.generate(PROMPTS, [0, 1], steps=2, negative_prompt=["red", "blue"])
    assert not torch.equal(neg.images, sd_gen.generate(PROMPTS, [0, 1], steps=2).images)
    assert neg.to_frame().negative_prompt.tolist() == ["red", "blue"]


# ---------------------------------------------------------------------------------------------
# PixArt
# ---------------------------------------------------------------------------------------------
def test_pixart_determinism_call_map_and_cfg_order(pixart_gen):
    a = pixart_gen.generate(PROMPTS, [0, 1])
    assert torch.equal(a.images, pixart_gen.generate(PROMPTS, [0, 1]).images)
    assert a.images.shape == (2, 16, 16, 3) and a.records[0]["family"] == "pixart"
    alone = pixart_gen.generate(PROMPTS[:1], [0])
    assert torch.allclose(alone.images[0], a.images[0], atol=1e-5)
    block, proj = "transformer.transformer_blocks.0", "transformer.caption_projection"
    cache = pixart_gen.run_with_cache(PROMPTS, [0, 1], [block, proj, "text_encoder"], steps=3)
    cm = cache.call_map
    assert cm[cm.layer == block].step.tolist() == [0, 1, 2]
    assert cm[cm.layer == block].timestep.tolist() == [float(t) for t in pixart_gen.pipeline.scheduler.timesteps]
    assert cache[block].shape[:2] == (4, 3)
    # the caption projection sees [uncond; cond]: its cond rows are the projection of the cond text
    text = cache["text_encoder"]  # [4, L, 32] merged in diffusers order
    cond_text, uncond_text = cache.split_cfg("text_encoder")
    assert torch.equal(cond_text, cache.calls["text_encoder"][0])
    cond_p, uncond_p = cache.split_cfg(proj)
    module = pixart_gen.pipeline.transformer.caption_projection
    with torch.no_grad():
        assert torch.allclose(cond_p[:, 0], module(cond_text), atol=1e-5)
        assert torch.allclose(uncond_p[:, 0], module(uncond_text), atol=1e-5)
        assert not torch.allclose(cond_p[:, 0], module(uncond_text), atol=1e-3)
    assert text.shape[0] == 4


def test_pixart_noop_edits_exact_and_cond_rows(pixart_gen, check_noops):
    layer = "transformer.transformer_blocks.0"
    check_noops(pixart_gen, layer, 16, -1, PROMPTS, [0, 1])
    v = torch.ones(16) * 2
    base = pixart_gen.run_with_cache(PROMPTS, [0, 1], [layer])
    edited = pixart_gen.run_with_cache(PROMPTS, [0, 1], [layer], hooks={layer: AddVector(v, rows="cond")})
    assert torch.equal(edited[layer][:2, 0], base[layer][:2, 0])
    assert torch.allclose(edited[layer][2:, 0], base[layer][2:, 0] + v, atol=1e-5)
    assert not torch.equal(edited.images, base.images)


def test_pixart_text_encoder_fn(builders):
    pipe = builders.pixart(with_text_encoder=False)
    gen = PixArtGenerator(pipe, text_encoder_fn=lambda p: builders.embed_prompts(p), settings={"steps": 2})
    out = gen.generate(PROMPTS, [0, 1])
    assert torch.equal(out.images, gen.generate(PROMPTS, [0, 1]).images)
    no_mask = PixArtGenerator(pipe, text_encoder_fn=lambda p: builders.embed_prompts(p)[0], settings={"steps": 2})
    assert torch.equal(no_mask.generate(PROMPTS, [0, 1]).images, out.images)  # mask of ones by default
    with pytest.raises(ValueError, match="no tokenizer/text_encoder"):
        PixArtGenerator(pipe).generate(PROMPTS, [0, 1], steps=1)


# ---------------------------------------------------------------------------------------------
# DDPM (unconditional)
# ---------------------------------------------------------------------------------------------
def test_ddpm_determinism_prompts_and_call_map(ddpm_gen, check_noops):
    a = ddpm_gen.generate(None, [0, 1])
    assert a.images.shape == (2, 8, 8, 3)
    assert torch.equal(a.images, ddpm_gen.generate(["", ""], [0, 1]).images)
    assert torch.allclose(ddpm_gen.generate(None, [1]).images[0], a.images[1], atol=1e-5)
    assert a.records[0]["guidance"] is None and a.records[0]["prompt"] == ""
    assert ddpm_gen.cfg_layout is None
    cache = ddpm_gen.run_with_cache(None, [0, 1], ["unet.mid_block"], steps=3)
    assert cache["unet.mid_block"].shape[:2] == (2, 3)  # N rows (no CFG), 3 steps
    cm = cache.call_map
    assert cm.step.tolist() == [0, 1, 2]
    assert cm.timestep.tolist() == [float(t) for t in ddpm_gen.pipeline.scheduler.timesteps]
    check_noops(ddpm_gen, "unet.mid_block", 16, 1, None, [0, 1])
    v = torch.ones(16)
    cond_only = ddpm_gen.run_with_hooks(None, [0, 1], {"unet.mid_block": AddVector(v, dim=1, rows="cond")})
    assert not torch.equal(cond_only.images, a.images)  # without CFG every row is conditional
    uncond_only = ddpm_gen.run_with_hooks(None, [0, 1], {"unet.mid_block": AddVector(v, dim=1, rows="uncond")})
    assert torch.equal(uncond_only.images, a.images)
    with pytest.raises(ValueError, match="unconditional rows"):
        ddpm_gen.split_cfg(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="is unconditional and cannot follow prompts"):
        ddpm_gen.generate(["a red circle", ""], [0, 1])
    with pytest.raises(ValueError, match="one seed per image as a sequence"):
        ddpm_gen.generate(None, 3)
    with pytest.raises(ValueError, match="Got 1 prompts and 2 seeds"):
        ddpm_gen.generate([""], [0, 1])
    with pytest.raises(ValueError, match="eta is a DDIM setting"):
        ddpm_gen.generate(None, [0], eta=0.5)


# ---------------------------------------------------------------------------------------------
# loading real pipelines in one call (saved tiny pipelines, offline)
# ---------------------------------------------------------------------------------------------
def test_from_pretrained_round_trip(tmp_path, sd_pipe, pixart_pipe, ddpm_pipe, sd_gen, pixart_gen, ddpm_gen):
    cases = [
        (sd_pipe, sd_gen, StableDiffusionGenerator, PROMPTS, {"steps": 2}),
        (pixart_pipe, pixart_gen, PixArtGenerator, PROMPTS, {"steps": 2, "max_sequence_length": 6}),
        (ddpm_pipe, ddpm_gen, UnconditionalDiffusionGenerator, None, {"steps": 2}),
    ]
    for pipe, gen, cls, prompts, settings in cases:
        folder = tmp_path / cls.__name__
        pipe.save_pretrained(folder)
        loaded = from_pretrained(str(folder))
        assert type(loaded) is cls and loaded.model_id == str(folder)
        a = loaded.generate(prompts, [0, 1], **settings)
        b = gen.generate(prompts, [0, 1], **settings)
        assert torch.allclose(a.images, b.images, atol=1e-5)
        assert a.records[0]["model_id"] == str(folder)
    again = StableDiffusionGenerator.from_pretrained(str(tmp_path / "StableDiffusionGenerator"), dtype="float32")
    assert isinstance(again, StableDiffusionGenerator)
    with pytest.raises(TypeError, match="holds a DDPMPipeline, but StableDiffusionGenerator wraps"):
        StableDiffusionGenerator.from_pretrained(str(tmp_path / "UnconditionalDiffusionGenerator"))


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="neither model_index.json"):
        from_pretrained(str(tmp_path))
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        from_pretrained(str(tmp_path / "f.bin"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ValueError, match="supported pipelines are"):
        from_pretrained(str(bad))
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        from_pretrained(str(bad))
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="only supported autoregressive image generator is 'janus'"):
        from_pretrained(str(other))
    with pytest.raises(ValueError, match="Could not load 'no-such-org/no-such-model'"):
        from_pretrained("no-such-org/no-such-model", local_files_only=True)
    with pytest.raises(TypeError, match="path_or_id must be a str"):
        from_pretrained(3)


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------
def test_diffusers_errors(sd_gen, sd_fn_gen, builders, gen_tmp, ddpm_pipe):
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['num_steps'\].*pipeline_kwargs"):
        sd_gen.generate(PROMPTS, [0, 1], num_steps=3)
    with pytest.raises(ValueError, match="Got 2 prompts but 3 seeds"):
        sd_gen.generate(PROMPTS, [0, 1, 2])
    with pytest.raises(ValueError, match="non-negative integers"):
        sd_gen.generate(PROMPTS, [0, -1])
    with pytest.raises(ValueError, match="non-negative integers"):
        sd_gen.generate(PROMPTS, [0, 1.5])
    with pytest.raises(TypeError, match="seeds must be an int or a sequence"):
        sd_gen.generate(PROMPTS, "0")
    with pytest.raises(ValueError, match="is text-conditional"):
        sd_gen.generate(None, [0])
    with pytest.raises(TypeError, match="prompts must be strings"):
        sd_gen.generate([1, 2], [0, 1])
    with pytest.raises(TypeError, match="prompts must be a str"):
        sd_gen.generate(3, [0])
    with pytest.raises(ValueError, match="No images requested"):
        sd_gen.generate([], [])
    with pytest.raises(ValueError, match="negative_prompt must be a str or a list of 2"):
        sd_gen.generate(PROMPTS, [0, 1], negative_prompt=["x"])
    with pytest.raises(LayerNotFoundError, match="Closest matches"):
        sd_gen.run_with_hooks(PROMPTS, [0, 1], {"unet.mid_blok": lambda x: None})
    with pytest.raises(TypeError, match="hooks must be a mapping"):
        sd_gen.run_with_hooks(PROMPTS, [0, 1], [lambda x: None])
    with pytest.raises(TypeError, match="must be callable"):
        sd_gen.run_with_hooks(PROMPTS, [0, 1], {"unet.mid_block": 3})
    with pytest.raises(ValueError, match="edits must keep the shape"):
        sd_gen.run_with_hooks(PROMPTS, [0, 1], {"unet.mid_block": lambda x: x[:1]}, steps=1)
    with pytest.raises(TypeError, match="expected a Tensor"):
        sd_gen.run_with_hooks(PROMPTS, [0, 1], {"unet.mid_block": lambda x: 1.0}, steps=1)
    with pytest.raises(ValueError, match="layers is empty"):
        sd_gen.run_with_cache(PROMPTS, [0, 1], [])
    with pytest.raises(TypeError, match="hooks must be a mapping"):
        sd_gen.run_with_cache(PROMPTS, [0, 1], ["unet.mid_block"], hooks=[1])
    bare = builders.sd(gen_tmp, with_text_encoder=False)
    with pytest.raises(ValueError, match="no tokenizer/text_encoder; pass text_encoder_fn"):
        StableDiffusionGenerator(bare).generate(PROMPTS, [0, 1], steps=1)
    with pytest.raises(ValueError, match="must return embeddings \\[N, L, D\\] with N=2"):
        StableDiffusionGenerator(bare, text_encoder_fn=lambda p: torch.zeros(2, 32)).generate(PROMPTS, [0, 1])
    with pytest.raises(ValueError, match="must return embeddings or \\(embeddings, mask\\)"):
        StableDiffusionGenerator(bare, text_encoder_fn=lambda p: (1, 2, 3)).generate(PROMPTS, [0, 1])
    with pytest.raises(ValueError, match="mask must have shape"):
        StableDiffusionGenerator(bare, text_encoder_fn=lambda p: (torch.zeros(2, 4, 32), torch.ones(2))).generate(
            PROMPTS, [0, 1])

    def ragged(prompts):
        return torch.zeros(len(prompts), 3 if prompts[0] == "" else 5, 32)

    with pytest.raises(ValueError, match="differ in shape"):
        StableDiffusionGenerator(bare, text_encoder_fn=ragged).generate(PROMPTS, [0, 1])
    with pytest.raises(TypeError, match="text_encoder_fn must be callable"):
        StableDiffusionGenerator(bare, text_encoder_fn="clip")
    with pytest.raises(TypeError, match="expects a diffusers pipeline with a `unet`"):
        StableDiffusionGenerator(object())
    with pytest.raises(TypeError, match="expects a diffusers pipeline with a `transformer`"):
        PixArtGenerator(bare)
    with pytest.raises(TypeError, match="extra_modules\\['x'\\] must be an nn.Module"):
        StableDiffusionGenerator(bare, extra_modules={"x": 3})
    with pytest.raises(ValueError, match="clashes with the pipeline component"):
        StableDiffusionGenerator(bare, extra_modules={"unet": torch.nn.Linear(2, 2)})
    with pytest.raises(TypeError, match="unknown setting"):
        UnconditionalDiffusionGenerator(ddpm_pipe, settings={"guidance": 2.0})


def test_extra_modules_are_hookable(builders, gen_tmp):
    """A custom text tower behind text_encoder_fn can be hooked when passed as extra_modules."""
    tower = torch.nn.Sequential(torch.nn.Linear(32, 32))

    def fn(prompts):
        emb, _ = builders.embed_prompts(prompts)
        return tower(emb)

    gen = StableDiffusionGenerator(builders.sd(gen_tmp, with_text_encoder=False), text_encoder_fn=fn,
                                   extra_modules={"tower": tower}, settings={"steps": 2})
    assert "tower.0" in gen.module_names("tower")
    cache = gen.run_with_cache(PROMPTS, [0, 1], ["tower.0"])
    assert cache.call_map.branch.tolist() == ["cond", "uncond"]
    steered = gen.run_with_hooks(PROMPTS, [0, 1], {"tower.0": AddVector(torch.ones(32), rows="cond")})
    assert not torch.equal(steered.images, gen.generate(PROMPTS, [0, 1]).images)
    same = gen.run_with_hooks(PROMPTS, [0, 1], {"tower.0": AddVector(torch.ones(32), rows="uncond", strength=0.0)})
    assert torch.equal(same.images, gen.generate(PROMPTS, [0, 1]).images)
