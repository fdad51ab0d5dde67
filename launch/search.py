"""Search a split with a trained model: text -> images, or image -> captions.

    python launch/search.py --run-dir RUN --shards DIR --split test \\
        --query "a dog runs in the snow" --top-k 5 [--grid out.png]
    python launch/search.py --run-dir RUN --image photo.jpg [--grid out.png]
    python launch/search.py --exported EXPORT_DIR --query "..."     # a model from launch/export.py

The split's embeddings are computed on the first search and cached in RUN/cache (or
EXPORT_DIR/cache); later searches of the same split and checkpoint only encode the query.
Prints a ranked table; --grid also draws the results as a PNG.
"""

import argparse
import sys
from pathlib import Path

import torch

from cmr.config import ConfigError, from_dict
from cmr.data.source import DataError, open_split
from cmr.export import ExportError
from cmr.search import (
    SearchConfig, SearchError, SearchIndex, encode_query_image, encode_query_text, format_image_hits,
    format_text_hits, gallery_embeddings, image_results_grid, load_search_model, read_query_image,
    text_results_grid, unknown_words,
)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", type=Path, help="a training run directory")
    source.add_argument("--exported", type=Path, help="an exported model (launch/export.py)")
    parser.add_argument("--checkpoint", default=None,
                        help="latest, best, step-N (default: best if the run has one, else latest)")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", help="text query: find images")
    query.add_argument("--image", type=Path, help="image file query: find captions")
    parser.add_argument("--shards", default=None, help="dataset directory (default: the run's data.shards)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--grid", type=Path, default=None, help="also draw the results into this PNG")
    parser.add_argument("--index", choices=("auto", "exact", "ivf"), default="auto",
                        help="faiss index: exact, IVF (approximate), or auto by gallery size")
    parser.add_argument("--nprobe", type=int, default=SearchConfig.nprobe,
                        help="IVF clusters visited per query")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="loader workers when embedding the split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.top_k < 1:
            raise SearchError(f"--top-k must be >= 1, got {args.top_k}")
        search_cfg = from_dict(SearchConfig, {"kind": args.index, "nprobe": args.nprobe})
        model, vocab, cfg, weights, root = load_search_model(args.run_dir, args.exported,
                                                             args.checkpoint)
        if args.query is not None:
            query_emb = encode_query_text(model, vocab, args.query)
            if unknown := unknown_words(vocab, args.query):
                print(f"note: not in the vocabulary, read as <unk>: {', '.join(unknown)}",
                      file=sys.stderr)
        else:
            query_emb = encode_query_image(model, cfg.data, args.image)
        shards = args.shards or cfg.data.shards
        gallery = gallery_embeddings(root, model, cfg, vocab, shards=shards, split=args.split,
                                     checkpoint=weights, num_workers=args.num_workers,
                                     device=args.device)
        index = SearchIndex(gallery, search_cfg)
        if args.query is not None:
            hits = index.search_text(query_emb, args.top_k)
            lines, what = format_text_hits(hits, gallery, vocab), f"text -> image: {args.query!r}"
        else:
            hits = index.search_image(query_emb, args.top_k)
            lines, what = format_image_hits(hits, gallery, vocab), f"image -> text: {args.image}"
        print(f"{what} (top {len(hits)} of {gallery.num_images} images, split {args.split}, "
              f"{weights.name})")
        print("\n".join(lines))
        if args.grid is not None:
            if args.query is not None:
                split_dir = open_split(shards, args.split).split_dir
                grid = text_results_grid(args.query, hits, gallery, split_dir, cfg.data.max_pixels)
            else:
                image = read_query_image(args.image, cfg.data.max_pixels)
                grid = image_results_grid(image, hits, gallery, vocab, title=args.image.name)
            args.grid.parent.mkdir(parents=True, exist_ok=True)
            grid.save(args.grid, format="PNG")
            print(f"wrote {args.grid} ({grid.width}x{grid.height})")
    except (SearchError, ExportError, ConfigError, DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
