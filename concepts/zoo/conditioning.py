"""Text conditioning of the zoo generators: the frozen text tower of the built-in ConceptWorld CLIP.

Both zoo generators (:mod:`concepts.zoo.diffusion`, :mod:`concepts.zoo.autoregressive`) read a prompt through
:class:`CLIPTextConditioner`: the prompt is tokenized by the CLIP's tokenizer and run through the CLIP's text
transformer (token embedding, positional embedding, causal transformer, final LayerNorm); the per-token hidden
states ``[N, context_length, width]`` (``[N, 32, 96]`` for ``conceptworld-clip``) are the conditioning. The
text tower is frozen (never trained with the generators); each generator learns its own projection of these
states (the UNet's ``encoder_hid_proj``; the Janus model's ``aligner``).

The empty prompt ``""`` (``<sot> <eot>``) is the unconditional input for classifier-free guidance; the
generators are trained with it in place of the caption for 10 % of the images.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["CLIPTextConditioner", "NullConditioner"]


class CLIPTextConditioner(nn.Module):
    """Frozen per-token text features of an ``open_clip.CLIP`` text tower.

    Parameters
    ----------
    clip_model
        An ``open_clip.CLIP`` (its text tower modules are shared, not copied, and frozen).
    tokenizer
        Callable ``tokenizer(list[str]) -> LongTensor [N, context_length]``.
    sha256
        Checksum of the CLIP weights (recorded by the generators trained on this conditioner).

    Attributes
    ----------
    width : int
        Feature size of the hidden states.
    context_length : int
        Number of token positions.

    Examples
    --------
    >>> cond = CLIPTextConditioner.from_zoo()           # doctest: +SKIP
    >>> h, mask = cond.encode(["a red circle on stripes", ""])   # doctest: +SKIP
    >>> h.shape, mask.sum(1).tolist()                          # doctest: +SKIP
    (torch.Size([2, 32, 96]), [6, 2])
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Any, *, sha256: str | None = None) -> None:
        super().__init__()
        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(clip_model, attr):
                raise TypeError(
                    f"CLIPTextConditioner needs an open_clip.CLIP with a built-in text tower (attribute {attr!r}); "
                    f"got {type(clip_model).__name__}."
                )
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be callable (list[str] -> LongTensor), got {type(tokenizer).__name__}.")
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        mask = getattr(clip_model, "attn_mask", None)
        self.register_buffer("attn_mask", None if mask is None else mask.clone(), persistent=False)
        self.tokenizer = tokenizer
        self.sha256 = sha256
        self.width = int(self.positional_embedding.shape[-1])
        self.context_length = int(self.positional_embedding.shape[0])
        pad = getattr(tokenizer, "pad_token_id", 0)
        self.pad_token_id = 0 if pad is None else int(pad)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @classmethod
    def from_zoo(cls, name: str = "conceptworld-clip", device: str | torch.device = "cpu") -> CLIPTextConditioner:
        """The text tower of a zoo CLIP (default: the built-in ``conceptworld-clip``)."""
        from concepts import zoo

        pieces = zoo.load(name, device=device)
        model, _, tokenizer = pieces
        sha = getattr(pieces, "config", {}).get("weights", {}).get("sha256")
        return cls(model, tokenizer, sha256=sha)

    def train(self, mode: bool = True) -> CLIPTextConditioner:  # the tower stays frozen in eval mode
        return super().train(False)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids ``[N, context_length]`` (on the conditioner's device)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {type(bad[0]).__name__} ({bad[0]!r}).")
        return self.tokenizer(list(prompts)).to(self.positional_embedding.device)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[N, L, width]`` of token ids ``[N, L]``."""
        x = self.token_embedding(tokens)
        x = x + self.positional_embedding.to(x.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)
        return self.ln_final(x)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden [N, L, width], mask [N, L])`` of prompts; the mask is 1 up to and including ``<eot>``.

        This is the ``text_encoder_fn`` the zoo generators pass to their adapters.
        """
        tokens = self.tokenize(prompts)
        hidden = self(tokens)
        mask = (tokens != self.pad_token_id).long()
        return hidden, mask


class NullConditioner(nn.Module):
    """All-zero text states ``[N, context_length, width]`` for any prompt (unconditional prior training).

    The zoo generators are first trained as unconditional priors on this conditioner (which needs no CLIP),
    then fine-tuned on :class:`CLIPTextConditioner`.

    Examples
    --------
    >>> h, mask = NullConditioner(96, 32).encode(["a red circle", ""])
    >>> h.shape, float(h.abs().sum())
    (torch.Size([2, 32, 96]), 0.0)
    """

    sha256 = None

    def __init__(self, width: int, context_length: int) -> None:
        super().__init__()
        self.width = int(width)
        self.context_length = int(context_length)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        n = 1 if isinstance(prompts, str) else len(prompts)
        return torch.zeros(n, self.context_length, self.width), torch.ones(n, self.context_length, dtype=torch.long)
