"""The MLflow model registry: at the end of a training run, rank 0 logs the exported model to the run as an MLflow
model (with an input example and a signature) and registers it under the recipe's name, so the MLflow UI lists
each recipe's models as versions, with their test metrics, dataset version and run directory.

The MLflow model is a "model from code" (``pipeline/tracking/mlflow_model.py``) over ``model.safetensors``: loading
it runs that file and reads tensors, nothing pickled (``mlflow.pytorch.log_model`` would pickle the module). The
``pipeline`` package travels with it (``code_paths``), so ``mlflow.pyfunc.load_model("models:/<recipe>/<n>")``
works wherever torch, safetensors and numpy are installed. Requirements are given, not inferred (inferring
loads the model in a subprocess: slow, and the same answer).

Registration is an extra: a store without a registry (a file store), a server that is down or refuses, are a
warning in the run's log, never a failed run (``register_run_model``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.models.registry import family_of, scheme_of
from pipeline.secrets import redact_text, reveal_uri

log = logging.getLogger(__name__)
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pipeline/: the code the MLflow model imports
EXAMPLE_MAX_FRAMES, EXAMPLE_MAX_SIZE = 8, 224  # the input example's clip at most (it is stored as JSON, twice)


def registered_name(recipe: str) -> str:
    """The registry name of a recipe's models: the recipe name, with anything but letters, digits, ``-``, ``_``
    and ``.`` turned into ``-`` (the registry refuses ``/`` and ``:``, and its URIs do not quote)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", recipe).strip("-.")
    return name or "timesformer"


def input_example(cfg: Any) -> np.ndarray:
    """A uint8 clip the model takes, ``(1, 3, frames, size, size)``: the model's own clip, or for the large
    variants a shorter and smaller one (the model reads frame count and size from its input), so the example
    stays a few MB of JSON."""
    frames = min(cfg.num_frames, EXAMPLE_MAX_FRAMES)
    step = getattr(cfg, "patch_size", 32)  # a 3D CNN takes any size; 32 is its stride
    size = cfg.img_size if cfg.img_size <= EXAMPLE_MAX_SIZE else EXAMPLE_MAX_SIZE // step * step
    return np.random.default_rng(0).integers(0, 256, (1, cfg.in_chans, frames, size, size), dtype=np.uint8)


def signature(cfg: Any):
    """uint8 clips ``(batch, 3, frames, height, width)`` in, class probabilities ``(batch, classes)`` out; frame
    count and size are free (the model resizes its embeddings to its input)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, cfg.in_chans, -1, -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, cfg.num_classes))]))


def requirements() -> list[str]:
    """The pip requirements of the MLflow model, pinned to what is running (MLflow adds itself)."""
    import safetensors
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"safetensors=={safetensors.__version__}",
            f"numpy=={np.__version__}"]


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at ``uri`` for the block, and back after (a process may track elsewhere)."""
    try:
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    except ImportError:  # an MLflow without it: set it for good (the process ends after a training run)
        import mlflow

        mlflow.set_tracking_uri(uri)
        yield
        return
    with _use_tracking_uri(uri):
        yield


def version_tags(facts: dict[str, Any], model_cfg: Any) -> dict[str, str]:
    """The tags of a registered version: test metrics, the data it was trained on and where the run is."""
    from pipeline.train.model_card import scores_of, test_views

    tags = {k: f"{v:.4g}" for k, v in scores_of(facts).items()}
    test = facts.get("test") or {}
    if test:  # from the test report: the protocol that ran (long_video: every covering clip, not test.* clips)
        tags["test_protocol"] = f"{test.get('protocol', '?')}: {test_views(test)} on {test.get('split', '?')}"
    if facts.get("dataset"):
        tags["dataset"] = f"{facts['dataset']} v{facts.get('dataset_version')}"
        tags["dataset_version"] = str(facts.get("dataset_version"))
    if facts.get("dataset_digest"):
        tags["dataset_digest"] = str(facts["dataset_digest"])
    if facts.get("gpu_hours") is not None:
        tags["gpu_hours"] = f"{facts['gpu_hours']:.4g}"
        tags["gpu_hours_unit"] = str(facts.get("gpu_hours_unit", "gpu"))
    tags.update(run_dir=str(facts["run_dir"]), recipe=str(facts["recipe"]), variant=str(facts["variant"]),
                attention_type=scheme_of(model_cfg), family=family_of(model_cfg).name,
                clip=f"{model_cfg.num_frames}x{model_cfg.img_size}",
                classes=str(model_cfg.num_classes),
                normalization=f"mean={list(model_cfg.mean)} std={list(model_cfg.std)}")
    return tags


def describe_version(facts: dict[str, Any], model_cfg: Any) -> str:
    """A version's description in the UI: what the model is, what it was trained on, how well it did."""
    from pipeline.train.model_card import scores_of, test_views

    scores = scores_of(facts)
    data = (f"{facts['dataset']} v{facts.get('dataset_version')}"
            + (f" (train digest {facts['dataset_digest']})" if facts.get("dataset_digest") else "")
            if facts.get("dataset") else "an unrecorded dataset")
    result = ", ".join(f"{k.removeprefix('test_')} {v:.2f}%" for k, v in scores.items() if k != "test_videos")
    test = facts.get("test") or {}
    tested = (f"test {result} over {test.get('videos')} videos ({test.get('protocol')}, {test_views(test)} per "
              f"video)" if result else "no test accuracy")
    name = "TimeSformer" if family_of(model_cfg).name == "timesformer" else family_of(model_cfg).name
    return (f"{name} {facts['variant']} ({scheme_of(model_cfg)}, {model_cfg.num_frames}x{model_cfg.img_size}, "
            f"{model_cfg.num_classes} classes) from run {facts['run_name']} on {data}: {tested}. Run directory: "
            f"{facts['run_dir']}. Input: uint8 clips (batch, 3, frames, height, width), normalised by the model.")


def log_and_register(model_path: str | Path, *, tracking_uri: str, run_id: str, name: str,
                     facts: dict[str, Any] | None = None, step: int = 0) -> dict[str, Any]:
    """Log ``model_path`` (a ``model.safetensors`` of ours) to MLflow run ``run_id`` as a pyfunc model from code
    and register it as a new version of ``name``; the version is tagged and described from ``facts``
    (``pipeline.train.model_card.run_facts``). The run's metrics at ``step`` (the final test's) are linked to the
    logged model. Returns ``{"name", "version", "model_uri", "model_id", "seconds"}``; raises what MLflow raises."""
    import mlflow

    from pipeline.models.convert import load_safetensors
    from pipeline.tracking.sink import mlflow_client, quick_failing_http
    from pipeline.train.evaluate import model_classes

    quick_failing_http()
    t0 = time.time()
    model_path = Path(model_path)
    model_cfg = load_safetensors(model_path).cfg  # checks the file before anything is logged
    classes = model_classes(model_path)[0]
    uri = reveal_uri(tracking_uri)
    client = mlflow_client(tracking_uri)
    before = client.get_run(run_id).info.status
    with _tracking(uri):
        mlflow.start_run(run_id=run_id)  # resumes the run (RUNNING) for the model's logging
        try:
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(MODEL_CODE), artifacts={"model": str(model_path)},
                code_paths=[str(PACKAGE_DIR)], signature=signature(model_cfg), input_example=input_example(model_cfg),
                pip_requirements=requirements(), registered_model_name=name, step=step,
                metadata={"classes": classes, "num_frames": model_cfg.num_frames, "img_size": model_cfg.img_size,
                          "mean": list(model_cfg.mean), "std": list(model_cfg.std), "input": "uint8 (B, 3, T, H, W)"})
        finally:  # the status the run had (the training's verdict), whatever the registry did
            mlflow.end_run(before if before in ("FINISHED", "FAILED", "KILLED") else "FINISHED")
    version = str(info.registered_model_version)
    if facts:
        for key, value in version_tags(facts, model_cfg).items():
            client.set_model_version_tag(name, version, key, value[:5000])
        client.update_model_version(name, version, description=describe_version(facts, model_cfg))
        with contextlib.suppress(Exception):  # a first version: say what the registered model collects
            if not client.get_registered_model(name).description:
                client.update_registered_model(name, description=f"TimeSformer models trained by recipe "
                                                                 f"{facts['recipe']}, one version per run.")
    client.set_tag(run_id, "registered_model", f"{name}/{version}")
    return {"name": name, "version": version, "model_uri": f"models:/{name}/{version}", "model_id": info.model_id,
            "seconds": time.time() - t0}


def register_run_model(run_dir: str | Path, cfg: Any, model_path: str | Path, *, index: Any = None,
                       step: int = 0) -> dict[str, Any] | None:
    """``Trainer.finish``'s hook (rank 0, after the test, the export and the MLflow run's end): the run's model
    in the registry under ``registered_name(cfg.recipe)``. None when it is not asked for (``tracking.register:
    false``) or the run has no MLflow run (``mlflow.json``), or when it fails: then with a warning, since the
    trained model is in the run directory either way."""
    from pipeline.tracking.sink import MLFLOW_FILE
    from pipeline.train.model_card import run_facts

    run_dir = Path(run_dir)
    record_path = run_dir / MLFLOW_FILE
    if not cfg.tracking.register or not record_path.exists():
        return None
    name = registered_name(cfg.recipe)
    try:
        record = json.loads(record_path.read_text())
        done = log_and_register(model_path, tracking_uri=record["tracking_uri"], run_id=record["run_id"], name=name,
                                facts=run_facts(run_dir, cfg, index), step=step)
    except Exception as e:  # noqa: BLE001 -- a registry that is missing or down never fails a finished run
        log.warning("model registry: %s was not registered as %r (%s: %s); the model is in %s (tracking.register=false "
                    "skips this)", model_path, name, type(e).__name__, redact_text(" ".join(str(e).split()))[:500],
                    model_path)
        return None
    log.info("model registry: %s version %s (%s), in %.1fs", done["name"], done["version"], done["model_uri"],
             done["seconds"])
    return done
