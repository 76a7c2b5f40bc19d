"""Concept erasure: closed-form (LEACE), inference-time (SAE features, directions) and fine-tuning (ESD, EAR).

Modules
-------
:mod:`evaluation.erasure.leace`
    :class:`LeaceFitter` / :class:`LeaceEraser` -- linear erasure from representations (LEACE and the
    orthogonal-projection variant), usable through :func:`concepts.hooks.intervene` at any layer.
:mod:`evaluation.erasure.steering`
    :func:`fit_inference_erasure` -> :class:`InferenceErasure`: erase a concept at one layer of a diffusion or
    autoregressive generator (LEACE, a projected-out direction, or clamped / ablated SAE features with the
    reconstruction error kept); :class:`EditedGenerator`.
:mod:`evaluation.erasure.finetune`
    :class:`ESD` (diffusion) and :class:`EAR` (autoregressive, windowed gradient accumulation + thresholded loss
    masking) -> :class:`FinetunedWeights` (safetensors checkpoints, strength interpolation).
:mod:`evaluation.erasure.metrics`
    :func:`evaluate_erasure` / :func:`erasure_sweep`: erasure, specificity and utility read through concepts
    (ConceptWorld detector, SAE concept energy, built-in CLIP).
:mod:`evaluation.erasure.report`
    :func:`erasure_section`: the HTML report section.

Examples
--------
>>> # from concepts import zoo
>>> # from evaluation.erasure import erasure_prompt_sets, fit_inference_erasure, evaluate_erasure
>>> # gen = zoo.load("conceptworld-diffusion")
>>> # sets = erasure_prompt_sets("red")
>>> # er = fit_inference_erasure(gen, "text_encoder", sets["target"].prompts, sets["retain"].prompts)
>>> # evaluate_erasure(gen, er.apply(gen), "red", sets).summary()
"""
from .finetune import EAR, ESD, PARAMETER_SETS, FinetunedWeights, WeightEditedGenerator, network_of, select_parameters
from .leace import LeaceEraser, LeaceFitter, optimal_linear_shrinkage
from .metrics import (
    ErasureResult,
    PromptSet,
    SAEConceptProbe,
    SweepResult,
    erasure_prompt_sets,
    erasure_sweep,
    evaluate_erasure,
    load_builtin_clip_encoder,
)
from .report import erasure_section, leace_section
from .steering import (
    EditedGenerator,
    InferenceErasure,
    LeaceEdit,
    ablate_features,
    clamp_features,
    collect_activations,
    concept_feature_scores,
    fit_inference_erasure,
    fit_layer_sae,
    select_features,
)

__all__ = [
    "EAR",
    "ESD",
    "EditedGenerator",
    "ErasureResult",
    "FinetunedWeights",
    "InferenceErasure",
    "LeaceEdit",
    "LeaceEraser",
    "LeaceFitter",
    "PARAMETER_SETS",
    "PromptSet",
    "SAEConceptProbe",
    "SweepResult",
    "WeightEditedGenerator",
    "ablate_features",
    "clamp_features",
    "collect_activations",
    "concept_feature_scores",
    "erasure_prompt_sets",
    "erasure_section",
    "erasure_sweep",
    "evaluate_erasure",
    "fit_inference_erasure",
    "fit_layer_sae",
    "leace_section",
    "load_builtin_clip_encoder",
    "network_of",
    "optimal_linear_shrinkage",
    "select_features",
    "select_parameters",
]
