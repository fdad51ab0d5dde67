"""Where a global optimizer step falls in the stage schedule, and its learning rate.

Pure functions of the step (as open_clip's schedules are), so resuming needs nothing but
the step: there is no scheduler state to save or to get out of sync.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math

from cmr.train.config import StageConfig


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """The schedule laid out in optimizer steps, given the steps in one epoch."""

    stages: tuple[StageConfig, ...]
    steps_per_epoch: int

    @property
    def epoch_starts(self) -> list[int]:
        """First global epoch of each stage, plus the total number of epochs at the end."""
        return [0, *itertools.accumulate(s.epochs for s in self.stages)]

    @property
    def total_steps(self) -> int:
        return self.epoch_starts[-1] * self.steps_per_epoch

    def stage_index_of_epoch(self, epoch: int) -> int:
        starts = self.epoch_starts
        index = bisect.bisect_right(starts, epoch) - 1
        # Skip stages with zero epochs: the epoch belongs to the next stage that has any.
        while index < len(self.stages) - 1 and self.stages[index].epochs == 0:
            index += 1
        return min(index, len(self.stages) - 1)

    def stage_index_of_step(self, step: int) -> int:
        return self.stage_index_of_epoch(step // self.steps_per_epoch)

    def lr_at(self, step: int) -> float:
        """Learning rate for the optimizer step taken after ``step`` completed steps."""
        index = self.stage_index_of_step(step)
        stage = self.stages[index]
        start = self.epoch_starts[index] * self.steps_per_epoch
        return stage_lr(stage, step - start, stage.epochs * self.steps_per_epoch)


def stage_lr(stage: StageConfig, step_in_stage: int, stage_steps: int) -> float:
    """Warm-up, then constant / cosine / step decay, all indexed by the step within the stage."""
    if stage.warmup_steps and step_in_stage < stage.warmup_steps:
        return stage.lr * (step_in_stage + 1) / stage.warmup_steps
    if stage.schedule == "cosine":
        span = max(1, stage_steps - stage.warmup_steps)
        progress = min(1.0, (step_in_stage - stage.warmup_steps) / span)
        floor = stage.lr * stage.min_lr_ratio
        return floor + (stage.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if stage.schedule == "step":
        return stage.lr * stage.decay_gamma ** ((step_in_stage - stage.warmup_steps) // stage.decay_every_steps)
    return stage.lr
