"""The built-in emoji dataset: caption rules, the npm cache and its checksums, and (slow,
needs the npm registry) the real end-to-end build."""

from __future__ import annotations

import collections
import io
import shutil

import pytest
from PIL import Image

from cmr.data.manifest import read_manifest, sha256_file
from shards import ShardsError, build_emoji, fetch_npm_package, validate_dataset
from shards.emoji import CLDR_DERIVED, EMOJI_PACKAGES, NpmPackage, emoji_captions, find_annotation
from shards_fixtures import read_split, run_cli


def test_annotation_lookup_tries_without_variation_selector_and_derived_table():
    heart = "\u2764\ufe0f"
    base = {"\u2764": {"default": ["love"], "tts": ["red heart"]}}
    derived = {
        "\U0001f44d\U0001f3fd": {"default": ["thumbs up"], "tts": ["thumbs up: medium skin"]}
    }
    assert find_annotation(heart, [base, derived])["tts"] == ["red heart"]
    assert find_annotation("\U0001f44d\U0001f3fd", [base, derived])["tts"][0].startswith("thumbs")
    assert find_annotation("\U0001f600", [base, derived]) is None


def test_captions_drop_keywords_that_repeat_the_name():
    assert emoji_captions(
        {"default": ["face", "grin", "grinning face"], "tts": ["grinning face"]}, "GRINNING FACE"
    ) == ["grinning face", "grinning face: face, grin"]
    assert emoji_captions({"default": ["Camping"], "tts": ["camping"]}, "CAMPING") == ["camping"]


def path_without_npm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    assert shutil.which("npm", path=str(bin_dir)) is None
    return str(bin_dir)


def test_missing_npm_is_a_one_line_error(tmp_path):
    result = run_cli(
        "build",
        "emoji",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "cache"),
        env={"PATH": path_without_npm(tmp_path)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: npm not found on PATH: install Node.js (npm) to fetch "
        f"{EMOJI_PACKAGES[0].spec}, or put {EMOJI_PACKAGES[0].tgz_name} into {tmp_path / 'cache'}"
    ]


def test_a_corrupt_cached_tarball_is_not_used(tmp_path, monkeypatch, capsys):
    cached = tmp_path / CLDR_DERIVED.tgz_name
    cached.write_bytes(b"tampered")
    monkeypatch.setenv("PATH", path_without_npm(tmp_path))  # so it cannot fetch a fresh one
    with pytest.raises(ShardsError, match="npm not found on PATH"):
        fetch_npm_package(CLDR_DERIVED, tmp_path)
    assert "checksum mismatch in cache, fetching it again" in capsys.readouterr().err
    assert not cached.exists()


@pytest.fixture(scope="module")
def npm_cache(tmp_path_factory):
    """One real download of the three packages for this module's slow tests."""
    cache = tmp_path_factory.mktemp("npm-cache")
    for package in EMOJI_PACKAGES:
        fetch_npm_package(package, cache)
    return cache


@pytest.mark.slow
def test_corrupt_cache_is_fetched_again_and_a_wrong_pin_is_refused(npm_cache, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / CLDR_DERIVED.tgz_name).write_bytes(b"tampered")
    path = fetch_npm_package(CLDR_DERIVED, cache)
    assert sha256_file(path) == CLDR_DERIVED.sha256
    wrong_pin = NpmPackage(CLDR_DERIVED.name, CLDR_DERIVED.version, "0" * 64)
    with pytest.raises(
        ShardsError, match=f"checksum mismatch for {CLDR_DERIVED.spec}: expected 0000"
    ):
        fetch_npm_package(wrong_pin, tmp_path / "other")
    assert not (tmp_path / "other" / CLDR_DERIVED.tgz_name).exists()


@pytest.mark.slow
def test_emoji_build_end_to_end(npm_cache, tmp_path):
    out = tmp_path / "emoji"
    report = build_emoji(out, cache_dir=npm_cache, workers=2, progress=False)
    assert report.num_samples == 1911 and report.skipped == {}
    fractions = {split: n / 1911 for split, n in report.samples.items()}
    assert set(fractions) == {"train", "val", "test"}
    assert abs(fractions["train"] - 0.8) < 0.03 and abs(fractions["val"] - 0.1) < 0.02
    num_captions = collections.Counter()
    for split in report.samples:
        for sample in read_split(out, split):
            assert sample["ext"] == "png"
            image = Image.open(io.BytesIO(sample["data"]))
            assert (image.format, image.size) == ("PNG", (64, 64))
            record = sample["json"]
            assert (
                set(record["labels"]) == {"category", "subcategory"}
                and record["labels"]["category"]
            )
            captions = record["captions"]
            num_captions[len(captions)] += 1
            if len(captions) == 2:
                assert captions[1].startswith(captions[0] + ": ")
    # Two captions each, except emoji whose only keyword is their own name.
    assert (
        num_captions[2] >= 1890
        and set(num_captions) <= {1, 2}
        and sum(num_captions.values()) == 1911
    )
    manifest = read_manifest(out / "train")
    assert manifest.source["license"] == "Apache-2.0"
    assert [p["sha256"] for p in manifest.source["packages"]] == [p.sha256 for p in EMOJI_PACKAGES]
    assert validate_dataset(out, decode=True) == []


@pytest.mark.slow
def test_emoji_cli_build_reuses_the_cache_and_is_deterministic(npm_cache, tmp_path):
    runs = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        result = run_cli(
            "build",
            "emoji",
            "--out",
            str(out),
            "--cache-dir",
            str(npm_cache),
            "--workers",
            workers,
            "--shard-size",
            "500",
            env={"PATH": path_without_npm(tmp_path / workers)},
        )  # cache only
        assert result.returncode == 0, result.stderr
        runs.append({s.name: s.sha256 for s in read_manifest(out / "train").shards})
    assert runs[0] == runs[1] and len(runs[0]) == 4
