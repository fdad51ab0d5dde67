"""Caption tokenizer and word vocabulary.

The vocabulary is built once from the training captions, saved as JSON next to the
shards/checkpoints, and must map a word to the same id on every rank and every resume,
so building it is deterministic: frequency order, ties broken alphabetically.

It has two parts: the specials and the training words (what the caption decoder can say),
then optionally an extension of GloVe words (``glove_extra_words``) that only the text
encoder knows, so that a search query for "kitten" is not all ``<unk>`` when no training
caption says "kitten". The extension follows GloVe's own order (most frequent first).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmr.config import ConfigError

VOCAB_FORMAT = "cmr-vocab"
# Version 1 files have no extension; version 2 adds ``num_train_words``. A vocabulary without
# an extension is still written as version 1, so older code keeps reading it.
VOCAB_FORMAT_VERSION = 2


def _combining_mark_class() -> str:
    """A regex class of every combining mark (Unicode category M*).

    Python's ``\\w`` excludes marks, which would cut words of scripts such as Devanagari
    ("हिन्दी") at every vowel sign. Marks live in planes 0, 1 and 14 only.
    """
    code_points = [*range(0x20000), *range(0xE0000, 0xE0200)]
    marks = [c for c in code_points if unicodedata.category(chr(c)).startswith("M")]
    ranges, start = [], marks[0]
    for prev, cur in zip(marks, marks[1:] + [-1]):
        if cur != prev + 1:  # a run of consecutive code points ends at prev
            ranges.append(re.escape(chr(start)) + "-" + re.escape(chr(prev)))
            start = cur
    return "[" + "".join(ranges) + "]"


# A word starts with a unicode letter/digit ([^\W_] is \w without the underscore), goes
# on with letters, digits and combining marks, and may have in-word apostrophes: "dog's",
# "o'clock", "rock'n'roll". Everything else (punctuation, hyphens, symbols) separates.
_LETTER = r"[^\W_]"
_WORD_PART = rf"{_LETTER}(?:{_LETTER}|{_combining_mark_class()})*"
_WORD = re.compile(rf"{_WORD_PART}(?:'{_WORD_PART})*")
# Typographic apostrophes and primes written in place of "'".
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u2032": "'"})


def tokenize(text: str) -> list[str]:
    """Lowercase words of ``text``; punctuation (hyphens included) separates and is dropped."""
    # NFKC folds full-width letters and ligatures into their plain forms.
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    return _WORD.findall(text)


@dataclass
class VocabConfig:
    min_count: int = 1  # words seen fewer times in the training captions -> <unk>
    max_size: int | None = None  # most entries in total, the 4 special tokens included
    max_caption_tokens: int = 32  # words kept per caption (before <start>/<end> are added)
    # Extend the vocabulary with the N most frequent GloVe words (model.text_encoder.glove)
    # that no training caption has, plus every training word below min_count / beyond
    # max_size that GloVe has. Only the text encoder sees them, with frozen GloVe vectors;
    # the caption decoder reads them as <unk>. 0: no extension.
    glove_extra_words: int = 0

    def validate(self) -> None:
        if self.min_count < 1:
            raise ConfigError("min_count", f"must be >= 1, got {self.min_count}")
        if self.max_size is not None and self.max_size <= len(Vocabulary.SPECIALS):
            raise ConfigError(
                "max_size",
                f"must leave room for words after the 4 special tokens, got {self.max_size}",
            )
        if self.max_caption_tokens < 1:
            raise ConfigError("max_caption_tokens", f"must be >= 1, got {self.max_caption_tokens}")
        if self.glove_extra_words < 0:
            raise ConfigError(
                "glove_extra_words", f"must be >= 0 (0 = off), got {self.glove_extra_words}"
            )


class Vocabulary:
    PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
    SPECIALS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3

    def __init__(
        self, words: Iterable[str], max_caption_tokens: int = 32, num_train_words: int | None = None
    ):
        """``words``: the non-special entries in id order (ids start at 4).

        ``num_train_words``: how many leading entries, the 4 specials included, come from the
        training captions (the caption decoder's vocabulary); the rest are the GloVe
        extension. None: all of them (no extension).
        """
        self.itos: list[str] = [*self.SPECIALS, *words]
        self.stoi: dict[str, int] = {word: i for i, word in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            duplicates = sorted(w for w, n in Counter(self.itos).items() if n > 1)
            raise ValueError(f"vocabulary has duplicate entries: {duplicates[:5]}")
        self.num_train_words = len(self.itos) if num_train_words is None else num_train_words
        if not len(self.SPECIALS) <= self.num_train_words <= len(self.itos):
            raise ValueError(
                f"num_train_words must be in [{len(self.SPECIALS)}, {len(self.itos)}], "
                f"got {self.num_train_words}"
            )
        self.max_caption_tokens = max_caption_tokens
        self.pad_id, self.start_id, self.end_id, self.unk_id = 0, 1, 2, 3

    @classmethod
    def build(
        cls, captions: Iterable[str], cfg: VocabConfig, glove_words: Sequence[str] | None = None
    ) -> Vocabulary:
        """Count the words of ``captions`` and keep the frequent ones, most frequent first;
        then, if ``cfg.glove_extra_words``, the extension from ``glove_words`` (GloVe's words
        in its own order, most frequent first)."""
        counts = Counter()
        for caption in captions:
            counts.update(tokenize(caption))
        kept = sorted(
            (word for word, count in counts.items() if count >= cfg.min_count),
            key=lambda word: (-counts[word], word),
        )
        if cfg.max_size is not None:
            kept = kept[: cfg.max_size - len(cls.SPECIALS)]
        if cfg.glove_extra_words == 0:
            return cls(kept, cfg.max_caption_tokens)
        if glove_words is None:
            raise ValueError("vocab.glove_extra_words > 0 needs the GloVe words (glove_words)")
        dropped = set(counts).difference(kept)
        extra = _glove_extension(glove_words, set(kept), dropped, cfg.glove_extra_words)
        return cls([*kept, *extra], cfg.max_caption_tokens, len(cls.SPECIALS) + len(kept))

    @property
    def num_extra_words(self) -> int:
        """Entries of the GloVe extension (after the training words); 0 without one."""
        return len(self.itos) - self.num_train_words

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Vocabulary)
            and self.itos == other.itos
            and self.num_train_words == other.num_train_words
            and self.max_caption_tokens == other.max_caption_tokens
        )

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """``[<start>, word ids..., <end>]`` keeping the first ``max_tokens`` words
        (default: ``max_caption_tokens``); unknown words map to ``<unk>``."""
        limit = self.max_caption_tokens if max_tokens is None else max_tokens
        if limit < 1:
            raise ValueError(f"max_tokens must be >= 1, got {limit}")
        words = tokenize(text)[:limit]
        return [self.start_id, *(self.stoi.get(w, self.unk_id) for w in words), self.end_id]

    def decode(self, ids: Iterable[int], strip_special: bool = True) -> str:
        """Words of ``ids`` joined by spaces, up to the first ``<end>``.

        ``strip_special`` drops ``<pad>``/``<start>``/``<end>``; ``<unk>`` is always shown.
        """
        words = []
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < len(self.itos):
                raise ValueError(
                    f"token id {token_id} is outside the vocabulary (size {len(self)})"
                )
            if token_id == self.end_id:
                if not strip_special:
                    words.append(self.END)
                break
            if strip_special and token_id in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[token_id])
        return " ".join(words)

    def coverage(self, captions: Iterable[str]) -> float:
        """Fraction of the words in ``captions`` that are in the vocabulary (1.0 if none)."""
        num_words = num_known = 0
        for caption in captions:
            for word in tokenize(caption):
                num_words += 1
                num_known += word in self.stoi
        return num_known / num_words if num_words else 1.0

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": VOCAB_FORMAT,
            "version": 1,
            "max_caption_tokens": self.max_caption_tokens,
            "itos": list(self.itos),
        }
        if self.num_extra_words:
            data.update(version=VOCAB_FORMAT_VERSION, num_train_words=self.num_train_words)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Vocabulary:
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
            raise ValueError(f"not a {VOCAB_FORMAT} vocabulary (missing format field)")
        if data.get("version") not in (1, VOCAB_FORMAT_VERSION):
            raise ValueError(f"unsupported vocabulary version {data.get('version')!r}")
        itos = data.get("itos")
        if not isinstance(itos, list) or not all(isinstance(w, str) for w in itos):
            raise ValueError("vocabulary itos must be a list of strings")
        if tuple(itos[: len(cls.SPECIALS)]) != cls.SPECIALS:
            raise ValueError(f"vocabulary must start with {list(cls.SPECIALS)}")
        max_tokens = data.get("max_caption_tokens", 32)
        if type(max_tokens) is not int or max_tokens < 1:
            raise ValueError(f"max_caption_tokens must be a positive int, got {max_tokens!r}")
        num_train_words = data.get("num_train_words")  # absent (version 1): no extension
        if num_train_words is not None and type(num_train_words) is not int:
            raise ValueError(f"num_train_words must be an int, got {num_train_words!r}")
        return cls(itos[len(cls.SPECIALS) :], max_tokens, num_train_words)

    def save(self, path: str | Path) -> None:
        """Write JSON atomically: a crash never leaves a half-written vocabulary."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=0), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocabulary file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_dict(data)
        except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path} is not a valid vocabulary file: {err}") from None


def _glove_extension(
    glove_words: Sequence[str], train_words: set[str], dropped: set[str], num_words: int
) -> list[str]:
    """The extension, in GloVe's order: its ``num_words`` most frequent words that the training
    captions lack, plus every ``dropped`` training-caption word (below min_count, beyond
    max_size) it has, wherever it ranks, so those keep a real vector instead of ``<unk>``.

    Only words the tokenizer can produce qualify (GloVe 6B also has ",", "'s", "u.s."...:
    no caption or query ever yields them, so their rows would be dead weight).
    """
    extra: list[str] = []
    seen, num_top, dropped_left = set(train_words), 0, set(dropped)
    for word in glove_words:
        if num_top >= num_words and not dropped_left:
            break
        if word in seen:
            continue
        if word in dropped_left:
            dropped_left.discard(word)
        elif num_top < num_words and tokenize(word) == [word]:
            num_top += 1
        else:
            continue
        seen.add(word)
        extra.append(word)
    return extra


def pad_captions(token_ids: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists into LongTensor ``[N, Lmax]`` plus LongTensor ``[N]`` lengths."""
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.long)
    max_len = int(lengths.max()) if len(token_ids) else 0
    padded = torch.full((len(token_ids), max_len), pad_id, dtype=torch.long)
    # One scatter through a row-major mask instead of a Python loop of row copies.
    flat = torch.tensor([i for ids in token_ids for i in ids], dtype=torch.long)
    padded[torch.arange(max_len) < lengths[:, None]] = flat
    return padded, lengths
