"""Sample decoding: real image files written with PIL, real .npy bytes, real tar shards."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import time
import zlib

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cmr.data.decode import BadSample, decode_feature, decode_image, image_size, parse_text


def gradient_rgb(height: int = 40, width: int = 60) -> np.ndarray:
    """A smooth, asymmetric picture: JPEG keeps it almost exactly and H/W mix-ups show."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) % 256], -1).astype(
        np.uint8
    )


def write_image(tmp_path, img: Image.Image, name: str, **save_kwargs) -> bytes:
    """Save to a real file in tmp_path and return the file's bytes."""
    path = tmp_path / name
    img.save(path, **save_kwargs)
    return path.read_bytes()


def as_hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


def reason_of(call) -> str:
    with pytest.raises(BadSample) as info:
        call()
    return info.value.reason


# ------------------------------------------------------------------------------ images


def test_jpeg_decodes_to_uint8_chw_close_to_source(tmp_path):
    pixels = gradient_rgb()
    data = write_image(tmp_path, Image.fromarray(pixels), "a.jpg", quality=95)
    out = decode_image(data)
    assert out.dtype == torch.uint8 and out.shape == (3, 40, 60)
    assert np.abs(as_hwc(out).astype(int) - pixels).mean() < 3
    assert image_size(data) == (60, 40)


def test_grayscale_jpeg_and_png_become_three_equal_channels(tmp_path):
    gray = gradient_rgb()[..., 0]
    for name in ("g.jpg", "g.png"):
        out = decode_image(write_image(tmp_path, Image.fromarray(gray, "L"), name))
        assert out.shape == (3, 40, 60)
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert np.array_equal(out[0].numpy(), gray)  # PNG is lossless


def test_rgb_png_is_exact(tmp_path):
    pixels = gradient_rgb()
    out = decode_image(write_image(tmp_path, Image.fromarray(pixels), "a.png"))
    assert np.array_equal(as_hwc(out), pixels)


def test_rgba_png_is_composited_over_white(tmp_path):
    pixels = np.zeros((4, 5, 4), np.uint8)
    pixels[..., :3] = (10, 100, 200)
    pixels[..., 3] = 255
    pixels[0, 0, 3] = 0  # fully transparent -> white, whatever colour is underneath
    pixels[1, 1, 3] = 128  # half transparent -> blended with white
    out = as_hwc(decode_image(write_image(tmp_path, Image.fromarray(pixels, "RGBA"), "e.png")))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[2, 2].tolist() == [10, 100, 200]
    expected = [round((c * 128 + 255 * 127) / 255) for c in (10, 100, 200)]
    assert out[1, 1].tolist() == expected


def test_gray_alpha_png_is_composited_over_white(tmp_path):
    pixels = np.zeros((3, 3, 2), np.uint8)
    pixels[..., 0], pixels[..., 1] = 40, 255
    pixels[2, 2, 1] = 0
    out = as_hwc(decode_image(write_image(tmp_path, Image.fromarray(pixels, "LA"), "la.png")))
    assert out[0, 0].tolist() == [40, 40, 40] and out[2, 2].tolist() == [255, 255, 255]


def test_palette_png_with_transparent_index_becomes_white(tmp_path):
    img = Image.new("P", (4, 3))
    img.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    img.putdata([0, 1] * 6)
    data = write_image(tmp_path, img, "p.png", transparency=0)
    out = as_hwc(decode_image(data))
    assert out[0, 0].tolist() == [255, 255, 255]  # index 0 is transparent black
    assert out[0, 1].tolist() == [200, 30, 60]
    # Without transparency the palette colour itself comes through.
    out = as_hwc(decode_image(write_image(tmp_path, img, "p2.png")))
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 1].tolist() == [200, 30, 60]


def test_colour_key_transparency_in_grey_and_rgb_png(tmp_path):
    grey = np.array([[10, 20], [30, 10]], np.uint8)
    data = write_image(tmp_path, Image.fromarray(grey, "L"), "k.png", transparency=10)
    assert decode_image(data)[0].tolist() == [[255, 20], [30, 255]]
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    data = write_image(tmp_path, Image.fromarray(rgb), "k2.png", transparency=(1, 2, 3))
    assert as_hwc(decode_image(data)).tolist() == [[[255] * 3, [0] * 3], [[0] * 3, [0] * 3]]


def test_sixteen_bit_png_scales_to_uint8(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    out = decode_image(write_image(tmp_path, Image.fromarray(values), "16.png"))
    assert out.dtype == torch.uint8 and out[:, 0].T.tolist() == [[0] * 3, [100] * 3, [255] * 3]


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    pixels = gradient_rgb()
    data = write_image(tmp_path, Image.fromarray(pixels).convert("CMYK"), "c.jpg", quality=95)
    out = decode_image(data)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert out.shape == (3, 40, 60)
    assert np.abs(as_hwc(out).astype(int) - reference).max() <= 2
    assert np.abs(as_hwc(out).astype(int) - pixels).mean() < 6


@pytest.mark.parametrize("name", ["a.bmp", "a.webp", "a.gif", "a.tiff"])
def test_other_formats_decode_through_pil(tmp_path, name):
    pixels = gradient_rgb()
    kwargs = {"lossless": True} if name.endswith("webp") else {}
    out = decode_image(write_image(tmp_path, Image.fromarray(pixels), name, **kwargs))
    assert out.dtype == torch.uint8 and out.shape == (3, 40, 60)
    if not name.endswith("gif"):  # GIF quantises to 256 colours
        assert np.array_equal(as_hwc(out), pixels)
    assert image_size(write_image(tmp_path, Image.fromarray(pixels), name, **kwargs)) == (60, 40)


def test_gif_transparency_becomes_white(tmp_path):
    img = Image.new("P", (3, 2))
    img.putpalette([0, 0, 0, 9, 99, 199] + [0] * 762)
    img.putdata([0, 1, 1, 1, 1, 0])
    out = as_hwc(decode_image(write_image(tmp_path, img, "t.gif", transparency=0)))
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [9, 99, 199]


def test_exif_orientation_is_applied_by_default(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = write_image(tmp_path, Image.fromarray(gradient_rgb()), "r.jpg", exif=exif)
    assert image_size(data) == (60, 40)  # header size, before rotation
    assert decode_image(data).shape == (3, 60, 40)
    assert decode_image(data, apply_exif_orientation=False).shape == (3, 40, 60)


def test_truncated_random_and_empty_bytes_are_corrupt(tmp_path):
    jpeg = write_image(tmp_path, Image.fromarray(gradient_rgb()), "t.jpg")
    png = write_image(tmp_path, Image.fromarray(gradient_rgb()), "t.png")
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    for data in (
        jpeg[: len(jpeg) // 2],
        jpeg[:20],
        png[: len(png) // 2],
        garbage,
        b"",
        b"\xff\xd8\xff" + garbage,
        b"\x89PNG\r\n\x1a\n" + garbage,
    ):
        assert reason_of(lambda data=data: decode_image(data)) == "corrupt_image"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height``; no pixel data follows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def jpeg_header_only(width: int, height: int) -> bytes:
    """SOI + an APP0 segment + a baseline SOF0 claiming the given size."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof = (
        b"\xff\xc0"
        + struct.pack(">HBHHB", 17, 8, height, width, 3)
        + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    )
    return b"\xff\xd8" + app0 + sof


def test_decompression_bomb_is_refused_from_the_header():
    for data in (png_header_only(100_000, 100_000), jpeg_header_only(65_000, 65_000)):
        assert image_size(data)[0] > 60_000
        start = time.perf_counter()
        assert reason_of(lambda data=data: decode_image(data)) == "too_many_pixels"
        assert time.perf_counter() - start < 0.5  # nothing was decoded or allocated


def test_max_pixels_boundary(tmp_path):
    data = write_image(tmp_path, Image.fromarray(gradient_rgb()), "b.png")
    assert decode_image(data, max_pixels=60 * 40).shape == (3, 40, 60)
    assert reason_of(lambda: decode_image(data, max_pixels=60 * 40 - 1)) == "too_many_pixels"


def test_draft_decode_shrinks_large_jpegs_but_never_below_target(tmp_path):
    big = np.asarray(Image.fromarray(gradient_rgb(60, 80)).resize((800, 600), Image.BILINEAR))
    data = write_image(tmp_path, Image.fromarray(big), "big.jpg", quality=95)
    full = decode_image(data)
    assert full.shape == (3, 600, 800)
    half = decode_image(data, target_min_side=250)  # 1/2 scale keeps 300 >= 250; 1/4 would not
    assert half.shape == (3, 300, 400)
    expected = np.asarray(Image.fromarray(big).resize((400, 300), Image.BOX)).astype(int)
    assert np.abs(as_hwc(half).astype(int) - expected).mean() < 3
    assert decode_image(data, target_min_side=301).shape == (3, 600, 800)  # 1/2 would undershoot


# ------------------------------------------------------------------------------ features


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_feature_round_trip_as_float32():
    values = np.linspace(-1, 1, 8)
    out = decode_feature(npy_bytes(values), dim=8)
    assert out.dtype == torch.float32 and torch.equal(
        out, torch.tensor(values, dtype=torch.float32)
    )
    assert decode_feature(npy_bytes(values.astype(np.float16)), dim=None).shape == (8,)


def test_bad_features_are_rejected_with_reasons():
    good = np.zeros(8, np.float32)
    assert reason_of(lambda: decode_feature(npy_bytes(good), dim=16)) == "bad_feature_dim"
    nan = good.copy()
    nan[3] = np.nan
    assert reason_of(lambda: decode_feature(npy_bytes(nan), dim=8)) == "corrupt_feature"
    assert (
        reason_of(lambda: decode_feature(npy_bytes(np.full(8, 1e300)), dim=8)) == "corrupt_feature"
    )
    assert (
        reason_of(lambda: decode_feature(npy_bytes(good.reshape(2, 4)), dim=8)) == "corrupt_feature"
    )
    assert (
        reason_of(lambda: decode_feature(npy_bytes(np.array(["a", "b"])), dim=2))
        == "corrupt_feature"
    )
    assert reason_of(lambda: decode_feature(b"not an npy file", dim=8)) == "corrupt_feature"
    assert reason_of(lambda: decode_feature(npy_bytes(good)[:-8], dim=8)) == "corrupt_feature"
    pickled = npy_bytes(np.array([{"a": 1}], dtype=object))
    assert reason_of(lambda: decode_feature(pickled, dim=1)) == "corrupt_feature"


# ------------------------------------------------------------------------------ text


def js(obj) -> bytes:
    return json.dumps(obj).encode()


def test_our_json_format():
    sample = {
        "json": js({"captions": ["  A dog runs. ", "", "Grass"], "labels": {"c": [1]}, "id": 7})
    }
    assert parse_text(sample) == (["A dog runs.", "Grass"], {"c": [1]}, "7")
    assert parse_text({"json": js({"captions": "one caption"})}) == (["one caption"], None, None)


def test_img2dataset_txt_and_json():
    meta = {"caption": "a cat on a mat", "key": "000012", "url": "http://x", "status": "success"}
    sample = {"__key__": "000012", "txt": b" a cat on a mat\n", "json": js(meta)}
    assert parse_text(sample) == (["a cat on a mat"], None, "000012")
    # Caption only in the .txt (json metadata without/with a null caption, or no json at all).
    assert parse_text({"txt": b"  a Dog  ", "json": js({"key": "k"})})[0] == ["a Dog"]
    assert parse_text({"txt": b"x", "json": js({"caption": None, "key": 3})}) == (["x"], None, "3")
    assert parse_text({"txt": "caf\u00e9".encode()}) == (["caf\u00e9"], None, None)


def test_text_errors_have_reasons():
    assert reason_of(lambda: parse_text({"json": b"\xff\xfe{}"})) == "non_utf8_text"
    assert reason_of(lambda: parse_text({"txt": b"caf\xe9"})) == "non_utf8_text"
    assert reason_of(lambda: parse_text({"json": b'{"captions": ['})) == "corrupt_json"
    assert reason_of(lambda: parse_text({"json": b"[1, 2]"})) == "corrupt_json"
    assert reason_of(lambda: parse_text({"json": b"[" * 100_000})) == "corrupt_json"
    assert reason_of(lambda: parse_text({"json": js({"captions": ["ok", 5]})})) == "corrupt_json"
    assert reason_of(lambda: parse_text({"json": js({"id": 1})})) == "missing_caption"
    assert reason_of(lambda: parse_text({"jpg": b"..."})) == "missing_caption"
    assert reason_of(lambda: parse_text({"json": js({"captions": [" ", ""]})})) == "empty_caption"
    assert reason_of(lambda: parse_text({"txt": b"  \n"})) == "empty_caption"


def test_samples_read_from_a_real_tar_shard(tmp_path):
    """img2dataset-style files in a tar, read back by WebDataset, decode end to end."""
    pixels = gradient_rgb()
    files = {
        "000000.jpg": write_image(tmp_path, Image.fromarray(pixels), "s.jpg", quality=95),
        "000000.txt": b"a colourful gradient",
        "000000.json": js(
            {"caption": "a colourful gradient", "key": "000000", "status": "success"}
        ),
        "000001.png": write_image(tmp_path, Image.fromarray(pixels), "s.png"),
        "000001.json": js({"captions": ["first", "second"], "id": "img-1"}),
    }
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(wds.WebDataset(str(shard), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000", "000001"]
    assert parse_text(samples[0]) == (["a colourful gradient"], None, "000000")
    assert parse_text(samples[1]) == (["first", "second"], None, "img-1")
    assert decode_image(samples[0]["jpg"]).shape == (3, 40, 60)
    assert np.array_equal(as_hwc(decode_image(samples[1]["png"])), pixels)
