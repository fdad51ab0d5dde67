"""The run directory module: what readers (eval, search, export) and a resumed run rely on."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from cmr.data.vocab import Vocabulary
from cmr.run_dir import CheckpointError, RunDir, RunDirError, atomic_dir, step_dir_name, write_meta
from tests.launch import REPO, cpu_env
from tests.test_search import make_run


@dataclasses.dataclass
class TinyConfig:
    name: str = "tiny"


def checkpoint(run: RunDir, step: int, meta: dict | None = None, tmp: bool = False):
    path = run.checkpoints_dir / (f".tmp-{step_dir_name(step)}" if tmp else step_dir_name(step))
    path.mkdir(parents=True)
    if meta is not None:
        (path / "meta.json").write_text(json.dumps(meta))
    return path


def test_checkpoints_found_by_step_half_written_ones_ignored(tmp_path):
    run = RunDir(tmp_path)
    assert run.complete_checkpoints() == [] and run.latest_checkpoint() is None
    ten = checkpoint(run, 10, {"step": 10, "complete": True})
    nine = checkpoint(run, 9, {"step": 9, "complete": True})  # sorted by step, not by age
    checkpoint(run, 11)  # no meta.json: died before the end, or made by hand
    checkpoint(run, 12, {"step": 12, "complete": False})
    checkpoint(run, 13, {"step": 13, "complete": True}, tmp=True)  # its rename never happened
    (run.checkpoints_dir / step_dir_name(14)).mkdir()
    (run.checkpoints_dir / step_dir_name(14) / "meta.json").write_text("{not json")
    assert run.complete_checkpoints() == [nine, ten]
    assert run.find_checkpoint("latest") == ten == run.find_checkpoint(None)  # no best/ yet
    assert run.find_checkpoint("9") == nine == run.find_checkpoint("step-00000009")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint step-11 .*have: step-00000009, "):
        run.find_checkpoint("step-11")
    with pytest.raises(CheckpointError, match="has not evaluated yet"):
        run.find_checkpoint("best")
    with pytest.raises(CheckpointError, match="is not a complete checkpoint directory"):
        run.find_checkpoint(str(run.checkpoints_dir / step_dir_name(11)))


def test_best_else_latest(tmp_path):
    run = RunDir(tmp_path)
    checkpoint(run, 1, {"step": 1, "complete": True})
    vocab = Vocabulary(["a", "b", "c"])
    state = {"w": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor([3])}
    run.write_best(state, TinyConfig(), vocab, {"rsum": 1.5}, {"step": 7, "epoch": 2})
    assert run.find_checkpoint(None) == run.best_dir == run.find_checkpoint("best")
    assert sorted(p.name for p in run.best_dir.iterdir()) == [
        "config.yaml", "export.json", "metrics.json", "model.safetensors", "vocab.json"]
    saved = load_file(str(run.best_dir / "model.safetensors"))
    assert saved["w"].dtype == torch.float32 and torch.equal(saved["n"], state["n"])
    assert run.read_vocab(run.best_dir) == vocab
    info = run.checkpoint_info(run.best_dir)
    assert info["step"] == 7 and info["metrics"] == {"rsum": 1.5}
    assert run.checkpoint_info(run.find_checkpoint("latest"))["step"] == 1


def test_a_failed_write_leaves_the_previous_directory(tmp_path):
    run = RunDir(tmp_path)
    run.write_best({"w": torch.zeros(1)}, TinyConfig(), Vocabulary(["a"]), {"rsum": 1.0}, {"step": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(run.best_dir) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("disk full")
    assert run.checkpoint_info(run.best_dir)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no .tmp-* left behind


def test_metrics_after_a_resume_keep_what_the_checkpoint_had(tmp_path):
    run = RunDir(tmp_path)
    records = [{"step": 4, "epoch": 0}, {"step": 4, "epoch": 1, "split": "val"},  # eval after step 4
               {"step": 6, "epoch": 1}, {"step": 4, "epoch": 2, "split": "val"}]
    for record in records:
        run.append_metrics(record)
    assert run.read_metrics() == records
    run.truncate_metrics(step=4, epoch=1)  # the checkpoint: step 4, after epoch 0's evaluation
    assert run.read_metrics() == records[:2]
    RunDir(tmp_path / "fresh").truncate_metrics(0, 0)  # nothing logged yet: nothing to do
    assert RunDir(tmp_path / "fresh").read_metrics() == []


def test_run_files_and_wandb_id(tmp_path):
    run = RunDir(tmp_path)
    with pytest.raises(RunDirError, match="is not a run directory"):
        run.require_run()
    run.write_config(TinyConfig(name="a"))
    run.write_vocab(Vocabulary(["x"]))
    run.require_run()
    own = checkpoint(run, 3, {"step": 3, "complete": True})
    assert "name: a" in run.read_text("config.yaml", own)  # the checkpoint has no copy: the run's
    (own / "config.yaml").write_text("name: b\n")
    assert run.read_text("config.yaml", own) == "name: b\n"
    write_meta(own, {"step": 3})
    assert json.loads((own / "meta.json").read_text())["complete"] is True
    first = run.wandb_run_id(create=True)
    assert first and run.wandb_run_id(create=True) == first == RunDir(tmp_path).wandb_run_id()


def test_readers_do_not_import_the_training_code(tmp_path):
    """Evaluation, search and export read a run through cmr.run_dir only: no checkpointer,
    trainer or accelerate gets imported, also when a model is loaded."""
    run = make_run(tmp_path, steps=(1,), num_samples=4)
    code = (
        "import sys\n"
        "import cmr.eval.load, cmr.export, cmr.search\n"
        "from cmr.search import load_search_model\n"
        "load_search_model(sys.argv[1])\n"
        "print(sorted(m for m in sys.modules if m in ('cmr.train.checkpoint', 'cmr.train.trainer',"
        " 'cmr.train.metrics', 'cmr.train.parallel', 'accelerate')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(run.run_dir)], cwd=REPO, env=cpu_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
