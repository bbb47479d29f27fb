"""Video models: the registry (pipeline.models.registry: TimeSformer, the reference family, and the 3D CNNs of the
paper's Table 2), each family's architecture and configuration, checkpoint conversion and cost accounting.

Names are loaded on first use (PEP 562), so that ``pipeline.models.config`` (the configuration schema and the
variants, which the run config reads) imports without torch."""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "CheckpointMismatchError": "convert", "inflate_vit": "convert", "load_checkpoint": "convert",
    "load_safetensors": "convert", "save_safetensors": "convert",
    "flops_per_view": "registry", "parameter_count": "registry", "build": "registry", "model_config_of": "registry",
    "ATTENTION_TYPES": "config", "TimeSformerConfig": "config",
    "VARIANTS": "registry", "MODELS": "registry", "FAMILIES": "registry", "variant_config": "registry",
    "register_model": "registry", "family_of": "registry",
    "TimeSformer": "timesformer", "apply_activation_checkpointing": "timesformer", "create_model": "factory",
    "SourceError": "hub", "resolve_source": "hub",
}
__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
