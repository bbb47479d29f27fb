"""The model card of a Hugging Face export (``README.md`` beside ``config.json``): what the model is, what it was
trained on and how well it did, so a person finding it on the Hub (or in a folder) knows what they have.

Hugging Face's model-card format: YAML front matter (``library_name: transformers``, ``pipeline_tag:
video-classification``, tags, the dataset, the base model, and a ``model-index`` with the test accuracy, which
the Hub shows as an evaluation table), then Markdown. For a run's export the facts come from its run directory
(``run_facts``): the dataset and its version as the run recorded them (``dataset.json``) with a digest of the
training split's shards (the one MLflow's dataset input shows), the recipe, the test report
(``eval/test.json``), the GPU-hours (``gpu_hours.json``). A bare model (a ``model.safetensors`` exported
without its run) gets the shorter card its own metadata allows: architecture, classes, input normalisation, use.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.models.registry import family_of
from pipeline.models.timesformer import TimeSformerConfig

CARD_FILE = "README.md"
SHOWN_CLASSES = 50  # class names listed in the card; the rest are in config.json's id2label


def run_facts(run_dir: str | Path, cfg: Any, index: Any = None) -> dict[str, Any]:
    """What a run directory says about its model, for the card and the model registry. ``index`` (the run's
    dataset index, when at hand) adds the training split's digest and sample count; a file that is missing or
    unreadable leaves its facts out (an older run, a run without a test): the card says only what is known."""
    from pipeline.train.evaluate import recorded_dataset

    run_dir = Path(run_dir)
    facts: dict[str, Any] = {
        "run_dir": str(run_dir), "run_name": run_dir.name, "recipe": cfg.recipe, "description": cfg.description,
        "variant": cfg.model.variant,
        "attention_type": getattr(cfg.model, "attention_type", None) or family_of(cfg.model.variant).name,
        "num_frames": cfg.data.num_frames, "sampling_rate": cfg.data.sampling_rate, "crop": cfg.data.crop,
        "init": getattr(cfg.model, "init_source", "") or cfg.model.init,
        "optimizer": cfg.optim.name, "lr": cfg.optim.lr, "global_batch": cfg.train.global_batch,
        "epochs": cfg.train.epochs, "max_steps": cfg.train.max_steps, "freeze": cfg.train.freeze,
        "train_split": cfg.data.train_split, "test_split": cfg.data.test_split,
        "dataset": None, "dataset_version": None, "dataset_digest": None, "train_samples": None,
    }
    try:
        recorded = recorded_dataset(run_dir)
    except ValueError:  # EvaluationError: a damaged record; the card goes without it
        recorded = None
    if recorded is not None:
        facts["dataset"], facts["dataset_version"] = recorded.get("dataset"), recorded.get("version")
    if index is not None:
        facts["dataset"] = facts["dataset"] or index.dataset
        facts["dataset_version"] = facts["dataset_version"] or index.version
        if index.version == facts["dataset_version"]:  # the digest of the version the run read, not another
            facts["dataset_digest"] = index.split_digest(cfg.data.train_split)
            facts["train_samples"] = index.num_samples(cfg.data.train_split)
    report = _read_json(run_dir / "eval" / "test.json")
    if isinstance(report, dict):
        facts["test"] = {k: report.get(k) for k in ("protocol", "split", "videos", "unlabelled", "skipped",
                                                    "views_per_video", "top1", "top5", "map", "mAP")
                         if report.get(k) is not None}
        # the report says which protocol ran and how many views a video got; the recipe adds how they were made
        # (crops always; clips only for multi_view: long_video takes every clip covering the video)
        facts["test"]["spatial_crops"] = cfg.test.spatial_crops
        if report.get("protocol") == "multi_view":
            facts["test"]["temporal_clips"] = cfg.test.temporal_clips
    hours = _read_json(run_dir / "gpu_hours.json")
    if isinstance(hours, dict) and isinstance(hours.get("hours"), (int, float)):
        facts["gpu_hours"], facts["gpu_hours_unit"] = float(hours["hours"]), str(hours.get("unit", "gpu"))
    result = _read_json(run_dir / "result.json")
    if isinstance(result, dict) and "step" in result:
        facts["steps"] = result["step"]
    return facts


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def scores_of(facts: dict[str, Any] | None) -> dict[str, float]:
    """The test numbers of ``facts`` by their MLflow names (``test_top1``, ``test_top5``, ``test_map``)."""
    test = (facts or {}).get("test") or {}
    out = {f"test_{k.lower()}": float(test[k]) for k in ("top1", "top5", "map", "mAP") if test.get(k) is not None}
    if test.get("videos") is not None:
        out["test_videos"] = float(test["videos"])
    return out


def test_views(test: dict[str, Any]) -> str:
    """How the test protocol of a report (``facts["test"]``) looked at each video, for people: ``multi_view``:
    its views per video (the report's ``views_per_video``) as clips x crops; ``long_video``: every
    non-overlapping clip covering the video x its crops."""
    crops = test.get("spatial_crops")
    crops_text = f"{crops} spatial crop(s)" if crops else "the recipe's spatial crops"
    if test.get("protocol") == "long_video":
        return f"every non-overlapping clip covering the video x {crops_text}"
    views, clips = test.get("views_per_video"), test.get("temporal_clips")
    if views and clips and crops and clips * crops == views:
        return f"{views} views: {clips} temporal clip(s) x {crops} spatial crop(s)"
    if views:
        return f"{views} views"
    return f"{clips} temporal clip(s) x {crops_text}" if clips else "views as the recipe says"


def init_shown(init: str) -> str:
    """The initial weights as a published card may name them: a hub reference (pinned to its commit by launch)
    in full; otherwise only what kind of checkpoint it was, since a local path or an ``s3://`` URI names private
    places (MLflow's params keep the full value)."""
    if not init:
        return "random"
    if _hub_id(init):
        return f"`{init}` (Hugging Face Hub)"
    if init.startswith("s3://"):
        return "an s3 checkpoint"
    if "://" in init:
        return "a remote checkpoint"
    return "a local checkpoint"


def _hub_id(source: str) -> str | None:
    """``org/name`` of an ``hf-hub:org/name[@revision]`` reference, else None."""
    m = re.fullmatch(r"hf-hub:([\w.-]+/[\w.-]+)(?:@.*)?", source or "")
    return m.group(1) if m else None


def front_matter(cfg: TimeSformerConfig, facts: dict[str, Any] | None) -> dict[str, Any]:
    """The card's YAML metadata (the Hub reads it to file and show the model)."""
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "video-classification",
                            "tags": ["video-classification", "timesformer", cfg.attention_type.replace("_", "-")]}
    if getattr(cfg, "multi_label", False):
        meta["tags"].append("multi-label-classification")
    if not facts:
        return meta
    if facts.get("dataset"):
        meta["datasets"] = [str(facts["dataset"])]
    base = _hub_id(str(facts.get("init") or ""))
    if base:
        meta["base_model"] = base
    metrics = scores_of(facts)
    results = []
    for key, kind, name in (("test_top1", "accuracy", "top-1 accuracy"), ("test_top5", "top_5_accuracy",
                                                                         "top-5 accuracy"),
                            ("test_map", "mean_average_precision", "mAP")):
        if key in metrics:
            results.append({"type": kind, "value": round(metrics[key], 3), "name": f"{name} (%)"})
    if results:
        meta["metrics"] = sorted({r["type"] for r in results})
        test = facts["test"]
        meta["model-index"] = [{"name": facts.get("run_name") or facts["recipe"], "results": [{
            "task": {"type": "video-classification", "name": "Video Classification"},
            "dataset": {"name": f"{facts.get('dataset') or 'dataset'} v{facts.get('dataset_version')}",
                        "type": str(facts.get("dataset") or "custom"), "split": str(test.get("split", ""))},
            "metrics": results}]}]
    return meta


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _fmt(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def model_card(cfg: TimeSformerConfig, labels: list[str], facts: dict[str, Any] | None = None,
               repo_id: str | None = None) -> str:
    """The card's text. ``facts``: ``run_facts`` of the run the model comes from (None: a bare model);
    ``repo_id``: the Hub repository it is pushed to (the usage examples name it)."""
    where = repo_id or "path/to/this/directory"
    title = f"{facts['recipe']}: TimeSformer" if facts else "TimeSformer"
    kind = "labels (multi-label: independent sigmoid scores)" if getattr(cfg, "multi_label", False) else "classes"
    scheme = cfg.attention_type.replace("_", " ")
    lines = [f"# {title} ({cfg.num_frames}x{cfg.img_size}, {scheme} attention, {cfg.num_classes} classes)", ""]
    if facts and facts.get("description"):
        lines += [str(facts["description"]).strip(), ""]
    lines += [f"A TimeSformer video classifier (Bertasius et al., *Is Space-Time Attention All You Need for Video "
              f"Understanding?*, ICML 2021) in Hugging Face's `TimesformerForVideoClassification` format: "
              f"{cfg.depth} blocks of width {cfg.embed_dim}, {cfg.patch_size}x{cfg.patch_size} patches, "
              f"{scheme} attention, clips of {cfg.num_frames} frames of {cfg.img_size}x{cfg.img_size}, "
              f"{cfg.num_classes} {kind}.",
              ""]
    if facts:
        lines += _run_sections(facts)
    lines += ["## Input", "",
              f"Frames are resized so the short side is {cfg.img_size} pixels, centre-cropped to "
              f"{cfg.img_size}x{cfg.img_size}, scaled to [0, 1] and normalised per channel (RGB) with mean "
              f"{list(cfg.mean)} and std {list(cfg.std)} (`preprocessor_config.json` says the same, so the "
              f"image processor does this). The model takes `pixel_values` of shape (batch, frames, 3, height, "
              f"width)."]
    if facts:
        lines += ["", f"Training sampled {facts['num_frames']} frames every {facts['sampling_rate']} frames (of a "
                      f"30 fps timeline); pass `frame_sampling_rate={facts['sampling_rate']}` to the pipeline to "
                      f"look at the same span (its default, 1, takes {cfg.num_frames} consecutive frames)."]
    lines += ["", "## Classes", ""]
    shown = ", ".join(f"`{c}`" for c in labels[:SHOWN_CLASSES])
    more = (f" and {len(labels) - SHOWN_CLASSES} more (`config.json`'s `id2label`)"
            if len(labels) > SHOWN_CLASSES else "")
    lines += [f"{len(labels)}: {shown}{more}.", ""]
    rate = f", frame_sampling_rate={facts['sampling_rate']}" if facts else ""
    lines += ["## How to use", "", "With transformers (decodes the video with PyAV):", "", "```python",
              "from transformers import pipeline", "",
              f'classify = pipeline("video-classification", model="{where}")',
              f'print(classify("video.mp4", top_k=5{rate}))', "```", "",
              "With the prediction command of the project that trained it (`jobs/predict.py`: the multi-view test "
              "protocol, top-k predictions as CSV/JSONL, folders and lists of videos):", "", "```bash",
              f"python jobs/predict.py {'hf-hub:' + repo_id if repo_id else where} videos/", "```", ""]
    return _yaml_block(front_matter(cfg, facts)) + "\n".join(lines)


def _run_sections(facts: dict[str, Any]) -> list[str]:
    lines = ["## Training data", ""]
    if facts.get("dataset"):
        digest = f", digest `{facts['dataset_digest']}` of its `{facts['train_split']}` split's shards" \
            if facts.get("dataset_digest") else ""
        samples = f" ({facts['train_samples']} training clips)" if facts.get("train_samples") else ""
        lines.append(f"Dataset `{facts['dataset']}` version {facts['dataset_version']}{digest}{samples}: the "
                     f"version the run read, as its run directory recorded it.")
    else:
        lines.append("The run directory holds no record of its dataset.")
    lines += ["", "## Recipe", "",
              f"- recipe `{facts['recipe']}`, model variant `{facts['variant']}`, {facts['attention_type']} attention",
              f"- clips of {facts['num_frames']} frames, one every {facts['sampling_rate']}, cropped to "
              f"{facts['crop']}x{facts['crop']}",
              f"- initial weights: {init_shown(str(facts.get('init') or ''))}",
              f"- optimizer {facts['optimizer']}, learning rate {_fmt(facts['lr'], 4)} at a global batch of "
              f"{facts['global_batch']} clips, "
              + (_count(facts["steps"], "step") if facts.get("steps") is not None else
                 _count(facts["max_steps"], "step") if facts.get("max_steps") else f"{_fmt(facts['epochs'], 1)} epochs")
              + (f", `train.freeze={facts['freeze']}`" if facts.get("freeze") not in (None, "none") else "")]
    if facts.get("gpu_hours") is not None:
        lines.append(f"- compute: {facts['gpu_hours']:.4g} {facts.get('gpu_hours_unit', 'gpu')}-hours "
                     f"(allocated accelerators x wall time, restarts included)")
    lines += ["", "## Evaluation", ""]  # the run's test report (eval/test.json)
    test = facts.get("test")
    if not test:
        lines += ["No test report in the run directory (the test protocol did not run).", ""]
        return lines
    protocol = f"the `{test.get('protocol', '?')}` test protocol ({test_views(test)} per video, scores averaged)"
    metrics = scores_of(facts)
    scores = [f"top-1 **{metrics['test_top1']:.2f}%**" if "test_top1" in metrics else "",
              f"top-5 {metrics['test_top5']:.2f}%" if "test_top5" in metrics else "",
              f"mAP **{metrics['test_map']:.2f}%**" if "test_map" in metrics else ""]
    scores = [s for s in scores if s]
    left_out = [f"{test[k]} {k}" for k in ("unlabelled", "skipped") if test.get(k)]
    lines.append(f"On the `{test.get('split', '?')}` split of the training dataset, {test.get('videos', 0)} labelled "
                 f"videos, with {protocol}: {', '.join(scores) if scores else 'no accuracy (nothing labelled)'}"
                 + (f" ({', '.join(left_out)} videos left out)" if left_out else "") + ".")
    return lines + [""]


def _yaml_block(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n"


def write_model_card(directory: str | Path, cfg: TimeSformerConfig, labels: list[str],
                     facts: dict[str, Any] | None = None, repo_id: str | None = None) -> Path:
    """``README.md`` in an export directory (see ``model_card``)."""
    path = Path(directory) / CARD_FILE
    path.write_text(model_card(cfg, labels, facts, repo_id))
    return path
