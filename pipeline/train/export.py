"""A run's model for others: the consolidated fp32 weights of a checkpoint as ``model.safetensors``, with the
model's config and class names in its metadata (``jobs/export.py``, the end of every training run)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.models.convert import save_safetensors
from pipeline.models.timesformer import TimeSformer, model_config
from pipeline.train import checkpoint as ckpt
from pipeline.train.engine import consolidated_state_dict
from pipeline.train.evaluate import RUN_DATASET_FILE


def export_model(run_dir: Path, cfg: RunConfig, tag: str | None = None, out: Path | None = None,
                 classes: list[str] | None = None) -> Path:
    """The consolidated fp32 model of a checkpoint (default: the newest complete) as model.safetensors,
    with its class names (``classes``, else the run's ``dataset.json``) in the metadata."""
    if tag is None:
        latest = ckpt.latest_complete(run_dir)
        if latest is None:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint to export")
        tag = latest[1]
    state = consolidated_state_dict(ckpt.checkpoint_root(run_dir), tag)
    model = TimeSformer(model_config(cfg))
    model.load_state_dict(state, strict=True)
    record = run_dir / RUN_DATASET_FILE
    if classes is None and record.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            classes = json.loads(record.read_text())["classes"]
    if classes is not None and len(classes) != model.cfg.num_classes:
        classes = None  # names that do not fit the head are not this model's: leave them out
    return save_safetensors(model, out or (run_dir / "export" / "model.safetensors"), classes=classes)
