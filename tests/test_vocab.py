"""Tokenizer, vocabulary building/encoding/persistence and caption padding."""

from __future__ import annotations

import json
import random

import pytest
import torch

from cmr.config import ConfigError, from_dict
from cmr.data.vocab import VocabConfig, Vocabulary, pad_captions, tokenize

CAPTIONS = [
    "A dog runs on the grass.",
    "The dog's ball is red!",
    "A black dog and a white cat.",
    "Two cats sleep; the dog runs.",
]


@pytest.mark.parametrize(
    "text, words",
    [
        ("A Dog runs.", ["a", "dog", "runs"]),
        ("The dog's ball, the dogs' bowl", ["the", "dog's", "ball", "the", "dogs", "bowl"]),
        ("It’s 5 o’clock", ["it's", "5", "o'clock"]),  # typographic apostrophes
        ("tri-colored  dog...  (jumping)!", ["tri", "colored", "dog", "jumping"]),
        ("'quoted' words", ["quoted", "words"]),
        ("snake_case 3.5m", ["snake", "case", "3", "5m"]),
        ("Café NAÏVE Straße", ["café", "naïve", "straße"]),
        ("東京タワー と 犬", ["東京タワー", "と", "犬"]),
        ("हिन्दी भाषा", ["हिन्दी", "भाषा"]),  # vowel signs are combining marks, not separators
        ("ＤＯＧ ﬁsh", ["dog", "fish"]),  # full-width letters and ligatures fold (NFKC)
        ("I ❤️ dogs 🐕", ["i", "dogs"]),
        ("", []),
        (" ,;:!? ", []),
    ],
)
def test_tokenize(text, words):
    assert tokenize(text) == words


def test_specials_come_first_then_words_by_frequency_then_alphabet():
    vocab = Vocabulary.build(CAPTIONS, VocabConfig())
    assert vocab.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)
    # dog x3, a x3, the x3 ... ties alphabetical; then runs x2; then the singletons.
    assert vocab.itos[4:8] == ["a", "dog", "the", "runs"]
    assert vocab.itos[8:] == sorted(vocab.itos[8:])
    assert len(vocab) == len(vocab.itos) == len(vocab.stoi)
    assert all(vocab.stoi[w] == i for i, w in enumerate(vocab.itos))


def test_build_does_not_depend_on_caption_order():
    shuffled = CAPTIONS * 3
    random.Random(0).shuffle(shuffled)
    assert (
        Vocabulary.build(shuffled, VocabConfig()).itos
        == Vocabulary.build(CAPTIONS * 3, VocabConfig()).itos
    )


def test_min_count_and_max_size():
    vocab = Vocabulary.build(CAPTIONS, VocabConfig(min_count=2))
    assert vocab.itos[4:] == ["a", "dog", "the", "runs"]
    vocab = Vocabulary.build(CAPTIONS, VocabConfig(max_size=6))
    assert len(vocab) == 6 and vocab.itos[4:] == [
        "a",
        "dog",
    ]  # the tie with "the" goes alphabetically


def test_encode_decode_round_trip_and_unknown_words():
    vocab = Vocabulary.build(CAPTIONS, VocabConfig())
    ids = vocab.encode("The black dog runs")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == "the black dog runs"
    ids = vocab.encode("A zebra runs")
    assert ids[2] == vocab.unk_id
    assert vocab.decode(ids) == "a <unk> runs"
    assert vocab.decode(ids, strip_special=False) == "<start> a <unk> runs <end>"


def test_decode_stops_at_end_and_skips_padding():
    vocab = Vocabulary.build(CAPTIONS, VocabConfig())
    dog, cat = vocab.stoi["dog"], vocab.stoi["cat"]
    padded = torch.tensor([vocab.start_id, dog, vocab.end_id, cat, vocab.pad_id])
    assert vocab.decode(padded) == "dog"
    assert vocab.decode([dog, vocab.pad_id, cat]) == "dog cat"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([len(vocab)])


def test_truncation():
    vocab = Vocabulary.build(CAPTIONS, VocabConfig(max_caption_tokens=3))
    assert vocab.decode(vocab.encode("a dog runs on the grass")) == "a dog runs"
    assert len(vocab.encode("a dog runs on the grass")) == 5
    assert (
        vocab.decode(vocab.encode("a dog runs on the grass", max_tokens=5)) == "a dog runs on the"
    )


def test_coverage():
    vocab = Vocabulary.build(CAPTIONS, VocabConfig())
    assert vocab.coverage(CAPTIONS) == 1.0
    assert vocab.coverage(["a dog", "zebra giraffe"]) == 0.5
    assert vocab.coverage([]) == 1.0


def test_save_load_identical(tmp_path):
    vocab = Vocabulary.build(
        ["Ünïcödé words", "and the dog's"] + CAPTIONS, VocabConfig(max_caption_tokens=7)
    )
    path = tmp_path / "sub" / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.itos == vocab.itos and loaded.max_caption_tokens == 7
    assert loaded.encode("the dog's words") == vocab.encode("the dog's words")
    assert [p.name for p in path.parent.iterdir()] == ["vocab.json"]  # no temp file left
    # The checkpoint form survives a JSON round trip.
    assert Vocabulary.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocabulary file not found"):
        Vocabulary.load(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "cmr-vocab", ')
    with pytest.raises(ValueError, match="broken.json is not a valid vocabulary") as info:
        Vocabulary.load(broken)
    assert "\n" not in str(info.value)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "cmr-vocab", "version": 1, "itos": ["a", "b"]}))
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary.load(wrong)


def test_pad_captions():
    padded, lengths = pad_captions([[1, 7, 8, 2], [1, 2], [1, 9, 2]], pad_id=0)
    assert padded.dtype == torch.long and lengths.dtype == torch.long
    assert padded.tolist() == [[1, 7, 8, 2], [1, 2, 0, 0], [1, 9, 2, 0]]
    assert lengths.tolist() == [4, 2, 3]
    padded, _ = pad_captions([[5], [5, 6]], pad_id=-1)
    assert padded.tolist() == [[5, -1], [5, 6]]
    padded, lengths = pad_captions([])
    assert padded.shape == (0, 0) and lengths.shape == (0,)


def test_vocab_config_validation():
    assert from_dict(VocabConfig, {"max_size": 1000}).max_size == 1000
    for field, value in [("min_count", 0), ("max_size", 4), ("max_caption_tokens", 0)]:
        with pytest.raises(ConfigError) as info:
            from_dict(VocabConfig, {field: value})
        assert info.value.field == field


# --- the GloVe extension (vocab.glove_extra_words) ---------------------------------------------

# GloVe's words in its own order (most frequent first), with what GloVe 6B really holds
# besides words: punctuation, clitics, dotted abbreviations, and (840B) capitalised forms.
GLOVE_WORDS = ["the", ",", "a", "'s", "of", "u.s.", "Paris", "kitten", "automobile", "two",
               "sleep", "zebra", "giraffe", "cats"]


def extended(captions=CAPTIONS, glove_words=GLOVE_WORDS, **cfg):
    return Vocabulary.build(captions, VocabConfig(**cfg), glove_words)


def test_extension_follows_the_training_words_in_glove_order():
    plain = Vocabulary.build(CAPTIONS, VocabConfig(min_count=2))
    vocab = extended(min_count=2, glove_extra_words=3)
    # The training part is exactly the vocabulary without an extension: same words, same ids.
    assert vocab.itos[: vocab.num_train_words] == plain.itos and vocab.num_train_words == len(plain)
    # The 3 most frequent GloVe words no caption has, skipping what the tokenizer never
    # yields (",", "'s", "u.s.", "Paris"), and every training word below min_count that GloVe
    # has ("two", "sleep", "cats"), wherever it ranks; all in GloVe's order.
    assert vocab.itos[vocab.num_train_words :] == ["of", "kitten", "automobile", "two", "sleep",
                                                   "cats"]
    assert vocab.num_extra_words == 6 and len(vocab) == len(plain) + 6
    ids = vocab.encode("a kitten and an automobile")
    assert ids[2] == vocab.stoi["kitten"] >= vocab.num_train_words
    assert ids[5] == vocab.stoi["automobile"] and vocab.unk_id in ids  # "an": neither part
    assert plain.encode("a kitten") == [1, plain.stoi["a"], plain.unk_id, 2]
    # max_size cuts the training part; what it cuts also reaches the extension if GloVe has it.
    small = extended(max_size=6, glove_extra_words=1)
    assert small.num_train_words == 6 and small.itos[6:] == ["the", "of", "two", "sleep", "cats"]


def test_extension_is_deterministic_and_off_by_default():
    shuffled = CAPTIONS[:]
    random.Random(0).shuffle(shuffled)
    assert extended(shuffled, glove_extra_words=4) == extended(glove_extra_words=4)
    assert extended(glove_extra_words=0) == Vocabulary.build(CAPTIONS, VocabConfig())
    assert extended().num_extra_words == 0
    with pytest.raises(ValueError, match="needs the GloVe words"):
        Vocabulary.build(CAPTIONS, VocabConfig(glove_extra_words=2))


def test_extension_survives_save_and_load_and_old_files_have_none(tmp_path):
    vocab = extended(min_count=2, glove_extra_words=3)
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.num_train_words == vocab.num_train_words
    assert loaded.encode("a kitten") == vocab.encode("a kitten")
    data = vocab.to_dict()
    assert data["version"] == 2 and data["num_train_words"] == vocab.num_train_words
    # Without an extension the file is the version-1 format older code reads ...
    plain = Vocabulary.build(CAPTIONS, VocabConfig()).to_dict()
    assert plain["version"] == 1 and "num_train_words" not in plain
    # ... and a version-1 file (no num_train_words) means no extension.
    old_data = {k: v for k, v in data.items() if k != "num_train_words"}
    old = Vocabulary.from_dict({**old_data, "version": 1})
    assert old.num_train_words == len(old) == len(vocab) and old.num_extra_words == 0
    for bad in (2, len(vocab) + 1, "7"):
        with pytest.raises(ValueError, match="num_train_words"):
            Vocabulary.from_dict({**data, "num_train_words": bad})


def test_glove_extra_words_config_validation():
    assert from_dict(VocabConfig, {"glove_extra_words": 100_000}).glove_extra_words == 100_000
    with pytest.raises(ConfigError, match=r"^glove_extra_words: must be >= 0"):
        from_dict(VocabConfig, {"glove_extra_words": -1})
