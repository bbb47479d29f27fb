"""The MLflow model registry against a real `mlflow server` (artifacts on SeaweedFS): a trained model logged as
an MLflow model from code (no pickle) and registered under its recipe's name, loaded back by its registry URI to
predict what the safetensors model predicts, tagged with its test metrics, a version per registration; and the
end of a real (tiny) training run doing it."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import dump, load_recipe
from pipeline.data.transforms import normalize_on_device
from pipeline.models import create_model
from pipeline.models.convert import load_safetensors, save_safetensors
from pipeline.tracking.registry import _tracking, input_example, log_and_register, register_run_model
from pipeline.tracking.sink import MLFLOW_FILE, create_run, mlflow_client
from pipeline.train.model_card import run_facts

pytestmark = [pytest.mark.integration]
CLASSES = ["red", "green", "blue", "yellow"]
REPO = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter, in an empty folder, with the checkout off sys.path (PYTHONSAFEPATH, no PYTHONPATH)
# and the editable install's finder removed: `pipeline` must come from the code MLflow logged with the model.
LOAD_ELSEWHERE = """
import importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ + repr(f)]
sys.path[:] = [p for p in sys.path if p and p.rstrip("/") != sys.argv[4]]  # the checkout, not its .venv
assert importlib.util.find_spec("pipeline") is None, "pipeline is importable before the model is loaded"
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[3])
model = mlflow.pyfunc.load_model(sys.argv[5])
np.save(sys.argv[2], model.predict(np.load(sys.argv[1])))
import pipeline
print(pipeline.__file__)
"""


def load_elsewhere(model_uri: str, uri: str, clips: np.ndarray, tmp_path: Path) -> tuple[np.ndarray, str]:
    """``model_uri`` loaded and asked for ``clips``' probabilities in a subprocess that cannot import the
    checkout; the probabilities and where its ``pipeline`` came from."""
    import os
    import subprocess
    import sys

    clean = tmp_path / "elsewhere"
    clean.mkdir()
    np.save(clean / "clips.npy", clips)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONSAFEPATH"] = "1"
    done = subprocess.run([sys.executable, "-c", LOAD_ELSEWHERE, str(clean / "clips.npy"), str(clean / "probs.npy"),
                           uri, str(REPO), model_uri], cwd=clean, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return np.load(clean / "probs.npy"), done.stdout.strip().splitlines()[-1]


def finished_run(tmp_path: Path, uri: str, recipe_overrides: list[str] = ()) -> tuple[Path, object]:
    """A run directory as a finished training run leaves it (config, MLflow run, dataset record, test report,
    GPU-hours, the exported model), and its config."""
    cfg = load_recipe("smoke", ["model.mean=[0.5]", "model.std=[0.5]", *recipe_overrides])
    run = tmp_path / f"smoke-{uuid.uuid4().hex[:8]}"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(dump(cfg))
    create_run(run, uri, "registry-tests", run.name, {"recipe": cfg.recipe})
    (run / "dataset.json").write_text(json.dumps({"dataset": "test-colour", "version": 3, "classes": CLASSES}))
    (run / "eval" / "test.json").write_text(json.dumps({"protocol": "multi_view", "split": "val", "videos": 8,
                                                        "views_per_video": 3, "top1": 62.5, "top5": 100.0}))
    (run / "gpu_hours.json").write_text(json.dumps({"hours": 0.25, "unit": "gpu"}))
    torch.manual_seed(0)
    model = create_model("timesformer_tiny", num_classes=4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    save_safetensors(model, run / "export" / "model.safetensors", classes=CLASSES)
    return run, cfg


def test_a_model_is_logged_registered_loaded_back_and_versioned(mlflow_server, tmp_path):
    import mlflow

    uri = mlflow_server.uri
    run, cfg = finished_run(tmp_path, uri)
    record = json.loads((run / MLFLOW_FILE).read_text())
    client = mlflow_client(uri)
    client.log_batch(record["run_id"], metrics=[mlflow.entities.Metric("test_top1", 62.5, 0, 5)])
    client.set_terminated(record["run_id"], "FINISHED")
    name = f"smoke-{uuid.uuid4().hex[:6]}"
    model_path = run / "export" / "model.safetensors"

    t0 = time.time()
    done = log_and_register(model_path, tracking_uri=uri, run_id=record["run_id"], name=name,
                            facts=run_facts(run, cfg), step=5)
    seconds = time.time() - t0
    print(f"log + register + tags: {seconds:.2f}s")  # shown with -s; the report quotes it
    assert done["version"] == "1" and done["model_uri"] == f"models:/{name}/1"
    assert seconds < 20

    version = client.get_model_version(name, "1")
    assert version.run_id == record["run_id"]
    tags = version.tags
    assert tags["test_top1"] == "62.5" and tags["test_top5"] == "100" and tags["test_videos"] == "8"
    assert tags["dataset"] == "test-colour v3" and tags["dataset_version"] == "3"
    assert tags["run_dir"] == str(run) and tags["recipe"] == "smoke" and tags["gpu_hours"] == "0.25"
    views = f"3 views: {cfg.test.temporal_clips} temporal clip(s) x {cfg.test.spatial_crops} spatial crop(s)"
    if cfg.test.temporal_clips * cfg.test.spatial_crops != 3:  # the report's 3 views are what ran
        views = "3 views"
    assert tags["test_protocol"] == f"multi_view: {views} on val"
    assert "top1 62.50%" in version.description and "test-colour v3" in version.description
    assert client.get_registered_model(name).description.startswith("TimeSformer models trained by recipe smoke")
    # the run keeps its verdict and says where its model went; the test metric is linked to the logged model
    mlflow_run = client.get_run(record["run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.tags["registered_model"] == f"{name}/1"
    assert {m.key: m.value for m in client.get_logged_model(done["model_id"]).metrics}["test_top1"] == 62.5

    # loaded by its registry URI (a fresh download from the server's S3 artifacts): the model's own probabilities
    clips = input_example(load_safetensors(model_path).cfg)
    clips = np.concatenate([clips, 255 - clips])
    with _tracking(uri):
        loaded = mlflow.pyfunc.load_model(f"models:/{name}/1")
    theirs = loaded.predict(clips)
    model = load_safetensors(model_path).eval()
    with torch.no_grad():
        ours = model(normalize_on_device(torch.from_numpy(clips), mean=(0.5,) * 3, std=(0.5,) * 3)).softmax(-1)
    assert theirs.shape == (2, 4) and np.allclose(theirs, ours.numpy(), atol=1e-6)
    assert loaded.metadata.metadata["classes"] == CLASSES
    # and where `pipeline` is not importable: the code logged with the model is what runs
    elsewhere, where = load_elsewhere(f"models:/{name}/1", uri, clips, tmp_path)
    assert np.allclose(elsewhere, ours.numpy(), atol=1e-6)
    assert "/code/pipeline/" in where and not where.startswith(str(REPO)), where
    assert str(loaded.metadata.signature.inputs.inputs[0].type) == "uint8"
    # nothing pickled: the model's files are code, JSON/YAML and the safetensors weights
    with _tracking(uri):
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "dl")))
    kinds = {p.suffix for p in local.rglob("*") if p.is_file()}
    assert not kinds & {".pkl", ".pickle", ".pt", ".pth", ".bin", ".cloudpickle"}, kinds
    assert (local / "artifacts" / "model.safetensors").is_file() and (local / "mlflow_model.py").is_file()

    # a second registration of the same recipe: version 2
    again = log_and_register(model_path, tracking_uri=uri, run_id=record["run_id"], name=name, step=5)
    assert again["version"] == "2"
    assert sorted(v.version for v in client.search_model_versions(f"name='{name}'")) == ["1", "2"]


def test_registration_is_skipped_when_off_and_a_warning_when_the_registry_fails(tmp_path, caplog):
    cfg = load_recipe("smoke", ["tracking.register=false"])
    run = tmp_path / "run"
    run.mkdir()
    (run / MLFLOW_FILE).write_text(json.dumps({"tracking_uri": "http://127.0.0.1:9", "run_id": "0" * 32}))
    save_safetensors(create_model("timesformer_tiny", num_classes=4), run / "model.safetensors")
    assert register_run_model(run, cfg, run / "model.safetensors") is None
    assert not caplog.records  # off: nothing tried
    cfg = load_recipe("smoke")
    t0 = time.time()
    assert register_run_model(run, cfg, run / "model.safetensors") is None  # port 9: nothing listens
    assert time.time() - t0 < 30
    warning = caplog.records[-1]
    assert warning.levelname == "WARNING" and "was not registered as 'smoke'" in warning.getMessage()
    assert "tracking.register=false" in warning.getMessage()
    (run / MLFLOW_FILE).unlink()
    assert register_run_model(run, cfg, run / "model.safetensors") is None  # tracking off: nothing to register in


@pytest.mark.slow
def test_a_training_run_ends_with_its_model_in_the_registry(mlflow_server, tmp_path):
    from pipeline.train.launch import LaunchRequest, launch
    from tests.synthetic_data import write_dataset

    write_dataset(str(tmp_path / "ds"), "colour", per_class={"train": 2, "val": 1})
    info = launch(LaunchRequest(recipe="smoke", nodes=1, local=True, name="registered", runs_dir=str(tmp_path),
                                overrides=[f"data.index={tmp_path / 'ds'}", "train.max_steps=2", "train.val_every=-1",
                                           "train.ckpt_every=2", f"tracking.uri={mlflow_server.uri}",
                                           "tracking.experiment=registry-train"]), out=lambda *a: None)
    result = next(r for r in info["job"].results() if r["rank"] == 0)
    assert result["outcome"] == "done", result
    name, version = result["registered_model"].removeprefix("models:/").split("/")
    client = mlflow_client(mlflow_server.uri)
    registered = client.get_model_version(name, version)
    assert name == "smoke" and registered.run_id == info["mlflow"]["run_id"]
    assert registered.tags["run_dir"] == info["run_dir"] and "test_top1" in registered.tags
    assert registered.tags["dataset"] == "test-colour v1" and len(registered.tags["dataset_digest"]) == 16
    assert client.get_run(info["mlflow"]["run_id"]).info.status == "FINISHED"
