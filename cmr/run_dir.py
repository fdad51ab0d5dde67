"""The run directory: the one module that knows its layout, and reads and writes it.

    RUN/
        config.yaml             the resolved experiment config (written at every start)
        vocab.json              the caption vocabulary (word ids must never move)
        metrics.jsonl           one JSON record per log step, and one per evaluation (with "split")
        wandb_run_id            the wandb run this directory logs to, so a resume continues it
        checkpoints/step-N/     complete checkpoints: meta.json (written last) marks them complete;
                                ``.tmp-*`` there are saves in progress, dead or being deleted
        best/                   the model with the best validation rsum: model.safetensors,
                                config.yaml, vocab.json, metrics.json, export.json
        eval/<split>.json       results of launch/eval.py
        cache/                  gallery embeddings cached by search
        .lock                   flock'd by rank 0 while a training runs: host, pid, start
        launches.jsonl          a record when each launch starts (resumed from which step, SLURM
                                job and restart count) and when it ends (outcome, steps run)

Training writes it (``cmr.train``), evaluation, search and export read it; none of them
builds a path into it by hand. Reading needs no training code, so this module imports
nothing from ``cmr.train``, accelerate or wandb. How a checkpoint is saved (accelerate's
files, the atomic rename, keep-last rotation) is the Checkpointer's business
(``cmr.train.checkpoint``); which directories *are* complete checkpoints is decided here.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

import torch

CONFIG_NAME = "config.yaml"
VOCAB_NAME = "vocab.json"
METRICS_NAME = "metrics.jsonl"
WANDB_ID_NAME = "wandb_run_id"
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
EVAL_DIR = "eval"
CACHE_DIR = "cache"
LOCK_NAME = ".lock"
LAUNCHES_NAME = "launches.jsonl"
META_NAME = "meta.json"  # in a checkpoint: written last, says "this one is complete"
WEIGHTS_NAME = "model.safetensors"  # accelerate's (and best/'s, an export's) model weights
DEEPSPEED_WEIGHTS = Path("pytorch_model") / "mp_rank_00_model_states.pt"
BEST_METRICS_NAME = "metrics.json"
BEST_INFO_NAME = "export.json"
UNFINISHED_PREFIX = ".tmp-"  # a directory being written, replaced or deleted: never read
_STEP_DIR = re.compile(r"step-(\d+)")


class RunDirError(RuntimeError):
    """A run directory (or a file in it) is missing or unusable; the message says which."""


class CheckpointError(RunDirError):
    """A checkpoint the user asked for is missing, incomplete or does not fit this run."""


# ---- checkpoint directories ------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint directory's name, or None if it is not named ``step-N``."""
    match = _STEP_DIR.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def read_meta(path: Path) -> dict | None:
    """``meta.json`` of a complete checkpoint, or None for anything half-written or foreign."""
    try:
        meta = json.loads((Path(path) / META_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("complete") is not True:
        return None
    return meta


def require_meta(path: Path) -> dict:
    meta = read_meta(path)
    if meta is None:
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no meta.json marking it complete)"
        )
    return meta


def write_meta(path: Path, meta: dict) -> None:
    """Mark checkpoint ``path`` complete; its other files must be on disk already."""
    write_durably(Path(path) / META_NAME, json.dumps({**meta, "complete": True}, indent=2))


def load_model_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's state dict from an accelerate (or best/, exported) or a DeepSpeed checkpoint."""
    checkpoint = Path(checkpoint)
    if (checkpoint / WEIGHTS_NAME).is_file():
        from safetensors.torch import load_file

        return load_file(str(checkpoint / WEIGHTS_NAME))
    if (checkpoint / DEEPSPEED_WEIGHTS).is_file():
        state = torch.load(checkpoint / DEEPSPEED_WEIGHTS, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    raise CheckpointError(f"{checkpoint} holds no model weights ({WEIGHTS_NAME} or pytorch_model/)")


# ---- durable and atomic writes ---------------------------------------------------------


def write_durably(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves either the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    # A rename is only durable once the directory holding the name is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Fill the yielded directory; when the block ends it replaces ``dest`` in one rename
    (an error in the block removes it and leaves ``dest`` as it was). Readers see the old
    directory or the new one, never a half-written one."""
    dest = Path(dest)
    tmp = dest.with_name(f"{UNFINISHED_PREFIX}{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.with_name(f"{UNFINISHED_PREFIX}{dest.name}-old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def save_model_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as safetensors, floating point tensors as fp32 on the CPU."""
    from safetensors.torch import save_file

    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in state.items()}
    save_file(state, str(path))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunDirBusy(RunDirError):
    """Another training owns the run directory."""


class RunLock:
    """Rank 0's ``flock`` on ``RUN/.lock``: ``acquire()`` or raise :class:`RunDirBusy`.

    The kernel drops an flock with the last descriptor of the process that took it, so a
    crash (SIGKILL, a lost node) never leaves a stale lock that blocks ``--resume auto``. The
    descriptor is close-on-exec and no worker is forked from a rank, so no child keeps a dead
    rank's lock alive.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(os.read(fd, 4096))
            os.close(fd)
            raise RunDirBusy(
                f"run directory {self.run_dir} is in use by {holder}: wait for it to end or stop it, "
                "or choose another --run-dir (the lock goes with its process: a crashed run never "
                "needs it removed)"
            ) from None
        os.ftruncate(fd, 0)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        os.write(fd, (json.dumps(holder) + "\n").encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _describe_holder(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"pid {holder['pid']} on {holder['host']} (started {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return "another process (its lock names no holder yet)"


class RunDir:
    """One run directory. Paths are as given (relative ones stay relative).

    Usage::

        run = RunDir("runs/emoji")
        checkpoint = run.find_checkpoint(None)      # best if there is one, else the latest
        config_text = run.read_text(CONFIG_NAME, checkpoint)
        for record in run.read_metrics(): ...
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of(cls, run: RunDir | str | Path) -> RunDir:
        return run if isinstance(run, RunDir) else cls(run)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- the layout ----------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_NAME

    @property
    def vocab_path(self) -> Path:
        return self.path / VOCAB_NAME

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_NAME

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def best_dir(self) -> Path:
        return self.path / BEST_DIR

    @property
    def cache_dir(self) -> Path:
        return self.path / CACHE_DIR

    def eval_result_path(self, split: str, fold5: bool = False) -> Path:
        return self.path / EVAL_DIR / f"{split}{'-fold5' if fold5 else ''}.json"

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / step_dir_name(step)

    # ---- the lock and per-launch logs ---------------------------------------------------

    def lock(self) -> RunLock:
        return RunLock(self.path)

    @property
    def launches_path(self) -> Path:
        return self.path / LAUNCHES_NAME

    def record_launch(self, event: str, **fields) -> dict:
        """Append a launch record (rank 0, while it holds the lock)."""
        record = {"event": event, "time": _now(), "host": socket.gethostname(), "pid": os.getpid(), **fields}
        with open(self.launches_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def read_launches(self) -> list[dict]:
        path = self.launches_path
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    # ---- run files -----------------------------------------------------------------------

    def require_run(self) -> None:
        """Raise unless this looks like a run directory (training writes config.yaml first)."""
        if not self.config_path.is_file():
            raise RunDirError(f"{self.path} is not a run directory (no {CONFIG_NAME} in it)")

    def write_config(self, cfg) -> None:
        from cmr.config import save_config

        save_config(cfg, self.config_path)

    def write_vocab(self, vocab) -> None:
        vocab.save(self.vocab_path)

    def read_text(self, name: str, checkpoint: Path | None = None) -> str:
        """A run file (config.yaml, vocab.json): the checkpoint's own copy if it has a
        non-empty one (the config may have changed on a later resume), else the run's."""
        if checkpoint is not None:
            own = Path(checkpoint) / name
            if own.is_file() and own.read_text().strip():
                return own.read_text()
        path = self.path / name
        if not path.is_file():
            where = f"neither {checkpoint} nor {self.path} has" if checkpoint is not None else f"{self.path} has no"
            raise RunDirError(f"{where} a {name}")
        return path.read_text()

    def read_vocab(self, checkpoint: Path | None = None):
        from cmr.data.vocab import Vocabulary

        return Vocabulary.from_dict(json.loads(self.read_text(VOCAB_NAME, checkpoint)))

    def read_config(self, cls, checkpoint: Path | None = None):
        """The experiment config ``cls`` of the run (the checkpoint's copy if it has one).
        A run's config records every field it ran with: fields removed since are dropped."""
        from cmr.config import drop_removed_fields, from_dict, load_yaml

        own = Path(checkpoint) / CONFIG_NAME if checkpoint is not None else None
        path = own if own is not None and own.is_file() and own.read_text().strip() else self.config_path
        return from_dict(cls, drop_removed_fields(cls, load_yaml(path)))

    def wandb_run_id(self, create: bool = False) -> str:
        """One wandb run per run dir. ``create`` (the main process only) writes a new id if
        there is none yet; other processes read it after a barrier."""
        path = self.path / WANDB_ID_NAME
        if create and not path.exists():
            path.write_text(uuid.uuid4().hex[:12])
        return path.read_text().strip()

    # ---- metrics.jsonl -------------------------------------------------------------------

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict]:
        """Every record, in order: training steps, and evaluations (those have ``split``)."""
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, step: int, epoch: int) -> None:
        """After a resume at (step, epoch), drop records logged after it: they are logged again."""
        if not self.metrics_path.exists():
            return

        def keep(record: dict) -> bool:  # an eval at the checkpoint's step may come after it
            if "split" in record and record["step"] == step:
                return record["epoch"] <= epoch
            return record["step"] <= step

        lines = self.metrics_path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and keep(json.loads(line))]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    # ---- checkpoints ---------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest step first; half-written and foreign dirs are skipped."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for path in self.checkpoints_dir.iterdir():
            step = checkpoint_step(path)
            if step is not None and path.is_dir() and read_meta(path) is not None:
                found.append((step, path))
        return [path for _, path in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def describe_checkpoints(self) -> str:
        names = [p.name for p in self.complete_checkpoints()]
        if not names:
            return f"{self.checkpoints_dir} has no complete checkpoint"
        return f"complete checkpoints in {self.checkpoints_dir}: {', '.join(names)}"

    def has_best(self) -> bool:
        return (self.best_dir / WEIGHTS_NAME).is_file()

    def find_checkpoint(self, which: str | None = None) -> Path:
        """The model to read: ``best`` (RUN/best/), ``latest``, ``step-N`` or ``N``, or a
        path to a checkpoint (or best/, export) directory; None: best if the run has one,
        else the latest."""
        if which is None:
            which = "best" if self.has_best() else "latest"
        if which == "best":
            if self.has_best():
                return self.best_dir
            raise CheckpointError(f"{self.best_dir} not found: the run has not evaluated yet")
        complete = self.complete_checkpoints()
        if which == "latest":
            if not complete:
                raise CheckpointError(f"no complete checkpoint in {self.checkpoints_dir}")
            return complete[-1]
        match = re.fullmatch(r"(?:step-)?(\d+)", which)
        if match:
            step = int(match.group(1))
            for path in complete:
                if checkpoint_step(path) == step:
                    return path
            name = which if which.startswith("step-") else step_dir_name(step)
            have = ", ".join(p.name for p in complete) or "none"
            raise CheckpointError(f"no complete checkpoint {name} in {self.checkpoints_dir} (have: {have})")
        path = Path(which)
        if read_meta(path) is None and not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{which} is not a complete checkpoint directory")
        return path

    def checkpoint_info(self, checkpoint: Path) -> dict:
        """What is known of a checkpoint: its meta.json (or best/'s export.json), and its
        metrics (best/'s metrics.json) if any."""
        checkpoint = Path(checkpoint)
        info = read_meta(checkpoint) or _read_json(checkpoint / META_NAME) \
            or _read_json(checkpoint / BEST_INFO_NAME) or {}
        return {**info, "metrics": info.get("metrics") or _read_json(checkpoint / BEST_METRICS_NAME)}

    # ---- best/ ---------------------------------------------------------------------------

    def write_best(self, model_state: dict[str, torch.Tensor], cfg, vocab, metrics: dict, info: dict) -> Path:
        """RUN/best/: the model as fp32 safetensors + config + vocabulary (loadable for search
        and export), its metrics and where it came from; replaced in one rename."""
        from cmr.config import save_config

        with atomic_dir(self.best_dir) as tmp:
            save_model_weights(model_state, tmp / WEIGHTS_NAME)
            save_config(cfg, tmp / CONFIG_NAME)
            vocab.save(tmp / VOCAB_NAME)
            (tmp / BEST_METRICS_NAME).write_text(json.dumps(metrics, indent=2))
            (tmp / BEST_INFO_NAME).write_text(json.dumps(info, indent=2))
        return self.best_dir
