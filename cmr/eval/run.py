"""One evaluation: a split's embeddings (all ranks) -> retrieval metrics (main process)."""

from __future__ import annotations

import dataclasses

from cmr.eval import EvalConfig
from cmr.eval.embed import EmbeddingSet, compute_embeddings
from cmr.eval.metrics import coco_1k_metrics, retrieval_metrics

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_medr", "t2i_medr", "rsum")


def image_labels(embeddings: EmbeddingSet, label_key: str | None) -> list | None:
    """One label per image for label relevance, or None when the samples don't all carry one."""
    if not label_key:
        return None
    labels = [lbl.get(label_key) if isinstance(lbl, dict) else None for lbl in embeddings.labels]
    return labels if labels and all(lbl is not None for lbl in labels) else None


def metrics_of(embeddings: EmbeddingSet, cfg: EvalConfig, fold5: bool = False) -> dict[str, float]:
    kwargs = {"image_labels": image_labels(embeddings, cfg.label_key), "chunk_size": cfg.chunk_size}
    args = (embeddings.image_emb, embeddings.caption_emb, embeddings.caption_owner)
    metrics = coco_1k_metrics(*args, **kwargs) if fold5 else retrieval_metrics(*args, **kwargs)
    n = embeddings.num_images
    metrics.update(num_images=n, num_captions=int(embeddings.caption_emb.shape[0]),
                   chance_r1=100.0 / max(n, 1), chance_medr=(n + 1) / 2)
    return metrics


def evaluate_loader(model, loader, data_cfg, eval_cfg: EvalConfig, *, device, accelerator=None,
                    fold5: bool = False) -> tuple[dict[str, float] | None, EmbeddingSet]:
    """Metrics on the main process (None elsewhere) and the gathered embeddings."""
    embeddings = compute_embeddings(model, loader, mean=data_cfg.image.mean, std=data_cfg.image.std,
                                    device=device, accelerator=accelerator)
    if accelerator is not None and not accelerator.is_main_process:
        return None, embeddings
    return metrics_of(embeddings, eval_cfg, fold5), embeddings


def format_table(metrics: dict[str, float], title: str = "") -> str:
    """The metrics as a small text table, with chance level for comparison."""
    lines = [title] if title else []
    lines.append(f"{'':8}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'mAP@50':>9}")
    for d, name in (("i2t", "image->text"), ("t2i", "text->image")):
        m50 = metrics.get(f"{d}_map50")
        lines.append(f"{d:8}{metrics[f'{d}_r1']:8.2f}{metrics[f'{d}_r5']:8.2f}{metrics[f'{d}_r10']:8.2f}"
                     f"{metrics[f'{d}_medr']:8.1f}" + (f"{m50:9.2f}" if m50 is not None else f"{'-':>9}"))
    n = metrics.get("num_images")
    if n:
        lines.append(f"rsum {metrics['rsum']:.2f} over {n} images / {metrics['num_captions']} captions; "
                     f"chance: R@1 {metrics['chance_r1']:.2f}, R@10 {min(100, 10 * metrics['chance_r1']):.2f}, "
                     f"medr {metrics['chance_medr']:.1f}, rsum ~{sum(min(100, k * metrics['chance_r1']) for k in (1, 5, 10)) * 2:.1f}")
    return "\n".join(lines)


def with_shards(data_cfg, shards: str | None, num_workers: int | None = None):
    changes = {}
    if shards:
        changes["shards"] = str(shards)
    if num_workers is not None:
        changes["num_workers"] = num_workers
    return dataclasses.replace(data_cfg, **changes)
