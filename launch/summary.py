"""Print a run's losses per stage from its metrics.jsonl (no wandb needed).

    python launch/summary.py runs/emoji-demo
"""

import json
import sys
from pathlib import Path


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path = Path(sys.argv[1]) / "metrics.jsonl"
    if not path.is_file():
        print(f"error: {path} not found (has the run logged a step yet?)", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_stage: dict[str, list[dict]] = {}
    for record in records:
        by_stage.setdefault(record["stage"], []).append(record)
    print(f"{path.parent}: {len(records)} logged steps, last step {records[-1]['step']}")
    for stage, rows in by_stage.items():
        # A stage's own terms: those in its last record (the first may still average in the
        # end of the previous stage).
        keys = sorted(k for k in rows[-1] if k.startswith(("loss/", "reward/")))
        changes = ", ".join(
            f"{k.split('/', 1)[1]} {next(r[k] for r in rows if k in r):.3f} -> {rows[-1][k]:.3f}" for k in keys
        )
        print(f"  {stage:<15} steps {rows[0]['step']:>5}-{rows[-1]['step']:<5} {changes}")
    skipped = {k: v for k, v in records[-1].items() if k.startswith("skipped/")}
    print(f"  samples/s (last log): {records[-1]['samples_per_s']:.1f}; skipped samples: {skipped or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
