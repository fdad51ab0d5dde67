"""Result pictures: their size follows the documented formula, and they show the results."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from cmr.eval import grid
from cmr.eval.grid import (
    CORRECT, HEADER_H, LABEL_H, LINE_H, PAD, ROW_H, TEXT_W, THUMB, TILE, image_to_text_grid,
    text_to_image_grid,
)

RED, GREEN, BLUE = (220, 30, 30), (30, 200, 30), (30, 30, 220)


def solid(color, size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size, color)


def thumb_box(rank: int) -> tuple[int, int]:
    """Top-left corner of result ``rank``'s thumbnail in a text_to_image_grid."""
    return PAD + rank * (THUMB + PAD), PAD + HEADER_H + PAD


@pytest.mark.parametrize("k", [1, 3, 5])
def test_text_to_image_grid_png_has_the_documented_size(k, tmp_path):
    image = text_to_image_grid("a dog runs in the snow", [solid(RED)] * k, [0.9 - 0.1 * i for i in range(k)],
                               titles=[f"id{i}" for i in range(k)])
    path = tmp_path / "grid.png"
    image.save(path)
    with Image.open(path) as saved:
        assert saved.format == "PNG"
        assert saved.size == (PAD + k * (THUMB + PAD), PAD + HEADER_H + PAD + THUMB + LABEL_H + PAD)
    if k == 5:  # the numbers the module docstring promises
        assert image.size == (688, 208)


@pytest.mark.parametrize("k, title, expected", [(3, None, (664, 144)), (10, None, (664, 236)),
                                                 (3, "query.png", (664, 180))])
def test_image_to_text_grid_has_the_documented_size(k, title, expected):
    image = image_to_text_grid(solid(BLUE), [f"caption {i}" for i in range(k)], [0.5] * k, title=title)
    header = HEADER_H + PAD if title else 0
    assert image.size == (PAD + THUMB + PAD + TEXT_W + PAD, PAD + header + max(THUMB, k * ROW_H) + PAD)
    assert image.size == expected


def test_each_result_cell_shows_its_own_image():
    image = text_to_image_grid("q", [solid(RED), solid(GREEN), solid(BLUE)], [0.3, 0.2, 0.1])
    for rank, color in enumerate([RED, GREEN, BLUE]):
        left, top = thumb_box(rank)
        assert image.getpixel((left + THUMB // 2, top + THUMB // 2)) == color


def test_different_results_give_different_pictures():
    first = text_to_image_grid("q", [solid(RED), solid(GREEN)], [0.3, 0.2])
    swapped = text_to_image_grid("q", [solid(GREEN), solid(RED)], [0.3, 0.2])
    rescored = text_to_image_grid("q", [solid(RED), solid(GREEN)], [0.7, 0.2])
    other_query = text_to_image_grid("another query", [solid(RED), solid(GREEN)], [0.3, 0.2])
    for other in (swapped, rescored, other_query):
        assert first.size == other.size
        assert first.tobytes() != other.tobytes()


def test_uint8_tensors_draw_like_pil_images():
    pixels = torch.randint(0, 256, (3, 40, 56), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    as_pil = Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")
    assert text_to_image_grid("q", [pixels], [0.5]).tobytes() == text_to_image_grid("q", [as_pil], [0.5]).tobytes()


def test_non_square_images_are_letterboxed_not_stretched():
    image = text_to_image_grid("q", [solid(RED, size=(128, 32))], [0.5])
    left, top = thumb_box(0)
    assert image.getpixel((left + THUMB // 2, top + THUMB // 2)) == RED
    assert image.getpixel((left + THUMB // 2, top + 2)) == TILE  # above the wide image: background


def test_correct_results_get_a_green_frame():
    image = text_to_image_grid("q", [solid(RED), solid(BLUE)], [0.3, 0.2], correct=[False, True])
    for rank, framed in ((0, False), (1, True)):
        left, top = thumb_box(rank)
        edge = image.getpixel((left - 2, top + THUMB // 2))  # in the margin, left of the thumbnail
        assert (edge == CORRECT) is framed


def test_correct_captions_get_a_green_frame():
    image = image_to_text_grid(solid(RED), ["a red thing", "a blue thing"], [0.4, 0.1], correct=[True, False])
    left = PAD + THUMB + PAD
    for rank, framed in ((0, True), (1, False)):
        y = PAD + rank * ROW_H + ROW_H // 2
        assert (image.getpixel((left - 2, y)) == CORRECT) is framed


def test_caption_text_is_drawn_and_long_text_keeps_the_size():
    short = image_to_text_grid(solid(RED), ["a cat"], [0.4])
    other = image_to_text_grid(solid(RED), ["a dog"], [0.4])
    long = image_to_text_grid(solid(RED), ["a cat " * 200], [0.4], title="word " * 300)
    assert short.tobytes() != other.tobytes()
    assert long.size == (short.width, short.height + HEADER_H + PAD)
    assert grid._fit("a cat " * 200, 100).endswith("...")
    assert grid._font().getlength(grid._fit("a cat " * 200, 100)) <= 100


def test_titles_are_drawn_under_their_thumbnails_and_cut_to_fit():
    def drawn(titles):
        return text_to_image_grid("q", [solid(RED), solid(BLUE)], [0.3, 0.2], titles=titles)

    named, coded = drawn(["smiling cat face", "purple circle"]), drawn(["1F63B", "1F7E3"])
    long = drawn(["smiling cat face with heart-eyes " * 5, "purple circle"])
    assert named.size == coded.size == long.size
    title_top = thumb_box(0)[1] + THUMB + LINE_H  # under "#rank score"
    above = (0, 0, named.width, title_top)
    assert named.crop(above).tobytes() == coded.crop(above).tobytes()
    assert named.tobytes() != coded.tobytes()
    second = (*thumb_box(1)[:1], title_top, named.width, named.height)  # the second cell's title
    assert long.crop(second).tobytes() == named.crop(second).tobytes()  # the long one stays in its cell
    assert grid._font().getlength(grid._fit("smiling cat face with heart-eyes " * 5, THUMB)) <= THUMB


def test_long_query_is_cut_to_the_header_lines():
    lines = grid._wrap("word " * 300, 200, max_lines=2)
    assert len(lines) == 2 and lines[-1].endswith("...")
    assert grid._wrap("a short query", 200, max_lines=2) == ["a short query"]


def test_missing_picture_is_a_placeholder_tile():
    image = text_to_image_grid("q", [None, solid(RED)], [0.3, 0.2])
    left, top = thumb_box(0)
    assert image.getpixel((left + 2, top + 2)) == TILE


@pytest.mark.parametrize("call, message", [
    (lambda: text_to_image_grid("q", [], []), "result list is empty"),
    (lambda: text_to_image_grid("q", [solid(RED)], [0.1, 0.2]), "scores has 2 entries for 1 results"),
    (lambda: image_to_text_grid(solid(RED), ["a"], [0.1], correct=[True, False]), "correct has 2 entries"),
    (lambda: text_to_image_grid("q", [torch.zeros(3, 4, 4)], [0.1]), "uint8 [3, H, W]"),
])
def test_bad_input_is_a_one_line_error(call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        call()
    assert "\n" not in str(err.value)
