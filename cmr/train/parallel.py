"""Everything about processes and devices, in one place: the Accelerator and what it wraps.

The model stays a plain ``nn.Module``; DDP or DeepSpeed ZeRO-1/2 (chosen by
``accelerate launch``) wrap it here. One model and one optimizer hold every part: the
gradient reversal layers let the discriminators and the encoders share a single backward
pass and a single optimizer step, which is what DeepSpeed needs.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs

from cmr.config import ConfigError
from cmr.dist import backend, cpu_requested, truthy
from cmr.train.config import OptimizerConfig, TrainConfig


def skip_deepspeed_cpu_shm_op() -> None:
    """DeepSpeed on CPU JIT-compiles a shared-memory all-reduce op (~70 s) at start-up;
    plain gloo does the job for CPU runs. CMR_DEEPSPEED_SHM_COMM=1 keeps the op."""
    if truthy("ACCELERATE_USE_DEEPSPEED") and not torch.cuda.is_available() and not truthy("CMR_DEEPSPEED_SHM_COMM"):
        import deepspeed.ops

        # DeepSpeed probes op compatibility once and keeps the dict: a False here skips the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_accelerator(cfg: TrainConfig, run_dir: Path, log_with: str | None) -> Accelerator:
    skip_deepspeed_cpu_shm_op()
    timeout = datetime.timedelta(seconds=cfg.collective_timeout_s)
    handlers = [
        InitProcessGroupKwargs(backend=backend(), timeout=timeout),  # gloo on CPU (cmr.dist)
        # Stages switch parts of the model off; DDP must not wait for their gradients.
        DistributedDataParallelKwargs(find_unused_parameters=True),
    ]
    mixed_precision = None if cfg.mixed_precision == "auto" else cfg.mixed_precision
    return Accelerator(
        cpu=cpu_requested(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=log_with,
        project_dir=str(run_dir),
        kwargs_handlers=handlers,
    )


def match_buffers_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``model``'s floating-point buffers (BatchNorm's running mean and variance) to
    ``dtype``. DeepSpeed's bf16/fp16 casts the parameters only, and batch_norm refuses bf16
    weights beside float32 running statistics ("expected scalar type BFloat16 but found Float")."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and buffer.dtype != dtype:
                setattr(module, name, buffer.to(dtype))


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def check_launch(accelerator: Accelerator, cfg: TrainConfig, batch_size: int) -> None:
    """Launcher/config combinations that cannot work, caught before any training."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # accelerate would quietly train in float32 with no loss scaling: say so instead.
        raise ConfigError("train.mixed_precision", "fp16 needs a GPU (on CPU accelerate runs it as float32 "
                          "without loss scaling); use bf16 or no (--mixed_precision or train.mixed_precision)")
    if not uses_deepspeed(accelerator):
        return
    plugin = accelerator.state.deepspeed_plugin
    stage = plugin.zero_stage
    if stage not in (0, 1, 2):
        raise ConfigError("deepspeed zero_stage", f"ZeRO-{stage} is not supported; use ZeRO-1 or ZeRO-2")
    ds = plugin.deepspeed_config
    gas = ds.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", cfg.gradient_accumulation_steps):
        raise ConfigError(
            "train.gradient_accumulation_steps",
            f"is {cfg.gradient_accumulation_steps} but the DeepSpeed config says {gas}; set it to \"auto\"",
        )
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(
                f"deepspeed {section}",
                "remove it from the DeepSpeed JSON: cmr passes a torch optimizer and its own step-indexed lr",
            )
    # No dataloader goes through prepare (the loader splits by rank itself), so accelerate
    # cannot infer the micro-batch size DeepSpeed asks for.
    ds["train_micro_batch_size_per_gpu"] = batch_size
    ds["train_batch_size"] = batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = cfg.optimizer.grad_clip


def build_optimizer(model: torch.nn.Module, groups: dict[str, list], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """One optimizer, one parameter group per model part (named, so stages can set its lr)."""
    param_groups = [{"params": params, "name": name, "lr": 0.0} for name, params in groups.items()]
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=0.0, momentum=0.0, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(param_groups, lr=0.0, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
