"""The shipped ConceptWorld generators (diffusion and Janus AR): loading, determinism, prompt following, hooks."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

from concepts import zoo
from concepts.generators import AddVector, Generator, JanusGenerator, StableDiffusionGenerator
from concepts.zoo.autoregressive import ConceptWorldJanusGenerator, load_ar
from concepts.zoo.checkpoint import weights_dir
from concepts.zoo.detector import heldout_prompts, prompt_fidelity
from concepts.zoo.diffusion import load_diffusion

N_PROMPTS = 64
PROMPT_SEED = 4343  # held out: the generators train on sample seeds >= 31000


@pytest.fixture(scope="module")
def det():
    return zoo.load("conceptworld-detector")


@pytest.fixture(scope="module")
def diffusion():
    return zoo.load("conceptworld-diffusion")


@pytest.fixture(scope="module")
def ar():
    return zoo.load("conceptworld-ar")


@pytest.fixture(scope="module")
def prompts():
    return heldout_prompts(N_PROMPTS, seed=PROMPT_SEED)


def test_listed():
    names = zoo.available()
    assert any("diffusion" in n for n in names) and any("ar" in n.split("-") for n in names)
    assert zoo.entry("conceptworld-diffusion").kind == "diffusion"
    assert zoo.entry("conceptworld-ar").kind == "autoregressive"


@pytest.mark.parametrize("name", ["diffusion", "ar"])
def test_protocol_and_determinism(name, request):
    gen = request.getfixturevalue(name)
    assert isinstance(gen, Generator)
    assert isinstance(gen, StableDiffusionGenerator if name == "diffusion" else ConceptWorldJanusGenerator)
    caps = ["a large red circle on a plain background", "two small blue squares on stripes", "a star", ""]
    a = gen.generate(caps, seeds=[0, 1, 2, 3])
    b = gen.generate(caps, seeds=[0, 1, 2, 3])
    assert a.images.shape == (4, 32, 32, 3)
    assert float(a.images.min()) >= 0 and float(a.images.max()) <= 1
    assert torch.equal(a.images, b.images)
    c = gen.generate(caps[:1], seeds=[5])
    assert not torch.equal(c.images[0], a.images[0])  # another seed, another image
    rec = a.to_frame()
    assert rec.seed.tolist() == [0, 1, 2, 3] and rec.prompt.tolist() == caps
    assert set(rec.model_id) == {f"conceptworld-{name}"}


@pytest.mark.parametrize("name", ["diffusion", "ar"])
def test_prompted_colours_and_shapes_appear(name, request, det, prompts):
    """The detector finds the prompted colours (and shapes) far above chance on held-out captions."""
    gen = request.getfixturevalue(name)
    caps, wanted = prompts
    found = det.detect(gen.generate(caps, seeds=0).images)
    q = prompt_fidelity(found, wanted)
    shifted = wanted[N_PROMPTS // 2:] + wanted[:N_PROMPTS // 2]  # the same images against other prompts
    chance = prompt_fidelity(found, shifted)
    # measured on 500 prompts (benchmarks/zoo_quality.py): diffusion colour ~0.78, AR ~0.66; chance ~0.35
    assert q["colour"] >= 0.55 and q["colour"] >= chance["colour"] + 0.2
    assert q["shape"] >= 0.45 and q["shape"] > chance["shape"]  # shapes are the weak family (AR ~0.6 vs 0.55)


def test_single_colour_prompts_diffusion_and_ar(det, diffusion, ar):
    """Each of the six colours, prompted alone, is what the detector sees most often."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    caps = [f"a large {c} square on a plain background" for c in colours for _ in range(4)]
    for gen in (diffusion, ar):
        scores = det.scores(gen.generate(caps, seeds=10).images)[colours]
        mean = scores.groupby(pd.Series([c for c in colours for _ in range(4)])).mean().loc[colours]
        assert (mean.to_numpy().argmax(1) == range(6)).sum() >= 5


def test_diffusion_hooks_call_map_and_identity_edit(diffusion):
    layers = ["unet.mid_block", "text_encoder.transformer.resblocks.0"]
    cache = diffusion.run_with_cache(["a red circle"], [0], layers, steps=5)
    cm = cache.call_map
    assert (cm.layer == "unet.mid_block").sum() == 5 and set(cm[cm.layer == "unet.mid_block"].rows) == {2}
    assert cm[cm.layer == layers[1]].phase.tolist() == ["encode", "encode"]  # prompt, then the empty prompt
    base = diffusion.generate(["a red circle"], [0], steps=5)
    same = diffusion.run_with_hooks(["a red circle"], [0], {"unet.mid_block": lambda x: x.clone()}, steps=5)
    assert torch.equal(base.images, same.images)
    width = cache["unet.mid_block"].shape[2]
    edited = diffusion.run_with_hooks(["a red circle"], [0], {"unet.mid_block": AddVector(torch.ones(width) * 5.0, dim=1)},
                                      steps=5)
    assert not torch.equal(base.images, edited.images)


def test_ar_hooks_call_map_and_identity_edit(ar):
    assert isinstance(ar, JanusGenerator)
    layer = "model.language_model.layers.0"
    cache = ar.run_with_cache(["a red circle"], [0], [layer, "text_encoder.ln_final"])
    cm = cache.call_map
    lm = cm[cm.layer == layer]
    assert len(lm) == 64 and lm.phase.tolist() == ["prefill"] + ["token"] * 63
    assert cache[layer].shape[:2] == (2, 33 + 63)  # [cond; uncond] rows, prefix (32 text + boi) then fed tokens
    assert cm[cm.layer == "text_encoder.ln_final"].phase.tolist() == ["prefill", "prefill"]
    base = ar.generate(["a red circle"], [0])
    same = ar.run_with_hooks(["a red circle"], [0], {layer: lambda x: x.clone()})
    assert torch.equal(base.tokens, same.tokens)


def _copy(name, tmp_path):
    folder = tmp_path / name
    shutil.copytree(weights_dir(name), folder)
    return folder, json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("name", ["conceptworld-diffusion", "conceptworld-ar"])
def test_loading_errors(name, tmp_path, diffusion, ar):
    load = load_diffusion if "diffusion" in name else load_ar
    conditioner = (diffusion if "diffusion" in name else ar).conditioner
    with pytest.raises(FileNotFoundError, match="folder not found"):
        load(tmp_path / "missing", conditioner=conditioner)
    folder, cfg = _copy(name, tmp_path)
    (folder / "config.json").write_text(json.dumps(dict(cfg, format="nope")))
    with pytest.raises(ValueError, match="key 'format'"):
        load(folder, conditioner=conditioner)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "conditioning"}))
    with pytest.raises(ValueError, match="missing key 'conditioning'"):
        load(folder, conditioner=conditioner)
    other = dict(cfg, conditioning=dict(cfg["conditioning"], clip_sha256="0" * 64))
    (folder / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another CLIP text tower"):
        load(folder, conditioner=conditioner)
    (folder / "config.json").write_text(json.dumps(cfg))
    weights = sorted(folder.glob("*.safetensors"))[0]
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load(folder, conditioner=conditioner)


# ---------------------------------------------------------------------------------------------
# training scripts on tiny configs: stage hand-over, export and reload give the same generator
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_conditioner():
    from concepts.zoo.clip import build_clip
    from concepts.zoo.conditioning import CLIPTextConditioner
    from concepts.zoo.prompts import caption_words
    from concepts.zoo.tokenizer import WordTokenizer

    tok = WordTokenizer(caption_words(), context_length=32)
    torch.manual_seed(0)
    clip = build_clip({"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8,
                                                       "image_size": 32},
                       "text_cfg": {"context_length": 32, "vocab_size": tok.vocab_size, "width": 24, "heads": 2,
                                    "layers": 1}})
    return CLIPTextConditioner(clip, tok, sha256="f" * 64)


def test_diffusion_training_stages_export_and_reload(tmp_path, tiny_conditioner):
    from concepts.zoo.conditioning import NullConditioner
    from concepts.zoo.train_diffusion import UNetConfig, UNetTrainer, VAEConfig, VAETrainer

    vae_t = VAETrainer(VAEConfig(block_out_channels=(8, 8, 16), batch_size=4, total_steps=1, checkpoint_every=1,
                                 warmup_steps=1)).fit(None, progress=False)
    vae = vae_t.model.eval()
    small = dict(block_out_channels=(16, 16), attention_head_dim=8, cross_attention_dim=16, norm_num_groups=8,
                 batch_size=4, total_steps=1, checkpoint_every=1, warmup_steps=1, monitor_size=0)
    prior = UNetTrainer(UNetConfig(stage="prior", **small), vae, NullConditioner(16, 32)).fit(None, progress=False)
    state = prior.trained.state_dict()
    cond = UNetTrainer(UNetConfig(stage="focus", object_weight=2.0, small_object_weight=1.0, **small), vae,
                       tiny_conditioner, init_state=state)
    kept = [k for k, v in cond.model.state_dict().items() if torch.equal(v, state[k])]
    assert "conv_in.weight" in kept and "encoder_hid_proj.weight" not in kept  # text width 24 != 16
    cond.fit(None, progress=False)
    cfg = cond.export(tmp_path / "d", records={})
    assert cfg["conditioning"]["clip_sha256"] == "f" * 64
    gen = load_diffusion(tmp_path / "d", conditioner=tiny_conditioner, settings={"steps": 3})
    a = gen.generate(["a red circle", ""], seeds=[0, 1])
    b = cond.generator().generate(["a red circle", ""], seeds=[0, 1], steps=3)
    assert torch.allclose(a.images, b.images, atol=1e-5)


def test_ar_training_stages_export_and_reload(tmp_path, tiny_conditioner):
    from concepts.zoo.conditioning import NullConditioner
    from concepts.zoo.train_ar import LMConfig, LMTrainer, VQConfig, VQTrainer

    vq_cfg = VQConfig(codebook_size=16, batch_size=4, total_steps=2, checkpoint_every=1, warmup_steps=1,
                      restart_every=1)
    vq_t = VQTrainer(vq_cfg).fit(None, progress=False)
    small = dict(hidden_size=32, layers=1, heads=2, intermediate_size=64, batch_size=4, total_steps=1,
                 checkpoint_every=1, warmup_steps=1, monitor_size=0)
    vq_state = vq_t.shipped_state()
    prior = LMTrainer(LMConfig(stage="prior", **small), vq_state, vq_cfg, NullConditioner(16, 32)).fit(None, progress=False)
    lm = LMTrainer(LMConfig(stage="focus", object_weight=2.0, small_object_weight=1.0, **small), vq_state, vq_cfg,
                   tiny_conditioner, init_state=prior.trained.state_dict())
    lm.fit(None, progress=False)
    lm.export(tmp_path / "a", records={})
    gen = load_ar(tmp_path / "a", conditioner=tiny_conditioner)
    a = gen.generate(["a red circle", ""], seeds=[0, 1])
    b = lm.generator().generate(["a red circle", ""], seeds=[0, 1])
    assert torch.equal(a.tokens, b.tokens) and a.tokens.shape == (2, 64)
    # the stored codebook is unit-norm, so the model's own VQ encoder agrees with the training quantisation
    from concepts.zoo.autoregressive import image_tokens
    from concepts.world import ConceptWorld

    x = torch.from_numpy(ConceptWorld(seed=0, image_size=32).sample(2, seed=1).images).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.no_grad():
        own = gen.model.model.vqmodel.encode(x).image_tokens.view(2, -1)
    assert torch.equal(own, image_tokens(gen.model, x))


def test_zero_terminal_snr_needs_v_prediction(tiny_conditioner):
    from concepts.zoo.diffusion import build_vae
    from concepts.zoo.train_diffusion import UNetConfig, UNetTrainer, VAEConfig

    vae = build_vae(VAEConfig(block_out_channels=(8, 8, 16)).vae_config())
    with pytest.raises(ValueError, match="needs prediction_type='v_prediction'"):
        UNetTrainer(UNetConfig(zero_terminal_snr=True), vae, tiny_conditioner)
