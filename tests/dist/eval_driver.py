"""launch/eval.py plus a per-rank report: RUN_DIR/eval/rank{R}.json holds the process index,
the world size and the keys of the images this rank encoded (its share of the split)."""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "launch"))
import eval as launch_eval  # noqa: E402

from tests.dist.embed_counter import embed_counter  # noqa: E402

if __name__ == "__main__":
    torch.set_grad_enabled(False)
    code = launch_eval.main()
    state = PartialState()
    run_dir = Path(sys.argv[sys.argv.index("--run-dir") + 1])
    report = {"process_index": state.process_index, "world": state.num_processes,
              "num_images": embed_counter.num_images, "keys": embed_counter.keys}
    (run_dir / "eval").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / f"rank{state.process_index}.json").write_text(json.dumps(report))
    raise SystemExit(code)
