"""Search a gallery with a trained model: text -> images and image -> captions.

    gallery = gallery_embeddings(run_dir, model, cfg, vocab, shards=..., split="test",
                                 checkpoint=checkpoint_dir)   # computed once, then cached
    index = SearchIndex(gallery)
    hits = index.search_text(encode_query_text(model, vocab, "a dog runs in the snow"), k=5)

The gallery's embeddings are computed once per (split, checkpoint) and cached under
``<run or export dir>/cache``; the cache name carries a fingerprint of the shards (names,
sizes, mtimes, manifest), the checkpoint's weight files and the preprocessing settings, so
touching a shard or switching checkpoints computes them again.

Embeddings are L2-normalised, so faiss's inner product is the cosine similarity. Small
galleries get an exact index; large ones an inverted-file index (IVF-Flat) that visits
``nprobe`` of its ``nlist`` clusters per query (``nprobe = nlist`` gives the exact answer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import tarfile
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import torch
from webdataset.tariterators import base_plus_ext

from cmr.config import ConfigError, to_dict
from cmr.data.decode import BadSample, decode_image
from cmr.data.loader import build_loader
from cmr.data.source import ShardSet, open_split
from cmr.data.tario import IMAGE_EXTENSIONS
from cmr.data.transforms import decode_min_side, eval_transform, normalize
from cmr.data.vocab import Vocabulary, tokenize
from cmr.eval.embed import EmbeddingSet, compute_embeddings
from cmr.eval.grid import image_to_text_grid, text_to_image_grid

logger = logging.getLogger(__name__)
CACHE_VERSION = 1


class SearchError(ValueError):
    """A search the user asked for cannot run; the message is one line saying why."""


@dataclasses.dataclass
class SearchConfig:
    kind: Literal["auto", "exact", "ivf"] = "auto"
    ivf_min_items: int = 100_000  # auto: galleries at least this large get the IVF index
    nlist: int | None = None  # IVF clusters; None = round(sqrt(number of items))
    nprobe: int = 32  # IVF clusters visited per query; >= nlist makes the search exact

    def validate(self) -> None:
        for name in ("ivf_min_items", "nprobe"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError("nlist", f"must be >= 1 (or null: sqrt of the gallery size), got {self.nlist}")


# --------------------------------------------------------------------------- the index


def build_faiss_index(vectors: torch.Tensor, cfg: SearchConfig) -> faiss.Index:
    """An inner-product index over ``vectors`` [N, D]: exact, or IVF-Flat for large N."""
    data = np.ascontiguousarray(vectors.detach().float().cpu().numpy())
    num, dim = data.shape
    use_ivf = cfg.kind == "ivf" or (cfg.kind == "auto" and num >= cfg.ivf_min_items)
    if not use_ivf:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = min(cfg.nlist or max(1, round(math.sqrt(num))), num)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(data)  # k-means with faiss's fixed seed: the same clusters every time
        index.nprobe = min(cfg.nprobe, nlist)
    index.add(data)
    return index


class SearchIndex:
    """Nearest images for a text query and nearest captions for an image query."""

    def __init__(self, embeddings: EmbeddingSet, cfg: SearchConfig | None = None):
        if embeddings.num_images == 0:
            raise SearchError("the gallery is empty: no images were read from the split")
        self.embeddings = embeddings
        self.cfg = cfg or SearchConfig()
        self._indexes: dict[str, faiss.Index] = {}  # built on first use

    def index(self, which: Literal["images", "captions"]) -> faiss.Index:
        if which not in self._indexes:
            vectors = self.embeddings.image_emb if which == "images" else self.embeddings.caption_emb
            self._indexes[which] = build_faiss_index(vectors, self.cfg)
        return self._indexes[which]

    def search_text(self, query_emb: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """(image index, cosine score) of the ``k`` images nearest a text embedding, best first."""
        return self._search("images", query_emb, k)

    def search_image(self, query_emb: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """(caption index, cosine score) of the ``k`` captions nearest an image embedding."""
        return self._search("captions", query_emb, k)

    def _search(self, which, query_emb: torch.Tensor, k: int) -> list[tuple[int, float]]:
        if k < 1:
            raise SearchError(f"top-k must be >= 1, got {k}")
        index = self.index(which)
        query = np.ascontiguousarray(query_emb.detach().float().cpu().reshape(1, -1).numpy())
        if query.shape[1] != index.d:
            raise SearchError(f"query has {query.shape[1]} dimensions, the gallery {index.d}")
        scores, ids = index.search(query, min(k, index.ntotal))
        # IVF may find fewer than k when the visited clusters hold fewer items: faiss pads with -1.
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]


# --------------------------------------------------------------------------- queries


def unknown_words(vocab: Vocabulary, text: str) -> list[str]:
    return [word for word in tokenize(text) if word not in vocab.stoi]


@torch.no_grad()
def encode_query_text(model, vocab: Vocabulary, text: str) -> torch.Tensor:
    """The embedding [D] of a free-text query, tokenized as the training captions were."""
    if not text.strip():
        raise SearchError("the query is empty")
    words = tokenize(text)
    if not words:
        raise SearchError(f"the query {text!r} has no words (only punctuation or symbols)")
    if len(unknown_words(vocab, text)) == len(words):
        raise SearchError(
            f"none of the words of {text!r} is in the model's vocabulary ({len(vocab)} entries); "
            "use words from the training captions"
        )
    ids = vocab.encode(text)
    device = next(model.parameters()).device
    return _encode(model, lambda: model.encode_text(torch.tensor([ids], device=device),
                                                     torch.tensor([len(ids)])))


def read_query_image(path: str | Path, max_pixels: int, min_side: int | None = None) -> torch.Tensor:
    """A user's image file as uint8 [3, H, W], decoded exactly as the gallery's images are."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"image file not found: {path}")
    try:
        return decode_image(path.read_bytes(), max_pixels=max_pixels, target_min_side=min_side)
    except BadSample as bad:
        raise SearchError(f"{path} is not a usable image ({bad})") from None


@torch.no_grad()
def encode_query_image(model, data_cfg, path: str | Path) -> torch.Tensor:
    """The embedding [D] of an image file: the eval transform and normalisation of the gallery."""
    if model.cfg.image_encoder.kind != "pixels":
        raise SearchError(
            "this model reads precomputed image features, not pictures, so it cannot encode an "
            "image file; search it with a text query"
        )
    image = read_query_image(path, data_cfg.max_pixels, decode_min_side(data_cfg.image, train=False))
    param = next(model.parameters())
    pixels = eval_transform(image, data_cfg.image)[None].to(param.device)
    inputs = normalize(pixels, data_cfg.image.mean, data_cfg.image.std, dtype=param.dtype)
    return _encode(model, lambda: model.encode_image(inputs))


def _encode(model, run) -> torch.Tensor:
    was_training = model.training
    model.eval()  # BatchNorm statistics and no dropout, as in evaluation
    try:
        return run()[0].float().cpu()
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- embedding cache


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "root"


def _stat(path: Path) -> list:
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return [-1, -1]  # a missing shard: the loader counts its samples as missing


def _weight_files(checkpoint: Path) -> list[Path]:
    if (checkpoint / "model.safetensors").is_file():
        return [checkpoint / "model.safetensors"]
    files = (p for p in checkpoint.rglob("*") if p.is_file())
    return sorted(p for p in files if "cache" not in p.relative_to(checkpoint).parts)


def embeddings_cache_path(cache_dir: str | Path, shardset: ShardSet, split: str,
                          checkpoint: str | Path, data_cfg, vocab: Vocabulary) -> Path:
    """Where the gallery embeddings of (split, checkpoint) are cached; the name changes with
    anything that changes them: shard files, manifest, weights, preprocessing, vocabulary."""
    checkpoint = Path(checkpoint)
    manifest = shardset.split_dir / "manifest.json"
    state = {
        "version": CACHE_VERSION,
        "split_dir": str(shardset.split_dir.resolve()),
        "shards": [[p.name, *_stat(p)] for p in shardset.paths],
        "manifest": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None,
        "weights": [[str(p.relative_to(checkpoint)), *_stat(p)] for p in _weight_files(checkpoint)],
        "image": to_dict(data_cfg.image),
        "max_pixels": data_cfg.max_pixels,
        "feature_dim": data_cfg.feature_dim,
        "vocab": hashlib.sha256("\n".join(vocab.itos).encode()).hexdigest(),
        "max_caption_tokens": data_cfg.vocab.max_caption_tokens,
    }
    digest = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    name = f"embeddings-{_safe_name(split)}-{_safe_name(checkpoint.name)}-{digest}.pt"
    return Path(cache_dir) / name


def gallery_embeddings(
    root: str | Path, model, cfg, vocab: Vocabulary, *, shards: str | Path, split: str,
    checkpoint: str | Path, num_workers: int | None = None, device: torch.device | str = "cpu",
) -> EmbeddingSet:
    """The embeddings of every sample of ``shards/split``, from ``root/cache`` when they were
    computed before with the same shards and weights, else computed now and cached.

    ``root``: the run (or export) directory; ``checkpoint``: the directory the model's weights
    came from; ``cfg``: the run's config (``cfg.data`` says how samples are prepared)."""
    if num_workers is None:
        num_workers = cfg.data.num_workers
    data_cfg = dataclasses.replace(cfg.data, shards=str(shards), num_workers=num_workers)
    shardset = open_split(shards, split)
    path = embeddings_cache_path(Path(root) / "cache", shardset, split, checkpoint, data_cfg, vocab)
    cached = _read_cache(path)
    if cached is not None:
        return cached
    loader = build_loader(data_cfg, vocab, split=split, mode="eval")
    model.to(device)
    embeddings = compute_embeddings(model, loader, mean=data_cfg.image.mean, std=data_cfg.image.std,
                                    device=device)
    if loader.skip_counts:
        reasons = ", ".join(f"{reason}={n}" for reason, n in loader.skip_counts.most_common())
        logger.warning("%s/%s: %d unusable samples left out of the gallery (%s)", shards, split,
                       sum(loader.skip_counts.values()), reasons)
    _write_cache(path, embeddings)
    return embeddings


def _read_cache(path: Path) -> EmbeddingSet | None:
    if not path.is_file():
        return None
    try:
        return EmbeddingSet.from_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # noqa: BLE001 - a damaged cache file is only a reason to recompute
        logger.warning("ignoring unreadable embedding cache %s (%s)", path, type(err).__name__)
        return None


def _write_cache(path: Path, embeddings: EmbeddingSet) -> None:
    """Atomic write; older caches of the same split and checkpoint are stale now: removed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        torch.save(embeddings.to_dict(), tmp)
        os.replace(tmp, path)
        stale = re.compile(re.escape(path.name.rsplit("-", 1)[0]) + r"-[0-9a-f]{16}\.pt")
        for old in path.parent.iterdir():
            if old != path and stale.fullmatch(old.name):
                old.unlink(missing_ok=True)
    except OSError as err:  # a read-only run directory: search works, just without a cache
        logger.warning("could not cache embeddings in %s (%s)", path.parent, err)


# --------------------------------------------------------------------------- gallery pictures


def read_gallery_images(split_dir: str | Path, keys: list[str]) -> dict[str, bytes]:
    """Encoded image bytes of the samples ``keys`` ("<shard file>/<key>", as in an
    EmbeddingSet), opening each shard involved once. Keys that cannot be read are absent."""
    wanted: dict[str, set[str]] = {}
    for key in keys:
        shard, _, sample = key.partition("/")
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


def gallery_pictures(split_dir: str | Path, keys: list[str], max_pixels: int) -> list:
    """Decoded uint8 [3, H, W] pictures for ``keys`` (None where there is none: feature shards,
    unreadable samples)."""
    encoded = read_gallery_images(split_dir, keys)
    pictures = []
    for key in keys:
        try:
            data = encoded.get(key)
            pictures.append(None if data is None else decode_image(data, max_pixels=max_pixels))
        except BadSample:
            pictures.append(None)
    return pictures


# --------------------------------------------------------------------------- result pictures


def caption_text(embeddings: EmbeddingSet, vocab: Vocabulary, caption: int) -> str:
    return vocab.decode(embeddings.captions[caption])


def first_captions(embeddings: EmbeddingSet) -> list[int]:
    """Per image, the index of its first caption (-1 if it has none)."""
    first = [-1] * embeddings.num_images
    for caption, owner in reversed(list(enumerate(embeddings.caption_owner.tolist()))):
        first[owner] = caption
    return first


def text_results_grid(query: str, hits: list[tuple[int, float]], embeddings: EmbeddingSet,
                      split_dir: str | Path, max_pixels: int, relevant: set[int] | None = None):
    """The picture of a text query's results: its images with scores (green: in ``relevant``)."""
    images = [i for i, _ in hits]
    pictures = gallery_pictures(split_dir, [embeddings.keys[i] for i in images], max_pixels)
    titles = [embeddings.keys[i] if embeddings.ids[i] is None else str(embeddings.ids[i])
              for i in images]
    correct = [i in relevant for i in images] if relevant is not None else None
    return text_to_image_grid(query, pictures, [s for _, s in hits], titles, correct)


def image_results_grid(image, hits: list[tuple[int, float]], embeddings: EmbeddingSet,
                       vocab: Vocabulary, title: str | None = None, owner: int | None = None):
    """The picture of an image query's results: its captions with scores (green: its own)."""
    captions = [caption_text(embeddings, vocab, c) for c, _ in hits]
    correct = None
    if owner is not None:
        correct = [int(embeddings.caption_owner[c]) == owner for c, _ in hits]
    return image_to_text_grid(image, captions, [s for _, s in hits], correct, title)


def fixed_query_grids(embeddings: EmbeddingSet, vocab: Vocabulary, split_dir: str | Path, *,
                      num_queries: int = 4, top_k: int = 5, max_pixels: int = 89_478_485):
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
    grids = []
    for image in dict.fromkeys(picks):  # fewer images than queries: no repeats
        if first[image] < 0:
            continue
        text = caption_text(embeddings, vocab, first[image])
        hits = index.search_text(embeddings.caption_emb[first[image]], top_k)
        grids.append((text, text_results_grid(text, hits, embeddings, split_dir, max_pixels, {image})))
    return grids


def format_text_hits(hits: list[tuple[int, float]], embeddings: EmbeddingSet,
                     vocab: Vocabulary) -> list[str]:
    """A text query's results as table lines: rank, score, id, key, the image's first caption."""
    first = first_captions(embeddings)
    rows = [("rank", "score", "id", "key", "caption")]
    for rank, (image, score) in enumerate(hits, 1):
        caption = caption_text(embeddings, vocab, first[image]) if first[image] >= 0 else ""
        rows.append((str(rank), f"{score:.4f}", str(embeddings.ids[image]), embeddings.keys[image],
                     caption))
    return _table(rows)


def format_image_hits(hits: list[tuple[int, float]], embeddings: EmbeddingSet,
                      vocab: Vocabulary) -> list[str]:
    """An image query's results as table lines: rank, score, id and key of the caption's image,
    caption."""
    rows = [("rank", "score", "id", "key", "caption")]
    for rank, (caption, score) in enumerate(hits, 1):
        owner = int(embeddings.caption_owner[caption])
        rows.append((str(rank), f"{score:.4f}", str(embeddings.ids[owner]), embeddings.keys[owner],
                     caption_text(embeddings, vocab, caption)))
    return _table(rows)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]) for row in rows]
    return [line.rstrip() for line in lines]


# --------------------------------------------------------------------------- loading


def load_search_model(run_dir: str | Path | None = None, exported: str | Path | None = None,
                      checkpoint: str | None = None):
    """(model in eval mode, vocabulary, config, weights directory, cache root) from a run
    (``checkpoint``: latest, best, step-N; default best if the run has one, else latest) or
    from an exported model directory."""
    if (run_dir is None) == (exported is None):
        raise SearchError("give either a run directory or an exported model directory")
    if exported is not None:
        from cmr.export import load_exported

        if checkpoint is not None:
            raise SearchError("--checkpoint picks a checkpoint of a run; an export holds one model")

        model, vocab, cfg = load_exported(exported)
        return model, vocab, cfg, Path(exported), Path(exported)
    from cmr.eval.load import load_run_model
    from cmr.train.checkpoint import CheckpointError

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise SearchError(f"{run_dir} is not a run directory (no config.yaml in it)")
    if checkpoint is None:
        checkpoint = "best" if (run_dir / "best" / "model.safetensors").is_file() else "latest"
    try:
        model, vocab, cfg, path = load_run_model(run_dir, checkpoint)
    except CheckpointError as err:
        raise SearchError(str(err)) from None
    return model, vocab, cfg, path, run_dir
