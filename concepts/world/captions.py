"""Plain-English captions for ConceptWorld images.

A caption lists the objects grouped by (size, colour, shape) in reading order of their first appearance,
then the background: ``"two small red circles and a large blue star on stripes"``.
"""
from __future__ import annotations

from collections.abc import Sequence

from .vocabulary import BACKGROUND_PHRASES, NUMBER_WORDS, PLURALS


def object_phrase(count: int, size: str | None, colour: str | None, shape: str | None) -> str:
    """Noun phrase for ``count`` identical objects; any attribute may be omitted (``None``).

    Examples
    --------
    >>> object_phrase(2, "small", "red", "circle")
    'two small red circles'
    >>> object_phrase(1, None, "blue", None)
    'a blue shape'
    """
    words = [NUMBER_WORDS.get(count, str(count))]
    if size:
        words.append(size)
    if colour:
        words.append(colour)
    noun = shape or "shape"
    words.append(PLURALS.get(noun, noun + "s") if count > 1 else noun)
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def join_phrases(phrases: Sequence[str]) -> str:
    """``['a', 'b', 'c'] -> 'a, b and c'``."""
    phrases = list(phrases)
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(objects: Sequence[tuple[str, str, str]], background: str) -> str:
    """Caption for one image.

    Parameters
    ----------
    objects
        ``(size, colour, shape)`` per object, in reading order.
    background
        Background texture name.

    Examples
    --------
    >>> caption([("small", "red", "circle"), ("large", "blue", "star"), ("small", "red", "circle")], "stripes")
    'two small red circles and a large blue star on stripes'
    """
    groups: dict[tuple[str, str, str], int] = {}
    for obj in objects:
        groups[tuple(obj)] = groups.get(tuple(obj), 0) + 1
    phrases = [object_phrase(n, *key) for key, n in groups.items()]
    return f"{join_phrases(phrases)} {BACKGROUND_PHRASES.get(background, 'on ' + background)}"
