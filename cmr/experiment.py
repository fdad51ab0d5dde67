"""The whole-run config: one section per component, as in ``configs/*.yaml``.

    python -m cmr.experiment --config configs/emoji.yaml --set data.batch_size=32

checks a config (exit code 2 and a one-line message naming the field if it is wrong) and
prints it resolved, with every default filled in.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from cmr.config import ConfigError, add_config_arguments, config_from_args, save_config, to_dict
from cmr.data.pipeline import DataConfig
from cmr.eval import EvalConfig
from cmr.losses import LossConfig
from cmr.models.backbones import backbone_spec
from cmr.models.lim import LIMConfig
from cmr.reward import RewardConfig
from cmr.train.config import TrainConfig


@dataclasses.dataclass
class ExperimentConfig:
    data: DataConfig
    name: str = "cmr"
    seed: int = 0
    model: LIMConfig = dataclasses.field(default_factory=LIMConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)  # weights: train.stages[i].losses
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def validate(self) -> None:
        image = self.model.image_encoder
        if image.kind == "pixels":
            self._resolve_normalization(image.backbone)
        if image.kind == "features" and self.data.feature_dim is not None:
            if image.feature_dim is None:
                image.feature_dim = self.data.feature_dim
            elif image.feature_dim != self.data.feature_dim:
                raise ConfigError(
                    "model.image_encoder.feature_dim",
                    f"is {image.feature_dim} but data.feature_dim is {self.data.feature_dim}; make them equal",
                )
        if self.data.vocab.glove_extra_words > 0 and self.model.text_encoder.glove is None:
            raise ConfigError(
                "data.vocab.glove_extra_words",
                f"is {self.data.vocab.glove_extra_words} but model.text_encoder.glove is null; "
                "set the GloVe source the extension is drawn from, or set this to 0",
            )

    def _resolve_normalization(self, backbone: str) -> None:
        """Pixels are normalised as the backbone was trained unless the config says otherwise."""
        spec, transform = backbone_spec(backbone), self.data.image
        if transform.mean is None:
            transform.mean = spec.mean
        if transform.std is None:
            transform.std = spec.std

    def resolve_feature_dim(self, dataset_dim: int | None) -> None:
        """Feature models take D from the shards' manifest; a configured D must agree with it."""
        image = self.model.image_encoder
        if image.kind != "features" or dataset_dim is None:
            return
        if image.feature_dim is None:
            image.feature_dim = dataset_dim
        elif image.feature_dim != dataset_dim:
            raise ConfigError(
                "model.image_encoder.feature_dim",
                f"is {image.feature_dim} but the shards hold {dataset_dim}-d features; "
                "set it to null (take it from the manifest) or to the shards' size",
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a config and print it resolved.")
    add_config_arguments(parser)
    parser.add_argument("--save", help="also write the resolved config to this file")
    args = parser.parse_args(argv)
    cfg = config_from_args(ExperimentConfig, args)
    if args.save:
        save_config(cfg, args.save)
    sys.stdout.write(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
