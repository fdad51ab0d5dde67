"""Train a Look-Imagine-Match retrieval model.

    accelerate launch [--config_file configs/accelerate/X.yaml] launch/train.py \\
        --config configs/emoji.yaml [--set section.key=value ...] [--run-dir DIR] [--resume auto|PATH]
"""

import argparse
import sys
from pathlib import Path

from cmr.config import ConfigError, add_config_arguments, config_from_args
from cmr.data.source import DataError
from cmr.experiment import ExperimentConfig
from cmr.procs import end_with_launcher
from cmr.run_dir import RunDirError
from cmr.train.preemption import PreemptionHandler
from cmr.train.trainer import Trainer, TrainingError


def main() -> int:
    end_with_launcher()  # a rank must not outlive `accelerate launch`
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/<name>")
    parser.add_argument("--resume", default=None, help="auto (newest complete checkpoint, if any) or a path")
    args = parser.parse_args()
    cfg = config_from_args(ExperimentConfig, args)
    try:
        # From before the setup: SLURM's time-limit warning (or a preemption) that comes while the
        # run loads data and builds the model is acted on at the first step, not lost.
        with PreemptionHandler() as preemption:
            trainer = Trainer(cfg, args.run_dir or Path("runs") / cfg.name, resume=args.resume,
                              preemption=preemption)
            outcome = trainer.train()
    except (ConfigError, DataError, RunDirError, TrainingError) as err:
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"{kind}: {err}", file=sys.stderr)
        return 2 if isinstance(err, (ConfigError, DataError, RunDirError)) else 1  # RunDirError: busy, bad checkpoint
    trainer.accelerator.print(f"training {outcome} at step {trainer.global_step}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
