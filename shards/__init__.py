"""Turn raw image-text datasets into deterministic WebDataset shards (``python -m shards``).

Python API (the CLI is a thin layer over it)::

    build_jsonl(captions_file, images_root, out_dir, **options) -> BuildReport
    build_karpathy(json_file, images_root, out_dir, restval_into_train=False, **options)
    build_features(features_file, captions_file, out_dir, **options)
    build_emoji(out_dir, cache_dir=None, **options)
    inspect_dataset(dataset_dir) -> dict
    validate_dataset(dataset_dir, decode=False) -> list[str]   # problems, [] if intact

``options`` are ``BuildConfig`` fields (shard_size, workers, max_size, max_pixels,
split_fractions, feature_dtype, progress). User mistakes raise ``ShardsError`` or
``cmr.config.ConfigError``, both with a one-line message.
"""

from shards.emoji import build_emoji, fetch_npm_package
from shards.features import build_features
from shards.jsonl import build_jsonl
from shards.karpathy import build_karpathy
from shards.pipeline import BuildConfig
from shards.report import BuildReport, ShardsError
from shards.summary import inspect_dataset
from shards.validate import validate_dataset

__all__ = [
    "BuildConfig",
    "BuildReport",
    "ShardsError",
    "build_emoji",
    "build_features",
    "build_jsonl",
    "build_karpathy",
    "fetch_npm_package",
    "inspect_dataset",
    "validate_dataset",
]
