"""Prediction over a Ray cluster: Ray Data ``map_batches`` with model actors, each holding one copy of the model
(one actor per GPU where the cluster has GPUs, else CPU actors), results back in input order.

The model travels to the actors as safetensors bytes (its config and class-independent weights; no pickled
module), so an actor rebuilds exactly the model this process loaded, wherever it runs. Each actor decodes its
inputs and runs the same ``Predictor`` as the in-process path, so the results are the same (up to floating-point
summation order between thread counts). Local inputs must be readable where the actors run (one machine, or a
shared file system); ``s3://`` inputs are read by each actor from the object store.

Ray Data comes with ``ray``; the pyarrow and pandas it needs are in requirements.lock (mlflow needs them too).
Its ``preserve_order`` keeps rows in input order while they stream back, so the caller writes them
incrementally and a resumed run skips what was written.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from pipeline.predict.model import Predictor, Protocol, Result


def model_payload(model) -> bytes:
    """The model as safetensors bytes with its config in the metadata (what ``load_safetensors`` reads)."""
    from safetensors.torch import save

    from pipeline.models.convert import model_metadata

    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    return save(state, metadata=model_metadata(model))


def model_from_payload(payload: bytes):
    from safetensors.torch import load

    from pipeline.models.convert import config_from_metadata
    from pipeline.models.registry import family_of

    where = "the model sent to the actor"
    cfg = config_from_metadata(_payload_metadata(payload), where)
    family = family_of(cfg)
    return family.load_weights(family.build(cfg), load(payload))


def _payload_metadata(payload: bytes) -> dict[str, str]:
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8:8 + n]).get("__metadata__", {})


class PredictActor:
    """One model copy; called by Ray Data with a batch of inputs (``{"i": ..., "input": ...}``)."""

    def __init__(self, payload: bytes, protocol: dict[str, Any], batch_size: int, use_gpu: bool) -> None:
        import torch

        device = torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        self.predictor = Predictor(model_from_payload(payload), Protocol(**protocol), device=device,
                                   batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.predictor.cfg
        k, d = max(cfg.num_classes, 1), cfg.feature_dim
        results = [self.predictor.predict(str(x)) for x in batch["input"]]
        return {
            "i": np.asarray(batch["i"]),
            "input": np.asarray([r.input for r in results], dtype=object),
            "scores": np.stack([r.scores if r.scores is not None else np.zeros(k, np.float32) for r in results]),
            "feature": np.stack([r.feature if r.feature is not None else np.zeros(d, np.float32) for r in results]),
            "views": np.asarray([r.views for r in results]), "clips": np.asarray([r.clips for r in results]),
            "error": np.asarray([r.error or "" for r in results], dtype=object),
            "seconds": np.asarray([r.seconds for r in results]),
        }


def start_ray(address: str) -> bool:
    """Connect to ``address`` (``local``: a Ray on this machine, listening on 127.0.0.1 only, as ingest starts
    it); returns whether it was started here (and so is shut down by the caller)."""
    import ray

    if ray.is_initialized():
        return False
    if address == "local":
        from pipeline.ingest.run import start_local_ray

        start_local_ray()
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def actor_plan(actors: int | None) -> tuple[int, float, float]:
    """How many actors, and the CPUs and GPUs each asks for: one per GPU on a GPU cluster; else CPU actors of
    up to 4 cores each (``actors`` overrides the count)."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    if gpus:
        return actors or gpus, 1.0, 1.0
    n = actors or max(1, cpus // 4)
    return n, float(max(1, min(4, cpus // n))), 0.0


def ray_results(model, protocol: Protocol, inputs: list[str], *, address: str = "local", actors: int | None = None,
                batch_size: int = 8) -> Iterator[Result]:
    """Results for ``inputs``, in order, computed by model actors on a Ray cluster."""
    import ray

    started = start_ray(address)
    try:
        import ray.data

        n, cpus, gpus = actor_plan(actors)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.enable_progress_bars = False  # the command shows its own
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        ds = ray.data.from_items([{"i": i, "input": x} for i, x in enumerate(inputs)],
                                 override_num_blocks=max(1, min(len(inputs), 4 * n)))
        ds = ds.map_batches(PredictActor, batch_size=1, batch_format="numpy", concurrency=n, num_cpus=cpus,
                            num_gpus=gpus,
                            fn_constructor_kwargs={"payload": model_payload(model), "protocol": asdict(protocol),
                                                   "batch_size": batch_size, "use_gpu": gpus > 0})
        for row in ds.iter_rows():
            error = str(row["error"]) or None
            yield Result(str(row["input"]), None if error else np.asarray(row["scores"], np.float32),
                         None if error else np.asarray(row["feature"], np.float32), int(row["views"]),
                         int(row["clips"]), error, float(row["seconds"]))
    finally:
        if started:
            ray.shutdown()
