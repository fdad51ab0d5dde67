"""launch/train.py plus a per-rank report, for tests run under the real `accelerate launch`.

After training, every rank writes RUN_DIR/rank{R}.json: its rank and world size as the
process group sees them, the distributed type, and a hash of its model parameters (equal
hashes on every rank = the replicas really stayed in sync), a hash of the sample keys of the
first batch it trained on (different on every rank = each rank read its own data), and how
many images it encoded in evaluations (about 1/N of the split each = the work was split).
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
import train as launch_train  # noqa: E402

from cmr.train import trainer as trainer_module  # noqa: E402
from tests.dist.embed_counter import embed_counter  # noqa: E402


def raw_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's memory as bytes, any dtype (numpy has no bfloat16)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class ReportingTrainer(trainer_module.Trainer):
    first_batch_keys_sha256 = None
    linear_output_dtypes = frozenset()  # what the Linear layers really computed in (bf16 under autocast)

    def train_step(self, batch, wait_s):
        if self.first_batch_keys_sha256 is not None:
            return super().train_step(batch, wait_s)
        self.first_batch_keys_sha256 = hashlib.sha256("\n".join(batch.keys).encode()).hexdigest()
        self.linear_output_dtypes = set()
        hooks = [m.register_forward_hook(lambda module, args, out: self.linear_output_dtypes.add(str(out.dtype)))
                 for m in self.raw_model.modules() if isinstance(m, torch.nn.Linear)]
        try:
            return super().train_step(batch, wait_s)
        finally:
            for hook in hooks:
                hook.remove()

    def _run_epochs(self):
        # Report before train() ends the run: end_training() destroys the process group.
        outcome = super()._run_epochs()
        model = self.accelerator.unwrap_model(self.model)
        digest, buffers = hashlib.sha256(), hashlib.sha256()
        for name, tensor in sorted(model.named_parameters()):
            digest.update(name.encode())
            digest.update(raw_bytes(tensor))
        for name, tensor in sorted(model.named_buffers()):
            buffers.update(name.encode())
            buffers.update(raw_bytes(tensor))
        report = {
            "rank": dist.get_rank() if dist.is_initialized() else 0,
            "world": dist.get_world_size() if dist.is_initialized() else 1,
            "process_index": self.accelerator.process_index,
            "distributed_type": str(self.accelerator.distributed_type),
            "params_sha256": digest.hexdigest(),
            "buffers_sha256": buffers.hexdigest(),
            "outcome": outcome,
            "global_step": self.global_step,
            "num_threads": torch.get_num_threads(),
            "first_batch_keys_sha256": self.first_batch_keys_sha256,
            "eval_images_encoded": embed_counter.num_images,
            "mixed_precision": str(self.accelerator.mixed_precision),
            "linear_output_dtypes": sorted(self.linear_output_dtypes),
        }
        (self.run_dir / f"rank{report['process_index']}.json").write_text(json.dumps(report))
        return outcome


if __name__ == "__main__":
    launch_train.Trainer = ReportingTrainer
    raise SystemExit(launch_train.main())
