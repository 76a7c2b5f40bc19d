"""Tests of concepts.encoders on randomly initialised real architectures (offline)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from concepts.encoders import (
    CallableEncoder,
    DINOv2Encoder,
    Encoder,
    OpenCLIPEncoder,
    ResizeCropNormalize,
    TransformersVisionEncoder,
)
from concepts.hooks import record
from concepts.store import TOKEN_TYPES
from concepts.world import ConceptWorld

open_clip = pytest.importorskip("open_clip")

TINY_CLIP = dict(
    embed_dim=16,
    vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
    text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return ConceptWorld(seed=0, image_size=32).sample(6, seed=2).images


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    preprocess = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=16)
    return model, preprocess, tokenizer


def direct_image_embeddings(model, preprocess, images) -> torch.Tensor:
    x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    with torch.no_grad():
        return torch.nn.functional.normalize(model.encode_image(x), dim=-1)


def test_openclip_encoder_matches_direct_calls_for_every_input_kind(tiny_clip, images, tmp_path):
    model, preprocess, tokenizer = tiny_clip
    enc = OpenCLIPEncoder(model, preprocess, tokenizer)
    assert isinstance(enc, Encoder) and enc.embed_dim == 16
    truth = direct_image_embeddings(model, preprocess, images)
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(im).save(paths[-1])
    kinds = {
        "uint8 array": images,
        "float tensor [0, 1]": torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255,
        "PIL": [Image.fromarray(im) for im in images],
        "paths": paths,
    }
    for name, inp in kinds.items():
        emb = enc.encode_images(inp, batch_size=4)
        torch.testing.assert_close(emb, truth, msg=name)
    assert torch.allclose(emb.norm(dim=1), torch.ones(6))
    raw = enc.encode_images(images, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), truth)

    texts = ["a red circle", "two blue stars on stripes"]
    with torch.no_grad():
        t_truth = torch.nn.functional.normalize(model.encode_text(tokenizer(texts)), dim=-1)
    torch.testing.assert_close(enc.encode_texts(texts), t_truth)
    with pytest.raises(TypeError, match="single str"):
        enc.encode_texts("a red circle")
    with pytest.raises(ValueError, match="texts is empty"):
        enc.encode_texts([])
    with pytest.raises(TypeError, match="all be strings"):
        enc.encode_texts(["a", 3])
    with pytest.raises(ValueError, match="No images"):
        enc.encode_images([])
    with pytest.raises(TypeError, match="encode_image"):
        OpenCLIPEncoder(torch.nn.Linear(2, 2), preprocess, tokenizer)


def test_openclip_extractor_uses_encode_image_and_token_types(tiny_clip, images):
    model, preprocess, tokenizer = tiny_clip
    enc = OpenCLIPEncoder(model, preprocess, tokenizer, name="tiny")
    layer = "visual.transformer.resblocks.1"
    store = enc.extractor([layer, "visual", ""], pooling={layer: "tokens", "visual": "mean", "": "cls"},
                          batch_size=4, progress=False).extract(images)
    assert store.metadata["model"]["name"] == "tiny"
    assert store.metadata["token_layout"] == {"cls": 1, "register": 0}
    types = store.read_meta("token_type", layer)
    assert types[:17].tolist() == [TOKEN_TYPES["cls"]] + [TOKEN_TYPES["patch"]] * 16
    x = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    with torch.no_grad(), record(model, layer) as acts:
        emb = model.encode_image(x)
    torch.testing.assert_close(store.read(layer), acts[layer][0].reshape(-1, 32))
    torch.testing.assert_close(store.read("visual"), emb)  # 'visual' output == unnormalised embedding
    torch.testing.assert_close(store.read(""), emb)  # "" is what forward_fn (encode_image) returned


def test_openclip_from_pretrained_local_dir_and_checkpoint_file(tiny_clip, images, tmp_path):
    model, _, _ = tiny_clip
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {"size": 32}}))
    save_file(state, str(d / "open_clip_model.safetensors"))
    enc = OpenCLIPEncoder.from_pretrained(f"local-dir:{d}")
    truth = direct_image_embeddings(model, enc.preprocess, images)
    torch.testing.assert_close(enc.encode_images(images), truth)  # same weights, same embeddings
    assert enc.encode_texts(["a star"]).shape == (1, 16)

    cfg_path = tmp_path / "ck-tiny-test.json"
    cfg_path.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg_path)
    ckpt = tmp_path / "weights.safetensors"
    save_file(state, str(ckpt))
    enc2 = OpenCLIPEncoder.from_pretrained("ck-tiny-test", pretrained=ckpt)
    assert enc2.name == "ck-tiny-test:weights.safetensors"
    torch.testing.assert_close(enc2.encode_images(images), enc.encode_images(images))
    with pytest.raises(FileNotFoundError, match="looks like a file path"):
        OpenCLIPEncoder.from_pretrained("ck-tiny-test", pretrained=tmp_path / "missing.safetensors")
    with pytest.raises(RuntimeError, match=r"Could not load pretrained weights 'no_such_tag'.*local checkpoint"):
        OpenCLIPEncoder.from_pretrained("ck-tiny-test", pretrained="no_such_tag")


@pytest.fixture(scope="module")
def vit_b_32():
    """The real ViT-B-32 architecture, random weights (151M params, built once)."""
    return OpenCLIPEncoder.from_pretrained("ViT-B-32", pretrained=None)


def test_vit_b_32_random_init_end_to_end(vit_b_32, images):
    enc = vit_b_32
    assert enc.embed_dim == 512 and enc.name == "ViT-B-32"
    emb = enc.encode_images(images[:1], normalize=False)
    txt = enc.encode_texts(["a red circle", "a blue star"])
    assert emb.shape == (1, 512) and txt.shape == (2, 512)
    assert torch.allclose(txt.norm(dim=1), torch.ones(2))
    layer = "visual.transformer.resblocks.11"
    ext = enc.extractor([layer, ""], pooling={layer: "tokens", "": "mean"}, progress=False)
    with record(enc.model, layer) as acts:  # the truth, recorded in the same forward pass
        store = ext.extract(images[:1])
    types = store.read_meta("token_type", layer)
    assert store.num_rows(layer) == 50 and types.tolist() == [0] + [2] * 49  # cls + 7x7 patches of 224/32
    torch.testing.assert_close(store.read(layer), acts[layer][0][0])
    torch.testing.assert_close(store.read(layer, token_types=["cls"]), acts[layer][0][:, 0])
    torch.testing.assert_close(store.read(""), emb)  # encode_image output == encode_images(normalize=False)


def tiny_dinov2(registers: int):
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8,
              image_size=32)
    if registers:
        return Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw)).eval()
    return Dinov2Model(Dinov2Config(**kw)).eval()


def test_dinov2_with_registers_token_types_and_pooling(images):
    model = tiny_dinov2(registers=4)
    enc = DINOv2Encoder(model)
    assert enc.token_layout == {"cls": 1, "register": 4} and enc.embed_dim == 32
    tokens, types = enc.encode_tokens(images)
    assert tokens.shape == (6, 21, 32)
    assert types.tolist() == [0, 1, 1, 1, 1] + [2] * 16
    x = torch.stack([ResizeCropNormalize(32)(Image.fromarray(im)) for im in images])
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state
    torch.testing.assert_close(tokens, hidden)
    torch.testing.assert_close(enc.encode_images(images), torch.nn.functional.normalize(hidden[:, 0], dim=-1))
    mean_enc = DINOv2Encoder(model, pooling="mean")
    torch.testing.assert_close(mean_enc.encode_images(images, normalize=False), hidden[:, 5:].mean(dim=1))
    both = DINOv2Encoder(model, pooling="cls+mean")
    assert both.embed_dim == 64 and both.encode_images(images).shape == (6, 64)

    store = enc.extractor(["encoder.layer.1", "layernorm"], pooling={"encoder.layer.1": "tokens", "layernorm": "mean"},
                          batch_size=4, progress=False).extract(images)
    assert store.read_meta("token_type", "encoder.layer.1")[:21].tolist() == types.tolist()
    torch.testing.assert_close(store.read("layernorm"), hidden[:, 5:].mean(dim=1))  # registers excluded
    assert store.read("encoder.layer.1", token_types=["register"]).shape == (24, 32)
    with pytest.raises(NotImplementedError, match="image-only"):
        enc.encode_texts(["a red circle"])
    with pytest.raises(ValueError, match="pooling must be"):
        DINOv2Encoder(model, pooling="max")


def test_dinov2_without_registers_and_from_pretrained(images, tmp_path):
    from transformers import BitImageProcessor

    model = tiny_dinov2(registers=0)
    enc = DINOv2Encoder(model)
    assert enc.token_layout == {"cls": 1, "register": 0}
    _, types = enc.encode_tokens(images[:1])
    assert types.tolist() == [0] + [2] * 16
    model.save_pretrained(tmp_path / "dino")
    loaded = TransformersVisionEncoder.from_pretrained(tmp_path / "dino")
    torch.testing.assert_close(loaded.encode_images(images), enc.encode_images(images))
    proc = BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(tmp_path / "dino")
    with_proc = TransformersVisionEncoder.from_pretrained(tmp_path / "dino")
    x = proc(images=[Image.fromarray(im) for im in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        truth = torch.nn.functional.normalize(model(pixel_values=x).last_hidden_state[:, 0], dim=-1)
    torch.testing.assert_close(with_proc.encode_images(images), truth)
    with pytest.raises(RuntimeError, match="Could not load a transformers model"):
        TransformersVisionEncoder.from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(TypeError, match="transformers nn.Module"):
        DINOv2Encoder(lambda x: x)


def test_callable_encoder_with_torchvision_module_and_functions(images):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=8).eval()
    enc = CallableEncoder(net, preprocess=ResizeCropNormalize(32))
    assert isinstance(enc, Encoder) and enc.embed_dim == 8
    x = torch.stack([ResizeCropNormalize(32)(Image.fromarray(im)) for im in images])
    with torch.no_grad():
        truth = torch.nn.functional.normalize(net(x), dim=-1)
    torch.testing.assert_close(enc.encode_images(images, batch_size=4), truth)
    store = enc.extractor("layer4", pooling="spatial", progress=False).extract(images)
    assert store.num_rows() == 6 * 1 * 1 and store.dim() == 512

    mean_rgb = CallableEncoder(lambda x: x.mean(dim=(2, 3)), text_fn=lambda t: torch.ones(len(t), 3))
    out = mean_rgb.encode_images(images, normalize=False)
    torch.testing.assert_close(out, torch.from_numpy(images.reshape(6, -1, 3).mean(1) / 255).float())
    assert mean_rgb.embed_dim == 3
    torch.testing.assert_close(mean_rgb.encode_texts(["a", "b"]), torch.full((2, 3), 3 ** -0.5))
    tokens = CallableEncoder(lambda x: torch.stack([x.mean(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], 1)[..., None],
                             pooling="cls")
    torch.testing.assert_close(tokens.encode_images(images, normalize=False)[:, 0],
                               torch.from_numpy(images.reshape(6, -1).mean(1) / 255).float())
    with pytest.raises(NotImplementedError, match="no text_fn"):
        CallableEncoder(lambda x: x.mean(dim=(2, 3))).encode_texts(["a"])
    with pytest.raises(TypeError, match="image_fn must be callable"):
        CallableEncoder(3)
    with pytest.raises(ValueError, match="pooling must be"):
        CallableEncoder(lambda x: x, pooling="max")
    with pytest.raises(ValueError, match="expected \\[n, d\\]"):
        CallableEncoder(lambda x: x[:, 0, 0, 0]).encode_images(images)
    with pytest.raises(TypeError, match="needs image_fn to be a torch.nn.Module"):
        mean_rgb.extractor("x")


def test_encoder_argument_errors(tiny_clip, images):
    from concepts.encoders import HFProcessorTransform
    from concepts.encoders.base import iter_image_chunks, preprocess_images

    model, preprocess, tokenizer = tiny_clip
    with pytest.raises(TypeError, match="preprocess must be callable"):
        OpenCLIPEncoder(model, None, tokenizer)
    with pytest.raises(TypeError, match="tokenizer must be callable"):
        OpenCLIPEncoder(model, preprocess, "bpe")

    class Duck:  # encode_image/encode_text but not an nn.Module
        def encode_image(self, x):
            return x.flatten(1)

        def encode_text(self, t):
            return t.float()

    duck = OpenCLIPEncoder(Duck(), preprocess, tokenizer)
    assert duck.embed_dim == 16  # probed through encode_texts (context length 16)
    with pytest.raises(TypeError, match="needs the model to be a torch.nn.Module"):
        duck.extractor("x")
    with pytest.raises(TypeError, match="processor must be a callable"):
        HFProcessorTransform(3)
    dino = tiny_dinov2(registers=0)
    with pytest.raises(TypeError, match="image_processor must be"):
        DINOv2Encoder(dino, image_processor=3)
    with pytest.raises(TypeError, match="no config.hidden_size"):
        TransformersVisionEncoder(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        list(iter_image_chunks(images, 0))
    with pytest.raises(TypeError, match="preprocess returned list"):
        preprocess_images(images[:1], lambda im: [1, 2])
    with pytest.raises(TypeError, match="text_fn must be callable"):
        CallableEncoder(lambda x: x, text_fn=5)
    with pytest.raises(ValueError, match="returned 1 rows for 6 images"):
        CallableEncoder(lambda x: x[:1].mean(dim=(2, 3))).encode_images(images)
    with pytest.raises(ValueError, match="conv map .* no cls token"):
        CallableEncoder(lambda x: x, pooling="cls").encode_images(images)
