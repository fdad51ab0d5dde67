"""Search a split with a trained model: text -> images, or image -> captions.

    python launch/search.py --run-dir RUN --shards DIR --split test \\
        --query "a dog runs in the snow" --top-k 5 [--grid out.png]
    python launch/search.py --run-dir RUN --image photo.jpg [--grid out.png]
    python launch/search.py --exported EXPORT_DIR --query "..."     # a model from launch/export.py

The split's embeddings are computed on the first search and cached in RUN/cache (or
EXPORT_DIR/cache); later searches of the same split and checkpoint only encode the query.
Prints a ranked table (captions as the shards store them; each image's id, key and label);
--grid also draws the results as a PNG. A feature split's grid shows the pictures of the
image dataset its manifest names (source.image_dataset), else placeholders.
"""

import argparse
import sys
from pathlib import Path

import torch

from cmr.config import ConfigError, from_dict
from cmr.data.manifest import MANIFEST_NAME
from cmr.data.source import DataError
from cmr.eval.grid import stack_grids
from cmr.export import ExportError
from cmr.search import (
    SearchConfig, SearchError, SearchIndex, encode_query_image, encode_query_text,
    gallery_embeddings, load_search_model, merge_galleries, read_query_image, unknown_words,
)
from cmr.search_results import (
    format_image_hits, format_text_hits, image_results_grid, picture_dir, text_results_grid,
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
    query.add_argument("--query", action="append",
                       help="text query: find images (repeat it for several; their grids are stacked)")
    query.add_argument("--image", type=Path, help="image file query: find captions")
    parser.add_argument("--shards", default=None, help="dataset directory (default: the run's data.shards)")
    parser.add_argument("--split", default="test",
                        help="the gallery: a split, several (train,val,test) or all of them (all)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--grid", type=Path, default=None, help="also draw the results into this PNG")
    parser.add_argument("--index", choices=("auto", "exact", "ivf"), default="auto",
                        help="faiss index: exact, IVF (approximate), or auto by gallery size")
    parser.add_argument("--nprobe", type=int, default=SearchConfig.nprobe,
                        help="IVF clusters visited per query")
    parser.add_argument("--label", default=SearchConfig.label,
                        help="what names an image: caption (its first; default), id, key, or "
                             "labels.NAME (e.g. labels.subcategory)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="loader workers when embedding the split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def gallery_splits(shards, spec: str) -> list[str]:
    """``--split``: one split, a comma list, or "all" (every split with a manifest)."""
    if spec != "all":
        return [split for split in spec.split(",") if split]
    splits = sorted(p.parent.name for p in Path(shards).glob(f"*/{MANIFEST_NAME}"))
    if not splits:
        raise DataError(f"--split all: {shards} has no split with a {MANIFEST_NAME}")
    return splits


def _grid(args, text, hits, gallery, pictures, cfg, search_cfg):
    if text is not None:
        return text_results_grid(text, hits, gallery, pictures, cfg.data.max_pixels,
                                 label=search_cfg.label)
    image = read_query_image(args.image, cfg.data.max_pixels)
    return image_results_grid(image, hits, gallery, title=args.image.name)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.top_k < 1:
            raise SearchError(f"--top-k must be >= 1, got {args.top_k}")
        search_cfg = from_dict(SearchConfig, {"kind": args.index, "nprobe": args.nprobe,
                                              "label": args.label})
        model, vocab, cfg, weights, root = load_search_model(args.run_dir, args.exported,
                                                             args.checkpoint)
        queries = args.query or []
        query_embs = ([encode_query_text(model, vocab, text) for text in queries] if queries
                      else [encode_query_image(model, cfg.data, args.image)])
        for text in queries:  # after encoding: a query of unknown words only is an error
            if unknown := unknown_words(vocab, text):
                print(f"note: not in the vocabulary, read as <unk> in {text!r}: {', '.join(unknown)}",
                      file=sys.stderr)
        shards = args.shards or cfg.data.shards
        splits = gallery_splits(shards, args.split)
        gallery = merge_galleries({split: gallery_embeddings(
            root, model, cfg, vocab, shards=shards, split=split, checkpoint=weights,
            num_workers=args.num_workers, device=args.device) for split in splits})
        index = SearchIndex(gallery, search_cfg)
        grids = []
        for text, query_emb in zip(queries or [None], query_embs):
            if text is not None:
                hits = index.search_text(query_emb, args.top_k)
                lines = format_text_hits(hits, gallery, search_cfg.label)
                what = f"text -> image: {text!r}"
            else:
                hits = index.search_image(query_emb, args.top_k)
                lines = format_image_hits(hits, gallery, search_cfg.label)
                what = f"image -> text: {args.image}"
            print(f"{what} (top {len(hits)} of {gallery.num_images} images, {'+'.join(splits)}, "
                  f"{weights.name})")
            print("\n".join(lines))
            if args.grid is not None:
                grids.append(_grid(args, text, hits, gallery, picture_dir(shards, splits), cfg,
                                   search_cfg))
        if grids:
            grid = stack_grids(grids)
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
