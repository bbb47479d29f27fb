"""A run's model for others: the consolidated fp32 weights of a checkpoint as ``model.safetensors``, with the
model's config and class names in its metadata (``jobs/export.py``, the end of every training run); the Hugging
Face directory made from it, with its model card (``export_hf``); and its upload to the Hugging Face Hub
(``push_to_hub``)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from pipeline.config import RunConfig
from pipeline.models.config import TimeSformerConfig
from pipeline.models.convert import load_safetensors, save_hf, save_safetensors
from pipeline.models.registry import build, family_of, model_config
from pipeline.train import checkpoint as ckpt
from pipeline.train.engine import consolidated_state_dict
from pipeline.train.evaluate import RUN_DATASET_FILE


def recipe_protocol(cfg: RunConfig) -> dict[str, Any]:
    """How the recipe samples a video for its test protocol: what ``pipeline.predict.Protocol`` takes, and what
    an exported model records (so a model without its run is predicted on as it was tested)."""
    d, t = cfg.data, cfg.test
    return {"num_frames": d.num_frames, "sampling_rate": d.sampling_rate, "crop": t.crop or d.crop,
            "temporal_clips": t.temporal_clips, "spatial_crops": t.spatial_crops, "mode": t.protocol,
            "sampler": d.sampler, "ref_fps": d.ref_fps}


def run_weights(run_dir: Path, cfg: RunConfig, tag: str | None = None, ema: bool | None = None) -> tuple[str, bool]:
    """Which weights of a run are its model (the export, predict on a run without an export): the checkpoint
    ``tag`` (default: the best with ``train.keep_best``, else the newest complete) and whether its EMA
    (default: when the run exports it, ``train.ema_export``)."""
    from pipeline.train.ema import exports_ema

    if tag is None and cfg.train.keep_best:
        best = ckpt.best_checkpoint(run_dir)
        tag = best["tag"] if best is not None else None
    if tag is None:
        latest = ckpt.latest_complete(run_dir)
        if latest is None:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint to export")
        tag = latest[1]
    return tag, exports_ema(cfg) if ema is None else ema


def export_model(run_dir: Path, cfg: RunConfig, tag: str | None = None, out: Path | None = None,
                 classes: list[str] | None = None, ema: bool | None = None) -> Path:
    """The consolidated fp32 model of a checkpoint (default: the run's best with ``train.keep_best``, else the
    newest complete) as model.safetensors, with its class names (``classes``, else the run's ``dataset.json``)
    in the metadata. ``ema``: the EMA of the weights (default: when the run exports it, ``train.ema_export``)."""
    tag, ema = run_weights(run_dir, cfg, tag, ema)
    state = consolidated_state_dict(ckpt.checkpoint_root(run_dir), tag, ema=ema)
    model = build(model_config(cfg))
    model.load_state_dict(state, strict=True)
    record = run_dir / RUN_DATASET_FILE
    if classes is None and record.exists():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            classes = json.loads(record.read_text())["classes"]
    if classes is not None and len(classes) != model.cfg.num_classes:
        classes = None  # names that do not fit the head are not this model's: leave them out
    return save_safetensors(model, out or (run_dir / "export" / "model.safetensors"), classes=classes,
                            protocol=recipe_protocol(cfg))


class PushError(RuntimeError):
    """An upload to the Hugging Face Hub that could not be made: no token, a refused or failed call. The message
    says which and what to do; the export directory is left as it was written."""


def export_hf(model_path: str | Path, directory: str | Path, *, labels: list[str] | None = None,
              run_dir: str | Path | None = None, cfg: RunConfig | None = None, index: Any = None,
              repo_id: str | None = None) -> Path:
    """A Hugging Face ``TimesformerForVideoClassification`` directory from an exported ``model.safetensors``:
    ``config.json`` (with ``id2label``), ``preprocessor_config.json`` (the model's input size and normalisation),
    the weights, and ``README.md``, the model card. ``labels``: the class names (default: the file's metadata,
    else ``LABEL_<i>``). With ``run_dir`` and its ``cfg`` the card tells the run's story (dataset and version,
    recipe, test protocol and accuracy, GPU-hours; ``index``, the run's dataset index, adds the training data's
    digest); without them, a bare model's shorter card. ``repo_id``: where it will be pushed (the card's examples
    name it)."""
    from pipeline.train.evaluate import model_classes
    from pipeline.train.model_card import run_facts, write_model_card

    model = load_safetensors(model_path)
    if not isinstance(model.cfg, TimeSformerConfig):
        raise ValueError(f"{model_path}: a {family_of(model).name} model; a Hugging Face directory holds a "
                         "TimesformerForVideoClassification, and transformers has no class for this family. Its "
                         "model.safetensors is the whole export (pipeline.models.load_safetensors, "
                         "timesformer-predict, the MLflow registry): leave out --hf / --push-to-hub")
    if labels is None:
        with contextlib.suppress(ValueError):
            labels = model_classes(model_path)[0]
    if labels is not None and len(labels) != model.cfg.num_classes:
        raise ValueError(f"{len(labels)} class names for a model with {model.cfg.num_classes} classes "
                         f"({model_path})")
    labels = list(labels or [f"LABEL_{i}" for i in range(model.cfg.num_classes)])
    directory = save_hf(model, directory, labels)
    facts = run_facts(run_dir, cfg, index) if run_dir is not None and cfg is not None else None
    write_model_card(directory, model.cfg, labels, facts, repo_id)
    return directory


def hub_token(repo_id: str, token: str | None = None) -> str:
    """The token to push to ``repo_id`` with, after checking the id: ``token``, else huggingface_hub's own
    (``$HF_TOKEN``, else the login that ``hf auth login`` stored). Raises ``PushError`` saying what to do; called
    before an export starts, so a missing token costs nothing."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        if "/" not in repo_id:
            raise HFValidationError("it must name its owner: <user or organisation>/<name>")
    except HFValidationError as e:
        raise PushError(f"--push-to-hub {repo_id!r}: not a Hugging Face repository id ({e})") from None
    token = token or huggingface_hub.get_token()
    if not token:
        raise PushError(f"pushing to {repo_id}: no Hugging Face token. Set HF_TOKEN to a token with write access "
                        f"(https://huggingface.co/settings/tokens) or log in once with `hf auth login`")
    return token


# What export_hf writes, and all that push_to_hub uploads: anything else a person left in the directory (notes,
# a copy of a private file, a checkpoint) stays on this machine
HF_EXPORT_FILES = ("README.md", "config.json", "preprocessor_config.json", "model.safetensors")


def pushed_files(directory: str | Path) -> list[str]:
    """The files of an export directory that ``push_to_hub`` uploads (``HF_EXPORT_FILES`` that are there)."""
    return [name for name in HF_EXPORT_FILES if (Path(directory) / name).is_file()]


def push_to_hub(directory: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str | None = None) -> str:
    """Upload an export directory's own files (``HF_EXPORT_FILES``: the model card, the configs, the weights;
    nothing else in the directory) to the Hub repository ``repo_id`` (``org/name``; created when missing, private
    when ``private``; an existing repository keeps its visibility): ``HfApi().create_repo(exist_ok=True)``, then
    ``upload_folder`` restricted to those files, with ``hub_token``'s token. Returns the URL of the commit.
    Raises ``PushError`` saying what went wrong."""
    import huggingface_hub

    directory = Path(directory)
    if not directory.is_dir():
        raise PushError(f"pushing to {repo_id}: {directory} is not a directory (write it with --hf first)")
    files = pushed_files(directory)
    missing = [name for name in ("config.json", "model.safetensors") if name not in files]
    if missing:
        raise PushError(f"pushing to {repo_id}: {directory} has no {' and no '.join(missing)}: not an export "
                        f"directory (write it with --hf first)")
    token = hub_token(repo_id, token)
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model",
                                   allow_patterns=files,
                                   commit_message=commit_message or f"Upload {directory.name} (jobs/export.py)")
    except Exception as e:  # noqa: BLE001 -- HTTP errors, offline mode, a refused token: all one answer
        detail = " ".join(str(e).split()).replace(token, "***")[:500]  # never the token in a log
        raise PushError(f"pushing {directory} to {repo_id} failed ({type(e).__name__}: {detail}); the export is "
                        f"unchanged there: check the token's write access to {repo_id.split('/')[0]} and the "
                        f"network, then run the command again") from None
    return str(getattr(commit, "commit_url", commit))
