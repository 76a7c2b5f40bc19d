"""Images -> per-concept energies: a frozen encoder, a token layer, a sparse autoencoder and a pooling.

:class:`ConceptCoder` is the concept lens the blindspot analysis looks through (both the real and the
generated images go through the same one). For each image it

1. runs the encoder and records the tokens of one layer (:class:`~concepts.extractor.ConceptExtractor`
   with ``pooling="tokens"``: ViT tokens with their cls/register/patch types, or every position of a
   conv map);
2. keeps the selected token types (``tokens="patch"`` by default; ``"all"`` reproduces the anchor, which
   sums over all 261 DINOv2 tokens including cls and registers; ``"cls"`` keeps the cls token only);
3. encodes each token with the SAE (non-negative codes ``z_t [K]``);
4. pools over tokens (``pooling="sum"`` by default, the anchor's choice: the energy is the concept's
   activation *mass* in the image, so a concept drawn twice or larger counts more; ``"mean"`` divides by
   the number of tokens; ``"max"`` keeps the strongest token).

If no fitted SAE is given, :meth:`ConceptCoder.fit` trains one (``sae.TopKSAE`` by default) on the tokens of
the real images, so the dictionary describes the real distribution.

Names. Units are named with :func:`concepts.naming.name_concepts` when the encoder has a text tower
(open_clip models, the built-in CLIP): each unit gets the direction, in the joint image-text space, of the
energy-weighted mean image embedding minus the mean embedding of the fitting images,
``v_k = sum_i e_k(x_i) (f(x_i) - mean f) / sum_i e_k(x_i)``, named against a vocabulary with ``center=True``
(it is a difference vector). Image-only encoders (DINOv2) give ``"unit k"`` names.

Examples
--------
>>> from concepts.world import ConceptWorld
>>> coder = ConceptCoder.builtin(n_concepts=64, top_k=4, n_epochs=2, progress=False)   # doctest: +SKIP
>>> real = ConceptWorld(seed=0, image_size=32).sample(200, seed=0).images               # doctest: +SKIP
>>> energies = coder.fit(real).transform(real)                                          # doctest: +SKIP
>>> energies.energy.shape                                                               # doctest: +SKIP
(200, 64)
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["ConceptCoder", "ConceptEnergies", "TOKEN_CHOICES", "POOLING_CHOICES", "BUILTIN_LAYER", "DEFAULT_SAE_KWARGS",
           "default_layer"]

TOKEN_CHOICES: tuple[str, ...] = ("patch", "all", "cls")
POOLING_CHOICES: tuple[str, ...] = ("sum", "mean", "max")
DEFAULT_SAE_KWARGS: dict[str, Any] = {"b_dec_init": "mean"}
"""``TopKSAE`` arguments of the SAE a coder trains on the fly (overridden by ``sae_kwargs``)."""

BUILTIN_LAYER = "visual.layer3"
"""Layer of the built-in CLIP used by default: the 4x4 map (256 channels) of the ResNet tower's third stage.

Measured on 32-pixel ConceptWorld renders (3000 images, TopK SAE 256/8 on the tokens, sum pooling): 37 of the
55 concepts have a unit with AUROC >= 0.9 at ``visual.layer3``, 25 at ``visual.layer4`` (2x2 map) and 2 on the
final 64-d image embedding, whose global pooling mixes the objects of an image.
"""


@dataclass(frozen=True, eq=False)
class ConceptEnergies:
    """Per-image concept energies made by :meth:`ConceptCoder.transform`.

    Attributes
    ----------
    energy
        float32 ``[n, K]``: SAE codes pooled over the selected tokens of each image (>= 0).
    fired
        int32 ``[n, K]``: number of tokens on which each concept fires.
    n_tokens
        Tokens pooled per image.
    embeddings
        float32 ``[n, d]`` joint-space image embeddings (encoders with a text tower), else None.
    """

    energy: np.ndarray
    fired: np.ndarray
    n_tokens: int
    embeddings: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.energy.shape[0])

    def __getitem__(self, idx: Any) -> ConceptEnergies:
        """Select images (index, slice, mask)."""
        emb = None if self.embeddings is None else self.embeddings[idx]
        return ConceptEnergies(self.energy[idx], self.fired[idx], self.n_tokens, emb)


def default_layer(encoder: Any) -> str:
    """The token layer used when none is given.

    * open_clip ViT: the last residual block (``visual.transformer.resblocks.{L-1}``);
    * open_clip ModifiedResNet: ``visual.layer4``;
    * transformers vision models (DINOv2): ``layernorm`` (the normalised last-layer tokens, as in the anchor),
      else the last ``encoder.layer.N``.

    Raises
    ------
    ValueError
        When none of these exist; pass ``layer=...`` (see :func:`concepts.hooks.available_layers`).

    Examples
    --------
    >>> # default_layer(OpenCLIPEncoder.from_pretrained("ViT-B-32")) -> 'visual.transformer.resblocks.11'
    """
    from concepts.hooks import available_layers

    model = getattr(encoder, "model", encoder)
    names = available_layers(model)
    blocks = [n for n in names if n.startswith("visual.transformer.resblocks.") and n.count(".") == 3]
    if blocks:
        return max(blocks, key=lambda n: int(n.rsplit(".", 1)[1]))
    if "visual.layer4" in names:
        return "visual.layer4"
    if "layernorm" in names:
        return "layernorm"
    layers = [n for n in names if n.startswith("encoder.layer.") and n.count(".") == 2]
    if layers:
        return max(layers, key=lambda n: int(n.rsplit(".", 1)[1]))
    raise ValueError(
        f"cannot pick a token layer for {type(model).__name__}: no visual.transformer.resblocks.*, visual.layer4, "
        f"layernorm or encoder.layer.* modules. Pass layer=... (available: {names[:8]} ...)."
    )


def _is_fitted(sae: Any) -> bool:
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    try:
        check_is_fitted(sae)
    except (NotFittedError, TypeError):
        return False
    return True


class ConceptCoder:
    """Turn images into per-concept energies with a frozen encoder layer and a sparse autoencoder.

    Parameters
    ----------
    encoder
        An :class:`~concepts.encoders.OpenCLIPEncoder`, :class:`~concepts.encoders.DINOv2Encoder` or any
        object with an ``extractor(layers, **kwargs) -> ConceptExtractor`` method and a ``model``.
    layer
        Layer whose tokens are encoded (default: :func:`default_layer`).
    tokens
        ``"patch"`` (default), ``"all"`` or ``"cls"``: token types pooled (see the module docstring).
    pooling
        ``"sum"`` (default, activation mass), ``"mean"`` or ``"max"`` over the selected tokens.
    sae
        A fitted SAE (used as is), an unfitted one (cloned and fitted on the real tokens), or None
        (``TopKSAE(n_concepts, top_k, ...)`` fitted on the real tokens).
    n_concepts, top_k, n_epochs, sae_batch_size, lr
        Settings of the default ``TopKSAE``.
    sae_kwargs
        Further ``TopKSAE`` arguments, over :data:`DEFAULT_SAE_KWARGS` (``b_dec_init="mean"``: on the small token
        sets of an on-the-fly SAE the geometric-median initialisation costs more than the training itself, and
        on ConceptWorld it maps as many units to concepts) and ``sparse_backend="dense"`` for dictionaries of at
        most 4096 concepts (there the dense kernels are several times faster).
    max_train_tokens
        At most this many token rows (a seeded random subset) train the SAE.
    vocabulary
        Vocabulary for naming units (see :func:`concepts.naming.name_concepts`); None skips naming.
    batch_size
        Images per encoder forward pass.
    chunk_size
        Images per extraction chunk (bounds memory: tokens of one chunk are held at a time).
    random_state
        Seed of the token subset and of the SAE.
    progress
        Progress bars.

    Attributes
    ----------
    sae_
        The fitted SAE.
    names_
        DataFrame, one row per unit: ``concept``, ``name``, ``similarity``, ``margin``, ``alternatives``,
        ``alive`` (fired on the fitting images).
    n_features_in_
        Width of the token layer.

    Examples
    --------
    >>> coder = ConceptCoder.from_spec("builtin", n_concepts=64, top_k=4)    # doctest: +SKIP
    >>> coder.fit(real_images).names_.head()                                # doctest: +SKIP
    """

    def __init__(
        self,
        encoder: Any,
        layer: str | None = None,
        *,
        tokens: str = "patch",
        pooling: str = "sum",
        sae: Any = None,
        n_concepts: int = 256,
        top_k: int = 8,
        n_epochs: int = 10,
        sae_batch_size: int = 512,
        lr: float | None = None,
        sae_kwargs: dict[str, Any] | None = None,
        max_train_tokens: int = 200_000,
        vocabulary: Any = "conceptworld",
        batch_size: int = 128,
        chunk_size: int = 512,
        random_state: int = 0,
        progress: bool = True,
    ) -> None:
        self.encoder = encoder
        self.layer = layer
        self.tokens = tokens
        self.pooling = pooling
        self.sae = sae
        self.n_concepts = n_concepts
        self.top_k = top_k
        self.n_epochs = n_epochs
        self.sae_batch_size = sae_batch_size
        self.lr = lr
        self.sae_kwargs = sae_kwargs
        self.max_train_tokens = max_train_tokens
        self.vocabulary = vocabulary
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.random_state = random_state
        self.progress = progress

    # ------------------------------------------------------------------ construction
    @classmethod
    def builtin(cls, device: str = "cpu", **kwargs: Any) -> ConceptCoder:
        """The built-in ConceptWorld CLIP (``conceptworld-clip``) at :data:`BUILTIN_LAYER`, summed patch tokens.

        Examples
        --------
        >>> coder = ConceptCoder.builtin()   # doctest: +SKIP
        """
        from concepts.zoo.clip import load_builtin_clip_encoder

        encoder = load_builtin_clip_encoder(device)
        if kwargs.get("layer") is None:
            kwargs["layer"] = BUILTIN_LAYER
        return cls(encoder, **kwargs)

    @classmethod
    def from_spec(cls, spec: str, device: str = "cpu", **kwargs: Any) -> ConceptCoder:
        """Build a coder from an encoder spec string (the ``--encoder`` option).

        Parameters
        ----------
        spec
            ``"builtin"`` (or ``"conceptworld-clip"``); ``"dinov2"`` / ``"dinov2:PATH_OR_HUB_ID"`` (a transformers
            DINOv2 saved locally or in the cache; default id ``facebook/dinov2-with-registers-base``); otherwise an
            open_clip model ``"NAME"`` or ``"NAME:PRETRAINED"`` (tag in the local cache or a checkpoint file), or an
            open_clip schema name ``"local-dir:/path"`` / ``"hf-hub:org/repo"``.
        device
            Where the encoder runs.
        **kwargs
            Passed to :class:`ConceptCoder` (``layer``, ``tokens``, ``pooling``, ``sae``, ...).

        Raises
        ------
        ValueError
            Empty spec. Loading errors of the encoders pass through with their reasons.

        Examples
        --------
        >>> ConceptCoder.from_spec("ViT-B-32:/models/vit-b-32.safetensors")   # doctest: +SKIP
        """
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(
                f"encoder spec must be a non-empty string like 'builtin', 'dinov2[:path]' or 'ViT-B-32[:pretrained]'; "
                f"got {spec!r}."
            )
        spec = spec.strip()
        if spec in ("builtin", "built-in", "conceptworld-clip"):
            return cls.builtin(device=device, **kwargs)
        head, _, rest = spec.partition(":")
        if head.lower() == "dinov2":
            from concepts.encoders import DINOv2Encoder

            encoder = DINOv2Encoder.from_pretrained(rest or "facebook/dinov2-with-registers-base", device=device)
            kwargs.setdefault("vocabulary", None)
            return cls(encoder, **kwargs)
        from concepts.encoders import OpenCLIPEncoder

        if head in ("local-dir", "hf-hub"):  # open_clip schemas: the whole spec is the model name
            head, rest = spec, ""
        encoder = OpenCLIPEncoder.from_pretrained(head, pretrained=rest or None, device=device)
        return cls(encoder, **kwargs)

    # ------------------------------------------------------------------ helpers
    def _check_params(self) -> None:
        if self.tokens not in TOKEN_CHOICES:
            raise ValueError(f"tokens must be one of {TOKEN_CHOICES}; got {self.tokens!r}.")
        if self.pooling not in POOLING_CHOICES:
            raise ValueError(f"pooling must be one of {POOLING_CHOICES}; got {self.pooling!r}.")
        for name in ("batch_size", "chunk_size", "max_train_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        if not callable(getattr(self.encoder, "extractor", None)):
            raise TypeError(
                f"encoder must offer extractor(layers, **kwargs) (OpenCLIPEncoder, DINOv2Encoder); got "
                f"{type(self.encoder).__name__}."
            )

    @property
    def _has_text(self) -> bool:
        return callable(getattr(getattr(self.encoder, "model", None), "encode_text", None))

    @property
    def layer_(self) -> str:
        return self.layer if self.layer is not None else default_layer(self.encoder)

    def _chunks(self, images: Any) -> Iterator[Any]:
        n = len(images)
        for lo in range(0, n, self.chunk_size):
            yield images[lo:lo + self.chunk_size]

    def _extract(self, images: Any) -> tuple[torch.Tensor, np.ndarray, np.ndarray | None, int]:
        """Token rows ``[R, d]``, their image index ``[R]``, embeddings ``[n, e]`` (or None), tokens per image."""
        layer = self.layer_
        layers = [layer] + ([""] if self._has_text else [])
        pooling = {layer: "tokens", **({"": "mean"} if self._has_text else {})}
        ext = self.encoder.extractor(layers, pooling=pooling, batch_size=self.batch_size, progress=False)
        store = ext.extract(images)
        types = None if self.tokens == "all" else [self.tokens]
        try:
            rows = store.read(layer, token_types=types)
            index = store.read_meta("image_index", layer, token_types=types).numpy().astype(np.int64)
        except KeyError as exc:
            raise ValueError(
                f"layer {layer!r} returns one vector per image, not tokens; choose a layer with token or spatial "
                f"outputs (e.g. a transformer block or a conv stage). ({exc})"
            ) from exc
        n = len(images)
        if len(rows) == 0:
            raise ValueError(
                f"no {self.tokens!r} tokens at layer {layer!r}; use tokens='all' or 'patch' (conv maps have patch "
                "positions only)."
            )
        per_image = len(rows) // n
        emb = store.read("").numpy() if self._has_text else None
        return rows, index, emb, per_image

    # ------------------------------------------------------------------ fit / transform
    def fit(self, images: Any, y: Any = None) -> ConceptCoder:
        """Train the SAE on the tokens of ``images`` (unless a fitted SAE was given) and name the units.

        Parameters
        ----------
        images
            Real images: uint8 ``[n, H, W, 3]``, float tensors, PIL images or file paths.
        y
            Ignored.

        Returns
        -------
        ConceptCoder
            ``self``.
        """
        self._check_params()
        if len(images) < 2:
            raise ValueError(f"fit needs at least 2 images; got {len(images)}.")
        rng = np.random.default_rng(self.random_state)
        n_total = len(images)
        rows_kept, index_kept, embs = [], [], []
        offset = 0
        per_image = None
        chunks = list(self._chunks(images))
        for chunk in tqdm(chunks, desc="encoding real images (fit)", disable=not self.progress, leave=False):
            rows, index, emb, per_image = self._extract(chunk)
            budget = self.max_train_tokens * len(chunk) / n_total
            if len(rows) > budget:
                keep = np.sort(rng.choice(len(rows), size=max(1, int(budget)), replace=False))
                rows, index = rows[keep], index[keep]
            rows_kept.append(rows)
            index_kept.append(index + offset)
            if emb is not None:
                embs.append(emb)
            offset += len(chunk)
        X = torch.cat(rows_kept)
        index = np.concatenate(index_kept)
        self.n_features_in_ = int(X.shape[1])
        self.tokens_per_image_ = int(per_image or 1)
        self.sae_ = self._fit_sae(X)
        codes = self._codes(X)
        self.names_ = self._name_units(codes, index, np.concatenate(embs) if embs else None, n_total)
        return self

    def _fit_sae(self, X: torch.Tensor) -> Any:
        sae = self.sae
        if sae is not None and _is_fitted(sae):
            d = getattr(sae, "n_features_in_", None)
            if d is not None and int(d) != X.shape[1]:
                raise ValueError(
                    f"the SAE expects {d} features, but layer {self.layer_!r} gives {X.shape[1]}-d tokens; use the "
                    "layer the SAE was trained on (layer=...) or let the coder train a new SAE (sae=None)."
                )
            return sae
        if sae is None:
            from sae import TopKSAE

            sae = TopKSAE(n_concepts=self.n_concepts, top_k=self.top_k, n_epochs=self.n_epochs,
                          batch_size=self.sae_batch_size, lr=self.lr, random_state=self.random_state,
                          verbose=self.progress, **self._sae_kwargs())
        else:
            from sklearn.base import clone

            sae = clone(sae)
        logger.info("training %s on %d tokens of %d features", type(sae).__name__, X.shape[0], X.shape[1])
        return sae.fit(X)

    def _sae_kwargs(self) -> dict[str, Any]:
        kw = dict(DEFAULT_SAE_KWARGS)
        if int(self.n_concepts) <= 4096:
            kw["sparse_backend"] = "dense"  # measured ~6x faster than the sparse kernels for small dictionaries
        kw.update(self.sae_kwargs or {})
        return kw

    def _codes(self, X: torch.Tensor) -> np.ndarray:
        out = []
        for lo in range(0, len(X), 8192):
            z = self.sae_.transform(X[lo:lo + 8192])
            z = z.detach().cpu().numpy() if hasattr(z, "detach") else np.asarray(z)
            out.append(z.astype(np.float32))
        Z = np.concatenate(out)
        if (Z < 0).any():
            raise ValueError(
                f"{type(self.sae_).__name__} produced negative codes; concept energies need non-negative codes "
                "(TopK, BatchTopK, ReLU, JumpReLU, Archetypal SAEs)."
            )
        return Z

    def _pool(self, Z: np.ndarray, index: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        k = Z.shape[1]
        fired = np.zeros((n, k), dtype=np.int32)
        np.add.at(fired, index, (Z > 0).astype(np.int32))
        if self.pooling == "max":
            energy = np.zeros((n, k), dtype=np.float32)
            np.maximum.at(energy, index, Z)
            return energy, fired
        energy = np.zeros((n, k), dtype=np.float64)
        np.add.at(energy, index, Z)
        if self.pooling == "mean":
            counts = np.bincount(index, minlength=n).astype(np.float64)
            energy /= np.maximum(counts, 1.0)[:, None]
        return energy.astype(np.float32), fired

    def _name_units(self, Z: np.ndarray, index: np.ndarray, emb: np.ndarray | None, n: int) -> pd.DataFrame:
        energy, _ = self._pool(Z, index, n)
        k = energy.shape[1]
        alive = energy.sum(0) > 0
        base = pd.DataFrame({"concept": np.arange(k), "name": [f"unit {j}" for j in range(k)],
                             "similarity": np.nan, "margin": np.nan, "alternatives": "", "alive": alive})
        if emb is None or self.vocabulary is None or not alive.any():
            return base
        from concepts.naming import name_concepts

        emb = emb.astype(np.float64)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        centred = emb - emb.mean(0, keepdims=True)
        w = energy.astype(np.float64)
        mass = w.sum(0)
        directions = (w.T @ centred) / np.maximum(mass, 1e-12)[:, None]  # [K, d]
        live = np.flatnonzero(alive)
        table = name_concepts(torch.from_numpy(directions[live]).float(), self.encoder, self.vocabulary,
                              top_m=3, center=True)
        top = table[table["rank"] == 1].sort_values("concept")
        alts = table.groupby("concept")["name"].apply(lambda s: "; ".join(s.iloc[1:]))
        base.loc[live, "name"] = top["name"].to_numpy()
        base.loc[live, "similarity"] = top["similarity"].to_numpy()
        base.loc[live, "margin"] = top["margin"].to_numpy()
        base.loc[live, "alternatives"] = alts.reindex(range(len(live))).fillna("").to_numpy()
        base.loc[~alive, "name"] = [f"unit {j} (silent on real)" for j in np.flatnonzero(~alive)]
        return base

    def transform(self, images: Any) -> ConceptEnergies:
        """Per-image concept energies of ``images``.

        Parameters
        ----------
        images
            uint8 ``[n, H, W, 3]``, float tensors, PIL images or file paths.

        Returns
        -------
        ConceptEnergies
        """
        from sklearn.exceptions import NotFittedError

        if not hasattr(self, "sae_"):
            raise NotFittedError("This ConceptCoder is not fitted yet; call fit(real_images) before transform.")
        n = len(images)
        if n == 0:
            raise ValueError("transform got no images; pass at least one.")
        energies, fireds, embs = [], [], []
        for chunk in tqdm(list(self._chunks(images)), desc="encoding images", disable=not self.progress, leave=False):
            rows, index, emb, _ = self._extract(chunk)
            if rows.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"layer {self.layer_!r} now gives {rows.shape[1]}-d tokens, but the coder was fitted on "
                    f"{self.n_features_in_}-d tokens."
                )
            e, f = self._pool(self._codes(rows), index, len(chunk))
            energies.append(e)
            fireds.append(f)
            if emb is not None:
                embs.append(emb.astype(np.float32))
        return ConceptEnergies(np.concatenate(energies), np.concatenate(fireds), self.tokens_per_image_,
                               np.concatenate(embs) if embs else None)

    def fit_transform(self, images: Any, y: Any = None) -> ConceptEnergies:
        """``fit(images).transform(images)``."""
        return self.fit(images).transform(images)

    @property
    def names(self) -> list[str]:
        """Unit names (``names_['name']``)."""
        from sklearn.exceptions import NotFittedError

        if not hasattr(self, "names_"):
            raise NotFittedError("This ConceptCoder is not fitted yet; call fit(real_images) first.")
        return self.names_["name"].tolist()

    def describe(self) -> dict[str, Any]:
        """Settings for reports (JSON-friendly)."""
        return {
            "encoder": getattr(self.encoder, "name", None) or type(self.encoder).__name__,
            "layer": self.layer_,
            "tokens": self.tokens,
            "pooling": self.pooling,
            "sae": type(self.sae_).__name__ if hasattr(self, "sae_") else None,
            "n_concepts": int(getattr(self.sae_, "n_concepts", 0)) if hasattr(self, "sae_") else None,
            "top_k": getattr(getattr(self, "sae_", None), "top_k", None),
            "tokens_per_image": getattr(self, "tokens_per_image_", None),
        }

    def __repr__(self) -> str:
        enc = getattr(self.encoder, "name", None) or type(self.encoder).__name__
        return f"ConceptCoder({enc}, layer={self.layer!r}, tokens={self.tokens!r}, pooling={self.pooling!r})"

    def get_params(self, deep: bool = False) -> dict[str, Any]:
        """Constructor parameters (sklearn convention)."""
        import inspect

        return {p: getattr(self, p) for p in inspect.signature(type(self).__init__).parameters if p != "self"}
