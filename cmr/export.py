"""A trained model as a self-contained directory, loadable without the training code.

    export_model("runs/emoji-demo", "exports/emoji")      # the best checkpoint, else the latest
    model, vocab, cfg = load_exported("exports/emoji")     # no trainer, accelerate or DeepSpeed

An export holds:

    model.safetensors   the model's weights (fp32 as trained; DeepSpeed states converted)
    config.yaml         the run's full resolved experiment config, as written at training time
    vocab.json          the caption vocabulary the text encoder was trained with
    export.json         where it came from: run, checkpoint, step, metrics if known, cmr version

Loading needs only ``cmr.models``, ``cmr.data`` and ``safetensors``: it must work on a
machine that serves search and never trains. It does not need the files the model was
initialised from either (torchvision backbone weights, a GloVe table): the exported weights
replace them, and the GloVe table's width is read from the weights themselves.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from cmr.config import ConfigError, drop_removed_fields, from_dict, load_yaml
from cmr.data.pipeline import DataConfig
from cmr.data.vocab import Vocabulary
from cmr.models.image import ImageEncoder
from cmr.models.lim import LIMConfig, LookImagineMatch
from cmr.models.text import TextEncoder
from cmr.run_dir import (
    CONFIG_NAME, VOCAB_NAME, WEIGHTS_NAME, RunDirError, RunDir, atomic_dir, load_model_state,
    save_model_weights,
)

EXPORT_FORMAT = "cmr-export"
EXPORT_VERSION = 1
INFO_NAME = "export.json"
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, VOCAB_NAME, INFO_NAME)


class ExportError(RuntimeError):
    """An export cannot be written or read; the message is one line saying why."""


@dataclasses.dataclass
class InferenceConfig:
    """The sections of a run's config that using the model needs: how to build it (model)
    and how its inputs are prepared (data). The training sections are not read."""

    data: DataConfig
    model: LIMConfig = dataclasses.field(default_factory=LIMConfig)


def export_model(run_dir: str | Path, out_dir: str | Path, which: str | None = None) -> Path:
    """Write the export of run ``run_dir``'s checkpoint ``which`` (latest, best, step-N or a
    path; default best if the run has one, else latest) to ``out_dir``; returns ``out_dir``.

    An existing export in ``out_dir`` is replaced; any other non-empty directory is refused.
    The export is loaded back before it is put in place, so a broken one is never written."""
    run, out_dir = RunDir(run_dir), Path(out_dir)
    try:
        run.require_run()
    except RunDirError as err:
        raise ExportError(str(err)) from None
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / INFO_NAME).is_file():
        raise ExportError(f"{out_dir} exists and is not an earlier export: use a new or empty directory")
    try:
        checkpoint = run.find_checkpoint(which)
        state = load_model_state(checkpoint)
        config_text = run.read_text(CONFIG_NAME, checkpoint)
        vocab_text = run.read_text(VOCAB_NAME, checkpoint)
    except RunDirError as err:
        raise ExportError(str(err)) from None
    known = run.checkpoint_info(checkpoint)
    info = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "source_run": str(run.path.resolve()),
        "source_checkpoint": str(checkpoint.resolve()),
        "checkpoint": checkpoint.name,
        "step": known.get("step"),
        "metrics": known.get("metrics"),
        "cmr_version": _cmr_version(),
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_dir(out_dir) as tmp:
        save_model_weights(state, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(config_text)
        (tmp / VOCAB_NAME).write_text(vocab_text)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        load_exported(tmp)  # an ExportError here removes tmp and leaves out_dir as it was
    return out_dir


def read_export_info(export_dir: str | Path) -> dict:
    """An export's ``export.json``: where it came from (run, checkpoint, step, metrics)."""
    try:
        return json.loads((Path(export_dir) / INFO_NAME).read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{export_dir}: no readable {INFO_NAME} ({type(err).__name__})") from None


def load_exported(export_dir: str | Path) -> tuple[LookImagineMatch, Vocabulary, InferenceConfig]:
    """(model in eval mode on the CPU, vocabulary, config) of an exported model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    export_dir = Path(export_dir)
    missing = [name for name in EXPORT_FILES if not (export_dir / name).is_file()]
    if missing:
        raise ExportError(f"{export_dir} is not a cmr export (missing {', '.join(missing)}); "
                          "write one with launch/export.py")
    cfg = read_inference_config(export_dir / CONFIG_NAME)
    try:
        vocab = Vocabulary.load(export_dir / VOCAB_NAME)
        state = load_file(str(export_dir / WEIGHTS_NAME))
    except (ValueError, SafetensorError, OSError) as err:
        raise ExportError(f"{export_dir}: {err}") from None
    model = _build_model(cfg, vocab, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise ExportError(f"{export_dir}: the weights do not fit the config ({first})") from None
    return model.eval(), vocab, cfg


def read_inference_config(path: Path) -> InferenceConfig:
    """The model and data sections of a run config, with the pretrained-file settings cleared:
    the weights file and GloVe table the run started from need not exist where this loads."""
    try:
        data = load_yaml(path)
        model = data.get("model") or {}
        if isinstance(model, dict):
            model = dict(model)
            for part, cleared in (("image_encoder", {"weights": None, "freeze_backbone": False}),
                                  ("text_encoder", {"glove": None, "freeze_embeddings": False})):
                if isinstance(model.get(part), dict):
                    model[part] = {**model[part], **cleared}
        sections = {"data": data["data"]} if "data" in data else {}
        return from_dict(InferenceConfig, drop_removed_fields(InferenceConfig, {**sections, "model": model}))
    except ConfigError as err:
        detail = err.message if err.field == "--config" else str(err)  # load_yaml names --config
        raise ExportError(f"{path}: {detail}") from None


def _build_model(cfg: InferenceConfig, vocab: Vocabulary, state: dict) -> LookImagineMatch:
    """The architecture of ``cfg`` with the embedding table as wide as the saved one (a GloVe
    table keeps GloVe's width, e.g. 50, whatever ``word_dim`` says)."""
    table = state.get("text_encoder.embedding.weight")
    if table is None:
        raise ExportError("the weights have no text_encoder.embedding.weight: not a cmr model")
    extra = state.get("text_encoder.extra_embedding")  # the GloVe extension, if any
    num_rows = table.shape[0] + (0 if extra is None else extra.shape[0])
    if (table.shape[0], num_rows) != (vocab.num_train_words, len(vocab)):
        raise ExportError(f"the weights have {num_rows} word embeddings, the vocabulary "
                          f"{len(vocab)} words: config, weights and vocab.json come from different runs")
    image_encoder = ImageEncoder(cfg.model.image_encoder)
    text_encoder = TextEncoder(cfg.model.text_encoder, len(vocab), glove_dim=int(table.shape[1]),
                               num_extra_words=vocab.num_extra_words)
    return LookImagineMatch(cfg.model, vocab.itos, image_encoder, text_encoder,
                            vocab.num_train_words)


def _cmr_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cmr")
    except PackageNotFoundError:
        return "unknown"

