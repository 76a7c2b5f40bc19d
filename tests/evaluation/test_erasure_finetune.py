"""ESD and EAR on tiny random Stable Diffusion / Janus models: the objective moves, selections, TLM, checkpoints."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from evaluation.erasure.finetune import (
    EAR,
    ESD,
    FinetunedWeights,
    network_of,
    select_parameters,
)


def _builders():
    path = Path(__file__).parents[1] / "concepts" / "generators" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_erasure_tiny_generators_ft", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


B = _builders()


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from concepts.generators import StableDiffusionGenerator

    return StableDiffusionGenerator(B.build_sd(str(tmp_path_factory.mktemp("sdft"))), model_id="tiny-sd",
                                    settings={"steps": 3})


@pytest.fixture(scope="module")
def janus():
    from concepts.generators import JanusGenerator

    return JanusGenerator(B.build_janus(), B.build_janus_processor(), model_id="tiny-janus")


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _esd_gap(gen, weights, prompt, eta):
    """||eps_theta(x_t, c) - (eps(x_t, '') - eta (eps(x_t, c) - eps(x_t, '')))|| on one captured x_t."""
    from evaluation.erasure.finetune import _capture, _denoiser_inputs, _eps, _rows

    _, net = network_of(gen)
    args, kw, _ = _capture(net, lambda: gen.generate([prompt], [123], steps=3, guidance=3.0), 1, stop=True)
    call = _denoiser_inputs(args, kw)
    rows = call["sample"].shape[0]
    unc, cond = gen.cfg_layout.uncond_index(rows), gen.cfg_layout.cond_index(rows)
    base = _rows(call, cond, rows)
    emb_u = _rows(call, unc, rows)["encoder_hidden_states"]
    with torch.no_grad():
        e_c, e_u = _eps(net, base, base["encoder_hidden_states"]), _eps(net, base, emb_u)
        target = e_u - eta * (e_c - e_u)
        before = (e_c - target).norm()
        with weights.applied(gen):
            after = (_eps(net, base, base["encoder_hidden_states"]) - target).norm()
    return float(before), float(after)


def test_esd_moves_the_concept_prediction_toward_the_target_and_restores_the_model(sd):
    before_state = _state(sd.denoiser)
    esd = ESD(["a red circle"], params="xattn", iterations=12, lr=3e-3, negative_guidance=1.0, progress=False).fit(sd)
    assert all(torch.equal(v, before_state[k]) for k, v in sd.denoiser.state_dict().items())  # untouched
    w = esd.weights_
    assert w.kind == "denoiser" and all(".attn2." in n for n in w.tensors)
    assert len(esd.history_) == 12 and set(esd.history_.columns) >= {"loss", "step_index", "timestep"}
    before, after = _esd_gap(sd, w, "a red circle", 1.0)
    assert after < 0.6 * before
    # zero strength = the original generations, bit for bit; full strength changes them
    base = sd.generate(["a red circle", "a blue star"], seeds=[0, 1])
    assert torch.equal(w.apply(sd, 0.0).generate(["a red circle", "a blue star"], seeds=[0, 1]).images, base.images)
    erased = w.apply(sd).generate(["a red circle", "a blue star"], seeds=[0, 1]).images
    assert not torch.equal(erased, base.images)
    assert all(torch.equal(v, before_state[k]) for k, v in sd.denoiser.state_dict().items())


def test_esd_anchor_preserve_and_parameter_sets(sd):
    esd = ESD(["a red circle", "a red star"], ["a circle", "a star"], params="xattn-kv", iterations=3, lr=1e-3,
              preserve_prompts=["a blue circle"], preserve_weight=1.0, batch_size=2, progress=False).fit(sd)
    assert all(".attn2.to_k." in n or ".attn2.to_v." in n for n in esd.weights_.tensors)
    p = esd.history_.preserve_loss  # 0 while the weights equal the frozen model, then the kept term is active
    assert p.iloc[0] == 0.0 and (p.iloc[1:] > 0).all()
    _, net = network_of(sd)
    n_all = len(list(net.named_parameters()))
    u = select_parameters(net, "noxattn")
    assert not any(".attn2." in n for n in u) and len(u) + len(select_parameters(net, "xattn")) == n_all
    assert len(select_parameters(net, "all")) == n_all
    assert select_parameters(net, [r"conv_in\."]) == ["conv_in.weight", "conv_in.bias"]
    assert select_parameters(net, lambda n: n.startswith("conv_out")) == ["conv_out.weight", "conv_out.bias"]


def test_ear_objective_wga_and_tlm(janus):
    before_state = _state(janus.language_model)
    pairs = [("a red circle", "a circle")]
    ear = EAR(pairs, params="all", iterations=5, lr=3e-3, window=6, loss_threshold=0.0, on_policy=False, seeds=[7],
              progress=False).fit(janus)
    assert all(torch.equal(v, before_state[k]) for k, v in janus.language_model.state_dict().items())
    h = ear.history_
    assert len(h) == 5 * 3 and h.window.max() == 2  # 16 tokens in windows of 6 -> 3 updates per pair
    assert h.updated.all()
    # the loss on the concept prompt falls (same tokens, same pair: the target is reachable)
    first, last = h[h.iteration == 0].loss.mean(), h[h.iteration == 4].loss.mean()
    assert last < 0.7 * first
    # TLM: a threshold above every window loss masks every update -> the weights never move
    masked = EAR(pairs, layers=[0], iterations=2, lr=3e-3, window=8, loss_threshold=1e9, progress=False).fit(janus)
    assert not masked.history_.updated.any()
    names = list(masked.weights_.tensors)
    assert names and all(n.startswith("layers.0.self_attn.") for n in names)
    orig = dict(janus.language_model.named_parameters())
    assert all(torch.equal(t, orig[n].detach()) for n, t in masked.weights_.tensors.items())
    base = janus.generate(["a red circle"], seeds=[3])
    assert torch.equal(ear.weights_.apply(janus, 0.0).generate(["a red circle"], seeds=[3]).tokens, base.tokens)
    moved = EAR(pairs, params="all", iterations=2, lr=5e-2, window=16, loss_threshold=0.0, progress=False).fit(janus)
    assert not torch.equal(moved.weights_.apply(janus).generate(["a red circle"], seeds=[3]).tokens, base.tokens)


def test_checkpoints_resume_and_save_load(sd, tmp_path):
    kw = dict(params="xattn", lr=1e-3, progress=False)
    full = ESD(["a red circle"], iterations=4, **kw).fit(sd)
    ck = tmp_path / "ck"
    ESD(["a red circle"], iterations=2, checkpoint_dir=ck, checkpoint_every=2, **kw).fit(sd)
    assert (ck / "weights.safetensors").is_file() and (ck / "state.json").is_file()
    resumed = ESD(["a red circle"], iterations=4, checkpoint_dir=ck, checkpoint_every=2, **kw).fit(sd)
    assert list(resumed.history_.iteration) == [0, 1, 2, 3]
    for n, t in full.weights_.tensors.items():
        assert torch.allclose(resumed.weights_.tensors[n], t, atol=1e-6)
    path = full.weights_.save(tmp_path / "esd")
    back = FinetunedWeights.load(path)
    assert back.kind == "denoiser" and back.config["method"] == "esd" and len(back.history) == 4
    assert all(torch.equal(back.tensors[n], t) for n, t in full.weights_.tensors.items())
    with pytest.raises(ValueError, match="lists other parameters"):
        ESD(["a red circle"], iterations=4, checkpoint_dir=ck, params="mlp", lr=1e-3, progress=False).fit(sd)


def test_errors(sd, janus, tmp_path):
    with pytest.raises(TypeError, match="fine-tunes a denoiser"):
        ESD(["a"], iterations=1, progress=False).fit(janus)
    with pytest.raises(TypeError, match="use ESD"):
        EAR([("a", "b")], iterations=1, progress=False).fit(sd)
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        ESD(["a"], iterations=0).fit(sd)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        ESD(["a"], lr=-1.0).fit(sd)
    with pytest.raises(ValueError, match="needs checkpoint_dir"):
        ESD(["a"], checkpoint_every=2).fit(sd)
    with pytest.raises(ValueError, match="anchors must be one string or one string per prompt"):
        ESD(["a", "b"], ["x"]).fit(sd)
    with pytest.raises(TypeError, match="non-empty list of strings"):
        ESD([]).fit(sd)
    with pytest.raises(ValueError, match="unknown parameter set 'xatn'"):
        ESD(["a"], params="xatn").fit(sd)
    with pytest.raises(ValueError, match="matches no parameter"):
        ESD(["a"], params=["nothing_here"]).fit(sd)
    with pytest.raises(ValueError, match="seeds must be a non-empty list"):
        ESD(["a"], iterations=1, seeds=[], progress=False).fit(sd)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        ESD(["a"], seed=-1).fit(sd)
    with pytest.raises(ValueError, match="preserve_weight must be a non-negative"):
        ESD(["a"], preserve_prompts=["b"], preserve_weight=-1.0).fit(sd)
    with pytest.raises(ValueError, match="window must be a positive int"):
        EAR([("a", "b")], window=0).fit(janus)
    with pytest.raises(TypeError, match="pairs must be a list"):
        EAR("a red circle").fit(janus)
    with pytest.raises(TypeError, match="each pair must be"):
        EAR([("a", 1)]).fit(janus)
    with pytest.raises(ValueError, match="pairs is empty"):
        EAR([]).fit(janus)
    with pytest.raises(ValueError, match="matches no parameter"):
        EAR([("a", "b")], layers=[7]).fit(janus)
    with pytest.raises(TypeError, match="layers must be an int"):
        EAR([("a", "b")], layers="first").fit(janus)
    with pytest.raises(ValueError, match="kind must be one of"):
        select_parameters(sd.denoiser, "xattn", kind="vae")
    with pytest.raises(TypeError, match="exposes neither"):
        network_of(object())
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError, match="not fitted yet"):
        ESD(["a"]).apply(sd)
    w = FinetunedWeights("language_model", {"layers.0.self_attn.q_proj.weight": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match="fine-tune a language_model"):
        w.apply(sd)
    with pytest.raises(ValueError, match="has shape"):
        FinetunedWeights("language_model", {"layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)}).apply(janus)
    with pytest.raises(ValueError, match="no parameter"):
        FinetunedWeights("language_model", {"nope.weight": torch.zeros(2)}).apply(janus)
    with pytest.raises(TypeError, match="strength must be a real number"):
        w.apply(janus, "1")
    with pytest.raises(FileNotFoundError, match="expected weights.safetensors"):
        FinetunedWeights.load(tmp_path / "missing")
    w.save(tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="field 'format'"):
        FinetunedWeights.load(tmp_path / "w")
