"""Validation during training: the Evaluator the Trainer calls at the end of an epoch.

    evaluator = Evaluator(accelerator, eval_loader, cfg, RunDir(run_dir), vocab)
    metrics = evaluator.evaluate(model, step, epoch, stage_name)   # None on other ranks

It scores the eval split (every rank encodes, the main process scores), appends the eval
record to metrics.jsonl, logs it (and a few fixed query grids) to wandb, and keeps the model
with the best rsum so far in RUN/best/. Its one piece of state, the best rsum, is saved and
restored with the trainer's checkpoint (``state_dict``), under the key ``best_rsum``.
"""

from __future__ import annotations

import math

from cmr.eval.run import evaluate_loader
from cmr.run_dir import RunDir


class Evaluator:
    def __init__(self, accelerator, eval_loader, cfg, run: RunDir, vocab):
        self.accelerator, self.eval_loader, self.cfg = accelerator, eval_loader, cfg
        self.run, self.vocab = run, vocab
        self.best_rsum = -math.inf

    def evaluate(self, model, step: int, epoch: int, stage_name: str) -> dict | None:
        """Retrieval metrics on the eval split (all ranks encode; the main process scores),
        logged, and the model kept in RUN/best/ when its rsum is the best so far. Every
        rank calls it; ``model`` (as prepared by the accelerator) is back in train mode after."""
        acc = self.accelerator
        unwrapped = acc.unwrap_model(model)
        metrics, embeddings = evaluate_loader(unwrapped, self.eval_loader, self.cfg.data, self.cfg.eval,
                                              device=acc.device, accelerator=acc)
        model.train()
        if metrics is None:
            return None
        record = {"step": step, "epoch": epoch, "stage": stage_name, "split": self.cfg.eval.split}
        record.update({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
        self.run.append_metrics(record)
        acc.log({k: v for k, v in record.items() if k.startswith("eval/")}, step=step)
        self._log_query_grids(embeddings, step)
        if metrics["rsum"] > self.best_rsum:
            self.best_rsum = metrics["rsum"]
            self._save_best(unwrapped, metrics, step, epoch)
        return metrics

    def _log_query_grids(self, embeddings, step: int) -> None:
        """A few fixed validation queries as search grids, as a wandb table."""
        num = self.cfg.eval.num_query_grids
        split_dir = self.eval_loader.dataset.shardset.split_dir
        if not num or not self.cfg.train.logging.wandb:
            return
        import wandb

        from cmr.search_results import fixed_query_grids, picture_split_dir

        if picture_split_dir(split_dir) is None:  # features whose image dataset is unknown
            return
        grids = fixed_query_grids(embeddings, split_dir, num_queries=num)
        table = wandb.Table(columns=["query", "top results"], data=[[q, wandb.Image(img)] for q, img in grids])
        self.accelerator.get_tracker("wandb", unwrap=True).log({"eval/query_grids": table}, step=step)

    def _save_best(self, model, metrics: dict, step: int, epoch: int) -> None:
        info = {"source": "best rsum on " + self.cfg.eval.split, "step": step, "epoch": epoch,
                "metrics": metrics}
        self.run.write_best(model.state_dict(), self.cfg, self.vocab, metrics, info)

    # -- checkpointed state: the trainer's state_dict holds it under the same key as before --

    def state_dict(self) -> dict:
        return {"best_rsum": self.best_rsum if math.isfinite(self.best_rsum) else None}

    def load_state_dict(self, state: dict) -> None:
        self.best_rsum = state.get("best_rsum") if state.get("best_rsum") is not None else -math.inf
