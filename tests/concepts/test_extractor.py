"""Tests of concepts.extractor.ConceptExtractor (pooling, inputs, resume, checks) and concepts.devices."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from concepts.devices import dtype_name, resolve_device, resolve_dtype
from concepts.extractor import ConceptExtractor, NonFiniteActivationError, infer_token_layout, model_fingerprint
from concepts.hooks import LayerNotFoundError
from concepts.store import INDEX_FILE, TOKEN_TYPES, StoreMismatchError
from concepts.world import ConceptWorld

P = 8  # patch size of the toy ViT


@pytest.fixture(scope="module")
def world_images() -> np.ndarray:
    return ConceptWorld(seed=0, image_size=32).sample(10, seed=1).images  # uint8 [10, 32, 32, 3]


def patches(images: np.ndarray) -> np.ndarray:
    """Numpy truth: [n, 16, 3*P*P] patches in row-major order, channel-first within a patch, in [0, 1]."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2) / 255.0  # n, 3, H, W
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // P, P, w // P, P).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // P) * (w // P), c * P * P)


class ToyViT(nn.Module):
    """Patchify without mixing: token = [cls | registers | raw patches]; a ViT with known token values."""

    def __init__(self, registers: int = 0) -> None:
        super().__init__()
        d = 3 * P * P
        self.cls_token = nn.Parameter(torch.full((1, 1, d), -1.0))
        self.register_tokens = nn.Parameter(torch.full((1, registers, d), -2.0)) if registers else None
        self.blocks = nn.Sequential(nn.Identity(), nn.Identity())
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        n = x.shape[0]
        p = nn.functional.unfold(x, kernel_size=P, stride=P).transpose(1, 2)  # [n, L, 3*P*P]
        parts = [self.cls_token.expand(n, -1, -1)]
        if self.register_tokens is not None:
            parts.append(self.register_tokens.expand(n, -1, -1))
        h = self.blocks(torch.cat(parts + [p], dim=1))
        return self.head(h[:, 0])


class PoolNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(8)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.flat = nn.Flatten()

    def forward(self, x):
        return self.flat(self.conv(self.pool(x)).mean(dim=(2, 3)))


def test_tokens_cls_mean_pooling_match_truth_on_concept_world(world_images):
    model = ToyViT(registers=2)
    assert infer_token_layout(model) == {"cls": 1, "register": 2}
    truth = patches(world_images)  # [10, 16, 192]
    ext = ConceptExtractor(model, ["blocks.0", "blocks.1"], pooling={"blocks.0": "tokens", "blocks.1": "mean"},
                           batch_size=4, progress=False)
    store = ext.extract(world_images)
    rows = store.read("blocks.0")
    assert rows.shape == (10 * 19, 192)
    types = store.read_meta("token_type", "blocks.0")
    pos = store.read_meta("position", "blocks.0")
    img = store.read_meta("image_index", "blocks.0")
    assert types[:19].tolist() == [TOKEN_TYPES["cls"]] + [TOKEN_TYPES["register"]] * 2 + [TOKEN_TYPES["patch"]] * 16
    assert img.tolist() == np.repeat(np.arange(10), 19).tolist()
    patch_rows = store.read("blocks.0", token_types=["patch"])
    np.testing.assert_allclose(patch_rows.numpy(), truth.reshape(-1, 192), atol=1e-6)
    # row of image i, position p holds patch p-3 of image i
    r = 5 * 19 + 7
    assert img[r] == 5 and pos[r] == 7
    np.testing.assert_allclose(rows[r].numpy(), truth[5, 4], atol=1e-6)
    assert torch.equal(store.read("blocks.0", token_types=["cls"]), torch.full((10, 192), -1.0))
    assert torch.equal(store.read("blocks.0", token_types=["register"]), torch.full((20, 192), -2.0))
    # mean pooling averages the patch tokens only (cls and registers excluded)
    np.testing.assert_allclose(store.read("blocks.1").numpy(), truth.mean(axis=1), atol=1e-6)
    assert store.metadata["token_layout"] == {"cls": 1, "register": 2}
    cls_store = ConceptExtractor(model, "blocks.1", pooling="cls", progress=False).extract(world_images)
    assert torch.equal(cls_store.read(), torch.full((10, 192), -1.0))


def test_spatial_and_mean_pooling_of_conv_maps(world_images):
    model = PoolNet()
    store = ConceptExtractor(model, ["pool", "conv"], pooling={"pool": "spatial", "conv": "mean"},
                             batch_size=3, progress=False).extract(world_images)
    x = world_images.astype(np.float64) / 255.0
    pooled = x.reshape(10, 4, 8, 4, 8, 3).mean(axis=(2, 4))  # [n, 4, 4, 3] block means (truth)
    rows = store.read("pool").numpy()
    assert rows.shape == (10 * 16, 3)
    np.testing.assert_allclose(rows, pooled.reshape(-1, 3), atol=1e-5)
    pos = store.read_meta("position", "pool")
    assert pos[:16].tolist() == list(range(16))  # h * W + w
    assert store.metadata["grid"] == {"pool": [4, 4]}
    xt = torch.from_numpy(world_images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        conv_mean = model.conv(model.pool(xt)).mean(dim=(2, 3))
    torch.testing.assert_close(store.read("conv"), conv_mean)
    tok = ConceptExtractor(model, "pool", pooling="tokens", progress=False).extract(world_images)
    assert torch.equal(tok.read(), store.read("pool"))  # tokens on a conv map == spatial


def test_all_input_kinds_give_the_same_store(world_images, tmp_path):
    model = ToyViT()
    ext = ConceptExtractor(model, "blocks.1", pooling="mean", batch_size=4, progress=False)
    ref = ext.extract(world_images).read()
    (tmp_path / "imgs").mkdir()
    paths = []
    for i, im in enumerate(world_images):
        paths.append(tmp_path / "imgs" / f"img_{i:02d}.png")
        Image.fromarray(im).save(paths[-1])
    xf = torch.from_numpy(world_images).permute(0, 3, 1, 2).float() / 255
    loader = DataLoader(TensorDataset(xf, torch.zeros(10)), batch_size=3)
    inputs = {
        "uint8 tensor NCHW": torch.from_numpy(world_images).permute(0, 3, 1, 2).contiguous(),
        "PIL list": [Image.fromarray(im) for im in world_images],
        "paths": paths,
        "directory": tmp_path / "imgs",
        "float tensor (model-ready)": xf,
        "loader of (x, y)": loader,
        "generator of dicts": ({"pixel_values": xf[i:i + 5]} for i in range(0, 10, 5)),
        "generator of PIL": (Image.fromarray(im) for im in world_images),
        "ConceptWorld Dataset": ConceptWorld(seed=0, image_size=32).dataset(10, seed=1),
        "list of (PIL, label)": [(Image.fromarray(im), 0) for im in world_images],
        "Dataset of (PIL, label)": ConceptWorld(seed=0, image_size=32).dataset(10, seed=1, transform=Image.fromarray),
    }
    for name, inp in inputs.items():
        out = ext.extract(inp).read()
        assert torch.equal(out, ref), name
    assert ext.extract(loader).metadata["preprocessing"] == "none (model-ready tensors)"


def test_preprocess_forward_fn_device_dtype_and_one_pass(world_images):
    model = PoolNet()
    calls = []

    def fwd(m, x):
        calls.append(len(x))
        return m(x)

    ext = ConceptExtractor(model, ["pool", "conv", "flat"], preprocess=lambda im: torch.ones(3, 16, 16),
                           forward_fn=fwd, device="auto", dtype="float64", batch_size=4, progress=False)
    store = ext.extract(world_images)
    assert calls == [4, 4, 2]  # all layers recorded in one pass per batch
    assert torch.equal(store.read("pool", dtype=None), torch.ones(10, 3))  # preprocess was applied
    assert model.conv.weight.dtype == torch.float64 and store.metadata["model_dtype"] == "float64"
    assert "test_extractor" in store.metadata["forward_fn"]
    model.train()
    ext.extract(world_images[:2])
    assert model.training  # mode restored
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


@pytest.mark.parametrize("pooling", ["mean", "tokens"])
def test_views_are_copied_before_in_place_ops(pooling):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True))
    x = torch.randn(6, 4)
    truth = model[0](x).detach()
    assert (truth < 0).any()
    if pooling == "tokens":
        x = x[:, None].repeat(1, 3, 1)  # [B, T=3, 4]: tokens pooling reshapes the output (a view)
        truth = truth.repeat_interleave(3, dim=0)
    store = ConceptExtractor(model, "0", pooling=pooling, token_layout={"cls": 0}, progress=False).extract(x)
    torch.testing.assert_close(store.read(), truth)


class Tripwire(nn.Module):
    """Raises after N forward calls (a plain attribute, so the model fingerprint is unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_after: int | None = None
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        return x


def resume_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), Tripwire(), nn.Conv2d(8, 8, 3),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.mark.parametrize("storage", ["safetensors", "npy"])
def test_killed_extraction_resumes_bit_for_bit(tmp_path, storage):
    images = np.random.default_rng(0).integers(0, 256, (50, 16, 16, 3), dtype=np.uint8)
    kw = dict(pooling={"1": "spatial", "5": "mean"}, batch_size=8, shard_size=12, storage=storage, progress=False)
    model = resume_model()
    full = ConceptExtractor(model, ["1", "5"], **kw).extract(images, tmp_path / "full")

    model[2].fail_after, model[2].calls = 4, 0  # dies in batch 4 (inputs 32-39), mid-shard
    ext = ConceptExtractor(model, ["1", "5"], **kw)
    with pytest.raises(KeyboardInterrupt):
        ext.extract(images, tmp_path / "part")
    index = json.loads((tmp_path / "part" / INDEX_FILE).read_text())
    assert [s["samples"] for s in index["shards"]] == [12, 12]  # shards 0-1 complete (inputs 0-23)
    assert not index["complete"]
    # leftovers of a hard kill: a half-written tmp file and an unlisted shard file
    (tmp_path / "part" / "shard_00002.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "part" / "shard_00007.safetensors").write_bytes(b"junk")

    with pytest.raises(FileExistsError, match="resume=True"):
        ext.extract(images, tmp_path / "part")
    model[2].fail_after = None
    resumed = ext.extract(images, tmp_path / "part", resume=True)
    assert resumed.complete and resumed.num_samples == 50
    for layer in ("1", "5"):
        assert torch.equal(resumed.read(layer, dtype=None), full.read(layer, dtype=None))
        assert torch.equal(resumed.read_meta("image_index", layer), full.read_meta("image_index", layer))
    assert [f["sha256"] for s in resumed.shards for f in s["files"]] == \
        [f["sha256"] for s in full.shards for f in s["files"]]
    for s in full.shards:
        for f in s["files"]:
            a = (tmp_path / "full" / f["name"]).read_bytes()
            b = (tmp_path / "part" / f["name"]).read_bytes()
            assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    assert not list((tmp_path / "part").glob("*.tmp")) and not (tmp_path / "part" / "shard_00007.safetensors").exists()
    # resuming a complete store is a no-op
    again = ext.extract(images, tmp_path / "part", resume=True)
    assert again.num_samples == 50


def test_resume_from_a_loader_and_mismatch_errors(tmp_path):
    images = torch.rand(30, 3, 16, 16)
    loader = DataLoader(TensorDataset(images), batch_size=7)
    model = resume_model()
    kw = dict(pooling="mean", shard_size=10, progress=False)
    full = ConceptExtractor(model, ["3"], **kw).extract(loader, tmp_path / "full")
    model[2].fail_after, model[2].calls = 3, 0
    with pytest.raises(KeyboardInterrupt):
        ConceptExtractor(model, ["3"], **kw).extract(loader, tmp_path / "part")
    model[2].fail_after = None
    with pytest.raises(StoreMismatchError, match=r"index.json: field 'layers'"):
        ConceptExtractor(model, ["5"], **kw).extract(loader, tmp_path / "part", resume=True)
    with pytest.raises(StoreMismatchError, match=r"field 'pooling.3'"):
        ConceptExtractor(model, ["3"], **dict(kw, pooling="spatial")).extract(loader, tmp_path / "part", resume=True)
    other = resume_model()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    with pytest.raises(StoreMismatchError, match=r"field 'model.fingerprint'"):
        ConceptExtractor(other, ["3"], **kw).extract(loader, tmp_path / "part", resume=True)
    resumed = ConceptExtractor(model, ["3"], **kw).extract(loader, tmp_path / "part", resume=True)
    assert torch.equal(resumed.read(dtype=None), full.read(dtype=None))
    assert [s["samples"] for s in resumed.shards] == [10, 10, 10]


def test_non_finite_activations_are_reported_with_batch_and_layer():
    class NaNAt(nn.Module):
        """Injects NaN into row 1 of its third call."""

        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, h):
            self.calls += 1
            if self.calls == 3:
                h = h.clone()
                h[1] = float("nan")
            return h

    x = torch.randn(20, 4)
    model = nn.Sequential(nn.Linear(4, 4), NaNAt(), nn.Linear(4, 2))
    with pytest.raises(NonFiniteActivationError, match=r"Layer '1' produced non-finite activations in batch 2 "
                                                        r"\(inputs 10-14\): 4 NaN and 0 Inf"):
        ConceptExtractor(model, ["0", "1"], batch_size=5, progress=False).extract(x)
    model[1].calls = 0
    store = ConceptExtractor(model, "1", batch_size=5, check_finite=False, progress=False).extract(x)
    assert torch.isnan(store.read()).sum() == 4 and torch.isnan(store.read()[11]).all()

    big = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        big[0].weight.fill_(1e5)
    with pytest.raises(NonFiniteActivationError, match=r"Layer '0' has values up to .* float16 range"):
        ConceptExtractor(big, "0", store_dtype="float16", progress=False).extract(torch.ones(3, 4))
    bf = ConceptExtractor(big, "0", store_dtype="bf16", progress=False).extract(torch.ones(3, 4))
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.read(), big(torch.ones(3, 4)).detach(), rtol=1e-2, atol=0)


def test_skipped_files_are_recorded(tmp_path, world_images):
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        if i == 2:
            p.write_bytes(b"garbage")
        else:
            Image.fromarray(world_images[i]).save(p)
        paths.append(p)
    ext = ConceptExtractor(ToyViT(), "blocks.1", batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"2.png"):
        ext.extract(paths)
    store = ext.extract(paths, on_error="skip")
    assert store.read_meta("image_index").tolist() == [0, 1, 3, 4]
    assert [s[0] for s in store.skipped] == [2] and store.skipped[0][1].endswith("2.png")
    np.testing.assert_allclose(store.read()[2].numpy(), patches(world_images[3:4]).mean(axis=1)[0], atol=1e-6)


def test_argument_and_shape_errors(world_images):
    vit, conv = ToyViT(), PoolNet()
    with pytest.raises(LayerNotFoundError, match=r"Closest matches: \['blocks.1'"):
        ConceptExtractor(vit, "blocks.l")
    with pytest.raises(ValueError, match="Unknown pooling 'max'"):
        ConceptExtractor(vit, "blocks.1", pooling="max")
    with pytest.raises(ValueError, match="no entry for layers"):
        ConceptExtractor(vit, ["blocks.0", "blocks.1"], pooling={"blocks.0": "cls"})
    with pytest.raises(ValueError, match="not in layers"):
        ConceptExtractor(vit, "blocks.0", pooling={"blocks.0": "cls", "head": "cls"})
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ConceptExtractor(lambda x: x, "a")
    with pytest.raises(ValueError, match="batch_size"):
        ConceptExtractor(vit, "head", batch_size=0)
    with pytest.raises(ValueError, match="cannot hold bfloat16"):
        ConceptExtractor(vit, "head", store_dtype="bfloat16", storage="npy")
    with pytest.raises(ValueError, match="token_layout"):
        ConceptExtractor(vit, "head", token_layout={"cls": 1, "regs": 2})
    imgs = world_images[:2]
    with pytest.raises(ValueError, match="conv map .* no cls token"):
        ConceptExtractor(conv, "pool", pooling="cls", progress=False).extract(imgs)
    with pytest.raises(ValueError, match="pooling='spatial' is for conv maps"):
        ConceptExtractor(vit, "blocks.0", pooling="spatial", progress=False).extract(imgs)
    with pytest.raises(ValueError, match="one vector per sample"):
        ConceptExtractor(vit, "head", pooling="tokens", progress=False).extract(imgs)
    with pytest.raises(ValueError, match="no cls token"):
        ConceptExtractor(vit, "blocks.0", pooling="cls", token_layout={"cls": 0}, progress=False).extract(imgs)
    with pytest.raises(RuntimeError, match="were not called"):
        ConceptExtractor(vit, "head", forward_fn=lambda m, x: m.blocks(x), progress=False).extract(torch.rand(2, 5))

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(self.lin(x))

    with pytest.raises(RuntimeError, match="called more than once"):
        ConceptExtractor(Twice(), "lin", progress=False).extract(torch.rand(2, 3))
    assert all(len(m._forward_hooks) == 0 for m in Twice().modules())
    for empty in (np.zeros((0, 8, 8, 3), np.uint8), [], iter([])):
        with pytest.raises(ValueError, match="No inputs"):
            ConceptExtractor(vit, "head", progress=False).extract(empty)
    with pytest.raises(TypeError, match="Unsupported inputs"):
        ConceptExtractor(vit, "head", progress=False).extract(42)
    with pytest.raises(ValueError, match="on_error"):
        ConceptExtractor(vit, "head", progress=False).extract(imgs, on_error="ignore")


def test_model_fingerprint_and_devices():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    fa = model_fingerprint(a, "lin")
    assert fa["name"] == "lin" and fa["n_params"] == 12 and fa["class"].endswith("Linear")
    assert fa["fingerprint"] != model_fingerprint(b)["fingerprint"]
    b.load_state_dict(a.state_dict())
    assert fa["fingerprint"] == model_fingerprint(b)["fingerprint"]

    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="Unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(TypeError, match="device must be"):
        resolve_device(3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    for spec, want in [("fp16", torch.float16), ("torch.bfloat16", torch.bfloat16), ("half", torch.float16),
                       (torch.float64, torch.float64), ("Float32", torch.float32)]:
        assert resolve_dtype(spec) is want
    assert resolve_dtype(None) is None and resolve_dtype(None, torch.float32) is torch.float32
    with pytest.raises(ValueError, match="Unknown dtype 'fp8'"):
        resolve_dtype("fp8")
    with pytest.raises(ValueError, match="not a floating-point"):
        resolve_dtype(torch.int64)
    with pytest.raises(TypeError, match="dtype must be"):
        resolve_dtype(16)
    assert dtype_name(torch.bfloat16) == "bfloat16"


def test_more_input_and_output_errors():
    vit = ToyViT()
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(TypeError, match="preprocess must be callable"):
        ConceptExtractor(vit, "head", preprocess=3)
    with pytest.raises(TypeError, match="forward_fn must be callable"):
        ConceptExtractor(vit, "head", forward_fn="encode_image")
    with pytest.raises(ValueError, match="storage must be"):
        ConceptExtractor(vit, "head", storage="zarr")
    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        ConceptExtractor(vit, "head", shard_size=0)
    with pytest.raises(TypeError, match="pooling must be a string or a dict"):
        ConceptExtractor(vit, "head", pooling=["mean"])
    ext = ConceptExtractor(vit, "head", progress=False)
    with pytest.raises(ValueError, match="0-d tensor"):
        ext.extract(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"image batch array must be \[n, H, W\]"):
        ext.extract(np.zeros((2, 2, 8, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="A batch from the loader is a list"):
        ext.extract(iter([[x, x], ["not", "tensors"]]))
    with pytest.raises(TypeError, match="preprocess returned ndarray"):
        ConceptExtractor(vit, "head", preprocess=lambda im: np.zeros((3, 8, 8)), progress=False).extract(
            np.zeros((2, 8, 8, 3), np.uint8))

    class Shapes(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.shape = shape
            self.out = nn.Identity()

        def forward(self, x):
            return self.out(torch.zeros(self.shape))

    cases = [
        ((3, 4), "mean", "first dimension is not the batch size 2"),
        ((3, 5, 4), "mean", "no batch dimension of size 2"),
        ((3, 2, 4, 4), "mean", r"expected \[B=2, C, H, W\]"),
        ((2, 1, 1, 1, 1), "mean", "5-d output"),
        ((2, 1, 4), "mean", "leaves no patch tokens"),
    ]
    for shape, pooling, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            ConceptExtractor(Shapes(shape), "out", pooling=pooling, token_layout={"cls": 1}, progress=False).extract(x)
    with pytest.raises(ValueError, match="fewer than token_layout"):
        ConceptExtractor(Shapes((2, 1, 4)), "out", pooling="tokens", token_layout={"cls": 1, "register": 2},
                         progress=False).extract(x)
    seq_first = ConceptExtractor(Shapes((5, 2, 4)), "out", pooling="tokens", token_layout={"cls": 1},
                                 progress=False).extract(x)
    assert seq_first.num_rows() == 10  # [T, B, D] outputs are transposed to batch-first


def test_all_inputs_of_a_shard_skipped(tmp_path, world_images):
    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        if i < 2:
            Image.fromarray(world_images[i]).save(p)
        else:
            p.write_bytes(b"garbage")
        paths.append(p)
    ext = ConceptExtractor(ToyViT(), "blocks.1", batch_size=2, shard_size=2, progress=False)
    store = ext.extract(paths, on_error="skip")
    assert [s["rows"]["blocks.1"] for s in store.shards] == [2, 0] and len(store) == 2
    with pytest.raises(ValueError, match="None of the inputs 0-1 could be loaded"):
        ext.extract(paths[::-1], on_error="skip")
