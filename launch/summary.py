"""Print a run's losses per stage and its validation results from metrics.jsonl (no wandb needed).

    python launch/summary.py runs/emoji-demo

metrics.jsonl holds two kinds of records: training steps (step, epoch, stage, loss/*, ...)
and end-of-epoch evaluations (the same plus ``split`` and eval/*).
"""

import sys
from pathlib import Path

from cmr.run_dir import RunDir


def summarize(run_dir: Path) -> list[str]:
    run = RunDir(run_dir)
    path = run.metrics_path
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (has the run logged a step yet?)")
    records = run.read_metrics()
    steps = [r for r in records if "split" not in r]
    evals = [r for r in records if "split" in r]
    if not steps:
        raise FileNotFoundError(f"{path} has no training step yet")
    lines = [f"{run_dir}: {len(steps)} logged steps, last step {steps[-1]['step']}"]
    by_stage: dict[str, list[dict]] = {}
    for record in steps:
        by_stage.setdefault(record["stage"], []).append(record)
    for stage, rows in by_stage.items():
        # A stage's own terms: those in its last record (the first may still average in the
        # end of the previous stage).
        keys = sorted(k for k in rows[-1] if k.startswith(("loss/", "reward/")))
        changes = ", ".join(
            f"{k.split('/', 1)[1]} {next(r[k] for r in rows if k in r):.3f} -> {rows[-1][k]:.3f}" for k in keys
        )
        lines.append(f"  {stage:<15} steps {rows[0]['step']:>5}-{rows[-1]['step']:<5} {changes}")
    last = steps[-1]
    skipped = {k: v for k, v in last.items() if k.startswith("skipped/")}
    rate = f"{last['samples_per_s']:.1f}" if "samples_per_s" in last else "n/a"
    lines.append(f"  samples/s (last log): {rate}; skipped samples: {skipped or 'none'}")
    if evals:
        best = max(evals, key=lambda r: r["eval/rsum"])
        lines.append(f"  {evals[-1]['split']} rsum per evaluation: "
                     + " ".join(f"{r['eval/rsum']:.1f}" for r in evals)
                     + f"; best {best['eval/rsum']:.1f} at step {best['step']} (epoch {best['epoch']})")
    return lines


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        print("\n".join(summarize(Path(sys.argv[1]))))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
