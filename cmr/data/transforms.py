"""Image augmentation on uint8 ``[3, H, W]`` tensors, and normalisation of uint8 batches.

Workers crop, resize and flip uint8 images (half the cost of the float path, a quarter of
the bytes to ship); ``normalize`` turns a collated uint8 batch into floats later, in the
main process or on the accelerator.

All randomness comes from an explicit ``random.Random``. The pipeline seeds one per
(seed, epoch, sample key), so a sample is augmented identically whatever the number of
workers or ranks, and a resumed run is bit-identical.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as F

from cmr.config import ConfigError


@dataclass
class ImageTransformConfig:
    size: int = 224  # output side (square)
    resize_ratio: float = 256 / 224  # eval: shorter side -> round(size * resize_ratio), centre crop
    scale: tuple[float, float] = (0.5, 1.0)  # train: random resized crop area fraction range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # train: crop aspect ratio (w/h) range
    hflip: float = 0.5  # train: probability of a horizontal flip
    # Normalisation; null = the image backbone's own (ImageNet mean/std for torchvision nets,
    # [-1, 1] for EfficientNet-Lite), filled in when the experiment config is resolved.
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def validate(self) -> None:
        if self.size < 1:
            raise ConfigError("size", f"must be a positive number of pixels, got {self.size}")
        if not self.resize_ratio >= 1.0:
            raise ConfigError(
                "resize_ratio", f"must be >= 1 (resize, then crop), got {self.resize_ratio}"
            )
        low, high = self.scale
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError("scale", f"need 0 < min <= max <= 1, got {list(self.scale)}")
        low, high = self.ratio
        if not 0.0 < low <= high:
            raise ConfigError("ratio", f"need 0 < min <= max, got {list(self.ratio)}")
        if not 0.0 <= self.hflip <= 1.0:
            raise ConfigError("hflip", f"is a probability in [0, 1], got {self.hflip}")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise ConfigError("std", f"every value must be > 0, got {list(self.std)}")

    @property
    def eval_resize(self) -> int:
        """The shorter side the eval path resizes to before centre cropping."""
        return round(self.size * self.resize_ratio)


def random_resized_crop_params(
    height: int, width: int, scale, ratio, rng: random.Random
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop; torchvision's RandomResizedCrop rule, drawn from rng.

    Try 10 times for a crop of random area fraction in ``scale`` and log-uniform aspect
    ratio in ``ratio`` that fits; otherwise centre-crop the whole image clamped to
    ``ratio``.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = rng.randint(0, height - crop_h)
            left = rng.randint(0, width - crop_w)
            return top, left, crop_h, crop_w
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif image_ratio > max(ratio):
        crop_w, crop_h = round(height * max(ratio)), height
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def _check_image(img: torch.Tensor) -> None:
    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(
            f"expected a uint8 [3, H, W] image, got {str(img.dtype).replace('torch.', '')} "
            f"{list(img.shape)}"
        )


def train_transform(
    img: torch.Tensor, cfg: ImageTransformConfig, rng: random.Random
) -> torch.Tensor:
    """Random resized crop + horizontal flip: uint8 [3, H, W] -> uint8 [3, size, size].

    Crop first so only the crop is resized; flip the uint8 result (a cheap copy).
    """
    _check_image(img)
    top, left, crop_h, crop_w = random_resized_crop_params(
        img.shape[1], img.shape[2], cfg.scale, cfg.ratio, rng
    )
    crop = img[:, top : top + crop_h, left : left + crop_w]
    out = F.resize(crop, [cfg.size, cfg.size], antialias=True)
    if rng.random() < cfg.hflip:
        out = torch.flip(out, dims=[-1])
    return out


def eval_transform(img: torch.Tensor, cfg: ImageTransformConfig) -> torch.Tensor:
    """Resize the shorter side to ``cfg.eval_resize`` then centre crop: -> uint8 [3, size, size].

    Same pixels as torchvision's ``Resize(eval_resize) + CenterCrop(size)``.
    """
    _check_image(img)
    out = F.resize(img, [cfg.eval_resize], antialias=True)
    return F.center_crop(out, [cfg.size, cfg.size])


def decode_min_side(cfg: ImageTransformConfig, train: bool) -> int:
    """The smallest shorter side an image may be decoded at without any crop being upsampled.

    Pass it as ``decode_image(..., target_min_side=...)``. For training the smallest
    possible crop side is ``side * sqrt(min_scale * min(min_ratio, 1 / max_ratio))``.
    """
    if not train:
        return cfg.eval_resize
    worst = cfg.scale[0] * min(cfg.ratio[0], 1.0 / cfg.ratio[1])
    return math.ceil(cfg.size / math.sqrt(worst))


@functools.lru_cache(maxsize=16)
def _normalize_constants(mean: tuple, std: tuple, device: torch.device):
    """``1 / (255 std)`` and ``-mean / std`` folded in float64, cached per device (no
    host-to-device copy per batch)."""
    mean_t = torch.tensor(mean, dtype=torch.float64)
    std_t = torch.tensor(std, dtype=torch.float64)
    scale = (1.0 / (255.0 * std_t)).to(torch.float32).view(3, 1, 1)
    offset = (-mean_t / std_t).to(torch.float32).view(3, 1, 1)
    return scale.to(device), offset.to(device)


def normalize(
    images: torch.Tensor,
    mean,
    std,
    dtype: torch.dtype = torch.float32,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` (any device) -> ``(x / 255 - mean) / std`` in ``dtype``.

    Computed as ``x * 1/(255 std) - mean/std`` in place on the float32 copy: on CPU a second
    full-size buffer costs more (fresh pages) than the arithmetic. ``out``: a float32 buffer of
    the same shape to reuse between batches. bf16/fp16 results are the float32 value rounded
    once.
    """
    if images.dtype != torch.uint8 or images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(
            f"normalize expects uint8 [..., 3, H, W] images, got "
            f"{str(images.dtype).replace('torch.', '')} {list(images.shape)}"
        )
    if out is not None and (out.dtype != torch.float32 or out.shape != images.shape):
        raise ValueError(
            f"normalize out= must be float32 {list(images.shape)}, "
            f"got {out.dtype} {list(out.shape)}"
        )
    if mean is None or std is None:
        raise ValueError("normalize needs mean and std (data.image.mean/std are resolved from the "
                         "backbone by ExperimentConfig; pass them when using DataConfig alone)")
    scale, offset = _normalize_constants(tuple(mean), tuple(std), images.device)
    floats = images.to(torch.float32) if out is None else out.copy_(images)
    floats.mul_(scale).add_(offset)
    return floats if dtype == torch.float32 else floats.to(dtype)
