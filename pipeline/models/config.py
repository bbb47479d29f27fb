"""The TimeSformer's configuration, apart from the model code (no torch import): the run config (pipeline.config)
builds its ``model`` section from these fields (and the other families'), and the ingest and launch commands read
them without loading torch. The registered models (TimeSformer's variants among them) are in
``pipeline.models.registry``. ``pipeline.models.timesformer`` re-exports every name here."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

# The original TimeSformer's input normalisation (its issue #10), per channel
DEFAULT_MEAN = (0.45, 0.45, 0.45)
DEFAULT_STD = (0.225, 0.225, 0.225)

ATTENTION_TYPES = (
    "space_only",
    "joint_space_time",
    "divided_space_time",
    "sparse_local_global",
    "axial",
)
POS_EMBED_TYPES = ("none", "space", "space_time")
# The extra (non-ViT) attention steps of each scheme, in the order they run, before the ViT step.
EXTRA_STEPS = {
    "space_only": (),
    "joint_space_time": (),
    "divided_space_time": ("temporal",),
    "sparse_local_global": ("local",),
    "axial": ("temporal", "width"),
}


class DictConfig:
    """What every family's frozen config dataclass shares: to and from a plain dict (JSON in a safetensors file's
    metadata, YAML in a run's config), an unknown field named with the known ones."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> Any:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown model field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    def _settle_normalisation(self, bad: Callable[[str, str], ValueError]) -> None:
        """``mean``/``std`` (lists from JSON or YAML, one value for every channel) as the per-channel tuples a
        frozen config holds, finite, ``std`` positive; ``bad(field, expected)`` makes the family's error."""
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and value and len(set(value)) == 1:
                value = (value[0],) * self.in_chans  # one value for every channel (the original's), any count
            if not isinstance(value, (list, tuple)) or len(value) != self.in_chans or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
                raise bad(name, f"{self.in_chans} finite numbers, one per input channel")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if not all(v > 0.0 for v in self.std):
            raise bad("std", "positive numbers")


@dataclass(frozen=True)
class TimeSformerConfig(DictConfig):
    """Everything that defines a TimeSformer; the defaults are TimeSformer 8x224 for Kinetics-400."""

    num_classes: int = 400
    num_frames: int = 8
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attention_type: str = "divided_space_time"
    pos_embed: str = "space_time"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    norm_eps: float = 1e-6
    # Interpolation used when an input's patch grid or frame count differs from the embeddings'.
    pos_embed_resize: str = "bicubic"
    time_embed_resize: str = "nearest"
    # The original starts the time embedding at zero: frames are interchangeable at step 0, which is right
    # when an image model is the starting point. A random start breaks that symmetry for a model trained
    # from scratch on a small dataset (the end-to-end demo uses std 0.5); 0 keeps the original.
    time_embed_init_std: float = 0.0
    # How input pixels are normalised, per channel: (x / 255 - mean) / std. They belong to the weights: the
    # original's 0.45 / 0.225; an image model's own when it is the starting point (timm's ImageNet-21k ViT-B/16:
    # 0.5 / 0.5). Training, evaluation, export and prediction read them from here.
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    # Several labels per video (Charades-like datasets): independent sigmoid scores trained with binary
    # cross-entropy and scored by mAP; False: one label per video, softmax, cross-entropy and top-1.
    multi_label: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"TimeSformerConfig.{name}={getattr(self, name)!r}: expected {expected}")

        self._settle_normalisation(bad)

        if self.attention_type not in ATTENTION_TYPES:
            raise bad("attention_type", f"one of {', '.join(ATTENTION_TYPES)}")
        if self.pos_embed not in POS_EMBED_TYPES:
            raise bad("pos_embed", f"one of {', '.join(POS_EMBED_TYPES)}")
        for name in ("num_frames", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise bad("num_classes", "an integer >= 0 (0: no head, features only)")
        if self.img_size % self.patch_size:
            raise bad("img_size", f"a multiple of patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise bad("embed_dim", f"a multiple of num_heads={self.num_heads}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise bad(name, "a probability in [0, 1)")
        if not isinstance(self.multi_label, bool):
            raise bad("multi_label", "true or false")
        if self.mlp_ratio <= 0:
            raise bad("mlp_ratio", "a positive number")
        if not 0.0 <= self.time_embed_init_std <= 1.0:
            raise bad("time_embed_init_std", "a standard deviation in [0, 1] (0: zeros, the original)")
        if self.pos_embed_resize not in ("nearest", "bilinear", "bicubic"):
            raise bad("pos_embed_resize", "nearest, bilinear or bicubic")
        if self.time_embed_resize not in ("nearest", "linear"):
            raise bad("time_embed_resize", "nearest or linear")
        if self.attention_type == "sparse_local_global":
            check_local_global_shape(self.num_frames, self.grid_size, where="TimeSformerConfig")

    @property
    def grid_size(self) -> tuple[int, int]:
        n = self.img_size // self.patch_size
        return (n, n)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def feature_dim(self) -> int:
        """The width of ``forward_features`` (every family's config names it so)."""
        return self.embed_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def has_time_embed(self) -> bool:
        # space_only never mixes frames, so the original has no time embedding there.
        return self.pos_embed == "space_time" and self.attention_type != "space_only"


def check_local_global_shape(num_frames: int, grid: tuple[int, int], where: str) -> None:
    gh, gw = grid
    if num_frames % 2 or gh % 2 or gw % 2:
        raise ValueError(
            f"{where}: sparse_local_global attention needs an even number of frames and an even patch "
            f"grid (2x2 local windows, stride-2 global lattice); got {num_frames} frames and a {gh}x{gw} grid"
        )


def normalization_of(model: Any) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a model's inputs are normalised with: its config's, found through the wrappers training
    puts around it (DistributedDataParallel, DeepSpeed, autocast: each keeps the model as ``.module``). Every
    registered family's config carries them (pipeline.models.registry); a model without such a config (a Hugging
    Face one in a benchmark) gets the original's."""
    for _ in range(4):
        cfg = getattr(model, "cfg", None)
        if isinstance(getattr(cfg, "mean", None), tuple) and isinstance(getattr(cfg, "std", None), tuple):
            return cfg.mean, cfg.std
        model = getattr(model, "module", None)
        if model is None:
            break
    return DEFAULT_MEAN, DEFAULT_STD

