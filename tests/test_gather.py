"""Cross-rank negatives: N real gloo processes with B pairs each must give the loss and the
gradients of one process holding all N*B pairs."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from cmr.losses import gather_no_grad, gather_with_grad, triplet_loss, triplet_loss_distributed

WORKER = Path(__file__).parent / "dist" / "triplet_gather_worker.py"
WORLD_SIZE = 2
LOCAL_BATCH = 4
INPUT_DIM, EMBED_DIM = 6, 5
# float64, so rounding (~1e-15) stays far below the tolerance and any difference above it is a
# real mismatch; in float32 the summed hinge gradients (magnitude ~10) already round at ~1e-6.
DTYPE = torch.float64
TOLERANCE = 1e-6
CASES = [
    {"max_violation": mv, "reduction": red, "rank_reduction": rr, "use_ids": ids, "margin": 0.2}
    for mv, red, rr, ids in itertools.product(
        (True, False), ("sum", "mean"), ("sum", "mean"), (False, True)
    )
]


def case_id(case: dict) -> str:
    hinge = "max" if case["max_violation"] else "sumneg"
    ids = "-ids" if case["use_ids"] else ""
    return f"{hinge}-{case['reduction']}-ranks_{case['rank_reduction']}{ids}"


def make_setup() -> dict:
    generator = torch.Generator().manual_seed(1234)
    num_pairs = WORLD_SIZE * LOCAL_BATCH

    def projection_state() -> dict:
        layer = torch.nn.Linear(INPUT_DIM, EMBED_DIM, dtype=DTYPE)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(EMBED_DIM, INPUT_DIM, generator=generator, dtype=DTYPE))
            layer.bias.copy_(torch.randn(EMBED_DIM, generator=generator, dtype=DTYPE))
        return layer.state_dict()

    return {
        "local_batch": LOCAL_BATCH,
        "img_inputs": torch.randn(num_pairs, INPUT_DIM, generator=generator, dtype=DTYPE),
        "txt_inputs": torch.randn(num_pairs, INPUT_DIM, generator=generator, dtype=DTYPE),
        # Image 0 and image 2 each have a second caption on the *other* rank.
        "img_ids": torch.tensor([10, 11, 12, 13, 10, 15, 12, 17]),
        "img_proj": projection_state(),
        "txt_proj": projection_state(),
        "gather_weights": torch.randn(
            WORLD_SIZE, num_pairs, INPUT_DIM, generator=generator, dtype=DTYPE
        ),
        "cases": CASES,
    }


def build_projection(state: dict) -> torch.nn.Linear:
    layer = torch.nn.Linear(INPUT_DIM, EMBED_DIM, dtype=DTYPE)
    layer.load_state_dict(state)
    return layer


def single_process_reference(setup: dict, case: dict) -> dict:
    img_proj, txt_proj = build_projection(setup["img_proj"]), build_projection(setup["txt_proj"])
    img_emb = F.normalize(img_proj(setup["img_inputs"]), dim=1)
    txt_emb = F.normalize(txt_proj(setup["txt_inputs"]), dim=1)
    img_emb.retain_grad()
    txt_emb.retain_grad()
    loss = triplet_loss(
        img_emb, txt_emb, margin=case["margin"], max_violation=case["max_violation"],
        reduction=case["reduction"], img_ids=setup["img_ids"] if case["use_ids"] else None,
    )
    loss.backward()
    return {
        "loss": loss.detach(),
        "img_emb_grad": img_emb.grad,
        "txt_emb_grad": txt_emb.grad,
        "param_grads": {
            **{f"img_proj.{n}": p.grad for n, p in img_proj.named_parameters()},
            **{f"txt_proj.{n}": p.grad for n, p in txt_proj.named_parameters()},
        },
    }


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    """Run the worker on WORLD_SIZE real processes once; returns (setup, per-rank results)."""
    tmp = tmp_path_factory.mktemp("gather")
    setup = make_setup()
    torch.save(setup, tmp / "setup.pt")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--rank", str(rank), "--world-size", str(WORLD_SIZE),
             "--setup", str(tmp / "setup.pt"), "--init-file", str(tmp / "rendezvous"),
             "--out", str(tmp / f"rank{rank}.pt")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in range(WORLD_SIZE)
    ]
    try:
        outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    finally:
        for proc in procs:  # a crashed rank leaves the other waiting in a collective
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{output}"
    return setup, [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.distributed
@pytest.mark.parametrize("case_index", range(len(CASES)), ids=[case_id(c) for c in CASES])
def test_two_ranks_match_one_process_with_the_whole_batch(two_rank_results, case_index):
    setup, per_rank = two_rank_results
    case = CASES[case_index]
    reference = single_process_reference(setup, case)
    ranks = [results["cases"][case_index] for results in per_rank]
    # "sum": the caller sums over ranks; "mean": it averages, as DDP does with gradients.
    combine = sum if case["rank_reduction"] == "sum" else (lambda xs: sum(xs) / WORLD_SIZE)

    torch.testing.assert_close(
        combine([r["loss"] for r in ranks]), reference["loss"], atol=TOLERANCE, rtol=0
    )
    for name, expected in reference["param_grads"].items():
        got = combine([r["param_grads"][name] for r in ranks])
        torch.testing.assert_close(
            got, expected, atol=TOLERANCE, rtol=0, msg=lambda m: f"{name}: {m}"
        )
    # Each rank's embedding gradient is the global gradient of its rows (times N for "mean",
    # whose loss is N times the rank's part so that averaging over ranks comes out right).
    scale = 1 if case["rank_reduction"] == "sum" else WORLD_SIZE
    for rank, result in enumerate(ranks):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for key in ("img_emb_grad", "txt_emb_grad"):
            torch.testing.assert_close(
                result[key], scale * reference[key][rows], atol=TOLERANCE, rtol=0,
                msg=lambda m: f"rank {rank} {key}: {m}",
            )


@pytest.mark.distributed
def test_cross_rank_negatives_change_the_loss(two_rank_results):
    # Guard against a vacuous pass: the other rank's negatives must matter.
    setup, per_rank = two_rank_results
    index = CASES.index(
        {"max_violation": False, "reduction": "sum", "rank_reduction": "sum", "use_ids": False,
         "margin": 0.2}
    )
    img = F.normalize(build_projection(setup["img_proj"])(setup["img_inputs"]), dim=1)
    txt = F.normalize(build_projection(setup["txt_proj"])(setup["txt_inputs"]), dim=1)
    local_only = sum(
        triplet_loss(img[r * LOCAL_BATCH:(r + 1) * LOCAL_BATCH],
                     txt[r * LOCAL_BATCH:(r + 1) * LOCAL_BATCH]).item()
        for r in range(WORLD_SIZE)
    )
    gathered = sum(results["cases"][index]["loss"].item() for results in per_rank)
    assert gathered > local_only + 1e-3


@pytest.mark.distributed
def test_gather_concatenates_ranks_and_sums_gradients_back(two_rank_results):
    setup, per_rank = two_rank_results
    summed_weights = setup["gather_weights"].sum(dim=0)
    for rank, results in enumerate(per_rank):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        torch.testing.assert_close(results["raw_gather"]["gathered"], setup["img_inputs"])
        torch.testing.assert_close(
            results["raw_gather"]["grad"], summed_weights[rows], atol=TOLERANCE, rtol=0
        )


@pytest.mark.distributed
def test_uneven_batch_sizes_fail_on_every_rank_with_a_clear_message(two_rank_results):
    _, per_rank = two_rank_results
    for results in per_rank:
        message = results["uneven_error"]
        assert "same per-rank batch size" in message
        assert "(1, 3)" in message and "(2, 3)" in message
        assert "\n" not in message


def test_without_process_group_gather_is_identity_and_loss_is_local():
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x
    assert gather_no_grad(x) is x
    img, txt = torch.randn(4, 3), torch.randn(4, 3)
    ids = torch.tensor([0, 0, 1, 2])
    for reduction in ("sum", "mean"):
        assert torch.equal(
            triplet_loss_distributed(img, txt, reduction=reduction, img_ids=ids),
            triplet_loss(img, txt, reduction=reduction, img_ids=ids),
        )


def test_world_size_one_is_a_no_op(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        x = torch.randn(4, 3, requires_grad=True)
        gathered = gather_with_grad(x)
        assert torch.equal(gathered, x)
        gathered.sum().backward()
        assert torch.equal(x.grad, torch.ones_like(x))
        img, txt = torch.randn(4, 3), torch.randn(4, 3)
        assert torch.equal(triplet_loss_distributed(img, txt), triplet_loss(img, txt))
    finally:
        dist.destroy_process_group()
