"""launch/train.py with a planted fault, for tests under the real `accelerate launch`.

CMR_TEST_FAULT=nan@N[xK]  from optimizer step N on, K micro-batches (default: all) give a nan loss
CMR_TEST_FAULT=die@N      rank 1 kills itself (SIGKILL) when step N begins
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
import train as launch_train  # noqa: E402

from cmr.train import step as step_module  # noqa: E402
from cmr.train import trainer as trainer_module  # noqa: E402

KIND, _, WHEN = os.environ["CMR_TEST_FAULT"].partition("@")
START, _, COUNT = WHEN.partition("x")
START, COUNT = int(START), int(COUNT or 10**9)


class FaultyTrainer(trainer_module.Trainer):
    def train_step(self, batch, wait_s):
        if KIND == "die" and self.global_step == START and self.accelerator.process_index == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().train_step(batch, wait_s)


original = step_module.forward_and_losses
poisoned = 0


def forward_and_losses(*args, **kwargs):
    global poisoned
    total, components = original(*args, **kwargs)
    trainer = FaultyTrainer.current
    if KIND == "nan" and trainer.global_step >= START and poisoned < COUNT:
        poisoned += 1
        total = total * float("nan")
    return total, components


if __name__ == "__main__":
    trainer_module.forward_and_losses = forward_and_losses
    original_init = FaultyTrainer.__init__

    def init(self, *args, **kwargs):
        FaultyTrainer.current = self
        original_init(self, *args, **kwargs)

    FaultyTrainer.__init__ = init
    launch_train.Trainer = FaultyTrainer
    raise SystemExit(launch_train.main())
