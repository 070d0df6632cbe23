"""Image and mask conversions of user input (mmr1.images): every PIL mode, ComfyUI tensors, masks, crops, letterbox."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from mmr1.errors import InputError
from mmr1.images import (
    BACKGROUND_GREY,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    bounded_size,
    crop_to_mask,
    image_batch_to_pils,
    letterbox,
    mask_to_array,
    open_image,
    pil_to_tensor,
    tensor_to_pil,
    to_rgb,
)
from tests.conftest import ORIENTATION_TAG, marked_photo, save_rotated_photo


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


GREY = list(BACKGROUND_GREY)


# ------------------------------------------------------------------------------------------------ open_image


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_open_image_turns_the_photo_by_its_exif_orientation(tmp_path, suffix):
    displayed = save_rotated_photo(tmp_path / f"photo{suffix}", marked_photo())
    image = open_image(tmp_path / f"photo{suffix}")
    assert image.size == (48, 40)
    np.testing.assert_array_equal(rgb(to_rgb(image)), rgb(displayed))
    if suffix == ".png":  # lossless: the very photo that was displayed
        np.testing.assert_array_equal(rgb(to_rgb(image)), rgb(marked_photo()))


def test_open_image_keeps_the_mode_for_to_rgb(tmp_path):
    """A turned 16-bit photo stays 16-bit, so `to_rgb` scales it as it scales any 16-bit image."""
    stored = Image.fromarray(np.full((6, 4), 65535, dtype=np.uint16))
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    stored.save(tmp_path / "deep.png", exif=exif)
    image = open_image(tmp_path / "deep.png")
    assert image.mode == stored.mode and image.size == (6, 4)
    assert rgb(to_rgb(image)).min() == 255


def test_open_image_names_a_file_that_is_no_image(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match="Cannot read reference image .*notes.png"):
        open_image(tmp_path / "notes.png", "reference image")


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG of a few dozen bytes whose IHDR declares width x height RGB pixels: the shape of a decompression bomb
    (its pixel data is one compressed row, so only the declared size is huge)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height", [(30000, 30000), (12001, 12000)])
def test_open_image_refuses_a_declared_size_over_the_limit(tmp_path, width, height):
    """Over PIL's own bomb limit (30000x30000) and just over ours (between PIL's warning and error thresholds):
    both an InputError naming the file, before any pixel is decoded."""
    _png_header_only(tmp_path / "bomb.png", width, height)
    with pytest.raises(InputError, match=r"Cannot read reference image .*bomb\.png: .*(decompression bomb)"):
        open_image(tmp_path / "bomb.png", "reference image")


def test_open_image_keeps_its_limit_when_pil_limit_is_switched_off(tmp_path, monkeypatch):
    """Other node packs set Image.MAX_IMAGE_PIXELS = None; our limit is our own."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    _png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(InputError, match=r"declares 30000x30000 pixels \(900 MP\), over the limit of 144 MP"):
        open_image(tmp_path / "bomb.png")
    assert MAX_IMAGE_PIXELS >= 108_000_000  # a 108 MP phone photo is no bomb


def _large_photo(width: int = 4000, height: int = 3000) -> Image.Image:
    """A smooth RGB picture (cheap to compress) with a mark in its top-left corner."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    array = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                            np.full((height, width, 1), 90, np.float32)], axis=2).astype(np.uint8)
    array[: height // 10, : width // 10] = (250, 250, 0)
    return Image.fromarray(array)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_open_image_downscales_a_large_image_keeping_its_aspect(tmp_path, suffix, monkeypatch):
    """A 4000x3000 image comes back 2048x1536, aspect kept; an 8000x6000 JPEG is decoded at half scale (JPEG's
    draft mode) rather than whole, then brought to the same bound."""
    _large_photo().save(tmp_path / f"big{suffix}")
    image = open_image(tmp_path / f"big{suffix}")
    assert max(image.size) == MAX_IMAGE_SIDE and image.size == (2048, 1536)
    assert rgb(to_rgb(image))[5, 5].tolist() == pytest.approx([250, 250, 0], abs=6)  # the corner mark, not resampled away

    if suffix == ".jpg":
        from PIL import JpegImagePlugin

        decoded = []
        load = JpegImagePlugin.JpegImageFile.load
        monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", lambda self: (decoded.append(self.size), load(self))[1])
        _large_photo(8000, 6000).save(tmp_path / "huge.jpg", quality=80)
        assert open_image(tmp_path / "huge.jpg").size == (2048, 1536)
        assert max(decoded[0]) <= 4000  # decoded at 1/2 scale


def test_a_turned_large_photo_and_its_mask_come_back_the_same_size(tmp_path):
    """The mask is drawn on the displayed (turned) photo; both are downscaled to the same size, so crop_to_mask
    still fits one to the other."""
    save_rotated_photo(tmp_path / "turned.jpg", _large_photo(3000, 4000))
    mask = Image.new("L", (3000, 4000), 0)
    mask.paste(255, (1000, 1000, 2000, 3000))
    mask.save(tmp_path / "mask.png")
    photo, loaded = open_image(tmp_path / "turned.jpg"), open_image(tmp_path / "mask.png")
    assert photo.size == loaded.size == (1536, 2048)
    assert rgb(to_rgb(photo))[5, 5].tolist() == pytest.approx([250, 250, 0], abs=8)  # turned as displayed
    assert crop_to_mask(to_rgb(photo), mask_to_array(loaded)).size == pytest.approx((512 + 2 * 122, 1024 + 2 * 163), abs=3)


def test_bounded_size_is_symmetric_and_keeps_small_images():
    assert bounded_size(4000, 3000) == (2048, 1536) and bounded_size(3000, 4000) == (1536, 2048)
    assert bounded_size(2048, 10) == (2048, 10) and bounded_size(100000, 1) == (2048, 1)


@pytest.mark.parametrize("cut", ["truncated", "garbage"])
def test_open_image_names_a_corrupt_file(tmp_path, cut):
    subject = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    subject.save(tmp_path / "photo.png")
    data = (tmp_path / "photo.png").read_bytes()
    broken = data[: len(data) // 2] if cut == "truncated" else data[:60] + bytes(len(data) - 60)
    (tmp_path / "photo.png").write_bytes(broken)
    with pytest.raises(InputError, match=r"Cannot read mask .*photo\.png: "):
        open_image(tmp_path / "photo.png", "mask")


# ---------------------------------------------------------------------------------------------------- to_rgb


def test_background_grey_is_janus_grey():
    assert BACKGROUND_GREY == (127, 127, 127)


def test_to_rgb_keeps_rgb_pixels():
    array = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    out = to_rgb(Image.fromarray(array, "RGB"))
    assert out.size == (7, 5)
    np.testing.assert_array_equal(rgb(out), array)


def test_to_rgb_composites_rgba_on_grey():
    array = np.array([[[200, 10, 30, 255], [200, 10, 30, 0], [255, 255, 255, 128]]], dtype=np.uint8)
    out = rgb(to_rgb(Image.fromarray(array, "RGBA")))
    assert out[0, 0].tolist() == [200, 10, 30]  # opaque: unchanged
    assert out[0, 1].tolist() == GREY  # fully transparent: the grey background, not the hidden colour
    blended = 255 * 128 / 255 + 127 * (1 - 128 / 255)
    assert np.all(np.abs(out[0, 2] - blended) <= 1)  # half transparent: halfway between white and grey


def test_to_rgb_composites_la_on_grey():
    array = np.array([[[200, 255], [200, 0]]], dtype=np.uint8)
    out = rgb(to_rgb(Image.fromarray(array, "LA")))
    assert out[0, 0].tolist() == [200, 200, 200]
    assert out[0, 1].tolist() == GREY


def test_to_rgb_palette_with_transparency():
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    for x, index in enumerate((0, 1, 2)):
        image.putpixel((x, 0), index)
    image.info["transparency"] = 1  # palette entry 1 (green) is transparent
    out = rgb(to_rgb(image))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == GREY
    assert out[0, 2].tolist() == [0, 0, 255]


def test_to_rgb_palette_without_transparency_expands_colours():
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 40, 50, 60] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    out = rgb(to_rgb(image))
    assert out[0].tolist() == [[10, 20, 30], [40, 50, 60]]


def test_to_rgb_grey_l():
    out = rgb(to_rgb(Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), "L")))
    assert out[0].tolist() == [[0, 0, 0], [77, 77, 77], [255, 255, 255]]


def test_to_rgb_bilevel():
    image = Image.new("1", (2, 1))
    image.putpixel((0, 0), 1)
    out = rgb(to_rgb(image))
    assert out[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_to_rgb_cmyk():
    out = rgb(to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))))
    assert out[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_to_rgb_sixteen_bit_values_are_scaled(mode):
    image = Image.fromarray(np.array([[65535, 32768, 0]], dtype=np.uint16))
    if mode != "I;16":
        image = image.convert(mode)
    assert image.mode == mode
    out = rgb(to_rgb(image))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert np.all(np.abs(out[0, 1] - 128) <= 1)
    assert out[0, 2].tolist() == [0, 0, 0]
    assert np.all(out[0] == out[0, :, :1])  # grey: all channels equal


def test_to_rgb_float_zero_to_one_is_scaled_and_clipped():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0, -0.5, 3.0]], dtype=np.float32))
    assert image.mode == "F"
    out = rgb(to_rgb(image))
    assert out[0, :, 0].tolist()[:3] == [0, 128, 255]
    assert out[0, 3].tolist() == [0, 0, 0]
    assert out[0, 4].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["La", "RGBa"])
def test_to_rgb_premultiplied_alpha(mode):
    out = to_rgb(Image.new(mode, (2, 2)))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (127, 127, 127)  # fully transparent: the grey background


def test_to_rgb_dark_16_bit_image_stays_dark():
    dark = Image.fromarray(np.full((2, 2), 200, dtype=np.uint16))
    assert dark.mode == "I;16"
    assert to_rgb(dark).getpixel((0, 0)) == (1, 1, 1)


def test_mask_to_array_scales_uint8():
    array = mask_to_array(np.array([[0, 102, 255]], dtype=np.uint8))
    np.testing.assert_allclose(array, [[0.0, 0.4, 1.0]], atol=1e-6)
    np.testing.assert_allclose(mask_to_array(torch.tensor([[0, 255]], dtype=torch.uint8)), [[0.0, 1.0]])


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0)])
def test_to_rgb_empty_image(size):
    with pytest.raises(InputError, match="empty") as caught:
        to_rgb(Image.new("RGB", size), "reference image 2")
    assert "reference image 2" in str(caught.value)


# --------------------------------------------------------------------------------------- tensors and batches


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_image_batch_to_pils_channels(channels):
    batch = torch.rand(2, 6, 9, channels, generator=torch.Generator().manual_seed(channels))
    if channels == 4:
        batch[..., 3] = 1.0  # opaque
    images = image_batch_to_pils(batch)
    assert len(images) == 2
    expected = (batch.clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8)
    for image, want in zip(images, expected):
        assert image.mode == "RGB" and image.size == (9, 6)
        pixels = rgb(image)
        if channels == 1:
            np.testing.assert_array_equal(pixels, np.repeat(want, 3, axis=-1))
        else:
            np.testing.assert_array_equal(pixels, want[..., :3])


def test_tensor_to_pil_alpha_zero_becomes_grey():
    image = torch.ones(2, 2, 4)
    image[..., 3] = 0.0
    assert rgb(tensor_to_pil(image)).reshape(-1, 3).tolist() == [GREY] * 4


def test_tensor_to_pil_clamps_out_of_range_values():
    image = torch.tensor([[[-1.0, 0.5, 2.0]]])
    assert rgb(tensor_to_pil(image))[0, 0].tolist() == [0, 128, 255]


def test_image_batch_to_pils_accepts_one_unbatched_image():
    images = image_batch_to_pils(torch.zeros(4, 5, 3))
    assert len(images) == 1 and images[0].size == (5, 4)


@pytest.mark.parametrize(
    "shape",
    [(8, 8), (1, 8, 8, 5), (0, 8, 8, 3), (1, 0, 8, 3), (1, 8, 0, 3), (2, 1, 8, 8, 3), (8,)],
)
def test_image_batch_to_pils_bad_shapes(shape):
    with pytest.raises(InputError) as caught:
        image_batch_to_pils(torch.zeros(shape))
    assert "[B,H,W,C]" in str(caught.value) or "[H,W,C]" in str(caught.value)


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 2), (8, 8, 5), (1, 8, 8, 3)])
def test_tensor_to_pil_bad_shapes(shape):
    with pytest.raises(InputError, match=r"\[H,W,C\]"):
        tensor_to_pil(torch.zeros(shape), "my image")


def test_pil_to_tensor_range_dtype_and_round_trip():
    array = np.random.default_rng(1).integers(0, 256, size=(7, 4, 3), dtype=np.uint8)
    array[0, 0] = [0, 0, 0]
    array[0, 1] = [255, 255, 255]
    tensor = pil_to_tensor(Image.fromarray(array))
    assert tensor.dtype == torch.float32
    assert tuple(tensor.shape) == (7, 4, 3)
    assert float(tensor.min()) == 0.0 and float(tensor.max()) == 1.0
    torch.testing.assert_close(tensor, torch.from_numpy(array.astype(np.float32) / 255.0))
    np.testing.assert_array_equal(rgb(tensor_to_pil(tensor)), array)


def test_pil_to_tensor_converts_other_modes():
    tensor = pil_to_tensor(Image.new("RGBA", (3, 2), (255, 0, 0, 0)))
    assert tuple(tensor.shape) == (2, 3, 3)
    torch.testing.assert_close(tensor, torch.full((2, 3, 3), 127 / 255))


# ---------------------------------------------------------------------------------------------------- masks


def test_mask_to_array_from_tensors():
    mask = torch.tensor([[0.0, 0.25], [1.0, 0.75]])
    for given in (mask, mask.unsqueeze(0), mask.double(), mask.numpy()):
        array = mask_to_array(given)
        assert array.dtype == np.float32 and array.shape == (2, 2)
        np.testing.assert_allclose(array, mask.numpy())


def test_mask_to_array_clips_to_zero_one():
    array = mask_to_array(torch.tensor([[-1.0, 2.0]]))
    assert array.tolist() == [[0.0, 1.0]]


def test_mask_to_array_from_pil():
    grey = mask_to_array(Image.fromarray(np.array([[0, 255], [51, 255]], dtype=np.uint8), "L"))
    np.testing.assert_allclose(grey, [[0.0, 1.0], [0.2, 1.0]], atol=1e-6)
    bilevel = Image.new("1", (3, 2))
    bilevel.putpixel((2, 1), 1)
    assert mask_to_array(bilevel).tolist() == [[0, 0, 0], [0, 0, 1]]
    rgb_mask = mask_to_array(Image.new("RGB", (2, 3), (255, 255, 255)))
    assert rgb_mask.shape == (3, 2) and np.all(rgb_mask == 1.0)


@pytest.mark.parametrize("shape", [(2, 4, 4), (4,), (1, 1, 4, 4), (4, 4, 3)])
def test_mask_to_array_bad_shapes(shape):
    with pytest.raises(InputError, match=r"mask 3 must be \[H,W\]"):
        mask_to_array(torch.ones(shape), "mask 3")


# ------------------------------------------------------------------------------------------------ crop_to_mask


def _image(width=40, height=30) -> Image.Image:
    return Image.fromarray(np.random.default_rng(2).integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def test_crop_to_mask_box_without_margin():
    image = _image()
    mask = np.zeros((30, 40), dtype=np.float32)
    mask[5:15, 10:22] = 1.0
    crop = crop_to_mask(image, mask, margin=0.0)
    assert crop.size == (12, 10)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(image)[5:15, 10:22])


def test_crop_to_mask_margin_and_border_clamping():
    image = _image()
    mask = np.zeros((30, 40), dtype=np.float32)
    mask[10:20, 10:20] = 1.0
    crop = crop_to_mask(image, mask, margin=0.1)  # 4 px left/right, 3 px top/bottom
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(image)[7:23, 6:24])
    corner = np.zeros((30, 40), dtype=np.float32)
    corner[0:3, 37:40] = 1.0
    crop = crop_to_mask(image, corner, margin=0.1)
    np.testing.assert_array_equal(np.asarray(crop), np.asarray(image)[0:6, 33:40])


def test_crop_to_mask_threshold_is_above_half():
    mask = np.full((30, 40), 0.5, dtype=np.float32)
    mask[3, 4] = 0.51
    assert crop_to_mask(_image(), mask, margin=0.0).size == (1, 1)


def test_crop_to_mask_other_size_names_both_sizes():
    with pytest.raises(InputError) as caught:
        crop_to_mask(_image(40, 30), np.ones((20, 25), dtype=np.float32), name="mask 2")
    message = str(caught.value)
    assert "mask 2" in message and "25x20" in message and "40x30" in message


def test_crop_to_mask_selecting_nothing():
    with pytest.raises(InputError, match="selects nothing"):
        crop_to_mask(_image(), np.zeros((30, 40), dtype=np.float32))


# -------------------------------------------------------------------------------------------------- letterbox


def test_letterbox_wide_image_is_padded_top_and_bottom_with_grey():
    out = letterbox(Image.new("RGB", (64, 32), (255, 0, 0)), 16)
    assert tuple(out.shape) == (3, 16, 16) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    grey = torch.tensor(GREY, dtype=torch.float32) / 255
    torch.testing.assert_close(out[:, 0, :], grey[:, None].expand(3, 16))  # top row
    torch.testing.assert_close(out[:, -1, :], grey[:, None].expand(3, 16))  # bottom row
    torch.testing.assert_close(out[:, 8, :], torch.tensor([1.0, 0.0, 0.0])[:, None].expand(3, 16))  # centre row


def test_letterbox_tall_image_is_padded_left_and_right():
    out = letterbox(Image.new("RGB", (10, 40), (0, 0, 255)), 20)
    grey = torch.tensor(GREY, dtype=torch.float32) / 255
    torch.testing.assert_close(out[:, :, 0], grey[:, None].expand(3, 20))
    torch.testing.assert_close(out[:, :, -1], grey[:, None].expand(3, 20))
    torch.testing.assert_close(out[:, :, 10], torch.tensor([0.0, 0.0, 1.0])[:, None].expand(3, 20))


def test_letterbox_square_image_fills_the_canvas():
    out = letterbox(Image.new("RGB", (7, 7), (0, 255, 0)), 21)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 21, 21))


def test_letterbox_accepts_any_mode_and_thin_images():
    out = letterbox(Image.new("RGBA", (100, 1), (0, 0, 0, 0)), 8)
    assert tuple(out.shape) == (3, 8, 8)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(out, torch.full((3, 8, 8), 127 / 255))  # transparent: grey everywhere
