"""Claims the trainer makes, each tested so that a broken version of the feature fails.

- gradient accumulation: k micro-batches step like one batch (SGD, whose step is lr x gradient:
  Adam would hide a wrong gradient scale);
- DeepSpeed ZeRO-1 and ZeRO-2 really run on 2 ranks and train like DDP on the same data, and
  ZeRO-2 in bf16 trains a model with BatchNorm and resumes bit for bit;
- wandb: the offline run holds the logged keys and steps, and a resumed run continues it;
- bf16 mixed precision trains, checkpoints and resumes bit for bit;
- evaluation on 2 processes equals 1, with each rank encoding only its share.

Every run goes through the real `accelerate launch` (tests/launch.py) on CPU.
"""

import json
import shutil
import struct

import pytest
from safetensors.torch import load_file

from tests.launch import REPO, accelerate_launch, deepspeed_env, ok
from tests.test_train import DRIVER, evals, losses, metrics, train_args
from tests.tiny_data import captions_for, sample_files, train_val_shards, write_split

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ACCELERATE_DIR = REPO / "configs" / "accelerate"
EVAL_DRIVER = REPO / "tests" / "dist" / "eval_driver.py"
NUM_TEST = 15  # does not divide over 2 ranks: the evaluation pads and masks


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = train_val_shards(tmp_path_factory.mktemp("claims_shards"))
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
# The joint stage, all groups trained, every loss but SCST (whose sampling is random).
JOINT = ("train.stages=[{{name: joint, epochs: 1, train: [all], lr: {lr}, losses: {{triplet: 1, "
         "imagine_match: 1, caption_xe: {xe}, modality_adv: {adv}, imagine_adv: {adv}}}}}]")
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
                                             JOINT.format(lr=0.0625, xe=1, adv=0.5))))
    ok(accelerate_launch(DRIVER, *train_args(paired_shards / "unique", single, *EXACT,
                                             JOINT.format(lr=0.125, xe=0.5, adv=0.25))))
    # The premise: one vocabulary, so one initialisation of the model.
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


# -- 2. DeepSpeed ZeRO-1/2 against DDP on the same data -------------------------------------

ENGINES = {"ddp": None, "zero1": "cpu_deepspeed_zero1.yaml", "zero2": "cpu_deepspeed_zero2.yaml"}


@pytest.fixture(scope="module")
def engine_runs(shards, tmp_path_factory):
    """4 steps of the tiny config (Adam, an evaluation after epoch 1 at step 3) under DDP,
    ZeRO-1 and ZeRO-2, 2 processes each, same seed and data."""
    root = tmp_path_factory.mktemp("engines")
    for name, yaml in ENGINES.items():
        args = train_args(shards, root / name, "train.max_steps=4", "train.logging.wandb=false")
        if yaml is None:
            ok(accelerate_launch(DRIVER, *args))
        else:
            ok(accelerate_launch(DRIVER, *args, env=deepspeed_env(), config_file=ACCELERATE_DIR / yaml))
    return {name: root / name for name in ENGINES}


def test_zero1_and_zero2_run_two_real_ranks_and_train_like_ddp(engine_runs):
    expected_type = {"ddp": "DistributedType.MULTI_CPU", "zero1": "DistributedType.DEEPSPEED",
                     "zero2": "DistributedType.DEEPSPEED"}
    batches = {}
    for name, run in engine_runs.items():
        reports = rank_reports(run)
        assert [r["process_index"] for r in reports] == [0, 1] and [r["rank"] for r in reports] == [0, 1]
        assert {r["world"] for r in reports} == {2}
        assert {r["distributed_type"] for r in reports} == {expected_type[name]}
        # Each rank trained on its own batches, and the replicas still ended equal.
        assert reports[0]["first_batch_keys_sha256"] != reports[1]["first_batch_keys_sha256"]
        assert len({r["params_sha256"] for r in reports}) == 1
        batches[name] = [r["first_batch_keys_sha256"] for r in reports]
    assert batches["zero1"] == batches["ddp"] and batches["zero2"] == batches["ddp"]  # the same data
    ddp = losses(metrics(engine_runs["ddp"]))
    assert [r["step"] for r in ddp] == [1, 2, 3, 4]
    for name in ("zero1", "zero2"):
        other = losses(metrics(engine_runs[name]))
        assert [r["step"] for r in other] == [1, 2, 3, 4]
        # Step 1 computes on the same initial weights: equal. Later steps differ only by float32
        # rounding: the ZeRO engines reduce (-scatter) gradients in flat fp32 buckets and clip
        # with their own norm, DDP all-reduces per bucket. Measured: 1.0e-7 relative for both
        # stages; 1e-5 leaves 100x room, and ZeRO without the gradient clipping DDP applies
        # (gradient_clipping 0 in the DeepSpeed config) is off by 4.7e-4.
        assert other[0] == ddp[0]
        worst = max(abs(mine[k] - theirs[k]) / abs(theirs[k]) for mine, theirs in zip(other, ddp)
                    for k in ("loss/triplet", "loss/caption_xe", "loss/total"))
        assert worst <= 1e-5, f"{name}: losses differ from DDP's by up to {worst:.2e} (relative)"


def test_zero2_in_bf16_trains_a_batchnorm_model_and_resumes_bit_for_bit(shards, tmp_path):
    """DeepSpeed's bf16 casts the parameters, not BatchNorm's running statistics, and
    batch_norm refuses bf16 weights beside float32 statistics: the trainer casts the buffers
    too. One process (2 would only add time), the small CNN's BatchNorms, 4 steps straight
    and 2 + 2 resumed."""
    launcher = ("--num_processes", "1", "--mixed_precision", "bf16")

    def launch(run, steps, *extra):
        args = train_args(shards, run, "train.logging.wandb=false", "data.batch_size=16", f"train.max_steps={steps}")
        ok(accelerate_launch(DRIVER, *args, *extra, env=deepspeed_env(),
                             config_file=ACCELERATE_DIR / "cpu_deepspeed_zero2.yaml", launcher_args=launcher))

    launch(tmp_path / "straight", 4)
    launch(tmp_path / "resumed", 2)
    launch(tmp_path / "resumed", 4, "--resume", "auto")
    report = rank_reports(tmp_path / "straight", world=1)[0]
    assert report["distributed_type"] == "DistributedType.DEEPSPEED" and report["mixed_precision"] == "bf16"
    assert "torch.bfloat16" in report["linear_output_dtypes"]
    records = losses(metrics(tmp_path / "straight"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert losses(metrics(tmp_path / "resumed")) == records
    assert rank_reports(tmp_path / "resumed", world=1)[0]["params_sha256"] == report["params_sha256"]


# -- 5. evaluation: 2 processes equal 1, and each rank encodes only its share ---------------

def test_eval_on_two_processes_equals_one_and_each_rank_encodes_its_share(engine_runs):
    run = engine_runs["ddp"]
    # During training: each rank encoded half of the 12 validation images (one evaluation).
    assert [r["eval_images_encoded"] for r in rank_reports(run)] == [6, 6]
    args = [EVAL_DRIVER, "--run-dir", run, "--split", "test"]
    ok(accelerate_launch(*args, num_processes=1))
    one = json.loads((run / "eval" / "test.json").read_text())
    assert json.loads((run / "eval" / "rank0.json").read_text())["num_images"] == NUM_TEST
    shutil.rmtree(run / "eval")
    ok(accelerate_launch(*args, num_processes=2))
    two = json.loads((run / "eval" / "test.json").read_text())
    assert two["num_images"] == NUM_TEST and two == pytest.approx(one, abs=1e-9)
    reports = [json.loads(path.read_text()) for path in sorted((run / "eval").glob("rank*.json"))]
    assert [(r["process_index"], r["world"]) for r in reports] == [(0, 2), (1, 2)], "not 2 ranks of one group"
    # 15 images over 2 ranks: 7 and 8 real rows (plus masked padding), no image twice.
    assert sorted(r["num_images"] for r in reports) == [7, 8]
    keys = [set(r["keys"]) for r in reports]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == NUM_TEST


# -- 3 and 4. bf16 mixed precision, resumed bit for bit; the wandb run it logs to -----------
#
# fp16 is not tested here: torch 2.14 has fp16 autocast and GradScaler on CPU, but accelerate
# 1.15 turns neither on for a CPU device (its native_amp is GPU-like devices only), so a CPU
# run with --mixed_precision fp16 would silently train in float32 with no loss scaling: the
# trainer refuses it with a config error instead (test_train.py, BAD_LAUNCHES fp16-on-cpu).

BF16 = ["data.batch_size=16", "data.num_workers=0"]  # 1 process: 3 steps per epoch, eval at step 3
BF16_STEPS, BF16_STOP = 4, 2


@pytest.fixture(scope="module")
def bf16_runs(shards, tmp_path_factory):
    """bf16 (CPU autocast), one process: BF16_STEPS uninterrupted, and the same stopped by
    max_steps at BF16_STOP then resumed (`--resume auto`) to BF16_STEPS."""
    root = tmp_path_factory.mktemp("bf16")
    reference, resumed = root / "reference", root / "resumed"

    def launch(run, steps, *extra):
        args = train_args(shards, run, *BF16, f"train.max_steps={steps}")
        ok(accelerate_launch(DRIVER, *args, *extra, num_processes=1, mixed_precision="bf16"))

    launch(reference, BF16_STEPS)
    launch(resumed, BF16_STOP)
    first_run_id = (resumed / "wandb_run_id").read_text()
    launch(resumed, BF16_STEPS, "--resume", "auto")
    return reference, resumed, first_run_id


def test_bf16_trains_and_resumes_bit_for_bit(bf16_runs):
    reference, resumed, _ = bf16_runs
    report = rank_reports(reference, world=1)[0]
    assert report["mixed_precision"] == "bf16"
    assert "torch.bfloat16" in report["linear_output_dtypes"]  # autocast really ran the layers in bf16
    records = metrics(reference)
    assert [r["step"] for r in records] == list(range(1, BF16_STEPS + 1))
    assert records[-1]["loss/triplet"] < records[0]["loss/triplet"]
    assert rank_reports(resumed, world=1)[0]["outcome"] == "max_steps"
    assert losses(metrics(resumed)) == losses(records)  # exactly, not approximately
    assert evals(resumed) == evals(reference) and [r["step"] for r in evals(reference)] == [3]
    assert rank_reports(resumed, world=1)[0]["params_sha256"] == report["params_sha256"]


# wandb 0.31 has no Python reader for its .wandb files (the old datastore module and
# `wandb sync --view` are gone); the file is a LevelDB-style log of wandb's own protobuf
# Records: a 7-byte header, then 32 KiB blocks of chunks (crc32 4, length 2, type 1, data).
def wandb_records(path):
    from wandb.proto import wandb_internal_pb2

    block, data = 32 * 1024, path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the zero padding at a block's end
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def offline_runs(run_dir):
    """Per offline run in RUN/wandb (oldest first): its run id and {step: {key: value}}."""
    runs = []
    for run in sorted((run_dir / "wandb").glob("offline-run-*")):
        (log,) = run.glob("*.wandb")
        run_id, history = None, {}
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history.setdefault(record.history.step.num, {}).update(items)
        runs.append((run_id, history))
    return runs


def test_wandb_offline_run_holds_the_logged_keys_and_steps(bf16_runs):
    reference, _, _ = bf16_runs
    ((run_id, history),) = offline_runs(reference)
    assert run_id == (reference / "wandb_run_id").read_text().strip()
    assert sorted(history) == list(range(1, BF16_STEPS + 1))
    for record in metrics(reference):
        logged = history[record["step"]]
        for key in ("loss/triplet", "loss/caption_xe", "loss/total", "lr/text_encoder", "grad_norm"):
            assert logged[key] == record[key], (record["step"], key)
    (evaluation,) = evals(reference)
    assert history[3]["eval/rsum"] == evaluation["eval/rsum"] and "eval/i2t_r1" in history[3]


def test_a_resumed_run_continues_the_same_wandb_run(bf16_runs):
    _, resumed, first_run_id = bf16_runs
    (first_id, first), (second_id, second) = offline_runs(resumed)
    assert first_id == second_id == first_run_id == (resumed / "wandb_run_id").read_text()
    assert sorted(first) == list(range(1, BF16_STOP + 1))
    assert sorted(second) == list(range(BF16_STOP + 1, BF16_STEPS + 1))
