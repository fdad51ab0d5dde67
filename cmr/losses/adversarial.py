"""Discriminator losses for the two adversarial games of Look, Imagine and Match.

Both are plain binary cross-entropy of a discriminator. The adversary's side of each game
comes from the gradient reversal layer in ``cmr.models`` that sits between the encoders and
the discriminator: minimising these losses trains the discriminator to tell the sides apart
while the reversed gradient trains the encoders (or the generator) to make them
indistinguishable. So one optimizer and one ``backward`` serve both players.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _real_vs_fake_bce(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, name: str
) -> torch.Tensor:
    """Mean BCE of ``real`` (label 1) plus mean BCE of ``fake`` (label 0), halved.

    Each side is averaged on its own so that the two count equally even when their batch
    sizes differ; with equal sizes this is the mean over all predictions.
    """
    for side, logits in (("real", real_logits), ("fake", fake_logits)):
        is_column = logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1)
        if not is_column or logits.numel() == 0:
            raise ValueError(
                f"{name}: {side} logits must be a non-empty [B] or [B, 1], "
                f"got {tuple(logits.shape)}"
            )
    real_logits, fake_logits = real_logits.reshape(-1), fake_logits.reshape(-1)
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)


def modality_adversarial_loss(img_logits: torch.Tensor, txt_logits: torch.Tensor) -> torch.Tensor:
    """Modality discriminator: image embeddings are labelled 1, text embeddings 0."""
    return _real_vs_fake_bce(img_logits, txt_logits, "modality_adversarial_loss")


def imagine_adversarial_loss(
    real_logits: torch.Tensor, imagined_logits: torch.Tensor
) -> torch.Tensor:
    """Imagination discriminator: real image embeddings are labelled 1, imagined ones 0."""
    return _real_vs_fake_bce(real_logits, imagined_logits, "imagine_adversarial_loss")
