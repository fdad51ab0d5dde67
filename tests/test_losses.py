"""Loss terms against brute-force definitions, gradchecks, and the weighted total."""

import math

import pytest
import torch
import torch.nn.functional as F

from cmr.config import ConfigError, from_dict
from cmr.losses import (
    LossConfig,
    LossInputs,
    LossWeights,
    caption_xe_loss,
    compute_losses,
    imagine_adversarial_loss,
    imagine_matching_loss,
    modality_adversarial_loss,
    scst_loss,
    triplet_loss,
)
from cmr.losses.total import TERMS, WEIGHT_NAMES

NUM_PAIRS, DIM = 6, 5
# Captions 0 and 1 show one image, and so do 3 and 4.
IMG_IDS = torch.tensor([7, 7, 2, 9, 9, 4])


def random_pairs(seed: int, dtype=torch.float64, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    img = torch.randn(NUM_PAIRS, DIM, generator=generator, dtype=dtype)
    txt = torch.randn(NUM_PAIRS, DIM, generator=generator, dtype=dtype)
    return img.requires_grad_(requires_grad), txt.requires_grad_(requires_grad)


def brute_force_per_pair(img, txt, margin, max_violation, excluded):
    """The VSE++ definition written as loops; excluded[i][j]: (image i, caption j) no negative."""
    def score(i, j):
        return float(img[i] @ txt[j])

    aggregate = (lambda costs: max(costs, default=0.0)) if max_violation else sum
    per_pair = []
    for k in range(len(img)):
        caption_costs = [
            max(0.0, margin + score(k, j) - score(k, k))
            for j in range(len(txt)) if j != k and not excluded[k][j]
        ]
        image_costs = [
            max(0.0, margin + score(i, k) - score(k, k))
            for i in range(len(img)) if i != k and not excluded[i][k]
        ]
        per_pair.append(aggregate(caption_costs) + aggregate(image_costs))
    return per_pair


def exclusions(use_ids: bool, mask) -> list[list[bool]]:
    return [
        [
            bool(use_ids and IMG_IDS[i] == IMG_IDS[j]) or bool(mask is not None and mask[i, j])
            for j in range(NUM_PAIRS)
        ]
        for i in range(NUM_PAIRS)
    ]


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("margin", [0.2, 1.5])
@pytest.mark.parametrize("use_ids", [False, True])
@pytest.mark.parametrize("use_mask", [False, True])
def test_triplet_loss_equals_brute_force_loop(max_violation, margin, use_ids, use_mask):
    img, txt = random_pairs(seed=0)
    mask = torch.rand(NUM_PAIRS, NUM_PAIRS, generator=torch.Generator().manual_seed(1)) < 0.3
    mask = mask if use_mask else None
    ids = IMG_IDS if use_ids else None
    expected = brute_force_per_pair(img, txt, margin, max_violation, exclusions(use_ids, mask))
    kwargs = dict(margin=margin, max_violation=max_violation, mask=mask, img_ids=ids)

    per_pair = triplet_loss(img, txt, reduction="none", **kwargs)
    torch.testing.assert_close(per_pair, torch.tensor(expected, dtype=img.dtype), atol=1e-6, rtol=0)
    total = triplet_loss(img, txt, reduction="sum", **kwargs).item()
    assert total == pytest.approx(sum(expected), abs=1e-6)
    mean = triplet_loss(img, txt, reduction="mean", **kwargs).item()
    assert mean == pytest.approx(sum(expected) / NUM_PAIRS, abs=1e-6)


def test_triplet_loss_exclusions_matter():
    # Guards against a vacuous brute-force match: ids and the mask must change the loss.
    img, txt = random_pairs(seed=0)
    plain = triplet_loss(img, txt, max_violation=False)
    assert triplet_loss(img, txt, max_violation=False, img_ids=IMG_IDS) < plain - 1e-3
    everything_masked = torch.ones(NUM_PAIRS, NUM_PAIRS, dtype=torch.bool)
    assert triplet_loss(img, txt, mask=everything_masked).item() == 0.0


def test_triplet_loss_is_zero_when_positives_win_by_the_margin():
    identity = torch.eye(4)
    assert triplet_loss(identity, identity, margin=0.2).item() == 0.0
    # Margin larger than the gap: each of the 4 pairs pays (1.5 - 1) in both directions.
    assert triplet_loss(identity, identity, margin=1.5).item() == pytest.approx(4 * 2 * 0.5)


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_triplet_loss_gradcheck(max_violation, reduction):
    img, txt = random_pairs(seed=3, requires_grad=True)

    def loss(img, txt):
        return triplet_loss(img, txt, margin=0.2, max_violation=max_violation,
                            reduction=reduction, img_ids=IMG_IDS)

    assert loss(img, txt).item() > 0  # the hinge is active, so the gradient is not trivially 0
    assert torch.autograd.gradcheck(loss, (img, txt))


def test_imagine_matching_loss_is_one_direction_of_the_hinge():
    imagined, img = random_pairs(seed=4)
    for max_violation in (True, False):
        aggregate = (lambda c: max(c, default=0.0)) if max_violation else sum
        expected = sum(
            aggregate([
                max(0.0, 0.2 + float(imagined[k] @ img[j]) - float(imagined[k] @ img[k]))
                for j in range(NUM_PAIRS) if j != k and IMG_IDS[j] != IMG_IDS[k]
            ])
            for k in range(NUM_PAIRS)
        )
        got = imagine_matching_loss(imagined, img, 0.2, max_violation, "sum", img_ids=IMG_IDS)
        assert got.item() == pytest.approx(expected, abs=1e-6)
    imagined.requires_grad_(True)
    img.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: imagine_matching_loss(a, b, margin=0.2, max_violation=True), (imagined, img)
    )


def test_ranking_losses_reject_mismatched_shapes():
    with pytest.raises(ValueError, match=r"img and txt must both be \[batch, dim\]"):
        triplet_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="img_ids must be"):
        triplet_loss(torch.randn(4, 3), torch.randn(4, 3), img_ids=torch.arange(3))
    with pytest.raises(ValueError, match="reduction must be"):
        triplet_loss(torch.randn(4, 3), torch.randn(4, 3), reduction="avg")


def bce_by_hand(logits: torch.Tensor, label: float) -> torch.Tensor:
    probs = torch.sigmoid(logits.reshape(-1))
    return F.binary_cross_entropy(probs, torch.full_like(probs, label))


def test_adversarial_losses_are_bce_with_images_and_real_as_label_one():
    generator = torch.Generator().manual_seed(5)
    img_logits = torch.randn(6, 1, generator=generator, dtype=torch.float64)
    txt_logits = torch.randn(6, 1, generator=generator, dtype=torch.float64)
    expected = 0.5 * (bce_by_hand(img_logits, 1.0) + bce_by_hand(txt_logits, 0.0))
    torch.testing.assert_close(modality_adversarial_loss(img_logits, txt_logits), expected)
    torch.testing.assert_close(imagine_adversarial_loss(img_logits, txt_logits), expected)
    # Swapping the sides changes the value: the labels are not symmetric.
    assert not torch.allclose(modality_adversarial_loss(txt_logits, img_logits), expected)
    # Unequal sides are averaged on their own and count equally; [B] logits work too.
    short = torch.randn(2, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(
        imagine_adversarial_loss(img_logits.reshape(-1), short),
        0.5 * (bce_by_hand(img_logits, 1.0) + bce_by_hand(short, 0.0)),
    )
    assert modality_adversarial_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(
        math.log(2)
    )


def test_adversarial_loss_rejects_a_logit_matrix():
    with pytest.raises(ValueError, match=r"real logits must be a non-empty \[B\] or \[B, 1\]"):
        modality_adversarial_loss(torch.zeros(4, 2), torch.zeros(4))


PAD = 0


def caption_batch(seed: int = 6):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 11, generator=generator, dtype=torch.float64)
    targets = torch.randint(1, 11, (3, 5), generator=generator)
    targets[0, 3:] = PAD
    targets[2, 1:] = PAD
    return logits, targets


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_caption_xe_is_the_mean_over_real_tokens(label_smoothing):
    logits, targets = caption_batch()
    logprobs = logits.log_softmax(dim=-1)
    # Label smoothing spreads label_smoothing of the target mass uniformly over the vocabulary.
    token_losses = [
        -(1 - label_smoothing) * logprobs[b, t, targets[b, t]]
        - label_smoothing * logprobs[b, t].mean()
        for b in range(3) for t in range(5) if targets[b, t] != PAD
    ]
    expected = torch.stack(token_losses).mean()
    got = caption_xe_loss(logits, targets, pad_id=PAD, label_smoothing=label_smoothing)
    torch.testing.assert_close(got, expected)


def test_caption_xe_ignores_padded_positions():
    logits, targets = caption_batch()
    logits.requires_grad_(True)
    caption_xe_loss(logits, targets, pad_id=PAD).backward()
    padded = targets == PAD
    assert torch.equal(logits.grad[padded], torch.zeros_like(logits.grad[padded]))
    assert logits.grad[~padded].abs().sum() > 0
    changed = logits.detach().clone()
    changed[padded] = 100.0
    assert torch.equal(caption_xe_loss(changed, targets), caption_xe_loss(logits.detach(), targets))
    assert caption_xe_loss(logits, torch.zeros_like(targets)).item() == 0.0  # all padding: 0


def sampled_sequences():
    """A tiny policy: per-step logits for 2 samples over a vocabulary of 4, length 3."""
    generator = torch.Generator().manual_seed(8)
    policy_logits = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64)
    samples = torch.tensor([[1, 3, 2], [3, 2, 0]])
    # Sample 0 ends at step 3; sample 1 emits <end> at step 2 and step 3 is after it.
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return policy_logits.requires_grad_(True), samples, mask


def sample_logprobs(policy_logits, samples):
    return policy_logits.log_softmax(-1).gather(2, samples[..., None]).squeeze(-1)


def test_scst_pushes_up_the_higher_reward_sample():
    policy_logits, samples, mask = sampled_sequences()
    optimizer = torch.optim.SGD([policy_logits], lr=0.1)
    before = (sample_logprobs(policy_logits, samples) * mask).sum(1).detach()
    rewards, baselines = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    loss = scst_loss(sample_logprobs(policy_logits, samples), mask, rewards, baselines)
    expected = -((rewards - baselines).double() * before).mean()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert torch.equal(policy_logits.grad[1, 2], torch.zeros(4, dtype=torch.float64))  # masked
    optimizer.step()
    after = (sample_logprobs(policy_logits, samples) * mask).sum(1).detach()
    assert after[0] > before[0]  # reward above baseline: more likely
    assert after[1] < before[1]  # reward below baseline: less likely


def test_scst_zero_advantage_gives_exactly_zero_gradient_and_no_reward_gradient():
    policy_logits, samples, mask = sampled_sequences()
    rewards = torch.tensor([0.3, 0.7], requires_grad=True)
    scst_loss(sample_logprobs(policy_logits, samples), mask, rewards, rewards.detach()).backward()
    assert torch.equal(policy_logits.grad, torch.zeros_like(policy_logits))
    assert rewards.grad is None  # the advantage is detached


def test_scst_ignores_minus_infinity_after_the_end():
    policy_logits, samples, mask = sampled_sequences()
    logprobs = sample_logprobs(policy_logits, samples).detach().clone()
    reference = scst_loss(logprobs, mask, torch.tensor([1.0, 0.0]), torch.zeros(2))
    logprobs[~mask] = -math.inf
    got = scst_loss(logprobs, mask, torch.tensor([1.0, 0.0]), torch.zeros(2))
    assert torch.equal(got, reference)


def test_loss_config_defaults_and_validation_name_the_field():
    cfg = from_dict(LossConfig, {})
    assert (cfg.margin, cfg.max_violation, cfg.reduction) == (0.2, True, "sum")
    for field, value in [("margin", -0.1), ("label_smoothing", 1.0)]:
        with pytest.raises(ConfigError) as err:
            from_dict(LossConfig, {field: value})
        assert err.value.field == field
        assert str(err.value).startswith(f"{field}: ")
    with pytest.raises(ConfigError, match="reduction: expected one of"):
        from_dict(LossConfig, {"reduction": "avg"})


def test_loss_weights_are_off_unless_given_and_checked():
    weights = LossWeights()
    assert all(getattr(weights, name) == 0.0 for name in WEIGHT_NAMES) and weights.margin == 0.2
    for field, value in [("modality_adv", -0.5), ("scst", math.nan)]:
        with pytest.raises(ConfigError, match=f"^{field}: loss weight must be"):
            from_dict(LossWeights, {field: value})


@pytest.mark.parametrize("name", WEIGHT_NAMES)
def test_a_weight_in_the_loss_section_says_where_weights_live(name):
    # loss.<weight> used to be accepted and then ignored: every stage sets its own weights.
    with pytest.raises(ConfigError) as err:
        from_dict(LossConfig, {name: 1.0}, "loss")
    assert str(err.value) == f"loss.{name}: loss weights are set per stage in train.stages[i].losses"


def test_every_weight_is_a_term_in_compute_order():
    assert tuple(TERMS) == WEIGHT_NAMES


def full_inputs(seed: int = 9) -> LossInputs:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, requires_grad=True)

    logits, targets = caption_batch(seed)
    policy_logits, samples, mask = sampled_sequences()
    return LossInputs(
        img_emb=randn(3, 4), txt_emb=randn(3, 4),
        modality_img_logits=randn(3, 1), modality_txt_logits=randn(3, 1),
        imagined_emb=randn(3, 4), imagine_real_logits=randn(3, 1), imagine_fake_logits=randn(3, 1),
        decoder_logits=logits.float().requires_grad_(True), decoder_targets=targets,
        sample_logprobs=sample_logprobs(policy_logits, samples).float(), sample_mask=mask,
        rewards=torch.tensor([0.9, 0.1]), baselines=torch.tensor([0.5, 0.5]),
    )


def test_compute_losses_total_is_the_weighted_sum_of_components():
    weights = LossWeights(triplet=1.0, modality_adv=0.5, imagine_adv=0.25, imagine_match=2.0,
                          caption_xe=0.7, scst=0.3)
    inputs = full_inputs()
    total, components = compute_losses(inputs, weights)
    assert list(components) == ["triplet", "modality_adv", "imagine_adv", "imagine_match",
                                "caption_xe", "scst"]
    expected = sum(getattr(weights, name) * value for name, value in components.items())
    torch.testing.assert_close(total.detach(), expected)
    assert components["triplet"].item() == pytest.approx(
        triplet_loss(inputs.img_emb, inputs.txt_emb).item()
    )
    assert not any(value.requires_grad for value in components.values())
    total.backward()
    assert inputs.img_emb.grad is not None and inputs.decoder_logits.grad is not None


def test_compute_losses_skips_terms_switched_off_or_without_inputs():
    inputs = full_inputs()
    inputs.modality_img_logits = inputs.modality_txt_logits = None  # part off in this stage
    inputs.imagined_emb = None
    # Weight 0 means "not computed": these malformed inputs would raise if they were used.
    inputs.decoder_logits = torch.zeros(2)
    total, components = compute_losses(inputs, LossWeights(triplet=1.0, modality_adv=0.5, imagine_adv=0.5, imagine_match=1.0))
    assert set(components) == {"triplet", "imagine_adv"}
    expected = components["triplet"] + 0.5 * components["imagine_adv"]
    torch.testing.assert_close(total.detach(), expected)


def test_compute_losses_reports_a_half_given_term_and_an_empty_step():
    inputs = full_inputs()
    inputs.rewards = None
    with pytest.raises(ValueError, match=r"loss 'scst' has weight 0.3 but LossInputs.rewards"):
        compute_losses(inputs, LossWeights(scst=0.3))
    with pytest.raises(ValueError, match="no loss term is active"):
        compute_losses(LossInputs(img_emb=torch.randn(2, 3)), LossWeights())


def test_compute_losses_uses_the_configured_margin_and_hinge():
    inputs = full_inputs()
    weights = LossWeights(margin=0.7, max_violation=False, reduction="mean",
                          cross_rank_negatives=True, triplet=1.0)
    _, components = compute_losses(inputs, weights)
    expected = triplet_loss(inputs.img_emb, inputs.txt_emb, margin=0.7, max_violation=False,
                            reduction="mean")
    torch.testing.assert_close(components["triplet"], expected.detach())

