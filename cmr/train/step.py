"""One micro-batch: forward through the (wrapped) model, the reward, the losses of a stage."""

from __future__ import annotations

import dataclasses

import torch

from cmr.data.batch import Batch
from cmr.data.transforms import normalize
from cmr.losses import LossConfig, LossInputs, LossWeights, active_terms, compute_losses, scst_loss
from cmr.losses.total import WEIGHT_NAMES
from cmr.reward import RewardPool
from cmr.train.config import StageConfig

_LOSS_INPUT_FIELDS = {f.name for f in dataclasses.fields(LossInputs)}
# Terms whose reduction is a sum over the micro-batch (with reduction: sum). Accelerate
# divides every loss by the accumulation steps k; these are multiplied back by k so that k
# micro-batches of B give the same gradient as one batch of k*B. Mean-reduced terms need no
# correction.
_SUM_TERMS = ("triplet", "imagine_match")


def stage_weights(loss: LossConfig, stage: StageConfig, accumulation_steps: int) -> LossWeights:
    """The loss weights of a stage (its ``losses:``; every unlisted term off) with the shared
    settings of ``loss``, the stage's ``max_violation`` overriding the shared one."""
    weights = {name: float(stage.losses.get(name, 0.0)) for name in WEIGHT_NAMES}
    if loss.reduction == "sum":
        for name in _SUM_TERMS:
            weights[name] *= accumulation_steps
    settings = {f.name: getattr(loss, f.name) for f in dataclasses.fields(LossConfig)}
    if stage.max_violation is not None:
        settings["max_violation"] = stage.max_violation
    return LossWeights(**settings, **weights)


def model_inputs(batch: Batch, mean, std, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixels are shipped as uint8 and normalised here, on the accelerator. ``dtype``: the
    model's own under DeepSpeed bf16/fp16, which (unlike DDP) keeps bf16 weights and does not
    autocast, so float32 inputs would not meet its weights."""
    if batch.images is not None:
        return normalize(batch.images.to(device, non_blocking=True), mean, std, dtype=dtype)
    return batch.features.to(device, dtype=dtype, non_blocking=True)


def forward_and_losses(
    model: torch.nn.Module,
    batch: Batch,
    inputs: torch.Tensor,
    weights: LossWeights,
    stage: StageConfig,
    reward_pool: RewardPool | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted total loss of a micro-batch and its unweighted components."""
    device = inputs.device
    captions, lengths = batch.captions.to(device), batch.lengths.to(device)
    use_scst = weights.scst > 0
    outputs = model(
        inputs, captions, lengths,
        modality=weights.modality_adv > 0,
        imagine=weights.imagine_adv > 0 or weights.imagine_match > 0,
        caption=weights.caption_xe > 0,
        scst=use_scst,
        temperature=stage.sample_temperature,
    )
    future = None
    if use_scst:
        # BLEU runs in the CPU pool while this process computes the other losses.
        future = reward_pool.submit(outputs.sample_ids, outputs.greedy_ids, batch.references())
    # Losses in float32 whatever precision the model ran in.
    values = {k: v.float() if v is not None and v.is_floating_point() else v
              for k, v in outputs.as_dict().items() if k in _LOSS_INPUT_FIELDS}
    loss_inputs, other_weights = LossInputs(**values), dataclasses.replace(weights, scst=0.0)
    total, components = outputs.img_emb.new_zeros(()), {}
    if active_terms(loss_inputs, other_weights):
        total, components = compute_losses(loss_inputs, other_weights)
    if future is not None:
        rewards = future.result()
        scst = scst_loss(
            outputs.sample_logprobs, outputs.sample_mask,
            torch.as_tensor(rewards.rewards, dtype=torch.float32, device=device),
            torch.as_tensor(rewards.baselines, dtype=torch.float32, device=device),
        )
        total = total + weights.scst * scst
        components["scst"] = scst.detach()
        components["reward"] = torch.as_tensor(rewards.rewards.mean(), device=device)
    return total, components
