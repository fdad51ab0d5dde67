"""Search results as people read them: captions as the shards store them (not decoded from
token ids), images named by readable labels, and a feature gallery's pictures read from the
image dataset its features came from."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from cmr.config import ConfigError, from_dict
from cmr.data.decode import decode_image
from cmr.data.manifest import read_manifest, write_manifest
from cmr.data.source import open_split
from cmr.eval.grid import THUMB, image_to_text_grid, text_to_image_grid, thumbnail
from cmr.search import SearchConfig, gallery_embeddings
from cmr.search_results import (
    first_captions, fixed_query_grids, format_image_hits, format_text_hits, gallery_pictures,
    image_labels, image_results_grid, text_results_grid,
)
from tests.test_grid import solid, thumb_box
from tests.test_search import load, make_run, planted_gallery, search_cli
from tests.tiny_data import image_bytes, write_split

MAX_PIXELS = 10**7
# Emoji-like samples: the first caption is the name, the id a code point. "A toolbox." and
# "An alien tree!" hold words the tiny vocabulary lacks; the blank caption is dropped on read.
NAMED = [
    ("1F9F0", ["A toolbox.", "   ", "toolbox"], {"category": "Objects", "subcategory": "tool"}),
    ("1F333", ["An alien tree!", "tree"], {"category": "Animals & Nature", "subcategory": "plant"}),
    ("1F63B", ["smiling cat face with heart-eyes", "cat"], {"category": "Smileys", "subcategory": "cat-face"}),
    ("1F7E3", ["purple circle", "red"], {"category": "Symbols", "subcategory": "geometric"}),
]


def write_named_split(root: Path, split: str) -> Path:
    """NAMED as an image split, two samples per shard, pictures image_bytes(100 + i)."""
    overrides = {}
    for i, (sample_id, captions, labels) in enumerate(NAMED):
        meta = {"captions": captions, "labels": labels, "id": sample_id}
        overrides[i] = {"json": json.dumps(meta).encode(), "png": image_bytes(100 + i)}
    return write_split(root, split, len(NAMED), 2, overrides=overrides)


def point_at_images(feature_split: Path, **source) -> None:
    """Set the feature split's manifest ``source`` (as the extraction job writes it)."""
    manifest = read_manifest(feature_split)
    manifest.source = source
    write_manifest(manifest, feature_split)


def cells(line: str) -> list[str]:
    """A table line's cells (columns are two or more spaces apart; cells hold single spaces)."""
    return re.split(r" {2,}", line)


def thumbnails(grid: Image.Image, num: int) -> list[bytes]:
    """The pixels of the first ``num`` thumbnails of a text_to_image_grid."""
    boxes = [thumb_box(rank) for rank in range(num)]
    return [grid.crop((left, top, left + THUMB, top + THUMB)).tobytes() for left, top in boxes]


def picture_of(index: int) -> bytes:
    """What the grid should show for image_bytes(index)."""
    return thumbnail(decode_image(image_bytes(index), max_pixels=MAX_PIXELS)).tobytes()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("results"))
    write_named_split(run.shards, "named")
    return run


@pytest.fixture(scope="module")
def named(run):
    """The NAMED split's gallery; ``row[id]`` is an image's row in it."""
    model, vocab, cfg, checkpoint = load(run)
    gallery = gallery_embeddings(run.run_dir, model, cfg, vocab, shards=run.shards, split="named",
                                 checkpoint=checkpoint)
    row = {sample_id: i for i, sample_id in enumerate(gallery.ids)}
    return SimpleNamespace(gallery=gallery, vocab=vocab, split_dir=run.shards / "named", row=row,
                           first=first_captions(gallery))


# --------------------------------------------------------------------------- captions


def test_caption_rows_hold_the_stored_texts(named):
    assert "<unk>" in named.vocab.decode(named.vocab.encode("A toolbox."))  # what used to show
    owners = named.gallery.caption_owner.tolist()
    for sample_id, captions, _ in NAMED:
        rows = [text for text, owner in zip(named.gallery.caption_texts, owners) if owner == named.row[sample_id]]
        assert rows == [c.strip() for c in captions if c.strip()]


def test_tables_show_the_stored_captions_and_keep_id_and_key(named):
    gallery, row, first = named.gallery, named.row, named.first
    toolbox, tree, cat = row["1F9F0"], row["1F333"], row["1F63B"]
    lines = format_text_hits([(toolbox, 0.9), (tree, 0.8)], gallery)
    assert [cells(line) for line in lines] == [
        ["rank", "score", "id", "key", "caption"],
        ["1", "0.9000", "1F9F0", gallery.keys[toolbox], "A toolbox."],
        ["2", "0.8000", "1F333", gallery.keys[tree], "An alien tree!"]]
    cat_keyword = first[cat] + 1  # the cat's second caption, "cat"
    lines = format_image_hits([(first[toolbox], 0.7), (cat_keyword, 0.6)], gallery)
    assert [cells(line) for line in lines] == [  # the caption's image by id, key and name
        ["rank", "score", "id", "key", "label", "caption"],
        ["1", "0.7000", "1F9F0", gallery.keys[toolbox], "A toolbox.", "A toolbox."],
        ["2", "0.6000", "1F63B", gallery.keys[cat], "smiling cat face with heart-eyes", "cat"]]
    lines = format_text_hits([(cat, 0.9)], gallery, label="labels.subcategory")
    assert cells(lines[0]) == ["rank", "score", "id", "key", "label", "caption"]
    assert cells(lines[1])[4:] == ["cat-face", "smiling cat face with heart-eyes"]


def test_cli_prints_the_stored_captions(run, tmp_path, capsys):
    common = ["--run-dir", str(run.run_dir), "--shards", str(run.shards), "--split", "named", "--num-workers", "0"]
    assert search_cli()([*common, "--query", "red", "--top-k", "4"]) == 0
    out = capsys.readouterr().out
    assert "<unk>" not in out
    assert {cells(line)[-1] for line in out.splitlines()[2:]} == {captions[0] for _, captions, _ in NAMED}
    (tmp_path / "q.png").write_bytes(image_bytes(100))
    assert search_cli()([*common, "--image", str(tmp_path / "q.png"), "--top-k", "8"]) == 0
    out = capsys.readouterr().out
    shown = {tuple(cells(line)[-2:]) for line in out.splitlines()[2:]}  # (image label, caption)
    assert "<unk>" not in out
    assert shown == {(captions[0], c.strip()) for _, captions, _ in NAMED for c in captions if c.strip()}


def test_grids_draw_the_stored_captions(named):
    gallery, row, first = named.gallery, named.row, named.first
    texts = ["A toolbox.", "An alien tree!"]
    hits = [(first[row["1F9F0"]], 0.7), (first[row["1F333"]], 0.6)]
    decoded = [named.vocab.decode(named.vocab.encode(text)) for text in texts]
    got = image_results_grid(solid((200, 0, 0)), hits, gallery).tobytes()
    assert got == image_to_text_grid(solid((200, 0, 0)), texts, [0.7, 0.6]).tobytes()
    assert got != image_to_text_grid(solid((200, 0, 0)), decoded, [0.7, 0.6]).tobytes()
    queries = [text for text, _ in fixed_query_grids(gallery, named.split_dir, num_queries=4, top_k=2)]
    assert queries == [captions[0] for _, captions, _ in NAMED]  # every first caption, verbatim


# --------------------------------------------------------------------------- labels


def test_grid_names_each_image_by_its_label_not_its_id(named):
    gallery, row = named.gallery, named.row
    images = [row["1F63B"], row["1F7E3"]]
    hits = [(images[0], 0.9), (images[1], 0.8)]
    pictures = gallery_pictures(named.split_dir, [gallery.keys[i] for i in images], MAX_PIXELS)

    def drawn(titles):
        return text_to_image_grid("q", pictures, [0.9, 0.8], titles).tobytes()

    def grid(**label):
        return text_results_grid("q", hits, gallery, named.split_dir, MAX_PIXELS, **label).tobytes()

    assert grid() == drawn(["smiling cat face with heart-eyes", "purple circle"])
    assert grid() != drawn(["1F63B", "1F7E3"])
    assert grid(label="id") == drawn(["1F63B", "1F7E3"])
    assert grid(label="labels.subcategory") == drawn(["cat-face", "geometric"])
    assert grid(label="labels.nothing") == drawn(["1F63B", "1F7E3"])  # missing: the id


def test_labels_fall_back_to_the_id_then_the_key():
    gallery = planted_gallery(3)
    gallery.caption_texts[0] = ""  # image 0's first caption unreadable
    gallery.ids[1] = None
    gallery.labels = [{"name": "zero"}, {"name": " "}, "not a dict"]
    assert image_labels(gallery, [0, 1, 2]) == ["s0", "caption 1.0", "caption 2.0"]
    assert image_labels(gallery, [0, 1, 2], "id") == ["s0", gallery.keys[1], "s2"]
    assert image_labels(gallery, [0, 1, 2], "labels.name") == ["zero", gallery.keys[1], "s2"]
    with pytest.raises(ValueError, match="label must be caption, id, key or labels.<name>, got 'name'"):
        image_labels(gallery, [0], "name")


@pytest.mark.parametrize("label", ["name", "labels.", "", "ID"])
def test_unknown_label_choice_names_the_field(label):
    with pytest.raises(ConfigError, match="^label: must be caption, id, key or labels.<name>"):
        from_dict(SearchConfig, {"label": label})


# --------------------------------------------------------------------------- feature galleries


def test_feature_gallery_pictures_come_from_the_image_dataset_it_names(tmp_path):
    images = write_split(tmp_path / "emoji", "val", 6, 10)
    features = write_split(tmp_path / "emoji_features", "val", 6, 10, modality="features")
    gallery = planted_gallery(6)  # keys shard-000000.tar/0000000i, as both splits hold
    hits = [(4, 0.9), (1, 0.5)]

    def shown() -> list[bytes]:
        return thumbnails(text_results_grid("q", hits, gallery, features, MAX_PIXELS), 2)

    real, placeholder = [picture_of(4), picture_of(1)], [thumbnail(None).tobytes()] * 2
    assert shown() == placeholder  # no pointer: nothing to show
    point_at_images(features, image_dataset="../emoji", image_dataset_abs=str(images.parent))
    assert shown() == real
    point_at_images(features, image_dataset="../moved", image_dataset_abs=str(images.parent))
    assert shown() == real  # the absolute path when the relative one is gone
    point_at_images(features, image_dataset="../moved")
    assert shown() == placeholder
    point_at_images(features, image_dataset="../emoji")
    (_, grid), *_ = fixed_query_grids(gallery, features, num_queries=1, top_k=2)
    assert thumbnail(None).tobytes() not in thumbnails(grid, 2)


def test_cli_grid_of_a_feature_run_shows_the_image_dataset_pictures(tmp_path, capsys):
    run = make_run(tmp_path, modality="features", num_samples=12)
    write_split(tmp_path / "images", "val", 12, 10)  # the same shard names and keys as run.shards/val
    point_at_images(run.shards / "val", image_dataset="../images")
    argv = ["--run-dir", str(run.run_dir), "--split", "val", "--query", "red", "--top-k", "3",
            "--grid", str(tmp_path / "g.png"), "--num-workers", "0"]
    assert search_cli()(argv) == 0
    keys = [line.split()[3] for line in capsys.readouterr().out.splitlines()[2:5]]
    with Image.open(tmp_path / "g.png") as grid:
        assert thumbnails(grid.convert("RGB"), 3) == [picture_of(int(key.split("/")[1])) for key in keys]
    assert open_split(run.shards, "val").modality == "features"
