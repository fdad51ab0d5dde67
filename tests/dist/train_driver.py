"""launch/train.py plus a per-rank report, for tests run under the real `accelerate launch`.

After training, every rank writes RUN_DIR/rank{R}.json: its rank and world size as the
process group sees them, the distributed type, and a hash of its model parameters (equal
hashes on every rank = the replicas really stayed in sync).
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


class ReportingTrainer(trainer_module.Trainer):
    def _run_epochs(self):
        # Report before train() ends the run: end_training() destroys the process group.
        outcome = super()._run_epochs()
        model = self.accelerator.unwrap_model(self.model)
        digest, buffers = hashlib.sha256(), hashlib.sha256()
        for name, tensor in sorted(model.named_parameters()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        for name, tensor in sorted(model.named_buffers()):
            buffers.update(name.encode())
            buffers.update(tensor.detach().cpu().contiguous().numpy().tobytes())
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
        }
        (self.run_dir / f"rank{report['process_index']}.json").write_text(json.dumps(report))
        return outcome


if __name__ == "__main__":
    launch_train.Trainer = ReportingTrainer
    raise SystemExit(launch_train.main())
