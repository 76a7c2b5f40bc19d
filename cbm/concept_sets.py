"""Turning a concept-set argument into the text :class:`~concepts.bank.ConceptBank` a head reasons with.

Heads that score images against concept texts (:class:`~cbm.linear.LabelFreeCBM`,
:class:`~cbm.sparse.SparseCBM`, :class:`~cbm.cms.ConceptMatrixSearch`) take a ``bank`` argument that is
either an embedded ConceptBank (used as is, no encoder needed) or anything
:func:`concepts.vocabularies.get_vocabulary` understands (``"conceptworld"``, ``"english"``, a list of
strings, a text or JSON file), embedded with the head's ``encoder``. A vocabulary's *names* become the
concept names and its *phrases* are what is embedded (``'count=2'`` is embedded as ``'two shapes'``).

Examples
--------
>>> import torch
>>> enc = lambda texts: torch.tensor([[1.0, float(len(t))] for t in texts])
>>> text_bank(["red", "blue"], enc).names
('red', 'blue')
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from concepts.bank import ConceptBank, Template
from concepts.vocabularies import get_vocabulary

__all__ = ["text_bank", "class_bank", "class_texts", "describe_rules"]


def _text_encoder(encoder: Any, what: str) -> Any:
    if encoder is None:
        raise ValueError(
            f"{what} needs a text encoder to embed its texts: pass encoder=OpenCLIPEncoder(model, preprocess, "
            "tokenizer) (or any object with encode_texts), or pass an already embedded ConceptBank."
        )
    if not (hasattr(encoder, "encode_texts") or callable(encoder)):
        raise TypeError(
            f"encoder must have encode_texts(texts, normalize=...) or be a callable texts -> Tensor; got "
            f"{type(encoder).__name__}."
        )
    return encoder


def text_bank(
    spec: Any,
    encoder: Any,
    *,
    templates: Template | Sequence[Template] | None = None,
    what: str = "bank",
) -> ConceptBank:
    """Resolve a concept-set argument to an embedded ConceptBank.

    Parameters
    ----------
    spec
        A :class:`~concepts.bank.ConceptBank` (returned unchanged), or a vocabulary spec:
        ``"conceptworld"``, ``"english"``, a list of concept texts, a file, a ``ConceptVocabulary``.
    encoder
        Text encoder (``encode_texts``) used when ``spec`` is not a bank.
    templates
        Prompt templates averaged per concept (e.g. ``"a photo of {}."``).
    what
        Argument name for error messages.

    Returns
    -------
    ConceptBank
        Names = vocabulary names; vectors = unit-norm text embeddings of the phrases.
    """
    if isinstance(spec, ConceptBank):
        return spec
    if spec is None:
        raise ValueError(f"{what} is None; pass a ConceptBank, 'conceptworld', 'english' or a list of concept texts.")
    vocab = get_vocabulary(spec)
    enc = _text_encoder(encoder, what)
    return ConceptBank.from_texts(
        enc, list(vocab.phrases), templates, names=list(vocab.names),  # type: ignore[arg-type]
        metadata={"vocabulary": vocab.source},
    )


def class_bank(
    class_names: Sequence[str],
    encoder: Any,
    *,
    templates: Template | Sequence[Template] | None = None,
    what: str = "class_names",
) -> ConceptBank:
    """Embedded class prompts, one per class name (``templates`` e.g. ``"a photo of {}."``).

    Examples
    --------
    >>> import torch
    >>> enc = lambda texts: torch.tensor([[1.0, float(len(t))] for t in texts])
    >>> class_bank(["cat", "dog"], enc, templates="a photo of a {}.").metadata["templates"]
    ('a photo of a {}.',)
    """
    enc = _text_encoder(encoder, what)
    names = [str(c) for c in class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"{what} must be unique; got repeats in {names}.")
    return ConceptBank.from_texts(enc, names, templates, metadata={"kind": "class prompts"})


def class_texts(classes: Any, class_names: Any) -> list[str]:
    """The text of each fitted class: ``class_names`` indexed by label (sequence or mapping), or the labels.

    Parameters
    ----------
    classes
        The fitted classes (``classes_``), in order.
    class_names
        None (labels are the texts), a mapping ``{label: text}``, or a sequence indexed by integer label
        (ConceptWorld's ``batch.class_names``).

    Examples
    --------
    >>> class_texts([0, 2], ["cat", "dog", "bird"])
    ['cat', 'bird']
    >>> class_texts(["cat", "dog"], None)
    ['cat', 'dog']
    """
    from collections.abc import Mapping

    import numpy as np

    labels = list(classes)
    if class_names is None:
        return [str(c) for c in labels]
    if isinstance(class_names, Mapping):
        missing = [c for c in labels if c not in class_names]
        if missing:
            raise ValueError(f"class_names has no text for classes {missing[:5]}; give one per class label.")
        return [str(class_names[c]) for c in labels]
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise TypeError(
            f"class_names must be a list indexed by class label, a dict {{label: text}} or None; got "
            f"{type(class_names).__name__}."
        )
    out = []
    for c in labels:
        if not isinstance(c, (int, np.integer)) or isinstance(c, (bool, np.bool_)):
            raise ValueError(
                f"class_names is a list, so the class labels must be integers indexing it; got label {c!r}. Pass "
                "a dict {label: text} instead."
            )
        if not 0 <= int(c) < len(class_names):
            raise ValueError(f"class label {c} is out of range for class_names of length {len(class_names)}.")
        out.append(str(class_names[int(c)]))
    return out


def describe_rules(rules: Sequence[Any], fallback: str | None = "other", vocabulary: Any = None) -> list[str]:
    """Plain-language class descriptions of ConceptWorld class rules, in the caption language of its CLIP.

    ``all_of`` concepts are joined with "and", ``any_of`` with "or", ``none_of`` become "no ..."; each
    concept is written as its :func:`~concepts.vocabularies.conceptworld_vocabulary` phrase. The fallback
    class (when given) keeps its name. Use the result as ``class_names`` of text-based heads
    (:class:`~cbm.zeroshot.ZeroShotClassifier`, :class:`~cbm.cms.ConceptMatrixSearch`).

    Examples
    --------
    >>> from concepts.world import DEFAULT_RULES
    >>> describe_rules(DEFAULT_RULES)[:2]
    ['a red shape and three shapes or four shapes', 'a star and shapes on stripes']
    """
    from concepts.vocabularies import conceptworld_vocabulary

    v = conceptworld_vocabulary(vocabulary)
    out = []
    for rule in rules:
        parts = [v.phrase(c) for c in rule.all_of]
        if rule.any_of:
            parts.append(" or ".join(v.phrase(c) for c in rule.any_of))
        parts += [f"no {v.phrase(c)}" for c in rule.none_of]
        out.append(" and ".join(parts) if parts else rule.name)
    if fallback is not None:
        out.append(fallback)
    return out
