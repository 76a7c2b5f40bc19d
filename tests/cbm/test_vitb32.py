"""The same code on a real architecture: open_clip ViT-B-32 (random weights, built once per module).

Nothing here depends on what ViT-B-32 has learned (it has learned nothing): the checks are closed forms
and consistency of the shared code path (images through the encoder, 512-d banks, naming, evaluation).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import cbm
from cbm.concept_sets import describe_rules, text_bank
from cbm.metrics import evaluate
from concepts.world import DEFAULT_RULES, ConceptWorld

from cbm_testing import RULE_CONCEPTS


@pytest.fixture(scope="module")
def vit():
    from concepts.encoders import OpenCLIPEncoder

    torch.set_num_threads(1)
    torch.manual_seed(0)
    enc = OpenCLIPEncoder.from_pretrained("ViT-B-32")  # random weights, nothing downloaded
    world = ConceptWorld(seed=0, image_size=32)
    batch = world.sample(32, seed=5)
    X = enc.encode_images(batch.images, batch_size=32).numpy()
    bank = text_bank("conceptworld", enc)
    return enc, batch, X, bank


def test_heads_run_unchanged_on_vit_b_32(vit):
    enc, batch, X, bank = vit
    y, C = batch.labels, batch.concepts
    assert X.shape == (32, 512) and bank.dim == 512
    heads = {
        "linear_probe": cbm.LinearProbe(),
        "label_free": cbm.LabelFreeCBM(bank=bank),
        "sparse": cbm.SparseCBM(bank=bank, encoder=enc, n_epochs=3),
        "cms": cbm.ConceptMatrixSearch(bank=bank, encoder=enc, class_names=describe_rules(DEFAULT_RULES)),
        "dn_cbm": cbm.DiscoverThenNameCBM(vocabulary=bank, n_concepts=32, top_k=4, sae_epochs=3),
        "cbm": cbm.ConceptBottleneckModel(n_epochs=5),
    }
    rows = []
    for name, head in heads.items():
        head.fit(X, y, C)
        rows.append(evaluate(head, X, y, C, name=name, intervene_on=RULE_CONCEPTS, fractions=[0, 1]))
    table = pd.concat(rows)
    assert list(table.index) == list(heads) and table["accuracy"].between(0, 1).all()
    # closed forms on the 512-d space
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(heads["label_free"].concept_scores(X), Xn @ bank.normalized().vectors.numpy().T,
                               atol=1e-5)
    assert set(heads["dn_cbm"].concept_truth_names_) <= set(bank.names)
    # every concept set to the truth: exactly the label head applied to the truth vector
    cb = heads["cbm"]
    full = cb.intervene(X, list(C.columns), concepts=C)
    np.testing.assert_allclose(full, cb.predict_proba_from_concepts(C.to_numpy(float)), atol=1e-6)


def test_images_go_through_the_encoder(vit):
    enc, batch, X, bank = vit
    head = cbm.LabelFreeCBM(bank=bank, encoder=enc).fit(X, batch.labels)
    np.testing.assert_allclose(head.predict_proba(batch.images[:6]), head.predict_proba(X[:6]), atol=1e-5)
    zs = cbm.ZeroShotClassifier(class_names=batch.class_names, encoder=enc).fit(X, batch.labels)
    prompts = enc.encode_texts([f"a photo of {c}" for c in np.array(batch.class_names)[zs.classes_]])
    expect = (torch.nn.functional.normalize(torch.tensor(X), dim=1) @ prompts.T).argmax(1).numpy()
    np.testing.assert_array_equal(zs.predict(X), zs.classes_[expect])
