"""Logging: accelerate's trackers (wandb), ``metrics.jsonl`` in the run dir, a progress bar.

Ranks accumulate their numbers between log steps; at a log step (the same step on every
rank) they are averaged or summed over ranks with two collectives, and the main process
writes them. Nothing else here talks to other processes.
"""

from __future__ import annotations

import math
import netrc
import os
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from cmr.run_dir import RunDir
from cmr.train.config import LoggingConfig


def wandb_mode(cfg: LoggingConfig) -> str:
    """offline unless asked otherwise or the user is logged in (then online)."""
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class MetricsLogger:
    def __init__(self, accelerator: Accelerator, run_dir: RunDir | Path, cfg: LoggingConfig):
        self.accelerator, self.cfg = accelerator, cfg
        self.run = RunDir.of(run_dir)
        self.sums: Counter = Counter()  # loss components etc., summed since the last log
        self.counts: Counter = Counter()  # how many micro-batches each sum holds
        self.num_steps = 0
        self.num_samples = 0
        self.data_wait_s = 0.0
        self.last_time = time.perf_counter()
        self.bar = None

    def start_progress(self, total: int, initial: int) -> None:
        if self.cfg.progress_bar and self.accelerator.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def record(self, values: dict[str, float], num_samples: int, data_wait_s: float, end_of_step: bool) -> None:
        """One micro-batch's numbers on this rank (logged values are means over micro-batches)."""
        for key, value in values.items():
            self.sums[key] += value
            self.counts[key] += 1
        self.num_samples += num_samples
        self.data_wait_s += data_wait_s
        self.num_steps += int(end_of_step)
        if self.bar is not None and end_of_step:
            self.bar.update(1)
            if "loss/total" in values:
                self.bar.set_postfix(loss=f"{values['loss/total']:.4f}", refresh=False)

    def state_dict(self) -> dict:
        """What a resumed run needs to log the same numbers as an uninterrupted one."""
        return {"sums": dict(self.sums), "counts": dict(self.counts), "num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.sums = Counter(state.get("sums", {}))
        self.counts = Counter(state.get("counts", {}))
        self.num_steps = state.get("num_steps", 0)

    def log(self, step: int, context: dict, skip_counts: Counter, extra: dict[str, float]) -> dict | None:
        """Reduce over ranks and write; returns the logged record on the main process."""
        # Every rank must reduce the same keys in the same order: gather the key sets first
        # (a rank whose every micro-batch was skipped has none).
        keys = sorted({k for names in gather_object([sorted(self.sums)]) for k in names})
        local = torch.tensor([self.sums[k] for k in keys] + [self.counts[k] for k in keys]
                             + [self.num_samples, self.data_wait_s, self.num_steps],
                             dtype=torch.float64, device=self.accelerator.device)
        total = self.accelerator.reduce(local, reduction="sum")
        n = len(keys)
        skips = Counter()
        for counts in gather_object([dict(skip_counts)]):
            skips.update(counts)
        world = self.accelerator.num_processes
        elapsed = max(time.perf_counter() - self.last_time, 1e-9)
        steps = max(total[-1].item(), 1.0)  # summed over ranks
        record = {"step": step, **context}
        record.update({k: total[i].item() / max(total[n + i].item(), 1.0) for i, k in enumerate(keys)})
        record.update(extra)
        record["samples_per_s"] = total[-3].item() / elapsed
        record["samples_per_s_per_device"] = record["samples_per_s"] / world
        record["data_wait_s_per_step"] = total[-2].item() / steps
        record.update({f"skipped/{k}": v for k, v in sorted(skips.items())})
        self.sums.clear()
        self.counts.clear()
        self.num_steps = self.num_samples = 0
        self.data_wait_s = 0.0
        self.last_time = time.perf_counter()
        if not self.accelerator.is_main_process:
            return None
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.run.append_metrics(record)
        self.accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        return record

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
