"""Checkpoints: our layout, SAELens' layout, and clear errors for corrupt or mismatched files."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sae as sae_pkg
from sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE, load, load_saelens


@pytest.mark.parametrize("name", ["topk", "relu", "jumprelu", "batchtopk", "matryoshka", "archetypal"])
def test_saelens_round_trip(name, fitted_tiny, tiny_data, tmp_path):
    est = fitted_tiny[name]
    path = est.save(tmp_path / name, format="saelens")
    assert sorted(p.name for p in path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    w = load_file(str(path / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (16, 32) and w["W_dec"].shape == (32, 16)
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 32
    back = load(path)  # auto-detects the layout
    X = tiny_data.X[:40]
    torch.testing.assert_close(back.transform(X), est.transform(X), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back.reconstruct(X), est.reconstruct(X), rtol=1e-5, atol=1e-5)


def test_structured_cannot_be_saved_in_saelens_layout(fitted_tiny, tmp_path):
    with pytest.raises(NotImplementedError, match="no architecture with a low-rank latent part"):
        fitted_tiny["structured"].save(tmp_path / "s", format="saelens")
    with pytest.raises(ValueError, match="format must be 'conceptkit' or 'saelens'"):
        fitted_tiny["topk"].save(tmp_path / "s", format="pickle")


def _write_saelens(path, arch, d_in=6, d_sae=10, apply_b_dec=True, seed=0, **cfg_extra):
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "b_dec": torch.randn(d_in, generator=g),
    }
    if arch == "jumprelu":
        w["threshold"] = torch.rand(d_sae, generator=g) * 0.5
    path.mkdir(parents=True, exist_ok=True)
    save_file(w, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": apply_b_dec,
           "normalize_activations": "none", "metadata": {"model_name": "m", "hook_name": "blocks.3"}, **cfg_extra}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w


def _saelens_reference(w, x, arch, apply_b_dec, k=None):
    """SAELens' documented inference formulas, written out independently."""
    sae_in = x - w["b_dec"] if apply_b_dec else x
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if arch == "standard":
        z = torch.relu(pre)
    elif arch == "topk":
        vals, idx = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    else:
        z = torch.relu(pre) * (pre > w["threshold"])
    return z, z @ w["W_dec"] + w["b_dec"]


@pytest.mark.parametrize("arch,apply_b_dec", [("standard", True), ("topk", False), ("jumprelu", True), ("jumprelu", False)])
def test_load_saelens_reproduces_saelens_formulas(arch, apply_b_dec, tmp_path):
    extra = {"k": 3} if arch == "topk" else {}
    w = _write_saelens(tmp_path / "sl", arch, apply_b_dec=apply_b_dec, **extra)
    est = load_saelens(tmp_path / "sl")
    assert type(est) is {"standard": ReLUSAE, "topk": TopKSAE, "jumprelu": JumpReLUSAE}[arch]
    x = torch.randn(25, 6, generator=torch.Generator().manual_seed(1)) * 2
    z_ref, x_ref = _saelens_reference(w, x, arch, apply_b_dec, k=3)
    torch.testing.assert_close(est.transform(x), z_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(est.reconstruct(x), x_ref, rtol=1e-5, atol=1e-5)
    assert est.source_ == {"model": "m", "layer": "blocks.3"}


def test_load_saelens_errors_name_file_and_field(tmp_path):
    _write_saelens(tmp_path / "a", "gated")
    with pytest.raises(NotImplementedError, match="field 'architecture' is 'gated'"):
        load_saelens(tmp_path / "a")
    _write_saelens(tmp_path / "b", "standard", normalize_activations="layer_norm")
    with pytest.raises(NotImplementedError, match="field 'normalize_activations' is 'layer_norm'"):
        load_saelens(tmp_path / "b")
    w = _write_saelens(tmp_path / "c", "standard")
    cfg = json.loads((tmp_path / "c" / "cfg.json").read_text())
    cfg["d_in"] = 7
    (tmp_path / "c" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"sae_weights.safetensors: tensor 'W_enc' has shape \(6, 10\), but cfg.json"):
        load_saelens(tmp_path / "c")
    _write_saelens(tmp_path / "d", "jumprelu")
    t = load_file(str(tmp_path / "d" / "sae_weights.safetensors"))
    del t["threshold"]
    save_file(t, str(tmp_path / "d" / "sae_weights.safetensors"))
    with pytest.raises(ValueError, match="tensor 'threshold' is missing"):
        load_saelens(tmp_path / "d")
    assert w["W_enc"].shape == (6, 10)


def test_corrupt_or_mismatched_checkpoints_raise_clear_errors(fitted_tiny, tmp_path):
    path = fitted_tiny["topk"].save(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="holds neither 'config.json'"):
        load(tmp_path / "nothing_here")
    # corrupt JSON
    good_cfg = (path / "config.json").read_text()
    (path / "config.json").write_text(good_cfg[:50])
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        load(path)
    # missing field
    cfg = json.loads(good_cfg)
    del cfg["d_in"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: missing field 'd_in'"):
        load(path)
    # unknown architecture
    cfg = json.loads(good_cfg)
    cfg["architecture"] = "gated"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"field 'architecture' is 'gated'"):
        load(path)
    # config and weights disagree
    cfg = json.loads(good_cfg)
    cfg["d_in"] = 17
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weights.safetensors: tensor '.*' has shape .* but the config implies"):
        load(path)
    (path / "config.json").write_text(good_cfg)
    # truncated weights
    raw = (path / "weights.safetensors").read_bytes()
    (path / "weights.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"weights.safetensors is not a readable safetensors file"):
        load(path)
    # missing tensor
    est = fitted_tiny["topk"]
    tensors = {k: v for k, v in est.module_.state_dict().items() if k != "b_dec"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "weights.safetensors"))
    with pytest.raises(ValueError, match=r"weights.safetensors: tensor 'b_dec' is missing"):
        load(path)


def test_checkpoint_files_are_safetensors_and_json_only(fitted_tiny, tiny_data, tmp_path):
    est = fitted_tiny["batchtopk"]
    path = est.save(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["activation"] == {"name": "batchtopk", "k": 3.0, "threshold": pytest.approx(est.threshold_)}
    assert cfg["params"]["top_k"] == 3
    assert cfg["training_stats"]["calibration_l0"] == pytest.approx(est.calibration_l0_)
    weights = load_file(str(path / "weights.safetensors"))
    assert float(weights["activation.threshold"][0]) == pytest.approx(est.threshold_)
    loaded = load(path)
    assert loaded.threshold_ == pytest.approx(est.threshold_)
    # training checkpoints too
    ck = tmp_path / "ck"
    BatchTopKSAE(n_concepts=32, top_k=3, n_epochs=1, batch_size=32, random_state=0, checkpoint_dir=ck,
                 calibration_samples=64).fit(tiny_data.X)
    names = {p.suffix for p in ck.iterdir()}
    assert names <= {".json", ".safetensors"}
    latest = json.loads((ck / "latest.json").read_text())
    assert latest["step"] == 8 and (ck / latest["tensors"]).is_file()
    assert not list(ck.glob("*.tmp"))


def test_corrupt_training_checkpoint_is_reported(tiny_data, tmp_path):
    ck = tmp_path / "ck"
    TopKSAE(n_concepts=32, top_k=3, n_epochs=1, batch_size=32, random_state=0, checkpoint_dir=ck).fit(tiny_data.X)
    latest = json.loads((ck / "latest.json").read_text())
    (ck / latest["state"]).write_text("{not json")
    with pytest.raises(ValueError, match=r"state-00000008.json is not valid JSON"):
        TopKSAE(n_concepts=32, top_k=3, n_epochs=1, batch_size=32, random_state=0,
                checkpoint_dir=ck).fit(tiny_data.X, resume=True)


def test_module_level_load_dispatches_on_architecture(fitted_tiny, tmp_path):
    for name, est in fitted_tiny.items():
        loaded = sae_pkg.load(est.save(tmp_path / name))
        assert type(loaded) is type(est)
