"""A trained model back from a run directory, without the trainer (for eval and search).

The run directory is read through ``cmr.run_dir`` (which checkpoint, its config and
vocabulary, its weights); nothing here imports ``cmr.train``'s checkpointer or trainer.
"""

from __future__ import annotations

from pathlib import Path

from cmr.run_dir import RunDir, load_model_state


def load_run_model(run_dir: RunDir | str | Path, which: str | None = "latest"):
    """(model in eval mode, vocabulary, experiment config, checkpoint path) of a run;
    ``which``: latest, best, step-N or N, a path, or None (best if the run has one, else
    latest). Raises ``cmr.run_dir.RunDirError`` (a CheckpointError for a missing checkpoint)."""
    from cmr.experiment import ExperimentConfig
    from cmr.models.image import ImageEncoder
    from cmr.models.lim import LookImagineMatch
    from cmr.models.text import TextEncoder

    run = RunDir.of(run_dir)
    checkpoint = run.find_checkpoint(which)
    cfg = run.read_config(ExperimentConfig, checkpoint)
    vocab = run.read_vocab(checkpoint)
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
