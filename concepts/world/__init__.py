"""ConceptWorld: the built-in procedural image world with exact concept ground truth.

Examples
--------
>>> from concepts.world import ConceptWorld
>>> batch = ConceptWorld(seed=0).sample(4, seed=0)
>>> list(batch.concepts.columns[:3])
['red', 'green', 'blue']
"""
from .captions import caption
from .folder import load_folder, read_table, save_folder
from .rules import DEFAULT_RULES, Rule, assign_classes
from .vocabulary import Vocabulary
from .world import ConceptBatch, ConceptWorld, Correlation

__all__ = [
    "ConceptWorld", "ConceptBatch", "Correlation", "Rule", "DEFAULT_RULES", "assign_classes", "Vocabulary",
    "caption", "save_folder", "load_folder", "read_table",
]
