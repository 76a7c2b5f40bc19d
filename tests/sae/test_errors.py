"""Remaining error paths: each raise names what was expected and what was received."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from sae_testing import make_tiny

from sae import SparseCodes, TopKSAE, load, load_saelens
from sae.checkpoint import load_training_state


def test_too_many_non_finite_steps_stop_training(tiny_data):
    X = tiny_data.X * 1e37  # finite input whose squared error overflows float32
    with pytest.raises(FloatingPointError, match="the loss was NaN/inf on 11 batches"):
        make_tiny("topk", n_epochs=2, normalize="none").fit(X)


def test_resume_refuses_another_dictionary_size(tiny_data, tmp_path):
    make_tiny("topk", n_epochs=1, checkpoint_dir=tmp_path).fit(tiny_data.X)
    with pytest.raises(ValueError, match="field 'n_concepts' is 32, but this estimator has n_concepts=16"):
        make_tiny("topk", n_epochs=1, n_concepts=16, checkpoint_dir=tmp_path).fit(tiny_data.X, resume=True)


def test_corrupt_checkpoint_pointer(tmp_path):
    (tmp_path / "latest.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(ValueError, match="latest.json is missing the field 'tensors'"):
        load_training_state(tmp_path)
    (tmp_path / "latest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        load_training_state(tmp_path)


def test_sparse_codes_out_of_range(fitted_tiny):
    codes = SparseCodes(torch.tensor([[40]]), torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="codes contain latent index 40, but TopKSAE has 32 concepts"):
        fitted_tiny["topk"].inverse_transform(codes)


def test_config_field_types_and_consistency(fitted_tiny, tmp_path):
    path = fitted_tiny["topk"].save(tmp_path / "m")
    good = json.loads((path / "config.json").read_text())
    for field, value, msg in [
        ("d_in", "16", "field 'd_in' must be a positive integer"),
        ("params", [1], "field 'params' must be an object"),
        ("n_concepts", 64, r"field 'n_concepts' \(64\) disagrees with params.n_concepts \(32\)"),
    ]:
        cfg = dict(good, **{field: value})
        (path / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=msg):
            load(path)
    (path / "config.json").write_text(json.dumps(good))
    tensors = load_file(str(path / "weights.safetensors"))
    tensors["extra"] = torch.zeros(2)
    save_file(tensors, str(path / "weights.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor 'extra'"):
        load(path)


def test_archetypal_checkpoint_without_candidates(fitted_tiny, tmp_path):
    path = fitted_tiny["archetypal"].save(tmp_path / "a")
    tensors = load_file(str(path / "weights.safetensors"))
    del tensors["dictionary.C"]
    save_file(tensors, str(path / "weights.safetensors"))
    with pytest.raises(ValueError, match=r"weights.safetensors: .*lack 'dictionary.C'"):
        load(path)


def test_saelens_threshold_shape(fitted_tiny, tmp_path):
    path = fitted_tiny["jumprelu"].save(tmp_path / "j", format="saelens")
    w = load_file(str(path / "sae_weights.safetensors"))
    w["threshold"] = w["threshold"][:5].contiguous()
    save_file(w, str(path / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match=r"tensor 'threshold' has shape \(5,\), expected \(32,\)"):
        load_saelens(path)


def test_unknown_saved_parameters_warn(fitted_tiny, tmp_path):
    path = fitted_tiny["topk"].save(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["params"]["from_the_future"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match=r"ignoring unknown parameters \['from_the_future'\]"):
        est = load(path)
    assert isinstance(est, TopKSAE)
