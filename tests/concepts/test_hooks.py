"""Tests of concepts.hooks: record / intervene / available_layers / resolve_layers."""
from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch
from torch import nn

from concepts.hooks import (
    LayerNotFoundError,
    available_layers,
    intervene,
    primary_output,
    record,
    replace_primary_output,
    resolve_layers,
)


class Boom(RuntimeError):
    pass


class TupleOut(nn.Module):
    """Returns (tensor, aux dict), like attention blocks that return weights."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x), {"aux": 7}


@dataclasses.dataclass
class Out:
    info: str
    sample: torch.Tensor
    extra: torch.Tensor


class DataclassOut(nn.Module):
    def forward(self, x):
        return Out("meta", x * 2, x * 3)


class Net(nn.Module):
    """Small model with nested modules, a shared module called twice and an optional failure."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.pair = TupleOut()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.fail = False

    def forward(self, x):
        h = self.embed(x)
        h = self.block(h)
        h, _ = self.pair(h)
        h = self.shared(self.shared(h))
        if self.fail:
            raise Boom("forward failed")
        return self.head(h)


def no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval()


def test_available_layers_and_filter(net):
    names = available_layers(net)
    assert names == [n for n, _ in net.named_modules() if n]
    assert "block.0" in names and "" not in names
    assert available_layers(net, contains="BLOCK") == ["block", "block.0", "block.1"]
    with pytest.raises(TypeError, match="torch.nn.Module"):
        available_layers("not a model")


def test_unknown_layer_lists_closest_names(net):
    with pytest.raises(LayerNotFoundError, match=r"'blok\.0' not found.*Closest matches: \['block\.0'") as info:
        resolve_layers(net, ["embed", "blok.0"])
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    with pytest.raises(KeyError, match="lin"):
        with record(net, "lin"):  # only 'pair.lin' exists: suggested via the last component
            pass
    with pytest.raises(TypeError, match="sequence of layer names"):
        resolve_layers(net, 3)
    with pytest.raises(TypeError, match="must be strings"):
        resolve_layers(net, ["embed", 3])
    with pytest.raises(ValueError, match="layers is empty"):
        resolve_layers(net, [])
    assert list(resolve_layers(net, ["head", "embed", "head"])) == ["head", "embed"]
    assert resolve_layers(net, "")[""] is net


def test_record_values_match_manual_computation(net):
    x = torch.randn(5, 3)
    with record(net, ["embed", "block", "pair", "shared", ""]) as acts:
        y = net(x)
    h0 = x @ net.embed.weight.T + net.embed.bias
    torch.testing.assert_close(acts["embed"][0], h0)
    h1 = torch.relu(h0 @ net.block[0].weight.T + net.block[0].bias)
    torch.testing.assert_close(acts["block"][0], h1)
    torch.testing.assert_close(acts["pair"][0], net.pair.lin(h1))  # primary output of a tuple
    assert len(acts["shared"]) == 2  # called twice per forward
    torch.testing.assert_close(acts["shared"][1], net.shared(acts["shared"][0]))
    torch.testing.assert_close(acts[""][0], y)
    assert not acts["embed"][0].requires_grad
    assert no_hooks(net)


def test_record_detach_false_keeps_graph(net):
    x = torch.randn(2, 3)
    with record(net, "embed", detach=False) as acts:
        net(x).sum().backward()
    assert acts["embed"][0].requires_grad and acts["embed"][0].grad_fn is not None


def test_record_warns_on_in_place_modification_and_clone_fixes_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(inplace=True))
    x = torch.randn(8, 4)
    truth = model[0](x).detach()
    assert (truth < 0).any()
    with pytest.warns(RuntimeWarning, match=r"modified in place.*clone=True"):
        with record(model, "0") as acts:
            model(x)
    assert (acts["0"][0] >= 0).all()  # the inplace ReLU overwrote it
    with record(model, "0", clone=True) as acts:
        model(x)
    torch.testing.assert_close(acts["0"][0], truth)


def test_record_under_inference_mode(net):
    x = torch.randn(2, 3)
    with torch.inference_mode(), record(net, "embed") as acts:
        net(x)
    torch.testing.assert_close(acts["embed"][0], net.embed(x).detach())


def test_intervene_replaces_output_and_none_is_identity(net):
    x = torch.randn(4, 3)
    y0 = net(x)
    with intervene(net, {"block": lambda t: None}):
        assert torch.equal(net(x), y0)
    with intervene(net, {"pair": lambda t: torch.zeros_like(t)}):
        y = net(x)
    # with pair output zero, the rest of the network only sees biases
    h = net.shared(net.shared(torch.zeros(4, 4)))
    torch.testing.assert_close(y, net.head(h))
    assert no_hooks(net)
    # record inside intervene sees the edited value
    with intervene(net, {"embed": lambda t: t * 0 + 1.0}), record(net, "embed") as acts:
        net(x)
    assert torch.equal(acts["embed"][0], torch.ones(4, 4))


def test_intervene_preserves_structure_of_tuple_dataclass_and_modeloutput():
    x = torch.randn(2, 4)
    m = TupleOut()
    with intervene(m, {"": lambda t: t + 1}):
        out, aux = m(x)
    torch.testing.assert_close(out, m.lin(x) + 1)
    assert aux == {"aux": 7}

    d = DataclassOut()
    with intervene(d, {"": lambda t: -t}):
        o = d(x)
    assert isinstance(o, Out) and o.info == "meta"
    torch.testing.assert_close(o.sample, -2 * x)
    torch.testing.assert_close(o.extra, 3 * x)

    from transformers.modeling_outputs import BaseModelOutputWithPooling

    class HF(nn.Module):
        def forward(self, x):
            return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=x[:, 0])

    with intervene((hf := HF()), {"": lambda t: t * 10}):
        o = hf(x)
    torch.testing.assert_close(o.last_hidden_state, 10 * x)
    torch.testing.assert_close(o["last_hidden_state"], 10 * x)
    torch.testing.assert_close(o.pooler_output, x[:, 0])

    NT = namedtuple("NT", ["a", "b"])
    assert replace_primary_output(NT(torch.zeros(1), 5), torch.ones(1)) == NT(torch.ones(1), 5)
    assert torch.equal(primary_output([(torch.ones(2), 1), 2]), torch.ones(2))


def test_primary_output_and_edit_errors(net):
    with pytest.raises(TypeError, match="Could not find a tensor"):
        primary_output(("a", 1))
    with pytest.raises(TypeError, match="nothing to replace"):
        replace_primary_output({"a": 1}, torch.ones(1))
    with pytest.raises(TypeError, match="mapping"):
        with intervene(net, [("embed", lambda t: t)]):
            pass
    with pytest.raises(TypeError, match="must be callable"):
        with intervene(net, {"embed": 3}):
            pass
    with pytest.raises(TypeError, match="returned int"):
        with intervene(net, {"embed": lambda t: 1}):
            net(torch.randn(1, 3))
    assert no_hooks(net)


@pytest.mark.parametrize("layer", available_layers(Net()) + [""])
def test_hooks_removed_when_forward_raises_for_every_module(net, layer):
    x = torch.randn(2, 3)
    net.fail = True
    with pytest.raises(Boom):
        with record(net, layer) as acts:
            net(x)
    assert no_hooks(net)
    if layer not in ("", "head"):
        assert len(acts[layer]) >= 1  # recorded before the failure
    with pytest.raises(Boom):
        with intervene(net, {layer: lambda t: t}):
            net(x)
    assert no_hooks(net)
    # an edit function that raises also leaves no hooks behind
    net.fail = False

    def bad(t):
        raise Boom("edit failed")

    with pytest.raises(Boom):
        with intervene(net, {layer: bad}):
            net(x)
    assert no_hooks(net)
    # and an exception in the with-body
    with pytest.raises(Boom):
        with record(net, layer), intervene(net, {layer: lambda t: None}):
            raise Boom("body failed")
    assert no_hooks(net)
