"""One rank of the launch-config tests (tests/test_launch_configs.py starts it through
``accelerate launch --config_file configs/accelerate/<cpu yaml>``).

Takes one optimizer step of a tiny model on data that differs per rank and writes what this
rank saw (process, process group, wrapper, DeepSpeed settings, parameters after the step) to
``<out>/rank<R>.json`` for the parent to compare across ranks.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from cmr.train.parallel import skip_deepspeed_cpu_shm_op

MICRO_BATCH = 4
GRAD_CLIP = 2.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    # Without an explicit backend, DeepSpeed on CPU leaves every rank alone (world size 1).
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    skip_deepspeed_cpu_shm_op()  # as the trainer does: no ~40 s JIT build of an op gloo replaces
    accelerator = Accelerator(kwargs_handlers=handlers)
    rank = accelerator.process_index
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_deepspeed:
        # The JSON says "auto" for these; accelerate fills them only from a DataLoader passed to
        # prepare() (the project's streaming loader is not one) and with a fixed clip of 1.0.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = MICRO_BATCH
        ds_config["gradient_clipping"] = GRAD_CLIP

    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)

    inputs = torch.randn(MICRO_BATCH, 3, generator=torch.Generator().manual_seed(100 + rank))
    # DeepSpeed in bf16 keeps the module's weights in bf16 and does not autocast: float inputs
    # must be cast to the weights' dtype (accelerate's autocast covers only the DDP case).
    weight_dtype = next(model.parameters()).dtype
    inputs = inputs.to(accelerator.device, dtype=weight_dtype)
    accelerator.backward(model(inputs).float().pow(2).mean())
    optimizer.step()
    optimizer.zero_grad()

    # Each rank contributes its own rank id: the sum is 0 + 1 = 1 only in one 2-rank group.
    rank_ids = torch.tensor([float(rank)], device=accelerator.device)
    rank_sum = accelerator.reduce(rank_ids, reduction="sum").item()
    unwrapped = accelerator.unwrap_model(model)
    record = {
        "rank": rank,
        "world_size": accelerator.num_processes,
        "pid": os.getpid(),
        "distributed_type": str(accelerator.distributed_type.value),
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "rank_sum": rank_sum,
        "wrapper": type(model).__name__,
        "device": str(accelerator.device),
        "params": [p.detach().float().flatten().tolist() for p in unwrapped.parameters()],
    }
    if is_deepspeed:
        record.update(
            zero_stage=model.zero_optimization_stage(),
            gradient_clipping=model.gradient_clipping(),
            train_batch_size=model.train_batch_size(),
            optimizer=type(model.optimizer).__name__,
            bf16=model.bfloat16_enabled(),
        )
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
