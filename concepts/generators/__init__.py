"""Image generators (diffusion and autoregressive) behind one protocol, with hooks and edits.

>>> from concepts.generators import from_pretrained, AddVector        # doctest: +SKIP
>>> gen = from_pretrained("path/to/stable-diffusion", device="cuda")   # doctest: +SKIP
>>> out = gen.generate(["a red circle"], seeds=[0], steps=30)          # doctest: +SKIP
>>> cache = gen.run_with_cache(["a red circle"], [0], ["unet.mid_block"], steps=30)  # doctest: +SKIP
>>> cache.call_map.head()                                               # doctest: +SKIP

See :mod:`concepts.generators.base` (protocol, call maps), :mod:`concepts.generators.cfg`
(CFG row orders), :mod:`concepts.generators.edits` (steering / erasure edits),
:mod:`concepts.generators.diffusion`, :mod:`concepts.generators.janus` and
:mod:`concepts.generators.autoregressive` (your own AR loop).
"""
from concepts.generators.autoregressive import ARLoopGenerator, sample_tokens
from concepts.generators.base import (
    PHASES,
    ActivationCache,
    BaseGenerator,
    CallContext,
    GenerationResult,
    Generator,
)
from concepts.generators.cfg import CFG_ORDERS, CFGLayout, split_cfg
from concepts.generators.diffusion import (
    DiffusersGenerator,
    PixArtGenerator,
    StableDiffusionGenerator,
    UnconditionalDiffusionGenerator,
)
from concepts.generators.edits import AddVector, ClampFeatures, Edit, FunctionEdit, ProjectOut, sae_functions
from concepts.generators.janus import JanusGenerator
from concepts.generators.loading import from_pretrained

__all__ = [
    "ARLoopGenerator",
    "ActivationCache",
    "AddVector",
    "BaseGenerator",
    "CFGLayout",
    "CFG_ORDERS",
    "CallContext",
    "ClampFeatures",
    "DiffusersGenerator",
    "Edit",
    "FunctionEdit",
    "GenerationResult",
    "Generator",
    "JanusGenerator",
    "PHASES",
    "PixArtGenerator",
    "ProjectOut",
    "StableDiffusionGenerator",
    "UnconditionalDiffusionGenerator",
    "from_pretrained",
    "sae_functions",
    "sample_tokens",
    "split_cfg",
]
