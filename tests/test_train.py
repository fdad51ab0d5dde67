"""The trainer through the real `accelerate launch`, on CPU (gloo), declared as data.

Each case is a set of config overrides and a process count; every run trains the tiny
3-stage config of tests/fixtures/tiny_train.yaml on tiny real shards.
"""

import json
import re
import subprocess
import sys
import time

import pytest

from cmr.run_dir import RunDir
from tests.launch import REPO, accelerate_launch, cpu_env, deepspeed_env, free_port, ok
from tests.tiny_data import train_val_shards

DRIVER = REPO / "tests" / "dist" / "train_driver.py"
TRAIN = REPO / "launch" / "train.py"
TINY = REPO / "tests" / "fixtures" / "tiny_train.yaml"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

CASES = [
    {"id": "1proc-ddp-path", "procs": 1, "overrides": []},
    {"id": "2proc-ddp", "procs": 2, "overrides": []},
    {"id": "2proc-accumulate-2", "procs": 2, "overrides": ["train.gradient_accumulation_steps=2", "data.batch_size=4"]},
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return train_val_shards(tmp_path_factory.mktemp("train_shards"))


def train_args(shards, run_dir, *overrides, config=TINY):
    # All the overrides after one --set, then a flag: the form users type (see test_config).
    return ["--config", str(config), "--set", f"data.shards={shards}", *overrides, "--run-dir", str(run_dir)]


def all_records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metrics(run_dir):
    """The training records (evaluation records carry a "split")."""
    return [r for r in all_records(run_dir) if "split" not in r]


def evals(run_dir):
    return [r for r in all_records(run_dir) if "split" in r]


def losses(records):
    return [{k: v for k, v in r.items() if k.startswith(("loss/", "reward/")) or k in ("step", "epoch", "stage")}
            for r in records]



@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_three_stage_run_trains_and_ranks_agree(case, shards, tmp_path):
    run = tmp_path / "run"
    ok(accelerate_launch(DRIVER, *train_args(shards, run, *case["overrides"]), num_processes=case["procs"]))
    records = metrics(run)
    assert [r["stage"] for r in records][0] == "encoders" and records[-1]["stage"] == "joint"
    assert {r["stage"] for r in records} == {"encoders", "discriminators", "joint"}
    stage1 = [r["loss/triplet"] for r in records if r["stage"] == "encoders"]
    assert sum(stage1[-3:]) / 3 < sum(stage1[:3]) / 3, f"triplet loss did not go down: {stage1}"
    reports = [json.loads((run / f"rank{r}.json").read_text()) for r in range(case["procs"])]
    assert {r["world"] for r in reports} == {case["procs"]}
    assert len({r["params_sha256"] for r in reports}) == 1, "replicas diverged"
    assert len({r["buffers_sha256"] for r in reports}) == 1, "BatchNorm statistics diverged"
    # Frozen groups really get lr 0 in their stage, trained ones the stage lr.
    disc = next(r for r in records if r["stage"] == "discriminators")
    assert disc["lr/text_encoder"] == 0.0 and disc["lr/modality_disc"] > 0
    assert (run / "config.yaml").exists() and (run / "vocab.json").exists()
    # Evaluated on the validation split after every epoch; the best model is kept for search.
    assert [r["epoch"] for r in evals(run)] == [1, 2, 3, 4, 5]
    assert all(r["eval/num_images"] == 12 and r["eval/rsum"] >= 0 for r in evals(run))
    best = json.loads((run / "best" / "export.json").read_text())
    assert best["metrics"]["rsum"] == max(r["eval/rsum"] for r in evals(run))
    assert list((run / "wandb").glob("offline-run-*")), "no offline wandb run"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(ckpts) == 3 and all(name.startswith("step-") for name in ckpts)


def test_deepspeed_zero2_two_ranks(shards, tmp_path):
    run = tmp_path / "run"
    env, config = deepspeed_env(), REPO / "configs" / "accelerate" / "cpu_deepspeed_zero2.yaml"
    args = train_args(shards, run, "train.max_steps=6", "train.checkpoint.every_n_steps=3")
    ok(accelerate_launch(DRIVER, *args, env=env, config_file=config))
    reports = [json.loads((run / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["distributed_type"] for r in reports} == {"DistributedType.DEEPSPEED"}
    assert sorted(r["rank"] for r in reports) == [0, 1] and {r["world"] for r in reports} == {2}
    assert len({r["params_sha256"] for r in reports}) == 1
    assert len({r["buffers_sha256"] for r in reports}) == 1
    first = metrics(run)
    assert first[-1]["step"] == 6
    # Resume from the saved engine state and go on.
    ok(accelerate_launch(DRIVER, *train_args(shards, run, "train.max_steps=9"), "--resume", "auto",
                         env=env, config_file=config))
    after = metrics(run)
    assert [r["step"] for r in after] == list(range(1, 10))
    assert losses(after[:6]) == losses(first)
    # The second launch really resumed the engine state: from step 6, three steps run.
    start, end = RunDir(run).read_launches()[-2:]
    assert (start["resumed_from_step"], end["steps_run"], end["outcome"]) == (6, 3, "max_steps")


def test_gradient_accumulation_matches_one_big_batch(shards, tmp_path):
    """2 micro-batches x 4 give the parameters of 1 batch x 8, for per-sample losses."""
    # The discriminator stage: encoders frozen (eval-mode BatchNorm), per-sample BCE losses.
    common = ["train.stages=[{name: d, epochs: 1, train: [discriminators], losses: {modality_adv: 0.5, imagine_adv: 0.5}, lr: 0.01}]",
              "train.max_steps=3", "data.num_workers=0", "train.optimizer.grad_clip=0"]
    small, big = tmp_path / "small", tmp_path / "big"
    ok(accelerate_launch(DRIVER, *train_args(shards, small, *common, "data.batch_size=4", "train.gradient_accumulation_steps=2"), num_processes=1))
    ok(accelerate_launch(DRIVER, *train_args(shards, big, *common, "data.batch_size=8"), num_processes=1))
    from safetensors.torch import load_file

    a = load_file(str(small / "checkpoints" / "step-00000003" / "model.safetensors"))
    b = load_file(str(big / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert a.keys() == b.keys()
    moved = 0
    for name in a:
        assert (a[name] - b[name]).abs().max() <= 1e-6, name
        moved += name.startswith("modality_disc")
    assert moved
    la = [r["loss/modality_adv"] for r in metrics(small)]
    lb = [r["loss/modality_adv"] for r in metrics(big)]
    assert la == pytest.approx(lb, abs=1e-6)


def test_multi_node_code_path_on_one_machine(shards, tmp_path):
    run, port = tmp_path / "run", free_port()
    procs = []
    for machine_rank in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(machine_rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
               str(DRIVER), *train_args(shards, run, "train.max_steps=4")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    reports = [json.loads((run / f"rank{r}.json").read_text()) for r in range(2)]
    assert {r["world"] for r in reports} == {2} and len({r["params_sha256"] for r in reports}) == 1


BAD_LAUNCHES = [
    {"id": "too-little-data", "procs": 2, "overrides": ["data.batch_size=32"],
     "message": "fewer than one batch per rank"},
    {"id": "unknown-stage-group", "procs": 1, "overrides": ["train.stages=[{name: a, epochs: 1, train: [wings], losses: {triplet: 1}}]"],
     "message": "train.stages[0].train: unknown parameter group 'wings'"},
    {"id": "unknown-loss", "procs": 1, "overrides": ["train.stages=[{name: a, epochs: 1, train: [all], losses: {magic: 1}}]"],
     "message": "train.stages[0].losses.magic: unknown loss"},
    {"id": "loss-weight-outside-a-stage", "procs": 1, "overrides": ["loss.modality_adv=1"],
     "message": "loss.modality_adv: loss weights are set per stage in train.stages[i].losses"},
    {"id": "fp16-on-cpu", "procs": 1, "overrides": ["train.mixed_precision=fp16"],
     "message": "train.mixed_precision: fp16 needs a GPU"},
    {"id": "accumulation-needs-more-data", "procs": 2, "overrides": ["train.gradient_accumulation_steps=4", "data.batch_size=8"],
     "message": "x 4 accumulation steps"},
]


@pytest.mark.parametrize("case", BAD_LAUNCHES, ids=[c["id"] for c in BAD_LAUNCHES])
def test_bad_configs_stop_before_training_with_a_clear_message(case, shards, tmp_path):
    run = tmp_path / "run"
    result = accelerate_launch(TRAIN, *train_args(shards, run, *case["overrides"]), num_processes=case["procs"])
    assert result.returncode != 0
    assert case["message"] in result.stderr
    # One line from each rank; the only traceback may be the launcher's report of the exit
    # code, never one from inside cmr.
    assert not re.search(r'File ".*/(cmr|launch)/', result.stderr), result.stderr[-3000:]
    assert not (run / "metrics.jsonl").exists()


FAULT = REPO / "tests" / "dist" / "fault_driver.py"


def test_nonfinite_losses_are_skipped_then_stop_the_run_with_the_checkpoint_intact(shards, tmp_path):
    run = tmp_path / "run"
    # Steps 5..6 give nan once each (skipped and counted); from step 8 on always (the run stops).
    common = ["train.max_consecutive_nonfinite=3", "train.checkpoint.every_n_steps=2"]
    result = accelerate_launch(FAULT, *train_args(shards, run, *common), env=cpu_env(CMR_TEST_FAULT="nan@8"))
    assert result.returncode != 0
    assert "non-finite (nan/inf) 3 steps in a row" in result.stderr
    assert "train.max_consecutive_nonfinite=3" in result.stderr and "last good checkpoint is" in result.stderr
    records = metrics(run)
    assert records[-1]["nonfinite_skipped"] >= 1
    assert all(r["step"] <= 10 for r in records)
    # The newest complete checkpoint is from before the losses went bad, and it loads.
    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert latest.name == "step-00000008"
    ok(accelerate_launch(TRAIN, *train_args(shards, run, "train.max_steps=10"), "--resume", "auto"))
    assert metrics(run)[-1]["step"] == 10
    start, end = RunDir(run).read_launches()[-2:]
    assert (start["resumed_from_step"], end["steps_run"]) == (8, 2)


def test_a_few_nonfinite_steps_are_skipped_and_counted(shards, tmp_path):
    run = tmp_path / "run"
    ok(accelerate_launch(FAULT, *train_args(shards, run, "train.max_steps=8"), env=cpu_env(CMR_TEST_FAULT="nan@3x2")))
    records = metrics(run)
    assert records[-1]["step"] == 8 and records[-1]["nonfinite_skipped"] == 2
    skipped = [r for r in records if "loss/total" not in r]
    assert [r["step"] for r in skipped] == [4, 5]  # no loss logged for the skipped steps


def test_a_dead_rank_makes_the_others_exit_not_hang(shards, tmp_path):
    run = tmp_path / "run"
    start = time.time()
    result = accelerate_launch(FAULT, *train_args(shards, run, "train.collective_timeout_s=30"),
                               env=cpu_env(CMR_TEST_FAULT="die@4"), timeout=120)
    assert result.returncode != 0
    assert time.time() - start < 90
