"""transformers ``JanusForConditionalGeneration`` (Janus / Janus-Pro) as an image generator.

Our own sampling loop (same maths as ``JanusForConditionalGeneration.generate(...,
generation_mode="image")`` in transformers, but with one seeded CPU generator per image, left
padding for prompts of different lengths, and hookable steps):

1. prompt ids (chat template + ``<begin_of_image>``), left-padded; the unconditional copy of a
   prompt keeps BOS and BOI and replaces every other token by the pad token (as transformers
   does);
2. CFG rows ``[cond_0..cond_{N-1}, uncond_0..uncond_{N-1}]`` (``cfg_order="cond_uncond"``: the
   transformers order, ``input_ids.repeat(2, 1)``; the deepseek-ai/Janus repository interleaves
   instead, even rows conditional -- use ``CFGLayout("interleaved")`` for its activations);
3. prefill ``model.model.language_model(inputs_embeds=...)`` with a KV cache, then one call per
   image token: ``generation_head`` on the last hidden state -> logits, guidance
   ``uncond + g * (cond - uncond)``, sampling, ``prepare_embeddings_for_image_generation`` of
   the sampled token as the next input;
4. ``decode_image_tokens`` (VQ decoder, channels-last output in [-1, 1]) -> images in [0, 1].

Call map: a language-model layer fires once in ``phase="prefill"`` (rows 2N, all prompt
positions; predicts image token 0) and then once per fed image token (``phase="token"``,
``step=s`` feeds token ``s-1`` and predicts token ``s``), i.e. ``num_image_tokens`` calls in
all; VQ decoder layers fire once in ``phase="decode"``. Image token ``s`` sits at raster
position ``(s // grid, s % grid)`` of the VQ grid.
"""
from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from concepts.devices import resolve_device, resolve_dtype
from concepts.generators.autoregressive import ARLoopGenerator

__all__ = ["JanusGenerator"]

logger = logging.getLogger(__name__)


def _first_not_none(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


class JanusGenerator(ARLoopGenerator):
    """Janus / Janus-Pro text-to-image generation through the :class:`Generator` protocol.

    Parameters
    ----------
    model : transformers.JanusForConditionalGeneration
        The model (any size; tiny random configs work on CPU).
    processor : transformers.JanusProcessor or tokenizer, optional
        A ``JanusProcessor`` (prompts are formatted with its chat template when
        ``use_chat_template`` and it has one, then tokenized with ``generation_mode="image"``),
        or a plain tokenizer (the BOI token is appended).
    tokenize_fn : callable, optional
        ``fn(prompts) -> list of token-id lists`` instead of ``processor`` (BOI appended when missing).
    use_chat_template : bool, default True
        Wrap each prompt as a user turn of the processor's chat template.
    boi_token_id, pad_token_id, bos_token_id : int, optional
        Override the ids found in ``model.generation_config`` / the config / the processor.
    model_id : str, optional
    device, dtype : optional
        Move/cast the model.
    settings : mapping, optional
        Defaults for ``guidance`` (5.0, Janus' default), ``temperature`` (1.0), ``top_k``,
        ``top_p`` (None).
    verbose : bool, default False

    Examples
    --------
    >>> # gen = JanusGenerator.from_pretrained("deepseek-community/Janus-Pro-1B", device="cuda", dtype="bf16")
    >>> # out = gen.generate(["a red circle on stripes"], seeds=[0])            # 384 px, 576 tokens
    >>> # cache = gen.run_with_cache(["a church"], [0], ["model.language_model.layers.12"])
    >>> # h = cache["model.language_model.layers.12"]   # [2, prompt_len + 575, d], rows [cond; uncond]
    """

    family: ClassVar[str] = "janus"
    _default_settings: ClassVar[dict[str, Any]] = {
        "guidance": 5.0,
        "temperature": 1.0,
        "top_k": None,
        "top_p": None,
    }

    def __init__(
        self,
        model: nn.Module,
        processor: Any = None,
        *,
        tokenize_fn: Callable[[list[str]], Sequence[Sequence[int]]] | None = None,
        use_chat_template: bool = True,
        boi_token_id: int | None = None,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        model_id: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        settings: Mapping[str, Any] | None = None,
        verbose: bool = False,
    ) -> None:
        inner = getattr(model, "model", None)
        lm = getattr(inner, "language_model", None)
        if not isinstance(model, nn.Module) or not isinstance(lm, nn.Module) or not hasattr(inner, "generation_head"):
            raise TypeError(
                f"JanusGenerator expects a transformers JanusForConditionalGeneration, got {type(model).__name__}. "
                "For other autoregressive models use ARLoopGenerator."
            )
        if processor is None and tokenize_fn is None:
            raise ValueError(
                "JanusGenerator needs a way to tokenize prompts: pass processor=JanusProcessor.from_pretrained(path) "
                "(or a tokenizer) or tokenize_fn=fn(prompts) -> list of token-id lists."
            )
        if tokenize_fn is not None and not callable(tokenize_fn):
            raise TypeError(f"tokenize_fn must be callable, got {type(tokenize_fn).__name__}.")
        if device is not None or dtype is not None:
            kw: dict[str, Any] = {}
            if device is not None:
                kw["device"] = resolve_device(device)
            if dtype is not None:
                kw["dtype"] = resolve_dtype(dtype)
            model.to(**kw)
        model.eval()
        cfg = model.config
        gen_cfg = getattr(model, "generation_config", None)
        gen_kwargs = (getattr(gen_cfg, "generation_kwargs", None) or {}) if gen_cfg is not None else {}
        tok = getattr(processor, "tokenizer", processor)
        proc_boi = None
        if processor is not None and getattr(processor, "image_start_token", None) is not None:
            proc_boi = tok.convert_tokens_to_ids(processor.image_start_token)
        elif tok is not None and getattr(tok, "boi_token", None) is not None:
            proc_boi = tok.convert_tokens_to_ids(tok.boi_token)
        self.boi_token_id = _first_not_none(boi_token_id, gen_kwargs.get("boi_token_id"), proc_boi)
        self.pad_token_id = _first_not_none(
            pad_token_id,
            getattr(gen_cfg, "pad_token_id", None),
            getattr(cfg.text_config, "pad_token_id", None),
            getattr(tok, "pad_token_id", None),
        )
        self.bos_token_id = _first_not_none(
            bos_token_id,
            getattr(gen_cfg, "bos_token_id", None),
            getattr(cfg.text_config, "bos_token_id", None),
            getattr(tok, "bos_token_id", None),
        )
        for name in ("boi_token_id", "pad_token_id"):
            if getattr(self, name) is None:
                raise ValueError(
                    f"Could not find the {name} of this Janus model (generation_config, config and processor "
                    f"have none); pass {name}=... to JanusGenerator."
                )
        n_tokens = int(cfg.vision_config.num_image_tokens)
        quant = getattr(getattr(inner.vqmodel, "quantize", None), "quant_state_dims", None)
        if quant is not None and int(quant[0]) * int(quant[1]) != n_tokens:
            raise ValueError(
                f"vision_config.num_image_tokens={n_tokens} does not match the VQ grid {tuple(quant)} "
                f"({int(quant[0]) * int(quant[1])} tokens); fix the config so both agree."
            )
        self.grid = None if quant is None else (int(quant[0]), int(quant[1]))
        self.processor = processor
        self.tokenize_fn = tokenize_fn
        self.use_chat_template = bool(use_chat_template)
        if model_id is None:
            model_id = getattr(cfg, "_name_or_path", None) or type(model).__name__
        super().__init__(
            model,
            num_steps=n_tokens,
            cfg_order="cond_uncond",
            image_range=(-1.0, 1.0),
            channels_last=True,
            model_id=model_id,
            settings=settings,
            verbose=verbose,
        )
        params = inspect.signature(lm.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        processor: Any = None,
        tokenize_fn: Callable[[list[str]], Sequence[Sequence[int]]] | None = None,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype | None = None,
        settings: Mapping[str, Any] | None = None,
        verbose: bool = False,
        local_files_only: bool | None = None,
        **load_kwargs: Any,
    ) -> JanusGenerator:
        """Load a Janus checkpoint folder (or hub id) and its processor.

        Parameters
        ----------
        path_or_id : str
            A folder written by ``model.save_pretrained`` (+ ``processor.save_pretrained``) or a
            hub id such as ``"deepseek-community/Janus-Pro-1B"`` (downloads only if allowed).
        processor : optional
            A processor/tokenizer to use instead of loading one from ``path_or_id``.
        tokenize_fn : callable, optional
            Used when the folder has no processor files.
        device, dtype : optional
        settings, verbose : optional
            As in the constructor.
        local_files_only : bool, optional
            Passed to transformers.
        **load_kwargs
            More ``JanusForConditionalGeneration.from_pretrained`` arguments.

        Returns
        -------
        JanusGenerator

        Examples
        --------
        >>> # gen = JanusGenerator.from_pretrained("/models/Janus-Pro-7B", device="cuda", dtype="bfloat16")
        >>> # out = gen.generate(["a photo of a church"], seeds=[0], guidance=5.0)
        """
        import transformers
        from transformers import JanusForConditionalGeneration, JanusProcessor

        kw = dict(load_kwargs)
        if local_files_only is not None:
            kw["local_files_only"] = local_files_only
        if dtype is not None:
            major = int(transformers.__version__.split(".")[0])
            kw["dtype" if major >= 5 else "torch_dtype"] = resolve_dtype(dtype)
        model = JanusForConditionalGeneration.from_pretrained(path_or_id, **kw)
        if processor is None and tokenize_fn is None:
            local = os.path.isdir(str(path_or_id))
            has_files = (not local) or any(
                os.path.exists(os.path.join(str(path_or_id), f))
                for f in ("processor_config.json", "tokenizer_config.json", "tokenizer.json")
            )
            if has_files:
                pkw = {} if local_files_only is None else {"local_files_only": local_files_only}
                try:
                    processor = JanusProcessor.from_pretrained(path_or_id, **pkw)
                except (OSError, ValueError) as exc:
                    raise ValueError(
                        f"Could not load a JanusProcessor from {path_or_id!r} ({exc}); pass processor=... or "
                        "tokenize_fn=... to JanusGenerator.from_pretrained."
                    ) from exc
        return cls(model, processor, tokenize_fn=tokenize_fn, model_id=str(path_or_id), device=device,
                   settings=settings, verbose=verbose)

    # -- prompts --------------------------------------------------------------------------------
    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        if self.tokenize_fn is not None:
            ids = [list(map(int, x)) for x in self.tokenize_fn(list(prompts))]
        else:
            proc = self.processor
            ids = []
            for p in prompts:
                text = p
                if self.use_chat_template and getattr(proc, "chat_template", None):
                    conv = [{"role": "user", "content": [{"type": "text", "text": p}]}]
                    text = proc.apply_chat_template(conv, add_generation_prompt=True)
                    if isinstance(text, (list, tuple)):
                        text = text[0]
                if getattr(proc, "image_start_token", None) is not None:  # JanusProcessor
                    enc = proc(text=[text], generation_mode="image", return_tensors="pt")
                else:  # plain tokenizer
                    enc = proc([text], return_tensors="pt")
                ids.append(enc["input_ids"][0].tolist())
        if len(ids) != len(prompts):
            raise ValueError(f"Tokenization returned {len(ids)} sequences for {len(prompts)} prompts.")
        out = []
        for x in ids:
            if not x:
                raise ValueError("A prompt tokenized to an empty sequence; check the tokenizer / tokenize_fn.")
            if x[-1] != self.boi_token_id:
                x = [*x, int(self.boi_token_id)]
            out.append(x)
        return out

    # -- loop parts -----------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """``model.model.language_model`` (hook its ``layers.i`` as ``model.language_model.layers.i``)."""
        return self.model.model.language_model

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _lm_call(self, embeds: Tensor, mask: Tensor, pos: Tensor, cache: Any) -> tuple[Tensor, Any]:
        kwargs: dict[str, Any] = {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": pos,
            "use_cache": True,
        }
        if cache is not None:
            kwargs[self._cache_kw] = cache
        out = self.language_model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.last_hidden_state, new_cache

    def _head(self, hidden: Tensor) -> Tensor:
        return self.model.model.generation_head(hidden[:, -1, :])

    def _embed_image_tokens(self, tokens: Tensor) -> Tensor:
        fn = getattr(self.model, "prepare_embeddings_for_image_generation", None)
        if fn is not None:
            return fn(tokens)
        inner = self.model.model  # older/newer layouts: embeddings + aligner
        return inner.generation_aligner(inner.generation_embeddings(tokens))

    def _prefill(self, prompts: list[str], cfg: bool, settings: Mapping[str, Any]) -> tuple[Tensor, Any]:
        seqs = self._prompt_ids(prompts)
        n, length = len(seqs), max(len(s) for s in seqs)
        dev = self._device()
        ids = torch.full((n, length), int(self.pad_token_id), dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding
            ids[i, length - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s):] = 1
        if cfg:
            keep = ids == int(self.boi_token_id)
            if self.bos_token_id is not None:
                keep |= ids == int(self.bos_token_id)
            uncond = ids.masked_fill(~keep, int(self.pad_token_id))
            layout = self.cfg_layout
            ids, mask = layout.merge(ids, uncond), layout.merge(mask, mask)
        ids, mask = ids.to(dev), mask.to(dev)
        embeds = self.model.get_input_embeddings()(ids)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden, cache = self._lm_call(embeds, mask, pos, None)
        state = {"cache": cache, "mask": mask, "next_pos": mask.sum(-1, keepdim=True)}
        return self._head(hidden), state

    def _step(self, tokens: Tensor, step: int, state: Any, settings: Mapping[str, Any]) -> tuple[Tensor, Any]:
        embeds = self._embed_image_tokens(tokens.to(self._device()))
        mask = torch.cat([state["mask"], state["mask"].new_ones(state["mask"].shape[0], tokens.shape[1])], dim=1)
        pos = state["next_pos"] + torch.arange(tokens.shape[1], device=mask.device)[None]
        hidden, cache = self._lm_call(embeds, mask, pos, state["cache"])
        state = {"cache": cache, "mask": mask, "next_pos": state["next_pos"] + tokens.shape[1]}
        return self._head(hidden), state

    def _decode(self, tokens: Tensor) -> Tensor:
        return self.model.decode_image_tokens(tokens.to(self._device()))
