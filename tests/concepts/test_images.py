"""Tests of concepts.images: the central image loader and its pitfalls."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from concepts.images import ImageLoadError, images_to_tensor, load_image, load_images

BG = (10, 200, 30)


def png_bytes(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_transparent_pixels_become_background(mode):
    if mode == "RGBA":
        im = Image.new("RGBA", (3, 2), (255, 0, 0, 0))  # fully transparent red
    elif mode == "LA":
        im = Image.new("LA", (3, 2), (255, 0))
    else:
        im = Image.new("PA", (3, 2), (0, 0))  # palette index 0, alpha 0
        im.putpalette([255, 0, 0])
    out = load_image(im, background=BG)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert (out == np.array(BG, np.uint8)).all()
    # Pillow's plain convert keeps the hidden colour (the pitfall we fix)
    if mode == "RGBA":
        assert tuple(np.asarray(im.convert("RGB"))[0, 0]) == (255, 0, 0)


def test_half_transparent_pixel_blends_and_file_roundtrip():
    im = Image.new("RGBA", (1, 1), (255, 0, 0, 128))
    a = 128 / 255
    expected = np.rint(np.array([255, 0, 0]) * a + np.array(BG) * (1 - a))
    assert load_image(im, background=BG)[0, 0].tolist() == expected.tolist()
    # the same through a PNG file on disk
    assert load_image(png_bytes(im), background=BG)[0, 0].tolist() == expected.tolist()


def test_palette_with_transparency_key():
    im = Image.new("P", (2, 1), 0)
    im.putpalette([255, 0, 0, 0, 0, 255])
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0  # palette index 0 (red) is transparent
    out = load_image(png_bytes(im, transparency=0), background=BG)
    assert out[0, 0].tolist() == list(BG)
    assert out[0, 1].tolist() == [0, 0, 255]


def test_16bit_images_are_rescaled_not_saturated():
    arr = np.array([[65535, 1000, 0]], dtype=np.uint16)
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16")
    for src in (arr, im, png_bytes(im)):
        out = load_image(src)
        assert out[0, :, 0].tolist() == [255, 4, 0]  # 1000/65535*255 = 3.9
    # Pillow's own convert saturates 1000 -> 255
    assert np.asarray(im.convert("RGB"))[0, 1, 0] == 255
    # 32-bit 'I' images holding 16-bit data, and wider int arrays
    assert load_image(Image.fromarray(arr.astype(np.int32)))[0, :, 0].tolist() == [255, 4, 0]
    assert load_image(np.array([[0, 200]], dtype=np.int64))[0, :, 0].tolist() == [0, 200]
    with pytest.raises(ImageLoadError, match=r"integer image values range \[0, 70000\]"):
        load_image(np.array([[0, 70000]], dtype=np.int64))


def test_float_images_in_unit_range():
    f = Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32))
    assert f.mode == "F"
    assert load_image(f)[0, 0].tolist() == [128, 128, 128]
    assert load_image(np.full((2, 2, 3), 0.5, dtype=np.float64))[0, 0].tolist() == [128, 128, 128]
    t = torch.zeros(3, 2, 2)
    t[0] = 1.0  # channel-first red tensor
    assert load_image(t)[1, 1].tolist() == [255, 0, 0]
    assert load_image(torch.full((3, 2, 2), 0.5, dtype=torch.bfloat16))[0, 0].tolist() == [128] * 3
    with pytest.raises(ImageLoadError, match=r"outside the expected \[0, 1\].*value_range"):
        load_image(np.full((2, 2), 7.0, dtype=np.float32))
    assert load_image(np.full((2, 2), 127.0, np.float32), value_range=(0, 255))[0, 0, 0] == 127
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(np.full((2, 2), np.nan, dtype=np.float32))


def test_array_layouts_bool_and_errors():
    chw = np.zeros((3, 5, 7), np.uint8)
    chw[2] = 255
    out = load_image(chw)
    assert out.shape == (5, 7, 3) and out[0, 0].tolist() == [0, 0, 255]
    assert load_image(np.ones((2, 2), bool))[0, 0].tolist() == [255, 255, 255]
    rgba = np.zeros((1, 1, 4), np.uint8)
    rgba[..., 0] = 255
    assert load_image(rgba, background=BG)[0, 0].tolist() == list(BG)
    with pytest.raises(ImageLoadError, match=r"expected an image array.*got shape \(2, 2, 2, 2\)"):
        load_image(np.zeros((2, 2, 2, 2), np.uint8))
    with pytest.raises(ImageLoadError, match="zero width"):
        load_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ImageLoadError, match="unsupported array dtype"):
        load_image(np.zeros((2, 2), dtype=np.complex64))
    with pytest.raises(TypeError, match="Unsupported image source int"):
        load_image(3)
    with pytest.raises(ValueError, match="background must be"):
        load_image(rgba, background=(0, 0, 300))
    with pytest.raises(TypeError, match="background must be"):
        load_image(rgba, background=5)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif)
    assert Image.open(path).size == (40, 20)
    assert load_image(path).shape == (40, 20, 3)  # dims swapped: H=40, W=20


def test_pixel_cap_downscales_and_bombs_are_refused(tmp_path):
    big = Image.new("RGB", (300, 200), (0, 128, 255))
    out = load_image(big, max_pixels=6000)
    assert out.shape[0] * out.shape[1] <= 6000 and abs(out.shape[1] / out.shape[0] - 1.5) < 0.05
    assert out[5, 5].tolist() == [0, 128, 255]
    jpg = tmp_path / "big.jpg"
    big.save(jpg)
    out = load_image(jpg, max_pixels=6000)  # decoded with draft(), then resized
    assert out.shape[0] * out.shape[1] <= 6000
    png = tmp_path / "bomb.png"
    big.save(png)
    with pytest.raises(ImageLoadError, match=r"bomb\.png.*60,000 pixels.*max_decode_pixels"):
        load_image(png, max_decode_pixels=50_000)
    assert load_image(png, max_pixels=None).shape == (200, 300, 3)


def test_unreadable_files_are_named_raised_or_skipped(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good)
    data = png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    trunc = tmp_path / "truncated.jpg"
    trunc.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    missing = tmp_path / "missing.png"
    sources = [good, trunc, garbage, missing, good]

    with pytest.raises(ImageLoadError, match="truncated.jpg") as info:
        load_images(sources)
    assert info.value.source.endswith("truncated.jpg")
    with pytest.raises(ImageLoadError, match="garbage.png.*not a readable image"):
        load_image(garbage)
    with pytest.raises(ImageLoadError, match="missing.png: file not found"):
        load_image(missing)

    images, report = load_images(sources, on_error="skip")
    assert images.shape == (2, 8, 8, 3) and images[0, 0, 0].tolist() == [1, 2, 3]
    assert report.loaded == [0, 4] and report.n_skipped == 3
    names = [name for _, name, _ in report.skipped]
    assert [n.rsplit("/", 1)[-1] for n in names] == ["truncated.jpg", "garbage.png", "missing.png"]
    assert "garbage.png" in str(report)


def test_load_images_batches_and_argument_errors():
    batch = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    out, report = load_images(batch)
    assert np.array_equal(out, batch) and report.n_loaded == 4
    t = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    out2, _ = load_images(t)
    assert np.array_equal(out2, batch)
    mixed, _ = load_images([np.zeros((2, 2, 3), np.uint8), np.zeros((3, 3, 3), np.uint8)])
    assert isinstance(mixed, list) and [m.shape for m in mixed] == [(2, 2, 3), (3, 3, 3)]
    with pytest.raises(ValueError, match="empty"):
        load_images([])
    with pytest.raises(ValueError, match="empty"):
        load_images(np.zeros((0, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="on_error must be"):
        load_images([batch[0]], on_error="ignore")
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        load_images(np.zeros((4, 4), np.uint8))


def test_images_to_tensor_scales_and_resizes():
    imgs = [np.full((4, 4, 3), 255, np.uint8), np.zeros((6, 6, 3), np.uint8)]
    with pytest.raises(ValueError, match="different sizes.*size="):
        images_to_tensor(imgs)
    x = images_to_tensor(imgs, size=5)
    assert x.shape == (2, 3, 5, 5) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(3, 5, 5)) and torch.equal(x[1], torch.zeros(3, 5, 5))


def test_pillow_bomb_limit_and_generic_open_errors(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses above 2x this
    with pytest.raises(ImageLoadError, match=r"wide\.png: refused to decode a possible decompression bomb"):
        load_image(path, max_decode_pixels=None)
    with pytest.raises(ImageLoadError, match="could not open image"):
        load_image(tmp_path)  # a directory
