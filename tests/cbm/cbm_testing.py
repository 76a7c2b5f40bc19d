"""Shared constants for the cbm tests (a uniquely named module, importable from any test file)."""
from concepts.world.rules import DEFAULT_RULES

RULE_CONCEPTS = sorted({c for r in DEFAULT_RULES for c in r.concepts})
