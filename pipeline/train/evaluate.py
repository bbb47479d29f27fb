"""Evaluation: clip-level validation during training, and the paper's test protocol at the end.

* ``validate``: one clip per video (centre clip, centre crop), every video of the split exactly once
  over all ranks; loss, top-1 and top-5 summed across ranks.
* ``test_protocol``: per video, the softmax scores of all its views averaged (the paper: ``k`` temporal
  clips x 3 spatial crops; the long-video protocol: every non-overlapping clip covering the video);
  video-level top-1/top-5, per-class accuracy and a confusion matrix, gathered on rank 0.

A multi-label model (``TimeSformerConfig.multi_label``, on a multi-label dataset) is scored by mAP instead
of top-1/top-5: the mean over the classes with at least one positive video of each class's average precision
(``average_precision``, in percent), on sigmoid scores (the test protocol averages them over a video's views);
validation reports ``val_map`` and ``val_loss`` (binary cross-entropy), the test report ``map`` and
``per_class_ap``. A model whose kind differs from the dataset's (single- against multi-label) is refused
before the pass.

Videos without a label (label -1: ingest writes it for rows of a test list that has no answers) are
predicted but never scored: they are counted as ``unlabelled`` and left out of accuracy and of the
confusion matrix. A label that the model cannot predict (>= its number of classes) is refused: before
the pass when the dataset's class list and the model's disagree, else at the first such video.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.loader import FaultTally, view_loader
from pipeline.data.shards import DatasetIndex, ShardError
from pipeline.data.transforms import normalize_on_device
from pipeline.distributed import group_rank_world
from pipeline.models.config import normalization_of
from pipeline.train.engine import is_multi_label

log = logging.getLogger(__name__)
UNLABELLED = -1  # the label ingest writes for a video whose class is unknown (a test split without answers)


class EvaluationError(ValueError):
    """An evaluation that cannot give a true number: a model and a dataset with different classes, or
    a request that evaluates nothing. The message says which and what to do."""


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if group_rank_world()[1] > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[-1])
    return int((logits.topk(k, dim=-1).indices == labels[:, None]).any(-1).sum())


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """The average precision of one class over N videos (``scores``: its score per video; ``positive``: whether
    the video has the class), in [0, 1]; None when no video has it. Videos are ranked by score; each distinct
    score is a threshold, and AP is the sum over thresholds of (recall gained there) x (precision there):
    with distinct scores, the mean over the positives of the precision at the rank of each; a group of tied
    scores counts as one step (as scikit-learn's ``average_precision_score``)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive = np.asarray(positive).reshape(-1).astype(bool)
    total = int(positive.sum())
    if total == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], positive[order]
    tp = np.cumsum(hits)
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the end of each distinct score
    tp = tp[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, tp]) / total
    return float(np.sum(recall_gain * precision))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> tuple[float | None, dict[int, float]]:
    """mAP in percent over the classes with at least one positive (``targets``: 0/1, videos x classes), and
    each such class's AP in percent; (None, {}) when no class has a positive."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    per_class = {}
    for c in range(targets.shape[1] if targets.ndim == 2 else 0):
        ap = average_precision(scores[:, c], targets[:, c] > 0)
        if ap is not None:
            per_class[c] = 100 * ap
    return (sum(per_class.values()) / len(per_class) if per_class else None), per_class


def _bad_label_shards(faults: dict[str, Any] | None) -> list[str]:
    """Shards where the loader dropped samples for a label outside the dataset's classes. Training may
    skip those; an evaluation may not (its denominator would silently shrink), so it stops at the first."""
    return sorted(uri for uri, reasons in ((faults or {}).get("skipped") or {}).items() if reasons.get("bad_label"))


def _video_problem(index: DatasetIndex, split: str, key: str, wrong: str) -> str:
    return (f"{index.dataset} v{index.version} {split}: video {key}: {wrong}. The shard holding it does not match "
            f"the dataset's classes; re-ingest it, or fix its metadata")


def _bad_label_problem(where: str, shards: list[str]) -> str:
    return (f"{where}: shard(s) {', '.join(shards[:3])} hold samples whose label is not one of the dataset's "
            f"classes (nor -1, unlabelled; the log names the samples): an evaluation cannot leave them out "
            f"silently; re-ingest those shards or fix their metadata")


def model_num_classes(module: nn.Module) -> int | None:
    """The classes a model predicts (its config says), or None for a module without one."""
    cfg = getattr(module, "cfg", None)
    return int(cfg.num_classes) if cfg is not None and hasattr(cfg, "num_classes") else None


def check_classes(index: DatasetIndex, num_classes: int, classes: list[str] | None = None,
                  model: str = "the model") -> None:
    """Refuse, before any video is decoded, a dataset whose labels the model cannot score: a different
    number of classes, or (when the model's class names are known) a different class list."""
    where = f"dataset {index.dataset} v{index.version}"
    if num_classes <= 0:
        raise EvaluationError(f"{model} has no classification head (num_classes={num_classes}): nothing to score")
    if classes is not None:
        classes = list(classes)
        if len(classes) != num_classes:
            raise EvaluationError(f"{model} names {len(classes)} classes but predicts {num_classes}: its metadata "
                                  f"is inconsistent; re-export it (python jobs/export.py RUN_DIR)")
        if classes != list(index.classes):
            first = next((i for i, (a, b) in enumerate(zip(classes, index.classes, strict=False)) if a != b),
                         min(len(classes), len(index.classes)))
            ours = repr(classes[first]) if first < len(classes) else "(none: the list ends)"
            theirs = repr(index.classes[first]) if first < len(index.classes) else "(none: the list ends)"
            raise EvaluationError(
                f"{model} was trained on {len(classes)} classes and {where} has {len(index.classes)}, in a different "
                f"list: they first differ at class {first}: model {ours}, dataset {theirs}. Its accuracy there "
                f"would be meaningless; evaluate on the dataset it was trained on, or fine-tune it on this one "
                f"(model.init=<its model.safetensors> model.init_reset_head=true)")
        return
    if num_classes != len(index.classes):
        raise EvaluationError(
            f"{model} predicts {num_classes} classes and {where} has {len(index.classes)} "
            f"(first: {', '.join(map(repr, index.classes[:3]))}): its labels do not match the model's outputs; "
            f"evaluate on the dataset it was trained on, or fine-tune it on this one")


RUN_DATASET_FILE = "dataset.json"  # in a run directory: the dataset (name, version, classes) it trains on


def run_data_version(cfg: Any, run_dir: Path) -> int:
    """The dataset version a run reads: its config's (launch pins it), or for a run directory launched before
    the pin (``data.version: 0``) the one its ranks recorded at first start; 0 (the newest) before that."""
    return cfg.data.version or (recorded_dataset(run_dir) or {}).get("version", 0)


def recorded_dataset(run_dir: Path) -> dict[str, Any] | None:
    """``dataset.json`` (dataset, version, classes) as the run's first start wrote it; None before that."""
    path = run_dir / RUN_DATASET_FILE
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())
        if not isinstance(recorded, dict) or not isinstance(recorded["classes"], list) \
                or not isinstance(recorded.get("version", 0), int) or isinstance(recorded.get("version"), bool):
            raise TypeError("not a mapping with a class list and an integer version")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvaluationError(f"{path}: not a dataset record ({type(e).__name__}: {e}); it is written at the run's "
                          f"first start: restore it or start a new run") from None
    return recorded


def model_classes(model_path: str | Path, run_dir: str | Path | None = None) -> tuple[list[str] | None, str]:
    """The class names a model was trained on, and where they come from: the ``classes`` of its
    safetensors metadata (``jobs/export.py`` writes them), else its run directory's ``dataset.json``;
    None when neither holds them (then only the number of classes can be compared)."""
    from safetensors import safe_open

    with safe_open(str(model_path), framework="pt") as f:
        meta = f.metadata() or {}
    candidates: list[tuple[str, Any]] = []
    if "classes" in meta:
        try:
            candidates.append((f"the metadata of {model_path}", json.loads(meta["classes"])))
        except ValueError as e:
            raise EvaluationError(f"{model_path}: metadata 'classes' is not JSON ({e}); re-export the model") from None
    record = Path(run_dir) / RUN_DATASET_FILE if run_dir is not None else None
    if not candidates and record is not None and record.is_file():
        try:
            candidates.append((str(record), json.loads(record.read_text()).get("classes")))
        except (ValueError, AttributeError) as e:
            raise EvaluationError(f"{record}: not a dataset record ({e})") from None
    if not candidates:
        return None, "not recorded with the model (an older export): only their number is compared"
    where, classes = candidates[0]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise EvaluationError(f"{where}: 'classes' must be a list of class names, not {type(classes).__name__}")
    return classes, f"{len(classes)} from {where}"


def _label_set_problem(label: Any, num_classes: int) -> str | None:
    """Why a multi-label video's label (its multi-hot vector, or all -1: unlabelled) cannot be scored, or None."""
    if not isinstance(label, torch.Tensor) or label.dim() != 1 or not label.is_floating_point():
        return (f"label {label!r} is a class index, not a label set: the dataset is single-label and the model "
                f"multi-label")
    if label.numel() != num_classes:
        return f"its label set covers {label.numel()} classes and the model predicts {num_classes}"
    if bool((label == UNLABELLED).all()) or bool(((label == 0) | (label == 1)).all()):
        return None
    return f"label set {label.tolist()[:10]} is not a multi-hot vector"


def _label_problem(label: Any, num_classes: int) -> str | None:
    """Why a label cannot be scored, or None: an integer in [0, num_classes) or UNLABELLED only."""
    if isinstance(label, torch.Tensor) and label.dim() == 1 and label.is_floating_point():
        return "its label is a label set (a multi-label dataset) and the model is single-label"
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, int):
        return f"label {label!r} is not an integer class index"
    if label == UNLABELLED or 0 <= label < num_classes:
        return None
    return f"label {label} is outside the model's classes 0..{num_classes - 1} (and is not {UNLABELLED}, unlabelled)"


def _gather_rows(part: Any) -> list[Any]:
    """Every rank's ``part`` (rank order) on every rank; just ``[part]`` without a process group."""
    world = group_rank_world()[1]
    if world == 1:
        return [part]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, part)
    return gathered


@torch.no_grad()
def validate(module: nn.Module, dtype: torch.dtype, loader, device: torch.device,
             max_batches: int = 0) -> dict[str, float]:
    """Clip-level loss / top-1 / top-5 over one exact pass of ``loader`` (this rank's part), summed over ranks;
    for a multi-label model, loss (binary cross-entropy) and mAP (``val_map``, over every rank's clips).
    Unlabelled clips are left out (counted as ``val_unlabelled``); a clip whose label the model cannot
    predict stops the pass on every rank with a ``ShardError`` naming it."""
    loss_sum = top1 = top5 = count = unlabelled = bad = 0.0
    faults = FaultTally()
    problem = ""
    norm = normalization_of(module)
    multi = is_multi_label(module)
    scores: list[np.ndarray] = []  # multi-label: sigmoid scores and multi-hot labels of the scored clips
    targets: list[np.ndarray] = []
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        if bad:  # this rank has its answer: it reads on without the model, in step with the other ranks, which
            continue  # learn of it at the sum below (a rank that stopped here would leave them waiting there)
        faults.add(batch.get("faults"))
        shards = _bad_label_shards(batch.get("faults"))
        if shards:
            problem, bad = _bad_label_problem("validation", shards), 1.0
            continue
        if "video" not in batch:  # a worker's final count of skipped samples, not a batch
            continue
        labels = torch.as_tensor(batch["label"])
        logits = module(normalize_on_device(batch["video"], device, *norm, dtype=dtype)).float()
        if multi:
            shaped = labels.dim() == 2 and labels.is_floating_point() and labels.shape[-1] == logits.shape[-1]
            unscored = (labels == UNLABELLED).all(-1) if shaped else torch.zeros(len(labels), dtype=torch.bool)
            wrong = (~unscored & ~((labels == 0) | (labels == 1)).all(-1)) if shaped else ~unscored
        elif labels.is_floating_point() or labels.dtype == torch.bool:
            wrong = torch.ones(len(labels), dtype=torch.bool)
        else:
            wrong = (labels < UNLABELLED) | (labels >= logits.shape[-1])
        if bool(wrong.any()):
            j = int(wrong.nonzero()[0])
            key = batch["key"][j] if "key" in batch else f"#{j} of batch {i}"
            if multi:
                got = labels[j].tolist() if labels.dim() == 2 else labels[j].item()
                problem = (f"validation clip {key}: label {str(got)[:80]} is not a multi-hot vector over the model's "
                           f"{logits.shape[-1]} classes: the model is multi-label and the shard holding the clip is "
                           f"not (a single-label dataset, or one with another class list)")
            elif labels.dim() == 2:
                problem = (f"validation clip {key}: its label is a label set (a multi-label dataset) and the model is "
                           f"single-label: train with model.multi_label=true (or leave it null: the dataset's)")
            else:
                problem = (f"validation clip {key}: label {labels[j].item()!r} is not one of the model's classes "
                           f"0..{logits.shape[-1] - 1} (nor {UNLABELLED}, unlabelled); the shard holding it does not "
                           f"belong to this dataset (or the model to it)")
            bad = 1.0
            continue  # the other ranks learn of it at the sum below, then every rank raises
        scored = ~unscored if multi else labels != UNLABELLED
        unlabelled += float((~scored).sum())
        if not bool(scored.any()):
            continue
        logits, labels = logits[scored], labels[scored].to(device)
        if multi:
            loss_sum += float(F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(-1).sum())
            scores.append(torch.sigmoid(logits).cpu().numpy())
            targets.append(labels.cpu().numpy())
        else:
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            top1 += topk_correct(logits, labels, 1)
            top5 += topk_correct(logits, labels, 5)
        count += len(labels)
    loss_sum, top1, top5, count, unlabelled, skipped, bad = _all_sum(
        [loss_sum, top1, top5, count, unlabelled, faults.skipped, bad], device)
    if bad:
        raise ShardError(problem or f"validation: {int(bad)} other rank(s) found a clip whose label the model "
                                    f"cannot predict (their logs name it)")
    extra = {k: v for k, v in (("val_unlabelled", unlabelled), ("val_skipped", skipped)) if v}
    if multi:  # AP ranks every clip of every rank: the scores come together (every rank computes the same mAP)
        parts = [p for p in _gather_rows((np.concatenate(scores), np.concatenate(targets)) if scores else None) if p]
        mean_ap = mean_average_precision(np.concatenate([p[0] for p in parts]),
                                         np.concatenate([p[1] for p in parts]))[0] if parts else None
    if count == 0:
        if unlabelled:
            log.warning("validation: all %d clips are unlabelled: no accuracy", int(unlabelled))
        return {"val_clips": 0.0, **extra}
    if multi:
        if mean_ap is None:
            log.warning("validation: none of the %d labelled clips has a positive class: no mAP", int(count))
            return {"val_loss": loss_sum / count, "val_clips": count, **extra}
        return {"val_loss": loss_sum / count, "val_map": mean_ap, "val_clips": count, **extra}
    return {"val_loss": loss_sum / count, "val_top1": 100 * top1 / count, "val_top5": 100 * top5 / count,
            "val_clips": count, **extra}


@torch.no_grad()
def test_protocol(module: nn.Module, dtype: torch.dtype, index: DatasetIndex, storage, *, split: str, clip,
                  protocol: str, temporal_clips: int, spatial_crops: int, batch_size: int, device: torch.device,
                  num_workers: int = 2, max_videos: int = 0, progress: bool = False,
                  classes: list[str] | None = None) -> dict[str, Any] | None:
    """The multi-view test over this rank's videos; rank 0 gets the report (others get None).

    Checked before the pass: ``max_videos`` (0 = all), and the dataset's classes against the model's
    (``classes``: the model's class names, when known). The report's ``videos``, ``top1`` and ``top5``
    count labelled videos only; ``unlabelled`` and ``skipped`` (samples the loader could not read) say
    what was left out. With no labelled video, ``top1`` and ``top5`` are None: there is no accuracy. A
    multi-label model's report has ``map`` (and ``per_class_ap``) instead, on its sigmoid scores averaged over
    each video's views; ``headline`` gives a report's one number either way."""
    if not isinstance(max_videos, int) or max_videos < 0:
        raise EvaluationError(f"max_videos={max_videos!r}: expected a count >= 0 (0 = every video)")
    rank, world = group_rank_world()
    num_classes = model_num_classes(module)
    if num_classes is not None:
        check_classes(index, num_classes, classes)
    multi = is_multi_label(module) if num_classes is not None else index.multi_label  # no config: the data's
    if multi != index.multi_label:
        raise EvaluationError(
            f"the model is {'multi' if multi else 'single'}-label and dataset {index.dataset} v{index.version} is "
            f"{'multi' if index.multi_label else 'single'}-label: "
            + ("its sigmoid scores cannot be scored by top-1 against one class per video" if multi else
               "its softmax over the classes was not trained to find every class of a video")
            + "; evaluate it on the dataset kind it was trained on, or fine-tune it on this one")
    label_problem = _label_set_problem if multi else _label_problem
    to_scores = torch.sigmoid if multi else partial(F.softmax, dim=-1)  # per class, or over the classes
    norm = normalization_of(module)  # the model's constants, whether clips are normalised here or on the device
    clip = dataclasses.replace(clip, mean=norm[0], std=norm[1])
    loader = view_loader(index, storage, split, clip=clip, protocol=protocol, temporal_clips=temporal_clips,
                         spatial_crops=spatial_crops, rank=rank, world_size=world, num_workers=num_workers)
    limit = math.ceil(max_videos / world) if max_videos else 0
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    views_seen = 0
    faults = FaultTally()
    problem = None
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=limit or math.ceil(index.num_samples(split) / world), unit="video", desc="test (rank 0)")
    for item in loader:
        if limit and len(rows) >= limit:
            break
        if problem is not None:  # read on without the model, in step with the other ranks (see below)
            continue
        faults.add(item.get("faults"))
        shards = _bad_label_shards(item.get("faults"))
        if shards:
            problem = _bad_label_problem(f"{index.dataset} v{index.version} {split}", shards)
            continue
        if item.get("views") is None:  # a worker's final count of skipped samples, not a video
            continue
        views, label = item["views"], item["label"]
        if num_classes is not None and (wrong := label_problem(label, num_classes)) is not None:
            problem = _video_problem(index, split, item["key"], wrong)
            continue  # no score can be right or wrong against it: the model runs no more
        chunks = [normalize_on_device(views[j:j + batch_size], device, *norm, dtype=dtype)
                  for j in range(0, len(views), batch_size)]
        probs = torch.cat([to_scores(module(chunk).float()) for chunk in chunks])
        mean = probs.mean(0)
        if num_classes is None:  # a module without a config: its output says
            num_classes = mean.numel()
            if (wrong := label_problem(label, num_classes)) is not None:
                problem = _video_problem(index, split, item["key"], wrong)
                continue
        row = {"key": item["key"], "label": int(label) if not multi else _label_set(label),
               "pred": int(mean.argmax()), "top5": mean.topk(min(5, mean.numel())).indices.tolist(),
               "views": len(views), "clips": item["clips"], "score": float(mean.max())}
        if multi:  # every class's score: average precision ranks the videos by each
            row["scores"] = mean.tolist()
        rows.append(row)
        views_seen += len(views)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    part = {"rows": rows, "faults": {"read": faults.read, "skipped": {u: dict(c) for u, c in faults.by_shard.items()}},
            "problem": problem, "rank": rank}
    gathered = [part]
    # Every rank gathers once its pass is read (a rank with a problem reads on without the model, so it
    # arrives with the others rather than waiting out the collective timeout), and all raise together.
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, part)
    problems = [p["problem"] for p in gathered if p["problem"]]
    if problems:
        raise ShardError(problems[0] + (f" (and {len(problems) - 1} more rank(s) found one)" if len(problems) > 1
                                        else ""))
    if rank != 0:
        return None
    return summarize(gathered, index=index, split=split, protocol=protocol, num_classes=num_classes,
                     views_per_video=(temporal_clips * spatial_crops) if protocol == "multi_view" else None,
                     seconds=time.time() - t0, views_seen=views_seen, multi_label=multi)


def _label_set(label: torch.Tensor) -> list[int] | int:
    """A multi-hot label as the list of its classes (a report row's ``label``), or UNLABELLED."""
    if bool((label == UNLABELLED).all()):
        return UNLABELLED
    return label.nonzero().flatten().tolist()


def summarize(parts: list[dict[str, Any]], *, index: DatasetIndex, split: str, protocol: str,
              num_classes: int | None, views_per_video: int | None, seconds: float,
              views_seen: int, multi_label: bool = False) -> dict[str, Any]:
    """The report of a test pass from every rank's rows: accuracy and the confusion matrix over labelled
    videos only (``multi_label``: mAP and each class's AP)."""
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["key"])
    faults = FaultTally()
    for p in parts:
        faults.add(p["faults"])
    scored = [r for r in rows if r["label"] != UNLABELLED]
    common = {
        "protocol": protocol, "split": split, "dataset": index.dataset, "version": index.version,
        "videos": len(scored), "unlabelled": len(rows) - len(scored), "skipped": faults.skipped, "read": faults.read,
        "skipped_by_reason": faults.by_reason,
        "skipped_by_shard": {u: dict(c) for u, c in sorted(faults.by_shard.items())},
        "index_videos": index.num_samples(split), "views_per_video": views_per_video,
    }
    if multi_label:
        width = num_classes or (len(rows[0]["scores"]) if rows else 0)
        targets = np.zeros((len(scored), width))
        for i, r in enumerate(scored):
            targets[i, r["label"]] = 1.0
        mean_ap, per_class = mean_average_precision(
            np.array([r["scores"] for r in scored]).reshape(len(scored), width), targets)
        return {**common, "metric": "map", "map": mean_ap, "per_class_ap": per_class,
                "classes_scored": len(per_class), "top1": None, "top5": None, "per_class_top1": None,
                "confusion": None, "predictions": rows, "seconds_rank0": seconds, "views_rank0": views_seen}
    if num_classes is None:  # a model without a config: as many classes as any row shows
        num_classes = 1 + max([r["label"] for r in scored] + [r["pred"] for r in rows] + [0])
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for r in scored:
        confusion[r["label"]][r["pred"]] += 1
    per_class = {c: (100 * confusion[c][c] / sum(confusion[c])) for c in range(num_classes) if sum(confusion[c])}
    n = len(scored)
    return {
        **common, "metric": "top1",
        "top1": 100 * sum(r["pred"] == r["label"] for r in scored) / n if n else None,
        "top5": 100 * sum(r["label"] in r["top5"] for r in scored) / n if n else None,
        "per_class_top1": per_class, "confusion": confusion, "predictions": rows,
        "seconds_rank0": seconds, "views_rank0": views_seen,
    }


def headline(report: dict[str, Any]) -> tuple[str, float | None]:
    """A test report's one number and its name: ``("top1", %)``, or ``("map", %)`` for a multi-label model
    (reports written before ``metric`` existed are top-1); the number is None when nothing was scored."""
    if report.get("metric") == "map":
        return "map", report.get("map")
    return "top1", report.get("top1")


def accuracy_metrics(report: dict[str, Any]) -> dict[str, float | None]:
    """A test report's accuracy as the run's metrics: ``test_top1`` and ``test_top5``, or ``test_map``."""
    if headline(report)[0] == "map":
        return {"test_map": report.get("map")}
    return {"test_top1": report.get("top1"), "test_top5": report.get("top5")}


def describe(report: dict[str, Any]) -> str:
    """One line on what a report counts and what it left out, for people."""
    views = report["views_per_video"] or "all covering clips x crops"
    head = (f"{report['videos']} labelled videos of {report.get('dataset', '?')} v{report.get('version', '?')} "
            f"{report['split']} ({report['protocol']}, {views} views)")
    metric, value = headline(report)
    if value is None:
        head += (": no accuracy (nothing labelled was evaluated)" if not report["videos"] else
                 ": no mAP (no class has a positive video)")
    elif metric == "map":
        head += f": mAP {value:.2f}% (mean AP over the {report['classes_scored']} classes with a positive video)"
    else:
        head += f": top-1 {report['top1']:.2f}%  top-5 {report['top5']:.2f}%"
    left_out = []
    if report.get("unlabelled"):
        left_out.append(f"{report['unlabelled']} unlabelled videos excluded (predicted, not scored)")
    if report.get("skipped"):
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((report.get("skipped_by_reason") or {}).items()))
        left_out.append(f"{report['skipped']} videos skipped, not scored (broken in storage: {reasons or '?'}; "
                        f"skipped_by_shard in the report says where)")
    return head + "".join(f"\n  {line}" for line in left_out)
