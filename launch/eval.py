"""Evaluate a trained run on a split: Recall@K, median rank, rsum, mAP.

    python launch/eval.py --run-dir RUN [--checkpoint latest|best|step-N] [--shards DIR] \\
        [--split test] [--fold5]
    accelerate launch --multi_gpu --num_processes 2 launch/eval.py ...   # encodes on every rank

Prints a table (with chance level) and writes RUN/eval/<split>.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from cmr.config import ConfigError
from cmr.data.loader import build_loader
from cmr.data.source import DataError
from cmr.dist import process_state
from cmr.eval.load import load_run_model
from cmr.eval.run import evaluate_loader, format_table, with_shards
from cmr.procs import end_with_launcher
from cmr.run_dir import RunDir, RunDirError


def main() -> int:
    end_with_launcher()  # a rank must not outlive `accelerate launch`
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--checkpoint", default="latest", help="latest, best, step-N or a path")
    parser.add_argument("--shards", default=None, help="dataset dir (default: the run's data.shards)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--fold5", action="store_true", help="COCO 1K protocol: mean over 5 folds of 1/5 of the images")
    parser.add_argument("--num-workers", type=int, default=None)
    args = parser.parse_args()
    state = process_state()  # N CPU ranks over gloo, not each alone
    try:
        run = RunDir(args.run_dir)
        model, vocab, cfg, checkpoint = load_run_model(run, args.checkpoint)
        data_cfg = with_shards(cfg.data, args.shards, args.num_workers)
        loader = build_loader(data_cfg, vocab, split=args.split, mode="eval",
                              rank=state.process_index, world_size=state.num_processes)
        model.to(state.device)
        metrics, _ = evaluate_loader(model, loader, data_cfg, cfg.eval, device=state.device,
                                     accelerator=state, fold5=args.fold5)
    except (ConfigError, DataError, RunDirError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if state.is_main_process:
        metrics.update(split=args.split, checkpoint=str(checkpoint), fold5=args.fold5)
        out = run.eval_result_path(args.split, args.fold5)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2) + "\n")
        print(format_table(metrics, f"{args.run_dir} [{checkpoint.name}] on {args.split}"))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
