"""Erasing a colour from the built-in generators: inference-time erasure and fine-tuning, measured through concepts.

For each built-in generator (``conceptworld-diffusion``, ``conceptworld-ar``) the concept ``red`` is erased

1. at inference time (:func:`evaluation.erasure.fit_inference_erasure`, the method and layer of ``METHODS``), fitted
   on *fit* prompts, its strength calibrated on separate *calibration* prompts (the smallest strength of
   ``STRENGTHS`` that brings red detection to <= 5 % while the asked colours and shapes of the retain prompts move
   by <= 10 points), then evaluated on held-out *evaluation* prompts with fresh seeds;
2. by fine-tuning (ESD for diffusion, EAR for the AR model), a short CPU run (``FINETUNE``).

Evaluation (:func:`evaluation.erasure.evaluate_erasure`): the ConceptWorld detector on target prompts (single
large red objects), retain prompts (the five other colours) and utility prompts (full captions without red), plus
the built-in CLIP (CLIP score, embedding distance). The identity property is checked on the zoo models: the
erasure at strength 0 returns the original generations bit for bit.

Run: ``.venv/bin/python benchmarks/erasure_generators.py`` (no arguments; ``--quick`` uses fewer prompts and skips
fine-tuning; ``--no-finetune`` skips fine-tuning). Last line: ``RESULT {json}`` with, per generator ``g`` in
``diffusion``/``ar``: ``g_target_before``, ``g_target_after``, ``g_retain_change`` (largest absolute change of the
retain prompts' colour and shape detection, as a fraction), ``g_identity_exact``, ``g_strength``,
``g_finetune_target_after``, ``g_finetune_retain_change`` (null when a generator's weights are missing).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

CONCEPT = "red"
STRENGTHS = [1.0, 2.0, 3.0, 4.0, 6.0]

METHODS: dict[str, dict] = {
    "diffusion": {"layer": "text_encoder", "method": "leace", "anchor": "other"},
    "ar": {"layer": "text_encoder", "method": "leace", "anchor": "other", "one_sided": True},
}
"""Inference-time erasure per generator (``fit_inference_erasure`` arguments)."""

FINETUNE: dict[str, dict] = {
    "diffusion": {"params": "xattn", "iterations": 150, "lr": 1e-4, "negative_guidance": 1.0},
    "ar": {"params": "attn", "iterations": 80, "lr": 1e-4, "window": 16, "negative_guidance": 1.0},
}
"""Fine-tuning erasure per generator (ESD / EAR arguments)."""


def _retain_change(summary) -> float:
    s = summary.set_index("metric")
    return float(max(abs(s.loc[m, "delta"]) for m in ("retain_colour", "retain_shape") if m in s.index))


def _neutral(prompt: str) -> str:
    return " ".join(w for w in prompt.split() if w != CONCEPT)


def run_generator(name: str, quick: bool, finetune: bool, det, clip) -> dict:
    from concepts import zoo
    from evaluation.erasure import EAR, ESD, erasure_prompt_sets, evaluate_erasure, fit_inference_erasure

    out = {f"{name}_{k}": None for k in ("target_before", "target_after", "retain_change", "identity_exact",
                                         "strength", "finetune_target_after", "finetune_retain_change")}
    try:
        gen = zoo.load(f"conceptworld-{name}")
    except (FileNotFoundError, ValueError) as exc:
        print(f"[{name}] not available: {exc}")
        return out
    n = 12 if quick else 32
    fit = erasure_prompt_sets(CONCEPT, n_target=48, n_retain=48, n_utility=1, seed=11, seed_offset=50_000)
    cal = erasure_prompt_sets(CONCEPT, n_target=16, n_retain=15, n_utility=1, seed=22, seed_offset=60_000)
    test = erasure_prompt_sets(CONCEPT, n_target=n, n_retain=30 if not quick else 10, n_utility=12 if not quick else 4,
                               seed=0, seed_offset=1_000)
    cfg = dict(METHODS[name])
    t0 = time.perf_counter()
    er = fit_inference_erasure(gen, cfg.pop("layer"), fit["target"].prompts, fit["retain"].prompts, **cfg)
    t_fit = time.perf_counter() - t0

    # identity at zero strength on the zoo model
    base = gen.generate(test["target"].prompts[:8], test["target"].seeds[:8])
    same = er.apply(gen, 0.0).generate(test["target"].prompts[:8], test["target"].seeds[:8])
    out[f"{name}_identity_exact"] = bool(torch.equal(base.images, same.images))

    # strength calibration on calibration prompts
    cal_sets = {"target": cal["target"], "retain": cal["retain"]}
    chosen, rows = None, []
    for s in STRENGTHS:
        r = evaluate_erasure(gen, er.apply(gen, s), CONCEPT, cal_sets, detector=det, keep_images=False)
        summ = r.summary()
        t_after, rc = r.value("target_detection"), _retain_change(summ)
        rows.append((s, r.value("target_detection", "original"), t_after, rc))
        if chosen is None and t_after <= 0.05 and rc <= 0.10:
            chosen = s
    if chosen is None:  # best erasure among strengths that keep the retain prompts within 10 points
        ok = [r for r in rows if r[3] <= 0.10]
        chosen = min(ok, key=lambda r: (r[2], r[0]))[0] if ok else min(rows, key=lambda r: (r[2] + r[3], r[0]))[0]
    print(f"\n[{name}] {er!r} fitted in {t_fit:.1f}s; calibration (strength, target before, target after, "
          f"retain change):")
    for r in rows:
        print(f"  s={r[0]:<4g} target {r[1]:.3f} -> {r[2]:.3f}   retain change {r[3]:.3f}")

    res = evaluate_erasure(gen, er.apply(gen, chosen), CONCEPT, test, detector=det, encoder=clip, keep_images=False)
    summ = res.summary()
    print(f"[{name}] evaluation at strength {chosen:g}:")
    print(summ.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    out.update({
        f"{name}_target_before": round(res.value("target_detection", "original"), 4),
        f"{name}_target_after": round(res.value("target_detection"), 4),
        f"{name}_retain_change": round(_retain_change(summ), 4),
        f"{name}_strength": chosen,
        f"{name}_utility_clip_score_delta": round(res.value("utility_clip_score", "delta"), 4),
        f"{name}_utility_concept_shift": round(res.value("utility_concept_shift"), 4),
    })

    if finetune and not quick:
        ft = dict(FINETUNE[name])
        prompts = fit["target"].prompts
        t0 = time.perf_counter()
        if name == "diffusion":
            model = ESD(prompts, [_neutral(p) for p in prompts], progress=False, **ft).fit(gen)
        else:
            model = EAR([(p, _neutral(p)) for p in prompts], progress=False, **ft).fit(gen)
        t_ft = time.perf_counter() - t0
        res_ft = evaluate_erasure(gen, model.weights_.apply(gen), CONCEPT, test, detector=det, encoder=clip,
                                  keep_images=False)
        summ_ft = res_ft.summary()
        print(f"[{name}] fine-tuning {type(model).__name__} {ft} ({t_ft:.0f}s):")
        print(summ_ft.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        out.update({
            f"{name}_finetune_target_after": round(res_ft.value("target_detection"), 4),
            f"{name}_finetune_retain_change": round(_retain_change(summ_ft), 4),
            f"{name}_finetune_seconds": round(t_ft, 1),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts, no fine-tuning")
    parser.add_argument("--no-finetune", action="store_true", help="skip ESD / EAR")
    parser.add_argument("--only", choices=("diffusion", "ar"), default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("ERASURE_THREADS", "1")))
    from concepts import zoo
    from evaluation.erasure import load_builtin_clip_encoder

    det = zoo.load("conceptworld-detector")
    clip = load_builtin_clip_encoder()
    result: dict = {}
    for name in ("diffusion", "ar"):
        if args.only and name != args.only:
            continue
        result.update(run_generator(name, args.quick, not args.no_finetune, det, clip))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
