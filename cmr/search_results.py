"""What a search found, as people read it: ranked tables, result grids, and the pictures and
labels they show.

    hits = SearchIndex(gallery).search_text(query_emb, k=5)
    print("\\n".join(format_text_hits(hits, gallery)))
    text_results_grid("a red heart", hits, gallery, split_dir, max_pixels).save("grid.png")

Captions are shown as the shards store them (``EmbeddingSet.caption_texts``), never decoded
from token ids, so words the vocabulary lacks stay readable. An image is named by a label
(``SearchConfig.label``): by default its first caption, which for emoji is the CLDR name;
tables also keep its id and key, which a user needs to find the sample.

Pictures are read by key from the gallery's split. A precomputed-feature split has none of
its own; when its manifest names the image dataset the features were extracted from
(``source["image_dataset"]``: same splits, shard names and keys), they are read from there,
else the grid draws a placeholder.
"""

from __future__ import annotations

import logging
import tarfile
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from cmr.data.decode import BadSample, decode_image
from cmr.data.manifest import read_manifest
from cmr.data.tario import IMAGE_EXTENSIONS
from cmr.eval.embed import EmbeddingSet
from cmr.eval.grid import image_to_text_grid, text_to_image_grid
from cmr.search import SearchConfig, SearchIndex, is_label_spec

logger = logging.getLogger(__name__)
TABLE_LABEL_CHARS = 40  # the label column of the tables is cut to this many characters
# Manifest ``source`` fields of a feature dataset naming the image dataset it was made from.
IMAGE_DATASET_FIELDS = ("image_dataset", "image_dataset_abs")  # relative to its root; absolute


# --------------------------------------------------------------------------- pictures


def picture_split_dir(split_dir: str | Path) -> Path | None:
    """The split directory holding the pictures of ``split_dir``'s samples: itself, unless it
    is a feature split; then the same split of the image dataset its manifest names (the
    relative pointer first, so a moved pair of datasets still works), or None."""
    split_dir = Path(split_dir)
    try:
        manifest = read_manifest(split_dir)
    except ValueError:
        return split_dir  # no manifest (img2dataset tars): pictures are read where they are
    if manifest.modality != "features":
        return split_dir
    pointers = [str(p) for p in map(manifest.source.get, IMAGE_DATASET_FIELDS) if p]
    for pointer in pointers:
        candidate = split_dir.parent / pointer / split_dir.name  # an absolute pointer wins
        if candidate.is_dir():
            return candidate
    if pointers:
        logger.warning("%s: no split %r in the image dataset its features came from (%s); "
                       "drawing placeholders", split_dir, split_dir.name, " or ".join(pointers))
    return None


def picture_dir(shards: str | Path, splits: list[str]) -> Path | None:
    """Where the pictures of a gallery of ``splits`` of ``shards`` are: a split directory for
    one split, else the root of the (image) dataset, keys then starting with their split."""
    first = picture_split_dir(Path(shards) / splits[0])
    return first if len(splits) == 1 or first is None else first.parent


def read_gallery_images(split_dir: str | Path, keys: list[str]) -> dict[str, bytes]:
    """Encoded image bytes of the samples ``keys`` ("<shard file>/<key>", as in an
    EmbeddingSet; "<split>/<shard file>/<key>" under a dataset root for a gallery of several
    splits), opening each shard involved once. Keys that cannot be read are absent."""
    wanted: dict[str, set[str]] = {}
    for key in keys:  # "<split>/<shard>/<key>" in a gallery of several splits
        shard, _, sample = key.rpartition("/")
        wanted.setdefault(shard, set()).add(sample)
    found: dict[str, bytes] = {}
    for shard, samples in wanted.items():
        try:
            with tarfile.open(Path(split_dir) / shard, mode="r:") as tar:
                for member in tar:  # headers only: tarfile seeks over the other members
                    sample, ext = base_plus_ext(member.name)
                    key = f"{shard}/{sample}"
                    is_image = member.isreg() and ext is not None and ext.lower() in IMAGE_EXTENSIONS
                    if is_image and sample in samples and key not in found:
                        found[key] = tar.extractfile(member).read()
        except (OSError, tarfile.TarError, EOFError):
            continue  # a damaged shard: its pictures are drawn as "no image"
    return found


def gallery_pictures(split_dir: str | Path | None, keys: list[str], max_pixels: int) -> list:
    """Decoded uint8 [3, H, W] pictures for ``keys`` from ``split_dir`` (None where there is
    none: no picture directory, feature shards, unreadable samples)."""
    if split_dir is None:
        return [None] * len(keys)
    encoded = read_gallery_images(split_dir, keys)
    pictures = []
    for key in keys:
        try:
            data = encoded.get(key)
            pictures.append(None if data is None else decode_image(data, max_pixels=max_pixels))
        except BadSample:
            pictures.append(None)
    return pictures


# --------------------------------------------------------------------------- labels


def first_captions(embeddings: EmbeddingSet) -> list[int]:
    """Per image, the index of its first caption (-1 if it has none)."""
    first = [-1] * embeddings.num_images
    for caption, owner in reversed(list(enumerate(embeddings.caption_owner.tolist()))):
        first[owner] = caption
    return first


def image_labels(embeddings: EmbeddingSet, images: list[int], label: str = "caption") -> list[str]:
    """The label of each of ``images`` (``SearchConfig.label``): its first caption, id, key
    or ``labels.<name>``; where that is missing or empty, its id, else its key."""
    if not is_label_spec(label):
        raise ValueError(f"label must be caption, id, key or labels.<name>, got {label!r}")
    first = first_captions(embeddings) if label == "caption" else []
    names = []
    for image in images:
        if label == "caption":
            value = embeddings.caption_texts[first[image]] if first[image] >= 0 else None
        elif label in ("id", "key"):
            value = (embeddings.ids if label == "id" else embeddings.keys)[image]
        else:
            labels = embeddings.labels[image]
            value = labels.get(label.removeprefix("labels.")) if isinstance(labels, dict) else None
        fallbacks = (value, embeddings.ids[image], embeddings.keys[image])
        names.append(next((str(v) for v in fallbacks if v is not None and str(v).strip()), ""))
    return names


# --------------------------------------------------------------------------- grids


def text_results_grid(query: str, hits: list[tuple[int, float]], embeddings: EmbeddingSet,
                      split_dir: str | Path, max_pixels: int, relevant: set[int] | None = None,
                      label: str = "caption"):
    """The picture of a text query's results: its images with scores and labels (green: in
    ``relevant``), read from ``split_dir`` or, for features, from their image dataset."""
    return _text_grid(query, hits, embeddings, picture_split_dir(split_dir), max_pixels,
                      relevant, label)


def _text_grid(query: str, hits: list[tuple[int, float]], embeddings: EmbeddingSet,
               pictures_dir: Path | None, max_pixels: int, relevant: set[int] | None, label: str):
    images = [i for i, _ in hits]
    pictures = gallery_pictures(pictures_dir, [embeddings.keys[i] for i in images], max_pixels)
    titles = image_labels(embeddings, images, label)  # the grid cuts them to the thumbnail width
    correct = [i in relevant for i in images] if relevant is not None else None
    return text_to_image_grid(query, pictures, [s for _, s in hits], titles, correct)


def image_results_grid(image, hits: list[tuple[int, float]], embeddings: EmbeddingSet,
                       title: str | None = None, owner: int | None = None):
    """The picture of an image query's results: its captions with scores (green: its own)."""
    captions = [embeddings.caption_texts[c] for c, _ in hits]
    correct = None
    if owner is not None:
        correct = [int(embeddings.caption_owner[c]) == owner for c, _ in hits]
    return image_to_text_grid(image, captions, [s for _, s in hits], correct, title)


def fixed_query_grids(embeddings: EmbeddingSet, split_dir: str | Path, *, num_queries: int = 4,
                      top_k: int = 5, max_pixels: int = 89_478_485, label: str = "caption"):
    """[(caption, grid)] for a few fixed validation captions and their top-k images, the
    caption's own image framed in green; for a wandb table at the end of an evaluation.

    The queries are the first captions of images spread evenly over the split's keys in
    sorted order, so they are the same at every evaluation whatever the number of ranks."""
    if num_queries < 1 or embeddings.num_images == 0:
        return []
    order = sorted(range(embeddings.num_images), key=lambda i: embeddings.keys[i])
    picks = [order[i * len(order) // num_queries] for i in range(min(num_queries, len(order)))]
    first = first_captions(embeddings)
    index = SearchIndex(embeddings, SearchConfig(kind="exact"))
    pictures_dir = picture_split_dir(split_dir)
    grids = []
    for image in dict.fromkeys(picks):  # fewer images than queries: no repeats
        if first[image] < 0:
            continue
        text = embeddings.caption_texts[first[image]]
        hits = index.search_text(embeddings.caption_emb[first[image]], top_k)
        grid = _text_grid(text, hits, embeddings, pictures_dir, max_pixels, {image}, label)
        grids.append((text, grid))
    return grids


# --------------------------------------------------------------------------- tables


def format_text_hits(hits: list[tuple[int, float]], embeddings: EmbeddingSet,
                     label: str = "caption") -> list[str]:
    """A text query's results as table lines: rank, score, id, key, the image's label (unless
    it is its first caption, the last column anyway) and first caption."""
    images = [i for i, _ in hits]
    captions = image_labels(embeddings, images, "caption")
    names = image_labels(embeddings, images, label) if label != "caption" else None
    rows = [("rank", "score", "id", "key", *(("label",) if names else ()), "caption")]
    for rank, (image, score) in enumerate(hits):
        name = (_cut(names[rank], TABLE_LABEL_CHARS),) if names else ()
        rows.append((str(rank + 1), f"{score:.4f}", str(embeddings.ids[image]),
                     embeddings.keys[image], *name, _cut(captions[rank])))
    return _table(rows)


def format_image_hits(hits: list[tuple[int, float]], embeddings: EmbeddingSet,
                      label: str = "caption") -> list[str]:
    """An image query's results as table lines: rank, score, id, key and label of the
    caption's image, the caption."""
    owners = [int(embeddings.caption_owner[c]) for c, _ in hits]
    names = image_labels(embeddings, owners, label)
    rows = [("rank", "score", "id", "key", "label", "caption")]
    for rank, ((caption, score), owner) in enumerate(zip(hits, owners)):
        rows.append((str(rank + 1), f"{score:.4f}", str(embeddings.ids[owner]),
                     embeddings.keys[owner], _cut(names[rank], TABLE_LABEL_CHARS),
                     _cut(embeddings.caption_texts[caption])))
    return _table(rows)


def _cut(text: str, max_chars: int | None = None) -> str:
    """One table line's worth of ``text``: whitespace runs (newlines too) become one space."""
    text = " ".join(text.split())
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[: max_chars - 3].rstrip() + "..."


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]) for row in rows]
    return [line.rstrip() for line in lines]
