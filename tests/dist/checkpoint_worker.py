"""Run under `accelerate launch` (or plain python for one process): exercise the Checkpointer.

``roundtrip`` (DDP or DeepSpeed, any number of ranks; ``--gpu``: one process on a GPU, run
by hand where there is one): train two steps, save, note what the
next step and the next random numbers are, wander off (more steps, more random numbers),
load, and check that everything comes back: parameters, the next step (optimizer and
scheduler state), the RNG, this rank's trainer state and the stored vocabulary. Each rank
writes what it found to ``--out``.rank{R}.json for the test to assert on.

``save-loop`` (one process): resume from the newest checkpoint, then save a big-ish state
over and over, printing ``saved N`` after each, until the test kills it with SIGKILL.
"""

import argparse
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `cmr`

from cmr.train.checkpoint import CheckpointConfig, Checkpointer  # noqa: E402
from cmr.train.parallel import skip_deepspeed_cpu_shm_op  # noqa: E402

VOCAB_TEXT = '{"<pad>": 0, "<unk>": 1, "cat": 2}'


def build_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if args.gpu:  # one process on a GPU (a manual check on a machine that has one)
        return Accelerator()
    gloo = [InitProcessGroupKwargs(backend="gloo")]
    if args.deepspeed:
        # cpu=True would quietly turn DeepSpeed off; DS_ACCELERATOR=cpu keeps it on CPU.
        skip_deepspeed_cpu_shm_op()
        return Accelerator(kwargs_handlers=gloo)
    return Accelerator(cpu=True, kwargs_handlers=gloo)


def build_training(accelerator, seed: int, in_features: int, out_features: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(in_features, out_features)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    # A decaying lr, so a scheduler that was not restored changes the next step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:  # no dataloader goes through prepare, so say the micro-batch size
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 4
        plugin.deepspeed_config["train_batch_size"] = 4 * accelerator.num_processes
    return accelerator.prepare(model, optimizer, scheduler)


def train_step(accelerator, model, optimizer, scheduler, step: int) -> None:
    rank = accelerator.process_index
    generator = torch.Generator().manual_seed(1000 * step + rank)  # fixed, rank-specific data
    inputs = torch.randn(4, model_in_features(accelerator, model), generator=generator)
    inputs = inputs.to(accelerator.device)
    loss = model(inputs).pow(2).mean()
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def model_in_features(accelerator, model) -> int:
    return accelerator.unwrap_model(model).in_features


def params_of(accelerator, model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def draw_random() -> list:
    drawn = [torch.rand(3).tolist(), float(np.random.rand()), random.random()]
    if torch.cuda.is_available():
        drawn.append(torch.rand(3, device="cuda").tolist())
    return drawn


def roundtrip(args) -> None:
    accelerator = build_accelerator(args)
    rank = accelerator.process_index
    model, optimizer, scheduler = build_training(accelerator, seed=0, in_features=4, out_features=3)
    checkpointer = Checkpointer(accelerator, args.run_dir, CheckpointConfig(keep_last=2))
    for step in (1, 2):
        train_step(accelerator, model, optimizer, scheduler, step)
    state = {"step": 2, "epoch": 0, "rank": rank,
             "data_position": {"windows_done": [rank, 3 + rank]}}
    path = checkpointer.save(2, state, files={"vocab.json": VOCAB_TEXT})
    saved_params = params_of(accelerator, model)
    expected_random = draw_random()
    train_step(accelerator, model, optimizer, scheduler, 3)
    expected_next = params_of(accelerator, model)

    for step in (4, 5):  # wander off: the load must undo all of this
        train_step(accelerator, model, optimizer, scheduler, step)
    draw_random()

    loaded_state = checkpointer.load(checkpointer.resolve("auto"))
    result = {
        "rank": rank,
        "world_size": accelerator.num_processes,
        "path": str(path),
        "state_back": loaded_state,
        "device": str(accelerator.device),
        "params_restored": same(params_of(accelerator, model), saved_params),
        "rng_restored": draw_random() == expected_random,
        "vocab": checkpointer.read_file(path, "vocab.json"),
    }
    train_step(accelerator, model, optimizer, scheduler, 3)
    result["next_step_equal"] = same(params_of(accelerator, model), expected_next)
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


def save_loop(args) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # one plain process, no launcher
    model, optimizer, scheduler = build_training(accelerator, 0, 1024, 1024)
    checkpointer = Checkpointer(accelerator, args.run_dir, CheckpointConfig(keep_last=2))
    resume = checkpointer.resolve("auto")
    step = checkpointer.load(resume)["step"] if resume is not None else 0
    while True:
        step += 1
        train_step(accelerator, model, optimizer, scheduler, step)
        with torch.no_grad():  # parameters that say which step they belong to
            for param in model.parameters():
                param.fill_(float(step))
        checkpointer.save(step, {"step": step}, files={"vocab.json": VOCAB_TEXT})
        print(f"saved {step}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["roundtrip", "save-loop"])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", default=None)
    parser.add_argument("--deepspeed", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.mode == "roundtrip":
        roundtrip(args)
    else:
        save_loop(args)


if __name__ == "__main__":
    main()
