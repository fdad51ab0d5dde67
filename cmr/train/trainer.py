"""The Trainer: the stage schedule over a streaming loader, under accelerate.

``train()`` only walks epochs and steps and calls ``train_step``, the checkpointer and the
metrics; everything else is a small method. All ranks run the same control flow: every
decision that could differ between ranks (a non-finite loss, a preemption signal) is first
agreed on with one all-reduce, so no rank ever skips a collective the others enter.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, set_seed

from cmr.config import to_dict
from cmr.data.loader import build_loader, build_vocabulary
from cmr.data.remote import redact_spec
from cmr.data.source import DataError
from cmr.data.vocab import Vocabulary
from cmr.eval.evaluator import Evaluator
from cmr.models.lim import build_model
from cmr.reward import RewardPool
from cmr.run_dir import CONFIG_NAME, VOCAB_NAME, CheckpointError, RunDir, RunDirBusy, RunLock
from cmr.train.checkpoint import Checkpointer
from cmr.train.liveness import Heartbeat, describe_silent
from cmr.train.metrics import MetricsLogger, wandb_mode
from cmr.train.parallel import build_accelerator, build_optimizer, check_launch, match_buffers_to, uses_deepspeed
from cmr.train.preemption import PreemptionHandler, requeue_slurm_job, running_under_slurm
from cmr.train.schedule import StagePlan
from cmr.train.step import forward_and_losses, model_inputs, stage_weights


# What gloo/NCCL say when a peer does not answer or is gone.
_COLLECTIVE_FAILURE = re.compile(r"timed out|timeout|connection (closed|reset)|broken pipe|peer|"
                                 r"NCCL|gloo", re.IGNORECASE)


def _metric_name(component: str) -> str:
    return "reward/sampled_mean" if component == "reward" else f"loss/{component}"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. losses keep coming out non-finite); the message says why."""


class Trainer:
    def __init__(self, cfg, run_dir: str | Path, resume: str | None = None,
                 preemption: PreemptionHandler | None = None):
        """``preemption``: a handler the caller has entered already (launch/train.py does, before
        the setup); without one, ``train()`` listens for the signals only while it runs."""
        self.cfg, self.run_dir = cfg, Path(run_dir)
        tcfg = cfg.train
        self.accelerator = build_accelerator(tcfg, self.run_dir, "wandb" if tcfg.logging.wandb else None)
        acc = self.accelerator
        self.run = RunDir(self.run_dir)
        self.lock = self._claim_run_dir()  # before anything in the run dir is written
        self._end_recorded = False
        self.heartbeat = Heartbeat(acc.process_index, acc.num_processes,
                                   interval_s=min(5.0, max(0.5, tcfg.collective_timeout_s / 10))).start()
        self.checkpointer = Checkpointer(acc, self.run_dir, tcfg.checkpoint)
        resume_path = self.checkpointer.resolve(resume)
        set_seed(cfg.seed)
        self.vocab = self._vocabulary(resume_path)
        k = tcfg.gradient_accumulation_steps
        self.loader = build_loader(cfg.data, self.vocab, split=cfg.data.train_split, mode="train",
                                   rank=acc.process_index, world_size=acc.num_processes, batch_multiple=k)
        check_launch(acc, tcfg, cfg.data.batch_size)
        cfg.resolve_feature_dim(self.loader.dataset.shardset.feature_dim)
        model = build_model(cfg.model, self.vocab.itos, self.vocab.num_train_words)
        groups = model.param_groups()
        self.groups = list(groups)
        optimizer = build_optimizer(model, groups, tcfg.optimizer)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.raw_model = acc.unwrap_model(self.model)  # unwrapping costs ~20 ms: once, not per step
        # DeepSpeed bf16/fp16 holds half-precision weights without autocast: feed it its dtype.
        self.input_dtype = next(self.model.parameters()).dtype if uses_deepspeed(acc) else torch.float32
        if self.input_dtype != torch.float32:
            match_buffers_to(self.raw_model, self.input_dtype)
        self.plan = StagePlan(tuple(tcfg.stages), steps_per_epoch=len(self.loader) // k)
        self.loader.end_epoch = self.plan.epoch_starts[-1]  # no look-ahead past the last epoch
        self.eval_loader = self._eval_loader() if cfg.eval.every_n_epochs else None
        self.evaluator = Evaluator(acc, self.eval_loader, cfg, self.run, self.vocab)
        self.reward_pool = RewardPool(cfg.reward) if any(s.losses.get("scst", 0) > 0 for s in tcfg.stages) else None
        self.metrics = MetricsLogger(acc, self.run_dir, tcfg.logging)
        self._owns_preemption = preemption is None
        self.preemption = preemption or PreemptionHandler()
        self.global_step = self.epoch = 0
        self.nonfinite_in_row = self.nonfinite_total = 0
        self.stage_index = -1
        if resume_path is not None:
            self._load(resume_path)
        self.start_step = self.global_step
        self._start_run_dir(resume_path)

    # -- setup -----------------------------------------------------------------------------

    def _vocabulary(self, resume_path: Path | None) -> Vocabulary:
        """A resumed run keeps its vocabulary (word ids must not move under the model)."""
        if resume_path is not None:
            return Vocabulary.from_dict(json.loads(self.checkpointer.read_file(resume_path, VOCAB_NAME)))
        return build_vocabulary(self.cfg.data, self.cfg.model.text_encoder.glove)

    def _eval_loader(self):
        acc = self.accelerator
        try:
            return build_loader(self.cfg.data, self.vocab, split=self.cfg.eval.split, mode="eval",
                                rank=acc.process_index, world_size=acc.num_processes)
        except DataError as err:
            raise DataError(f"{err} (evaluation split from eval.split; eval.every_n_epochs=0 turns it off)") from None

    def _claim_run_dir(self) -> RunLock | None:
        """Rank 0 locks the run dir; every rank stops with its message if another run holds it."""
        acc = self.accelerator
        lock, message = None, None
        if acc.is_main_process:
            lock = self.run.lock()
            try:
                lock.acquire()
            except RunDirBusy as err:
                lock, message = None, str(err)
        if acc.num_processes > 1:
            message = broadcast_object_list([message])[0]
        if message:
            raise RunDirBusy(message)
        return lock

    def _start_run_dir(self, resume_path: Path | None) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            record = self.run.record_launch(
                "start", world_size=acc.num_processes,
                resumed_from=str(resume_path) if resume_path else None,
                resumed_from_step=self.global_step if resume_path else None,
                slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
            launches = sum(r["event"] == "start" for r in self.run.read_launches())
            acc.print(f"launch {launches} of {self.run_dir} on {record['host']}"
                      + (f", SLURM job {record['slurm_job_id']} restart {record['slurm_restart_count']}"
                         if record["slurm_job_id"] else ""))
            self.run.write_config(self.cfg)
            self.run.write_vocab(self.vocab)
            self._truncate_metrics()
        if self.cfg.train.logging.wandb:
            mode = wandb_mode(self.cfg.train.logging)
            wandb_kwargs = {"dir": str(self.run_dir), "name": self.cfg.name, "mode": mode,
                            "id": self._wandb_run_id(), "resume": "allow"}
            config = to_dict(self.cfg)
            config["data"]["shards"] = redact_spec(config["data"]["shards"])  # no signed URL in wandb
            acc.init_trackers(self.cfg.train.logging.wandb_project, config=config,
                              init_kwargs={"wandb": wandb_kwargs})
        acc.wait_for_everyone()

    def _wandb_run_id(self) -> str:
        """One wandb run per run dir, so a resumed (or requeued) run continues its charts."""
        if self.accelerator.is_main_process:
            self.run.wandb_run_id(create=True)
        self.accelerator.wait_for_everyone()
        return self.run.wandb_run_id()

    def _truncate_metrics(self) -> None:
        """After a resume, drop records logged after the checkpoint: they are logged again."""
        self.run.truncate_metrics(self.global_step, self.epoch)

    # -- the loop --------------------------------------------------------------------------

    def train(self) -> str:
        """Run the remaining schedule; returns "done", "preempted" or "max_steps"."""
        self.metrics.start_progress(self.plan.total_steps, self.global_step)
        outcome = "error"
        try:
            try:
                with self.preemption if self._owns_preemption else contextlib.nullcontext():
                    outcome = self._run_epochs()
            except RuntimeError as err:
                raise self._explain_collective_failure(err) from err
            if outcome != "preempted":  # a preemption ended the trackers before its requeue
                self.accelerator.end_training()
            return outcome
        finally:
            self.heartbeat.stop()
            self.metrics.close()
            for loader in (self.loader, self.eval_loader):
                if loader is not None:
                    loader.close()
            if self.reward_pool is not None:
                self.reward_pool.close()
            if self.lock is not None:
                self._record_end(outcome)
                self.lock.release()

    def _record_end(self, outcome: str) -> None:
        """Rank 0's "end" record of this launch, once: at a preemption before the requeue (which
        has SLURM kill the job's processes), else when the schedule ends or fails."""
        if self.lock is not None and not self._end_recorded:
            self._end_recorded = True
            self.run.record_launch("end", outcome=outcome, step=self.global_step,
                                   steps_run=self.global_step - self.start_step)

    def _explain_collective_failure(self, err: RuntimeError) -> RuntimeError:
        """A collective that timed out or lost its peer: name the rank that went silent."""
        if isinstance(err, (TrainingError, DataError, CheckpointError)) or not _COLLECTIVE_FAILURE.search(str(err)):
            return err
        silent = self.heartbeat.silent_ranks()
        if not silent:
            return err
        timeout = self.cfg.train.collective_timeout_s
        return TrainingError(
            f"{describe_silent(silent)} stopped responding (no heartbeat for {3 * self.heartbeat.interval_s:g} s); "
            f"rank {self.accelerator.process_index} gave up on a collective at step {self.global_step} "
            f"(train.collective_timeout_s={timeout:g}): {' '.join(str(err).split())[:200]}"
        )

    def _run_epochs(self) -> str:
        max_steps = self.cfg.train.max_steps
        while self.epoch < self.plan.epoch_starts[-1]:
            self._enter_stage(self.plan.stage_index_of_epoch(self.epoch))
            self.loader.set_epoch(self.epoch)
            for batch, wait_s in self._timed(self.loader):
                stepped, preempted = self.train_step(batch, wait_s)
                if not stepped:
                    continue
                self.global_step += 1
                self._sync_buffers()
                if self.global_step % self.cfg.train.logging.every_n_steps == 0:
                    self.log()
                if preempted:
                    return self._preempt()
                if max_steps and self.global_step >= max_steps:
                    self.save()
                    return "max_steps"
                every = self.cfg.train.checkpoint.every_n_steps
                # No periodic save inside a streak of non-finite losses: keep the last good one.
                if every and self.global_step % every == 0 and not self.nonfinite_in_row:
                    self.save()
            self.epoch += 1
            every = self.cfg.eval.every_n_epochs
            if every and self.epoch % every == 0:
                self.evaluate()
            if self.epoch in self.plan.epoch_starts[1:] and not self.nonfinite_in_row:
                self.save()  # end of a stage
        return "done"

    def _timed(self, loader):
        """Batches with the time spent waiting for each (data-wait shows a starved GPU)."""
        iterator = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield batch, time.perf_counter() - start

    def _enter_stage(self, index: int) -> None:
        """Freeze/unfreeze through the same model and optimizer; nothing is rebuilt."""
        if index == self.stage_index:
            return
        self.stage_index = index
        stage = self.cfg.train.stages[index]
        model = self.accelerator.unwrap_model(self.model)
        trainable = stage.groups
        if self.cfg.model.image_encoder.freeze_backbone:
            trainable = trainable - {"image_backbone"}
        for group in self.groups:
            model.set_trainable(group, group in trainable)
        self.trainable = trainable
        self.weights = stage_weights(self.cfg.loss, stage, self.cfg.train.gradient_accumulation_steps)
        self.model.train()

    # -- one step --------------------------------------------------------------------------

    def train_step(self, batch, wait_s: float) -> tuple[bool, bool]:
        """One micro-batch. Returns (an optimizer step ended here, all ranks agree to stop)."""
        acc, stage = self.accelerator, self.cfg.train.stages[self.stage_index]
        self._set_lr_and_lambda()
        with acc.accumulate(self.model):
            inputs = model_inputs(batch, self.cfg.data.image.mean, self.cfg.data.image.std, acc.device, self.input_dtype)
            total, components = forward_and_losses(self.model, batch, inputs, self.weights, stage, self.reward_pool)
            nonfinite, preempted = self._agree(not torch.isfinite(total).item(), self.preemption.requested)
            if nonfinite:
                # This micro-batch contributes nothing. Under DDP, a skipped backward at the
                # end of a window also skips the gradient all-reduce, so the window's local
                # gradients are dropped rather than stepped on unsynchronised.
                self._skip_nonfinite()
            else:
                self.nonfinite_in_row = 0
                acc.backward(total)
            values = {} if nonfinite else {_metric_name(k): float(v) for k, v in components.items()}
            if not nonfinite:
                values["loss/total"] = float(total.detach())
            if acc.sync_gradients and not nonfinite:
                grad_norm = self._clip()
                if grad_norm is not None:
                    values["grad_norm"] = grad_norm
            if not nonfinite or uses_deepspeed(acc):
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.metrics.record(values, batch.num_samples, wait_s, end_of_step=acc.sync_gradients)
        return acc.sync_gradients, preempted

    def _set_lr_and_lambda(self) -> None:
        lr = self.plan.lr_at(self.global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr if group["name"] in self.trainable else 0.0
        progress = self.global_step / max(1, self.plan.total_steps)
        self.grl_lambda = self.raw_model.set_training_progress(progress)

    def _agree(self, nonfinite: bool, preempt: bool) -> tuple[bool, bool]:
        """One all-reduce: did any rank see a non-finite loss, or a preemption signal?"""
        flags = torch.tensor([float(nonfinite), float(preempt)], device=self.accelerator.device)
        flags = self.accelerator.reduce(flags, reduction="sum")
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _skip_nonfinite(self) -> None:
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        limit = self.cfg.train.max_consecutive_nonfinite
        if self.nonfinite_in_row >= limit:
            latest = self.checkpointer.latest()
            raise TrainingError(
                f"the loss was non-finite (nan/inf) {self.nonfinite_in_row} steps in a row at step "
                f"{self.global_step} (train.max_consecutive_nonfinite={limit}); the last good "
                f"checkpoint is {latest or 'none'}: lower the learning rate or check the data"
            )
        if uses_deepspeed(self.accelerator):
            # The engine counts micro-steps itself, so it must see a backward: give it an
            # all-zero gradient instead of the non-finite one.
            zero = sum(p.sum() for p in self.model.parameters()) * 0.0
            self.accelerator.backward(zero)

    def _clip(self) -> float | None:
        max_norm = self.cfg.train.optimizer.grad_clip or float("inf")
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        return None if norm is None else float(norm)

    # -- logging, checkpoints, preemption ---------------------------------------------------

    def log(self) -> None:
        stage = self.cfg.train.stages[self.stage_index]
        context = {"epoch": self.epoch, "stage": stage.name, "stage_index": self.stage_index}
        extra = {f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups}
        extra.update(grl_lambda=self.grl_lambda, nonfinite_skipped=self.nonfinite_total,
                     dropped_remainder=self.loader.num_dropped)
        self.metrics.log(self.global_step, context, self.loader.skip_counts, extra)

    def evaluate(self) -> dict | None:
        """Retrieval metrics on the eval split (all ranks encode; the main process scores),
        logged, and the model kept in RUN/best/ when its rsum is the best so far."""
        stage = self.cfg.train.stages[self.stage_index]
        return self.evaluator.evaluate(self.model, self.global_step, self.epoch, stage.name)

    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "stage_index": self.stage_index,
            "loader": self.loader.state_dict(),
            "nonfinite_in_row": self.nonfinite_in_row,
            "nonfinite_total": self.nonfinite_total,
            "metrics": self.metrics.state_dict(),
            **self.evaluator.state_dict(),  # "best_rsum", as checkpoints have always held it
        }

    def _sync_buffers(self) -> None:
        """BatchNorm running statistics are updated by each rank from its own batches (DDP
        re-broadcasts rank 0's at the next forward, DeepSpeed never): average them after every
        optimizer step (one all-reduce per dtype), so every rank, every evaluation and every
        checkpoint, a preemption's included, hold one and the same model, and a resumed run
        goes on exactly as the uninterrupted one."""
        if self.accelerator.num_processes == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in self.raw_model.buffers():
            if buffer.is_floating_point():
                by_dtype.setdefault(buffer.dtype, []).append(buffer)
        for buffers in by_dtype.values():
            flat = self.accelerator.reduce(torch.cat([b.detach().reshape(-1) for b in buffers]), reduction="mean")
            for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
                buffer.copy_(value.view_as(buffer))

    def save(self) -> Path:
        files = {VOCAB_NAME: json.dumps(self.vocab.to_dict()), CONFIG_NAME: self.run.config_path.read_text()
                 if self.run.config_path.exists() else ""}
        return self.checkpointer.save(self.global_step, self.state_dict(), files)

    def _load(self, path: Path) -> None:
        state = self.checkpointer.load(path)
        self.global_step, self.epoch = state["global_step"], state["epoch"]
        self.nonfinite_in_row, self.nonfinite_total = state["nonfinite_in_row"], state["nonfinite_total"]
        self.loader.load_state_dict(state["loader"])
        self.metrics.load_state_dict(state.get("metrics", {}))
        self.evaluator.load_state_dict(state)
        self.accelerator.print(f"resumed from {path} at step {self.global_step}, epoch {self.epoch}")

    def _preempt(self) -> str:
        path = self.save()
        self._record_end("preempted")
        # The requeue has SLURM kill every process of the job, wandb's service among them: the
        # wandb run is finished (synced, offline or not) before it is asked for.
        self.accelerator.end_training()
        # Flushed before the requeue: once scontrol has accepted it, SLURM may kill this process
        # before a buffered line (or the success line below) reaches the job's log.
        self.accelerator.print(f"preempted ({self.preemption.signal_name}): saved {path}", flush=True)
        if self.accelerator.is_main_process and running_under_slurm():
            print(f"asking SLURM to requeue job {os.environ['SLURM_JOB_ID']}", flush=True)
            print(requeue_slurm_job(), flush=True)
        return "preempted"
