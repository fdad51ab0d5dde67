"""The GPU checks of issue 10: crash and resume, bf16, fp16 loss scaling and DeepSpeed ZeRO-1/2
on one GPU, each a real ``accelerate launch`` of ``launch/train.py``.

The run is the tests' tiny three-stage schedule (tests/fixtures/tiny_train.yaml: encoders with
caption XE, discriminators, everything with SCST; 30 steps on one process), on tiny shards made
on the spot. What each check runs and what it claims:

- bf16-crash-resume: two uninterrupted bf16 runs (their difference is the GPU's own
  nondeterminism, the *floor*: atomics in embedding backward, cuBLAS split-K), and one whose
  every process is SIGKILLed once step KILL_AT is logged, as a machine crash does, then
  ``--resume auto``. Claim: the second launch resumed from the newest checkpoint, ran only the
  steps after it, and its losses equal the reference's exactly, or differ by no more than
  twice the floor.
- fp16-scaling-resume: fp16 with accelerate's GradScaler; stopped by ``train.max_steps`` at
  STOP_AT, resumed to the end. Claim: the scaler's state is in the checkpoint (its scale is
  printed), losses are finite, and the resumed run equals an uninterrupted fp16 run as above.
- zero1-vs-ddp, zero2-vs-ddp: float32, the first stage (12 steps): ZeRO-1/2 through
  ``configs/accelerate/deepspeed_zero{1,2}.yaml`` with one process against plain accelerate.
  Claim: step 1 equal, every step within 1e-4 relative (the CPU tests measured 1e-7).
- zero2-bf16-crash-resume: ZeRO-2 in bf16 (DeepSpeed's bf16: bf16 weights, fp32 master
  copies), killed and resumed as the first check, against an uninterrupted ZeRO-2 bf16 run.

Prints a markdown table and writes claims.md / claims.json under --out.

    bash benchmarks/gpu_check.sh                     # on the GPU machine (CLAIMS=1 runs this)
    python benchmarks/gpu_claims.py --dry-run        # the same launches on the CPU (fp16 skipped)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cmr.run_dir import RunDir, read_meta  # noqa: E402
from tests.launch import free_port  # noqa: E402
from tests.tiny_data import train_val_shards  # noqa: E402

TRAIN = REPO / "launch" / "train.py"
TINY = REPO / "tests" / "fixtures" / "tiny_train.yaml"
TOTAL_STEPS, STAGE1_STEPS = 30, 12  # 48 samples, batch 8: 6 steps an epoch; stages of 2, 1, 2 epochs
KILL_AT, STOP_AT = 14, 14
RUN = ["train.checkpoint.every_n_steps=4", "train.logging.wandb=false", "data.num_workers=1"]
ZERO_TOLERANCE = 1e-4
CHECKS = ("bf16-crash-resume", "fp16-scaling-resume", "zero1-vs-ddp", "zero2-vs-ddp", "zero2-bf16-crash-resume")


class Launcher:
    """``accelerate launch`` of the trainer on one GPU (or, with ``cpu``, one CPU process)."""

    def __init__(self, shards: Path, root: Path, cpu: bool, timeout: float):
        self.shards, self.root, self.cpu, self.timeout = shards, root, cpu, timeout

    def command(self, run: Path, engine: str, precision: str, *overrides: str, resume: bool = False) -> list[str]:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", precision, "--dynamo_backend", "no", "--main_process_port", str(free_port())]
        if engine != "ddp":
            yaml = f"{'cpu_' if self.cpu else ''}deepspeed_{engine}.yaml"
            cmd[3:3] = ["--config_file", str(REPO / "configs" / "accelerate" / yaml)]
        elif self.cpu:
            cmd.append("--cpu")
        cmd += [str(TRAIN), "--config", str(TINY), "--set", f"data.shards={self.shards}", *RUN, *overrides,
                "--run-dir", str(run)]
        return cmd + (["--resume", "auto"] if resume else [])

    def env(self, engine: str) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                   WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
        if self.cpu:
            env.update(OMP_NUM_THREADS="1")
            if engine == "ddp":
                env["ACCELERATE_USE_CPU"] = "1"
            else:
                env["DS_ACCELERATOR"] = "cpu"  # and no ACCELERATE_USE_CPU, which turns DeepSpeed off
        return env

    def run(self, name: str, engine: str, precision: str, *overrides: str, resume: bool = False) -> Path:
        run = self.root / name
        result = subprocess.run(self.command(run, engine, precision, *overrides, resume=resume), cwd=REPO,
                                env=self.env(engine), capture_output=True, text=True, timeout=self.timeout)
        (self.root / f"{name}.log").write_text(result.stdout + result.stderr, encoding="utf-8")
        if result.returncode != 0:
            raise RuntimeError(f"{name} ({engine}, {precision}) exited {result.returncode}: "
                               f"{(result.stdout + result.stderr)[-1500:]}")
        return run

    def crash(self, name: str, engine: str, precision: str, at_step: int) -> tuple[Path, int]:
        """Launch, and SIGKILL every process of the run (launcher, rank, workers) once ``at_step``
        is logged; return the run and the last step it logged."""
        run = self.root / name
        log = (self.root / f"{name}.log").open("w", encoding="utf-8")
        process = subprocess.Popen(self.command(run, engine, precision), cwd=REPO, env=self.env(engine),
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + self.timeout
        while not any(r["step"] >= at_step for r in train_records(run)):
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                raise RuntimeError(f"{name}: ended or timed out before step {at_step} "
                                   f"(exit {process.poll()}; log {self.root / f'{name}.log'})")
            time.sleep(0.05)
        launcher = psutil.Process(process.pid)
        procs = [launcher, *launcher.children(recursive=True)]
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=30)
        log.close()
        return run, train_records(run)[-1]["step"]


def train_records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the line a SIGKILL cut
        if "split" not in record:
            records.append(record)
    return records


def loss_rows(run: Path) -> dict[int, dict[str, float]]:
    """The last record of every step (a resumed run logs the steps after its checkpoint again)."""
    rows = {}
    for record in train_records(run):
        rows[record["step"]] = {k: v for k, v in record.items() if k.startswith(("loss/", "reward/"))}
    return rows


def difference(a: Path, b: Path, steps: int | None = None) -> dict:
    """How far ``a``'s losses are from ``b``'s, step by step (absolute and relative)."""
    rows_a, rows_b = loss_rows(a), loss_rows(b)
    common = sorted(set(rows_a) & set(rows_b))[:steps]
    worst_abs = worst_rel = 0.0
    exact = list(rows_a)[:steps] == list(rows_b)[:steps]
    finite = True
    for step in common:
        for key in rows_b[step]:
            x, y = rows_a[step].get(key), rows_b[step][key]
            if x is None or not (math.isfinite(x) and math.isfinite(y)):
                finite = False
                exact = False
                continue
            exact &= x == y
            worst_abs = max(worst_abs, abs(x - y))
            worst_rel = max(worst_rel, abs(x - y) / max(abs(y), 1e-12))
    return {"steps_compared": len(common), "exact": exact and bool(common), "finite": finite,
            "max_abs": worst_abs, "max_rel": worst_rel,
            "step1_equal": bool(common) and rows_a[common[0]] == rows_b[common[0]]}


def newest_checkpoint(run: Path) -> int:
    complete = [p for p in (run / "checkpoints").glob("*step-*") if read_meta(p) is not None]
    return max(int(p.name.rsplit("-", 1)[1]) for p in complete)


def launches(run: Path) -> tuple[list, list]:
    records = RunDir(run).read_launches()
    return ([r for r in records if r["event"] == "start"], [r for r in records if r["event"] == "end"])


def resumed_like(run: Path, reference: Path, floor: dict | None, resumed_from: int) -> dict:
    """Whether ``run``'s last launch resumed from ``resumed_from``, ran only the rest, and logged
    the reference's losses (exactly, or within twice the nondeterminism ``floor``)."""
    starts, ends = launches(run)
    got = difference(run, reference)
    report = {"resumed_from_step": starts[-1].get("resumed_from_step"), "expected_resume_step": resumed_from,
              "steps_run_after_resume": ends[-1].get("steps_run") if ends else None,
              "outcome": ends[-1].get("outcome") if ends else None, **{f"vs_reference_{k}": v for k, v in got.items()}}
    within = got["exact"] or (floor is not None and got["max_abs"] <= 2 * floor["max_abs"])
    report["ok"] = bool(report["resumed_from_step"] == resumed_from > 0
                        and report["steps_run_after_resume"] == TOTAL_STEPS - resumed_from
                        and report["outcome"] == "done" and got["steps_compared"] == TOTAL_STEPS
                        and got["finite"] and within)
    return report


def check_crash_resume(launch: Launcher, engine: str, precision: str, prefix: str) -> dict:
    reference = launch.run(f"{prefix}-reference", engine, precision)
    again = launch.run(f"{prefix}-reference-again", engine, precision)
    floor = difference(again, reference)
    run, killed_at = launch.crash(f"{prefix}-crashed", engine, precision, KILL_AT)
    resumed_from = newest_checkpoint(run)
    launch.run(f"{prefix}-crashed", engine, precision, resume=True)
    return {"killed_at_step": killed_at, "floor_max_abs": floor["max_abs"], "floor_exact": floor["exact"],
            **resumed_like(run, reference, floor, resumed_from)}


def check_fp16(launch: Launcher) -> dict:
    reference = launch.run("fp16-reference", "ddp", "fp16")
    again = launch.run("fp16-reference-again", "ddp", "fp16")
    floor = difference(again, reference)
    run = launch.run("fp16-stopped", "ddp", "fp16", f"train.max_steps={STOP_AT}")
    resumed_from = newest_checkpoint(run)
    checkpoint = next(p for p in (run / "checkpoints").glob(f"*step-{resumed_from:08d}"))
    scaler = checkpoint / "scaler.pt"
    scale = None
    if scaler.exists():
        import torch

        scale = float(torch.load(scaler, map_location="cpu", weights_only=False).get("scale"))
    launch.run("fp16-stopped", "ddp", "fp16", resume=True)
    report = {"scaler_in_checkpoint": scaler.exists(), "scale_at_checkpoint": scale,
              "floor_max_abs": floor["max_abs"], "floor_exact": floor["exact"],
              **resumed_like(run, reference, floor, resumed_from)}
    report["ok"] = report["ok"] and scale is not None and scale > 0
    return report


def check_zero_vs_ddp(launch: Launcher, stage: str) -> dict:
    steps = [f"train.max_steps={STAGE1_STEPS}"]
    ddp = launch.root / "fp32-ddp"
    if not (ddp / "metrics.jsonl").exists():
        launch.run("fp32-ddp", "ddp", "no", *steps)
    zero = launch.run(f"fp32-{stage}", stage, "no", *steps)
    got = difference(zero, ddp)
    report = {**got, "tolerance_rel": ZERO_TOLERANCE}
    report["ok"] = (got["steps_compared"] == STAGE1_STEPS and got["finite"] and got["step1_equal"]
                    and got["max_rel"] <= ZERO_TOLERANCE)
    return report


def run_check(name: str, launch: Launcher) -> dict:
    if name == "bf16-crash-resume":
        return check_crash_resume(launch, "ddp", "bf16", "bf16")
    if name == "fp16-scaling-resume":
        if launch.cpu:
            return {"skipped": "fp16 needs a GPU (the trainer refuses fp16 on CPU: accelerate would "
                               "train in float32 without loss scaling)"}
        return check_fp16(launch)
    if name in ("zero1-vs-ddp", "zero2-vs-ddp"):
        return check_zero_vs_ddp(launch, name.split("-")[0])
    return check_crash_resume(launch, "zero2", "bf16", "zero2-bf16")


def markdown(header: str, reports: dict[str, dict]) -> str:
    lines = [header, "", "| check | result | figures |", "|---|---|---|"]
    for name, report in reports.items():
        if "skipped" in report or "error" in report:
            lines.append(f"| {name} | {'skipped' if 'skipped' in report else 'ERROR'} | "
                         f"{report.get('skipped') or report.get('error')} |")
            continue
        figures = ", ".join(f"{k} {_short(v)}" for k, v in report.items() if k not in ("ok", "wall_s"))
        lines.append(f"| {name} | {'ok' if report['ok'] else 'FAILED'} | {figures}; {report['wall_s']} s |")
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def device_header(cpu: bool) -> str:
    import torch

    if cpu:
        device = f"CPU ({platform.processor() or platform.machine()}, {psutil.cpu_count()} cores)"
    else:
        device = torch.cuda.get_device_name(0)
    versions = [f"torch {torch.__version__}"]
    for module in ("accelerate", "deepspeed"):
        try:
            versions.append(f"{module} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"{module} missing")
    return f"### gpu_claims.py on {device}; {', '.join(versions)}; {time.strftime('%Y-%m-%d')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, from {', '.join(CHECKS)}")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    parser.add_argument("--dry-run", action="store_true", help="the same launches on the CPU (= --cpu)")
    parser.add_argument("--launch-timeout", type=float, default=240.0, help="seconds per launch")
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="seconds for everything; a check that starts later than 60 s before it is skipped")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cmr-gpu-claims")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or tempfile.gettempdir())
                        / "cmr-gpu-check")
    args = parser.parse_args(argv)
    args.cpu = args.cpu or args.dry_run
    names = args.checks.split(",")
    unknown = set(names) - set(CHECKS)
    if unknown:
        parser.error(f"unknown check(s) {', '.join(sorted(unknown))}; known: {', '.join(CHECKS)}")
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("error: torch sees no CUDA device; use --dry-run to run on the CPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = args.work / stamp
    shards = train_val_shards(root / "shards")
    launch = Launcher(shards, root / "runs", args.cpu, args.launch_timeout)
    launch.root.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    header, reports = device_header(args.cpu), {}
    for name in names:
        left = args.time_limit - (time.perf_counter() - start)
        if left < 60:
            reports[name] = {"skipped": f"{left:.0f} s left of --time-limit"}
        else:
            began = time.perf_counter()
            try:
                reports[name] = run_check(name, launch)
            except Exception as err:  # noqa: BLE001 - one check's failure is reported, the rest run
                reports[name] = {"error": f"{type(err).__name__}: {err}"[-2000:]}
            reports[name].setdefault("wall_s", round(time.perf_counter() - began, 1))
        print(f"{name}: {json.dumps(reports[name])}", flush=True)
        (args.out / "claims.json").write_text(json.dumps({"header": header, "checks": reports}, indent=2))
        (args.out / "claims.md").write_text(markdown(header, reports))
    print(markdown(header, reports))
    print(f"total {time.perf_counter() - start:.0f} s; logs in {launch.root}; summary in {args.out}")
    failed = [n for n, r in reports.items() if "error" in r or r.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
