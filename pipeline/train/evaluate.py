"""Evaluation: clip-level validation during training, and the paper's test protocol at the end.

* ``validate``: one clip per video (centre clip, centre crop), every video of the split exactly once
  over all ranks; loss, top-1 and top-5 summed across ranks.
* ``test_protocol``: per video, the softmax scores of all its views averaged (the paper: ``k`` temporal
  clips x 3 spatial crops; the long-video protocol: every non-overlapping clip covering the video);
  video-level top-1/top-5, per-class accuracy and a confusion matrix, gathered on rank 0.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.loader import view_loader
from pipeline.data.transforms import normalize_on_device

log = logging.getLogger(__name__)


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if _dist()[1] > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[-1])
    return int((logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).sum())


@torch.no_grad()
def validate(module: nn.Module, dtype: torch.dtype, loader, device: torch.device,
             max_batches: int = 0) -> dict[str, float]:
    """Clip-level loss / top-1 / top-5 over one exact pass of ``loader`` (this rank's part), summed over ranks."""
    loss_sum = top1 = top5 = count = 0.0
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        logits = module(normalize_on_device(batch["video"], device, dtype=dtype)).float()
        labels = batch["label"].to(device)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        top1 += topk_correct(logits, labels, 1)
        top5 += topk_correct(logits, labels, 5)
        count += len(labels)
    loss_sum, top1, top5, count = _all_sum([loss_sum, top1, top5, count], device)
    if count == 0:
        return {"val_clips": 0.0}
    return {"val_loss": loss_sum / count, "val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count,
            "val_clips": count}


@torch.no_grad()
def test_protocol(module: nn.Module, dtype: torch.dtype, index, storage, *, split: str, clip, protocol: str,
                  temporal_clips: int, spatial_crops: int, batch_size: int, device: torch.device,
                  num_workers: int = 2, max_videos: int = 0, progress: bool = False) -> dict[str, Any] | None:
    """The multi-view test over this rank's videos; rank 0 gets the report (others get None)."""
    rank, world = _dist()
    loader = view_loader(index, storage, split, clip=clip, protocol=protocol, temporal_clips=temporal_clips,
                         spatial_crops=spatial_crops, rank=rank, world_size=world, num_workers=num_workers)
    limit = math.ceil(max_videos / world) if max_videos else 0
    rows = []
    t0 = time.time()
    views_seen = 0
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=limit or math.ceil(index.num_samples(split) / world), unit="video", desc="test (rank 0)")
    for i, item in enumerate(loader):
        if limit and i >= limit:
            break
        views = item["views"]
        chunks = [normalize_on_device(views[j:j + batch_size], device, dtype=dtype)
                  for j in range(0, len(views), batch_size)]
        probs = torch.cat([F.softmax(module(chunk).float(), -1) for chunk in chunks])
        mean = probs.mean(0)
        rows.append({"key": item["key"], "label": item["label"], "pred": int(mean.argmax()),
                     "top5": mean.topk(min(5, mean.numel())).indices.tolist(), "views": len(views),
                     "clips": item["clips"], "score": float(mean.max())})
        views_seen += len(views)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    gathered = [rows]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, rows)
    if rank != 0:
        return None
    rows = sorted((r for part in gathered for r in part), key=lambda r: r["key"])
    n = len(rows)
    num_classes = int(getattr(module, "cfg", None).num_classes) if hasattr(module, "cfg") else \
        1 + max([r["label"] for r in rows] + [r["pred"] for r in rows] + [0])
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for r in rows:
        confusion[r["label"]][r["pred"]] += 1
    per_class = {c: (100 * confusion[c][c] / sum(confusion[c])) for c in range(num_classes) if sum(confusion[c])}
    return {
        "protocol": protocol, "split": split, "videos": n,
        "views_per_video": (temporal_clips * spatial_crops) if protocol == "multi_view" else None,
        "top1": 100 * sum(r["pred"] == r["label"] for r in rows) / n if n else 0.0,
        "top5": 100 * sum(r["label"] in r["top5"] for r in rows) / n if n else 0.0,
        "per_class_top1": per_class, "confusion": confusion, "predictions": rows,
        "seconds_rank0": time.time() - t0, "views_rank0": views_seen,
    }
