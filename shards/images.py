"""Load, check and (only when needed) re-encode one image for a shard.

Runs in worker processes, so everything here is a plain function of its arguments
returning a small picklable result: ``Payload`` (what goes into the shard) or ``Skip``
(why the sample is dropped). Images are passed through byte for byte whenever
possible: re-encoding a JPEG costs quality and makes the shard depend on the
encoder version.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import NamedTuple

from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit
JPEG_QUALITY = 95

# Modes PNG can store as they are; anything else is converted before saving.
_PNG_MODES = {"1", "L", "LA", "P", "I;16", "RGB", "RGBA"}
# Modes LANCZOS resizes properly (PIL silently uses NEAREST for "1" and "P").
_RESIZE_MODES = {"L", "LA", "RGB", "RGBA", "I;16", "I", "F"}


class Payload(NamedTuple):
    ext: str  # file extension in the shard: "jpg" | "png" | "feat.npy"
    data: bytes


class Skip(NamedTuple):
    reason: str  # one of report.SKIP_REASONS
    detail: str = ""


@contextlib.contextmanager
def own_pixel_limit():
    """We check the pixel count ourselves (against --max-pixels), so PIL's global bomb
    check must not fire first, and a raised --max-pixels must really be honoured."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_image(source: str | Path | bytes, max_pixels: int, max_size: int | None) -> Payload | Skip:
    """Read ``source`` (a path or the encoded bytes), check it, return the shard payload."""
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as err:  # missing, a directory, unreadable
            return Skip("missing_image", err.strerror or type(err).__name__)
    with own_pixel_limit():
        try:
            return _check_and_encode(data, max_pixels, max_size)
        except Exception as err:  # noqa: BLE001 - any failure decoding untrusted bytes means corrupt
            return Skip("corrupt_image", f"{type(err).__name__}: {err}".splitlines()[0][:200])


def _check_and_encode(data: bytes, max_pixels: int, max_size: int | None) -> Payload | Skip:
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size  # from the header; nothing decoded yet
        if width * height > max_pixels:
            return Skip("too_many_pixels", f"{width}x{height}")
        img.verify()  # structure and checksums (PNG CRCs)
    # verify() leaves the image unusable, and does not catch a truncated JPEG:
    # decode it fully once so every sample that lands is known to decode.
    img = Image.open(io.BytesIO(data))
    img.load()
    kind = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}.get(img.format)
    too_big = max_size is not None and max(width, height) > max_size
    if kind is not None and not too_big:
        return Payload(kind, data)
    if too_big:
        img = _resize(img, max_size)
    if kind == "jpg":
        return Payload("jpg", _encode_jpeg(img))
    return Payload("png", _encode_png(img))  # PNG, or GIF/WebP/BMP/... turned into PNG


def _has_alpha(img: Image.Image) -> bool:
    return "A" in img.getbands() or "a" in img.mode or "transparency" in img.info


def _resize(img: Image.Image, max_size: int) -> Image.Image:
    # The EXIF orientation tag is not written back on re-encode, so bake it in here;
    # otherwise a resized portrait photo would come out sideways.
    img = ImageOps.exif_transpose(img)
    if img.mode not in _RESIZE_MODES:
        img = img.convert("RGBA" if _has_alpha(img) else ("L" if img.mode == "1" else "RGB"))
    width, height = img.size
    scale = max_size / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def _encode_jpeg(img: Image.Image) -> bytes:
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, I, F...: JPEG readers expect L or RGB
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _encode_png(img: Image.Image) -> bytes:
    if img.mode in ("I", "F"):
        img = img.convert("I;16")  # keep high bit depth; PNG has no 32-bit grey
    elif img.mode not in _PNG_MODES:
        img = img.convert("RGBA" if _has_alpha(img) else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
