"""Encode an image dataset's shards with a pretrained backbone into feature shards.

    accelerate launch [--config_file configs/accelerate/X.yaml] launch/extract.py \\
        --shards data/emoji --backbone efficientnet_lite2 --weights imagenet --out data/emoji-lite2

Every rank encodes its share of every split (each sample once); rerunning after a kill keeps
the finished shards and redoes the rest. Train on the output with `model.image_encoder.kind:
features` (the feature size comes from its manifest).
"""

import argparse
import json
import os
import sys

from cmr.config import ConfigError, from_dict
from cmr.extract import ExtractConfig, ExtractError, run_extraction
from cmr.procs import end_with_launcher


def parse_args(argv=None) -> tuple[ExtractConfig, bool]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="image dataset directory")
    parser.add_argument("--out", required=True, help="feature dataset directory to write")
    parser.add_argument("--backbone", default=ExtractConfig.backbone)
    parser.add_argument("--weights", default=ExtractConfig.weights, help="imagenet, none, a torchvision name or a file")
    parser.add_argument("--image-size", type=int, default=None, help="default: the backbone's input size")
    parser.add_argument("--resize-ratio", type=float, default=None, help="eval resize / crop; default: the backbone's")
    parser.add_argument("--splits", nargs="+", default=None, help="default: every split")
    parser.add_argument("--batch-size", type=int, default=ExtractConfig.batch_size)
    parser.add_argument("--num-workers", type=int, default=ExtractConfig.num_workers, help="decoders per rank")
    parser.add_argument("--dtype", default=ExtractConfig.dtype, help="float32 or float16 storage")
    parser.add_argument("--precision", default=ExtractConfig.precision, help="auto, fp32, bf16 or fp16")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    fields = {"shards": args.shards, "out": args.out, "backbone": args.backbone, "weights": args.weights,
              "image_size": args.image_size, "resize_ratio": args.resize_ratio, "splits": args.splits,
              "batch_size": args.batch_size, "num_workers": args.num_workers, "dtype": args.dtype,
              "precision": args.precision, "channels_last": not args.no_channels_last}
    return from_dict(ExtractConfig, fields), not args.no_progress


def main(argv=None) -> int:
    end_with_launcher()  # a rank must not outlive `accelerate launch`
    try:
        cfg, progress = parse_args(argv)
        summary = run_extraction(cfg, progress=progress)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except ExtractError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Every rank prints its own summary into one shared pipe: write the line in one
    # os.write (atomic below PIPE_BUF) so two ranks' lines never interleave.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (json.dumps(summary) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
