"""Checkpoints: one path that saves and restores everything with state, safe against crashes.

A run's checkpoints live in ``run_dir/checkpoints/``::

    step-00001234/
        model.safetensors optimizer.bin scheduler.bin   accelerate (DDP / one process), or
        pytorch_model/ latest                           the DeepSpeed engine's files instead
        random_states_{R}.pkl                           python/numpy/torch RNG, one per rank
        trainer_state.rank{R}.json                      counters and data position, one per rank
        vocab.json config.yaml ...                      extra files from the main process
        meta.json                                       written last: "this one is complete"

Why the care: a job can die at any instant (preemption, OOM kill, a node lost). Every
checkpoint is written under ``.tmp-step-N/`` and only renamed to ``step-N/`` once all ranks
have finished and ``meta.json`` is on disk, so a ``step-N`` directory is either complete or
was made by hand. Readers trust ``meta.json`` alone: a directory without one (or with a
corrupt one) and every ``.tmp-*`` directory are ignored. Old checkpoints are renamed to a
``.tmp-*`` name before they are deleted, so a crash mid-delete cannot leave a
complete-looking half. Only the newest ``keep_last`` complete checkpoints are kept.

The names, and which directories count as complete checkpoints, are ``cmr.run_dir``'s: the
readers (evaluation, search, export) go through it without importing this module.

The run directory must be on a file system every rank sees (one node, or a shared one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from accelerate.utils import DistributedType

from cmr.run_dir import (
    META_NAME, UNFINISHED_PREFIX, CheckpointError, RunDir, fsync_dir, read_meta,
    require_meta, step_dir_name, write_durably, write_meta,
)
from cmr.train.config import CheckpointConfig  # here for its users: it configures this module

__all__ = ["CheckpointConfig", "Checkpointer", "CheckpointError", "read_meta", "step_dir_name"]

STATE_PATTERN = "trainer_state.rank{rank}.json"
_UNFINISHED_SAVE = re.compile(re.escape(UNFINISHED_PREFIX) + r"(step-\d+)")
# Names accelerate, DeepSpeed and this module write themselves; an extra file must not take one.
_RESERVED_NAME = re.compile(
    re.escape(META_NAME) + r"|latest|scaler\.pt|trainer_state\.rank\d+\.json"
    r"|(random_states|custom_checkpoint)_\d+\.pkl"
    r"|(model|pytorch_model|optimizer|scheduler|sampler|dl_state_dict)(_\d+)?(\.bin|\.safetensors)?"
    r"|.*\.tmp"
)


def _fsync_tree(path: Path) -> None:
    """Push every file under ``path`` to disk, so meta.json never lands before the data."""
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _remove_tree(path: Path) -> None:
    # meta.json goes first: if we die halfway, what is left is plainly incomplete.
    (path / META_NAME).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _encode_state(state: dict) -> str:
    if not isinstance(state, dict):
        raise CheckpointError(f"trainer state must be a dict, got {type(state).__name__}")
    try:
        return json.dumps(state, indent=1, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"trainer state is not JSON-serialisable: {err}") from None


def _check_file_names(files: dict[str, str]) -> None:
    for name, text in files.items():
        what = f"checkpoint extra file {name!r}"
        if not isinstance(name, str) or not re.fullmatch(r"[^./\\][^/\\]*", name):
            raise CheckpointError(f"{what}: the name must be a plain file name")
        if _RESERVED_NAME.fullmatch(name):
            raise CheckpointError(f"{what}: the name would clash with the checkpoint's own files")
        if not isinstance(text, str):
            raise CheckpointError(f"{what}: must be text, got {type(text).__name__}")


class Checkpointer:
    """Saves and restores a run through its Accelerator; ``save`` and ``load`` are collective.

    Usage::

        ckpt = Checkpointer(accelerator, run_dir, cfg)
        path = ckpt.resolve(args.resume)            # None: fresh start
        if path is not None:
            state = ckpt.load(path)                 # this rank's trainer state
        ...
        if ckpt.should_save(step):
            ckpt.save(step, trainer_state, files={"vocab.json": vocab_text})
    """

    def __init__(self, accelerator, run_dir: RunDir | str | Path, cfg: CheckpointConfig | None = None):
        self.accelerator = accelerator
        self.cfg = cfg or CheckpointConfig()
        self.cfg.validate()
        if accelerator.project_configuration.automatic_checkpoint_naming:
            # accelerate would then ignore the directory we give save_state
            raise CheckpointError(
                "turn off automatic_checkpoint_naming in the Accelerator's ProjectConfiguration"
            )
        self.run = RunDir(RunDir.of(run_dir).path.absolute())
        self.root = self.run.checkpoints_dir
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            self._finish_interrupted_renames()
        accelerator.wait_for_everyone()

    def should_save(self, step: int) -> bool:
        """The periodic rule; stage ends and the end of training save regardless."""
        return self.cfg.every_n_steps > 0 and step > 0 and step % self.cfg.every_n_steps == 0

    # ---- saving ----------------------------------------------------------------------

    def save(self, step: int, state: dict, files: dict[str, str] | None = None) -> Path:
        """Every rank calls this with its own ``state``; returns the checkpoint's final path."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"checkpoint step must be an int >= 0, got {step!r}")
        files = dict(files or {})
        _check_file_names(files)
        state_text = _encode_state(state)  # fail before any collective, not halfway through
        acc = self.accelerator
        final = self.run.checkpoint_path(step)
        tmp = self.root / f"{UNFINISHED_PREFIX}{final.name}"
        if acc.is_main_process:
            if tmp.exists():  # left by an earlier attempt at this step that died
                _remove_tree(tmp)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every rank: DeepSpeed's engine save is itself collective
        write_durably(tmp / STATE_PATTERN.format(rank=acc.process_index), state_text)
        if acc.is_main_process:
            for name, text in files.items():
                write_durably(tmp / name, text)
        acc.wait_for_everyone()  # all ranks' files are in tmp before it is marked complete
        if acc.is_main_process:
            self._commit(tmp, final, step, sorted(files))
        acc.wait_for_everyone()
        if acc.is_main_process:
            self._prune(keep=final)
        acc.wait_for_everyone()  # every rank returns seeing the same checkpoints
        return final

    def _commit(self, tmp: Path, final: Path, step: int, file_names: list[str]) -> None:
        _fsync_tree(tmp)
        write_meta(tmp, {
            "step": step,
            "world_size": self.accelerator.num_processes,
            "complete": True,
            "time": time.time(),
            "files": file_names,
            "distributed_type": self.accelerator.distributed_type.value,
        })
        fsync_dir(tmp)
        if final.exists():
            # Saving a step again replaces it. Two renames are not atomic together; if we die
            # between them, the new copy is complete in tmp and the next start renames it in.
            old = self.root / f"{UNFINISHED_PREFIX}old-{final.name}"
            if old.exists():
                _remove_tree(old)
            os.rename(final, old)
            os.rename(tmp, final)
            _remove_tree(old)
        else:
            os.rename(tmp, final)
        fsync_dir(self.root)

    def _prune(self, keep: Path) -> None:
        """Delete complete checkpoints beyond ``keep_last`` and leftovers of dead saves.

        The newest steps are kept, and always ``keep``, the one just written: after a resume
        from an older checkpoint its step can be lower than those of the abandoned run.
        """
        others = [path for path in self.complete_checkpoints() if path != keep]
        for path in others[: len(others) - (self.cfg.keep_last - 1)]:
            doomed = self.root / f"{UNFINISHED_PREFIX}delete-{path.name}"
            os.rename(path, doomed)  # from here on it is a .tmp-*: never mistaken for complete
            _remove_tree(doomed)
        for path in self.root.glob(f"{UNFINISHED_PREFIX}*"):
            if path.is_dir():
                _remove_tree(path)
            else:
                path.unlink(missing_ok=True)

    def _finish_interrupted_renames(self) -> None:
        # A .tmp-step-N with a complete meta.json was fully written (meta.json comes last,
        # after every rank's files and an fsync); only its rename was cut off.
        for tmp in self.root.glob(f"{UNFINISHED_PREFIX}step-*"):
            match = _UNFINISHED_SAVE.fullmatch(tmp.name)
            final = self.root / match.group(1) if match else None
            if final is not None and not final.exists() and read_meta(tmp) is not None:
                os.rename(tmp, final)
                fsync_dir(self.root)

    # ---- finding -----------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest step first; half-written and foreign dirs are skipped."""
        return self.run.complete_checkpoints()

    def latest(self) -> Path | None:
        return self.run.latest_checkpoint()

    def resolve(self, resume: str | None) -> Path | None:
        """Turn ``--resume`` into a checkpoint path; None means start fresh.

        ``auto``: the newest complete checkpoint, or a fresh start if there is none.
        ``latest``: the newest, which must exist. ``step-N`` or ``N``: that step in this
        run. Anything else is a path (relative to the working directory) to a complete
        checkpoint directory, e.g. one from another run.
        """
        if resume is None or resume == "":
            return None
        if resume == "auto":
            return self.latest()
        if resume == "latest":
            latest = self.latest()
            if latest is None:
                raise CheckpointError(f"--resume latest: {self._describe_available()}")
            return latest
        match = re.fullmatch(r"(?:step-)?(\d+)", resume)
        if match:
            path = self.run.checkpoint_path(int(match.group(1)))
            if path not in self.complete_checkpoints():
                raise CheckpointError(
                    f"--resume {resume}: no complete checkpoint for step {int(match.group(1))}; "
                    f"{self._describe_available()}"
                )
            return path
        path = Path(resume).expanduser().absolute()
        if not path.is_dir():
            raise CheckpointError(
                f"--resume {resume}: {path} is not a directory; {self._describe_available()}"
            )
        if read_meta(path) is None:
            raise CheckpointError(
                f"--resume {resume}: {path} is not a complete checkpoint (no meta.json marking it "
                f"complete); {self._describe_available()}"
            )
        return path

    def _describe_available(self) -> str:
        return self.run.describe_checkpoints()

    # ---- loading -----------------------------------------------------------------------

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore model, optimizer, scheduler, scaler and RNG; return this rank's trainer state.

        Every rank calls it. At another world size than the checkpoint's (DDP or one process
        only: model and optimizer are replicated, so they load anywhere) the per-rank data
        positions cannot be split anew: every rank gets rank 0's state with
        ``"world_size_changed": True`` and ``"saved_world_size"`` added, and the trainer
        decides (e.g. restart the epoch). Ranks the checkpoint did not have keep their RNG.
        DeepSpeed's ZeRO shards are per rank, so there a world size change is an error.
        """
        path = Path(path)
        meta = require_meta(path)
        state = self._read_trainer_state(path, meta)
        try:
            self.accelerator.load_state(str(path))
        except (OSError, RuntimeError, ValueError, KeyError) as err:
            reason = " ".join(str(err).split())[:300] or type(err).__name__  # one line, bounded
            raise CheckpointError(
                f"{path}: cannot restore model/optimizer state into this run ({reason}); "
                "was it saved with another model or optimizer config?"
            ) from err
        return state

    def _read_trainer_state(self, path: Path, meta: dict) -> dict[str, Any]:
        """Check the checkpoint fits this run before anything is overwritten."""
        acc = self.accelerator
        saved_world, world = meta.get("world_size"), acc.num_processes
        saved_deepspeed = meta.get("distributed_type") == DistributedType.DEEPSPEED.value
        running_deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        if saved_deepspeed != running_deepspeed:
            how = "under DeepSpeed and this run is not" if saved_deepspeed else (
                "without DeepSpeed and this run uses it")
            raise CheckpointError(
                f"{path} was saved {how}; their files differ, so launch the way it was saved"
            )
        changed = saved_world != world
        if changed and running_deepspeed:
            raise CheckpointError(
                f"{path} was saved by {saved_world} processes and this run has {world}; DeepSpeed "
                f"ZeRO optimizer shards are per rank, so resume with {saved_world} processes"
            )
        rank = 0 if changed else acc.process_index
        state_file = path / STATE_PATTERN.format(rank=rank)
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError) as err:
            reason = type(err).__name__
            raise CheckpointError(f"{state_file} is missing or corrupt ({reason})") from None
        if changed:
            state["world_size_changed"] = True
            state["saved_world_size"] = saved_world
        return state

    def read_file(self, path: str | Path, name: str) -> str:
        """An extra file stored with a checkpoint, e.g. its vocabulary."""
        path = Path(path)
        stored = require_meta(path).get("files", [])
        if name not in stored or not (path / name).is_file():
            listing = ", ".join(stored) or "none"
            raise CheckpointError(f"{path} has no stored file {name!r} (stored: {listing})")
        return (path / name).read_text()
