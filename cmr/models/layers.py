"""Small pieces shared by the model files: special token ids, L2 normalisation, MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The caption vocabulary (cmr.data.vocab.Vocabulary) always starts with these four words,
# so the models can rely on fixed ids without importing the data code.
SPECIAL_WORDS = ("<pad>", "<start>", "<end>", "<unk>")
PAD_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # eps keeps an all-zero row (e.g. a dead ReLU output at init) finite instead of NaN.
    return F.normalize(x, p=2.0, dim=-1, eps=1e-8)


def build_mlp(dims: list[int], negative_slope: float | None = None) -> nn.Sequential:
    """Linear layers through ``dims`` with an activation between them (none after the last).

    ``negative_slope=None`` uses ReLU, a float uses LeakyReLU with that slope.
    """
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers.append(nn.ReLU() if negative_slope is None else nn.LeakyReLU(negative_slope))
    return nn.Sequential(*layers)


def check_vocab_words(vocab_words: list[str]) -> None:
    """The models hard-code the special words' ids; a vocabulary built otherwise is refused."""
    if len(vocab_words) <= len(SPECIAL_WORDS) or tuple(vocab_words[:4]) != SPECIAL_WORDS:
        head = list(vocab_words[:4])
        raise ValueError(
            f"vocabulary must start with {list(SPECIAL_WORDS)} and hold at least one real word, "
            f"got {head} ({len(vocab_words)} words); build it with cmr.data.vocab.Vocabulary"
        )
