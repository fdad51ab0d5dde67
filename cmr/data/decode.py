"""Turn the raw bytes of one WebDataset sample into tensors and captions.

These functions run inside DataLoader workers on untrusted data, so they never let a
library exception escape: anything wrong with a sample becomes ``BadSample(reason)``,
which the pipeline counts by ``reason`` and skips.

Images come out as uint8 ``[3, H, W]``: decoding to uint8 and staying there until the
main process (or the accelerator) normalises is what makes the input pipeline cheap;
a float batch costs ~4x more to ship between processes.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg, decode_png

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on every
# call; the decoders still work in the pinned torchvision range, so keep worker logs quiet.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision are deprecated",
    category=DeprecationWarning,
)

# PIL's own decompression-bomb threshold; ours is checked first, from the header alone.
DEFAULT_MAX_PIXELS = 89_478_485

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
# Start-of-frame markers carry the frame size; C4 (DHT), C8 (reserved) and CC (DAC) do not.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field (SOI, TEM, RST0-7); EOI/SOS before a SOF means no frame.
_JPEG_STANDALONE_MARKERS = frozenset([0xD8, 0x01, *range(0xD0, 0xD8)])
# PNG colour types 4 (grey + alpha) and 6 (RGBA) carry an alpha channel.
_PNG_ALPHA_COLOR_TYPES = (4, 6)
# Types 0 (grey) and 2 (RGB) may name one fully transparent colour in a tRNS chunk.
_PNG_COLOR_KEY_TYPES = (0, 2)


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short snake_case counter key."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


# --------------------------------------------------------------------------- image size


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the JPEG marker segments up to the first start-of-frame."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise BadSample("corrupt_image", "bad JPEG marker")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            break  # end of image / start of scan with no frame header seen
        if marker in _JPEG_SOF_MARKERS:
            if pos + 9 > end:
                break
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            if width == 0 or height == 0:
                raise BadSample("corrupt_image", "JPEG frame header has zero size")
            return width, height
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    raise BadSample("corrupt_image", "no JPEG frame header")


def _png_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk, which must come first."""
    if len(data) < 26 or data[12:16] != b"IHDR":
        raise BadSample("corrupt_image", "PNG without IHDR header")
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    if width == 0 or height == 0:
        raise BadSample("corrupt_image", "PNG header has zero size")
    return width, height, data[24], data[25]


def _png_has_trns(data: bytes) -> bool:
    """True when a tRNS chunk (palette or colour-key transparency) precedes the pixel data."""
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunk_type = data[pos + 4 : pos + 8]
        if chunk_type == b"tRNS":
            return True
        if chunk_type in (b"IDAT", b"IEND"):
            return False
        pos += 12 + length  # length + type + data + crc
    return False


def _open_pil(data: bytes) -> Image.Image:
    """PIL's lazy open: reads the header only. Its own bomb check is mapped to our reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadSample("too_many_pixels", str(err)) from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for garbage bytes
        raise BadSample(
            "corrupt_image", f"unrecognised image data ({type(err).__name__})"
        ) from None


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) read from the header only; no pixels are decoded."""
    if not data:
        raise BadSample("corrupt_image", "empty image bytes")
    if data.startswith(_JPEG_SIGNATURE):
        return _jpeg_size(data)
    if data.startswith(_PNG_SIGNATURE):
        return _png_header(data)[:2]
    return _open_pil(data).size


# --------------------------------------------------------------------------- pixel helpers


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    """16-bit PNGs decode to uint16; scale to 0..255 with rounding."""
    if image.dtype == torch.uint8:
        return image
    return ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


def _composite_over_white(image: torch.Tensor) -> torch.Tensor:
    """[C+1, H, W] colour + alpha -> [3, H, W] over a white background.

    Transparent regions (emoji, logos) would otherwise come out with whatever colour the
    encoder left under alpha=0, often black, which is not what a viewer sees.
    """
    color, alpha = image[:-1], image[-1:]
    if not bool(alpha.eq(255).all()):
        color_i32, alpha_i32 = color.to(torch.int32), alpha.to(torch.int32)
        # Integer "over" with rounding: exact at alpha 0 (white) and 255 (unchanged).
        color = ((color_i32 * alpha_i32 + 255 * (255 - alpha_i32) + 127) // 255).to(torch.uint8)
    return color.expand(3, -1, -1) if color.shape[0] == 1 else color


def _bytes_tensor(data: bytes) -> torch.Tensor:
    # bytearray: torch.frombuffer on immutable bytes warns; the copy costs microseconds.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _pil_to_tensor(img: Image.Image, apply_exif_orientation: bool) -> torch.Tensor:
    """Decode a lazily opened PIL image to uint8 [3, H, W] (alpha composited over white)."""
    img.load()
    if apply_exif_orientation:
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I;16"):
        array = np.array(img, dtype=np.uint16)
        image = _to_uint8(torch.from_numpy(array.astype(np.int32)))[None]
        return image.expand(3, -1, -1)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    img = img.convert("RGBA" if has_alpha else "RGB")
    image = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return _composite_over_white(image) if has_alpha else image


def _decode_with_pil(data: bytes, apply_exif_orientation: bool, draft_size=None) -> torch.Tensor:
    try:
        img = _open_pil(data)
        if draft_size is not None:
            img.draft("RGB", draft_size)  # JPEG DCT-domain downscale by 1/2, 1/4 or 1/8
        return _pil_to_tensor(img, apply_exif_orientation)
    except BadSample:
        raise
    except Exception as err:  # noqa: BLE001 - untrusted bytes: any decoder failure is "corrupt"
        raise BadSample("corrupt_image", f"cannot decode ({type(err).__name__}: {err})") from None


def _draft_size(width: int, height: int, target_min_side: int | None):
    """The size to ask PIL's JPEG draft mode for, or None when it would not shrink the image.

    Draft picks the largest 1/2^k scale that keeps both sides >= the request, so the
    decoded shorter side never drops below ``target_min_side``.
    """
    if target_min_side is None or min(width, height) < 2 * target_min_side:
        return None
    scale = target_min_side / min(width, height)
    return math.ceil(width * scale), math.ceil(height * scale)


def _decode_png(data: bytes, apply_exif_orientation: bool) -> torch.Tensor:
    _, _, _, color_type = _png_header(data)
    has_trns = _png_has_trns(data)
    if has_trns and color_type in _PNG_COLOR_KEY_TYPES:
        # torchvision applies tRNS to palettes only; PIL also honours a grey/RGB colour key.
        return _decode_with_pil(data, apply_exif_orientation)
    has_alpha = color_type in _PNG_ALPHA_COLOR_TYPES or has_trns
    mode = ImageReadMode.RGB_ALPHA if has_alpha else ImageReadMode.RGB
    try:
        image = decode_png(
            _bytes_tensor(data), mode=mode, apply_exif_orientation=apply_exif_orientation
        )
    except (RuntimeError, ValueError) as err:
        raise BadSample("corrupt_image", f"cannot decode PNG ({_first_line(err)})") from None
    image = _to_uint8(image)
    return _composite_over_white(image) if has_alpha else image


def _first_line(err: Exception) -> str:
    # torchvision prefixes its messages with a C++ source location; keep only the reason.
    return str(err).strip().splitlines()[0].rsplit(", ", 1)[-1][:200]


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    target_min_side: int | None = None,
    apply_exif_orientation: bool = True,
) -> torch.Tensor:
    """Encoded image bytes -> uint8 ``[3, H, W]``.

    Greyscale becomes 3 channels, transparency is composited over white, CMYK JPEGs are
    converted. The size is read from the header first so a decompression bomb is refused
    before any pixel buffer is allocated.

    ``target_min_side``: for JPEGs whose shorter side is at least twice this, decode at a
    reduced 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling) keeping the shorter side
    >= ``target_min_side``; several times faster for large photos, and close to (not
    bit-identical with) a full decode followed by an antialiased resize.

    ``apply_exif_orientation``: rotate/mirror as the EXIF tag says, as browsers do (and
    so as caption writers saw the photo).
    """
    width, height = image_size(data)
    if width * height > max_pixels:
        raise BadSample("too_many_pixels", f"{width}x{height} exceeds max_pixels={max_pixels}")
    if data.startswith(_PNG_SIGNATURE):
        return _decode_png(data, apply_exif_orientation)
    if data.startswith(_JPEG_SIGNATURE):
        draft_size = _draft_size(width, height, target_min_side)
        if draft_size is None:
            try:
                return decode_jpeg(
                    _bytes_tensor(data),
                    mode=ImageReadMode.RGB,
                    apply_exif_orientation=apply_exif_orientation,
                )
            except (RuntimeError, ValueError):
                pass  # e.g. 12-bit or arithmetic-coded JPEGs: PIL may manage, else corrupt
        return _decode_with_pil(data, apply_exif_orientation, draft_size)
    return _decode_with_pil(data, apply_exif_orientation)


# --------------------------------------------------------------------------- features


def decode_feature(data: bytes, dim: int | None) -> torch.Tensor:
    """``np.save`` bytes of one precomputed feature row -> float32 ``[dim]``."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - numpy raises ValueError/EOFError/OSError/...
        raise BadSample("corrupt_feature", f"not a .npy array ({type(err).__name__})") from None
    if not isinstance(array, np.ndarray) or array.ndim != 1:
        shape = getattr(array, "shape", None)
        raise BadSample("corrupt_feature", f"expected a 1-D array, got shape {shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise BadSample("corrupt_feature", f"expected a numeric array, got dtype {array.dtype}")
    with np.errstate(over="ignore"):  # float64 beyond float32 range becomes inf, refused below
        array = array.astype(np.float32, copy=False)
    if dim is not None and array.shape[0] != dim:
        raise BadSample("bad_feature_dim", f"expected {dim} values, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise BadSample("corrupt_feature", "feature has NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(array))


# --------------------------------------------------------------------------- text


def _utf8(value: bytes | str, field: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("non_utf8_text", f"{field} is not valid UTF-8") from None


def _load_metadata(sample: dict[str, Any]) -> dict[str, Any] | None:
    if "json" not in sample:
        return None
    try:
        metadata = json.loads(_utf8(sample["json"], "json"))
    except json.JSONDecodeError as err:
        raise BadSample("corrupt_json", f"invalid JSON ({err.msg})") from None
    except RecursionError:  # absurdly nested arrays/objects
        raise BadSample("corrupt_json", "JSON nested too deeply") from None
    if not isinstance(metadata, dict):
        raise BadSample("corrupt_json", f"expected a JSON object, got {type(metadata).__name__}")
    return metadata


def _raw_captions(sample: dict[str, Any], metadata: dict[str, Any] | None) -> list:
    """The first caption source present: json "captions", json "caption", then .txt."""
    metadata = metadata or {}
    for field in ("captions", "caption"):
        value = metadata.get(field)
        if value is not None:
            return value if isinstance(value, list) else [value]
    if "txt" in sample:
        return [_utf8(sample["txt"], "txt")]
    raise BadSample("missing_caption", "no json captions/caption field and no .txt")


def parse_text(sample: dict[str, Any]) -> tuple[list[str], Any, str | None]:
    """(captions, labels, source_id) of a WebDataset sample whose keys are extensions.

    Accepts our shards (``json`` = ``{"captions": [...], "labels": ..., "id": ...}``) and
    img2dataset output (``txt`` = the caption, ``json`` = metadata with ``caption``/``key``).
    """
    metadata = _load_metadata(sample)
    raw = _raw_captions(sample, metadata)
    if not all(isinstance(caption, str) for caption in raw):
        raise BadSample("corrupt_json", "captions must be strings")
    captions = [caption.strip() for caption in raw]
    captions = [caption for caption in captions if caption]
    if not captions:
        raise BadSample("empty_caption", "every caption is empty")
    labels = metadata.get("labels") if metadata else None
    source_id = None
    if metadata:
        source_id = metadata.get("id")
        source_id = metadata.get("key") if source_id is None else source_id
    return captions, labels, None if source_id is None else str(source_id)
