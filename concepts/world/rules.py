"""Class rules: how ConceptWorld turns concept labels into a class label.

A rule is a conjunction over concept columns: all of ``all_of`` present, at least one of ``any_of``
present (when given), none of ``none_of`` present. Rules form a *decision list*: an image gets the class of
the first rule it matches, or the fallback class when none matches. The default list has 9 classes, several
of which depend on conjunctions (e.g. "a red shape and at least three objects").
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Rule:
    """One class of the decision list.

    Parameters
    ----------
    name
        Class name.
    all_of
        Concepts that must all be present.
    any_of
        When non-empty, at least one of these must be present.
    none_of
        Concepts that must all be absent.

    Examples
    --------
    >>> import pandas as pd
    >>> r = Rule("red crowd", all_of=("red",), any_of=("count=3", "count=4"))
    >>> df = pd.DataFrame({"red": [True, True], "count=3": [True, False], "count=4": [False, False]})
    >>> r.matches(df).tolist()
    [True, False]
    """

    name: str
    all_of: tuple[str, ...] = ()
    any_of: tuple[str, ...] = ()
    none_of: tuple[str, ...] = ()

    @property
    def concepts(self) -> tuple[str, ...]:
        """Every concept the rule reads, in order, without repeats."""
        return tuple(dict.fromkeys(self.all_of + self.any_of + self.none_of))

    def matches(self, concepts: pd.DataFrame) -> np.ndarray:
        """Boolean array ``[n]``: which rows of a concept table satisfy the rule."""
        missing = [c for c in self.concepts if c not in concepts.columns]
        if missing:
            raise KeyError(
                f"rule {self.name!r} reads concepts {missing} that the concept table does not have; "
                f"expected columns such as {list(concepts.columns[:5])}."
            )
        ok = np.ones(len(concepts), dtype=bool)
        for c in self.all_of:
            ok &= concepts[c].to_numpy(dtype=bool)
        if self.any_of:
            ok &= concepts[list(self.any_of)].to_numpy(dtype=bool).any(axis=1)
        for c in self.none_of:
            ok &= ~concepts[c].to_numpy(dtype=bool)
        return ok

    def describe(self) -> str:
        """Plain-English statement of the rule."""
        parts = []
        if self.all_of:
            parts.append(" and ".join(self.all_of))
        if self.any_of:
            parts.append("(" + " or ".join(self.any_of) + ")")
        if self.none_of:
            parts.append("no " + " and no ".join(self.none_of))
        return " and ".join(parts) if parts else "always"


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("red crowd", all_of=("red",), any_of=("count=3", "count=4")),
    Rule("star on stripes", all_of=("star", "stripes")),
    Rule("blue circle", all_of=("blue circle",)),
    Rule("green and yellow", all_of=("green", "yellow")),
    Rule("triangle on grid", all_of=("triangle", "grid")),
    Rule("lonely large", all_of=("count=1", "large")),
    Rule("purple cross", all_of=("purple cross",)),
    Rule("dotted", all_of=("dots",)),
)
"""The default decision list (8 rules + the fallback class ``other``)."""

DEFAULT_FALLBACK = "other"


def assign_classes(
    concepts: pd.DataFrame, rules: Sequence[Rule], fallback: str | None = DEFAULT_FALLBACK
) -> np.ndarray:
    """Apply a decision list to a concept table.

    Returns
    -------
    numpy.ndarray
        Integer labels ``[n]``: the index of the first matching rule, ``len(rules)`` for the fallback.

    Raises
    ------
    ValueError
        When ``fallback`` is None and some row matches no rule.
    """
    labels = np.full(len(concepts), len(rules), dtype=np.int64)
    unassigned = np.ones(len(concepts), dtype=bool)
    for i, rule in enumerate(rules):
        hit = unassigned & rule.matches(concepts)
        labels[hit] = i
        unassigned &= ~hit
    if fallback is None and unassigned.any():
        raise ValueError(
            f"{int(unassigned.sum())} images match no class rule and no fallback class was given; "
            "add a catch-all rule or pass fallback='other'."
        )
    return labels
