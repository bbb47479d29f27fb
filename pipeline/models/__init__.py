"""TimeSformer models: the architecture, checkpoint conversion and cost accounting."""

from pipeline.models.convert import (
    CheckpointMismatchError,
    inflate_vit,
    load_checkpoint,
    load_safetensors,
    save_safetensors,
)
from pipeline.models.flops import flops_per_view, parameter_count
from pipeline.models.timesformer import (
    ATTENTION_TYPES,
    VARIANTS,
    TimeSformer,
    TimeSformerConfig,
    apply_activation_checkpointing,
    create_model,
    variant_config,
)

__all__ = [
    "ATTENTION_TYPES", "VARIANTS", "TimeSformer", "TimeSformerConfig", "apply_activation_checkpointing",
    "create_model", "variant_config", "CheckpointMismatchError", "inflate_vit", "load_checkpoint",
    "load_safetensors", "save_safetensors", "flops_per_view", "parameter_count",
]
