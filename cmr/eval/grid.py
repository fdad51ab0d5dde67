"""Result pictures for retrieval: a query and what the model found for it, as one PNG.

Drawn with PIL alone (no matplotlib, no font files) so they can be made anywhere: on a
headless training node for the wandb table, or from the search command line.

Every cell has a fixed size, so a grid's size depends only on how many results it shows:

    text_to_image_grid, k results:
        width  = PAD + k * (THUMB + PAD)
        height = PAD + HEADER_H + PAD + THUMB + LABEL_H + PAD
    image_to_text_grid, k results (``title`` adds ``HEADER_H + PAD`` to the height):
        width  = PAD + THUMB + PAD + TEXT_W + PAD
        height = PAD + max(THUMB, k * ROW_H) + PAD

Text that does not fit is cut with "..." rather than wrapped further, which would make
the size depend on the words. Results known to be correct (a caption's own image, an
image's own captions) get a green frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

THUMB = 128  # side of the square a result image is fitted into
PAD = 8  # margin between cells; the green frame is drawn inside it
LINE_H = 14  # one line of PIL's default font (10 px, 13 px from ascent to descent)
HEADER_LINES = 2
HEADER_H = HEADER_LINES * LINE_H
LABEL_H = 2 * LINE_H  # under each thumbnail: "#rank score", then its title
TEXT_W = 512  # caption column of image_to_text_grid
ROW_H = LINE_H + 8  # one ranked caption, with room for its frame

BACKGROUND = (255, 255, 255)
TILE = (235, 235, 235)  # behind letterboxed thumbnails, and a missing image
TEXT = (20, 20, 20)
MUTED = (110, 110, 110)
CORRECT = (0, 160, 0)
FRAME = 3  # width of the green frame


def text_to_image_grid(
    query: str,
    images: Sequence,
    scores: Sequence[float],
    titles: Sequence[str] | None = None,
    correct: Sequence[bool] | None = None,
) -> Image.Image:
    """The query as a header, then its top-k images in rank order, "#rank score" under each.

    ``images``: PIL images, uint8 ``[3, H, W]`` tensors, or None where there is no picture
    (precomputed-feature datasets without their pictures); ``titles``: a readable label per
    image (cut with "..." to the thumbnail's width); ``correct``: True for results known to
    be right.
    """
    num = _check_lengths(images, scores=scores, titles=titles, correct=correct)
    width = PAD + num * (THUMB + PAD)
    height = PAD + HEADER_H + PAD + THUMB + LABEL_H + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    _draw_lines(draw, (PAD, PAD), _wrap(query, width - 2 * PAD, HEADER_LINES), TEXT)
    top = PAD + HEADER_H + PAD
    for rank, image in enumerate(images):
        left = PAD + rank * (THUMB + PAD)
        canvas.paste(thumbnail(image), (left, top))
        if correct is not None and correct[rank]:
            _frame(draw, left, top, left + THUMB, top + THUMB)
        lines = [f"#{rank + 1}  {scores[rank]:.3f}"]
        if titles is not None:
            lines.append(_fit(str(titles[rank]), THUMB))
        _draw_lines(draw, (left, top + THUMB + 1), lines, TEXT)
    return canvas


def stack_grids(grids: Sequence[Image.Image]) -> Image.Image:
    """Several grids one under another (a search of several queries as one picture)."""
    if not grids:
        raise ValueError("stack_grids needs at least one grid")
    canvas = Image.new("RGB", (max(g.width for g in grids), sum(g.height for g in grids)), BACKGROUND)
    top = 0
    for grid in grids:
        canvas.paste(grid, (0, top))
        top += grid.height
    return canvas


def image_to_text_grid(
    image,
    captions: Sequence[str],
    scores: Sequence[float],
    correct: Sequence[bool] | None = None,
    title: str | None = None,
) -> Image.Image:
    """The query image on the left, its top-k captions on the right ("#rank score caption")."""
    num = _check_lengths(captions, scores=scores, correct=correct)
    header = HEADER_H + PAD if title is not None else 0
    width = PAD + THUMB + PAD + TEXT_W + PAD
    height = PAD + header + max(THUMB, num * ROW_H) + PAD
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title is not None:
        _draw_lines(draw, (PAD, PAD), _wrap(title, width - 2 * PAD, HEADER_LINES), TEXT)
    top = PAD + header
    canvas.paste(thumbnail(image), (PAD, top))
    left = PAD + THUMB + PAD
    for rank, caption in enumerate(captions):
        row_top = top + rank * ROW_H
        if correct is not None and correct[rank]:
            _frame(draw, left, row_top + 1, left + TEXT_W, row_top + ROW_H - 1)
        prefix = f"#{rank + 1}  {scores[rank]:.3f}  "
        x = left + FRAME + 2
        draw.text((x, row_top + 4), prefix, font=_font(), fill=MUTED)
        x += _font().getlength(prefix)
        text = _fit(caption, left + TEXT_W - FRAME - 2 - x)
        draw.text((x, row_top + 4), text, font=_font(), fill=TEXT)
    return canvas


def thumbnail(image) -> Image.Image:
    """``image`` (PIL, uint8 [3, H, W] tensor or None) fitted into a THUMB x THUMB tile,
    aspect ratio kept, centred on a grey background."""
    tile = Image.new("RGB", (THUMB, THUMB), TILE)
    if image is None:
        ImageDraw.Draw(tile).text((THUMB // 2, THUMB // 2), "no image", font=_font(), fill=MUTED,
                                  anchor="mm")
        return tile
    picture = to_pil(image)
    # Small images (64 px emoji) are scaled up too, so every grid looks alike.
    fitted = ImageOps.contain(picture, (THUMB, THUMB), Image.Resampling.BICUBIC)
    tile.paste(fitted, ((THUMB - fitted.width) // 2, (THUMB - fitted.height) // 2))
    return tile


def to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    is_tensor = isinstance(image, torch.Tensor)
    if is_tensor and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), "RGB")
    shape = list(image.shape) if hasattr(image, "shape") else type(image).__name__
    raise ValueError(f"expected a PIL image or a uint8 [3, H, W] tensor, got {shape}")


# --------------------------------------------------------------------------- drawing helpers


def _check_lengths(items: Sequence, **others: Sequence | None) -> int:
    if len(items) == 0:
        raise ValueError("nothing to draw: the result list is empty")
    for name, values in others.items():
        if values is not None and len(values) != len(items):
            raise ValueError(f"{name} has {len(values)} entries for {len(items)} results")
    return len(items)


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default()


def _printable(text: str) -> str:
    # Without FreeType, PIL's fallback bitmap font covers Latin-1 only and raises on the rest.
    if isinstance(_font(), ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _fit(text: str, width: float) -> str:
    """``text`` cut (with "...") to at most ``width`` pixels."""
    text = _printable(" ".join(text.split()))
    font = _font()
    if font.getlength(text) <= width:
        return text
    low, high = 0, len(text)  # the longest prefix that fits with "...": binary search
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if font.getlength(text[:mid] + "...") <= width else (low, mid - 1)
    return text[:low].rstrip() + "..."


def _wrap(text: str, width: float, max_lines: int) -> list[str]:
    """Words of ``text`` in at most ``max_lines`` lines of ``width`` pixels; the rest is cut."""
    words = _printable(text).split()
    lines: list[str] = []
    while words and len(lines) < max_lines:
        line = words.pop(0)
        while words and _font().getlength(f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        lines.append(line)
    if words:  # more text than lines: the last line runs on and is cut with "..."
        lines[-1] = f"{lines[-1]} {' '.join(words)}"
    return [_fit(line, width) for line in lines]


def _draw_lines(draw: ImageDraw.ImageDraw, origin: tuple[int, int], lines: list[str], fill) -> None:
    x, y = origin
    for i, line in enumerate(lines):
        draw.text((x, y + i * LINE_H), line, font=_font(), fill=fill)


def _frame(draw: ImageDraw.ImageDraw, left: int, top: int, right: int, bottom: int) -> None:
    """A green frame just outside the box (inside the PAD margin, so sizes don't change)."""
    draw.rectangle((left - FRAME, top - FRAME, right + FRAME - 1, bottom + FRAME - 1),
                   outline=CORRECT, width=FRAME)
