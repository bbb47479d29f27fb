"""Clip transforms: ``(T, H, W, 3)`` uint8 frames to ``(C, T, H, W)`` clips.

Training: random short side in a range, random crop, optional horizontal flip (off for SSv2), optional
RandAugment (``data.randaugment_n``: the same ops on every frame, on the uint8 crop), then normalisation with
the model's constants (by default 0.45 / 0.225, the original's). Testing: short side to the crop size, then 1 or
3 crops along the long side. Only the cropped region is resized, in uint8; clips come out normalised float32, or
uint8 for normalisation on the GPU (``normalize_on_device``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.config import DEFAULT_MEAN, DEFAULT_STD

# The original's normalisation, the default of a model's own (TimeSformerConfig.mean/std): a model carries its
# constants, and the clip configuration and the engines read them from it.
MEAN, STD = DEFAULT_MEAN, DEFAULT_STD


Frames = np.ndarray | Sequence[np.ndarray]  # (T, H, W, 3) uint8, or T arrays (H, W, 3)


def _frame_size(frames: Frames) -> tuple[int, int]:
    first = frames[0]
    return first.shape[0], first.shape[1]


def _frames_u8(frames: Frames, rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
    """uint8 frames (or a window of them) -> (T, 3, h, w) channels-last, copying only the window."""
    if isinstance(frames, np.ndarray):
        arr = np.ascontiguousarray(frames[:, rows, cols])
    else:
        arr = np.stack([f[rows, cols] for f in frames])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def _region_resize(frames: Frames, scale: float, y0: int, x0: int, crop: int, flip: bool = False) -> torch.Tensor:
    """The ``crop`` x ``crop`` window at (y0, x0) of the frames resized by ``scale``, computed by resizing
    only the source region under that window (bilinear, as the original's resize-then-crop)."""
    h, w = _frame_size(frames)
    size = crop / scale
    ys, xs = y0 / scale, x0 / scale
    iy0, ix0 = max(0, int(math.floor(ys))), max(0, int(math.floor(xs)))
    iy1, ix1 = min(h, int(math.ceil(ys + size))), min(w, int(math.ceil(xs + size)))
    cols = slice(ix1 - 1, ix0 - 1 if ix0 > 0 else None, -1) if flip else slice(ix0, ix1)  # mirrored copy
    region = _frames_u8(frames, slice(iy0, iy1), cols)
    if region.shape[-2:] == (crop, crop):
        return region
    return F.interpolate(region, size=(crop, crop), mode="bilinear", align_corners=False, antialias=False)


def finish_clip(x_TCHW: torch.Tensor, mean=MEAN, std=STD, output: str = "float") -> torch.Tensor:
    """(T, C, H, W) uint8 -> (C, T, H, W): normalised float32, or uint8 to normalise on the device
    (``normalize_on_device``), which is cheaper on the loader's cores and on the host-to-GPU link."""
    x = x_TCHW.permute(1, 0, 2, 3)
    if output == "uint8":
        return x  # a view: batching (torch.stack) makes the one copy
    if output != "float":
        raise ValueError(f"output={output!r}: expected float or uint8")
    m = torch.tensor(mean).view(-1, 1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1, 1)
    out = x.to(torch.float32, memory_format=torch.contiguous_format)
    return out.mul_(1.0 / (255.0 * s)).sub_(m / s)


def normalize_on_device(video_BCTHW: torch.Tensor, device: torch.device | str | None = None, mean=MEAN,
                        std=STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A uint8 batch from a ``output="uint8"`` loader, moved and normalised: ``(x/255 - mean) / std``."""
    x = video_BCTHW.to(device, non_blocking=True) if device is not None else video_BCTHW
    if x.dtype != torch.uint8:
        return x.to(dtype)
    # in float32 whatever ``dtype``: bf16 arithmetic on 0..255 would round the normalised values twice
    m, s = _device_stats(x.device, tuple(mean), tuple(std))
    return ((x.to(torch.float32) / 255.0 - m) / s).to(dtype)


@functools.lru_cache(maxsize=16)
def _device_stats(device: torch.device, mean: tuple[float, ...],
                  std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, C, 1, 1, 1) tensors on ``device``, made once: building them from Python lists
    on every batch is a blocking host-to-device copy, which stalls the host until the GPU queue drains."""
    m = torch.tensor(mean, device=device, dtype=torch.float32).view(1, -1, 1, 1, 1)
    s = torch.tensor(std, device=device, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return m, s


@dataclass(frozen=True)
class TrainTransform:
    """Random short side in ``scale`` (inclusive), random ``crop`` x ``crop``, horizontal flip with
    probability 0.5 when ``flip`` (off for SSv2: its labels say left and right), ``randaugment`` (n ops at
    magnitude m of 10 on the uint8 crop, the same on every frame: ``pipeline.train.augment.rand_augment``; n = 0:
    off, and no random number drawn for it), normalisation.
    Only the cropped region is resized, in uint8: the same result as resizing whole frames, far cheaper."""

    crop: int = 224
    scale: tuple[int, int] = (256, 320)
    flip: bool = True
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD
    output: str = "float"
    randaugment: tuple[int, int] = (0, 0)  # (n ops, magnitude of 10)

    def __call__(self, frames: Frames, rng: np.random.Generator) -> torch.Tensor:
        h, w = _frame_size(frames)
        short = max(int(rng.integers(self.scale[0], self.scale[1] + 1)), self.crop)
        f = short / min(h, w)
        rh, rw = max(self.crop, round(h * f)), max(self.crop, round(w * f))
        y0, x0 = int(rng.integers(0, rh - self.crop + 1)), int(rng.integers(0, rw - self.crop + 1))
        flip = self.flip and rng.random() < 0.5
        if flip:  # mirror the window position too: a flip of the whole resized frame, then the crop
            x0 = rw - self.crop - x0
        clip = _region_resize(frames, f, y0, x0, self.crop, flip)
        if self.randaugment[0] > 0:
            from pipeline.train.augment import rand_augment

            clip = rand_augment(clip.contiguous(), self.randaugment[0], self.randaugment[1], rng)
        return finish_clip(clip, self.mean, self.std, self.output)


@dataclass(frozen=True)
class TestTransform:
    """Short side to ``crop``, then ``num_crops`` (1: centre; 3: the two ends and the centre of the
    long side, as the original) crops; returns ``(num_crops, C, T, crop, crop)``."""

    __test__ = False  # not a pytest test class, despite its name

    crop: int = 224
    num_crops: int = 3
    mean: tuple[float, ...] = MEAN
    std: tuple[float, ...] = STD
    output: str = "float"

    def __call__(self, frames: Frames) -> torch.Tensor:
        if self.num_crops not in (1, 3):
            raise ValueError(f"num_crops={self.num_crops}: expected 1 or 3")
        h, w = _frame_size(frames)
        f = self.crop / min(h, w)
        rh, rw = max(self.crop, round(h * f)), max(self.crop, round(w * f))
        long = max(rh, rw)
        offsets = [(long - self.crop) // 2] if self.num_crops == 1 else [0, (long - self.crop) // 2, long - self.crop]
        crops = []
        for o in offsets:
            y0, x0 = ((rh - self.crop) // 2, o) if rw >= rh else (o, (rw - self.crop) // 2)
            crops.append(finish_clip(_region_resize(frames, f, y0, x0, self.crop), self.mean, self.std, self.output))
        return torch.stack(crops)


