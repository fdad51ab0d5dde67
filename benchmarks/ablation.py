"""Ablation: which parts of Look-Imagine-Match help, at the same budget, seed and data.

    python benchmarks/ablation.py [--datasets emoji flickr8k] [--seeds 0 1 2] [--steps N] [--out runs/ablation]

Four variants, each trained from the same initial weights (one seed) on the same data order
for the same number of optimizer steps, then evaluated on the test split from the *final*
checkpoint (not the best one, which would spend extra evaluations on the choice):

    A  triplet only (VSE++-style)      B  A + modality adversary (behind the GRL)
    C  B + imagine (adversary + match)  D  C + look (caption XE, then SCST in the joint stage)

Same budget, honestly: every variant walks the same three stages of the same epochs (the
demo's 10:2:4 split) with the same learning rates. Where B-D train only their
discriminators (stage 2, encoders frozen), A keeps training its encoders, so the adversarial
variants pay for their discriminators out of the encoders' steps, as they would in practice.
Wall-clock is reported for information only: other work shares the CPU.

Runs are sequential (one training at a time) and resumable: a variant whose
``eval/test.json`` exists is not run again; a half-finished one is started over.
The table (markdown, with a chance row per dataset) is printed and written to OUT/ablation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclasses.dataclass(frozen=True)
class Dataset:
    config: str  # base config (data + model); the variants set train.stages
    shards: str
    default_steps: int
    build: tuple[str, ...]  # `python -m shards build ...` arguments that make the shards


DATASETS = {
    "emoji": Dataset("configs/ablation/emoji.yaml", "data/emoji", 184,
                     ("emoji", "--out", "data/emoji")),
    "flickr8k": Dataset("configs/ablation/flickr8k_1k.yaml", "data/flickr8k_1k", 132,
                        ("jsonl", "--captions", "../shared/data/flickr8k_1k/captions.jsonl",
                         "--images-root", "../shared/data/flickr8k_1k", "--out", "data/flickr8k_1k",
                         "--max-size", "256")),
}

# The demo's stage settings (configs/emoji_demo.yaml); only what trains and which losses differ.
ENCODERS = {"lr": 5e-4, "warmup_steps": 20, "max_violation": False}
MIDDLE = {"lr": 5e-4, "max_violation": False}
JOINT = {"lr": 2e-4, "schedule": "cosine", "max_violation": False}
ADVERSARY = {"modality_adv": 0.5}
IMAGINE = {"imagine_adv": 0.5, "imagine_match": 1.0}

# variant -> (description, [(stage name, trained groups, losses, settings)] for the 3 stages)
VARIANTS = {
    "A": ("triplet only (VSE++-style)", [
        ("encoders", ["encoders"], {"triplet": 1.0}, ENCODERS),
        ("encoders-2", ["encoders"], {"triplet": 1.0}, MIDDLE),
        ("joint", ["encoders"], {"triplet": 1.0}, JOINT),
    ]),
    "B": ("+ modality adversary", [
        ("encoders", ["encoders"], {"triplet": 1.0}, ENCODERS),
        ("discriminators", ["modality_disc"], ADVERSARY, MIDDLE),
        ("joint", ["encoders", "modality_disc"], {"triplet": 1.0, **ADVERSARY}, JOINT),
    ]),
    "C": ("+ imagine", [
        ("encoders", ["encoders"], {"triplet": 1.0}, ENCODERS),
        ("discriminators", ["discriminators"], {**ADVERSARY, **IMAGINE}, MIDDLE),
        ("joint", ["encoders", "discriminators"], {"triplet": 1.0, **ADVERSARY, **IMAGINE}, JOINT),
    ]),
    "D": ("+ look (caption XE, SCST)", [
        ("encoders", ["encoders", "decoder"], {"triplet": 1.0, "caption_xe": 1.0}, ENCODERS),
        ("discriminators", ["discriminators"], {**ADVERSARY, **IMAGINE}, MIDDLE),
        ("joint", ["all"], {"triplet": 1.0, **ADVERSARY, **IMAGINE, "caption_xe": 1.0, "scst": 0.5}, JOINT),
    ]),
}


class AblationError(Exception):
    """A run could not be done; the message says which and where its log is."""


def split_epochs(total_epochs: int) -> tuple[int, int, int]:
    """The demo's 10:2:4 split of the epochs over encoders / discriminators / joint."""
    if total_epochs < 3:
        raise AblationError(f"the budget is {total_epochs} epoch(s); the three stages need at least 3 (raise --steps)")
    middle = max(1, round(total_epochs / 8))
    joint = max(1, round(total_epochs / 4))
    return total_epochs - middle - joint, middle, joint


def steps_per_epoch(dataset: Dataset) -> int:
    """Full batches in one pass over the train split (one process; the remainder is dropped)."""
    batch_size = yaml.safe_load((REPO / dataset.config).read_text())["data"]["batch_size"]
    manifest = json.loads((REPO / dataset.shards / "train" / "manifest.json").read_text())
    return sum(s["num_samples"] for s in manifest["shards"]) // batch_size


def stages_of(variant: str, epochs: tuple[int, int, int]) -> list[dict]:
    _, stages = VARIANTS[variant]
    return [{"name": name, "epochs": n, "train": groups, "losses": losses, **settings}
            for (name, groups, losses, settings), n in zip(stages, epochs)]


def ensure_shards(name: str, dataset: Dataset) -> None:
    if (REPO / dataset.shards / "train" / "manifest.json").is_file():
        return
    print(f"[{name}] building shards: python -m shards build {' '.join(dataset.build)}", flush=True)
    done = subprocess.run([PYTHON, "-m", "shards", "build", *dataset.build, "--no-progress"], cwd=REPO)
    if done.returncode != 0:
        raise AblationError(f"could not build the {name} shards (the command above failed)")


def run_logged(args: list[str], log: Path) -> float:
    """Run a command with its output in ``log``; its wall-clock seconds."""
    env = {**os.environ, "ACCELERATE_USE_CPU": os.environ.get("ACCELERATE_USE_CPU", "1")}
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise AblationError(f"{args[1]} failed (exit {done.returncode}): {tail[0]} (log: {log})")
    return seconds


def run_variant(dataset_name: str, dataset: Dataset, variant: str, epochs: tuple[int, int, int],
                seed: int, run_dir: Path) -> dict:
    """Train and evaluate one variant; its result record (read back if it was done before)."""
    tag = f"[{dataset_name} {variant} seed {seed}]"
    result_path = run_dir / "ablation.json"
    if result_path.is_file() and (run_dir / "eval" / "test.json").is_file():
        result = json.loads(result_path.read_text())
        if result["epochs"] == list(epochs) and result["seed"] == seed:
            print(f"{tag} done before: {result_path}", flush=True)
            return result
        print(f"{tag} done before with another budget: training again", flush=True)
    if run_dir.exists():  # half-finished: a resumed run's wall-clock would not compare
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    stages = stages_of(variant, epochs)
    print(f"{tag} training {VARIANTS[variant][0]}, epochs {epochs}", flush=True)
    # One seed for the weights and the data order: every variant starts from the same weights
    # (the model builds all its parts whatever trains) and sees the same batches.
    train_s = run_logged([PYTHON, "launch/train.py", "--config", dataset.config,
                          "--set", f"name=ablation-{dataset_name}-{variant}-seed{seed}",
                          "--set", f"seed={seed}", "--set", f"data.seed={seed}",
                          "--set", f"train.stages={json.dumps(stages)}",
                          "--run-dir", str(run_dir)], run_dir / "train.log")
    eval_s = run_logged([PYTHON, "launch/eval.py", "--run-dir", str(run_dir), "--split", "test",
                         "--checkpoint", "latest"], run_dir / "eval.log")
    metrics = json.loads((run_dir / "eval" / "test.json").read_text())
    steps = json.loads((Path(metrics["checkpoint"]) / "meta.json").read_text())["step"]
    result = {"dataset": dataset_name, "variant": variant, "description": VARIANTS[variant][0],
              "seed": seed, "epochs": list(epochs), "steps": steps, "train_s": round(train_s, 1),
              "eval_s": round(eval_s, 1), "metrics": metrics}
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{tag} {steps} steps in {train_s:.0f} s; test rsum {metrics['rsum']:.2f}", flush=True)
    return result


# -- the table ------------------------------------------------------------------------------

COLUMNS = ("dataset", "variant", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rsum",
           "mAP@50 i2t/t2i", "train wall-clock", "steps (epochs)")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def variant_row(runs: list[dict]) -> list[str]:
    """One variant's cells: metrics averaged over its seeds; rsum with its spread and per seed."""
    metrics = [r["metrics"] for r in runs]
    recalls = [f"{_mean([m[f'{d}_r{k}'] for m in metrics]):.1f}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    rsums = [m["rsum"] for m in metrics]
    rsum = f"{_mean(rsums):.1f}"
    if len(runs) > 1:
        spread = statistics.stdev(rsums)
        rsum += f" ± {spread:.1f} ({' / '.join(f'{v:.0f}' for v in rsums)})"
    maps = "–"
    if all(m.get("i2t_map50") is not None and m.get("t2i_map50") is not None for m in metrics):
        maps = f"{_mean([m['i2t_map50'] for m in metrics]):.1f} / {_mean([m['t2i_map50'] for m in metrics]):.1f}"
    first = runs[0]
    return [first["dataset"], f"{first['variant']} {first['description']}", *recalls, rsum, maps,
            f"{_mean([r['train_s'] for r in runs]) / 60:.1f} min",
            f"{first['steps']} ({'+'.join(map(str, first['epochs']))})"]


def table_rows(results: list[dict]) -> list[str]:
    lines = [_row(list(COLUMNS)), "|" + "|".join(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2)) + "|"]
    for dataset_name in dict.fromkeys(r["dataset"] for r in results):
        group = [r for r in results if r["dataset"] == dataset_name]
        for variant in dict.fromkeys(r["variant"] for r in group):
            lines.append(_row(variant_row([r for r in group if r["variant"] == variant])))
        # Chance: a random ranking finds a query's match in its top K with probability ~K/n.
        first = group[0]["metrics"]
        n = first["num_images"]
        chance = [f"{min(100.0, 100.0 * k / n):.1f}" for _ in range(2) for k in (1, 5, 10)]
        rsum = 2 * sum(min(100.0, 100.0 * k / n) for k in (1, 5, 10))
        lines.append(_row([dataset_name, f"chance ({n} test images, {first['num_captions']} captions)",
                           *chance, f"{rsum:.1f}", "–", "–", "–"]))
    return lines


def machine_line() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}; {datetime.date.today().isoformat()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per variant, rounded to whole epochs "
                             f"(default: {', '.join(f'{k} {d.default_steps}' for k, d in DATASETS.items())})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one run per variant and seed; with several, the table shows means and the rsum spread")
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    args = parser.parse_args(argv)
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    results = []
    try:
        for name in args.datasets:
            dataset = DATASETS[name]
            ensure_shards(name, dataset)
            per_epoch = steps_per_epoch(dataset)
            if per_epoch < 1:
                raise AblationError(f"{dataset.shards}: fewer training samples than one batch")
            epochs = split_epochs(round((args.steps or dataset.default_steps) / per_epoch))
            print(f"[{name}] budget: {sum(epochs) * per_epoch} steps = {sum(epochs)} epochs "
                  f"x {per_epoch} steps, split {epochs}", flush=True)
            for seed in args.seeds:
                for variant in args.variants:
                    run_dir = out / name / f"{variant}-seed{seed}"
                    results.append(run_variant(name, dataset, variant, epochs, seed, run_dir))
    except AblationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    text = "\n".join([f"Machine: {machine_line()}", "", *table_rows(results)]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text)
    print(text + f"\nwrote {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
