"""TimeSformer at cluster scale: ingestion, distributed training and tracking (see README.md)."""

__version__ = "0.1.0"
