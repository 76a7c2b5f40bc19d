"""Tiny random-initialised generators of the real architectures, built offline.

Every builder seeds its own RNG inside ``torch.random.fork_rng`` so fixtures do not touch the
global random state, and nothing is downloaded: tokenizers are built from in-memory vocabularies.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

WORDS = ["a", "red", "blue", "green", "circle", "square", "star", "photo", "of", "on", "stripes", "dots"]


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------
def make_clip_tokenizer(folder: str, max_length: int = 8):
    """A CLIPTokenizer over WORDS written as vocab.json/merges.txt."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for w in WORDS:
        toks = list(w[:-1]) + [w[-1] + "</w>"]
        while len(toks) > 1:
            merges.append(f"{toks[0]} {toks[1]}")
            merged = toks[0] + toks[1]
            vocab.setdefault(merged, len(vocab))
            toks = [merged, *toks[2:]]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as fh:
        json.dump(vocab, fh)
    with open(os.path.join(folder, "merges.txt"), "w") as fh:
        fh.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         model_max_length=max_length)


def make_word_tokenizer(special: dict[str, int] | None = None, extra_special: dict[str, str] | None = None,
                        add_bos: bool = False):
    """A word-level PreTrainedTokenizerFast over WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(special or {"<pad>": 0, "</s>": 1, "<unk>": 2})
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kw: dict = {"pad_token": "<pad>", "unk_token": "<unk>"}
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
        kw.update(bos_token="<bos>", eos_token="<eos>")
    else:
        kw["eos_token"] = "</s>"
    if extra_special:
        kw["extra_special_tokens"] = extra_special
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


# ---------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------
def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
    )


def build_sd(tmp: str, with_text_encoder: bool = True):
    """Tiny StableDiffusionPipeline (UNet 8x8 latents, 16 px images, CLIP text tower of width 32)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(8, 16),
            layers_per_block=1,
            cross_attention_dim=32,
            sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=4,
            attention_head_dim=4,
            in_channels=4,
            out_channels=4,
        )
        vae = tiny_vae()
        text_encoder = tokenizer = None
        if with_text_encoder:
            tokenizer = make_clip_tokenizer(os.path.join(tmp, "clip_tok"))
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                projection_dim=32,
            ))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_pixart(with_text_encoder: bool = True):
    """Tiny PixArtAlphaPipeline (transformer on 8x8 latents, tiny T5 encoder, word tokenizer)."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        transformer = PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2,
            caption_channels=32, in_channels=4, out_channels=8, cross_attention_dim=16, norm_num_groups=4,
        )
        vae = tiny_vae()
        tokenizer = text_encoder = None
        if with_text_encoder:
            tokenizer = make_word_tokenizer()
            text_encoder = T5EncoderModel(T5Config(
                vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
            ))
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=DDIMScheduler())


def build_ddpm():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        unet = UNet2DModel(
            sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=4,
        )
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100))


JANUS_SPECIAL = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<image_placeholder>": 3, "<begin_of_image>": 4,
                 "<end_of_image>": 5, "<unk>": 6}


def build_janus():
    """Tiny JanusForConditionalGeneration (LLaMA 2 x 32, VQ codebook 64, 4x4 = 16 image tokens, 8 px)."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    text = LlamaConfig(
        vocab_size=len(JANUS_SPECIAL) + len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    vision = JanusVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                               patch_size=4, projection_dim=32, num_image_tokens=16, mlp_ratio=2.0)
    vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, projection_dim=32, image_token_embed_dim=32,
                          num_hidden_layers=1)
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = JanusForConditionalGeneration(cfg).eval()
        with torch.no_grad():  # peakier token distributions than the 0.02-std init (edits visibly move tokens)
            model.model.generation_head.vision_head.weight.mul_(30.0)
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = 1
    model.generation_config.generation_kwargs = {"boi_token_id": 4}
    return model


def build_janus_processor():
    from transformers import JanusImageProcessor, JanusProcessor

    tok = make_word_tokenizer(
        special=JANUS_SPECIAL,
        extra_special={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                       "eoi_token": "<end_of_image>"},
        add_bos=True,
    )
    return JanusProcessor(image_processor=JanusImageProcessor(size={"height": 16, "width": 16}), tokenizer=tok,
                          num_image_tokens=16)


def embed_prompts(prompts, dim: int = 32, length: int = 6, zero_empty: bool = True):
    """Deterministic fake text embeddings: a seeded random matrix per prompt, zeros for ''."""
    out = []
    for p in prompts:
        if p == "" and zero_empty:
            out.append(torch.zeros(length, dim))
            continue
        g = torch.Generator().manual_seed(sum((i + 1) * ord(c) for i, c in enumerate(p)))
        out.append(torch.randn(length, dim, generator=g))
    return torch.stack(out), torch.ones(len(prompts), length, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# a LlamaGen-style toy loop (class-conditional, raster order, KV cache)
# ---------------------------------------------------------------------------------------------
class ToyLlamaGen(nn.Module):
    """Class token -> LLaMA backbone with KV cache -> token head; decode = codebook colours."""

    def __init__(self, classes=("red", "blue", "green"), vocab: int = 16, grid: int = 3, d: int = 32):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        self.classes = list(classes)
        self.grid = grid
        self.cls_emb = nn.Embedding(len(classes) + 1, d)  # last row = null class (unconditional)
        self.tok_emb = nn.Embedding(vocab, d)
        self.backbone = LlamaModel(LlamaConfig(vocab_size=4, hidden_size=d, intermediate_size=2 * d,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                               max_position_embeddings=64))
        self.head = nn.Linear(d, vocab)
        self.codebook = nn.Embedding(vocab, 3)

    def _run(self, emb, cache):
        import inspect

        key = "cache" if "cache" in inspect.signature(self.backbone.forward).parameters else "past_key_values"
        kw = {"inputs_embeds": emb, "use_cache": True}
        if cache is not None:
            kw[key] = cache
        out = self.backbone(**kw)
        new = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return self.head(out.last_hidden_state[:, -1]), new

    def prefill(self, prompts, cfg):
        cond = torch.tensor([self.classes.index(p) for p in prompts])
        idx = torch.cat([cond, torch.full_like(cond, len(self.classes))]) if cfg else cond
        return self._run(self.cls_emb(idx)[:, None], None)

    def step(self, tokens, s, cache):
        return self._run(self.tok_emb(tokens), cache)

    def decode(self, tokens):
        n = tokens.shape[0]
        rgb = torch.tanh(self.codebook(tokens))  # [n, T, 3] in (-1, 1)
        return rgb.reshape(n, self.grid, self.grid, 3).permute(0, 3, 1, 2)


def build_toy_llamagen():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        return ToyLlamaGen().eval()


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models gain nothing from two threads, and lose a lot when the cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def gen_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("generators"))


@pytest.fixture(scope="session")
def sd_pipe(gen_tmp):
    return build_sd(gen_tmp)


@pytest.fixture(scope="session")
def sd_gen(sd_pipe):
    from concepts.generators import StableDiffusionGenerator

    return StableDiffusionGenerator(sd_pipe, model_id="tiny-sd", settings={"steps": 3})


@pytest.fixture(scope="session")
def sd_fn_gen(gen_tmp):
    """Stable Diffusion without tokenizer/text encoder, conditioned through text_encoder_fn."""
    from concepts.generators import StableDiffusionGenerator

    pipe = build_sd(gen_tmp, with_text_encoder=False)
    return StableDiffusionGenerator(pipe, text_encoder_fn=lambda p: embed_prompts(p)[0], model_id="tiny-sd-fn",
                                    settings={"steps": 3})


@pytest.fixture(scope="session")
def pixart_pipe():
    return build_pixart()


@pytest.fixture(scope="session")
def pixart_gen(pixart_pipe):
    from concepts.generators import PixArtGenerator

    return PixArtGenerator(pixart_pipe, model_id="tiny-pixart", settings={"steps": 3, "max_sequence_length": 6})


@pytest.fixture(scope="session")
def ddpm_pipe():
    return build_ddpm()


@pytest.fixture(scope="session")
def ddpm_gen(ddpm_pipe):
    from concepts.generators import UnconditionalDiffusionGenerator

    return UnconditionalDiffusionGenerator(ddpm_pipe, model_id="tiny-ddpm", settings={"steps": 3})


@pytest.fixture(scope="session")
def janus_model():
    return build_janus()


@pytest.fixture(scope="session")
def janus_processor():
    return build_janus_processor()


@pytest.fixture(scope="session")
def janus_gen(janus_model, janus_processor):
    from concepts.generators import JanusGenerator

    return JanusGenerator(janus_model, janus_processor, model_id="tiny-janus")


@pytest.fixture(scope="session")
def toy_ar():
    return build_toy_llamagen()


@pytest.fixture(scope="session")
def toy_ar_gen(toy_ar):
    from concepts.generators import ARLoopGenerator

    return ARLoopGenerator(
        toy_ar, prefill=toy_ar.prefill, step=toy_ar.step, decode=toy_ar.decode, num_steps=toy_ar.grid ** 2,
        cfg_order="cond_uncond", model_id="toy-llamagen", settings={"guidance": 3.0},
    )


# ---------------------------------------------------------------------------------------------
# edits shared by the adapter tests
# ---------------------------------------------------------------------------------------------
class TinySAE(nn.Module):
    """ReLU SAE with encode/decode and an imperfect reconstruction."""

    def __init__(self, d: int, k: int = 12, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = nn.Parameter(torch.randn(d, k, generator=g) / d**0.5)
        self.b_enc = nn.Parameter(torch.zeros(k))
        self.W_dec = nn.Parameter(torch.randn(k, d, generator=g) / k**0.5)
        self.b_dec = nn.Parameter(torch.randn(d, generator=g) * 0.1)

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, z):
        return z @ self.W_dec + self.b_dec


class TinySklearnSAE:
    """The same with sklearn-style transform/inverse_transform on torch tensors."""

    def __init__(self, d: int, seed: int = 1):
        self._m = TinySAE(d, seed=seed)

    def transform(self, x):
        return self._m.encode(x)

    def inverse_transform(self, z):
        return self._m.decode(z)


def noop_edits(d: int, dim: int = -1):
    """Every edit helper in a configuration that must leave the generation bit-identical."""
    from concepts.generators import AddVector, ClampFeatures, ProjectOut

    g = torch.Generator().manual_seed(7)
    return {
        "zero_vector_cond_rows": AddVector(torch.zeros(d), rows="cond", dim=dim, steps=range(0, 100)),
        "strength_0": AddVector(torch.randn(d, generator=g), strength=0.0, dim=dim),
        "project_strength_0": ProjectOut(torch.randn(d, generator=g), strength=0.0, dim=dim),
        "clamp_to_current": ClampFeatures(TinySAE(d), [0, 2, 5], value=lambda z: z, dim=dim),
        "clamp_scale_1_uncond_rows": ClampFeatures(TinySklearnSAE(d), [1], value=1.0, mode="scale", rows="uncond",
                                                   dim=dim),
    }


def assert_noops_exact(gen, layer, d, dim, prompts, seeds, separately=False, **settings):
    """No-op edits (chained on one layer, or one run each) reproduce the unedited generation exactly."""
    base = gen.generate(prompts, seeds, **settings)
    edits = noop_edits(d, dim)
    runs = {name: [e] for name, e in edits.items()} if separately else {"all no-op edits chained": list(edits.values())}
    for name, chain in runs.items():
        out = gen.run_with_hooks(prompts, seeds, {layer: chain}, **settings)
        assert out.call_map is not None and len(out.call_map) > 0
        assert torch.equal(out.images, base.images), f"{type(gen).__name__}: {name} changed the images"
        if base.tokens is not None:
            assert torch.equal(out.tokens, base.tokens), name
    return base


@pytest.fixture(scope="session")
def check_noops():
    """``check_noops(gen, layer, d, dim, prompts, seeds, **settings)``: every no-op edit is exact."""
    return assert_noops_exact


@pytest.fixture(scope="session")
def builders():
    """The builder functions (for tests that save / rebuild models)."""
    from types import SimpleNamespace

    return SimpleNamespace(sd=build_sd, pixart=build_pixart, ddpm=build_ddpm, janus=build_janus,
                           janus_processor=build_janus_processor, toy_llamagen=build_toy_llamagen,
                           embed_prompts=embed_prompts, word_tokenizer=make_word_tokenizer,
                           tiny_sae=TinySAE)
