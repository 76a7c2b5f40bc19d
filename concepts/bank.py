"""Concept banks: a frozen set of named concept directions in one feature space.

A :class:`ConceptBank` holds ``k`` concept vectors ``[k, d]`` with their names, optional per-concept
scores and JSON metadata (source model, layer, encoder, how it was made). Banks are built from text
(:meth:`ConceptBank.from_texts`, through any text encoder), from a sparse autoencoder's dictionary
(:meth:`ConceptBank.from_dictionary`) or from labelled features as concept activation vectors
(:meth:`ConceptBank.from_cavs`). They are stored as ``vectors.safetensors`` + ``bank.json`` in a folder;
loading never unpickles.

Banks are immutable: ``select``, ``concat``, ``rename`` and ``normalized`` return new banks, and the
constructor copies its inputs. (Torch has no read-only tensors, so do not write into ``bank.vectors``
in place; nothing in conceptkit does.)

Examples
--------
>>> import torch
>>> from concepts.bank import ConceptBank
>>> bank = ConceptBank(torch.eye(3), names=["red", "green", "blue"])
>>> bank.select(["red", "blue"]).names
('red', 'blue')
>>> bank.similarity(torch.tensor([[1.0, 1.0, 0.0]])).round(decimals=3)
tensor([[0.7070, 0.7070, 0.0000]])
"""
from __future__ import annotations

import difflib
import html
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["ConceptBank", "embed_texts", "format_template", "describe_templates"]

FORMAT = "conceptkit.ConceptBank"
VERSION = 1
VECTORS_FILE = "vectors.safetensors"
JSON_FILE = "bank.json"

Template = Union[str, Callable[[str], str]]
ArrayLike = Union[Tensor, np.ndarray]


# --------------------------------------------------------------------------------------------------
# text embedding through any encoder
# --------------------------------------------------------------------------------------------------
def _check_templates(templates: Template | Sequence[Template] | None) -> list[Template] | None:
    if templates is None:
        return None
    if isinstance(templates, str) or callable(templates):
        templates = [templates]
    if not isinstance(templates, Sequence) or isinstance(templates, (bytes, bytearray)):
        raise TypeError(
            f"templates must be a string with '{{}}', a callable str -> str, or a list of them; "
            f"got {type(templates).__name__}."
        )
    out = list(templates)
    if not out:
        raise ValueError("templates is an empty list; pass None for no templates or at least one template.")
    for t in out:
        if isinstance(t, str):
            if "{}" not in t:
                raise ValueError(
                    f"template {t!r} has no '{{}}' placeholder; write it like 'a photo of {{}}.' "
                    f"(the concept text replaces '{{}}')."
                )
        elif not callable(t):
            raise TypeError(
                f"each template must be a string with '{{}}' or a callable str -> str; got {type(t).__name__}."
            )
    return out


def format_template(template: Template, text: str) -> str:
    """Fill one prompt template with a concept text.

    Parameters
    ----------
    template
        A string with a ``{}`` placeholder (``"a photo of {}."``) or a callable ``str -> str`` (the form
        ``open_clip.zero_shot_metadata`` uses).
    text
        The concept text.

    Examples
    --------
    >>> format_template("a photo of {}.", "a red circle")
    'a photo of a red circle.'
    """
    if isinstance(template, str):
        return template.replace("{}", text)
    out = template(text)
    if not isinstance(out, str):
        raise TypeError(f"template callable returned {type(out).__name__}, expected str.")
    return out


def describe_templates(templates: Template | Sequence[Template] | None) -> list[str] | None:
    """JSON-friendly description of templates (callables are shown by filling them with ``'{}'``).

    Examples
    --------
    >>> describe_templates([lambda c: f"a photo of a {c}."])
    ['a photo of a {}.']
    """
    checked = _check_templates(templates)
    if checked is None:
        return None
    out = []
    for t in checked:
        if isinstance(t, str):
            out.append(t)
        else:
            try:
                out.append(str(t("{}")))
            except Exception:  # a template that cannot be shown: record what it is
                out.append(repr(t))
    return out


def _encode_batch(encoder: Any, texts: list[str], normalize: bool) -> Tensor:
    if hasattr(encoder, "encode_texts"):
        out = encoder.encode_texts(texts, normalize=normalize)
    elif hasattr(encoder, "encode_text"):
        raise TypeError(
            f"got a raw {type(encoder).__name__} model (it has encode_text but needs a tokenizer); wrap it as "
            "concepts.encoders.OpenCLIPEncoder(model, preprocess, tokenizer), or pass a callable texts -> Tensor."
        )
    elif callable(encoder):
        out = encoder(texts)
    else:
        raise TypeError(
            f"encoder must have an encode_texts(texts, normalize=...) method (see concepts.encoders) or be "
            f"a callable texts -> Tensor [n, d]; got {type(encoder).__name__}."
        )
    if isinstance(out, np.ndarray):
        out = torch.from_numpy(np.ascontiguousarray(out))
    if not isinstance(out, Tensor):
        raise TypeError(
            f"the text encoder returned {type(out).__name__}; expected a Tensor or array of shape [n, d]."
        )
    out = out.detach().to("cpu", torch.float32)
    if out.ndim != 2 or out.shape[0] != len(texts):
        raise ValueError(
            f"the text encoder returned shape {tuple(out.shape)} for {len(texts)} texts; expected [{len(texts)}, d]."
        )
    if not torch.isfinite(out).all():
        raise ValueError("the text encoder returned NaN or infinite values; check the encoder's weights and dtype.")
    if normalize:
        out = torch.nn.functional.normalize(out, dim=1)
    return out


def embed_texts(
    encoder: Any,
    texts: Sequence[str],
    *,
    templates: Template | Sequence[Template] | None = None,
    batch_size: int = 256,
    normalize: bool = True,
    progress: bool = False,
) -> Tensor:
    """Embed texts with a text encoder, optionally averaging over prompt templates.

    With templates, every text is filled into every template, each filled prompt is embedded and
    L2-normalised, and the per-template embeddings are averaged (the CLIP prompt-ensemble recipe); the
    mean is renormalised when ``normalize`` is true.

    Parameters
    ----------
    encoder
        An object with ``encode_texts(texts, normalize=True) -> [n, d]`` (the ``Encoder`` protocol of
        :mod:`concepts.encoders`) or any callable ``texts -> Tensor [n, d]``.
    texts
        The texts ``[n]``.
    templates
        None, a template string with ``{}``, a callable ``str -> str``, or a list of them.
    batch_size
        Texts per encoder call.
    normalize
        L2-normalise the output rows.
    progress
        Show a progress bar.

    Returns
    -------
    Tensor
        float32 on CPU, ``[n, d]``.

    Examples
    --------
    >>> import torch
    >>> table = {"red": [1.0, 0.0], "blue": [0.0, 2.0]}
    >>> embed_texts(lambda ts: torch.tensor([table[t] for t in ts]), ["red", "blue"])
    tensor([[1., 0.],
            [0., 1.]])
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings; got {type(texts).__name__}.")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty; pass at least one text to embed.")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must all be strings; got {type(bad[0]).__name__} ({bad[0]!r}).")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    checked = _check_templates(templates)
    prompt_sets = [texts] if checked is None else [[format_template(t, x) for x in texts] for t in checked]
    per_template_norm = normalize or checked is not None
    total = sum(math.ceil(len(p) / batch_size) for p in prompt_sets)
    acc = torch.zeros(0)
    with torch.no_grad(), tqdm(total=total, disable=not progress, desc="embedding texts") as bar:
        for prompts in prompt_sets:
            parts = []
            for i in range(0, len(prompts), batch_size):
                parts.append(_encode_batch(encoder, prompts[i:i + batch_size], per_template_norm))
                bar.update(1)
            emb = torch.cat(parts)
            if acc.numel() and emb.shape[1] != acc.shape[1]:
                raise ValueError(
                    f"the text encoder returned {emb.shape[1]} features for one template and {acc.shape[1]} "
                    "for another; it must embed every text in one space."
                )
            acc = emb if not acc.numel() else acc + emb
    out = acc / len(prompt_sets)
    if normalize:
        out = torch.nn.functional.normalize(out, dim=1)
    return out


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _as_matrix(x: Any, what: str) -> Tensor:
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.number) and x.dtype != np.bool_:
            raise TypeError(f"{what} must be numeric; got an array of dtype {x.dtype}.")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch Tensor or numpy array of shape [n, d]; got {type(x).__name__}.")
    x = x.detach()
    if x.is_complex():
        raise TypeError(f"{what} must be real-valued; got dtype {x.dtype}.")
    return x


def _json_safe(metadata: Mapping[str, Any] | None, what: str = "metadata") -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"{what} must be a dict of JSON-serialisable values; got {type(metadata).__name__}.")
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise TypeError(f"{what} keys must be strings; got {key!r}.")
        try:
            json.dumps(value, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"{what}[{key!r}] is not JSON-serialisable ({type(value).__name__}): {e}. Banks are saved as "
                "JSON; convert it to str/int/float/bool/list/dict first."
            ) from None
    return json.loads(json.dumps(dict(metadata)))


def _freeze(obj: Any) -> Any:
    if isinstance(obj, dict):
        return MappingProxyType({k: _freeze(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return tuple(_freeze(v) for v in obj)
    return obj


def _thaw(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_thaw(v) for v in obj]
    return obj


def _duplicates(names: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return {n: c for n, c in counts.items() if c > 1}


def _deduplicate(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    taken = set(names)
    out = []
    for n in names:
        if n not in seen:
            seen[n] = 1
            out.append(n)
            continue
        i = seen[n]
        while True:
            i += 1
            cand = f"{n} ({i})"
            if cand not in taken:
                break
        seen[n] = i
        taken.add(cand)
        out.append(cand)
    return out


def _describe(obj: Any) -> str:
    for attr in ("model_name", "name"):
        val = getattr(obj, attr, None)
        if isinstance(val, str):
            return val
    return type(obj).__name__


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


# --------------------------------------------------------------------------------------------------
# the bank
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class ConceptBank:
    """A frozen set of ``k`` named concept vectors in a ``d``-dimensional feature space.

    Parameters
    ----------
    vectors
        Concept directions ``[k, d]`` (Tensor or array; copied to float32 on CPU).
    names
        ``k`` unique names; default ``concept_0 ... concept_{k-1}``.
    scores
        Optional per-concept scores ``[k]`` (e.g. naming similarity, CAV separability); ``metadata``
        should say what they mean (key ``"scores"``).
    metadata
        JSON-serialisable dict: source model, layer, encoder, how the bank was made, ... Stored read-only
        (a mapping proxy; lists become tuples).

    Attributes
    ----------
    n_concepts, dim : int
        ``k`` and ``d``.

    Examples
    --------
    >>> import torch
    >>> bank = ConceptBank(torch.randn(4, 8), metadata={"how": "random"})
    >>> bank.names
    ('concept_0', 'concept_1', 'concept_2', 'concept_3')
    >>> bank.rename({"concept_0": "sky"}).names[0]
    'sky'
    """

    vectors: Tensor
    names: tuple[str, ...] | None = None
    scores: Tensor | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vectors = _as_matrix(self.vectors, "vectors")
        if vectors.ndim != 2:
            raise ValueError(
                f"vectors must have shape [k, d] (one row per concept); got shape {tuple(vectors.shape)}."
            )
        if vectors.shape[0] == 0 or vectors.shape[1] == 0:
            raise ValueError(f"a ConceptBank needs at least one concept of at least one dimension; got "
                             f"shape {tuple(vectors.shape)}.")
        vectors = vectors.to("cpu", torch.float32).clone().contiguous()
        if not torch.isfinite(vectors).all():
            bad = torch.nonzero(~torch.isfinite(vectors).all(dim=1)).flatten().tolist()
            raise ValueError(f"vectors contain NaN or infinite values (rows {bad[:10]}); clean them first.")
        k = vectors.shape[0]
        names = self.names
        if names is None:
            names = tuple(f"concept_{i}" for i in range(k))
        else:
            if isinstance(names, str) or not isinstance(names, Iterable):
                raise TypeError(f"names must be a list of {k} strings; got {type(names).__name__}.")
            names = tuple(names)
            bad_names = [n for n in names if not isinstance(n, str)]
            if bad_names:
                raise TypeError(f"names must be strings; got {type(bad_names[0]).__name__} ({bad_names[0]!r}).")
            if len(names) != k:
                raise ValueError(f"got {len(names)} names for {k} concept vectors; pass one name per row of vectors.")
            dup = _duplicates(names)
            if dup:
                shown = ", ".join(f"{n!r} x{c}" for n, c in list(dup.items())[:5])
                raise ValueError(
                    f"concept names must be unique; repeated: {shown}. Rename them, or use "
                    "bank.rename(names, deduplicate=True) to suffix repeats ('red', 'red (2)')."
                )
        scores = self.scores
        if scores is not None:
            if isinstance(scores, (Tensor, np.ndarray)):
                scores = _as_matrix(scores, "scores")
            else:
                try:
                    scores = torch.as_tensor(list(scores), dtype=torch.float32)
                except (TypeError, ValueError):
                    raise TypeError(
                        f"scores must be a 1-D Tensor, array or list of {k} numbers; got {type(scores).__name__}."
                    ) from None
            scores = scores.to("cpu", torch.float32).clone()
            if scores.ndim != 1 or scores.numel() != k:
                raise ValueError(
                    f"scores must have shape [{k}] (one score per concept); got shape {tuple(scores.shape)}."
                )
        meta = _json_safe(self.metadata)
        object.__setattr__(self, "vectors", vectors)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "metadata", _freeze(meta))

    # ------------------------------------------------------------------ basics
    @property
    def n_concepts(self) -> int:
        """Number of concepts ``k``."""
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension ``d``."""
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return self.n_concepts

    def __contains__(self, name: object) -> bool:
        return name in self.names  # type: ignore[operator]

    def __repr__(self) -> str:
        shown = list(self.names[:4]) + (["..."] if self.n_concepts > 4 else [])  # type: ignore[index]
        how = self.metadata.get("how")
        extra = f", how={how!r}" if how else ""
        return f"ConceptBank(n_concepts={self.n_concepts}, dim={self.dim}, names={shown}{extra})"

    def __reduce__(self):
        # in-memory pickling/deepcopy (multiprocessing, copy.deepcopy); files never use pickle (see save)
        return (type(self), (self.vectors, self.names, self.scores, self._meta_dict()))

    def _meta_dict(self) -> dict[str, Any]:
        return _thaw(self.metadata)

    def index(self, names: str | Sequence[str]) -> int | list[int]:
        """Row index of a name (or a list of names).

        Raises
        ------
        KeyError
            For an unknown name, listing the closest names in the bank.

        Examples
        --------
        >>> import torch
        >>> ConceptBank(torch.eye(2), names=["a", "b"]).index("b")
        1
        """
        lookup = {n: i for i, n in enumerate(self.names)}  # type: ignore[arg-type]

        def one(n: str) -> int:
            if n not in lookup:
                close = difflib.get_close_matches(n, list(lookup), n=3)
                hint = f" Closest names: {close}." if close else ""
                raise KeyError(f"{n!r} is not a concept of this bank ({self.n_concepts} concepts).{hint}")
            return lookup[n]

        if isinstance(names, str):
            return one(names)
        return [one(n) for n in names]

    def _indices(self, items: Any) -> list[int]:
        k = self.n_concepts
        if isinstance(items, (int, np.integer)) and not isinstance(items, bool):
            items = [int(items)]
        elif isinstance(items, str):
            items = [items]
        elif isinstance(items, slice):
            return list(range(k))[items]
        if isinstance(items, Tensor):
            items = items.detach().cpu().numpy()
        arr = np.asarray(list(items) if not isinstance(items, np.ndarray) else items)
        if arr.dtype == np.bool_:
            if arr.shape != (k,):
                raise ValueError(f"a boolean mask must have one entry per concept ({k}); got shape {arr.shape}.")
            return np.flatnonzero(arr).tolist()
        if arr.size == 0:
            return []
        if arr.dtype.kind in "US" or arr.dtype == object:
            out = []
            for it in arr.tolist():
                if isinstance(it, str):
                    out.append(self.index(it))
                elif isinstance(it, (int, np.integer)):
                    out.append(int(it))
                else:
                    raise TypeError(f"select takes names, integer indices or a boolean mask; got {it!r}.")
            idx = out
        elif arr.dtype.kind in "iu":
            idx = arr.astype(int).tolist()
        else:
            raise TypeError(f"select takes names, integer indices or a boolean mask; got dtype {arr.dtype}.")
        for i in idx:
            if not -k <= i < k:
                raise IndexError(f"concept index {i} is out of range for a bank of {k} concepts.")
        return [i % k for i in idx]

    # ------------------------------------------------------------------ new banks
    def select(self, items: Any) -> ConceptBank:
        """A new bank with the chosen concepts, in the given order.

        Parameters
        ----------
        items
            A name, an index, a slice, a list of names or indices, or a boolean mask ``[k]``.

        Examples
        --------
        >>> import torch
        >>> bank = ConceptBank(torch.eye(3), names=["a", "b", "c"])
        >>> bank.select([2, 0]).names
        ('c', 'a')
        """
        idx = self._indices(items)
        if not idx:
            raise ValueError("the selection is empty; a ConceptBank needs at least one concept.")
        sel = torch.as_tensor(idx, dtype=torch.long)
        return ConceptBank(
            self.vectors[sel],
            names=[self.names[i] for i in idx],  # type: ignore[index]
            scores=None if self.scores is None else self.scores[sel],
            metadata=self._meta_dict(),
        )

    def concat(self, *others: ConceptBank, deduplicate: bool = False) -> ConceptBank:
        """A new bank with this bank's concepts followed by the others'.

        Metadata is kept when all banks share it; otherwise it becomes
        ``{"how": "concat", "sources": [metadata of each bank]}``. Missing scores become NaN.

        Parameters
        ----------
        *others
            Banks of the same dimension.
        deduplicate
            Suffix repeated names (``'red (2)'``) instead of raising.

        Examples
        --------
        >>> import torch
        >>> a = ConceptBank(torch.eye(2), names=["a", "b"])
        >>> ConceptBank.concat(a, ConceptBank(torch.ones(1, 2), names=["c"])).names
        ('a', 'b', 'c')
        """
        banks = [self, *others]
        for i, b in enumerate(banks):
            if not isinstance(b, ConceptBank):
                raise TypeError(f"concat takes ConceptBanks; argument {i} is a {type(b).__name__}.")
            if b.dim != self.dim:
                raise ValueError(
                    f"bank {i} has {b.dim}-dimensional vectors, but the first bank has {self.dim}; "
                    "only banks in the same feature space can be concatenated."
                )
        names = [n for b in banks for n in b.names]  # type: ignore[union-attr]
        if deduplicate:
            names = _deduplicate(names)
        if all(b.scores is None for b in banks):
            scores = None
        else:
            scores = torch.cat([
                b.scores if b.scores is not None else torch.full((b.n_concepts,), float("nan")) for b in banks
            ])
        metas = [b._meta_dict() for b in banks]
        meta = metas[0] if all(m == metas[0] for m in metas) else {"how": "concat", "sources": metas}
        return ConceptBank(torch.cat([b.vectors for b in banks]), names=names, scores=scores, metadata=meta)

    def rename(
        self,
        names: Sequence[str] | Mapping[str, str] | Callable[[str], str],
        *,
        deduplicate: bool = False,
    ) -> ConceptBank:
        """A new bank with new names.

        Parameters
        ----------
        names
            ``k`` new names in order, a mapping ``{old: new}`` (others keep their names), or a callable
            ``old -> new``.
        deduplicate
            Suffix repeated names (``'red'``, ``'red (2)'``) instead of raising; useful with automatic
            names, where several concepts often share a top name.

        Examples
        --------
        >>> import torch
        >>> bank = ConceptBank(torch.eye(2))
        >>> bank.rename(["sky", "sky"], deduplicate=True).names
        ('sky', 'sky (2)')
        """
        old = list(self.names)  # type: ignore[arg-type]
        if isinstance(names, Mapping):
            unknown = [n for n in names if n not in set(old)]
            if unknown:
                close = difflib.get_close_matches(str(unknown[0]), old, n=3)
                raise KeyError(
                    f"cannot rename {unknown[0]!r}: not a concept of this bank."
                    + (f" Closest names: {close}." if close else "")
                )
            new = [names.get(n, n) for n in old]
        elif callable(names):
            new = [names(n) for n in old]
        elif isinstance(names, str):
            raise TypeError("names must be a list of strings, a mapping or a callable; got a single string.")
        else:
            new = list(names)
            if len(new) != len(old):
                raise ValueError(f"got {len(new)} names for a bank of {len(old)} concepts; pass one per concept.")
        bad = [n for n in new if not isinstance(n, str)]
        if bad:
            raise TypeError(f"new names must be strings; got {type(bad[0]).__name__} ({bad[0]!r}).")
        if deduplicate:
            new = _deduplicate(new)
        return ConceptBank(self.vectors, names=new, scores=self.scores, metadata=self._meta_dict())

    def normalized(self) -> ConceptBank:
        """A new bank with unit-norm rows (zero rows stay zero).

        Examples
        --------
        >>> import torch
        >>> ConceptBank(torch.tensor([[3.0, 4.0]])).normalized().vectors
        tensor([[0.6000, 0.8000]])
        """
        meta = self._meta_dict()
        meta["normalized"] = True
        return ConceptBank(torch.nn.functional.normalize(self.vectors, dim=1), names=self.names,
                           scores=self.scores, metadata=meta)

    # ------------------------------------------------------------------ use
    def similarity(self, X: ArrayLike) -> Tensor:
        """Cosine similarity of inputs to every concept.

        Parameters
        ----------
        X
            Features ``[n, d]`` (or one vector ``[d]``), Tensor or array, any device.

        Returns
        -------
        Tensor
            ``[n, k]`` float32 on the device of ``X`` (zero vectors give similarity 0).

        Examples
        --------
        >>> import torch
        >>> ConceptBank(torch.eye(2), names=["x", "y"]).similarity(torch.tensor([[0.0, 5.0]]))
        tensor([[0., 1.]])
        """
        X = _as_matrix(X, "X")
        if X.ndim == 1:
            X = X[None]
        if X.ndim != 2:
            raise ValueError(f"X must have shape [n, d]; got shape {tuple(X.shape)}.")
        if X.shape[1] != self.dim:
            raise ValueError(
                f"X has {X.shape[1]} features, but this ConceptBank has {self.dim}-dimensional concept vectors; "
                "pass features from the same model and layer the bank was built for."
            )
        Xn = torch.nn.functional.normalize(X.float(), dim=1)
        V = torch.nn.functional.normalize(self.vectors, dim=1).to(Xn.device)
        return Xn @ V.T

    def to_frame(self) -> pd.DataFrame:
        """One row per concept: ``name``, ``norm`` and ``score`` (if any), indexed by concept number.

        Examples
        --------
        >>> import torch
        >>> ConceptBank(torch.eye(2), names=["a", "b"], scores=[0.5, 0.25]).to_frame()["score"].tolist()
        [0.5, 0.25]
        """
        df = pd.DataFrame({"name": list(self.names), "norm": self.vectors.norm(dim=1).numpy()})  # type: ignore[arg-type]
        if self.scores is not None:
            df["score"] = self.scores.numpy().astype(np.float64)
        df.index.name = "concept"
        return df

    def _repr_html_(self, max_rows: int = 20) -> str:
        head = (f"<b>ConceptBank</b>: {self.n_concepts} concepts &times; {self.dim} dimensions")
        meta_rows = []
        for key, value in self._meta_dict().items():
            text = json.dumps(value) if not isinstance(value, str) else value
            if len(text) > 120:
                text = text[:117] + "..."
            meta_rows.append(f"<tr><th style='text-align:left'>{html.escape(key)}</th>"
                             f"<td style='text-align:left'>{html.escape(text)}</td></tr>")
        meta = f"<table>{''.join(meta_rows)}</table>" if meta_rows else ""
        frame = self.to_frame()
        more = ""
        if len(frame) > max_rows:
            more = f"<p>... {len(frame) - max_rows} more concepts</p>"
            frame = frame.head(max_rows)
        return f"<div>{head}{meta}{frame.to_html(escape=True, float_format=lambda v: f'{v:.4g}')}{more}</div>"

    # ------------------------------------------------------------------ io
    def save(self, path: str | Path) -> Path:
        """Save to a folder as ``vectors.safetensors`` (vectors, scores) + ``bank.json`` (names, metadata).

        Returns
        -------
        Path
            The folder.

        Examples
        --------
        >>> import torch, tempfile
        >>> folder = ConceptBank(torch.eye(2)).save(tempfile.mkdtemp() + "/bank")
        >>> ConceptBank.load(folder).names
        ('concept_0', 'concept_1')
        """
        from safetensors.torch import save_file

        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder; a ConceptBank is saved as a folder.")
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"vectors": self.vectors.contiguous()}
        if self.scores is not None:
            tensors["scores"] = self.scores.contiguous()
        save_file(tensors, str(folder / VECTORS_FILE), metadata={"format": FORMAT})
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "n_concepts": self.n_concepts,
            "dim": self.dim,
            "names": list(self.names),  # type: ignore[arg-type]
            "has_scores": self.scores is not None,
            "metadata": self._meta_dict(),
        }
        (folder / JSON_FILE).write_text(json.dumps(doc, indent=1))
        return folder

    @classmethod
    def load(cls, path: str | Path) -> ConceptBank:
        """Load a bank saved by :meth:`save` (a folder, or the path of one of its two files).

        Raises
        ------
        FileNotFoundError
            When the folder or one of its files is missing.
        ValueError
            For a corrupt or mismatched file; the message names the file and the field.

        Examples
        --------
        >>> import torch, tempfile
        >>> folder = ConceptBank(torch.eye(2), names=["a", "b"]).save(tempfile.mkdtemp())
        >>> ConceptBank.load(folder / "bank.json").names
        ('a', 'b')
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(path)
        if folder.is_file() and folder.name in (JSON_FILE, VECTORS_FILE):
            folder = folder.parent
        if not folder.is_dir():
            raise FileNotFoundError(f"no ConceptBank folder at {folder}; expected a folder written by ConceptBank.save.")
        jfile, vfile = folder / JSON_FILE, folder / VECTORS_FILE
        for f in (jfile, vfile):
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing; a saved ConceptBank has {JSON_FILE} and {VECTORS_FILE}.")
        try:
            doc = json.loads(jfile.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{jfile}: not valid JSON ({e}); the file is corrupt, save the bank again.") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{jfile}: expected a JSON object at the top level, got {type(doc).__name__}.")

        def field_(name: str, kind: type | tuple[type, ...]) -> Any:
            if name not in doc:
                raise ValueError(f"{jfile}: field {name!r} is missing; the file is not a complete ConceptBank.")
            val = doc[name]
            if not isinstance(val, kind) or (kind is int and isinstance(val, bool)):
                kname = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
                raise ValueError(f"{jfile}: field {name!r} must be {kname}; got {type(val).__name__} ({val!r:.60}).")
            return val

        fmt = field_("format", str)
        if fmt != FORMAT:
            raise ValueError(f"{jfile}: field 'format' is {fmt!r}, expected {FORMAT!r}; this is not a ConceptBank.")
        version = field_("version", int)
        if version > VERSION:
            raise ValueError(
                f"{jfile}: field 'version' is {version}, but this conceptkit reads ConceptBank version <= {VERSION}; "
                "upgrade conceptkit."
            )
        k = field_("n_concepts", int)
        d = field_("dim", int)
        names = field_("names", list)
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"{jfile}: field 'names' must be a list of strings.")
        if len(names) != k:
            raise ValueError(f"{jfile}: field 'names' has {len(names)} entries but field 'n_concepts' is {k}.")
        has_scores = field_("has_scores", bool)
        meta = field_("metadata", dict)
        try:
            tensors = load_file(str(vfile))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{vfile}: cannot read the safetensors file ({e}); the file is corrupt.") from None
        if "vectors" not in tensors:
            raise ValueError(f"{vfile}: tensor 'vectors' is missing (found {sorted(tensors)}).")
        vec = tensors["vectors"]
        if tuple(vec.shape) != (k, d):
            raise ValueError(
                f"{vfile}: tensor 'vectors' has shape {tuple(vec.shape)}, but {jfile.name} says "
                f"n_concepts={k}, dim={d}; the two files do not belong together."
            )
        scores = tensors.get("scores")
        if has_scores and scores is None:
            raise ValueError(f"{vfile}: tensor 'scores' is missing, but {jfile.name} field 'has_scores' is true.")
        if scores is not None and tuple(scores.shape) != (k,):
            raise ValueError(f"{vfile}: tensor 'scores' has shape {tuple(scores.shape)}, expected ({k},).")
        try:
            return cls(vec, names=names, scores=scores if has_scores else None, metadata=meta)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{folder}: the saved bank is invalid: {e}") from None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_texts(
        cls,
        encoder: Any,
        texts: Sequence[str],
        templates: Template | Sequence[Template] | None = None,
        *,
        names: Sequence[str] | None = None,
        batch_size: int = 256,
        normalize: bool = True,
        progress: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> ConceptBank:
        """A bank of text embeddings (one concept per text).

        Parameters
        ----------
        encoder
            ``encode_texts(texts, normalize=True) -> [n, d]`` (the ``Encoder`` protocol) or a callable
            ``texts -> Tensor [n, d]``.
        texts
            Concept texts ``[k]``.
        templates
            Optional prompt templates (``"a photo of {}."`` or callables); embeddings are averaged over
            them (see :func:`embed_texts`).
        names
            Concept names (default: the texts). Use this when the texts are phrases for short names.
        batch_size, normalize, progress
            See :func:`embed_texts`.
        metadata
            Extra metadata merged over ``{"how": "texts", "encoder": ..., "templates": ...}``.

        Examples
        --------
        >>> import torch
        >>> enc = lambda ts: torch.tensor([[float(len(t)), 1.0] for t in ts])
        >>> ConceptBank.from_texts(enc, ["red", "a red circle"]).names
        ('red', 'a red circle')
        """
        emb = embed_texts(encoder, texts, templates=templates, batch_size=batch_size, normalize=normalize,
                          progress=progress)
        meta: dict[str, Any] = {
            "how": "texts",
            "encoder": _describe(encoder),
            "templates": describe_templates(templates),
            "normalized": bool(normalize),
        }
        if names is not None:
            meta["texts"] = list(texts)
        meta.update(_json_safe(metadata))
        return cls(emb, names=list(texts) if names is None else names, metadata=meta)

    @classmethod
    def from_dictionary(
        cls,
        sae: Any,
        names: Sequence[str] | None = None,
        *,
        normalize: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> ConceptBank:
        """A bank of dictionary atoms: the rows of ``sae.dictionary_`` ``[n_concepts, d_in]``.

        Parameters
        ----------
        sae
            A fitted estimator with ``dictionary_`` (the sae package's SAEs), or the dictionary itself as a
            Tensor/array ``[n_concepts, d_in]``.
        names
            Concept names (default ``concept_0`` ...).
        normalize
            Unit-normalise the atoms (Discover-then-Name normalises decoder columns before naming; the
            cosine-based operations of the bank do not need it).
        metadata
            Extra metadata merged over ``{"how": "dictionary", "sae": class, "params": get_params()}``.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            For an estimator that has no ``dictionary_`` yet.

        Examples
        --------
        >>> import torch
        >>> ConceptBank.from_dictionary(torch.eye(3)).metadata["how"]
        'dictionary'
        """
        meta: dict[str, Any] = {"how": "dictionary"}
        if isinstance(sae, (Tensor, np.ndarray)):
            D = _as_matrix(sae, "dictionary")
            meta["sae"] = None
        else:
            if not hasattr(sae, "dictionary_"):
                if hasattr(sae, "fit"):
                    from sklearn.exceptions import NotFittedError

                    raise NotFittedError(
                        f"This {type(sae).__name__} instance is not fitted yet (it has no dictionary_); call "
                        "fit(X) before ConceptBank.from_dictionary."
                    )
                raise TypeError(
                    "from_dictionary takes a fitted SAE (with a dictionary_ attribute) or a Tensor/array "
                    f"[n_concepts, d_in]; got {type(sae).__name__}."
                )
            D = _as_matrix(sae.dictionary_, "sae.dictionary_")
            meta["sae"] = type(sae).__name__
            if hasattr(sae, "get_params"):
                params = {}
                for key, value in sae.get_params(deep=False).items():
                    if value is None or isinstance(value, (str, int, float, bool)):
                        params[key] = value
                meta["params"] = params
            for attr in ("metadata_", "source_"):
                extra = getattr(sae, attr, None)
                if isinstance(extra, Mapping):
                    try:
                        meta["source"] = _json_safe(extra, f"sae.{attr}")
                    except TypeError:
                        logger.debug("sae.%s is not JSON-serialisable; not recorded", attr)
                    break
        if D.ndim != 2:
            raise ValueError(f"the dictionary must have shape [n_concepts, d_in]; got shape {tuple(D.shape)}.")
        D = D.to("cpu", torch.float32)
        if normalize:
            D = torch.nn.functional.normalize(D, dim=1)
        meta["normalized"] = bool(normalize)
        meta.update(_json_safe(metadata))
        return cls(D, names=names, metadata=meta)

    @classmethod
    def from_cavs(
        cls,
        X: ArrayLike,
        concept_labels: pd.DataFrame,
        *,
        method: str = "logistic",
        C: float = 1.0,
        normalize: bool = True,
        max_iter: int = 1000,
        progress: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> ConceptBank:
        """Concept activation vectors: one linear direction per labelled concept.

        Parameters
        ----------
        X
            Features ``[n, d]``.
        concept_labels
            DataFrame ``[n, k]`` of booleans (or 0/1), one column per concept (e.g. ``batch.concepts`` of
            ConceptWorld). Every column needs positives and negatives.
        method
            ``"logistic"``: the weight vector of an L2-regularised logistic regression of the concept on
            ``X`` (TCAV); ``X`` is centred and divided by one global scale first, so the direction lives in
            the original space and ``C`` does not depend on the feature scale. ``"mean_difference"``: mean
            of the positives minus mean of the negatives.
        C
            Inverse regularisation strength for ``"logistic"``.
        normalize
            Unit-normalise the directions.
        max_iter
            Solver iterations for ``"logistic"``.
        progress
            Show a progress bar over concepts.
        metadata
            Extra metadata merged over the recorded recipe.

        Returns
        -------
        ConceptBank
            Names are the columns; ``scores`` are the in-sample ROC AUC of ``X @ v`` for each concept
            (how linearly visible it is; 0.5 is chance).

        Examples
        --------
        >>> import numpy as np, pandas as pd
        >>> X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> labels = pd.DataFrame({"a": [True, True, False, False]})
        >>> ConceptBank.from_cavs(X, labels, method="mean_difference").vectors.round(decimals=3)
        tensor([[ 0.7070, -0.7070]])
        """
        Xt = _as_matrix(X, "X")
        if Xt.ndim != 2:
            raise ValueError(f"X must have shape [n, d]; got shape {tuple(Xt.shape)}.")
        Xn = Xt.to("cpu", torch.float64).numpy()
        if not isinstance(concept_labels, pd.DataFrame):
            raise TypeError(
                f"concept_labels must be a pandas DataFrame with one boolean column per concept; got "
                f"{type(concept_labels).__name__}. Wrap an array as pd.DataFrame(labels, columns=names)."
            )
        if len(concept_labels) != Xn.shape[0]:
            raise ValueError(
                f"X has {Xn.shape[0]} rows but concept_labels has {len(concept_labels)}; pass one label row per sample."
            )
        if concept_labels.shape[1] == 0:
            raise ValueError("concept_labels has no columns; pass one boolean column per concept.")
        if method not in ("logistic", "mean_difference"):
            raise ValueError(f"method must be 'logistic' or 'mean_difference'; got {method!r}.")
        if not np.isfinite(Xn).all():
            raise ValueError("X contains NaN or infinite values; clean the features first.")
        names = [str(c) for c in concept_labels.columns]
        labels = {}
        for col, name in zip(concept_labels.columns, names):
            vals = concept_labels[col].to_numpy()
            if vals.dtype == np.bool_:
                y = vals
            else:
                uniq = set(pd.unique(vals).tolist())
                if not uniq <= {0, 1, True, False}:
                    raise ValueError(
                        f"concept_labels column {name!r} must be boolean or 0/1; got values {sorted(map(str, uniq))[:5]}."
                    )
                y = vals.astype(bool)
            n_pos = int(y.sum())
            if n_pos == 0 or n_pos == len(y):
                raise ValueError(
                    f"concept {name!r} has {n_pos} positives out of {len(y)} samples; a CAV needs both positives "
                    "and negatives. Drop the column or sample more data."
                )
            labels[name] = y
        mu = Xn.mean(axis=0)
        scale = float(np.sqrt(((Xn - mu) ** 2).sum(axis=1).mean())) or 1.0
        Z = (Xn - mu) / scale
        vecs, scores = [], []
        for name in tqdm(names, disable=not progress, desc="CAVs"):
            y = labels[name]
            if method == "mean_difference":
                v = Xn[y].mean(axis=0) - Xn[~y].mean(axis=0)
            else:
                from sklearn.linear_model import LogisticRegression

                clf = LogisticRegression(C=C, max_iter=max_iter)
                clf.fit(Z, y)
                v = clf.coef_[0].astype(np.float64)
            scores.append(_auc(Z @ v, y))
            vecs.append(v)
        V = torch.as_tensor(np.stack(vecs), dtype=torch.float32)
        if normalize:
            V = torch.nn.functional.normalize(V, dim=1)
        meta: dict[str, Any] = {
            "how": "cavs",
            "method": method,
            "n_samples": int(Xn.shape[0]),
            "n_positive": [int(labels[n].sum()) for n in names],
            "normalized": bool(normalize),
            "scores": "in-sample ROC AUC of X @ v",
        }
        if method == "logistic":
            meta["C"] = float(C)
        meta.update(_json_safe(metadata))
        return cls(V, names=names, scores=torch.as_tensor(scores), metadata=meta)
