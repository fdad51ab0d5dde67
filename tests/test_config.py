"""The typed config system: YAML + --set overrides, one-line errors naming the field, exit 2."""

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

from cmr.config import (
    ConfigError, add_config_arguments, drop_removed_fields, from_dict, load_config, save_config, to_dict,
)
from cmr.experiment import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Inner:
    size: int = 3
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"
    names: list[str] = dataclasses.field(default_factory=list)
    pair: tuple[float, float] = (1.0, 2.0)
    path: str | None = None

    def validate(self):
        if self.size < 1:
            raise ConfigError("size", "must be >= 1")


@dataclasses.dataclass
class Outer:
    required: str
    inner: Inner = dataclasses.field(default_factory=Inner)
    flag: bool = False


def test_from_dict_builds_nested_and_converts():
    cfg = from_dict(Outer, {"required": "x", "inner": {"size": 4, "rate": 1, "pair": [3, 4], "names": ["p"]}})
    assert cfg.inner.size == 4 and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.pair == (3.0, 4.0) and cfg.inner.names == ["p"]
    assert to_dict(cfg)["inner"]["pair"] == [3.0, 4.0]


@pytest.mark.parametrize("data,message", [
    ({}, "^required: required field is missing$"),
    ({"required": "x", "extra": 1}, r"^extra: unknown field \(known: flag, inner, required\)$"),
    ({"required": "x", "inner": {"size": "big"}}, "^inner.size: expected int, got 'big'$"),
    ({"required": "x", "inner": {"size": True}}, "^inner.size: expected int, got True$"),
    ({"required": "x", "inner": {"size": 0}}, "^inner.size: must be >= 1$"),
    ({"required": "x", "inner": {"mode": "c"}}, "^inner.mode: expected one of 'a', 'b', got 'c'$"),
    ({"required": "x", "inner": {"names": ["a", 2]}}, r"^inner.names\[1\]: expected a string, got 2$"),
    ({"required": "x", "inner": {"pair": [1]}}, "^inner.pair: expected 2 items, got 1$"),
    ({"required": "x", "inner": 5}, "^inner: expected a mapping for Inner, got 5$"),
    ({"required": "x", "flag": "yes"}, "^flag: expected true or false, got 'yes'$"),
])
def test_errors_are_one_line_and_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(Outer, data)
    assert "\n" not in str(err.value)


def test_overrides_apply_on_top_of_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"required": "file", "inner": {"size": 2}}))
    cfg = load_config(Outer, path, ["inner.size=7", "inner.names=[a, b]", "flag=true", "inner.path=null"])
    assert (cfg.required, cfg.inner.size, cfg.inner.names, cfg.flag, cfg.inner.path) == ("file", 7, ["a", "b"], True, None)
    with pytest.raises(ConfigError, match="^inner.bogus: unknown field"):
        load_config(Outer, path, ["inner.bogus=1"])
    with pytest.raises(ConfigError, match="^required: is not a section"):
        load_config(Outer, path, ["required.x=1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ExperimentConfig, REPO / "configs" / "emoji.yaml")
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(ExperimentConfig, tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert not list((tmp_path / "run").glob("*.tmp"))


SHIPPED = sorted([*REPO.glob("configs/*.yaml"), *REPO.glob("configs/ablation/*.yaml"), *REPO.glob("tests/fixtures/*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_is_valid(path):
    cfg = load_config(ExperimentConfig, path)
    assert cfg.data.shards


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cmr.experiment", *args], cwd=REPO, capture_output=True, text=True)


def test_cli_bad_config_exits_2_with_one_line():
    result = run_cli("--config", "configs/emoji.yaml", "--set", "data.batch_size=abc")
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: data.batch_size: expected int, got 'abc'"
    result = run_cli("--config", "configs/missing.yaml")
    assert result.returncode == 2 and "file not found" in result.stderr and "Traceback" not in result.stderr


def test_cli_prints_resolved_config_with_defaults(tmp_path):
    result = run_cli("--config", "configs/emoji.yaml", "--set", "data.batch_size=16", "--save", str(tmp_path / "r.yaml"))
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["data"]["batch_size"] == 16
    assert printed["data"]["max_bad_fraction"] == 0.01  # a default, filled in
    assert yaml.safe_load((tmp_path / "r.yaml").read_text()) == printed


def test_yaml_no_reaches_a_literal_field_as_the_word():
    cfg = load_config(ExperimentConfig, REPO / "configs" / "emoji.yaml", ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"


def parse(*argv):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_config_arguments(parser)
    parser.add_argument("--run-dir")
    return parser.parse_args(argv)


def test_one_set_takes_several_assignments_and_set_repeats():
    args = parse("--set", "a.b=1", "c=[x, y]", "--run-dir", "out", "--set", "d=2", "--config", "c.yaml")
    assert args.overrides == ["a.b=1", "c=[x, y]", "d=2"]
    assert (args.run_dir, args.config) == ("out", "c.yaml")
    assert parse("--set", "a=1", "--set", "b=2").overrides == ["a=1", "b=2"]
    assert parse("--set", "a=-1", "b=--x").overrides == ["a=-1", "b=--x"]
    assert parse("--set=a=1", "--set", "b=2").overrides == ["a=1", "b=2"]
    assert parse().overrides == []


def test_a_word_after_set_that_is_no_assignment_is_an_error_not_an_override():
    with pytest.raises(argparse.ArgumentError, match="expected SECTION.KEY=VALUE, got 'runs/x'"):
        parse("--set", "a=1", "runs/x")


def test_cli_several_overrides_after_one_set():
    result = run_cli("--config", "configs/emoji.yaml", "--set", "data.batch_size=16", "seed=3", "name=two")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert (printed["data"]["batch_size"], printed["seed"], printed["name"]) == (16, 3, "two")


def test_a_loss_weight_set_in_the_loss_section_says_where_it_moved():
    with pytest.raises(ConfigError) as err:
        load_config(ExperimentConfig, REPO / "configs" / "emoji.yaml", ["loss.modality_adv=1"])
    assert str(err.value) == "loss.modality_adv: loss weights are set per stage in train.stages[i].losses"
    result = run_cli("--config", "configs/emoji.yaml", "--set", "loss.triplet=2")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "config error: loss.triplet: loss weights are set per stage in train.stages[i].losses")


def test_removed_fields_are_dropped_from_a_config_a_run_wrote():
    # An older run's resolved config.yaml holds every field it ran with, the removed ones too.
    written = to_dict(load_config(ExperimentConfig, REPO / "configs" / "emoji.yaml"))
    written["loss"].update(triplet=1.0, modality_adv=0.5, pad_id=0)
    written["data"]["val_split"] = "val"
    written["train"]["stages"][0]["losses"]["triplet"] = 2.0  # a key of a dict, not a field: kept
    with pytest.raises(ConfigError, match="^data.val_split: removed: nothing read it; .* eval.split$"):
        from_dict(ExperimentConfig, written)
    cfg = from_dict(ExperimentConfig, drop_removed_fields(ExperimentConfig, written))
    assert cfg.train.stages[0].losses["triplet"] == 2.0 and cfg.loss.margin == 0.2


def test_optimizer_sgd_is_plain_sgd_and_unknown_names_are_rejected():
    import torch

    from cmr.train.config import OptimizerConfig
    from cmr.train.parallel import build_optimizer

    model = torch.nn.Linear(2, 2)
    cfg = from_dict(OptimizerConfig, {"name": "sgd", "weight_decay": 0.01})
    optimizer = build_optimizer(model, {"head": list(model.parameters())}, cfg)
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.0
    assert optimizer.param_groups[0]["name"] == "head" and optimizer.param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ConfigError, match="^name: expected one of 'adam', 'adamw', 'sgd', got 'sgdm'$"):
        from_dict(OptimizerConfig, {"name": "sgdm"})
