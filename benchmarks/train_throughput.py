"""Training-step throughput: the real streaming loader against the same step on in-memory batches.

One model, one config, one process group, measured in the same run:

- real:      ``cmr.data``'s streaming loader feeding ``Trainer.train_step``, as in training
             (DataLoader workers, their start at every epoch and every data wait included);
- synthetic: the same ``train_step`` fed from batches taken from that loader once and then
             replayed from memory (no loader at all).

``real / synthetic`` is the share of the step's speed the loader leaves (1.00 = the loader
costs nothing). The CPU run measures both for 1 and for 2 processes, each launched through
the real ``accelerate launch`` (2 processes: ``--multi_gpu`` with ACCELERATE_USE_CPU=1, gloo).

    python benchmarks/train_throughput.py [--steps 40] [--repeats 3] [--processes 1,2]   # ~3-4 min
    accelerate launch ... benchmarks/train_throughput.py worker --config X.yaml --set k=v \\
        --steps 300 --out result.json          # one measurement (what gpu_check.py runs too)

The data is written here on the fly (no download, no npm): real PNG/JPEG files drawn with
PIL, or a random feature matrix, turned into shards by the real ``python -m shards build``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing cmr
    sys.path.insert(0, str(REPO))

from cmr.config import ConfigError, add_config_arguments, config_from_args  # noqa: E402
from cmr.data.source import DataError  # noqa: E402
from cmr.experiment import ExperimentConfig  # noqa: E402
from cmr.train.trainer import Trainer  # noqa: E402

# -- synthetic-but-real data: pictures of coloured shapes, captions that describe them ----------

COLOURS = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "orange": (255, 127, 14),
    "purple": (148, 103, 189), "brown": (140, 86, 75), "pink": (227, 119, 194), "grey": (127, 127, 127),
    "olive": (188, 189, 34), "cyan": (23, 190, 207), "black": (20, 20, 20),
    "yellow": (240, 220, 30),
}
SHAPES = ("circle", "square", "triangle", "bar")
SYLLABLES = ("ka", "lo", "mi", "nu", "re", "sa", "ti", "vo", "ze", "pa", "do", "fe", "gu", "ha", "ji")


def lexicon(num_words: int) -> list[str]:
    """Pseudo-words (letters only, so each is one token): the long tail of a real vocabulary."""
    words = ("".join(parts) for n in (2, 3, 4) for parts in itertools.product(SYLLABLES, repeat=n))
    return list(itertools.islice(words, num_words))


def draw_sample(index: int, width: int, height: int, textured: bool,
                words: list[str]) -> tuple[Image.Image, list[str]]:
    """One image with 1-3 shapes and 3 captions naming them (and a Zipf-drawn scene word)."""
    rng = np.random.default_rng(index)
    if textured:  # photo-like: a smooth random field plus grain, so JPEGs have real-world sizes
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8))
        field = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.int16)
        field = field + rng.normal(0, 10, size=field.shape).astype(np.int16)
        image = Image.fromarray(field.clip(0, 255).astype(np.uint8))
    else:  # emoji-like: shapes on white
        image = Image.new("RGB", (width, height), (255, 255, 255))
    draw, phrases = ImageDraw.Draw(image), []
    for _ in range(int(rng.integers(1, 4))):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        large = bool(rng.random() < 0.5)
        r = (0.22 if large else 0.12) * min(width, height)
        cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[colour])
        elif shape == "triangle":
            corners = [(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)]
            draw.polygon(corners, fill=COLOURS[colour])
        else:
            draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=COLOURS[colour])
        side = "left" if cx < width / 2 else "right"
        phrases.append((("large" if large else "small"), colour, shape, side))
    scene = words[min(int(rng.zipf(1.3)) - 1, len(words) - 1)] if words else "plain"
    named = " and ".join(f"a {size} {colour} {shape}" for size, colour, shape, _ in phrases)
    placed = ", ".join(f"a {colour} {shape} on the {side}" for _, colour, shape, side in phrases)
    captions = [
        f"{named} on {scene}",
        f"{scene} picture with {placed}",
        f"there is a {phrases[0][1]} {phrases[0][2]} in this {scene} image",
    ]
    return image, captions


def split_of(index: int) -> str:
    """1 sample in 16 goes to val: the trainer opens an evaluation split when it starts."""
    return "val" if index % 16 == 15 else "train"


def _write_image(job: tuple) -> dict:
    index, folder, width, height, fmt, words = job
    image, captions = draw_sample(index, width, height, fmt == "jpg", words)
    name = f"{index:06d}.{fmt}"
    if fmt == "jpg":
        image.save(Path(folder) / name, quality=90)
    else:
        image.save(Path(folder) / name)
    return {"image": name, "captions": captions, "split": split_of(index), "id": index}


def write_image_dataset(out: Path, num_samples: int, width: int, height: int, fmt: str,
                        num_words: int, shard_size: int, workers: int) -> Path:
    """Image files + captions.jsonl in ``out/raw``, shards in ``out/shards`` (reused if there)."""
    shards = out / "shards"
    if (shards / "train" / "manifest.json").exists():
        return shards
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    jobs = [(i, str(raw), width, height, fmt, lexicon(num_words)) for i in range(num_samples)]
    with Pool(max(1, workers)) as pool:
        records = pool.map(_write_image, jobs, chunksize=64)
    (raw / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _shards_cli("jsonl", "--captions", raw / "captions.jsonl", "--images-root", raw, "--out", shards,
                "--shard-size", shard_size, "--workers", workers)
    return shards


def write_feature_dataset(out: Path, num_samples: int, dim: int, num_words: int,
                          shard_size: int) -> Path:
    """A random float32 [N, dim] .npy + captions.jsonl (row i <-> line i), and its shards."""
    shards = out / "shards"
    if (shards / "train" / "manifest.json").exists():
        return shards
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # Non-negative and sparse, like fc7 features after their ReLU.
    features = np.maximum(rng.standard_normal((num_samples, dim), dtype=np.float32), 0)
    np.save(raw / "features.npy", features)
    words = lexicon(num_words)
    captions = [draw_sample(i, 8, 8, False, words)[1] for i in range(num_samples)]
    lines = [json.dumps({"captions": c, "split": split_of(i), "id": i}) for i, c in enumerate(captions)]
    (raw / "captions.jsonl").write_text("\n".join(lines) + "\n")
    _shards_cli("features", "--features", raw / "features.npy", "--captions", raw / "captions.jsonl",
                "--out", shards, "--shard-size", shard_size)
    return shards


def _shards_cli(kind: str, *args) -> None:
    cmd = [sys.executable, "-m", "shards", "build", kind, *map(str, args), "--no-progress"]
    subprocess.run(cmd, check=True, cwd=REPO, env=_env_with_repo(), stdout=subprocess.DEVNULL)


def _env_with_repo(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, **extra)


# -- the measurement: one process group, both batch sources ------------------------------------


class ThroughputTrainer(Trainer):
    """The project's Trainer; only the loop around ``train_step`` is the benchmark's own."""

    def real_batches(self):
        """Batches as training gets them: the streaming loader, epoch after epoch, each with
        the time spent waiting for it (measured as ``Trainer._timed`` does)."""
        while True:
            self.loader.set_epoch(self.epoch)
            yield from self._timed(self.loader)
            self.epoch += 1

    def take_batches(self, count: int) -> list:
        """``count`` real batches, kept in memory for the synthetic runs."""
        source = self.real_batches()
        batches = [batch for batch, _ in itertools.islice(source, count)]
        self._close(source)
        return batches

    def _close(self, source) -> None:
        # Stops the DataLoader workers; the next real run starts a new epoch, as training would.
        source.close()
        self.epoch += 1

    def timed_run(self, source, num_steps: int) -> dict:
        """``num_steps`` calls of ``train_step``; samples/s over all ranks."""
        acc = self.accelerator
        acc.wait_for_everyone()
        _synchronize(acc.device)
        num_samples, data_wait_s, sync_s, num_syncs = 0, 0.0, 0.0, 0
        start = time.perf_counter()
        for batch, wait_s in itertools.islice(source, num_steps):
            stepped, _ = self.train_step(batch, wait_s)
            if stepped:  # as the training loop does after every optimizer step
                sync_start = time.perf_counter()
                self._sync_buffers()
                _synchronize(acc.device)
                sync_s += time.perf_counter() - sync_start
                num_syncs += 1
            self.global_step += int(stepped)
            num_samples += batch.num_samples
            data_wait_s += wait_s
        _synchronize(acc.device)
        elapsed = time.perf_counter() - start
        totals = torch.tensor([float(num_samples), data_wait_s, elapsed, sync_s], device=acc.device)
        num_samples, data_wait_s, elapsed, sync_s = acc.reduce(totals, "sum").tolist()
        seconds = elapsed / acc.num_processes  # ranks step in lockstep: their mean time
        return {"samples_per_s": num_samples / seconds, "seconds": seconds,
                "data_wait_s_per_rank": data_wait_s / acc.num_processes,
                # The BatchNorm statistics' all-reduce after each optimizer step (Trainer._sync_buffers).
                "buffer_sync_ms_per_step": 1000 * sync_s / acc.num_processes / max(1, num_syncs),
                "buffer_sync_share": sync_s / max(elapsed, 1e-9),
                "num_samples": int(num_samples)}

    def measure(self, num_steps: int, warmup_steps: int, repeats: int, num_cached: int) -> dict:
        """Warm up on cached batches, then alternate real and synthetic runs of equal length."""
        self._enter_stage(0)
        cached = self.take_batches(num_cached)
        self.timed_run(replayed(cached), warmup_steps)  # kernels, allocator, autotuning: not timed
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        real, synthetic = [], []
        for _ in range(repeats):
            source = self.real_batches()
            real.append(self.timed_run(source, num_steps))
            self._close(source)
            synthetic.append(self.timed_run(replayed(cached), num_steps))
        real_rate = statistics.median(run["samples_per_s"] for run in real)
        synthetic_rate = statistics.median(run["samples_per_s"] for run in synthetic)
        buffers = [b for b in self.raw_model.buffers() if b.is_floating_point()]
        return {
            "real_samples_per_s": round(real_rate, 2),
            "synthetic_samples_per_s": round(synthetic_rate, 2),
            "ratio_real_over_synthetic": round(real_rate / synthetic_rate, 3),
            "buffer_sync_ms_per_step": round(statistics.median(r["buffer_sync_ms_per_step"] for r in synthetic), 3),
            "buffer_sync_share_of_step": round(statistics.median(r["buffer_sync_share"] for r in synthetic), 4),
            "float_buffers": {"tensors": len(buffers), "elements": sum(b.numel() for b in buffers)},
            "real_runs": real,
            "synthetic_runs": synthetic,
            "epochs_per_real_run": round(num_steps / max(1, len(self.loader)), 2),
        }


def replayed(batches: list):
    """The synthetic source: the cached batches over and over, with no time waited for any."""
    for batch in itertools.cycle(batches):
        yield batch, 0.0


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="train_throughput.py worker")
    add_config_arguments(parser)
    parser.add_argument("--steps", type=int, default=40, help="train steps per timed run")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="real/synthetic pairs (medians)")
    parser.add_argument("--cached-batches", type=int, default=16,
                        help="batches the synthetic runs replay")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON result (main process writes it)")
    args = parser.parse_args(argv)
    cfg = config_from_args(ExperimentConfig, args)
    try:
        trainer = ThroughputTrainer(cfg, args.run_dir)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = trainer.measure(args.steps, args.warmup_steps, args.repeats, args.cached_batches)
    acc = trainer.accelerator
    result.update(
        world_size=acc.num_processes, batch_size_per_rank=cfg.data.batch_size,
        steps_per_run=args.steps, device=_device_name(acc.device),
        mixed_precision=str(acc.mixed_precision), loader_workers_per_rank=cfg.data.num_workers,
        torch_threads=torch.get_num_threads(), batches_per_epoch_per_rank=len(trainer.loader),
    )
    if acc.device.type == "cuda":
        gib = 2**30
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(acc.device) / gib, 2)
        result["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(acc.device) / gib, 2)
    if acc.is_main_process:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    acc.end_training()
    return 0


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# -- the CPU benchmark: 1 vs 2 processes ---------------------------------------------------------

# Every measurement trains the tutorial's first stage (its epochs never run out here), with
# no wandb and no progress bar. ``'no'`` is quoted: YAML reads a bare no as False.
BENCH_OVERRIDES = [
    "train.stages=[{name: encoders, epochs: 1000, train: [encoders, decoder],"
    " losses: {triplet: 1.0, caption_xe: 1.0}, lr: 0.0002}]",
    "train.logging.wandb=false", "train.logging.progress_bar=false", "reward.num_workers=0",
]
# On the CPU: configs/emoji.yaml with a model big enough that a step is real work for a core,
# small enough for the whole benchmark to take ~3-4 minutes on 2 cores.
CPU_OVERRIDES = [
    *BENCH_OVERRIDES, "data.num_workers=1", "data.shuffle_buffer=256", "train.mixed_precision='no'",
    "model.image_encoder={kind: pixels, backbone: small_cnn, weights: null, small_cnn_width: 32,"
    " hidden_dim: 512, embed_dim: 256}",
    # No GloVe here (its words would not be the synthetic lexicon's), so no extension drawn from it.
    "model.text_encoder={word_dim: 128, hidden_dim: 256, proj_dim: 256, embed_dim: 256}",
    "data.vocab.glove_extra_words=0",
    "model.decoder={word_dim: 128, hidden_dim: 256, max_len: 16}",
]


def worker_command(config: Path, overrides: list[str], **options) -> list[str]:
    """This script's worker with a config, its overrides and ``--steps`` etc. (``options``)."""
    args = ["worker", "--config", str(config), *[a for o in overrides for a in ("--set", o)]]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return [str(Path(__file__).resolve()), *args]


def launch_worker(num_processes: int, worker: list[str], threads: int,
                  timeout: float) -> subprocess.CompletedProcess:
    """``accelerate launch`` of this script's worker: N CPU processes over gloo."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if num_processes > 1:
        # --cpu would start one process only: --multi_gpu + ACCELERATE_USE_CPU=1 starts N on gloo.
        cmd += ["--multi_gpu", "--main_process_port", "0"]
    else:
        cmd += ["--cpu"]
    cmd += worker
    env = _env_with_repo(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(threads), WANDB_MODE="disabled")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def parse_cpu_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048,
                        help="samples written as 64 px PNGs (1 in 16 for val)")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=40, help="train steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="real/synthetic pairs per count")
    parser.add_argument("--processes", default="1,2", help="process counts to compare")
    # One thread per process: a second OpenMP thread on a core shared with a loader worker (or
    # with anything else) spin-waits, which made 1-process steps 10x slower here, and noisy.
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "cmr-bench-train",
                        help="data, runs and results go here (shards are reused by later runs)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    return parser.parse_args(argv)


def measure_processes(num_processes: int, shards: Path, args: argparse.Namespace) -> dict:
    """One ``accelerate launch`` of the worker with ``num_processes`` CPU processes."""
    out = args.data / f"result-{num_processes}proc.json"
    out.unlink(missing_ok=True)
    overrides = [*CPU_OVERRIDES, f"data.shards={shards}", f"data.batch_size={args.batch_size}"]
    worker = worker_command(REPO / "configs" / "emoji.yaml", overrides, steps=args.steps,
                            repeats=args.repeats, warmup_steps=3,
                            run_dir=args.data / f"run-{num_processes}proc", out=out)
    result = launch_worker(num_processes, worker, args.threads, timeout=900)
    if result.returncode != 0 or not out.exists():
        print(result.stdout[-3000:], result.stderr[-6000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"error: the {num_processes}-process run failed (exit {result.returncode})")
    run = json.loads(out.read_text())
    print(f"{num_processes} process(es) x {args.threads} thread(s): "
          f"real {run['real_samples_per_s']:.1f} samples/s, "
          f"synthetic {run['synthetic_samples_per_s']:.1f} samples/s, "
          f"real/synthetic {run['ratio_real_over_synthetic']:.3f}; BatchNorm buffer sync "
          f"{run['buffer_sync_ms_per_step']:.2f} ms/step ({100 * run['buffer_sync_share_of_step']:.1f}% of the "
          f"synthetic step, {run['float_buffers']['elements']} floats)", flush=True)
    return run


def cpu_main(argv: list[str]) -> int:
    args = parse_cpu_args(argv)
    start = time.perf_counter()
    shards = write_image_dataset(args.data / f"png64-{args.samples}", args.samples, 64, 64, "png",
                                 num_words=400, shard_size=128, workers=os.cpu_count() or 1)
    print(f"shards: {shards} ({args.samples} samples, 64 px PNG), {time.perf_counter() - start:.0f} s")
    # Other work on the machine skews every figure: the load average says how much there was.
    summary = {"machine": machine_info(), "config": "configs/emoji.yaml + CPU_OVERRIDES",
               "load_average_at_start": os.getloadavg()}
    summary["runs"] = [measure_processes(int(n), shards, args) for n in args.processes.split(",")]
    summary["load_average_at_end"] = os.getloadavg()
    print(markdown_table(summary["runs"]))
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


def machine_info() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def markdown_table(runs: list[dict], label=lambda run: f"{run['world_size']} proc") -> str:
    rows = ["| run | batch/rank | steps | real samples/s | synthetic samples/s | real/synthetic |",
            "|---|---:|---:|---:|---:|---:|"]
    for run in runs:
        rows.append(f"| {label(run)} | {run['batch_size_per_rank']} | {run['steps_per_run']} | "
                    f"{run['real_samples_per_s']:.1f} | {run['synthetic_samples_per_s']:.1f} | "
                    f"{run['ratio_real_over_synthetic']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        raise SystemExit(worker_main(sys.argv[2:]))
    raise SystemExit(cpu_main(sys.argv[1:]))
