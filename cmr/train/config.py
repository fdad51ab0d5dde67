"""The training section of a run config: stages, optimizer, precision, logging, safety nets."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from cmr.config import ConfigError
from cmr.losses.total import WEIGHT_NAMES


# Configures cmr.train.checkpoint.Checkpointer; it lives here so that reading a run's config
# (evaluation, search, export) does not import the checkpointer and accelerate.
@dataclasses.dataclass
class CheckpointConfig:
    every_n_steps: int = 500  # 0 = only at stage ends, preemption and the end of training
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted

    def validate(self) -> None:
        if self.every_n_steps < 0:
            raise ConfigError(
                "every_n_steps", f"must be >= 0 (0 = only at stage ends), got {self.every_n_steps}"
            )
        if self.keep_last < 1:
            raise ConfigError("keep_last", f"must be >= 1, got {self.keep_last}")


# Short names a stage may use for sets of the model's parameter groups.
GROUP_ALIASES = {
    "encoders": ("image_backbone", "image_head", "text_encoder"),
    "discriminators": ("modality_disc", "imagine_disc", "generator"),
    "all": (
        "image_backbone", "image_head", "text_encoder",
        "modality_disc", "generator", "imagine_disc", "decoder",
    ),
}
MODEL_GROUPS = GROUP_ALIASES["all"]


@dataclasses.dataclass
class StageConfig:
    """One stage of the schedule: what trains, with which losses, at which learning rate."""

    name: str
    epochs: int
    train: list[str]  # parameter groups (or aliases: encoders, discriminators, all); the rest is frozen
    losses: dict[str, float]  # active loss terms and their weights; unlisted terms are off
    lr: float = 1e-4
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = 0  # linear warm-up from 0 at the start of the stage
    min_lr_ratio: float = 0.0  # cosine: final lr = lr * min_lr_ratio
    decay_every_steps: int = 0  # step: multiply by decay_gamma every this many steps
    decay_gamma: float = 0.1
    sample_temperature: float = 1.0  # SCST sampling temperature
    # Hardest negative only (VSE++) or the sum over negatives, for this stage; null = loss.max_violation.
    # From scratch, hardest negatives tend to collapse the space: warm up with the sum first.
    max_violation: bool | None = None

    def validate(self) -> None:
        if self.epochs < 0:
            raise ConfigError("epochs", f"must be >= 0, got {self.epochs}")
        for name in self.train:
            if name not in MODEL_GROUPS and name not in GROUP_ALIASES:
                known = ", ".join([*GROUP_ALIASES, *MODEL_GROUPS])
                raise ConfigError("train", f"unknown parameter group {name!r} (known: {known})")
        if not self.losses:
            raise ConfigError("losses", "a stage needs at least one active loss")
        for name, weight in self.losses.items():
            if name not in WEIGHT_NAMES:
                raise ConfigError(f"losses.{name}", f"unknown loss (known: {', '.join(WEIGHT_NAMES)})")
            if not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"losses.{name}", f"must be a finite number >= 0, got {weight}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule == "step" and self.decay_every_steps < 1:
            raise ConfigError("decay_every_steps", "must be >= 1 with schedule: step")
        if not self.sample_temperature > 0:
            raise ConfigError("sample_temperature", f"must be > 0, got {self.sample_temperature}")

    @property
    def groups(self) -> set[str]:
        return {g for name in self.train for g in GROUP_ALIASES.get(name, (name,))}


def tutorial_stages() -> list[StageConfig]:
    """The tutorial's schedule: encoders -> discriminators (encoders frozen) -> everything."""
    return [
        StageConfig("encoders", 50, ["encoders", "decoder"], {"triplet": 1.0, "caption_xe": 1.0}),
        StageConfig(
            "discriminators", 20, ["discriminators"],
            {"modality_adv": 0.5, "imagine_adv": 0.5, "imagine_match": 1.0},
        ),
        StageConfig(
            "joint", 100, ["all"],
            {"triplet": 1.0, "modality_adv": 0.5, "imagine_adv": 0.5, "imagine_match": 1.0,
             "caption_xe": 1.0, "scst": 1.0},
        ),
    ]


@dataclasses.dataclass
class OptimizerConfig:
    # sgd: plain SGD without momentum, whose step is lr x gradient; betas and eps are Adam's.
    name: Literal["adam", "adamw", "sgd"] = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 2.0  # max global grad norm (VSE++ uses 2.0); 0 = no clipping

    def validate(self) -> None:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", f"each must be in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ConfigError("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ConfigError("grad_clip", f"must be >= 0, got {self.grad_clip}")


@dataclasses.dataclass
class LoggingConfig:
    every_n_steps: int = 10
    wandb: bool = True
    wandb_project: str = "cmr"
    # auto: online when the user is logged in (WANDB_API_KEY or a netrc entry), else offline.
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    progress_bar: bool = True

    def validate(self) -> None:
        if self.every_n_steps < 1:
            raise ConfigError("every_n_steps", f"must be >= 1, got {self.every_n_steps}")


@dataclasses.dataclass
class TrainConfig:
    stages: list[StageConfig] = dataclasses.field(default_factory=tutorial_stages)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    gradient_accumulation_steps: int = 1
    # "auto" leaves it to `accelerate launch --mixed_precision` / the accelerate YAML.
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    max_consecutive_nonfinite: int = 5  # stop after this many non-finite losses in a row
    collective_timeout_s: float = 600.0  # a dead or stuck rank fails the others after this long
    max_steps: int = 0  # stop after this many optimizer steps (0 = run every stage); for smoke tests

    def validate(self) -> None:
        if not self.stages:
            raise ConfigError("stages", "needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError("stages", f"stage names must be unique, got {names}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError("gradient_accumulation_steps", f"must be >= 1, got {self.gradient_accumulation_steps}")
        if self.max_consecutive_nonfinite < 1:
            raise ConfigError("max_consecutive_nonfinite", f"must be >= 1, got {self.max_consecutive_nonfinite}")
        if not self.collective_timeout_s > 0:
            raise ConfigError("collective_timeout_s", f"must be > 0, got {self.collective_timeout_s}")
        if self.max_steps < 0:
            raise ConfigError("max_steps", f"must be >= 0, got {self.max_steps}")

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)
