"""The 3D ResNet family's configuration (I3D, Slow) and its variants, apart from the model code (no torch import):
the run config and the launcher read these fields without loading torch. The model is ``pipeline.models.resnet3d``.

The definitions follow PySlowFast (``slowfast/models/video_model_builder.py``, ``ResNet`` with ``MODEL.ARCH`` i3d or
slow, ``configs/Kinetics/{I3D,SLOW}_8x8_R50.yaml``): a ResNet-50 whose stem and bottleneck first convolutions get a
temporal kernel, no temporal striding, and (I3D) a temporal max-pool after res2.

Fields shared with ``TimeSformerConfig`` (``num_classes``, ``num_frames``, ``img_size``, ``in_chans``, ``mean``,
``std``, ``multi_label``) have its names, types and meanings: the run config's model section holds the union of the
families' fields. Every other field has a name no other family uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.models.config import DictConfig

# PySlowFast's Kinetics normalisation (DATA.MEAN / DATA.STD), the same as the TimeSformer's
DEFAULT_MEAN = (0.45, 0.45, 0.45)
DEFAULT_STD = (0.225, 0.225, 0.225)

# Per stage (res2..res5), the cycle of temporal kernel sizes of the blocks' first (1x1 spatial) convolution:
# block b of a stage uses cycle[b % len(cycle)] (PySlowFast's _TEMPORAL_KERNEL_BASIS with NUM_BLOCK_TEMP_KERNEL
# equal to the stage depths, as both configs set it).
I3D_TEMPORAL_KERNELS = ((3,), (3, 1), (3, 1), (1, 3))
SLOW_TEMPORAL_KERNELS = ((1,), (1,), (3,), (3,))


def _tuplify(value: Any) -> Any:
    """Lists (from JSON or YAML) to tuples, nested ones too, so that a frozen config holds hashable values."""
    if isinstance(value, (list, tuple)):
        return tuple(_tuplify(v) for v in value)
    return value


MAX_FRAMES = 1024  # frames of a clip (the decoder's own limit is lower)
MAX_SIZE = 4096  # pixels on a side
MAX_WIDTH = 1 << 14  # channels
MAX_STAGE_BLOCKS = 1024


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ResNet3DConfig(DictConfig):
    """Everything that defines a 3D ResNet; the defaults are I3D 8x8 R50 for Kinetics-400 (PySlowFast's)."""

    num_classes: int = 400
    num_frames: int = 8
    img_size: int = 224
    in_chans: int = 3
    # How input pixels are normalised, per channel: (x / 255 - mean) / std (see TimeSformerConfig).
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    # Several labels per video: sigmoid scores and binary cross-entropy (see TimeSformerConfig).
    multi_label: bool = False
    # Residual blocks per stage (res2..res5); ResNet-50: 3, 4, 6, 3.
    stage_blocks: tuple[int, ...] = (3, 4, 6, 3)
    # Output channels of the stem's 7x7 convolution.
    stem_width: int = 64
    # The stem convolution's temporal kernel (I3D 5, Slow 1), zero-padded to keep the frame count.
    stem_temporal_kernel: int = 5
    # Inner (bottleneck) width of res2's blocks, doubled at each later stage; a block's output is
    # ``bottleneck_expansion`` times its inner width (ResNet-50: 64 and 4, so res5 gives 2048 features).
    bottleneck_width: int = 64
    bottleneck_expansion: int = 4
    # Per stage, the cycle of the blocks' first-convolution temporal kernels (odd sizes, zero-padded).
    temporal_kernels: tuple[tuple[int, ...], ...] = I3D_TEMPORAL_KERNELS
    # Temporal max-pool (kernel = stride) after the first stage: I3D 2 (8 frames -> 4), Slow 1 (none).
    temporal_pool: int = 2
    # Dropout before the classifier (PySlowFast's MODEL.DROPOUT_RATE).
    head_dropout: float = 0.5
    bn_eps: float = 1e-5
    # Zero the last BatchNorm's scale in each block, so every block starts as the identity
    # (PySlowFast's RESNET.ZERO_INIT_FINAL_BN, set in the I3D and Slow configs).
    zero_init_residual: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"ResNet3DConfig.{name}={getattr(self, name)!r}: expected {expected}")

        if not _is_int(self.in_chans) or self.in_chans < 1:
            raise bad("in_chans", "a positive integer")
        self._settle_normalisation(bad)

        for name in ("num_frames", "img_size", "stem_width", "bottleneck_width", "bottleneck_expansion",
                     "temporal_pool"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        if not _is_int(self.num_classes) or self.num_classes < 0:
            raise bad("num_classes", "an integer >= 0 (0: no head, features only)")
        if not isinstance(self.multi_label, bool):
            raise bad("multi_label", "true or false")
        if not isinstance(self.zero_init_residual, bool):
            raise bad("zero_init_residual", "true or false")

        object.__setattr__(self, "stage_blocks", _tuplify(self.stage_blocks))
        object.__setattr__(self, "temporal_kernels", _tuplify(self.temporal_kernels))
        blocks, kernels = self.stage_blocks, self.temporal_kernels
        if not isinstance(blocks, tuple) or not blocks or not all(_is_int(n) and n >= 1 for n in blocks):
            raise bad("stage_blocks", "a non-empty list of positive block counts, one per stage (ResNet-50: "
                                      "[3, 4, 6, 3])")
        if (not isinstance(kernels, tuple) or len(kernels) != len(blocks)
                or not all(isinstance(c, tuple) and c for c in kernels)):
            raise bad("temporal_kernels", f"{len(blocks)} non-empty lists (one per stage of stage_blocks) of "
                                          "temporal kernel sizes, e.g. I3D's [[3], [3, 1], [3, 1], [1, 3]]")
        if not all(_is_int(k) and k >= 1 and k % 2 == 1 for c in kernels for k in c):
            raise bad("temporal_kernels", "odd positive kernel sizes (zero padding of k // 2 keeps the frame count)")
        k = self.stem_temporal_kernel
        if not _is_int(k) or k < 1 or k % 2 == 0:
            raise bad("stem_temporal_kernel", "an odd positive kernel size (I3D 5, Slow 1)")
        # bounds far above any published network, so that a config read from a file (a safetensors header is only
        # text) cannot ask for a model whose very description takes hours: ResNet-1001 has 333 blocks per stage
        for name, most in (("num_frames", MAX_FRAMES), ("img_size", MAX_SIZE), ("stem_width", MAX_WIDTH),
                           ("bottleneck_width", MAX_WIDTH), ("bottleneck_expansion", 64),
                           ("temporal_pool", MAX_FRAMES)):
            if getattr(self, name) > most:
                raise bad(name, f"at most {most}")
        if len(blocks) > 8 or any(n > MAX_STAGE_BLOCKS for n in blocks):
            raise bad("stage_blocks", f"at most 8 stages of at most {MAX_STAGE_BLOCKS} blocks")
        if self.stem_temporal_kernel > MAX_FRAMES or any(len(c) > MAX_STAGE_BLOCKS or max(c) > MAX_FRAMES
                                                         for c in kernels):
            raise bad("temporal_kernels", f"kernels of at most {MAX_FRAMES} frames, cycles of at most "
                                          f"{MAX_STAGE_BLOCKS} entries")
        if self.num_frames < self.temporal_pool:
            raise bad("num_frames", f"at least temporal_pool={self.temporal_pool} frames (the pool after the "
                                    "first stage would leave none)")
        if (not isinstance(self.head_dropout, (int, float)) or isinstance(self.head_dropout, bool)
                or not 0.0 <= self.head_dropout < 1.0):
            raise bad("head_dropout", "a probability in [0, 1)")
        if not isinstance(self.bn_eps, (int, float)) or isinstance(self.bn_eps, bool) or not 0.0 < self.bn_eps < 1.0:
            raise bad("bn_eps", "a small positive number (PySlowFast: 1e-5)")

    # -- derived sizes ---------------------------------------------------------------------------------

    @property
    def num_stages(self) -> int:
        return len(self.stage_blocks)

    @property
    def stage_inner_widths(self) -> tuple[int, ...]:
        """The bottleneck width of each stage: ``bottleneck_width`` doubled per stage."""
        return tuple(self.bottleneck_width * 2**s for s in range(self.num_stages))

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """The output channels of each stage (ResNet-50: 256, 512, 1024, 2048)."""
        return tuple(w * self.bottleneck_expansion for w in self.stage_inner_widths)

    @property
    def feature_dim(self) -> int:
        """The width of the pooled features the classifier reads (ResNet-50: 2048)."""
        return self.stage_widths[-1]

    @property
    def num_blocks(self) -> int:
        return sum(self.stage_blocks)

    def block_temporal_kernel(self, stage: int, block: int) -> int:
        """The temporal kernel of block ``block`` of stage ``stage`` (both from 0)."""
        cycle = self.temporal_kernels[stage]
        return cycle[block % len(cycle)]


# ---------------------------------------------------------------------------------------------------
# Variants: field overrides of the registered models (pipeline.models.registry registers them)

RESNET3D_VARIANTS: dict[str, dict[str, Any]] = {
    # I3D 8x8 R50 (PySlowFast configs/Kinetics/I3D_8x8_R50.yaml; the paper's Table 2: 28.0M, 1.11 TFLOPs)
    "i3d_r50": dict(num_classes=400, num_frames=8, img_size=224, stage_blocks=(3, 4, 6, 3), stem_width=64,
                    stem_temporal_kernel=5, bottleneck_width=64, temporal_kernels=I3D_TEMPORAL_KERNELS,
                    temporal_pool=2),
    # Slow 8x8 R50 (configs/Kinetics/SLOW_8x8_R50.yaml; the SlowFast paper: 32.5M, 54.5 GFLOPs per view)
    "slow_r50": dict(num_classes=400, num_frames=8, img_size=224, stage_blocks=(3, 4, 6, 3), stem_width=64,
                     stem_temporal_kernel=1, bottleneck_width=64, temporal_kernels=SLOW_TEMPORAL_KERNELS,
                     temporal_pool=1),
    # CPU sibling for tests and demos: I3D's anatomy, one block per stage, narrow, 4 frames of 32x32
    "i3d_tiny": dict(num_classes=10, num_frames=4, img_size=32, stage_blocks=(1, 1, 1, 1), stem_width=8,
                     stem_temporal_kernel=5, bottleneck_width=4, temporal_kernels=I3D_TEMPORAL_KERNELS,
                     temporal_pool=2, head_dropout=0.0),
}


def resnet3d_variant_config(name: str, **overrides: Any) -> ResNet3DConfig:
    """The config of a variant of ``RESNET3D_VARIANTS`` with field overrides."""
    if name not in RESNET3D_VARIANTS:
        raise ValueError(f"unknown 3D ResNet variant {name!r}; known: {', '.join(RESNET3D_VARIANTS)}")
    return ResNet3DConfig.from_dict({**RESNET3D_VARIANTS[name], **overrides}, where=f"variant {name}")
