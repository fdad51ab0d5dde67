"""Run under `accelerate launch`: stream epochs on every rank and record what each rank saw.

Every step all-reduces a tensor, as a training step would, so a rank that ran out of
batches early would hang the run (and the test's timeout would catch it).
"""

import argparse
import hashlib
import json
from pathlib import Path

import torch
from accelerate import Accelerator

from cmr.config import from_dict
from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.pipeline import DataConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--stop-after", type=int, default=None, help="stop after N batches of the last epoch")
    parser.add_argument("--resume", default=None, help="loader state files prefix")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    cfg = from_dict(DataConfig, {"shards": args.shards, "batch_size": 4, "num_workers": 2,
                                 "shuffle_buffer": 16, "image": {"size": 16}})
    vocab = build_vocabulary(cfg)
    loader = build_loader(cfg, vocab, split="train", mode="train", rank=rank, world_size=world)
    start_epoch = 0
    if args.resume:
        state = json.loads(Path(f"{args.resume}.rank{rank}.json").read_text())
        loader.load_state_dict(state)
        start_epoch = state["epoch"]

    record = {"rank": rank, "world": world, "epochs": {}}
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)
        ids, steps, digest = [], 0, hashlib.sha256()
        for batch in loader:
            digest.update(batch.images.numpy().tobytes())
            digest.update(batch.captions.numpy().tobytes())
            total = torch.tensor([batch.num_samples], dtype=torch.long)
            total = accelerator.reduce(total, reduction="sum")  # a collective every step
            ids.extend(batch.ids)
            steps += 1
            if args.stop_after is not None and epoch == args.epochs - 1 and steps == args.stop_after:
                Path(f"{args.out}.state.rank{rank}.json").write_text(json.dumps(loader.state_dict()))
                break
        record["epochs"][epoch] = {"ids": ids, "steps": steps, "len": len(loader), "sha256": digest.hexdigest()}
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
