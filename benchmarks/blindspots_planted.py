"""Planted blindspots: are known suppressed / exaggerated concepts flagged, and does a null comparison flag nothing?

Run: ``.venv/bin/python benchmarks/blindspots_planted.py`` (no arguments; ``--quick`` for a smaller run).

Set-up (all seeded, offline, on the built-in models):

* **real set**: 1,000 ConceptWorld renders (32 px, the built-in generators' size) in which purple objects and dots
  backgrounds are rare (weights 0.15), so that a generator can exaggerate them;
* **lens**: the default of ``conceptkit blindspots`` -- built-in CLIP, tokens of ``visual.layer3`` (4x4), TopK SAE
  (256 concepts, k = 8, 20 epochs) trained on the real tokens, energies summed over tokens;
* **unit -> concept map**: each SAE unit is read as the ConceptWorld concept its energy predicts best, when that
  AUROC is >= 0.9 on an independent labelled sample of the default (uniform) world
  (:func:`evaluation.blindspots_world.unit_concept_map`);
* **plant 1, training-data bias** (``world-bias``): :class:`~evaluation.blindspots_world.WorldGenerator` draws every
  caption faithfully except that it never draws red, yellow, stripes or blue circles and turns 35 % of the objects
  purple and 60 % of the backgrounds into dots -- 6 planted concepts (4 suppressed, 2 exaggerated);
* **plant 2, steering** (when the built-in generators are installed): the built-in diffusion and AR models with a
  direction edit on the output of their text tower (the ``text_encoder`` hook, conditional rows only):
  ``AddVector(-1.5 (v_red + v_stripes))`` on the first 500 captions, where ``v_c`` is the mean difference of the
  conditional text states between 400-caption calibration prompts mentioning ``c`` and the same prompts with ``c`` swapped for another colour /
  background (activation steering with counterfactual prompts);
* **plant 3, SAE-feature steering** (same generators, same layer): a TopK SAE (128 features, k = 8) fitted on the
  conditional text states of the 400 calibration captions; the features whose per-caption maximum predicts "blue"
  or "grid" in the caption (AUROC >= 0.9) are multiplied by -5 with :class:`~concepts.generators.ClampFeatures`
  (the SAE's reconstruction error is kept, so only those features move). Plants 2 and 3 are each compared with the *unsteered* model on the
  same captions and seeds, so the model's natural blindspots cancel out and only the plant remains; the truth of
  the edited images (which concepts changed >= 2-fold, including side effects such as other colours taking red's
  place) is read by the ConceptWorld detector, and a steered concept counts as planted only where the detector,
  its detections tested like the units (:func:`~evaluation.blindspots_world.detector_comparison`: same delta,
  thresholds and FDR), itself flags it suppressed -- an edit that does not change the pixels plants nothing, and
  one that only halves a concept leaves its delta inside the default band [0.2, 0.8], so it is no blindspot at
  the default thresholds either; such plants are listed, not scored (``recall_incl_weak`` counts the halved ones
  as planted and missed);
* **null comparisons**: the real set against (a) an independent sample of the same world, unpaired, and (b) the
  faithful ``WorldGenerator`` (same captions, new positions); with plant 2, also the unsteered generator against
  itself with other seeds.

Scores (:func:`evaluation.blindspots_world.planted_recovery`, concept level): precision = flagged concepts whose
label frequency really changed >= 2-fold in the flagged direction / flagged concepts; recall = planted concepts
found (themselves or a composition containing them, e.g. ``red circle`` for ``red``) / planted concepts, at the
default thresholds (q <= 0.05, delta outside [0.2, 0.8], support >= 10 pairs). ``precision`` and ``recall`` in
``RESULT`` pool every plant (flagged concepts and planted concepts summed over plants); ``null_flags`` counts the
flagged concepts of all null comparisons.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

QUICK = "--quick" in sys.argv
N = 400 if QUICK else 1000
SAE = {"n_concepts": 128, "top_k": 8, "n_epochs": 10} if QUICK else {"n_concepts": 256, "top_k": 8, "n_epochs": 20}
STEER_SUPPRESS = ("red", "stripes")
STEER_STRENGTH = 2.5
SAE_SUPPRESS = ("blue", "grid")
SAE_SCALE = -8.0
WORLD_PLANT = {"suppress": {"red": 1.0, "yellow": 1.0, "stripes": 1.0, "blue circle": 1.0},
               "exaggerate": {"purple": 0.35, "dots": 0.6}}


def _builtin_generators() -> list[str]:
    from concepts.zoo.checkpoint import weights_dir

    out = []
    for name in ("conceptworld-diffusion", "conceptworld-ar"):
        try:
            if (Path(weights_dir(name)) / "config.json").exists():
                out.append(name)
        except Exception:  # noqa: BLE001 - not installed
            pass
    return out


class SteeredGenerator:
    """A generator whose every call runs with fixed activation edits (``run_with_hooks``)."""

    def __init__(self, generator, hooks: dict, model_id: str) -> None:
        self.generator, self.hooks, self.model_id = generator, hooks, model_id

    def generate(self, prompts, seeds, **settings):
        return self.generator.run_with_hooks(prompts, seeds, self.hooks, **settings)


def _counterfactual(caption: str, concept: str, i: int) -> str:
    """The caption with ``concept`` (a colour or a background) swapped for another value of its family."""
    import re

    from concepts.world.vocabulary import BACKGROUND_PHRASES, COLOURS

    if concept in COLOURS:
        others = [c for c in COLOURS if c != concept]
        return re.sub(rf"\b{concept}\b", others[i % len(others)], caption)
    others = [b for b in BACKGROUND_PHRASES if b != concept]
    return caption[: -len(BACKGROUND_PHRASES[concept])] + BACKGROUND_PHRASES[others[i % len(others)]]


def cond_states(gen, layer: str, prompts: list[str]) -> torch.Tensor:
    """The conditional (CFG) rows of ``layer`` for ``prompts``, ``[n_prompts, tokens, width]`` (text states: one
    denoising step is enough)."""
    short = {"steps": 1} if "steps" in getattr(gen, "settings", {}) else {}
    cache = gen.run_with_cache(list(prompts), list(range(len(prompts))), [layer], **short)
    return cache.split_cfg(layer)[0].float()


def steering_direction(gen, layer: str, concept: str, captions: list[str], n: int = 80) -> torch.Tensor:
    """Mean difference of the conditional activations of ``layer`` between captions with ``concept`` and the same
    captions with it swapped for another value (over the token positions that differ): a concept direction."""
    from concepts.world.vocabulary import BACKGROUND_PHRASES

    if concept in BACKGROUND_PHRASES:
        with_c = [c for c in captions if c.endswith(BACKGROUND_PHRASES[concept])][:n]
    else:
        with_c = [c for c in captions if f" {concept} " in f" {c} "][:n]
    without = [_counterfactual(c, concept, i) for i, c in enumerate(with_c)]

    diff = cond_states(gen, layer, with_c) - cond_states(gen, layer, without)
    return diff[diff.abs().sum(-1) > 1e-4].mean(0)


def sae_feature_edit(gen, layer: str, concepts: tuple[str, ...], calib) -> tuple[object, list[int]]:
    """An SAE-feature edit that suppresses ``concepts``: a TopK SAE (128 features, k = 8) fitted on the conditional
    token states of ``layer`` for the calibration captions, the features whose per-caption maximum predicts a
    concept's presence in the caption with AUROC >= 0.9 (:func:`~evaluation.blindspots_world.unit_concept_map`),
    and :class:`~concepts.generators.ClampFeatures` multiplying them by ``SAE_SCALE`` on the conditional rows."""
    from concepts.generators import ClampFeatures
    from evaluation.blindspots_world import unit_concept_map
    from sae import TopKSAE

    n = len(calib.captions)
    states = cond_states(gen, layer, list(calib.captions))
    flat = states.reshape(-1, states.shape[-1])
    sae = TopKSAE(n_concepts=128, top_k=8, n_epochs=30, batch_size=256, b_dec_init="mean", random_state=0)
    sae.fit(flat)
    codes = torch.as_tensor(sae.transform(flat)).reshape(n, states.shape[1], -1).amax(1)
    units = unit_concept_map(codes.numpy(), calib.concepts)
    features = units.loc[units["mapped"] & units["truth"].isin(concepts), "concept"].tolist()
    return ClampFeatures(sae, features, SAE_SCALE, mode="scale", rows="cond"), features


def main() -> None:
    torch.set_num_threads(1)
    from concepts import zoo
    from concepts.world import ConceptWorld
    from evaluation.blindspots import compare_energies, find_blindspots, generate_images
    from evaluation.blindspots_coder import ConceptCoder
    from concepts.generators import AddVector
    from evaluation.blindspots_world import (WorldGenerator, detector_comparison, label_changes, planted_recovery,
                                             unit_concept_map)

    t_all = time.perf_counter()
    real_world = ConceptWorld(seed=0, image_size=32, colour_probs={"purple": 0.15}, background_probs={"dots": 0.15})
    real = real_world.sample(N, seed=1)
    coder = ConceptCoder.builtin(progress=False, random_state=0, **SAE)
    t0 = time.perf_counter()
    coder.fit(real.images)
    fit_s = time.perf_counter() - t0
    ref = ConceptWorld(seed=0, image_size=32).sample(N, seed=12345)
    unit_map = unit_concept_map(coder.transform(ref.images), ref.concepts)
    visible = sorted(unit_map.loc[unit_map["mapped"], "truth"].unique())

    rows, null_rows = [], []
    plant = WorldGenerator(**WORLD_PLANT, model_id="world-bias")
    faithful = WorldGenerator(model_id="world-faithful")
    independent = real_world.sample(N, seed=99)
    t0 = time.perf_counter()
    analysis = find_blindspots(real.images, real.captions, generators={"world-bias": plant, "world-faithful": faithful},
                               generated={"independent-sample": independent.images}, coder=coder, progress=False)
    world_s = time.perf_counter() - t0
    truth = label_changes(real.concepts, plant.concepts(plant.generate(real.captions, analysis.seeds)))
    rec = planted_recovery(analysis.results["world-bias"].concepts, unit_map, truth, plant.planted)
    rows.append(("world-bias (training-data bias)", plant.planted, rec))
    for g in ("world-faithful", "independent-sample"):
        s = analysis.results[g].summary()
        null_rows.append((g, s["suppressed"] + s["exaggerated"], s["n_tested"]))

    steering_info, unrealised, weak, steering_s, found_2f = [], [], [], {}, []
    n_steer = min(N, 500)
    calib = ConceptWorld(seed=0, image_size=32).sample(400, seed=50)
    for name in _builtin_generators():
        t0 = time.perf_counter()
        gen = zoo.load(name)
        detector = zoo.load("conceptworld-detector")
        # the conditional rows of the text conditioning: the text tower's output in the diffusion model (its encode
        # calls are labelled cond / uncond); the aligner that feeds it to the language model in the AR model
        layer = "model.aligner" if "model.aligner" in gen.module_names("model.aligner") else "text_encoder"
        direction = sum(steering_direction(gen, layer, c, calib.captions) for c in STEER_SUPPRESS)
        caps, seeds = real.captions[:n_steer], list(range(n_steer))
        base, _ = generate_images(gen, caps, seeds, batch_size=100, progress=False)
        other, _ = generate_images(gen, caps, [s + 100_000 for s in seeds], batch_size=100, progress=False)
        e_base = coder.transform(base)
        null = compare_energies(e_base, coder.transform(other), names=coder.names)
        ns = null.summary()
        null_rows.append((f"{name} vs itself (other seeds)", ns["suppressed"] + ns["exaggerated"], ns["n_tested"]))
        base_lab = detector.detect(base)
        sae_edit, sae_features = sae_feature_edit(gen, layer, SAE_SUPPRESS, calib)
        plants = (
            (f"{name} steered (-{STEER_STRENGTH:g} v_{'-v_'.join(STEER_SUPPRESS)})", STEER_SUPPRESS,
             AddVector(direction, -STEER_STRENGTH, rows="cond")),
            (f"{name} SAE features x{SAE_SCALE:g} ({', '.join(SAE_SUPPRESS)}: {len(sae_features)} features)",
             SAE_SUPPRESS, sae_edit),
        )
        for label, concepts, edit in plants:
            steered, _ = generate_images(SteeredGenerator(gen, {layer: edit}, f"{name}+edit"), caps, seeds,
                                         batch_size=100, progress=False)
            res = compare_energies(e_base, coder.transform(steered), names=coder.names)
            truth_s = label_changes(base_lab, detector.detect(steered))
            # a steering plant counts only where it took effect: the referee (the detector, its detections tested
            # like the units, same delta thresholds and FDR) must itself flag the concept suppressed in the steered
            # images; weaker plants (>= 2-fold fewer detections but delta inside the band) are listed and scored apart
            referee = detector_comparison(detector, base, steered).set_index("truth")["status"]
            realised = {c for c in concepts if referee.get(c) == "suppressed"}
            halved = set(truth_s.loc[truth_s["change"] == "suppressed", "truth"])
            unrealised.extend(f"{c} ({label})" for c in concepts if c not in realised | halved)
            planted = {c: "suppressed" for c in concepts if c in realised}
            if planted:
                rows.append((label, planted, planted_recovery(res.concepts, unit_map, truth_s, planted)))
            planted_2f = {c: "suppressed" for c in concepts if c in realised | halved}
            if planted_2f:
                rec_2f = planted_recovery(res.concepts, unit_map, truth_s, planted_2f)
                found_2f.append((len(planted_2f), int(sum(rec_2f["found"].values()))))
                weak.extend(f"{c} ({label}; found={rec_2f['found'][c]})" for c in planted_2f if c not in realised)
            moved = truth_s[truth_s["change"] != ""]
            steering_info.append((label, layer, ", ".join(f"{t} {f0:.2f}->{f1:.2f}" for t, f0, f1 in
                                                          zip(moved["truth"], moved["freq_real"], moved["freq_gen"]))))
        steering_s[name] = time.perf_counter() - t0

    # ---------------------------------------------------------------- report
    print(f"Planted blindspots on ConceptWorld ({N} caption pairs; lens: built-in CLIP {coder.layer_}, "
          f"TopK SAE {SAE['n_concepts']}/{SAE['top_k']}; {int(unit_map['mapped'].sum())} units map to "
          f"{len(visible)} concepts with AUROC >= 0.9)")
    print(f"visible concepts: {', '.join(visible)}")
    print(f"SAE fit {fit_s:.1f} s; world plants + nulls {world_s:.1f} s")
    print()
    print(f"{'plant':45s} {'planted':>7s} {'found':>5s} {'flagged':>7s} {'correct':>7s} {'unmapped':>8s} "
          f"{'precision':>9s} {'recall':>6s}")
    tot_flag = tot_ok = tot_planted = tot_found = 0
    for label, planted, rec in rows:
        n_found = int(sum(rec["found"].values()))
        print(f"{label:45s} {len(planted):7d} {n_found:5d} {rec['n_flagged_concepts']:7d} {rec['n_correct']:7d} "
              f"{rec['n_unmapped_flagged']:8d} {rec['precision']:9.3f} {rec['recall']:6.3f}")
        for concept, ok in rec["found"].items():
            print(f"    {planted[concept]:11s} {concept:14s} found={ok} visible={rec['visible'][concept]}")
        tot_flag += rec["n_flagged_concepts"]
        tot_ok += rec["n_correct"]
        tot_planted += len(planted)
        tot_found += n_found
    print()
    print(f"{'null comparison':45s} {'flags':>5s} {'tested':>6s}")
    for label, flags, tested in null_rows:
        print(f"{label:45s} {flags:5d} {tested:6d}")
    for name, secs in steering_s.items():
        print(f"steering plants on {name}: {n_steer} pairs per plant, {secs:.1f} s")
    for label, layer, moved in steering_info:
        print(f"{label} (edited layer {layer}); detector-read concepts that changed >= 2-fold: {moved}")
    if weak:
        print(f"weak steering plants (>= 2-fold fewer detections, but the detector's own delta stays inside the band; "
              f"not counted): {', '.join(weak)}")
    if unrealised:
        print(f"steering plants that did not take effect in the pixels (not counted): {', '.join(unrealised)}")
    if not steering_info:
        print("steering plants skipped: built-in generators not installed")
    world_n, world_found = len(rows[0][1]), int(sum(rows[0][2]["found"].values()))
    result = {
        "precision": round(tot_ok / tot_flag, 4) if tot_flag else None,
        "recall": round(tot_found / tot_planted, 4),
        "null_flags": int(sum(f for _, f, _ in null_rows)),
        "n_planted": tot_planted,
        "n_unrealised_plants": len(unrealised),
        "n_weak_plants": len(weak),
        "recall_incl_weak": round((world_found + sum(f for _, f in found_2f)) / (world_n + sum(n for n, _ in found_2f)), 4),
        "world_precision": round(rows[0][2]["precision"], 4),
        "world_recall": round(rows[0][2]["recall"], 4),
        "n_pairs": N,
        "visible_concepts": len(visible),
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
