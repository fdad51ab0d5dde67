"""Caption decoder (the "look" part): a GRU language model conditioned on the image embedding.

Conditioning is done twice, cheaply: the initial hidden state is a projection of the image
embedding, and the embedding is also concatenated to every input word, so the image is not
forgotten over a long caption.

Its vocabulary is the training part of the caption vocabulary only: the GloVe extension
(``vocab.glove_extra_words``, up to 100k words for the text encoder) would make the output
softmax absurdly wide, so extension ids read as ``<unk>`` here.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from cmr.config import ConfigError
from cmr.models.layers import END_ID, PAD_ID, START_ID, UNK_ID


@dataclasses.dataclass
class DecoderConfig:
    enabled: bool = True
    word_dim: int = 300
    hidden_dim: int = 1024
    num_layers: int = 1
    dropout: float = 0.0  # between GRU layers and before the output layer
    max_len: int = 20  # default number of sampled tokens (<end> included)

    def validate(self) -> None:
        for name in ("word_dim", "hidden_dim", "num_layers", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")


class CaptionDecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig, vocab_size: int, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(vocab_size, cfg.word_dim, padding_idx=PAD_ID)
        self.init_hidden = nn.Linear(embed_dim, cfg.num_layers * cfg.hidden_dim)
        self.gru = nn.GRU(
            cfg.word_dim + embed_dim, cfg.hidden_dim, cfg.num_layers, batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.output = nn.Linear(cfg.hidden_dim, vocab_size)

    @property
    def num_words(self) -> int:
        return self.output.out_features

    def to_decoder_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids beyond the decoder's vocabulary (the text encoder's GloVe extension) as <unk>:
        the decoder can neither read nor say them. A no-op without an extension."""
        return ids.masked_fill(ids >= self.num_words, UNK_ID)

    def initial_state(self, img_emb: torch.Tensor) -> torch.Tensor:
        h0 = torch.tanh(self.init_hidden(img_emb))  # [B, layers * H]
        return h0.view(img_emb.shape[0], self.cfg.num_layers, -1).transpose(0, 1).contiguous()

    def _run(self, tokens: torch.Tensor, img_emb: torch.Tensor, hidden: torch.Tensor):
        """tokens [B, T] -> logits [B, T, V] and the last hidden state."""
        words = self.embedding(tokens)
        image = img_emb.unsqueeze(1).expand(-1, tokens.shape[1], -1)
        out, hidden = self.gru(torch.cat([words, image], dim=-1), hidden)
        return self.output(self.dropout(out)), hidden

    def forward(self, img_emb: torch.Tensor, captions_in: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: ``captions_in`` [B, T] starts with <start>; returns logits [B, T, V].

        Logit t predicts token t + 1 of the caption. The GRU is causal, so padding at the end
        only produces logits at padded positions, which the loss ignores.
        """
        if captions_in.dim() != 2 or captions_in.shape[0] != img_emb.shape[0]:
            raise ValueError(
                f"decoder expects captions [B, T] with B = {img_emb.shape[0]} image embeddings, "
                f"got {tuple(captions_in.shape)}"
            )
        captions_in = self.to_decoder_ids(captions_in)
        logits, _ = self._run(captions_in, img_emb, self.initial_state(img_emb))
        return logits

    def sample(
        self,
        img_emb: torch.Tensor,
        max_len: int | None = None,
        temperature: float = 1.0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generate captions token by token.

        Returns ids [B, T] (no <start>; pad after the first <end>), the log-probabilities
        [B, T] of the chosen tokens under softmax(logits / temperature) over every word but
        <pad> and <start> (0 where masked), and
        mask [B, T], True up to and including the first <end>. ``greedy`` takes the argmax.
        T is always ``max_len``: a loop length that depends on the data would make ranks run
        different numbers of decoder steps, which ZeRO-3's per-forward parameter gathering
        turns into a hang. Call under ``torch.no_grad()`` when no gradient is needed.
        """
        max_len = self.cfg.max_len if max_len is None else max_len
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        batch = img_emb.shape[0]
        tokens = torch.full((batch, 1), START_ID, dtype=torch.long, device=img_emb.device)
        hidden = self.initial_state(img_emb)
        alive = torch.ones(batch, dtype=torch.bool, device=img_emb.device)
        all_ids, all_logprobs, all_masks = [], [], []
        # <pad> and <start> are never emitted; the policy is the softmax over the other words.
        never = torch.zeros(self.output.out_features, dtype=torch.bool, device=img_emb.device)
        never[[PAD_ID, START_ID]] = True
        for _ in range(max_len):
            logits, hidden = self._run(tokens, img_emb, hidden)
            logits = logits[:, -1].float().masked_fill(never, float("-inf"))
            logprobs = F.log_softmax(logits / temperature, dim=-1)
            if greedy:
                chosen = logprobs.argmax(dim=-1)
            else:
                chosen = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(1)
            chosen_logprob = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
            all_ids.append(torch.where(alive, chosen, PAD_ID))
            all_logprobs.append(torch.where(alive, chosen_logprob, 0.0))
            all_masks.append(alive)
            alive = alive & (chosen != END_ID)
            tokens = all_ids[-1].unsqueeze(1)
        return torch.stack(all_ids, 1), torch.stack(all_logprobs, 1), torch.stack(all_masks, 1)


def ids_to_words(ids: torch.Tensor | list[list[int]], vocab_words: list[str]) -> list[list[str]]:
    """Token ids -> words per caption, stopping at <end>; drops <pad> and <start>, keeps <unk>."""
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    special = {vocab_words[PAD_ID], vocab_words[START_ID]}
    captions = []
    for row in rows:
        words = []
        for token in row:
            if token == END_ID:
                break
            word = vocab_words[token]
            if word not in special:
                words.append(word)
        captions.append(words)
    return captions
