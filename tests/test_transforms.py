"""uint8 image transforms: exactness against torchvision, determinism from an explicit rng."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torchvision.transforms import v2

from cmr.config import ConfigError, from_dict
from cmr.data.transforms import (
    ImageTransformConfig,
    decode_min_side,
    eval_transform,
    normalize,
    random_resized_crop_params,
    train_transform,
)


def photo(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A random uint8 image: no symmetry, so a flip or an off-by-one crop shows."""
    return torch.randint(
        0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


SMALL = ImageTransformConfig(size=32, resize_ratio=40 / 32)


@pytest.mark.parametrize("shape", [(50, 80), (90, 40), (20, 25), (300, 200)])
def test_outputs_are_uint8_square(shape):
    img = photo(*shape)
    for out in (train_transform(img, SMALL, random.Random(0)), eval_transform(img, SMALL)):
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)


def test_same_seed_same_output_and_different_seeds_differ():
    img = photo(60, 90)
    first = train_transform(img, SMALL, random.Random(123))
    assert torch.equal(first, train_transform(img, SMALL, random.Random(123)))
    others = [train_transform(img, SMALL, random.Random(seed)) for seed in range(1, 9)]
    assert sum(torch.equal(first, other) for other in others) == 0


def test_train_transform_is_a_resized_crop_then_flip():
    """Same pixels as torchvision's resized_crop for the crop drawn from the same rng."""
    img = photo(70, 100)
    for seed in range(6):
        rng = random.Random(seed)
        top, left, h, w = random_resized_crop_params(70, 100, SMALL.scale, SMALL.ratio, rng)
        expected = v2.functional.resized_crop(img, top, left, h, w, [32, 32], antialias=True)
        if rng.random() < SMALL.hflip:
            expected = expected.flip(-1)
        assert torch.equal(train_transform(img, SMALL, random.Random(seed)), expected)


def test_hflip_mirrors_the_same_crop():
    img = photo(60, 90)
    never = ImageTransformConfig(size=32, hflip=0.0)
    always = ImageTransformConfig(size=32, hflip=1.0)
    plain = train_transform(img, never, random.Random(5))
    flipped = train_transform(img, always, random.Random(5))
    assert not torch.equal(plain, flipped)
    assert torch.equal(flipped, plain[:, :, torch.arange(31, -1, -1)])


def test_hflip_probability():
    img = photo(20, 30)
    never = ImageTransformConfig(size=8, hflip=0.0)
    half = ImageTransformConfig(size=8, hflip=0.5)
    num_flipped = sum(
        not torch.equal(
            train_transform(img, half, random.Random(s)),
            train_transform(img, never, random.Random(s)),
        )
        for s in range(300)
    )
    assert 110 < num_flipped < 190  # binomial(300, 0.5): mean 150, sd ~8.7


def test_crop_params_respect_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(500):
        top, left, h, w = random_resized_crop_params(120, 160, (0.3, 0.8), (0.5, 2.0), rng)
        assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 160
        assert 0.3 * 0.95 <= h * w / (120 * 160) <= 0.8 * 1.05
        assert 0.5 * 0.95 <= w / h <= 2.0 * 1.05


def test_crop_params_fall_back_to_a_centre_crop():
    """A 10x1000 strip can't hold a crop with >= 90% of its area and w/h <= 4/3."""
    params = random_resized_crop_params(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0))
    assert params == (0, 493, 10, 13)
    params = random_resized_crop_params(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0))
    assert params == (493, 0, 13, 10)


@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (100, 150), (256, 256)])
def test_eval_matches_torchvision_resize_and_centre_crop(shape):
    cfg = ImageTransformConfig()
    img = photo(*shape)
    reference = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])
    assert torch.equal(eval_transform(img, cfg), reference(img))


def test_eval_of_a_channels_last_decode_matches_contiguous():
    """decode_jpeg returns channels-last strides; the result must not depend on layout."""
    img = photo(120, 90)
    channels_last = img.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert torch.equal(eval_transform(channels_last, SMALL), eval_transform(img, SMALL))
    assert torch.equal(
        train_transform(channels_last, SMALL, random.Random(3)),
        train_transform(img, SMALL, random.Random(3)),
    )


def test_transforms_reject_non_uint8_chw():
    with pytest.raises(ValueError, match=r"uint8 \[3, H, W\]"):
        train_transform(photo(10, 10).float(), SMALL, random.Random(0))
    with pytest.raises(ValueError, match=r"uint8 \[3, H, W\]"):
        eval_transform(photo(10, 10)[:1], SMALL)


def test_decode_min_side_never_needs_upsampling():
    cfg = ImageTransformConfig()
    assert decode_min_side(cfg, train=False) == 256
    side = decode_min_side(cfg, train=True)
    assert side == math.ceil(224 / math.sqrt(0.5 * 0.75))
    rng = random.Random(0)
    crops = [random_resized_crop_params(side, side, cfg.scale, cfg.ratio, rng) for _ in range(2000)]
    smallest = min(min(h, w) for _, _, h, w in crops)
    assert 224 - 1 <= smallest < 235  # the bound is tight; rounding may lose one pixel


def test_normalize_matches_torchvision():
    batch = photo(16, 20).unsqueeze(0).repeat(4, 1, 1, 1)
    batch[1] = 0
    batch[2] = 255
    cfg = ImageTransformConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    reference = v2.Normalize(cfg.mean, cfg.std)(batch.float() / 255)
    out = normalize(batch, cfg.mean, cfg.std)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    assert (out - reference).abs().max() < 1e-6
    assert (normalize(batch[0], cfg.mean, cfg.std) - reference[0]).abs().max() < 1e-6
    bf16 = normalize(batch, cfg.mean, cfg.std, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, out.to(torch.bfloat16))
    buffer = torch.full(batch.shape, float("nan"))
    reused = normalize(batch, cfg.mean, cfg.std, out=buffer)
    assert reused.data_ptr() == buffer.data_ptr() and torch.equal(reused, out)


def test_normalize_rejects_float_input():
    with pytest.raises(ValueError, match="uint8"):
        normalize(torch.zeros(2, 3, 4, 4), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="out= must be float32"):
        normalize(photo(4, 4), (0.5,) * 3, (0.5,) * 3, out=torch.zeros(3, 4, 5))


def test_config_defaults_and_validation():
    cfg = from_dict(ImageTransformConfig, {"scale": [0.25, 1.0], "size": 160})
    assert cfg.scale == (0.25, 1.0) and cfg.eval_resize == round(160 * 256 / 224)
    bad = {
        "size": {"size": 0},
        "resize_ratio": {"resize_ratio": 0.9},
        "scale": {"scale": [0.8, 0.5]},
        "ratio": {"ratio": [0.0, 1.0]},
        "hflip": {"hflip": 1.5},
        "std": {"std": [0.2, 0.0, 0.2]},
    }
    for field, values in bad.items():
        with pytest.raises(ConfigError) as info:
            from_dict(ImageTransformConfig, values)
        assert info.value.field == field and "\n" not in str(info.value)
