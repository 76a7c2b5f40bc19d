"""The built-in ConceptWorld autoregressive text-to-image model (``"conceptworld-ar"``).

A tiny Janus model made of transformers' own classes (``JanusForConditionalGeneration``: a LLaMA language
model, Janus' VQ tokenizer ``JanusVQVAE``, its generation embeddings, aligner and head) that draws a 32x32 image
as 8x8 = 64 VQ tokens in raster order. It runs behind :class:`ConceptWorldJanusGenerator`, a
:class:`~concepts.generators.JanusGenerator` whose prompt is read by the frozen text tower of
``conceptworld-clip`` instead of the LLaMA's own token embeddings, so every tool of :mod:`concepts.generators`
(``run_with_hooks``, ``run_with_cache``, edits, CFG splitting) works on it.

Sequence layout (training and sampling)::

    [ aligner(CLIP text states) x 32 | <begin_of_image> | image token 0 ... image token 63 ]

* the 32 per-token CLIP text states (``[N, 32, 96]``, :class:`~concepts.zoo.conditioning.CLIPTextConditioner`)
  are projected into the language model by the Janus model's ``aligner`` MLP (in Janus the aligner maps the
  features of an external encoder into the language model -- here the text encoder's; the model's SigLIP
  vision tower is configured with zero layers and unused);
* ``<begin_of_image>`` is token 4 of the 8-token LLaMA vocabulary (0 pad, 1 bos, 2 eos, 3 image, 4 boi, 5 eoi);
* image tokens are fed through ``prepare_embeddings_for_image_generation`` and predicted by
  ``generation_head``, as in Janus;
* classifier-free guidance: the unconditional rows read the empty prompt ``""`` (trained with 10 % caption
  dropout); rows are ``[cond; uncond]`` (``cfg_order="cond_uncond"``).

The VQ codebook is stored L2-normalised, so ``model.model.vqmodel.encode`` (nearest code by distance) and
``decode`` (which L2-normalises the codes) agree with the cosine quantisation used in training.

The shipped folder ``concepts/zoo/weights/conceptworld-ar/`` holds ``config.json`` (the ``JanusConfig``,
checksums, training record, measured quality) and ``model.safetensors``; it is produced by
:mod:`concepts.zoo.train_ar`.

Examples
--------
>>> from concepts import zoo
>>> gen = zoo.load("conceptworld-ar")
>>> out = gen.generate(["a large red circle on a plain background"], seeds=[0])
>>> out.images.shape, out.tokens.shape
(torch.Size([1, 32, 32, 3]), torch.Size([1, 64]))
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from concepts.generators import JanusGenerator

from .checkpoint import load_state_dict_checked, read_json, require_keys, weights_dir
from .diffusion import check_clip_match

logger = logging.getLogger(__name__)

__all__ = [
    "AR_NAME", "CONFIG_FORMAT", "DEFAULT_SETTINGS", "SPECIAL_TOKENS", "build_janus", "janus_config",
    "quantize", "image_tokens", "prompt_embeddings", "ConceptWorldJanusGenerator", "load_ar", "load_conceptworld_ar",
]

AR_NAME = "conceptworld-ar"
CONFIG_FORMAT = "conceptkit.zoo.autoregressive"
DEFAULT_SETTINGS: dict[str, Any] = {"guidance": 20.0, "temperature": 1.0, "top_k": None, "top_p": None}
"""Default generation settings of the shipped model (overridable per call). Guidance 20 was chosen on held-out
prompts of sample seeds 555 and 556 (500 prompts; the benchmark uses seed 777); on the 200 of seed 555, from guidance
3 to 20 the prompted colour present rises 0.72 -> 0.79 and the prompted shape 0.59 -> 0.71, while unprompted colours
rise 0.14 -> 0.21 and count accuracy falls 0.62 -> 0.42 (the model draws extra objects) -- a trade documented in the
README."""

SPECIAL_TOKENS: dict[str, int] = {"pad": 0, "bos": 1, "eos": 2, "image": 3, "boi": 4, "eoi": 5}
"""Ids of the LLaMA vocabulary (the text itself never goes through it)."""


def janus_config(
    *, text_width: int, hidden_size: int = 128, layers: int = 4, heads: int = 4, intermediate_size: int = 384,
    image_size: int = 32, tokens_per_side: int = 8, codebook_size: int = 512, code_dim: int = 8,
    vq_base_channels: int = 32, vq_channel_multiplier: tuple[int, ...] = (1, 1, 2), vq_latent_channels: int = 64,
    context_length: int = 32,
) -> dict:
    """The ``JanusConfig`` of a zoo AR model as a JSON-ready dict (``text_config``, ``vision_config``, ``vq_config``).

    Examples
    --------
    >>> cfg = janus_config(text_width=16, hidden_size=32, layers=1, heads=2, intermediate_size=64,
    ...                    codebook_size=16, vq_base_channels=32, vq_channel_multiplier=(1, 1, 1))
    >>> cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]
    8
    """
    if image_size % tokens_per_side:
        raise ValueError(f"image_size {image_size} must be a multiple of tokens_per_side {tokens_per_side}.")
    n_down = len(vq_channel_multiplier) - 1
    if image_size // 2**n_down != tokens_per_side:
        raise ValueError(
            f"a VQ with {len(vq_channel_multiplier)} levels downsamples {image_size} px to {image_size // 2**n_down} "
            f"tokens per side, but tokens_per_side is {tokens_per_side}."
        )
    return {
        "text_config": {
            "model_type": "llama", "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
            "vocab_size": 8, "max_position_embeddings": context_length + 1 + tokens_per_side**2 + 8,
            "pad_token_id": SPECIAL_TOKENS["pad"], "bos_token_id": SPECIAL_TOKENS["bos"],
            "eos_token_id": SPECIAL_TOKENS["eos"], "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        },
        "vision_config": {
            "hidden_size": text_width, "num_hidden_layers": 0, "num_attention_heads": 1, "image_size": image_size,
            "patch_size": image_size // tokens_per_side, "projection_dim": hidden_size, "depth": 2,
            "num_image_tokens": tokens_per_side**2, "hidden_act": "gelu",
        },
        "vq_config": {
            "embed_dim": code_dim, "num_embeddings": codebook_size, "latent_channels": vq_latent_channels,
            "base_channels": vq_base_channels, "channel_multiplier": list(vq_channel_multiplier), "num_res_blocks": 1,
            "projection_dim": hidden_size, "image_token_embed_dim": hidden_size, "num_hidden_layers": 2,
            "num_patches": tokens_per_side,
        },
        "image_token_id": SPECIAL_TOKENS["image"],
        "tie_word_embeddings": False,
    }


def build_janus(config: Mapping[str, Any], *, source: str = "janus config") -> nn.Module:
    """``JanusForConditionalGeneration`` (untrained, eval mode) from a :func:`janus_config`-style dict."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    require_keys(config, ("text_config", "vision_config", "vq_config"), source=source)
    try:
        text = LlamaConfig(**{k: v for k, v in config["text_config"].items() if k != "model_type"})
        vision = JanusVisionConfig(**config["vision_config"])
        vq = JanusVQVAEConfig(**config["vq_config"])
        extra = {k: v for k, v in config.items() if k not in ("text_config", "vision_config", "vq_config")}
        cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, **extra)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: not a valid JanusConfig ({err}).") from err
    model = JanusForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = SPECIAL_TOKENS["pad"]
    model.generation_config.bos_token_id = SPECIAL_TOKENS["bos"]
    model.generation_config.eos_token_id = SPECIAL_TOKENS["eos"]
    model.generation_config.generation_kwargs = {"boi_token_id": SPECIAL_TOKENS["boi"]}
    return model.eval()


def quantize(vq: nn.Module, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine vector quantisation of a ``JanusVQVAE`` (the training-time path; matches ``vq.decode``).

    Parameters
    ----------
    vq
        ``model.model.vqmodel``.
    pixels
        Images ``[n, 3, H, W]`` in [-1, 1].

    Returns
    -------
    z : Tensor
        L2-normalised encoder outputs ``[n, code_dim, h, w]``.
    zq : Tensor
        Their codes (L2-normalised codebook rows), same shape.
    tokens : Tensor
        Code indices ``[n, h * w]`` (raster order).
    """
    h = vq.quant_conv(vq.encoder(pixels))
    z = F.normalize(h, dim=1)
    book = F.normalize(vq.quantize.embedding.weight, dim=1)
    n, d, hh, ww = z.shape
    flat = z.permute(0, 2, 3, 1).reshape(-1, d)
    idx = (flat @ book.T).argmax(1)
    zq = book[idx].view(n, hh, ww, d).permute(0, 3, 1, 2)
    return z, zq, idx.view(n, hh * ww)


@torch.no_grad()
def image_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """VQ tokens ``[n, 64]`` of images ``[n, 3, 32, 32]`` in [-1, 1] (cosine nearest code, raster order)."""
    return quantize(model.model.vqmodel, images)[2]


def prompt_embeddings(model: nn.Module, text_states: Tensor) -> Tensor:
    """Language-model input prefix ``[n, L + 1, hidden]``: ``aligner(text_states)`` then the ``<boi>`` embedding."""
    text = model.model.aligner(text_states)
    boi = model.get_input_embeddings()(torch.full((len(text), 1), SPECIAL_TOKENS["boi"], device=text.device))
    return torch.cat([text, boi.to(text.dtype)], dim=1)


class ConceptWorldJanusGenerator(JanusGenerator):
    """:class:`~concepts.generators.JanusGenerator` reading prompts through a frozen CLIP text tower.

    Everything but the prompt prefix is the parent's loop (seeded sampling, CFG ``[cond; uncond]``, call maps,
    VQ decoding). The prefix is :func:`prompt_embeddings` of the conditioner's per-token states; the
    unconditional rows use the empty prompt. Hookable names are the parent's (``model.language_model.layers.i``,
    ``model.generation_head``, ``model.vqmodel.decoder``, ``model.aligner``, ...) plus ``text_encoder.*`` (the CLIP
    text tower, called in the prefill phase: conditional prompts first, then the empty prompts).

    Parameters
    ----------
    model
        The trained ``JanusForConditionalGeneration``.
    conditioner
        :class:`~concepts.zoo.conditioning.CLIPTextConditioner`.
    **kwargs
        ``model_id``, ``device``, ``settings``, ``verbose`` as in :class:`~concepts.generators.JanusGenerator`.
    """

    def __init__(self, model: nn.Module, conditioner: nn.Module, **kwargs: Any) -> None:
        super().__init__(
            model, tokenize_fn=lambda prompts: [[SPECIAL_TOKENS["boi"]] for _ in prompts],
            use_chat_template=False, boi_token_id=SPECIAL_TOKENS["boi"], pad_token_id=SPECIAL_TOKENS["pad"],
            bos_token_id=SPECIAL_TOKENS["bos"], **kwargs,
        )
        self.conditioner = conditioner
        self._root = nn.ModuleDict({"model": model.model, "lm_head": model.lm_head, "text_encoder": conditioner})

    def _hook_root(self) -> nn.Module:
        return self._root

    def _prefill(self, prompts: list[str], cfg: bool, settings: Mapping[str, Any]) -> tuple[Tensor, Any]:
        dev = self._device()
        states, _ = self.conditioner.encode(prompts)
        if cfg:
            uncond, _ = self.conditioner.encode([""] * len(prompts))
            states = self.cfg_layout.merge(states, uncond)
        embeds = prompt_embeddings(self.model, states.to(dev))
        rows, length = embeds.shape[:2]
        mask = torch.ones((rows, length), dtype=torch.long, device=dev)
        pos = torch.arange(length, device=dev)[None].expand(rows, -1)
        hidden, cache = self._lm_call(embeds, mask, pos, None)
        state = {"cache": cache, "mask": mask, "next_pos": mask.sum(-1, keepdim=True)}
        return self._head(hidden), state


def load_ar(
    path: str | Path, device: str | torch.device = "cpu", *, conditioner: Any = None, verify_checksum: bool = True,
    settings: dict | None = None,
) -> ConceptWorldJanusGenerator:
    """Load a zoo AR folder (``config.json`` + ``model.safetensors``) as a :class:`ConceptWorldJanusGenerator`.

    Raises
    ------
    FileNotFoundError
        A file of the folder is missing.
    ValueError
        A file is corrupt or does not match the config (the message names the file and the key).
    """
    from concepts.devices import resolve_device

    from .conditioning import CLIPTextConditioner

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: AR model folder not found (expected config.json and model.safetensors).")
    cfg_path = folder / "config.json"
    config = read_json(cfg_path)
    src = str(cfg_path)
    require_keys(config, ("format", "janus", "weights", "conditioning"), source=src)
    if config["format"] != CONFIG_FORMAT:
        raise ValueError(f"{src}: key 'format' is {config['format']!r}, expected {CONFIG_FORMAT!r}.")
    require_keys(config["weights"], ("file",), source=f"{src} ['weights']")
    model = build_janus(config["janus"], source=f"{src} ['janus']")
    load_state_dict_checked(model, folder / config["weights"]["file"],
                            sha256=config["weights"].get("sha256") if verify_checksum else None)
    dev = resolve_device(device)
    if conditioner is None:
        conditioner = CLIPTextConditioner.from_zoo(config["conditioning"].get("clip", "conceptworld-clip"), device=dev)
    check_clip_match(config["conditioning"], conditioner, source=src)
    width = config["janus"]["vision_config"].get("hidden_size")
    if int(width) != conditioner.width:
        raise ValueError(
            f"{src}: key 'janus.vision_config.hidden_size' (the aligner input) is {width}, but the text conditioner "
            f"gives {conditioner.width}-d states."
        )
    merged = dict(DEFAULT_SETTINGS)
    merged.update(config.get("settings", {}))
    merged.update(settings or {})
    gen = ConceptWorldJanusGenerator(model, conditioner, model_id=config.get("name", AR_NAME), device=dev,
                                     settings=merged)
    gen.config = config
    return gen


def load_conceptworld_ar(device: str | torch.device = "cpu", path: str | Path | None = None, **kwargs: Any):
    """Registry loader of ``"conceptworld-ar"``: :func:`load_ar` on the shipped folder (or ``path``)."""
    return load_ar(weights_dir(AR_NAME) if path is None else path, device=device, **kwargs)
