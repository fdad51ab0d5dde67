"""Ablation: does Look, Imagine and Match help? Five variants on pretrained features, paired seeds.

    python benchmarks/ablation.py [--datasets emoji flickr8k] [--seeds 0 1 2 3 4] [--out runs/ablation]
    python benchmarks/ablation.py --report-only   # tabulate what has finished, train nothing

Variants (each adds one part to the one above, except E):

    A  triplet only (VSE++: hardest negatives)     B  A + modality adversary (behind the GRL)
    C  B + imagine (generator, its adversary and its match loss)
    D  C + look (caption XE in the first stage, then XE + SCST in the joint stage)
    E  the tutorial's full schedule as written: encoders 50 : discriminators 20 : joint 100
       epochs (scaled to the budget), Adam at a constant 1e-4, every loss at its weight

Same budget, honestly: every variant gets the same number of optimizer steps that update the
encoders (stage 1 + the joint stage); the discriminator-only stage of B-E (encoders frozen)
comes on top, it is not taken out of the encoders' steps. Its cost shows in the wall-clock.

Paired: a seed gives every variant the same initial weights (the model builds every part
whatever trains) and the same batches in stage 1; the joint stage's epochs are shuffled by
their epoch number, which the discriminator stage shifts, so those batches differ. Each
variant's difference from A is taken seed by seed, with a 95% t-interval over the seeds.

Images are EfficientNet-Lite ImageNet features (extracted once by launch/extract.py, cached
under data/). Runs are sequential and resumable: a variant+seed whose result exists is read
back. Evaluated on the test split from the final checkpoint. Writes OUT/ablation.md.

Each finished run's result (stages, steps, wall-clock, test metrics; no weights) is also kept
in benchmarks/ablation-results/DATASET/VARIANT-seedN.json, which is committed: the table can
be redone, and an interrupted ablation resumed, on a machine that never had the run
directories.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
FLICKR = "../shared/data/flickr8k_1k"
RECORD = REPO / "benchmarks" / "ablation-results"


@dataclasses.dataclass(frozen=True)
class Dataset:
    config: str  # base config (data + model); the variants set train.stages
    images: str  # the image shards
    features: str  # the feature shards extracted from them
    build: tuple[str, ...]  # `python -m shards build ...` arguments for the image shards
    extract: tuple[str, ...]  # launch/extract.py arguments (backbone, input size)
    encoder_epochs: tuple[int, int]  # stage 1, joint stage (the encoders' budget)
    disc_epochs: int  # the discriminator-only stage of B-D, on top
    # Hardest negatives (VSE++) where they work; on 753 photos they do not (rsum 175 vs 275 with
    # the sum over negatives, measured): the hardest negative of a small batch is mostly noise.
    max_violation: bool = True
    lr: float = 2e-4  # stage 1 and the discriminator stage of A-D; the joint stage has half


DATASETS = {
    "emoji": Dataset("configs/ablation/emoji.yaml", "data/emoji", "data/emoji-lite0-128",
                     ("emoji", "--out", "data/emoji"),
                     ("--backbone", "efficientnet_lite0", "--image-size", "128"), (12, 4), 2),
    # Photos kept at up to 512 px, so the 260 px input of Lite2 is never upsampled.
    "flickr8k": Dataset("configs/ablation/flickr8k_1k.yaml", "data/flickr8k_1k_512", "data/flickr8k_1k-lite2",
                        ("jsonl", "--captions", f"{FLICKR}/captions.jsonl", "--images-root", FLICKR,
                         "--out", "data/flickr8k_1k_512", "--max-size", "512"),
                        ("--backbone", "efficientnet_lite2"), (40, 20), 5, max_violation=False, lr=4e-4),
}

# The tuned recipe of A-D (configs/emoji_demo.yaml): warm-up, then cosine in the joint stage.
FIRST = {"warmup_steps": 20}
MIDDLE = {}
JOINT = {"schedule": "cosine"}
TUTORIAL = {"lr": 1e-4}  # E: constant, no warm-up; negatives as the dataset's A-D, so E differs
# from D by its proportions, its learning rate and its SCST weight, not by the triplet loss.
TRIPLET = {"triplet": 1.0}
ADVERSARY = {"modality_adv": 0.5}
IMAGINE = {"imagine_adv": 0.5, "imagine_match": 1.0}
LOOK_XE = {"caption_xe": 1.0}
DESCRIPTIONS = {"A": "triplet only (VSE++)", "B": "+ modality adversary", "C": "+ imagine",
                "D": "+ look (XE, then SCST)", "E": "tutorial's full schedule"}


def stages_of(variant: str, dataset: Dataset) -> list[dict]:
    """The variant's train.stages: (name, epochs, trained groups, losses, settings)."""
    first, joint = dataset.encoder_epochs
    middle = dataset.disc_epochs
    if variant == "E":  # 50 : 20 : 100, the encoders' share (50 + 100) is the same budget
        first = round((first + joint) * 50 / 150)
        joint, middle = sum(dataset.encoder_epochs) - first, max(1, round(sum(dataset.encoder_epochs) * 20 / 150))
        plan = [("encoders", first, ["encoders", "decoder"], {**TRIPLET, **LOOK_XE}, TUTORIAL),
                ("discriminators", middle, ["discriminators"], {**ADVERSARY, **IMAGINE}, TUTORIAL),
                ("joint", joint, ["all"], {**TRIPLET, **ADVERSARY, **IMAGINE, **LOOK_XE, "scst": 1.0}, TUTORIAL)]
    elif variant == "A":
        plan = [("encoders", first, ["encoders"], TRIPLET, FIRST),
                ("joint", joint, ["encoders"], TRIPLET, JOINT)]
    else:
        adversaries = ["modality_disc"] if variant == "B" else ["discriminators"]
        adv = ADVERSARY if variant == "B" else {**ADVERSARY, **IMAGINE}
        look = variant == "D"
        plan = [("encoders", first, ["encoders", *(["decoder"] if look else [])],
                 {**TRIPLET, **(LOOK_XE if look else {})}, FIRST),
                ("discriminators", middle, adversaries, adv, MIDDLE),
                ("joint", joint, ["all"] if look else ["encoders", *adversaries],
                 {**TRIPLET, **adv, **({**LOOK_XE, "scst": 0.5} if look else {})}, JOINT)]
    lrs = {"encoders": dataset.lr, "discriminators": dataset.lr, "joint": dataset.lr / 2}
    return [{"name": name, "epochs": n, "train": groups, "losses": losses,
             "lr": TUTORIAL["lr"] if variant == "E" else lrs[name], **settings,
             "max_violation": dataset.max_violation} for name, n, groups, losses, settings in plan]


class AblationError(Exception):
    """A run could not be done; the message says which and where its log is."""


def run_logged(args: list[str], log: Path) -> float:
    """Run a command with its output in ``log``; its wall-clock seconds."""
    env = {**os.environ, "ACCELERATE_USE_CPU": os.environ.get("ACCELERATE_USE_CPU", "1")}
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise AblationError(f"{' '.join(args[1:3])} failed (exit {done.returncode}): {tail[0]} (log: {log})")
    return seconds


def ensure_features(name: str, dataset: Dataset, out: Path) -> None:
    """Image shards, then their features (both cached; the extraction resumes if cut short)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (REPO / dataset.images / "train" / "manifest.json").is_file():
        print(f"[{name}] building shards: python -m shards build {' '.join(dataset.build)}", flush=True)
        run_logged([PYTHON, "-m", "shards", "build", *dataset.build, "--no-progress"], out / f"{name}-build.log")
    if not (REPO / dataset.features / "train" / "manifest.json").is_file():
        print(f"[{name}] extracting features into {dataset.features}", flush=True)
        seconds = run_logged([PYTHON, "launch/extract.py", "--shards", dataset.images, "--out", dataset.features,
                              "--weights", "imagenet", *dataset.extract, "--no-progress"], out / f"{name}-extract.log")
        print(f"[{name}] extracted in {seconds:.0f} s", flush=True)


def overrides(*assignments: str) -> list[str]:
    return [arg for assignment in assignments for arg in ("--set", assignment)]


def run_variant(name: str, dataset: Dataset, variant: str, seed: int, run_dir: Path) -> dict:
    """Train and evaluate one variant and seed; its result (read back if done before)."""
    tag = f"[{name} {variant} seed {seed}]"
    stages = stages_of(variant, dataset)
    result = recorded(name, variant, seed)
    if result is not None:
        return result
    result_path = run_dir / "ablation.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result["stages"] == stages and result["seed"] == seed:
            record(result)
            return result
        print(f"{tag} done before with other stages: training again", flush=True)
    if run_dir.exists():  # half-finished: a resumed run's wall-clock would not compare
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    print(f"{tag} {DESCRIPTIONS[variant]}, epochs {[s['epochs'] for s in stages]}", flush=True)
    train_s = run_logged([PYTHON, "launch/train.py", "--config", dataset.config,
                          *overrides(f"name=ablation-{name}-{variant}-seed{seed}", f"data.shards={dataset.features}",
                                     f"seed={seed}", f"data.seed={seed}", f"train.stages={json.dumps(stages)}"),
                          "--run-dir", str(run_dir)], run_dir / "train.log")
    run_logged([PYTHON, "launch/eval.py", "--run-dir", str(run_dir), "--split", "test", "--checkpoint", "latest"],
               run_dir / "eval.log")
    metrics = json.loads((run_dir / "eval" / "test.json").read_text())
    meta = json.loads((Path(metrics["checkpoint"]) / "meta.json").read_text())
    steps_per_epoch = meta["step"] / sum(s["epochs"] for s in stages)
    result = {"dataset": name, "variant": variant, "seed": seed, "stages": stages, "steps": meta["step"],
              "encoder_steps": round(steps_per_epoch * sum(s["epochs"] for s in stages if s["name"] != "discriminators")),
              "train_s": round(train_s, 1), "metrics": metrics}
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    record(result)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # results kept, weights not
    print(f"{tag} {meta['step']} steps in {train_s:.0f} s; test rsum {metrics['rsum']:.1f}", flush=True)
    return result


def record_path(name: str, variant: str, seed: int) -> Path:
    return RECORD / name / f"{variant}-seed{seed}.json"


def record(result: dict) -> None:
    """Keep a finished run's result in the committed record (written whole, then renamed)."""
    path = record_path(result["dataset"], result["variant"], result["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, path)


def recorded(name: str, variant: str, seed: int) -> dict | None:
    """The recorded result of this variant and seed, if it was trained with today's stages."""
    path = record_path(name, variant, seed)
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result["stages"] == stages_of(variant, DATASETS[name]) and result["seed"] == seed else None


# -- statistics and the table ---------------------------------------------------------------

# Two-sided 95% Student t quantiles by degrees of freedom (scipy is not a dependency).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def t_quantile(df: int) -> float:
    return T_975.get(df) or T_975[max(k for k in T_975 if k <= df)] if df >= 1 else math.nan


def paired_interval(values: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Mean of the paired differences and its 95% t-interval (nan for a single seed)."""
    diffs = [v - b for v, b in zip(values, baseline)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def variant_cells(runs: list[dict], baseline: list[dict] | None) -> list[str]:
    metrics = [r["metrics"] for r in runs]
    recalls = [f"{statistics.fmean(m[f'{d}_r{k}'] for m in metrics):.1f}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    rsums = [m["rsum"] for m in metrics]
    diff = "–"
    if baseline is not None:
        mean, low, high = paired_interval(rsums, [b["metrics"]["rsum"] for b in baseline])
        diff = f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]" if not math.isnan(low) else f"{mean:+.1f}"
        if not math.isnan(low) and low <= 0 <= high:
            diff += " (includes 0)"
    first = runs[0]
    return [f"{first['variant']} {DESCRIPTIONS[first['variant']]}", *recalls, _spread(rsums), diff,
            f"{statistics.fmean(r['train_s'] for r in runs) / 60:.1f} min",
            f"{first['encoder_steps']} + {first['steps'] - first['encoder_steps']}"]


COLUMNS = ("variant", "i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "rsum (mean ± std)",
           "rsum − A, paired [95% CI]", "train wall-clock", "steps: encoders + discriminators only")


def table(results: list[dict]) -> list[str]:
    lines = []
    for name in dict.fromkeys(r["dataset"] for r in results):
        group = [r for r in results if r["dataset"] == name]
        seeds = sorted({r["seed"] for r in group})
        first = group[0]["metrics"]
        n = first["num_images"]
        lines += [f"### {name}: {n} test images, {first['num_captions']} captions; seeds {seeds}", "",
                  "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
        by_variant = {v: sorted((r for r in group if r["variant"] == v), key=lambda r: r["seed"])
                      for v in dict.fromkeys(r["variant"] for r in group)}
        baseline = by_variant.get("A")
        for variant, runs in by_variant.items():
            paired = baseline if variant != "A" and baseline and [r["seed"] for r in baseline] == [r["seed"] for r in runs] else None
            lines.append("| " + " | ".join(variant_cells(runs, paired)) + " |")
        chance = [min(100.0, 100.0 * k / n) for k in (1, 5, 10)]
        lines += ["| chance | " + " | ".join(f"{c:.1f}" for c in chance * 2) + f" | {2 * sum(chance):.1f} | – | – | – |", ""]
    return lines


def machine_line() -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}")


def finished_results(args: argparse.Namespace, out: Path) -> list[dict]:
    """The results already written, for the seeds that every variant has finished."""
    results = []
    for name in args.datasets:
        for seed in args.seeds:
            runs = []
            for variant in args.variants:
                result = recorded(name, variant, seed)
                path = out / name / f"{variant}-seed{seed}" / "ablation.json"
                if result is None and path.is_file():
                    result = json.loads(path.read_text())
                if result is None or result["stages"] != stages_of(variant, DATASETS[name]):
                    break
                runs.append(result)
            else:
                results += runs
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--variants", nargs="+", default=list(DESCRIPTIONS), choices=list(DESCRIPTIONS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the seeds whose every variant has finished")
    args = parser.parse_args(argv)
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    results = finished_results(args, out) if args.report_only else []
    try:
        for name in [] if args.report_only else args.datasets:
            dataset = DATASETS[name]
            ensure_features(name, dataset, out)
            for seed in args.seeds:
                for variant in args.variants:
                    results.append(run_variant(name, dataset, variant, seed, out / name / f"{variant}-seed{seed}"))
    except AblationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if not results:
        print(f"error: no finished seed under {out}", file=sys.stderr)
        return 1
    text = "\n".join([f"Machine: {machine_line()}", "", *table(results)]) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(text)
    print(text + f"\nwrote {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
