"""Export a trained model: weights (safetensors), resolved config and vocabulary in one directory.

    python launch/export.py --run-dir RUN --out DIR [--checkpoint best|latest|step-N]

The directory is loaded with ``cmr.export.load_exported`` (or searched with
``launch/search.py --exported DIR``) without the training code. Default checkpoint: best if
the run has one, else latest.
"""

import argparse
import sys
from pathlib import Path

from cmr.export import ExportError, export_model, read_export_info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True,
                        help="export directory: new, empty, or an earlier export (replaced)")
    parser.add_argument("--checkpoint", default=None, help="best, latest, step-N or a checkpoint path")
    args = parser.parse_args(argv)
    try:
        out = export_model(args.run_dir, args.out, args.checkpoint)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    info = read_export_info(out)
    print(f"exported {info['checkpoint']} (step {info['step']}) of {args.run_dir} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
