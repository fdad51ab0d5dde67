"""Evaluation: embeddings of a split, retrieval metrics, and the config that drives them."""

from __future__ import annotations

import dataclasses

from cmr.config import ConfigError


@dataclasses.dataclass
class EvalConfig:
    split: str = "val"  # evaluated at the end of training epochs; the best rsum is kept
    every_n_epochs: int = 1  # 0 = no evaluation during training
    label_key: str | None = "category"  # labels[label_key] = relevance for mAP; absent -> caption relevance
    chunk_size: int = 1024  # query rows per similarity block
    num_query_grids: int = 4  # fixed validation queries drawn as search grids (wandb table); 0 = none

    def validate(self) -> None:
        for name in ("every_n_epochs", "num_query_grids"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.chunk_size < 1:
            raise ConfigError("chunk_size", f"must be >= 1, got {self.chunk_size}")
