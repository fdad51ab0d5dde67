"""Claims the trainer makes, each tested so that a broken version of the feature fails.

- gradient accumulation: k micro-batches step like one batch (SGD, whose step is lr x gradient:
  Adam would hide a wrong gradient scale);
- DeepSpeed ZeRO-1 and ZeRO-2 really run on 2 ranks and train like DDP on the same data;
- wandb: the offline run holds the logged keys and steps, and a resumed run continues it;
- bf16 mixed precision trains, checkpoints and resumes bit for bit;
- evaluation on 2 processes equals 1, with each rank encoding only its share.

Every run goes through the real `accelerate launch` (tests/launch.py) on CPU.
"""

import json
import struct

import pytest
from safetensors.torch import load_file

from tests.launch import REPO, accelerate_launch, deepspeed_env, ok
from tests.test_train import DRIVER, evals, losses, metrics, train_args
from tests.tiny_data import captions_for, sample_files, write_split

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ACCELERATE_DIR = REPO / "configs" / "accelerate"
EVAL_DRIVER = REPO / "tests" / "dist" / "eval_driver.py"
NUM_TEST = 15  # does not divide over 2 ranks: the evaluation pads and masks


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("claims_shards")
    write_split(root, "train", 48, shard_size=6)
    write_split(root, "val", 12, shard_size=6)
    write_split(root, "test", NUM_TEST, shard_size=5)
    return root


def rank_reports(run_dir, world=2):
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(world)]


def parameters(checkpoint_dir):
    """The model's parameters in a checkpoint (BatchNorm running statistics left out)."""
    state = load_file(str(checkpoint_dir / "model.safetensors"))
    return {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# -- 1. gradient accumulation ----------------------------------------------------------------
#
# One batch of 2b is no reference for the triplet and imagine-matching terms: their negatives
# are the other pairs of the batch, so a batch of 2b has 2b-1 of them and a micro-batch b-1.
# A reference exact in principle: make the k=2 micro-batches of each step identical copies
# of one micro-batch m. Sum-reduced terms (reduction: sum, the default) count every pair of
# the k*b, so the step's gradient is 2 x S(m) for them and 1 x M(m) for the mean-reduced
# terms (caption_xe, the adversarial BCEs). One batch m at twice the lr, with the mean terms'
# weights halved, takes the same SGD step: 2 lr (S + M/2) = lr (2S + M). A missing 1/k
# correction (or a double one) changes the sum terms' share by a factor of 2.
ACCUMULATION_B = 4
JOINT = "{{name: joint, epochs: 1, train: [all], lr: {lr}, losses: {{triplet: 1, imagine_match: 1, caption_xe: {xe}, modality_adv: {adv}, imagine_adv: {adv}}}}}"
# Nothing random between the two runs: no shuffling, a full-image crop of the 40x32 images, no
# flip, one caption per sample, no dropout (the default), no SCST sampling, no clipping (which
# would rescale the gradient and hide its scale), and eval-free.
EXACT = ["data.shuffle_shards=false", "data.shuffle_buffer=0", "data.num_workers=0",
         f"data.batch_size={ACCUMULATION_B}",
         "data.image={size: 16, resize_ratio: 1.0, hflip: 0.0, scale: [1.0, 1.0], ratio: [1.25, 1.25]}",
         "train.optimizer={name: sgd, grad_clip: 0}", "eval.every_n_epochs=0", "train.logging.wandb=false",
         "train.max_steps=3", "train.checkpoint.every_n_steps=1"]


def one_caption(index):
    files = sample_files(index, "image", 8)
    meta = json.loads(files["json"])
    files["json"] = json.dumps({**meta, "captions": captions_for(index)[:1]}).encode()
    return files


@pytest.fixture(scope="module")
def paired_shards(tmp_path_factory):
    """unique: 24 samples, blocks u0..u5 of b; twice: each block twice, u0 u0 u1 u1 ... u5 u5,
    so the b-sample micro-batches of one accumulation window are copies of one another.
    Ranks read contiguous halves, so rank r of both sees the same blocks."""
    root = tmp_path_factory.mktemp("paired")
    b = ACCUMULATION_B
    write_split(root / "unique", "train", 24, shard_size=6, overrides={i: one_caption(i) for i in range(24)})
    twice = {i: one_caption((i // (2 * b)) * b + i % b) for i in range(48)}
    write_split(root / "twice", "train", 48, shard_size=6, overrides=twice)
    return root


def test_accumulated_micro_batches_step_like_one_batch_with_sgd(paired_shards, tmp_path):
    accumulated, single = tmp_path / "accumulated", tmp_path / "single"
    ok(accelerate_launch(DRIVER, *train_args(paired_shards / "twice", accumulated, *EXACT,
                                             "train.gradient_accumulation_steps=2",
                                             "train.stages=[" + JOINT.format(lr=0.0625, xe=1, adv=0.5) + "]")))
    ok(accelerate_launch(DRIVER, *train_args(paired_shards / "unique", single, *EXACT,
                                             "train.stages=[" + JOINT.format(lr=0.125, xe=0.5, adv=0.25) + "]")))
    # The premise: one vocabulary (so one initialisation) and the same blocks on each rank.
    assert (accumulated / "vocab.json").read_text() == (single / "vocab.json").read_text()
    a = parameters(accumulated / "checkpoints" / "step-00000003")
    b = parameters(single / "checkpoints" / "step-00000003")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    # Bitwise equal here (every scale is a power of 2); the tolerance allows float32 sums in
    # another order. A factor 2 on the sum terms moves the parameters by ~0.3.
    assert worst <= 1e-6, f"parameters differ by up to {worst}"
    names = ("loss/triplet", "loss/imagine_match", "loss/caption_xe", "loss/modality_adv")
    la = [r[k] for r in metrics(accumulated) for k in names]
    lb = [r[k] for r in metrics(single) for k in names]
    assert [r["step"] for r in metrics(accumulated)] == [1, 2, 3]
    assert la == pytest.approx(lb, rel=1e-5)
    # The tolerance is small against the steps themselves.
    first = parameters(accumulated / "checkpoints" / "step-00000001")
    moved = max((a[k] - first[k]).abs().max().item() for k in a)
    assert moved > 1e4 * 1e-6, f"two SGD steps moved the parameters by only {moved}"
