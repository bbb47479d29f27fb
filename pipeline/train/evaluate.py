"""Evaluation: clip-level validation during training, and the paper's test protocol at the end.

* ``validate``: one clip per video (centre clip, centre crop), every video of the split exactly once
  over all ranks; loss, top-1 and top-5 summed across ranks.
* ``test_protocol``: per video, the softmax scores of all its views averaged (the paper: ``k`` temporal
  clips x 3 spatial crops; the long-video protocol: every non-overlapping clip covering the video);
  video-level top-1/top-5, per-class accuracy and a confusion matrix, gathered on rank 0.

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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.loader import FaultTally, view_loader
from pipeline.data.shards import DatasetIndex, ShardError
from pipeline.data.transforms import normalize_on_device
from pipeline.distributed import group_rank_world
from pipeline.models.config import normalization_of

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


def _label_problem(label: Any, num_classes: int) -> str | None:
    """Why a label cannot be scored, or None: an integer in [0, num_classes) or UNLABELLED only."""
    if isinstance(label, torch.Tensor) and label.numel() == 1:
        label = label.item()
    if isinstance(label, bool) or not isinstance(label, int):
        return f"label {label!r} is not an integer class index"
    if label == UNLABELLED or 0 <= label < num_classes:
        return None
    return f"label {label} is outside the model's classes 0..{num_classes - 1} (and is not {UNLABELLED}, unlabelled)"


@torch.no_grad()
def validate(module: nn.Module, dtype: torch.dtype, loader, device: torch.device,
             max_batches: int = 0) -> dict[str, float]:
    """Clip-level loss / top-1 / top-5 over one exact pass of ``loader`` (this rank's part), summed over ranks.
    Unlabelled clips are left out (counted as ``val_unlabelled``); a clip whose label the model cannot
    predict stops the pass on every rank with a ``ShardError`` naming it."""
    loss_sum = top1 = top5 = count = unlabelled = bad = 0.0
    faults = FaultTally()
    problem = ""
    norm = normalization_of(module)
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
        wrong = (torch.ones_like(labels, dtype=torch.bool) if labels.is_floating_point() or labels.dtype == torch.bool
                 else (labels < UNLABELLED) | (labels >= logits.shape[-1]))
        if bool(wrong.any()):
            j = int(wrong.nonzero()[0])
            key = batch["key"][j] if "key" in batch else f"#{j} of batch {i}"
            problem = (f"validation clip {key}: label {labels[j].item()!r} is not one of the model's classes "
                       f"0..{logits.shape[-1] - 1} (nor {UNLABELLED}, unlabelled); the shard holding it does not "
                       f"belong to this dataset (or the model to it)")
            bad = 1.0
            continue  # the other ranks learn of it at the sum below, then every rank raises
        scored = labels != UNLABELLED
        unlabelled += float((~scored).sum())
        if not bool(scored.any()):
            continue
        logits, labels = logits[scored], labels[scored].to(device)
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
    if count == 0:
        if unlabelled:
            log.warning("validation: all %d clips are unlabelled: no accuracy", int(unlabelled))
        return {"val_clips": 0.0, **extra}
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
    what was left out. With no labelled video, ``top1`` and ``top5`` are None: there is no accuracy."""
    if not isinstance(max_videos, int) or max_videos < 0:
        raise EvaluationError(f"max_videos={max_videos!r}: expected a count >= 0 (0 = every video)")
    rank, world = group_rank_world()
    num_classes = model_num_classes(module)
    if num_classes is not None:
        check_classes(index, num_classes, classes)
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
        if num_classes is not None and (wrong := _label_problem(label, num_classes)) is not None:
            problem = _video_problem(index, split, item["key"], wrong)
            continue  # no score can be right or wrong against it: the model runs no more
        chunks = [normalize_on_device(views[j:j + batch_size], device, *norm, dtype=dtype)
                  for j in range(0, len(views), batch_size)]
        probs = torch.cat([F.softmax(module(chunk).float(), -1) for chunk in chunks])
        mean = probs.mean(0)
        if num_classes is None:  # a module without a config: its output says
            num_classes = mean.numel()
            if (wrong := _label_problem(label, num_classes)) is not None:
                problem = _video_problem(index, split, item["key"], wrong)
                continue
        rows.append({"key": item["key"], "label": int(label), "pred": int(mean.argmax()),
                     "top5": mean.topk(min(5, mean.numel())).indices.tolist(), "views": len(views),
                     "clips": item["clips"], "score": float(mean.max())})
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
                     seconds=time.time() - t0, views_seen=views_seen)


def summarize(parts: list[dict[str, Any]], *, index: DatasetIndex, split: str, protocol: str,
              num_classes: int | None, views_per_video: int | None, seconds: float,
              views_seen: int) -> dict[str, Any]:
    """The report of a test pass from every rank's rows: accuracy and the confusion matrix over labelled
    videos only."""
    rows = sorted((r for p in parts for r in p["rows"]), key=lambda r: r["key"])
    faults = FaultTally()
    for p in parts:
        faults.add(p["faults"])
    scored = [r for r in rows if r["label"] != UNLABELLED]
    if num_classes is None:  # a model without a config: as many classes as any row shows
        num_classes = 1 + max([r["label"] for r in scored] + [r["pred"] for r in rows] + [0])
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for r in scored:
        confusion[r["label"]][r["pred"]] += 1
    per_class = {c: (100 * confusion[c][c] / sum(confusion[c])) for c in range(num_classes) if sum(confusion[c])}
    n = len(scored)
    return {
        "protocol": protocol, "split": split, "dataset": index.dataset, "version": index.version,
        "videos": n, "unlabelled": len(rows) - n, "skipped": faults.skipped, "read": faults.read,
        "skipped_by_reason": faults.by_reason,
        "skipped_by_shard": {u: dict(c) for u, c in sorted(faults.by_shard.items())},
        "index_videos": index.num_samples(split), "views_per_video": views_per_video,
        "top1": 100 * sum(r["pred"] == r["label"] for r in scored) / n if n else None,
        "top5": 100 * sum(r["label"] in r["top5"] for r in scored) / n if n else None,
        "per_class_top1": per_class, "confusion": confusion, "predictions": rows,
        "seconds_rank0": seconds, "views_rank0": views_seen,
    }


def describe(report: dict[str, Any]) -> str:
    """One line on what a report counts and what it left out, for people."""
    views = report["views_per_video"] or "all covering clips x crops"
    head = (f"{report['videos']} labelled videos of {report.get('dataset', '?')} v{report.get('version', '?')} "
            f"{report['split']} ({report['protocol']}, {views} views)")
    if report["top1"] is None:
        head += ": no accuracy (nothing labelled was evaluated)"
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
