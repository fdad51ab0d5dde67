"""Search a gallery with a trained model: text -> images and image -> captions.

    gallery = gallery_embeddings(run_dir, model, cfg, vocab, shards=..., split="test",
                                 checkpoint=checkpoint_dir)   # computed once, then cached
    index = SearchIndex(gallery)
    hits = index.search_text(encode_query_text(model, vocab, "a dog runs in the snow"), k=5)

The gallery's embeddings are computed once per (split, checkpoint) and cached under
``<run or export dir>/cache``; the cache name carries a fingerprint of the shards (names,
sizes, mtimes, manifest), the checkpoint's weight files and the preprocessing settings, so
touching a shard or switching checkpoints computes them again.

Tables and grids of the results are drawn by ``cmr.search_results``.

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
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import torch

from cmr.config import ConfigError, to_dict
from cmr.data.decode import BadSample, decode_image
from cmr.data.loader import build_loader
from cmr.data.source import ShardSet
from cmr.data.transforms import decode_min_side, eval_transform, normalize
from cmr.data.vocab import Vocabulary, tokenize
from cmr.eval.embed import EmbeddingSet, compute_embeddings
from cmr.run_dir import CACHE_DIR

logger = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: caption texts as stored (1 held token ids)


class SearchError(ValueError):
    """A search the user asked for cannot run; the message is one line saying why."""


def is_label_spec(label: str) -> bool:
    """Whether ``label`` names a way to label images (see ``SearchConfig.label``)."""
    return label in ("caption", "id", "key") or (label.startswith("labels.") and label != "labels.")


@dataclasses.dataclass
class SearchConfig:
    kind: Literal["auto", "exact", "ivf"] = "auto"
    ivf_min_items: int = 100_000  # auto: galleries at least this large get the IVF index
    nlist: int | None = None  # IVF clusters; None = round(sqrt(number of items))
    nprobe: int = 32  # IVF clusters visited per query; >= nlist makes the search exact
    # What names an image in grids and tables: caption (its first), id, key, or labels.<name>;
    # a missing value falls back to the id, then the key.
    label: str = "caption"

    def validate(self) -> None:
        for name in ("ivf_min_items", "nprobe"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise ConfigError("nlist", f"must be >= 1 (or null: sqrt of the gallery size), got {self.nlist}")
        if not is_label_spec(self.label):
            raise ConfigError("label",
                              f"must be caption, id, key or labels.<name>, got {self.label!r}")


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


def _without_secrets(location) -> str:
    # Hashed into a cache file name, never shown; the query string (a signature) changes.
    return str(location).split("?", 1)[0]


def _weight_files(checkpoint: Path) -> list[Path]:
    if (checkpoint / "model.safetensors").is_file():
        return [checkpoint / "model.safetensors"]
    files = (p for p in checkpoint.rglob("*") if p.is_file())
    return sorted(p for p in files if CACHE_DIR not in p.relative_to(checkpoint).parts)


def embeddings_cache_path(cache_dir: str | Path, shardset: ShardSet, split: str,
                          checkpoint: str | Path, data_cfg, vocab: Vocabulary) -> Path:
    """Where the gallery embeddings of (split, checkpoint) are cached; the name changes with
    anything that changes them: shard files, manifest, weights, preprocessing, vocabulary."""
    checkpoint = Path(checkpoint)
    if shardset.is_remote:  # a remote object's version is its ETag/size/mtime
        where = _without_secrets(shardset.split_dir)
        shards = [[name, shardset.opener.stamp(p)] for name, p in zip(shardset.names, shardset.paths)]
        manifest_sha = (hashlib.sha256(json.dumps(shardset.manifest.to_json(), sort_keys=True).encode()).hexdigest()
                        if shardset.manifest else None)
    else:
        manifest = Path(shardset.split_dir) / "manifest.json"
        where = str(Path(shardset.split_dir).resolve())
        shards = [[p.name, *_stat(p)] for p in shardset.paths]
        manifest_sha = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    state = {
        "version": CACHE_VERSION,
        "split_dir": where,
        "shards": shards,
        "manifest": manifest_sha,
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
    data_cfg = dataclasses.replace(cfg.data, shards=shards if isinstance(shards, (list, dict)) else str(shards),
                                   num_workers=num_workers)
    shardset = data_cfg.open_split(split)
    path = embeddings_cache_path(Path(root) / CACHE_DIR, shardset, split, checkpoint, data_cfg, vocab)
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


def merge_galleries(galleries: dict[str, EmbeddingSet]) -> EmbeddingSet:
    """Several splits as one gallery (a search of the whole catalogue). Keys gain their split
    ("train/shard-000001.tar/00000133"), so they stay unique and name where a sample lives."""
    if len(galleries) == 1:
        return next(iter(galleries.values()))
    owners, offset = [], 0
    for gallery in galleries.values():
        owners.append(gallery.caption_owner + offset)
        offset += gallery.num_images
    parts = list(galleries.items())
    return EmbeddingSet(
        image_emb=torch.cat([g.image_emb for _, g in parts]),
        caption_emb=torch.cat([g.caption_emb for _, g in parts]),
        caption_owner=torch.cat(owners),
        caption_texts=[t for _, g in parts for t in g.caption_texts],
        ids=[i for _, g in parts for i in g.ids],
        keys=[f"{split}/{key}" for split, g in parts for key in g.keys],
        labels=[label for _, g in parts for label in g.labels],
    )


def _read_cache(path: Path) -> EmbeddingSet | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.pop("format", None) != CACHE_VERSION:  # the version in the name makes this rare
            logger.warning("ignoring embedding cache %s of an older format", path)
            return None
        return EmbeddingSet.from_dict(data)
    except Exception as err:  # noqa: BLE001 - a damaged cache file is only a reason to recompute
        logger.warning("ignoring unreadable embedding cache %s (%s)", path, type(err).__name__)
        return None


def _write_cache(path: Path, embeddings: EmbeddingSet) -> None:
    """Atomic write; older caches of the same split and checkpoint are stale now: removed."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        torch.save({"format": CACHE_VERSION, **embeddings.to_dict()}, tmp)
        os.replace(tmp, path)
        stale = re.compile(re.escape(path.name.rsplit("-", 1)[0]) + r"-[0-9a-f]{16}\.pt")
        for old in path.parent.iterdir():
            if old != path and stale.fullmatch(old.name):
                old.unlink(missing_ok=True)
    except OSError as err:  # a read-only run directory: search works, just without a cache
        logger.warning("could not cache embeddings in %s (%s)", path.parent, err)


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
    from cmr.run_dir import RunDir, RunDirError

    run = RunDir(run_dir)
    try:
        run.require_run()
        model, vocab, cfg, path = load_run_model(run, checkpoint)  # None: best, else latest
    except RunDirError as err:
        raise SearchError(str(err)) from None
    return model, vocab, cfg, path, run.path
