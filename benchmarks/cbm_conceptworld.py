"""Concept-bottleneck heads on ConceptWorld with the built-in CLIP: every head, every metric, one table.

Classes are ConceptWorld's default rules (a first-match decision list of concept conjunctions). Features
are the built-in ``conceptworld-clip`` image embeddings of 5,000 training and 2,000 test images. Every
head is fitted on the same cached features with fixed seeds and evaluated with
:func:`cbm.metrics.evaluate` (interventions on the concepts the rules read). Text-based classifiers
(zero-shot "a photo of {class}", Concept Matrix Search) get the same class texts: the bare class names
(``"red crowd"``, ``"star on stripes"``, ...); their accuracy on the classes defined by conjunctions of two
or more concepts is measured as a restricted task (:func:`cbm.metrics.subset_accuracy`). A second table
repeats the text-based heads with plain-language rule descriptions as class texts
(:func:`cbm.concept_sets.describe_rules`: "a red shape and three shapes or four shapes", ...).

Run: ``.venv/bin/python benchmarks/cbm_conceptworld.py`` (``--clip FOLDER`` evaluates another CLIP folder
written by ``concepts.zoo.train_clip``). The last line is ``RESULT {json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import cbm  # noqa: E402
from cbm.concept_sets import describe_rules  # noqa: E402
from cbm.metrics import evaluate, subset_accuracy, unit_alignment  # noqa: E402
from concepts.encoders import OpenCLIPEncoder  # noqa: E402
from concepts.world import DEFAULT_RULES, ConceptWorld  # noqa: E402


def load_encoder(folder: str | None) -> OpenCLIPEncoder:
    if folder is None:
        from concepts.zoo import load

        model, preprocess, tokenizer = load("conceptworld-clip")
        name = "conceptworld-clip"
    else:
        from concepts.zoo.clip import load_clip

        model, preprocess, tokenizer = load_clip(folder)
        name = f"conceptworld-clip ({folder})"
    return OpenCLIPEncoder(model, preprocess, tokenizer, name=name)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default=None, help="a CLIP folder (default: the shipped conceptworld-clip)")
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the heads are small)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    enc = load_encoder(args.clip)
    world = ConceptWorld(seed=0)
    t0 = time.perf_counter()
    train, test = world.sample(args.n_train, seed=1), world.sample(args.n_test, seed=2)
    Xtr = enc.encode_images(train.images, batch_size=256).numpy()
    Xte = enc.encode_images(test.images, batch_size=256).numpy()
    encode_s = time.perf_counter() - t0
    ytr, yte, Ctr, Cte = train.labels, test.labels, train.concepts, test.concepts
    rule_concepts = sorted({c for r in DEFAULT_RULES for c in r.concepts})
    conj = [i for i, r in enumerate(DEFAULT_RULES) if len(r.concepts) >= 2]
    texts = describe_rules(DEFAULT_RULES)
    names = list(train.class_names)
    seed = args.seed

    heads = {
        "linear_probe": cbm.LinearProbe(random_state=seed),
        "label_free_cbm": cbm.LabelFreeCBM(encoder=enc, random_state=seed),
        "sparse_cbm": cbm.SparseCBM(encoder=enc, objective="gumbel", random_state=seed),
        "sparse_cbm_contrastive": cbm.SparseCBM(encoder=enc, objective="contrastive", random_state=seed),
        "sparse_cbm_l1": cbm.SparseCBM(encoder=enc, objective="l1", random_state=seed),
        "cms": cbm.ConceptMatrixSearch(encoder=enc, class_names=names, random_state=seed),
        "cms_row": cbm.ConceptMatrixSearch(encoder=enc, class_names=names, normalize="row", random_state=seed),
        "cms_row_max": cbm.ConceptMatrixSearch(encoder=enc, class_names=names, normalize="row", rule="max",
                                               random_state=seed),
        "zero_shot": cbm.ZeroShotClassifier(encoder=enc, class_names=names, random_state=seed),
        "dn_cbm": cbm.DiscoverThenNameCBM(encoder=enc, random_state=seed),
        "cbm": cbm.ConceptBottleneckModel(random_state=seed),
        "cbm_linear_head": cbm.ConceptBottleneckModel(label_head="linear", random_state=seed),
    }
    rows, curves = [], []
    for name, head in heads.items():
        head.fit(Xtr, ytr, Ctr)
        row, cur = evaluate(head, Xte, yte, Cte, name=name, intervene_on=rule_concepts, seed=seed, return_curves=True)
        row["conjunction_accuracy"] = subset_accuracy(head, Xte, yte, conj)
        rows.append(row)
        curves.append(cur)
        print(f"fitted {name:24s} in {head.fit_time_:6.2f} s", flush=True)
    table = pd.concat(rows)
    curve_table = pd.concat(curves, ignore_index=True)

    text_rows = []
    for name, head in {
        "zero_shot": cbm.ZeroShotClassifier(encoder=enc, class_names=texts),
        "cms": cbm.ConceptMatrixSearch(encoder=enc, class_names=texts),
        "cms_row": cbm.ConceptMatrixSearch(encoder=enc, class_names=texts, normalize="row"),
    }.items():
        head.fit(Xtr, ytr)
        text_rows.append({"head": name, "accuracy": head.score(Xte, yte),
                          "conjunction_accuracy": subset_accuracy(head, Xte, yte, conj)})
    text_table = pd.DataFrame(text_rows).set_index("head")

    dn = heads["dn_cbm"]
    align = unit_alignment(dn, Xte, Cte)
    aligned = align[align["aligned"]]

    pd.set_option("display.width", 200)
    pd.set_option("display.max_columns", 40)
    print(f"\nConceptWorld: {args.n_train} train / {args.n_test} test images, {len(train.class_names)} rule-defined "
          f"classes; features: {enc.name}, d={Xtr.shape[1]} (encoding took {encode_s:.1f} s)")
    main_cols = ["n_concepts", "fit_time", "accuracy", "top5_accuracy", "conjunction_accuracy", "ece",
                 "concept_accuracy", "concept_auroc", "exact_match_accuracy", "intervention_accuracy",
                 "intervention_auc_random", "intervention_auc_uncertainty", "intervention_auc_group"]
    print("\n" + table[main_cols].round(3).to_string())
    expl_cols = ["explanation_size", "coverage_90", "coverage_95", "coverage_99", "name_similarity", "duplicate_rate",
                 "aligned_units", "aligned_named_correctly"]
    print("\n" + table[expl_cols].round(3).to_string())
    print("\nintervention curves (rule concepts; accuracy by fraction set to the truth):")
    piv = curve_table.pivot_table(index=["head", "policy"], columns="fraction", values="accuracy", sort=False)
    print(piv.round(3).to_string())
    print("\ntext-based heads with rule descriptions as class texts (" + "; ".join(texts[:2]) + "; ...):")
    print(text_table.round(3).to_string())
    print(f"\nDN-CBM: {dn.bank_.n_concepts} SAE units, {len(aligned)} aligned with a ground-truth concept (AUROC >= 0.9); "
          "aligned units:")
    print(aligned[["unit", "name", "best_concept", "auroc", "named_correctly"]].round(3).to_string(index=False))

    acc = table["accuracy"]
    result = {
        "linear_probe_accuracy": float(acc["linear_probe"]),
        "dn_cbm_accuracy": float(acc["dn_cbm"]),
        "dn_cbm_gap": float(acc["linear_probe"] - acc["dn_cbm"]),
        "naming_accuracy": float(table.loc["dn_cbm", "aligned_named_correctly"]),
        "dn_cbm_aligned_units": int(len(aligned)),
        "intervention_accuracy": float(table.loc["cbm", "intervention_accuracy"]),
        "label_free_cbm_accuracy": float(acc["label_free_cbm"]),
        "sparse_cbm_accuracy": float(acc["sparse_cbm"]),
        "sparse_cbm_contrastive_accuracy": float(acc["sparse_cbm_contrastive"]),
        "sparse_cbm_l1_accuracy": float(acc["sparse_cbm_l1"]),
        "cms_accuracy": float(acc["cms"]),
        "cms_row_accuracy": float(acc["cms_row"]),
        "cms_row_max_accuracy": float(acc["cms_row_max"]),
        "zero_shot_accuracy": float(acc["zero_shot"]),
        "cbm_accuracy": float(acc["cbm"]),
        "cbm_linear_head_accuracy": float(acc["cbm_linear_head"]),
        "cbm_linear_head_intervention_accuracy": float(table.loc["cbm_linear_head", "intervention_accuracy"]),
        "cms_conjunction_accuracy": float(table.loc["cms", "conjunction_accuracy"]),
        "zero_shot_conjunction_accuracy": float(table.loc["zero_shot", "conjunction_accuracy"]),
        "cms_row_conjunction_accuracy": float(table.loc["cms_row", "conjunction_accuracy"]),
        "cms_rule_texts_conjunction_accuracy": float(text_table.loc["cms", "conjunction_accuracy"]),
        "zero_shot_rule_texts_conjunction_accuracy": float(text_table.loc["zero_shot", "conjunction_accuracy"]),
        "max_fit_seconds": float(table["fit_time"].max()),
        "encode_seconds": float(encode_s),
    }
    print("RESULT " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
