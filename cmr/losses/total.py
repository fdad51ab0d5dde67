"""All loss terms of a training step, weighted by one stage's LossWeights, summed into one scalar.

A training stage switches parts of the model on and off; the losses follow without extra
flags: a term is computed only when its weight is above zero and the model produced its
inputs. The total is what goes to ``backward``; the unweighted components are for logging.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, ClassVar, Literal

import torch

from cmr.config import ConfigError
from cmr.losses.adversarial import imagine_adversarial_loss, modality_adversarial_loss
from cmr.losses.captioning import caption_xe_loss, scst_loss
from cmr.losses.ranking import imagine_matching_loss, triplet_loss_distributed
from cmr.models.layers import PAD_ID


# The terms, in the order they are computed and logged; each is a key of a stage's ``losses:``.
WEIGHT_NAMES = ("triplet", "modality_adv", "imagine_adv", "imagine_match", "caption_xe", "scst")


@dataclasses.dataclass
class LossConfig:
    """The ``loss:`` section: settings the terms share. The weights are not here: each stage
    lists its terms and their weights (``train.stages[i].losses``)."""

    # Fields that moved or went, with where to look instead (``from_dict`` says so).
    REMOVED_FIELDS: ClassVar[dict[str, str]] = {
        **{name: "loss weights are set per stage in train.stages[i].losses" for name in WEIGHT_NAMES},
        "pad_id": "removed: captions are padded with the vocabulary's id 0, which is not a setting",
    }

    margin: float = 0.2  # hinge margin of the triplet and imagine-matching terms
    max_violation: bool = True  # hardest negative only (VSE++) instead of the sum of negatives
    reduction: Literal["sum", "mean"] = "sum"  # over the pairs of the batch, for both hinges
    cross_rank_negatives: bool = False  # triplet negatives from all ranks, not only this one
    label_smoothing: float = 0.0  # of the caption cross-entropy

    def validate(self) -> None:
        if not math.isfinite(self.margin) or self.margin < 0:
            raise ConfigError("margin", f"must be a finite number >= 0, got {self.margin}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")


@dataclasses.dataclass
class LossWeights(LossConfig):
    """What ``compute_losses`` runs with: the weight of each term (0, the default, switches it
    off) and the shared settings. A stage's are built by ``cmr.train.step.stage_weights``;
    this is not a config section."""

    triplet: float = 0.0
    modality_adv: float = 0.0
    imagine_adv: float = 0.0
    imagine_match: float = 0.0
    caption_xe: float = 0.0
    scst: float = 0.0

    def validate(self) -> None:
        super().validate()
        for name in WEIGHT_NAMES:
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(name, f"loss weight must be a finite number >= 0, got {value}")


@dataclasses.dataclass
class LossInputs:
    """What the model (and the reward) produced for one batch; None where a part is off.

    img_emb, txt_emb: [B, D] matching pairs. img_ids: optional [B] image ids (captions of one
    image are then not each other's negatives). modality_*_logits: [B] or [B, 1] from the
    modality discriminator. imagined_emb: [B, D]; imagine_real/fake_logits from the
    imagination discriminator. decoder_logits [B, T, V] with decoder_targets [B, T].
    sample_logprobs [B, T], sample_mask bool [B, T], rewards [B], baselines [B] for SCST.
    """

    img_emb: torch.Tensor | None = None
    txt_emb: torch.Tensor | None = None
    modality_img_logits: torch.Tensor | None = None
    modality_txt_logits: torch.Tensor | None = None
    imagined_emb: torch.Tensor | None = None
    imagine_real_logits: torch.Tensor | None = None
    imagine_fake_logits: torch.Tensor | None = None
    decoder_logits: torch.Tensor | None = None
    decoder_targets: torch.Tensor | None = None
    sample_logprobs: torch.Tensor | None = None
    sample_mask: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    baselines: torch.Tensor | None = None
    img_ids: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class _Term:
    own_inputs: tuple[str, ...]  # all None: the part is switched off and the term is skipped
    needed_inputs: tuple[str, ...]  # own inputs plus any shared with other terms
    compute: Callable[[LossInputs, LossWeights], torch.Tensor]


def _triplet(x: LossInputs, w: LossWeights) -> torch.Tensor:
    # Without an initialised process group this is the plain in-batch triplet loss. DDP-style
    # gradient averaging is assumed (rank_reduction="mean"), like every other term here.
    return triplet_loss_distributed(
        x.img_emb, x.txt_emb, w.margin, w.max_violation, w.reduction, x.img_ids,
        gather=w.cross_rank_negatives, rank_reduction="mean",
    )


# img_emb is shared by the triplet, imagine-matching (and the decoder), so it does not switch
# a term on by itself; txt_emb and imagined_emb do.
TERMS: dict[str, _Term] = {
    "triplet": _Term(("txt_emb",), ("img_emb", "txt_emb"), _triplet),
    "modality_adv": _Term(
        ("modality_img_logits", "modality_txt_logits"),
        ("modality_img_logits", "modality_txt_logits"),
        lambda x, w: modality_adversarial_loss(x.modality_img_logits, x.modality_txt_logits),
    ),
    "imagine_adv": _Term(
        ("imagine_real_logits", "imagine_fake_logits"),
        ("imagine_real_logits", "imagine_fake_logits"),
        lambda x, w: imagine_adversarial_loss(x.imagine_real_logits, x.imagine_fake_logits),
    ),
    "imagine_match": _Term(
        ("imagined_emb",),
        ("imagined_emb", "img_emb"),
        lambda x, w: imagine_matching_loss(
            x.imagined_emb, x.img_emb, w.margin, w.max_violation, w.reduction, x.img_ids
        ),
    ),
    "caption_xe": _Term(
        ("decoder_logits", "decoder_targets"),
        ("decoder_logits", "decoder_targets"),
        lambda x, w: caption_xe_loss(
            x.decoder_logits, x.decoder_targets, PAD_ID, w.label_smoothing
        ),
    ),
    "scst": _Term(
        ("sample_logprobs", "sample_mask", "rewards", "baselines"),
        ("sample_logprobs", "sample_mask", "rewards", "baselines"),
        lambda x, w: scst_loss(x.sample_logprobs, x.sample_mask, x.rewards, x.baselines),
    ),
}


def active_terms(inputs: LossInputs, weights: LossWeights) -> list[str]:
    """Names of the terms ``compute_losses`` will compute, in a fixed order."""
    names = []
    for name, term in TERMS.items():
        if getattr(weights, name) == 0:
            continue
        if all(getattr(inputs, field) is None for field in term.own_inputs):
            continue
        missing = [field for field in term.needed_inputs if getattr(inputs, field) is None]
        if missing:
            raise ValueError(
                f"loss '{name}' has weight {getattr(weights, name)} but LossInputs."
                f"{missing[0]} is missing (give it, or set the weight to 0)"
            )
        names.append(name)
    return names


def compute_losses(
    inputs: LossInputs, weights: LossWeights
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(total, components): total = sum of weight * component over the active terms.

    Components are the unweighted, detached per-term losses (scalar tensors, so logging them
    costs no device sync until someone calls ``.item()``). Raises ``ValueError`` when no term
    is active, since a step with nothing to train is a configuration mistake.
    """
    names = active_terms(inputs, weights)
    if not names:
        raise ValueError(
            "compute_losses: no loss term is active (every term has weight 0 or no inputs)"
        )
    total = None
    components = {}
    for name in names:
        value = TERMS[name].compute(inputs, weights)
        weighted = getattr(weights, name) * value
        total = weighted if total is None else total + weighted
        components[name] = value.detach()
    return total, components
