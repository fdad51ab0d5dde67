"""Losses of the caption decoder (the "look" part): teacher forcing, then self-critical RL.

Cross-entropy trains the decoder on the reference captions. Self-critical sequence training
(SCST, Rennie et al. 2017) then optimises the caption metric directly with REINFORCE: sample a
caption, score it (BLEU-4 against all references, computed in ``cmr.reward``), and use the
score of the greedy caption for the same image as the baseline, so only samples that beat the
model's own best guess are reinforced.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_xe_loss(
    logits: torch.Tensor, targets: torch.Tensor, pad_id: int = 0, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Teacher-forced cross-entropy, averaged over the non-pad target tokens of the batch.

    logits: [B, T, V] predictions for positions 1..T; targets: [B, T] the tokens to predict,
    padded with ``pad_id``. A batch with no real token gives 0 (not NaN).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"caption_xe_loss: logits must be [B, T, V] and targets [B, T], "
            f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    token_loss_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    # Divide by a tensor count (no .item()) so the step never waits for the device.
    num_tokens = (targets != pad_id).sum().clamp(min=1)
    return token_loss_sum / num_tokens


def scst_loss(
    logprobs: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, baselines: torch.Tensor
) -> torch.Tensor:
    """Self-critical REINFORCE: ``-mean_b[(r_b - baseline_b) * sum_t mask * log p(sample_bt)]``.

    logprobs: [B, T] log-probabilities of the sampled tokens; mask: bool [B, T], True up to and
    including the first end-of-sentence token; rewards, baselines: [B]. The advantage is
    detached: it weights the gradient, it is not trained.

    The sequence log-probability is summed over tokens, not divided by the caption length:
    the sum is the log-probability of the whole sample, which is what the REINFORCE gradient
    of the expected reward needs; dividing by length would weight short samples up.
    """
    if logprobs.dim() != 2 or mask.shape != logprobs.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"scst_loss: logprobs must be [B, T] and mask a bool tensor of the same shape, "
            f"got {tuple(logprobs.shape)} and {tuple(mask.shape)} {mask.dtype}"
        )
    batch = logprobs.shape[:1]
    if rewards.shape != batch or baselines.shape != batch:
        raise ValueError(
            f"scst_loss: rewards and baselines must be [B]={batch[0]}, "
            f"got {tuple(rewards.shape)} and {tuple(baselines.shape)}"
        )
    advantage = (rewards - baselines).detach().to(logprobs.dtype)
    # where (not logprobs * mask): positions after <end> may hold -inf, and -inf * 0 is NaN.
    sample_logprob = torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum(dim=1)
    return -(advantage * sample_logprob).mean()
