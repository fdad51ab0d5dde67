"""One rank of the launcher-level preemption test (tests/test_preemption.py).

Checks ``any_rank`` on a real process group, then "trains" (a sleep and an all-reduce per step)
under ``PreemptionHandler`` until the ranks agree that a signal came; then does what the
trainer does at that point, minus the checkpoint: barrier, rank 0 requeues, everyone exits 0.
Files in ``--out``: ``ready.rank<R>`` once the handler is installed (the parent signals only
after both exist), ``rank<R>.json`` with what this rank saw.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from cmr.train.preemption import PreemptionHandler, any_rank, requeue_slurm_job

STEP_SECONDS = 0.02


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    out = Path(args.out)

    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    accelerator = Accelerator(kwargs_handlers=handlers)
    rank = accelerator.process_index
    record = {
        "rank": rank,
        "world_size": accelerator.num_processes,
        "pid": os.getpid(),
        "any_rank_none": any_rank(False, accelerator),
        "any_rank_only_rank1": any_rank(rank == 1, accelerator),
    }

    with PreemptionHandler() as preemption:
        (out / f"ready.rank{rank}").write_text(str(os.getpid()))
        deadline = time.monotonic() + args.max_seconds
        step = 0
        while not any_rank(preemption.requested, accelerator):
            if time.monotonic() > deadline:
                sys.exit(f"rank {rank}: no preemption signal within {args.max_seconds} s")
            time.sleep(STEP_SECONDS)
            step += 1
        record.update(steps=step, requested=preemption.requested,
                      signal_name=preemption.signal_name)
        accelerator.wait_for_everyone()  # the trainer's collective checkpoint goes here
        if accelerator.is_main_process:
            record["requeue"] = requeue_slurm_job()

    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
