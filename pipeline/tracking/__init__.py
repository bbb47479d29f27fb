"""Experiment tracking: the MLflow sink of a run, run comparison, the model registry."""
