"""The MLflow model of a trained TimeSformer, as MLflow's "models from code": this file is logged with the model
(``mlflow.pyfunc.log_model(python_model=<this file>, artifacts={"model": model.safetensors})``, see
``pipeline.tracking.registry``) and run by ``mlflow.pyfunc.load_model``, which then predicts with it.

Nothing pickled is involved: the weights are read from ``model.safetensors`` by ``load_safetensors`` (tensors
only, the config from the file's metadata, checked against the tensors), and the code is this file and the
``pipeline`` package logged beside it (``code_paths``). ``mlflow.pytorch.log_model`` would pickle the module,
which loading would unpickle: code from a file, which this project never runs.

Input: clips ``(batch, 3, frames, height, width)`` (one clip without the batch axis is taken too). uint8 clips
are pixel values 0..255 and are normalised with the model's own constants (its config's mean/std, the ones it
was trained with); float clips are taken as already normalised (the logged signature asks for uint8, so through
``mlflow.pyfunc`` clips are pixels; the float path is for the Python model used directly). Output: class
probabilities ``(batch, classes)`` in the order of the model's class names (the MLflow model's metadata
``classes``): softmax, or for a multi-label model each class's sigmoid.
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class TimeSformerModel(PythonModel):
    """Class probabilities of a TimeSformer read from ``model.safetensors`` (the ``model`` artifact)."""

    def load_context(self, context):
        from pipeline.models.convert import load_safetensors

        self.model = load_safetensors(context.artifacts["model"]).eval()

    # np.ndarray is the type hint MLflow takes as "no schema from hints" (others it would read as a list of
    # instances and convert the clips accordingly); the signature logged with the model says what it takes
    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        from pipeline.data.transforms import normalize_on_device

        if isinstance(model_input, dict):  # a named tensor (serving JSON {"inputs": {"clips": ...}})
            if len(model_input) != 1:
                raise ValueError(f"expected one array of clips, got inputs named {sorted(model_input)}")
            model_input = next(iter(model_input.values()))
        clips = np.asarray(model_input)
        if clips.ndim == 4:
            clips = clips[None]
        if clips.ndim != 5 or clips.shape[1] != 3:
            raise ValueError(f"expected clips of shape (batch, 3, frames, height, width) (RGB, channels first), "
                             f"got an array of shape {clips.shape}; transpose channels-last frames "
                             f"(batch, frames, height, width, 3) with .transpose(0, 4, 1, 2, 3)")
        cfg = self.model.cfg
        with torch.no_grad():
            video = normalize_on_device(torch.from_numpy(np.ascontiguousarray(clips)), mean=cfg.mean, std=cfg.std)
            logits = self.model(video).float()
        # a multi-label model scores each class on its own (sigmoid); otherwise one distribution over the classes
        return (logits.sigmoid() if getattr(cfg, "multi_label", False) else logits.softmax(-1)).numpy()


mlflow.models.set_model(TimeSformerModel())
