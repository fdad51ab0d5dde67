"""``python -m shards``: build, inspect and validate WebDataset shards.

    python -m shards build emoji    --out DIR [--cache-dir D]
    python -m shards build jsonl    --captions FILE --images-root DIR --out DIR
    python -m shards build karpathy --json dataset_coco.json --images-root DIR --out DIR
    python -m shards build features --features X.npy --captions FILE --out DIR
    python -m shards inspect DIR|URL
    python -m shards validate DIR|URL [--decode]

Builders write to a local directory only; inspect and validate also read a dataset served
over http(s) or kept in an object store (s3://, gs://, ...), streaming every shard once.

Exit codes: 0 ok, 1 validation found problems (or an internal error), 2 user error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from cmr.config import ConfigError
from cmr.data.remote import Opener, is_url, redact
from shards.emoji import build_emoji
from shards.features import build_features
from shards.jsonl import build_jsonl
from shards.karpathy import build_karpathy
from shards.pipeline import default_num_workers
from shards.report import ShardsError
from shards.summary import inspect_dataset
from shards.validate import validate_dataset


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error: ...`` line (exit 2), no usage dump."""

    def error(self, message: str):
        raise ShardsError(f"{message} (see {self.prog} --help)")


def _split_fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.9,0.05,0.05, got {text!r}")
    return values


def _add_build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output dataset directory (local)")
    parser.add_argument("--shard-size", type=int, default=100, help="samples per shard")
    parser.add_argument(
        "--workers",
        type=int,
        default=default_num_workers(),
        help="image loading processes (0 or 1: none)",
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=None,
        metavar="PX",
        help="resize images whose longer side exceeds PX",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="skip images with more pixels (default: PIL's limit, 89478485)",
    )
    parser.add_argument(
        "--split-fractions",
        type=_split_fractions,
        default=None,
        metavar="TRAIN,VAL,TEST",
        help="hash-split samples that have no split",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m shards",
        description=__doc__.split("\n", 1)[1].strip("\n"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    build = commands.add_parser("build", help="build shards from a dataset")
    sources = build.add_subparsers(dest="source", required=True, parser_class=_Parser)
    emoji = sources.add_parser("emoji", help="the built-in Noto emoji + CLDR dataset (npm)")
    emoji.add_argument("--cache-dir", default=None, help="npm tarball cache")
    jsonl = sources.add_parser("jsonl", help="a captions JSONL file and an images directory")
    jsonl.add_argument(
        "--captions", required=True, help="JSONL: image, captions[, split, labels, id]"
    )
    jsonl.add_argument("--images-root", required=True, help="image paths are relative to this")
    karpathy = sources.add_parser("karpathy", help="a Karpathy dataset_*.json split file")
    karpathy.add_argument(
        "--json", required=True, help="dataset_coco.json / dataset_flickr30k.json"
    )
    karpathy.add_argument("--images-root", required=True, help="holds [filepath/]filename")
    karpathy.add_argument("--restval-into-train", action="store_true")
    features = sources.add_parser("features", help="precomputed features (.npy) + captions JSONL")
    features.add_argument("--features", required=True, help=".npy array, one row per image")
    features.add_argument("--captions", required=True, help="JSONL, line i describes row i")
    features.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    for sub in (emoji, jsonl, karpathy, features):
        _add_build_options(sub)

    where = ("a built dataset: a directory, or a URL prefix (https://host/data, s3://bucket/data) "
             "whose split folders hold manifest.json")
    inspect = commands.add_parser("inspect", help="print a JSON summary of a built dataset")
    inspect.add_argument("dir", help=where)
    validate = commands.add_parser("validate", help="check every shard against its manifest")
    validate.add_argument("dir", help=where)
    validate.add_argument("--decode", action="store_true", help="also decode every payload")
    for command in (inspect, validate):
        command.add_argument("--max-retries", type=int, default=3, help="remote: retries after a transient fault")
    return parser


def _build_options(args: argparse.Namespace) -> dict:
    options = {
        "shard_size": args.shard_size,
        "workers": args.workers,
        "max_size": args.max_size,
        "split_fractions": args.split_fractions,
        "progress": not args.no_progress,
    }
    if args.max_pixels is not None:
        options["max_pixels"] = args.max_pixels
    return options


def run_build(args: argparse.Namespace) -> int:
    if is_url(args.out):
        raise ShardsError(f"--out {redact(args.out)}: builders write to a local directory; "
                          "upload the result afterwards (e.g. aws s3 sync DIR s3://bucket/data)")
    options = _build_options(args)
    if args.source == "emoji":
        report = build_emoji(args.out, cache_dir=args.cache_dir, **options)
    elif args.source == "jsonl":
        report = build_jsonl(args.captions, args.images_root, args.out, **options)
    elif args.source == "karpathy":
        report = build_karpathy(
            args.json,
            args.images_root,
            args.out,
            restval_into_train=args.restval_into_train,
            **options,
        )
    else:
        report = build_features(
            args.features, args.captions, args.out, feature_dtype=args.dtype, **options
        )
    print(report.summary())
    if report.num_samples == 0:  # e.g. a wrong --images-root: every image "missing"
        print("error: no sample could be built; see the skipped counts above", file=sys.stderr)
        return 2
    return 0


def _opener(args: argparse.Namespace) -> Opener:
    return Opener(allow_pipe=False, max_retries=args.max_retries)


def run_inspect(args: argparse.Namespace) -> int:
    print(json.dumps(inspect_dataset(args.dir, _opener(args)), indent=2, ensure_ascii=False))
    return 0


def run_validate(args: argparse.Namespace) -> int:
    problems = validate_dataset(args.dir, decode=args.decode, opener=_opener(args))
    for problem in problems:
        print(problem)
    summary = inspect_dataset(args.dir, _opener(args)) if not problems else None
    if summary is not None:
        print(
            f"ok: {summary['samples']} samples in {len(summary['splits'])} splits "
            f"({', '.join(summary['splits'])}){', all decoded' if args.decode else ''}"
        )
        return 0
    print(f"FAILED: {len(problems)} problem(s) in {redact(args.dir)}")
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        handler = {"build": run_build, "inspect": run_inspect, "validate": run_validate}
        return handler[args.command](args)
    except (ShardsError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # permission denied, disk full...: the environment, not a bug
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug: one line unless the user asks for more
        if os.environ.get("CMR_DEBUG"):
            raise
        first_line = (str(err).splitlines() or [""])[0]
        print(
            f"error: internal error {type(err).__name__}: {first_line} "
            "(run with CMR_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
