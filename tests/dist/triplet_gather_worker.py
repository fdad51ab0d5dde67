"""One rank of the cross-rank triplet test (tests/test_gather.py launches one process per rank).

Loads the full seeded batch and the projection weights the parent saved, takes this rank's
rows, runs every case of the parent's list through ``triplet_loss_distributed`` and
``gather_with_grad`` on a real gloo process group, and saves losses and gradients for the
parent to compare with a single process holding the whole batch.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `cmr`

from cmr.losses import gather_with_grad, triplet_loss_distributed  # noqa: E402


def build_projection(state: dict) -> torch.nn.Linear:
    out_features, in_features = state["weight"].shape
    layer = torch.nn.Linear(in_features, out_features, dtype=state["weight"].dtype)
    layer.load_state_dict(state)
    return layer


def run_triplet_case(setup: dict, case: dict, rank: int) -> dict:
    rows = slice(rank * setup["local_batch"], (rank + 1) * setup["local_batch"])
    img_proj, txt_proj = build_projection(setup["img_proj"]), build_projection(setup["txt_proj"])
    img_emb = torch.nn.functional.normalize(img_proj(setup["img_inputs"][rows]), dim=1)
    txt_emb = torch.nn.functional.normalize(txt_proj(setup["txt_inputs"][rows]), dim=1)
    img_emb.retain_grad()
    txt_emb.retain_grad()
    img_ids = setup["img_ids"][rows] if case["use_ids"] else None
    loss = triplet_loss_distributed(
        img_emb, txt_emb, margin=case["margin"], max_violation=case["max_violation"],
        reduction=case["reduction"], img_ids=img_ids, rank_reduction=case["rank_reduction"],
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


def run_raw_gather(setup: dict, rank: int) -> dict:
    rows = slice(rank * setup["local_batch"], (rank + 1) * setup["local_batch"])
    local = setup["img_inputs"][rows].clone().requires_grad_(True)
    gathered = gather_with_grad(local)
    # A rank-specific weighting of the gathered rows, so each rank's loss differs.
    (gathered * setup["gather_weights"][rank]).sum().backward()
    return {"gathered": gathered.detach(), "grad": local.grad}


def run_uneven_batch(rank: int) -> str:
    try:
        gather_with_grad(torch.zeros(rank + 1, 3, requires_grad=True))
    except ValueError as err:
        return str(err)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--setup", required=True)
    parser.add_argument("--init-file", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # A file rendezvous needs no free port, so parallel test runs cannot collide.
    dist.init_process_group(
        "gloo", init_method=f"file://{args.init_file}", rank=args.rank, world_size=args.world_size
    )
    setup = torch.load(args.setup)
    results = {
        "cases": [run_triplet_case(setup, c, args.rank) for c in setup["cases"]],
        "raw_gather": run_raw_gather(setup, args.rank),
        "uneven_error": run_uneven_batch(args.rank),
    }
    torch.save(results, args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
