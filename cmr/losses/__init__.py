"""Losses of Look, Imagine and Match: ranking (with cross-rank negatives), adversarial,
captioning, and ``compute_losses`` that weights and sums them for a training step."""

from cmr.losses.adversarial import imagine_adversarial_loss, modality_adversarial_loss
from cmr.losses.captioning import caption_xe_loss, scst_loss
from cmr.losses.gather import distributed_world, gather_no_grad, gather_with_grad
from cmr.losses.ranking import imagine_matching_loss, triplet_loss, triplet_loss_distributed
from cmr.losses.total import LossConfig, LossInputs, LossWeights, active_terms, compute_losses

__all__ = [
    "LossConfig",
    "LossInputs",
    "LossWeights",
    "active_terms",
    "caption_xe_loss",
    "compute_losses",
    "distributed_world",
    "gather_no_grad",
    "gather_with_grad",
    "imagine_adversarial_loss",
    "imagine_matching_loss",
    "modality_adversarial_loss",
    "scst_loss",
    "triplet_loss",
    "triplet_loss_distributed",
]
