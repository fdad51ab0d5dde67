"""The launcher settings in configs/accelerate, configs/deepspeed and launch/slurm: read by
accelerate's own loader and launch code, the CPU ones really launched, the SLURM script run
with stand-ins for the SLURM commands."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, patch_environment
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from tests.launch import REPO, accelerate_launch, cpu_env, deepspeed_env

ACCELERATE_DIR = REPO / "configs" / "accelerate"
DEEPSPEED_DIR = REPO / "configs" / "deepspeed"
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
WORKER = REPO / "tests" / "dist" / "launch_config_worker.py"

# name -> (distributed_type, num_processes, num_machines, mixed_precision, deepspeed json)
EXPECTED = {
    "1gpu": (DistributedType.NO, 1, 1, "no", None),
    "8gpu_bf16": (DistributedType.MULTI_GPU, 8, 1, "bf16", None),
    "deepspeed_zero1": (DistributedType.DEEPSPEED, 8, 1, None, "zero1.json"),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, 8, 1, None, "zero2.json"),
    "multinode": (DistributedType.MULTI_GPU, 16, 2, "bf16", None),
    "multinode_cpu": (DistributedType.MULTI_GPU, 2, 2, "no", None),
    "cpu_2proc": (DistributedType.MULTI_GPU, 2, 1, "no", None),
    "cpu_deepspeed_zero1": (DistributedType.DEEPSPEED, 2, 1, None, "zero1.json"),
    "cpu_deepspeed_zero2": (DistributedType.DEEPSPEED, 2, 1, None, "zero2.json"),
}


def test_every_accelerate_yaml_is_covered():
    assert sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_yaml_loads_with_expected_fields(name):
    distributed_type, num_processes, num_machines, mixed_precision, ds_json = EXPECTED[name]
    config = load_config_from_file(str(ACCELERATE_DIR / f"{name}.yaml"))  # rejects unknown keys
    assert config.distributed_type == distributed_type
    assert (config.num_processes, config.num_machines) == (num_processes, num_machines)
    assert config.mixed_precision == mixed_precision
    if ds_json is None:
        assert config.deepspeed_config == {}
        return
    ds_file = config.deepspeed_config["deepspeed_config_file"]
    assert ds_file == f"configs/deepspeed/{ds_json}"
    stage = json.loads((REPO / ds_file).read_text())["zero_optimization"]["stage"]
    assert f"zero{stage}" in name


@pytest.mark.parametrize("json_name", ["zero1.json", "zero2.json"])
def test_deepspeed_json_leaves_batch_clipping_and_precision_to_the_accelerator(json_name):
    ds_config = json.loads((DEEPSPEED_DIR / json_name).read_text())
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds_config[key] == "auto", key
    assert ds_config["bf16"] == {"enabled": "auto"} and ds_config["fp16"] == {"enabled": "auto"}
    # The trainer passes a torch optimizer and LR schedule: a section here would clash with them.
    assert "optimizer" not in ds_config and "scheduler" not in ds_config


def resolve_launch(*argv: str):
    """What `accelerate launch <argv> launch/train.py` decides, without starting anything."""
    args = launch_command_parser().parse_args([*argv, "launch/train.py", "--config", "x.yaml"])
    return _validate_launch_command(args)


@pytest.mark.parametrize("name", ["deepspeed_zero1", "deepspeed_zero2"])
def test_deepspeed_yaml_gives_the_workers_a_valid_plugin_in_bf16(name, monkeypatch):
    """The GPU ZeRO YAMLs, without GPUs: the environment the launcher hands the workers builds
    accelerate's DeepSpeed plugin (which rejects accelerate settings that clash with the JSON),
    and `--mixed_precision bf16`, as the YAML header says, turns the JSON's "auto" into bf16."""
    monkeypatch.chdir(REPO)  # the YAML names the JSON relative to the repo root
    args, defaults, precision_from_yaml = resolve_launch(
        "--config_file", str(ACCELERATE_DIR / f"{name}.yaml"), "--mixed_precision", "bf16")
    assert args.use_deepspeed and int(args.num_processes) == 8
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if precision_from_yaml else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as launch_command does
    _, worker_env = prepare_deepspeed_cmd_env(args)
    with patch_environment(**worker_env):
        plugin = DeepSpeedPlugin()
        plugin.set_mixed_precision(worker_env["ACCELERATE_MIXED_PRECISION"])
    assert plugin.zero_stage == int(name[-1])
    assert plugin.deepspeed_config["bf16"] == {"enabled": True}
    assert plugin.deepspeed_config["fp16"] == {"enabled": False}


def test_multinode_yaml_with_the_sbatch_overrides_gives_one_static_rendezvous():
    """The flags launch/slurm/train.sbatch adds, for node 3 of 4: torchrun gets 8 processes on
    this node, 4 nodes, and a static rendezvous at the first node with this node's rank."""
    import torch.distributed.run as torchrun
    from accelerate.commands.launch import _filter_args

    args, _, _ = resolve_launch(
        "--config_file", str(ACCELERATE_DIR / "multinode.yaml"), "--num_machines", "4",
        "--machine_rank", "3", "--main_process_ip", "10.0.0.7", "--main_process_port", "29411",
        "--num_processes", "32")
    worker_env = prepare_multi_gpu_env(args)
    assert worker_env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    script_args = ["--training_script", args.training_script,
                   "--training_script_args", args.training_script_args]
    torchrun_args = _filter_args(args, torchrun.get_args_parser(), script_args)
    launch_config, _, _ = torchrun.config_from_args(torchrun_args)
    assert (launch_config.min_nodes, launch_config.max_nodes) == (4, 4)
    assert launch_config.nproc_per_node == 8
    assert launch_config.rdzv_backend == "static"
    assert launch_config.rdzv_endpoint == "10.0.0.7:29411"
    assert launch_config.rdzv_configs["rank"] == 3


def launch_with_config(yaml_name: str, out: Path, env: dict[str, str]) -> list[dict]:
    result = accelerate_launch(WORKER, "--out", str(out), config_file=ACCELERATE_DIR / yaml_name,
                               env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def assert_two_ranks_in_one_group(records: list[dict]) -> None:
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["world_size"] == 2 for r in records)
    assert records[0]["pid"] != records[1]["pid"]
    assert all(r["backend"] == "gloo" for r in records)
    assert all(r["rank_sum"] == 1.0 for r in records)
    # Different data on each rank, identical weights after the step: gradients were averaged.
    assert records[0]["params"] == records[1]["params"]


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_2proc_yaml_starts_two_gloo_ranks(tmp_path):
    records = launch_with_config("cpu_2proc.yaml", tmp_path, cpu_env())
    assert_two_ranks_in_one_group(records)
    assert all(r["distributed_type"] == "MULTI_CPU" for r in records)
    assert all(r["wrapper"] == "DistributedDataParallel" for r in records)


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_deepspeed_zero2_yaml_runs_a_real_zero2_engine(tmp_path):
    # deepspeed_env: no ACCELERATE_USE_CPU, with which accelerate would quietly use DDP instead.
    records = launch_with_config("cpu_deepspeed_zero2.yaml", tmp_path, deepspeed_env())
    assert_two_ranks_in_one_group(records)
    for record in records:
        assert record["distributed_type"] == "DEEPSPEED"
        assert record["wrapper"] == "DeepSpeedEngine"
        assert record["zero_stage"] == 2
        assert record["optimizer"] == "DeepSpeedZeroOptimizer"
        assert record["gradient_clipping"] == 2.0  # the worker's value, not accelerate's 1.0
        assert record["train_batch_size"] == 2 * 4


def test_sbatch_is_valid_bash_with_the_required_directives():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    directives = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines()
                  if line.startswith("#SBATCH ")]
    for required in ("--ntasks-per-node=1", "--exclusive", "--signal=USR1@120", "--requeue",
                     "--open-mode=append", "--output=logs/%x-%j.out"):
        assert required in directives, required
    for prefix in ("--nodes=", "--time="):
        assert any(d.startswith(prefix) for d in directives), prefix
    # Per-cluster counts come from the allocation, not from the script.
    assert not any(d.startswith(("--gpus", "--cpus-per-task")) for d in directives), directives


def write_executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


# Stand-ins for the SLURM commands (no SLURM here). `srun` runs its command once per node, as
# the tasks on two nodes would, with that node's SLURM_NODEID; `accelerate` records its
# arguments and whether SIGUSR1 is ignored in it (the real launcher is tested in
# tests/test_preemption.py).
FAKE_SCONTROL = """#!/bin/bash
[ "$1 $2" = "show hostnames" ] && printf 'gpu-a17\\ngpu-a18\\n'
[ "$1 $2 $3" = "show node gpu-a17" ] && echo 'NodeName=gpu-a17 Arch=x86_64 NodeAddr=10.1.0.17 NodeHostName=gpu-a17'
exit 0
"""
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
for node in 0 1; do SLURM_NODEID=$node "$@" || exit 1; done
"""
FAKE_ACCELERATE = f"""#!{sys.executable}
import json, os, signal, sys
ignored = signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
env = {{k: os.environ.get(k) for k in ("ACCELERATE_USE_CPU", "OMP_NUM_THREADS")}}
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "usr1_ignored": ignored, "env": env}}) + "\\n")
"""

# What SLURM sets in the batch script: 4 GPUs and 64 CPUs granted per node, or a CPU partition.
GPU_NODES = {"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "4", "SLURM_CPUS_ON_NODE": "64"}
CPU_NODES = {"SLURM_CPUS_ON_NODE": "8", "CMR_PROCS_PER_NODE": "2"}
SBATCH_CASES = [
    {"id": "4gpu-nodes", "env": GPU_NODES, "config": "multinode.yaml", "num_processes": "8",
     "use_cpu": None, "omp": "16"},
    {"id": "typed-gpus", "env": {"SLURM_GPUS_PER_NODE": "a100:4", "SLURM_CPUS_ON_NODE": "64"},
     "config": "multinode.yaml", "num_processes": "8", "use_cpu": None, "omp": "16"},
    {"id": "cpu-partition", "env": CPU_NODES, "config": "multinode_cpu.yaml", "num_processes": "4",
     "use_cpu": "1", "omp": "4"},
    {"id": "cpu-default-1proc", "env": {"SLURM_CPUS_ON_NODE": "8"}, "config": "multinode_cpu.yaml",
     "num_processes": "2", "use_cpu": "1", "omp": "8"},
]


@pytest.mark.parametrize("case", SBATCH_CASES, ids=[c["id"] for c in SBATCH_CASES])
def test_sbatch_starts_one_launcher_per_node_with_its_rank_and_usr1_ignored(case, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_executable(bin_dir / "scontrol", FAKE_SCONTROL)
    write_executable(bin_dir / "srun", FAKE_SRUN)
    write_executable(bin_dir / "accelerate", FAKE_ACCELERATE)
    record = tmp_path / "launches.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CMR_", "ACCELERATE_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", RECORD=str(record),
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="coco-lim", SLURM_JOB_NODELIST="gpu-a[17-18]",
               SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_NODEID="0", **case["env"])
    result = subprocess.run(["bash", str(SBATCH), "--config", "configs/coco_karpathy.yaml",
                             "--set", "train.lr=0.0002"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    launches = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(launches) == 2
    for node_rank, launch in enumerate(launches):
        argv = launch["argv"]
        assert argv[0] == "launch"
        options = dict(zip(argv[1:-9:2], argv[2:-9:2]))  # the launcher's --flag value pairs
        assert options == {
            "--config_file": f"configs/accelerate/{case['config']}", "--num_machines": "2",
            "--machine_rank": str(node_rank), "--main_process_ip": "10.1.0.17",
            "--main_process_port": str(20000 + 4242), "--num_processes": case["num_processes"],
        }
        assert launch["env"] == {"ACCELERATE_USE_CPU": case["use_cpu"], "OMP_NUM_THREADS": case["omp"]}
        assert argv[-9:] == ["launch/train.py", "--run-dir", "runs/coco-lim", "--resume", "auto",
                             "--config", "configs/coco_karpathy.yaml", "--set", "train.lr=0.0002"]
        assert launch["usr1_ignored"], "the launcher must ignore SIGUSR1 (see the sbatch)"
    assert (tmp_path / "logs").is_dir()
