"""The GPU check of issue 4: the real models for a few hundred steps, real loader vs in-memory batches.

Cases (one process on one GPU each, bf16 autocast, the first stage's losses triplet + caption_xe):

- resnet50:        configs/flickr8k.yaml with the ResNet-50 trained end to end, 224 px;
- resnet50-frozen: the same with the backbone frozen, as configs/flickr8k.yaml ships it (a
                   cheaper step: the harder case for the loader to keep up with);
- features4096:    configs/vgg_features.yaml, precomputed 4096-d features.

Each case runs ``train_throughput.py worker``: real-loader and synthetic (replayed) runs of
``--steps`` steps, alternated ``--repeats`` times, medians reported, with the peak GPU memory.
Goal: real / synthetic >= 0.9 (the loader costs the step at most 10%).

The data is made on the spot (the GPU machine has no network and no npm): photo-sized JPEGs
(500x375, like Flickr's) drawn with PIL and a random 4096-d feature matrix, turned into shards
by ``python -m shards build jsonl`` / ``build features``.

    bash benchmarks/gpu_check.sh               # on the GPU machine: brings missing wheels, runs this
    python benchmarks/gpu_check.py --dry-run   # the same path on the CPU: tiny data, 3 steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from train_throughput import (
    BENCH_OVERRIDES,
    REPO,
    machine_info,
    markdown_table,
    worker_command,
    write_feature_dataset,
    write_image_dataset,
)

GOAL = 0.9
GOAL_TEXT = {True: "met", False: "NOT met", None: "n/a (the goal is for the GPU)"}
# name -> (config, data kind, overrides). No pretrained weights: the machine cannot download
# them, and random weights cost the same time.
CASES = {
    "resnet50": ("flickr8k.yaml", "jpg",
                 ["model.image_encoder.weights=null", "model.image_encoder.freeze_backbone=false"]),
    "resnet50-frozen": ("flickr8k.yaml", "jpg",
                        ["model.image_encoder.weights=null", "model.image_encoder.freeze_backbone=true"]),
    "features4096": ("vgg_features.yaml", "features", []),
}
DRY_RUN = dict(cpu=True, steps=3, repeats=1, warmup_steps=1, cached_batches=2, batch_size=8,
               samples=256, loader_workers=2, data=Path(tempfile.gettempdir()) / "cmr-gpu-check-dry-run")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    add("--steps", type=int, default=300, help="train steps per timed run")
    add("--repeats", type=int, default=2, help="real/synthetic pairs per case (medians)")
    add("--warmup-steps", type=int, default=20)
    add("--cached-batches", type=int, default=32, help="batches the synthetic runs replay")
    add("--batch-size", type=int, default=64, help="per GPU (the configs' value)")
    add("--samples", type=int, default=8192, help="samples per dataset (1 in 16 for val)")
    add("--loader-workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    add("--mixed-precision", choices=["bf16", "fp16", "no"], default="bf16")
    add("--case-timeout", type=float, default=150.0, help="seconds before a case is stopped")
    add("--time-limit", type=float, default=440.0,
        help="seconds for everything; a case that no longer fits is skipped")
    add("--cpu", action="store_true", help="run on the CPU (no GPU needed)")
    add("--dry-run", action="store_true",
        help="prove the path on the CPU: --cpu, 3 steps, batches of 8, 256 samples, 2 workers")
    add("--data", type=Path, default=Path(tempfile.gettempdir()) / "cmr-gpu-check-data")
    add("--out", type=Path, default=Path(os.environ.get("OUT") or tempfile.gettempdir()) / "cmr-gpu-check",
        help="summary.md, summary.json and one JSON per case (default: $OUT/cmr-gpu-check)")
    if "--dry-run" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**DRY_RUN)  # new defaults: flags given explicitly still win
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    return args


def build_data(args: argparse.Namespace, kinds: set[str]) -> dict[str, Path]:
    """Shards for each kind of data the chosen cases need (reused from --data if there)."""
    shards = {}
    shard_size = max(16, args.samples // 64)  # 64 shards: plenty for 16 loader workers to share
    for kind in sorted(kinds):
        start, folder = time.perf_counter(), args.data / f"{kind}-{args.samples}"
        if kind == "jpg":
            shards[kind] = write_image_dataset(folder, args.samples, 500, 375, "jpg", num_words=3000,
                                               shard_size=shard_size, workers=os.cpu_count() or 1)
        else:
            shards[kind] = write_feature_dataset(folder, args.samples, 4096, num_words=3000,
                                                 shard_size=shard_size)
        print(f"data {kind}: {shards[kind]} ({args.samples} samples), "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    return shards


def run_case(name: str, shards: Path, args: argparse.Namespace, timeout: float) -> dict:
    """One case in its own process (fresh GPU memory statistics, and a hang cannot spread)."""
    config, _, overrides = CASES[name]
    out = args.out / f"{name}.json"
    out.unlink(missing_ok=True)
    settings = [*BENCH_OVERRIDES, *overrides, f"data.shards={shards}",
                f"data.batch_size={args.batch_size}", f"data.num_workers={args.loader_workers}",
                f"train.mixed_precision={args.mixed_precision!r}"]
    cmd = [sys.executable, *worker_command(
        REPO / "configs" / config, settings, steps=args.steps, repeats=args.repeats,
        warmup_steps=args.warmup_steps, cached_batches=args.cached_batches,
        run_dir=args.data / f"run-{name}", out=out)]
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if args.cpu:
        env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        log = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr
        return {"case": name, "error": f"stopped after {timeout:.0f} s (--case-timeout/--time-limit)",
                "log_tail": (log or "")[-3000:]}
    if result.returncode != 0 or not out.exists():
        return {"case": name, "error": f"worker exited {result.returncode}", "log_tail": result.stderr[-3000:]}
    report = json.loads(out.read_text())
    report.update(case=name, config=f"configs/{config}", wall_s=round(time.perf_counter() - start, 1),
                  goal_met=None if args.cpu else report["ratio_real_over_synthetic"] >= GOAL)
    return report


def summary_markdown(header: str, reports: list[dict]) -> str:
    done = [r for r in reports if "error" not in r]
    lines = [header, "", markdown_table(done, label=lambda r: r["case"]), ""]
    if done:
        lines += ["| case | peak GPU memory (GiB) | data wait per real run (s) | epochs per real run "
                  "| goal real/synthetic >= 0.9 |", "|---|---:|---:|---:|---|"]
        for r in done:
            wait = sum(run["data_wait_s_per_rank"] for run in r["real_runs"]) / len(r["real_runs"])
            lines.append(f"| {r['case']} | {r.get('peak_gpu_memory_gib', 'n/a (CPU)')} | {wait:.2f} | "
                         f"{r['epochs_per_real_run']} | {GOAL_TEXT[r['goal_met']]} |")
    for r in reports:
        if "error" in r:
            lines += [f"- {r['case']}: FAILED: {r['error']}", "```", r.get("log_tail", ""), "```"]
    return "\n".join(lines)


def write_summary(args: argparse.Namespace, reports: list[dict]) -> str:
    header = device_header(args)
    markdown = summary_markdown(header, reports)
    (args.out / "summary.md").write_text(markdown + "\n")
    (args.out / "summary.json").write_text(json.dumps({"header": header, "cases": reports}, indent=2))
    return markdown


def device_header(args: argparse.Namespace) -> str:
    if args.cpu:
        device = "CPU (dry run)" if args.dry_run else "CPU"
    else:
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return (f"Device: {device}; host: {machine_info()}, torchvision {_version('torchvision')}, "
            f"accelerate {_version('accelerate')}; {platform.node()}, {time.strftime('%Y-%m-%d %H:%M')}.\n"
            f"Batch {args.batch_size}/GPU, {args.mixed_precision}, {args.loader_workers} loader workers, "
            f"{args.samples} samples per dataset, {args.steps} steps per timed run, "
            f"{args.repeats} repeat(s) (medians).")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "missing"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: torch sees no CUDA device; use --dry-run (or --cpu) to run on the CPU",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    names = args.cases.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    shards = build_data(args, {CASES[name][1] for name in names})
    reports, markdown = [], ""
    for name in names:
        time_left = args.time_limit - (time.perf_counter() - start)
        if time_left < 30:
            report = {"case": name, "error": f"skipped: {time_left:.0f} s left of --time-limit"}
        else:
            report = run_case(name, shards[CASES[name][1]], args, min(args.case_timeout, time_left - 5))
        reports.append(report)
        print(f"{name}: {one_line(report)}", flush=True)
        markdown = write_summary(args, reports)  # after every case: a stopped run keeps what it had
    print(markdown)
    print(f"total {time.perf_counter() - start:.0f} s; summary in {args.out}")
    return 0 if all("error" not in r for r in reports) else 1


def one_line(report: dict) -> str:
    if "error" in report:
        return report["error"]
    return (f"real {report['real_samples_per_s']:.0f} samples/s, "
            f"synthetic {report['synthetic_samples_per_s']:.0f}, "
            f"ratio {report['ratio_real_over_synthetic']:.3f}, "
            f"peak {report.get('peak_gpu_memory_gib', '-')} GiB, {report['wall_s']} s")


if __name__ == "__main__":
    raise SystemExit(main())
