"""The checkpoint manager: what a resumed run relies on, and what a crash must never break."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from cmr.config import ConfigError, from_dict
from cmr.train.checkpoint import CheckpointConfig, Checkpointer, CheckpointError
from tests.launch import REPO, accelerate_launch, cpu_env, free_port

WORKER = Path(__file__).parent / "dist" / "checkpoint_worker.py"
VOCAB_TEXT = '{"<pad>": 0, "<unk>": 1, "cat": 2}'


def fresh_accelerator() -> Accelerator:
    # accelerate keeps its state in a process-wide singleton; start each use from scratch.
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=True)


@pytest.fixture
def accelerator():
    yield fresh_accelerator()
    AcceleratorState._reset_state(reset_partial_state=True)


def build_training(accelerator, in_features=4, out_features=3):
    torch.manual_seed(0)
    model = torch.nn.Linear(in_features, out_features)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    # A decaying lr, so a scheduler that was not restored changes the next step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    return accelerator.prepare(model, optimizer, scheduler)


def train_step(accelerator, model, optimizer, scheduler, step):
    inputs = torch.randn(4, model.in_features, generator=torch.Generator().manual_seed(step))
    accelerator.backward(model(inputs).pow(2).mean())
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def snapshot(model, optimizer, scheduler) -> dict:
    adam = optimizer.state_dict()["state"]
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "exp_avg": [adam[i]["exp_avg"].clone() for i in sorted(adam)],
        "adam_step": [float(adam[i]["step"]) for i in sorted(adam)],
        "lr": scheduler.get_last_lr(),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key] and isinstance(a[key][0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(a[key], b[key], strict=True)), key
        else:
            assert a[key] == b[key], key


def draw_random():
    return torch.rand(3).tolist(), float(np.random.rand()), random.random()


def save_plain(checkpointer, step, state=None, files=None):
    return checkpointer.save(step, {"step": step} if state is None else state, files=files)


def names(paths) -> list[str]:
    return [p.name for p in paths]


def one_line_error(call) -> str:
    with pytest.raises(CheckpointError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# ---- one process -----------------------------------------------------------------------------


def test_load_restores_model_optimizer_scheduler_rng_state_and_files(accelerator, tmp_path):
    model, optimizer, scheduler = build_training(accelerator)
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig())
    for step in (1, 2):
        train_step(accelerator, model, optimizer, scheduler, step)
    state = {"stage": 1, "step": 2, "epoch": 0, "step_in_epoch": 2, "nan_count": 0,
             "loader": {"windows_done": [1, 1]}}
    files = {"vocab.json": VOCAB_TEXT, "config.yaml": "seed: 0\n"}
    path = checkpointer.save(2, state, files=files)
    assert path == tmp_path / "checkpoints" / "step-00000002"
    saved = snapshot(model, optimizer, scheduler)
    expected_random = draw_random()
    train_step(accelerator, model, optimizer, scheduler, 3)
    expected_next = snapshot(model, optimizer, scheduler)

    for step in (4, 5):  # move everything away from the saved point
        train_step(accelerator, model, optimizer, scheduler, step)
    draw_random()
    with pytest.raises(AssertionError):
        assert_same(snapshot(model, optimizer, scheduler), saved)

    assert checkpointer.load(path) == state
    assert_same(snapshot(model, optimizer, scheduler), saved)
    assert draw_random() == expected_random
    train_step(accelerator, model, optimizer, scheduler, 3)
    assert_same(snapshot(model, optimizer, scheduler), expected_next)
    assert checkpointer.read_file(path, "vocab.json") == VOCAB_TEXT
    assert checkpointer.read_file(path, "config.yaml") == "seed: 0\n"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 2 and meta["world_size"] == 1 and meta["complete"] is True
    assert meta["files"] == ["config.yaml", "vocab.json"]


def test_keep_last_keeps_the_newest_complete_ones(accelerator, tmp_path):
    build_training(accelerator)
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig(keep_last=2))
    for step in (10, 20, 30, 40):
        save_plain(checkpointer, step)
    assert names(checkpointer.complete_checkpoints()) == ["step-00000030", "step-00000040"]
    assert sorted(names(checkpointer.root.iterdir())) == ["step-00000030", "step-00000040"]
    assert checkpointer.latest() == checkpointer.root / "step-00000040"


def test_the_checkpoint_just_written_is_never_pruned(accelerator, tmp_path):
    """Resumed from an older checkpoint, a run saves steps below the abandoned run's."""
    build_training(accelerator)
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig(keep_last=2))
    for step in (10, 20, 30):
        save_plain(checkpointer, step)
    written = save_plain(checkpointer, 15)
    assert checkpointer.complete_checkpoints() == [written, checkpointer.root / "step-00000030"]
    assert checkpointer.load(written) == {"step": 15}


def test_steps_sort_by_number_not_by_name(accelerator, tmp_path):
    build_training(accelerator)
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig(keep_last=5))
    for step in (9, 100_000_000, 10):  # the middle one has 9 digits
        save_plain(checkpointer, step)
    assert names(checkpointer.complete_checkpoints()) == [
        "step-00000009", "step-00000010", "step-100000000"]


def plant_broken_checkpoints(root: Path) -> None:
    """What crashes and accidents leave behind, all newer than the complete checkpoint."""
    (root / ".tmp-step-00000050").mkdir()
    (root / ".tmp-step-00000050" / "model.safetensors").write_bytes(b"half")
    (root / "step-00000060").mkdir()  # no meta.json
    (root / "step-00000060" / "model.safetensors").write_bytes(b"half")
    (root / "step-00000070").mkdir()
    (root / "step-00000070" / "meta.json").write_text('{"step": 70, "compl')  # cut off
    (root / "step-00000080").mkdir()
    (root / "step-00000080" / "meta.json").write_text('{"step": 80, "complete": false}')
    (root / "step-00000090").write_text("a file, not a directory")


def test_half_written_and_foreign_checkpoints_are_ignored_and_kept(accelerator, tmp_path):
    build_training(accelerator)
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig(keep_last=1))
    good = save_plain(checkpointer, 10)
    plant_broken_checkpoints(checkpointer.root)

    assert checkpointer.complete_checkpoints() == [good]
    assert checkpointer.latest() == good
    assert checkpointer.resolve("auto") == good
    assert checkpointer.resolve("latest") == good
    for broken in ("60", "step-00000070", "80", "50"):
        with pytest.raises(CheckpointError, match="no complete checkpoint for step"):
            checkpointer.resolve(broken)

    newer = save_plain(checkpointer, 20)
    # The stale .tmp is cleared and the older complete one pruned; what a person may want to
    # look at (directories that never were complete) stays.
    assert sorted(names(checkpointer.root.iterdir())) == [
        "step-00000020", "step-00000060", "step-00000070", "step-00000080", "step-00000090"]
    assert checkpointer.latest() == newer
    assert checkpointer.load(newer) == {"step": 20}


def test_a_save_cut_off_before_its_rename_is_finished_on_the_next_start(accelerator, tmp_path):
    build_training(accelerator)
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig())
    save_plain(checkpointer, 10)
    written = save_plain(checkpointer, 20)
    # What a crash leaves between writing meta.json and the rename: complete, but still .tmp.
    os.rename(written, checkpointer.root / ".tmp-step-00000020")
    assert checkpointer.latest().name == "step-00000010"

    restarted = Checkpointer(accelerator, tmp_path, CheckpointConfig())
    assert restarted.latest() == written
    assert restarted.load(written) == {"step": 20}


def test_saving_the_same_step_again_replaces_it(accelerator, tmp_path):
    build_training(accelerator)
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig(keep_last=3))
    save_plain(checkpointer, 5, {"version": 1}, files={"vocab.json": "old"})
    path = save_plain(checkpointer, 5, {"version": 2}, files={"vocab.json": VOCAB_TEXT})
    assert names(checkpointer.root.iterdir()) == ["step-00000005"]
    assert checkpointer.load(path) == {"version": 2}
    assert checkpointer.read_file(path, "vocab.json") == VOCAB_TEXT


def test_resolve_finds_what_the_user_names(accelerator, tmp_path, monkeypatch):
    build_training(accelerator)
    checkpointer = Checkpointer(accelerator, tmp_path / "run", CheckpointConfig(keep_last=3))
    assert checkpointer.resolve(None) is None
    assert checkpointer.resolve("") is None
    assert checkpointer.resolve("auto") is None  # nothing yet: a fresh start
    first, second = save_plain(checkpointer, 100), save_plain(checkpointer, 200)
    assert checkpointer.resolve("auto") == second
    assert checkpointer.resolve("step-00000100") == first
    assert checkpointer.resolve("step-100") == first
    assert checkpointer.resolve("100") == first
    monkeypatch.chdir(tmp_path)
    assert checkpointer.resolve("run/checkpoints/step-00000100") == first
    assert checkpointer.resolve(str(second)) == second


def test_resolve_errors_are_one_line_and_list_what_exists(accelerator, tmp_path):
    build_training(accelerator)
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig())
    message = one_line_error(lambda: checkpointer.resolve("latest"))
    assert "no complete checkpoint" in message and str(checkpointer.root) in message

    save_plain(checkpointer, 100)
    save_plain(checkpointer, 200)
    message = one_line_error(lambda: checkpointer.resolve("step-300"))
    assert "step 300" in message and "step-00000100, step-00000200" in message
    message = one_line_error(lambda: checkpointer.resolve(str(tmp_path / "nowhere")))
    assert "nowhere is not a directory" in message and "step-00000200" in message
    (tmp_path / "half").mkdir()
    message = one_line_error(lambda: checkpointer.resolve(str(tmp_path / "half")))
    assert "half is not a complete checkpoint" in message


def test_load_refuses_what_does_not_fit_with_one_line(accelerator, tmp_path):
    build_training(accelerator, in_features=4)
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig())
    path = save_plain(checkpointer, 1)
    (tmp_path / "half").mkdir()
    message = one_line_error(lambda: checkpointer.load(tmp_path / "half"))
    assert "not a complete checkpoint" in message
    message = one_line_error(lambda: checkpointer.read_file(path, "vocab.json"))
    assert "no stored file 'vocab.json'" in message

    other = fresh_accelerator()
    build_training(other, in_features=5)  # another model config: the weights cannot fit
    message = one_line_error(lambda: Checkpointer(other, tmp_path).load(path))
    assert "cannot restore model/optimizer state" in message and str(path) in message
    assert "size mismatch for weight" in message

    (path / "trainer_state.rank0.json").unlink()
    message = one_line_error(lambda: Checkpointer(other, tmp_path).load(path))
    assert "trainer_state.rank0.json is missing or corrupt" in message


def test_bad_save_arguments_fail_before_anything_is_written(accelerator, tmp_path):
    build_training(accelerator)
    checkpointer = Checkpointer(accelerator, tmp_path, CheckpointConfig())
    cases = [
        (2, {"t": torch.ones(1)}, None, "not JSON-serialisable"),
        (2, {}, {"../x": ""}, "plain file name"),
        (2, {}, {"a/b": ""}, "plain file name"),
        (2, {}, {"meta.json": "{}"}, "clash"),
        (2, {}, {"model.safetensors": ""}, "clash"),
        (2, {}, {"vocab.json": b"bytes"}, "must be text"),
        (-1, {}, None, "int >= 0"),
    ]
    for step, state, files, expected in cases:
        with pytest.raises(CheckpointError, match=expected) as info:
            checkpointer.save(step, state, files=files)
        assert "\n" not in str(info.value)
    assert list(checkpointer.root.iterdir()) == []


def test_config_is_validated_with_the_field_named():
    assert from_dict(CheckpointConfig, {"every_n_steps": 0, "keep_last": 1}).keep_last == 1
    with pytest.raises(ConfigError, match="^keep_last: must be >= 1, got 0$"):
        from_dict(CheckpointConfig, {"keep_last": 0})
    with pytest.raises(ConfigError, match="^every_n_steps: must be >= 0"):
        from_dict(CheckpointConfig, {"every_n_steps": -5})


def test_should_save_every_n_steps(accelerator, tmp_path):
    every_100 = Checkpointer(accelerator, tmp_path, CheckpointConfig(every_n_steps=100))
    assert [s for s in range(301) if every_100.should_save(s)] == [100, 200, 300]
    only_at_ends = Checkpointer(accelerator, tmp_path, CheckpointConfig(every_n_steps=0))
    assert not any(only_at_ends.should_save(s) for s in range(301))


# ---- crash safety: a real process killed in the middle of saving -----------------------------


def load_latest_as_a_restart_would(run_dir: Path) -> int:
    accelerator = fresh_accelerator()
    model, optimizer, _ = build_training(accelerator, in_features=1024, out_features=1024)
    checkpointer = Checkpointer(accelerator, run_dir, CheckpointConfig(keep_last=2))
    latest = checkpointer.latest()
    assert latest is not None
    step = int(latest.name.split("-")[1])
    assert checkpointer.load(latest) == {"step": step}
    assert all(torch.all(p == float(step)) for p in model.parameters())  # the worker's marker
    assert len(optimizer.state_dict()["state"]) == 2  # Adam's moments came back too
    assert checkpointer.read_file(latest, "vocab.json") == VOCAB_TEXT
    AcceleratorState._reset_state(reset_partial_state=True)
    return step


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_broken_latest(tmp_path):
    """Kill a process that does little but save (12 MB each time) at varied moments; each
    time the newest complete checkpoint must load and the next run must resume from it."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(WORKER), "save-loop", "--run-dir", str(run_dir)]
    rng = random.Random(0)
    kills_mid_save, last_step = 0, 0
    for attempt in range(8):
        proc = subprocess.Popen(cmd, cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE, text=True)
        first = next((line for line in proc.stdout if line.startswith("saved ")), "")
        assert first, "the worker exited before its first save"
        assert int(first.split()[1]) == last_step + 1  # it resumed from the newest one
        time.sleep(rng.uniform(0.0, 0.2))  # a save takes ~25 ms here
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        kills_mid_save += any((run_dir / "checkpoints").glob(".tmp-*"))
        step = load_latest_as_a_restart_would(run_dir)
        assert step >= last_step
        last_step = step
        if attempt >= 1 and kills_mid_save >= 1:  # resumed after a kill, and hit a save
            break
    assert kills_mid_save >= 1, "no kill landed in the middle of a save; the test proved nothing"


# ---- several processes -----------------------------------------------------------------------


def check_roundtrip(out: Path) -> Path:
    """What every rank of the worker's round trip found; returns the checkpoint it wrote."""
    for rank in range(2):
        result = json.loads(Path(f"{out}.rank{rank}.json").read_text())
        assert result["world_size"] == 2
        assert result["state_back"] == {"step": 2, "epoch": 0, "rank": rank,
                                        "data_position": {"windows_done": [rank, 3 + rank]}}
        assert result["params_restored"] and result["next_step_equal"] and result["rng_restored"]
        assert result["vocab"] == VOCAB_TEXT
    path = Path(result["path"])
    assert names(path.parent.iterdir()) == ["step-00000002"]
    assert json.loads((path / "meta.json").read_text())["world_size"] == 2
    return path


@pytest.mark.distributed
def test_two_ddp_ranks_each_get_their_own_state_back(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    proc = accelerate_launch(WORKER, "roundtrip", "--run-dir", str(run_dir), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = check_roundtrip(out)
    expected = {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors",
                "optimizer.bin", "trainer_state.rank0.json", "trainer_state.rank1.json"}
    assert expected <= set(names(path.iterdir()))

    # One process resuming a 2-process DDP checkpoint: the weights load, the data position
    # cannot be split anew, so it gets rank 0's and a flag for the trainer to act on.
    accelerator = fresh_accelerator()
    build_training(accelerator)
    state = Checkpointer(accelerator, run_dir).load(path)
    assert state["world_size_changed"] is True and state["saved_world_size"] == 2
    assert state["rank"] == 0 and state["data_position"] == {"windows_done": [0, 3]}
    AcceleratorState._reset_state(reset_partial_state=True)


def deepspeed_launch(*args: str) -> subprocess.CompletedProcess:
    """ZeRO-2 on 2 CPU processes: the repo's launcher config, DeepSpeed's CPU accelerator."""
    env = cpu_env(DS_ACCELERATOR="cpu")
    env.pop("ACCELERATE_USE_CPU")  # with it set, accelerate leaves DeepSpeed out altogether
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "configs/accelerate/cpu_deepspeed_zero2.yaml"),
           "--main_process_port", str(free_port()), str(WORKER), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.distributed
def test_deepspeed_zero2_round_trip(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    proc = deepspeed_launch("roundtrip", "--deepspeed", "--run-dir", str(run_dir),
                            "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = check_roundtrip(out)
    assert json.loads((path / "meta.json").read_text())["distributed_type"] == "DEEPSPEED"
    shards = sorted(names((path / "pytorch_model").glob("zero_pp_rank_*_optim_states.pt")))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # each rank's ZeRO-2 shard

    accelerator = fresh_accelerator()  # no DeepSpeed: the files differ, refused in one line
    build_training(accelerator)
    message = one_line_error(lambda: Checkpointer(accelerator, run_dir).load(path))
    assert "was saved under DeepSpeed and this run is not" in message
    AcceleratorState._reset_state(reset_partial_state=True)
