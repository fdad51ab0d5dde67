"""The stage schedule as pure functions of the global step, and the stage configs."""

import math

import pytest

from cmr.config import ConfigError, from_dict
from cmr.experiment import ExperimentConfig
from cmr.losses import LossConfig
from cmr.train.config import StageConfig, TrainConfig, tutorial_stages
from cmr.train.schedule import StagePlan, stage_lr
from cmr.train.step import stage_weights


def stage(**kw):
    base = {"name": "s", "epochs": 2, "train": ["all"], "losses": {"triplet": 1.0}}
    base.update(kw)
    return from_dict(StageConfig, base)


def test_default_schedule_is_the_tutorial():
    stages = tutorial_stages()
    assert [(s.name, s.epochs) for s in stages] == [("encoders", 50), ("discriminators", 20), ("joint", 100)]
    assert all(s.lr == 1e-4 for s in stages)
    assert stages[1].groups == {"modality_disc", "imagine_disc", "generator"}  # encoders frozen
    assert {"image_backbone", "image_head", "text_encoder"} <= stages[0].groups
    assert stages[2].losses["modality_adv"] == 0.5 and stages[2].losses["scst"] > 0
    cfg = from_dict(ExperimentConfig, {"data": {"shards": "x"}})
    assert cfg.train.optimizer.name == "adam" and cfg.data.batch_size == 64 and cfg.loss.margin == 0.2


def test_stage_of_step_follows_epochs():
    plan = StagePlan((stage(name="a", epochs=2), stage(name="b", epochs=0), stage(name="c", epochs=3)), steps_per_epoch=10)
    assert plan.total_steps == 50
    assert [plan.stage_index_of_step(s) for s in (0, 19, 20, 49)] == [0, 0, 2, 2]
    assert plan.stage_index_of_epoch(2) == 2  # the zero-epoch stage is skipped


def test_warmup_then_cosine_reaches_the_floor():
    s = stage(lr=1.0, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    lrs = [stage_lr(s, i, 104) for i in range(104)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[54] == pytest.approx(0.55)
    assert min(lrs) >= 0.1 and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_step_decay():
    s = stage(lr=1.0, schedule="step", decay_every_steps=10, decay_gamma=0.5)
    assert [stage_lr(s, i, 100) for i in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]


def test_lr_is_indexed_by_global_step_across_stages():
    plan = StagePlan((stage(name="a", lr=1.0), stage(name="b", lr=0.5, warmup_steps=2)), steps_per_epoch=5)
    assert [plan.lr_at(s) for s in (0, 9, 10, 11, 12)] == [1.0, 1.0, 0.25, 0.5, 0.5]


def test_stage_weights_switch_unlisted_terms_off_and_fix_sum_scaling():
    base = LossConfig(margin=0.3)
    s = stage(losses={"triplet": 1.0, "caption_xe": 2.0})
    w = stage_weights(base, s, accumulation_steps=1)
    assert (w.triplet, w.caption_xe, w.modality_adv, w.scst) == (1.0, 2.0, 0.0, 0.0)
    assert w.margin == 0.3 and w.max_violation is True
    w4 = stage_weights(base, s, accumulation_steps=4)
    assert w4.triplet == 4.0 and w4.caption_xe == 2.0  # sum-reduced terms only
    mean = stage_weights(LossConfig(reduction="mean"), s, accumulation_steps=4)
    assert mean.triplet == 1.0


@pytest.mark.parametrize("overrides,message", [
    ({"train": ["wings"]}, "train: unknown parameter group 'wings'"),
    ({"losses": {"magic": 1.0}}, "losses.magic: unknown loss"),
    ({"losses": {"triplet": -1.0}}, "losses.triplet: must be a finite number >= 0"),
    ({"losses": {}}, "losses: a stage needs at least one active loss"),
    ({"schedule": "step"}, "decay_every_steps: must be >= 1"),
    ({"lr": 0.0}, "lr: must be > 0"),
])
def test_bad_stage_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        stage(**overrides)


def test_train_config_errors_carry_the_full_path():
    with pytest.raises(ConfigError, match=r"^train.stages\[1\].losses.bogus: unknown loss"):
        from_dict(ExperimentConfig, {"data": {"shards": "x"}, "train": {"stages": [
            {"name": "a", "epochs": 1, "train": ["all"], "losses": {"triplet": 1}},
            {"name": "b", "epochs": 1, "train": ["all"], "losses": {"bogus": 1}}]}})
    with pytest.raises(ConfigError, match="stage names must be unique"):
        from_dict(TrainConfig, {"stages": [{"name": "a", "epochs": 1, "train": ["all"], "losses": {"triplet": 1}}] * 2})
    assert math.isclose(TrainConfig().optimizer.grad_clip, 2.0)


def test_a_stage_max_violation_overrides_the_loss_section():
    s = stage(max_violation=False)
    assert stage_weights(LossConfig(max_violation=True), s, accumulation_steps=1).max_violation is False
