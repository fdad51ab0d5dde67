"""Shards from a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``...).

Format: ``{"dataset": "coco", "images": [{"filepath": "val2014", "filename": "...jpg",
"split": "train|val|test|restval", "sentences": [{"raw": "...", "tokens": [...]}],
"imgid": 0, "cocoid": 391895}]}``. ``filepath`` exists for COCO only. ``restval``
(the 30k COCO val images the standard splits add to training) is its own split unless
``restval_into_train`` is set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cmr.data.manifest import sha256_file
from shards.pipeline import (
    BuildConfig,
    SampleSpec,
    build_config,
    clean_captions,
    load_images,
    resolve_split,
    write_dataset,
)
from shards.report import BuildReport, ShardsError, SkipReport


def build_karpathy(
    json_file: str | Path,
    images_root: str | Path,
    out_dir: str | Path,
    restval_into_train: bool = False,
    **options: Any,
) -> BuildReport:
    """Build ``out_dir/<split>/shard-*.tar``; ``options`` are ``BuildConfig`` fields."""
    config = build_config(options)
    json_file, images_root = Path(json_file), Path(images_root)
    if not images_root.is_dir():
        raise ShardsError(f"images root is not a directory: {images_root}")
    dataset = _read_karpathy_json(json_file)
    report = SkipReport()
    specs = []
    for index, entry in enumerate(dataset["images"]):
        spec = _spec_from_entry(entry, index, images_root, restval_into_train, config, report)
        if spec is not None:
            specs.append(spec)
    source = {
        "type": "karpathy",
        "dataset": dataset.get("dataset", ""),
        "json_file": str(json_file),
        "json_sha256": sha256_file(json_file),
        "images_root": str(images_root),
        "restval_into_train": restval_into_train,
    }
    return write_dataset(
        specs,
        load_images(specs, config),
        Path(out_dir),
        config,
        report,
        builder="shards.karpathy",
        source=source,
    )


def _read_karpathy_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ShardsError(f"Karpathy JSON not found: {path}") from None
    except OSError as err:
        raise ShardsError(f"cannot read Karpathy JSON {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ShardsError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ShardsError(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ShardsError(f'{path} has no "images" list: is it a Karpathy split file?')
    return data


def _sentences_to_captions(sentences: Any) -> Any:
    """``raw`` of each sentence (``tokens`` joined when ``raw`` is absent)."""
    if not isinstance(sentences, list):
        return sentences  # clean_captions reports the bad type
    captions = []
    for sentence in sentences:
        if isinstance(sentence, dict) and isinstance(sentence.get("raw"), str):
            captions.append(sentence["raw"])
        elif isinstance(sentence, dict) and isinstance(sentence.get("tokens"), list):
            captions.append(" ".join(str(t) for t in sentence["tokens"]))
        else:
            captions.append(sentence)  # not a string: reported as bad_field
    return captions


def _spec_from_entry(
    entry: Any,
    index: int,
    images_root: Path,
    restval_into_train: bool,
    config: BuildConfig,
    report: SkipReport,
) -> SampleSpec | None:
    where = f"images[{index}]"
    if not isinstance(entry, dict):
        report.skip("bad_field", f"{where}: not a JSON object")
        return None
    for field in ("filename", "sentences"):
        if field not in entry:
            report.skip("missing_field", f"{where}: no {field!r}")
            return None
    filename, filepath = entry["filename"], entry.get("filepath", "")
    if not isinstance(filename, str) or not filename or not isinstance(filepath, str):
        report.skip("bad_field", f"{where}: filename/filepath must be strings")
        return None
    relative = f"{filepath}/{filename}" if filepath else filename
    captions = clean_captions(_sentences_to_captions(entry["sentences"]), where, report)
    if captions is None:
        return None
    source_id = entry.get("cocoid", entry.get("imgid", relative))
    raw_split = entry.get("split")
    if restval_into_train and raw_split == "restval":
        raw_split = "train"
    split = resolve_split(raw_split, str(source_id), config, where, report)
    if split is None:
        return None
    return SampleSpec(
        split=split,
        captions=captions,
        labels={},
        source_id=source_id,
        where=f"{where} ({relative})",
        image=str(images_root / relative),
    )
