"""Prediction with a trained model (``jobs/predict.py``, docs/predict.md): top-k classes of videos under the
model's test protocol, per-video features, attention figures, in one process or on a Ray cluster.

``model``: loading any MODEL, the test protocol, the per-video scores; ``inputs``: files, folders, list files and
``s3://`` prefixes to input ids; ``outputs``: rows (JSONL, CSV, a table), the features file, resuming; ``run``: one
pass; ``scale``: Ray Data model actors; ``explain``: attention maps and their figures.
"""

from pipeline.predict.inputs import expand_inputs
from pipeline.predict.model import LoadedModel, PredictError, Predictor, Protocol, Result, load_model, paper_protocol
from pipeline.predict.outputs import load_features
from pipeline.predict.run import Summary, run_predictions

__all__ = ["LoadedModel", "PredictError", "Predictor", "Protocol", "Result", "Summary", "expand_inputs",
           "load_features", "load_model", "paper_protocol", "run_predictions"]
