"""Feature extraction (cmr/extract.py, launch/extract.py): exactly once over ranks, resumable
after a kill, features equal to the backbone's output, clear errors for bad requests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch

from cmr.data.decode import decode_image
from cmr.data.manifest import read_manifest
from cmr.data.tario import iter_tar_samples
from cmr.data.transforms import eval_transform, normalize
from cmr.extract import ExtractConfig, build_backbone_for
from tests.launch import REPO, accelerate_launch, cpu_env, ok
from tests.tiny_data import image_bytes, write_split

pytest.importorskip("timm")
EXTRACT = REPO / "launch" / "extract.py"
SIZE = 32  # small input: the job's logic is what is tested, not the network at 224 px
SPLITS = {"train": (22, 4), "val": (7, 3), "test": (5, 5)}  # samples, shard size
CORRUPT = 9  # a train sample whose image bytes are garbage
NUM_SHARDS = sum(-(-num // size) for num, size in SPLITS.values())


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for split, (num, shard_size) in SPLITS.items():
        overrides = None
        if split == "train":
            overrides = {CORRUPT: {"json": json.dumps({"captions": ["broken"], "id": "bad"}).encode(),
                                   "png": b"\x89PNG not really"}}
        write_split(root, split, num, shard_size, overrides=overrides)
    return root


def extract_args(source, out, *extra):
    return ["--shards", str(source), "--out", str(out), "--image-size", str(SIZE), "--batch-size", "3",
            "--num-workers", "1", "--no-progress", *extra]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, str(EXTRACT), *args], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=timeout)


def read_features(root) -> dict[tuple[str, str], tuple[bytes, np.ndarray]]:
    """(split, key) -> (json bytes, feature) over every output shard."""
    found = {}
    for split in SPLITS:
        for shard in sorted((root / split).glob("shard-*.tar")):
            for sample in iter_tar_samples(shard):
                key = (split, f"{shard.name}/{sample['__key__']}")
                assert key not in found, f"{key} written twice"
                import io

                found[key] = (sample["json"], np.load(io.BytesIO(sample["feat.npy"])))
    return found


@pytest.fixture(scope="module")
def one_process(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "features"
    ok(accelerate_launch(EXTRACT, *extract_args(source, out), num_processes=1))
    return out


@pytest.mark.slow
def test_every_sample_once_with_the_source_json_and_the_manifest(source, one_process):
    features = read_features(one_process)
    expected = {(split, f"shard-{i // size:06d}.tar/{i:08d}") for split, (num, size) in SPLITS.items()
                for i in range(num) if not (split == "train" and i == CORRUPT)}
    assert set(features) == expected
    for (split, key), (meta, feature) in features.items():
        source_sample = next(s for s in iter_tar_samples(source / split / key.split("/")[0])
                             if s["__key__"] == key.split("/")[1])
        assert meta == source_sample["json"]  # copied verbatim
        assert feature.dtype == np.float32 and feature.shape == (1280,) and np.isfinite(feature).all()
    manifest = read_manifest(one_process / "train")
    assert manifest.modality == "features" and manifest.feature_dim == 1280
    assert manifest.num_samples == SPLITS["train"][0] - 1 and manifest.skipped == {"corrupt_image": 1}
    settings = manifest.source
    assert settings["backbone"] == "efficientnet_lite0" and settings["weights"] == "imagenet"
    assert settings["input_size"] == SIZE and settings["mean"] == [0.5] * 3 and settings["std"] == [0.5] * 3
    assert settings["dtype"] == "float32" and settings["feature_dim"] == 1280
    assert settings["image_dataset_abs"] == str(source.resolve())
    assert len(settings["source_manifest_sha256"]) == 64


@pytest.mark.slow
def test_a_feature_equals_the_backbone_on_the_same_decoded_image(source, one_process):
    cfg = ExtractConfig(shards=str(source), out="unused", image_size=SIZE)
    transform = cfg.transform()
    backbone, _, _ = build_backbone_for(cfg, torch.device("cpu"), channels_last=False)
    features = read_features(one_process)
    for index in (0, 13):
        key = ("train", f"shard-{index // 4:06d}.tar/{index:08d}")
        image = eval_transform(decode_image(image_bytes(index)), transform)
        with torch.no_grad():
            expected = backbone(normalize(image[None], transform.mean, transform.std))[0].numpy()
        np.testing.assert_allclose(features[key][1], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_real_processes_write_the_same_features_as_one(source, one_process, tmp_path):
    out = tmp_path / "features"
    result = ok(accelerate_launch(EXTRACT, *extract_args(source, out), num_processes=2))
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1]  # two ranks really ran
    assert all(s["shards_done"] > 0 for s in summaries)  # both worked,
    assert sum(s["shards_done"] for s in summaries) == NUM_SHARDS  # each on shards of its own
    one, two = read_features(one_process), read_features(out)
    assert set(one) == set(two)
    for key in one:
        assert one[key][0] == two[key][0]
        np.testing.assert_allclose(two[key][1], one[key][1], rtol=1e-5, atol=1e-6)
    for split in SPLITS:
        assert read_manifest(out / split).num_samples == read_manifest(one_process / split).num_samples


@pytest.mark.slow
def test_a_killed_extraction_rerun_gives_the_same_shards(source, one_process, tmp_path):
    out = tmp_path / "features"
    # One decoder: shards finish one after another, so the kill lands between two of them.
    job = subprocess.Popen([sys.executable, str(EXTRACT), *extract_args(source, out)], cwd=REPO,
                           env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*/*.tar.json"))) < 2 and time.monotonic() < deadline and job.poll() is None:
        time.sleep(0.05)
    helpers = psutil.Process(job.pid).children(recursive=True)
    assert helpers, "the job decodes in worker processes"
    job.send_signal(signal.SIGKILL)
    job.wait()
    # No process of the job outlives it (torch's worker watchdog polls every 5 s).
    _, alive = psutil.wait_procs(helpers, timeout=20)
    assert not alive, f"left running after the job was killed: {[p.cmdline()[:3] for p in alive]}"
    finished = len(list(out.glob("*/*.tar.json")))
    assert 2 <= finished < NUM_SHARDS, "the kill should land mid-job"
    assert not (out / "train" / "manifest.json").exists()  # an unfinished job has no manifest
    # A half-written shard, as a kill mid-write would leave it: redone, not kept.
    victim = sorted(out.glob("*/*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    rerun = ok(run_cli(*extract_args(source, out)))
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["shards_kept"] == finished - 1 and summary["shards_done"] == NUM_SHARDS - summary["shards_kept"]
    for split in SPLITS:
        for shard in (one_process / split).glob("*.tar"):
            assert (out / split / shard.name).read_bytes() == shard.read_bytes(), shard.name
        assert read_manifest(out / split) == read_manifest(one_process / split)
    assert not list(out.glob("*/*tmp*"))


@pytest.mark.slow
def test_rerunning_a_finished_job_keeps_everything(source, one_process):
    before = {p: p.stat().st_mtime_ns for p in one_process.glob("*/*.tar")}
    summary = json.loads(ok(run_cli(*extract_args(source, one_process))).stdout.strip().splitlines()[-1])
    assert summary["shards_done"] == 0 and summary["shards_kept"] == NUM_SHARDS
    assert {p: p.stat().st_mtime_ns for p in one_process.glob("*/*.tar")} == before


@pytest.mark.parametrize("extra,message", [
    (("--backbone", "efficientnet_lite9"), "config error: backbone: unknown backbone 'efficientnet_lite9'"),
    (("--weights", "ResNet50_Weights.IMAGENET1K_V2"), "config error: weights: unknown weights"),
    (("--splits", "train", "holdout"), "error: split 'holdout' not found in"),
    (("--batch-size", "0"), "config error: batch_size: must be >= 1"),
])
def test_bad_requests_stop_with_one_line(source, tmp_path, extra, message):
    result = run_cli(*extract_args(source, tmp_path / "out", *extra))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_another_extraction_into_the_same_directory_is_refused(source, one_process):
    result = run_cli(*extract_args(source, one_process, "--dtype", "float16"))
    assert result.returncode == 2
    assert "holds features of another extraction (dtype differ)" in result.stderr


@pytest.mark.slow
def test_bf16_extraction_is_close_to_fp32_and_recorded(source, one_process, tmp_path):
    """What a GPU run does by default (precision auto -> bf16), on the CPU's autocast."""
    out = tmp_path / "bf16"
    ok(run_cli(*extract_args(source, out, "--precision", "bf16", "--splits", "test")))
    assert read_manifest(out / "test").source["precision"] == "bf16"
    fp32 = {k: v for k, v in read_features(one_process).items() if k[0] == "test"}
    bf16 = read_features(out)
    assert set(bf16) == set(fp32)
    for key, (_, feature) in bf16.items():
        reference = fp32[key][1]
        cosine = float(feature @ reference / (np.linalg.norm(feature) * np.linalg.norm(reference)))
        assert cosine > 0.99 and not np.array_equal(feature, reference)
