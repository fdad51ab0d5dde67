"""A trained model back from a run directory, without the trainer (for eval and search)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from cmr.config import drop_removed_fields, from_dict, load_yaml
from cmr.data.vocab import Vocabulary
from cmr.train.checkpoint import CheckpointError, read_meta

_STEP = re.compile(r"step-(\d+)")


def find_checkpoint(run_dir: str | Path, which: str = "latest") -> Path:
    """``latest``, ``best`` (the exported best-by-rsum model), ``step-N``/``N``, or a path."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    complete = sorted(
        (p for p in root.glob("step-*") if _STEP.fullmatch(p.name) and read_meta(p) is not None),
        key=lambda p: int(_STEP.fullmatch(p.name).group(1)),
    ) if root.is_dir() else []
    if which == "best":
        if (run_dir / "best" / "model.safetensors").is_file():
            return run_dir / "best"
        raise CheckpointError(f"{run_dir}/best not found: the run has not evaluated yet")
    if which == "latest":
        if not complete:
            raise CheckpointError(f"no complete checkpoint in {root}")
        return complete[-1]
    name = which if which.startswith("step-") else f"step-{int(which):08d}" if which.isdigit() else None
    if name is not None:
        step = int(name.split("-")[1])
        for path in complete:
            if int(_STEP.fullmatch(path.name).group(1)) == step:
                return path
        have = ", ".join(p.name for p in complete) or "none"
        raise CheckpointError(f"no complete checkpoint {name} in {root} (have: {have})")
    if read_meta(Path(which)) is None and not (Path(which) / "model.safetensors").is_file():
        raise CheckpointError(f"{which} is not a complete checkpoint directory")
    return Path(which)


def load_model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's state dict from an accelerate (or exported) or a DeepSpeed checkpoint."""
    if (checkpoint / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(checkpoint / "model.safetensors"))
    deepspeed_file = checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt"
    if deepspeed_file.is_file():
        state = torch.load(deepspeed_file, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    raise CheckpointError(f"{checkpoint} holds no model weights (model.safetensors or pytorch_model/)")


def load_run_model(run_dir: str | Path, which: str = "latest"):
    """(model in eval mode, vocabulary, experiment config, checkpoint path) of a run."""
    from cmr.experiment import ExperimentConfig
    from cmr.models.image import ImageEncoder
    from cmr.models.lim import LookImagineMatch
    from cmr.models.text import TextEncoder

    run_dir = Path(run_dir)
    checkpoint = find_checkpoint(run_dir, which)
    config_path = checkpoint / "config.yaml"
    if not config_path.is_file() or not config_path.read_text().strip():
        config_path = run_dir / "config.yaml"
    cfg = from_dict(ExperimentConfig, drop_removed_fields(ExperimentConfig, load_yaml(config_path)))
    vocab_path = checkpoint / "vocab.json" if (checkpoint / "vocab.json").is_file() else run_dir / "vocab.json"
    vocab = Vocabulary.from_dict(json.loads(vocab_path.read_text()))
    # The checkpoint holds every weight: build the bare architecture (no pretrained backbone
    # or GloVe file needed here), with the embedding table as wide as the saved one.
    state = load_model_state(checkpoint)
    table = state["text_encoder.embedding.weight"]
    text_encoder = TextEncoder(cfg.model.text_encoder, len(vocab), glove_dim=int(table.shape[1]),
                               num_extra_words=vocab.num_extra_words)
    image_encoder = ImageEncoder(cfg.model.image_encoder)
    model = LookImagineMatch(cfg.model, vocab.itos, image_encoder, text_encoder, vocab.num_train_words)
    model.load_state_dict(state)
    return model.eval(), vocab, cfg, checkpoint
