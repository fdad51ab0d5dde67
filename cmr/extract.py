"""Feature extraction: an image dataset's shards -> feature shards, on every rank at once.

    accelerate launch launch/extract.py --shards data/emoji --backbone efficientnet_lite0 \\
        --weights imagenet --out data/emoji-lite0

A unit of work is one source shard. Shards are dealt to ranks round robin (and, within a
rank, to its DataLoader workers), so every sample is encoded exactly once, with the eval
transform and no augmentation. Each output shard mirrors its source shard: same split, same
file name, same sample keys, the sample's json copied verbatim, ``<key>.feat.npy`` beside it.
Batches never span shards, so a shard's features do not depend on how many ranks ran.

Resumable: an output shard is written as ``.tmp``, renamed, then described by a sidecar
``<shard>.json`` (its sha256, sample count, skipped samples, the source shard's sha256).
After a kill, a rerun keeps every shard whose sidecar matches the file and the source, and
redoes the rest. The split manifests are written last, by rank 0, once every shard is done;
they record the backbone, weights, input size, normalisation, feature dim, dtype and the
source manifests' hashes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cmr.config import ConfigError
from cmr.data.decode import BadSample, decode_image, parse_text
from cmr.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, sha256_file, write_manifest
from cmr.procs import WorkerInit
from cmr.data.remote import is_url, redact
from cmr.data.source import DataError, ShardSet, open_split
from cmr.dist import process_state
from cmr.data.tario import IMAGE_EXTENSIONS, iter_tar_samples
from cmr.data.transforms import ImageTransformConfig, eval_transform, normalize
from cmr.models.backbones import BACKBONES, backbone_spec
from cmr.models.image import ImageEncoderConfig, build_image_encoder
from shards.writer import encode_sample_json, tar_member

FORMAT_VERSION = 1
SETTINGS_FILE = "extract.json"  # the job's settings, so a rerun can't mix two extractions


class ExtractError(RuntimeError):
    """The job cannot run as asked; the message says why and what to do."""


@dataclasses.dataclass
class ExtractConfig:
    shards: str  # the image dataset (`python -m shards build ...` output)
    out: str  # the feature dataset to write
    backbone: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    image_size: int | None = None  # null: the backbone's own input size
    resize_ratio: float | None = None  # eval resize before the centre crop; null: the backbone's
    splits: list[str] | None = None  # null: every split of the dataset
    batch_size: int = 64  # images per forward pass (never spanning two shards)
    num_workers: int = 2  # decoding processes per rank
    dtype: Literal["float32", "float16"] = "float32"  # how features are stored
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on a GPU, else fp32
    channels_last: bool = True  # ~1.5x faster convolutions on CPU and GPU
    max_pixels: int = 89_478_485

    def validate(self) -> None:
        if self.backbone not in BACKBONES or self.backbone == "small_cnn":
            known = ", ".join(b for b in BACKBONES if b != "small_cnn")
            raise ConfigError("backbone", f"unknown backbone {self.backbone!r} (known: {known})")
        for name in ("image_size", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1, got {value}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.resize_ratio is not None and not self.resize_ratio >= 1.0:
            raise ConfigError("resize_ratio", f"must be >= 1 (resize, then crop), got {self.resize_ratio}")
        # Names the weights' problem (unknown name, package not installed) before any work.
        ImageEncoderConfig(kind="pixels", backbone=self.backbone, weights=self.weights).validate()

    def transform(self) -> ImageTransformConfig:
        spec = backbone_spec(self.backbone)
        return ImageTransformConfig(size=self.image_size or spec.input_size,
                                    resize_ratio=self.resize_ratio or spec.resize_ratio,
                                    mean=spec.mean, std=spec.std)


@dataclasses.dataclass(frozen=True)
class WorkItem:
    split: str
    source: Path  # the source shard
    source_sha256: str  # from the source manifest ("" without one)
    num_samples: int  # what the source promises

    def out_path(self, out: Path) -> Path:
        return out / self.split / self.source.name


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def open_source_splits(cfg: ExtractConfig) -> dict[str, ShardSet]:
    if is_url(cfg.shards):
        raise ExtractError(f"--shards {redact(cfg.shards)}: the extraction reads a local dataset directory "
                           "(it writes beside it); copy the shards to local disk first")
    root = Path(cfg.shards)
    if not root.is_dir():
        raise ExtractError(f"dataset not found: {root} (build one with `python -m shards build ...`)")
    available = sorted(p.parent.name for p in root.glob(f"*/{MANIFEST_NAME}"))
    splits = cfg.splits or available
    if not splits:
        raise ExtractError(f"{root} has no split with a {MANIFEST_NAME} (is it a `python -m shards build` output?)")
    missing = [s for s in splits if s not in available]
    if missing:
        raise ExtractError(f"split {missing[0]!r} not found in {root} (it has: {', '.join(available) or 'none'})")
    sets = {}
    for split in splits:
        try:
            shardset = open_split(root, split)
        except DataError as err:
            raise ExtractError(str(err)) from None
        if shardset.modality != "image":
            raise ExtractError(f"{root}/{split} holds {shardset.modality}, not images: nothing to extract")
        sets[split] = shardset
    return sets


def work_items(sets: dict[str, ShardSet]) -> list[WorkItem]:
    items = []
    for split, shardset in sets.items():
        shas = [s.sha256 for s in shardset.manifest.shards] if shardset.manifest else [""] * shardset.num_shards
        items += [WorkItem(split, path, sha, size) for path, sha, size in zip(shardset.paths, shas, shardset.sizes)]
    return items


def settings_record(cfg: ExtractConfig, sets: dict[str, ShardSet], weights_file: str | None) -> dict:
    """What makes two extractions give the same features; a rerun must match it exactly."""
    transform = cfg.transform()
    return {
        "format_version": FORMAT_VERSION,
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "weights_file": weights_file,
        "input_size": transform.size,
        "resize_ratio": transform.resize_ratio,
        "mean": list(transform.mean),
        "std": list(transform.std),
        "dtype": cfg.dtype,
        "precision": cfg.precision,
        "source_manifest_sha256": {
            split: sha256_file(s.split_dir / MANIFEST_NAME) if s.manifest else "" for split, s in sets.items()
        },
    }


# -- reading: DataLoader workers decode whole shards ------------------------------------------

class ShardImages(IterableDataset):
    """Batches of decoded images, one shard at a time; worker w of n takes items w, w+n, ..."""

    def __init__(self, items: list[WorkItem], transform: ImageTransformConfig, batch_size: int,
                 max_pixels: int):
        self.items, self.transform = items, transform
        self.batch_size, self.max_pixels = batch_size, max_pixels

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for index in range(worker, len(self.items), num_workers):
            yield from self._shard_batches(index)

    def _shard_batches(self, index: int):
        item = self.items[index]
        pending: list[tuple[str, bytes, torch.Tensor]] = []
        skipped: Counter = Counter()
        num_read = 0
        for sample in iter_tar_samples(item.source):
            num_read += 1
            decoded = self._decode(sample, skipped)
            if decoded is not None:
                pending.append(decoded)
            if len(pending) == self.batch_size:
                yield _batch(index, pending, skipped, last=False)
                pending, skipped = [], Counter()
        if num_read < item.num_samples:  # the tar ends early: count what never came
            reason = "truncated_shard" if item.source.exists() else "missing_shard"
            skipped[reason] += item.num_samples - num_read
        yield _batch(index, pending, skipped, last=True)

    def _decode(self, sample: dict, skipped: Counter) -> tuple[str, bytes, torch.Tensor] | None:
        try:
            captions, labels, source_id = parse_text(sample)
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                raise BadSample("missing_image")
            image = decode_image(sample[ext], max_pixels=self.max_pixels,
                                 target_min_side=self.transform.eval_resize)
        except BadSample as bad:
            skipped[bad.reason] += 1
            return None
        meta = sample.get("json") or encode_sample_json(captions, labels, source_id)
        return sample["__key__"], meta, eval_transform(image, self.transform)


def _batch(index: int, pending: list, skipped: Counter, last: bool) -> dict[str, Any]:
    return {
        "item": index,
        "keys": [key for key, _, _ in pending],
        "json": [meta for _, meta, _ in pending],
        "pixels": torch.stack([pixels for _, _, pixels in pending]) if pending else None,
        "skipped": dict(skipped),
        "last": last,
    }


# -- writing: one output shard per source shard ----------------------------------------------

def sidecar_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".json")


def is_done(item: WorkItem, out: Path) -> bool:
    """A finished shard: its sidecar names this source shard and the file's own hash."""
    path = item.out_path(out)
    try:
        record = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return False
    return (record.get("source_sha256") == item.source_sha256 and path.is_file()
            and path.stat().st_size == record.get("num_bytes") and sha256_file(path) == record.get("sha256"))


def write_feature_shard(item: WorkItem, out: Path, samples: list[tuple[str, bytes, np.ndarray]],
                        skipped: Counter) -> dict:
    """The tar (atomically), then its sidecar: a crash in between only means "redo"."""
    path = item.out_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    import tarfile

    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, meta, feature in samples:
            buf = io.BytesIO()
            np.save(buf, feature, allow_pickle=False)
            for name, data in ((f"{key}.json", meta), (f"{key}.feat.npy", buf.getvalue())):
                tar.addfile(tar_member(name, len(data)), io.BytesIO(data))
    tmp.replace(path)
    record = {"num_samples": len(samples), "sha256": sha256_file(path), "num_bytes": path.stat().st_size,
              "source": item.source.name, "source_sha256": item.source_sha256, "skipped": dict(skipped),
              "captions": [_num_captions(meta) for _, meta, _ in samples]}
    side = sidecar_path(path)
    side_tmp = side.with_name(side.name + f".tmp{os.getpid()}")
    side_tmp.write_text(json.dumps(record))
    side_tmp.replace(side)
    return record


def _num_captions(meta: bytes) -> int:
    captions = json.loads(meta).get("captions")
    return len(captions) if isinstance(captions, list) else 1


def write_manifests(cfg: ExtractConfig, sets: dict[str, ShardSet], items: list[WorkItem],
                    settings: dict, feature_dim: int) -> dict[str, Manifest]:
    out, source_root = Path(cfg.out), Path(cfg.shards).resolve()
    manifests = {}
    for split in sets:
        shards, skipped, captions = [], Counter(), []
        for item in (i for i in items if i.split == split):
            record = json.loads(sidecar_path(item.out_path(out)).read_text())
            shards.append(ShardInfo(item.source.name, record["num_samples"], record["sha256"], record["num_bytes"]))
            skipped.update(record["skipped"])
            captions += record["captions"]
        stats = {"min": min(captions), "mean": round(sum(captions) / len(captions), 4),
                 "max": max(captions)} if captions else {}
        source = {"type": "extracted", **settings, "feature_dim": feature_dim,
                  "image_dataset": os.path.relpath(source_root, out.resolve()),
                  "image_dataset_abs": str(source_root),
                  "source_manifest_sha256": settings["source_manifest_sha256"][split]}
        manifest = Manifest(split=split, modality="features", shards=shards, feature_dim=feature_dim,
                            captions_per_sample=stats, skipped=dict(skipped), builder="cmr.extract",
                            builder_version=str(FORMAT_VERSION), source=source)
        write_manifest(manifest, out / split)
        manifests[split] = manifest
    return manifests


# -- the job ----------------------------------------------------------------------------------

def check_settings(out: Path, settings: dict) -> bool:
    """Every rank reads (no rank may raise alone); False when OUT has no settings yet."""
    path = out / SETTINGS_FILE
    if not path.is_file():
        return False
    old = json.loads(path.read_text())
    if old != settings:
        changed = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
        raise ExtractError(f"{out} holds features of another extraction ({', '.join(changed)} differ); "
                           "use a new --out, or delete it to start over")
    return True


def encode_batch(backbone: torch.nn.Module, pixels: torch.Tensor, transform: ImageTransformConfig,
                 device: torch.device, dtype: torch.dtype, channels_last: bool) -> np.ndarray:
    """uint8 [B, 3, S, S] -> float32 features [B, D], normalised as the backbone expects."""
    x = normalize(pixels.to(device, non_blocking=True), transform.mean, transform.std)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        features = backbone(x)
    return features.float().cpu().numpy()


def build_backbone_for(cfg: ExtractConfig, device: torch.device, channels_last: bool):
    """(backbone in eval mode on ``device``, feature dim, the weights file's name or None)."""
    encoder_cfg = ImageEncoderConfig(kind="pixels", backbone=cfg.backbone, weights=cfg.weights)
    encoder = build_image_encoder(encoder_cfg)
    backbone = encoder.backbone.eval().to(device)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    weights = cfg.weights if cfg.weights and cfg.weights.lower() != "none" else None
    from cmr.models.image import resolve_weights

    source = resolve_weights(cfg.backbone, weights)
    weights_file = source.name if isinstance(source, Path) else (str(source) if source else None)
    return backbone, encoder.head[0].in_features, weights_file


def _loader(items: list[WorkItem], cfg: ExtractConfig, transform: ImageTransformConfig) -> DataLoader:
    dataset = ShardImages(items, transform, cfg.batch_size, cfg.max_pixels)
    workers = min(cfg.num_workers, len(items))
    # spawn: the rank already runs threads (gloo, tqdm), and forking a threaded process can
    # deadlock the child. Spawned workers are the rank's own children and end with it
    # (WorkerInit). A bounded wait turns a dead worker into an error.
    return DataLoader(dataset, batch_size=None, num_workers=workers,
                      multiprocessing_context="spawn" if workers else None,
                      worker_init_fn=WorkerInit() if workers else None,
                      timeout=600 if workers else 0)


def run_extraction(cfg: ExtractConfig, progress: bool = True) -> dict[str, Any]:
    """Run this process's share of the job (every rank calls it); a summary for the log."""
    from tqdm import tqdm

    state = process_state()
    out, transform = Path(cfg.out), cfg.transform()
    sets = open_source_splits(cfg)
    items = work_items(sets)
    device = state.device
    channels_last = cfg.channels_last
    backbone, feature_dim, weights_file = build_backbone_for(cfg, device, channels_last)
    settings = settings_record(cfg, sets, weights_file)
    if not check_settings(out, settings) and state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    state.wait_for_everyone()
    mine = items[state.process_index::state.num_processes]
    todo = [item for item in mine if not is_done(item, out)]
    for item in todo:  # leftovers of a killed run
        for stale in item.out_path(out).parent.glob(item.source.name + ".*tmp*"):
            stale.unlink()
    dtype = compute_dtype(cfg.precision, device)
    start = time.perf_counter()
    bar = tqdm(total=sum(i.num_samples for i in todo), unit="img", disable=not (progress and state.is_main_process),
               desc=f"extract (rank 0 of {state.num_processes})")
    pending: dict[int, tuple[list, Counter]] = {}
    num_encoded = 0
    for batch in _loader(todo, cfg, transform):
        samples, skipped = pending.setdefault(batch["item"], ([], Counter()))
        skipped.update(batch["skipped"])
        if batch["pixels"] is not None:
            features = encode_batch(backbone, batch["pixels"], transform, device, dtype, channels_last)
            for key, meta, row in zip(batch["keys"], batch["json"], features):
                if np.isfinite(row).all():
                    samples.append((key, meta, row.astype(cfg.dtype)))
                else:  # fp16 overflow, say: a NaN row would poison every loss it meets
                    skipped["bad_feature"] += 1
            num_encoded += len(batch["keys"])
        bar.update(len(batch["keys"]) + sum(batch["skipped"].values()))
        if batch["last"]:
            write_feature_shard(todo[batch["item"]], out, samples, skipped)
            del pending[batch["item"]]
    bar.close()
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    if state.is_main_process:
        unfinished = [str(i.out_path(out)) for i in items if not sidecar_path(i.out_path(out)).is_file()]
        if unfinished:
            raise ExtractError(f"{len(unfinished)} shard(s) were not finished, e.g. {unfinished[0]}; rerun the job")
        write_manifests(cfg, sets, items, settings, feature_dim)
    state.wait_for_everyone()
    return {"rank": state.process_index, "shards_done": len(todo), "shards_kept": len(mine) - len(todo),
            "images": num_encoded, "seconds": round(seconds, 2),
            "images_per_s": round(num_encoded / seconds, 1) if seconds > 0 and num_encoded else None}
