"""Training-time augmentation beyond the paper's crop and flip (docs/training.md, "Fine-tuning options"):

* ``RandAugment``: ``n`` ops drawn per clip from ``RAND_AUGMENT_OPS``, each at magnitude ``m`` of 10, applied
  to the whole clip at once on the loader's CPU worker while the clip is still uint8 (before normalisation):
  every frame gets the same ops, the same magnitudes and the same pixel mapping, so a clip never flickers. Ops
  that depend on the image's statistics (autocontrast, equalize, contrast) take them over the whole clip.
* ``BatchMixer``: mixup and cutmix of the clips of a micro batch with each other, on the device. One lambda per
  micro batch; cutmix cuts the same box out of every frame of a clip. The targets become soft: one-hot (or
  multi-hot) vectors, label-smoothed, mixed with the same lambda (for cutmix: the box's exact share of the area).

Both draw their random numbers on the host, so nothing here waits for the device. Only torch and numpy are
used (no torchvision: its wheels do not load next to the CPU torch of these machines; no timm).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

# -- RandAugment ----------------------------------------------------------------------------------------------

FILL = 128  # what geometric ops move into the frame (mid grey)


def _blend(a: torch.Tensor, b: torch.Tensor | float, factor: float) -> torch.Tensor:
    """``b + factor * (a - b)`` in float, rounded and clamped back to uint8 (PIL's ImageEnhance)."""
    base = b.float() if isinstance(b, torch.Tensor) else float(b)
    out = (a.float() - base).mul_(factor).add_(base)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma of (T, 3, H, W) uint8, as float (T, 1, H, W)."""
    r, g, b = x[:, 0:1].float(), x[:, 1:2].float(), x[:, 2:3].float()
    return 0.299 * r + 0.587 * g + 0.114 * b


def _affine(x: torch.Tensor, matrix: list[list[float]]) -> torch.Tensor:
    """Every frame resampled through one 2x3 affine ``matrix`` in normalised coordinates (output -> input), the
    area outside the frame filled with ``FILL``; bilinear, rounded back to uint8."""
    t = x.shape[0]
    theta = torch.tensor(matrix, dtype=torch.float32).unsqueeze(0).expand(t, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float() - FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.add_(FILL).round_().clamp_(0, 255).to(torch.uint8)


def _aspect(x: torch.Tensor) -> float:
    return x.shape[-1] / x.shape[-2]  # W / H: normalised coordinates stretch a non-square frame


def rotate(x: torch.Tensor, level: float) -> torch.Tensor:
    """Rotate by up to 30 degrees (``level`` in [-1, 1]) about the centre."""
    a = math.radians(30.0 * level)
    r = _aspect(x)
    return _affine(x, [[math.cos(a), -math.sin(a) / r, 0.0], [math.sin(a) * r, math.cos(a), 0.0]])


def shear_x(x: torch.Tensor, level: float) -> torch.Tensor:
    """Shear along the width by up to 0.3."""
    return _affine(x, [[1.0, 0.3 * level / _aspect(x), 0.0], [0.0, 1.0, 0.0]])


def shear_y(x: torch.Tensor, level: float) -> torch.Tensor:
    return _affine(x, [[1.0, 0.0, 0.0], [0.3 * level * _aspect(x), 1.0, 0.0]])


def translate_x(x: torch.Tensor, level: float) -> torch.Tensor:
    """Shift by up to 45% of the width (exact whole pixels: no resampling)."""
    return _shift(x, 0, round(0.45 * level * x.shape[-1]))


def translate_y(x: torch.Tensor, level: float) -> torch.Tensor:
    return _shift(x, round(0.45 * level * x.shape[-2]), 0)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    out = torch.full_like(x, FILL)
    h, w = x.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def brightness(x: torch.Tensor, level: float) -> torch.Tensor:
    """Scale brightness by 1 +- 0.9 (PIL's ImageEnhance.Brightness: a blend with black)."""
    return _blend(x, 0.0, 1.0 + 0.9 * level)


def color(x: torch.Tensor, level: float) -> torch.Tensor:
    """Saturation 1 +- 0.9: a blend with the frame's grey."""
    return _blend(x, _gray(x).expand_as(x), 1.0 + 0.9 * level)


def contrast(x: torch.Tensor, level: float) -> torch.Tensor:
    """Contrast 1 +- 0.9: a blend with the clip's mean grey (one mean for the whole clip)."""
    return _blend(x, float(_gray(x).mean()), 1.0 + 0.9 * level)


def sharpness(x: torch.Tensor, level: float) -> torch.Tensor:
    """Sharpness 1 +- 0.9: a blend with the frame smoothed by PIL's 3x3 SMOOTH kernel (borders kept)."""
    smooth = x.float()
    box = F.avg_pool2d(smooth, 3, stride=1).mul_(9.0)  # the 3x3 sum (cheaper than a grouped convolution)
    inner = box.add_(smooth[..., 1:-1, 1:-1], alpha=4.0).div_(13.0).round_()
    smooth = smooth.clone()
    smooth[..., 1:-1, 1:-1] = inner
    return _blend(x, smooth, 1.0 + 0.9 * level)


def posterize(x: torch.Tensor, level: float) -> torch.Tensor:
    """Keep 8 - 4|level| bits of each channel (at magnitude 10: 4 bits)."""
    bits = 8 - round(4 * abs(level))
    mask = (0xFF << (8 - bits)) & 0xFF
    return x & mask


def solarize(x: torch.Tensor, level: float) -> torch.Tensor:
    """Invert the pixels at or above 256 (1 - |level|) (at magnitude 10: every pixel)."""
    threshold = round(256 * (1.0 - abs(level)))
    return torch.where(x >= threshold, 255 - x, x)


def autocontrast(x: torch.Tensor, level: float) -> torch.Tensor:
    """Stretch each channel to 0..255 between its lowest and highest value over the whole clip."""
    lo = x.amin(dim=(0, 2, 3), keepdim=True).float()
    hi = x.amax(dim=(0, 2, 3), keepdim=True).float()
    scale = torch.where(hi > lo, 255.0 / (hi - lo).clamp(min=1), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((x.float() - lo) * scale).round_().clamp_(0, 255).to(torch.uint8)


def equalize(x: torch.Tensor, level: float) -> torch.Tensor:
    """Histogram equalisation of each channel, with one lookup table per channel from the whole clip's histogram
    (PIL's ImageOps.equalize rule)."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        channel = x[:, c]
        hist = torch.bincount(channel.reshape(-1).long(), minlength=256)
        nonzero = hist[hist > 0]
        step = (int(hist.sum()) - int(nonzero[-1])) // 255 if len(nonzero) else 0
        if step == 0:
            out[:, c] = channel
            continue
        lut = ((torch.cumsum(hist, 0) - hist + step // 2) // step).clamp_(0, 255).to(torch.uint8)
        out[:, c] = lut[channel.long()]
    return out


# name -> op(clip (T, 3, H, W) uint8, level in [-1, 1]) -> clip; ops with a direction take a random sign
RAND_AUGMENT_OPS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "autocontrast": autocontrast, "equalize": equalize, "rotate": rotate, "posterize": posterize,
    "solarize": solarize, "color": color, "contrast": contrast, "brightness": brightness, "sharpness": sharpness,
    "shear_x": shear_x, "shear_y": shear_y, "translate_x": translate_x, "translate_y": translate_y,
}
SIGNED = {"rotate", "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x",
          "translate_y"}


def rand_augment(clip: torch.Tensor, n: int, m: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` ops drawn (with replacement) from ``RAND_AUGMENT_OPS``, each at magnitude ``m`` of 10 with a random
    direction where it has one, applied to the whole clip ``(T, 3, H, W)`` uint8: the same on every frame."""
    if clip.dtype != torch.uint8 or clip.dim() != 4 or clip.shape[1] != 3:
        raise ValueError(f"RandAugment takes a (T, 3, H, W) uint8 clip, got {tuple(clip.shape)} {clip.dtype}")
    names = list(RAND_AUGMENT_OPS)
    for _ in range(n):
        name = names[int(rng.integers(len(names)))]
        level = m / 10.0
        if name in SIGNED and rng.random() < 0.5:
            level = -level
        clip = RAND_AUGMENT_OPS[name](clip, level)
    return clip


# -- mixup / cutmix -------------------------------------------------------------------------------------------


def soft_targets(label: torch.Tensor, num_classes: int, multi_label: bool, smoothing: float = 0.0) -> torch.Tensor:
    """Float targets ``(B, classes)``: one-hot of class indices (or the multi-hot labels as they are), smoothed:
    single-label ``(1 - e) one-hot + e / classes`` (cross-entropy's label smoothing), multi-label each class's
    0/1 toward 0.5: ``(1 - e) y + e / 2`` (binary cross-entropy's two outcomes, smoothed alike)."""
    if multi_label:
        target = label.float()
        return target * (1.0 - smoothing) + smoothing / 2.0 if smoothing else target
    target = F.one_hot(label.long(), num_classes).float()
    return target * (1.0 - smoothing) + smoothing / num_classes if smoothing else target


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A box (y0, y1, x0, x1) covering about ``1 - lam`` of the frame, centred anywhere, clipped to the frame."""
    ratio = math.sqrt(1.0 - lam)
    bh, bw = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh // 2, height)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw // 2, width)
    return y0, y1, x0, x1


class BatchMixer:
    """Mixup / cutmix of a micro batch (``train.mixup_alpha``, ``cutmix_alpha``, ``mix_prob``,
    ``mix_switch_prob``): clip ``i`` is mixed with clip ``B - 1 - i`` (the batch reversed), with one lambda for
    the batch. Cutmix pastes the same box into every frame, and its lambda is the box's exact share of the
    frame. ``last``: what the latest call did (for tests and logs)."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0, switch_prob: float = 0.5,
                 smoothing: float = 0.0) -> None:
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.smoothing = prob, switch_prob, smoothing
        self.last: dict[str, object] = {}

    def _draw(self, rng: np.random.Generator) -> tuple[str, float]:
        if rng.random() >= self.prob:
            return "none", 1.0
        cut = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if cut else self.mixup_alpha
        return ("cutmix" if cut else "mixup"), float(rng.beta(alpha, alpha))

    def __call__(self, video: torch.Tensor, label: torch.Tensor, num_classes: int, multi_label: bool,
                 rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``video`` (B, C, T, H, W) float on its device, ``label`` class indices (B,) or multi-hot (B, classes):
        the mixed clips and the soft targets (B, classes) float32, which sum to 1 per clip (single-label)."""
        if rng is None:  # seeded from torch's generator, which the loop seeds per micro batch: resumes redraw alike
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (), dtype=torch.int64)))
        target = soft_targets(label, num_classes, multi_label, self.smoothing)
        kind, lam = self._draw(rng)
        box = None
        if kind == "cutmix":
            box = cutmix_box(video.shape[-2], video.shape[-1], lam, rng)
            y0, y1, x0, x1 = box
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (video.shape[-2] * video.shape[-1])
            if lam < 1.0:
                video = video.clone()
                video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]  # the same box on every frame
        elif kind == "mixup":
            video = video * lam + video.flip(0) * (1.0 - lam)
        if lam < 1.0:
            target = target * lam + target.flip(0) * (1.0 - lam)
        self.last = {"kind": kind, "lam": lam, "box": box}
        return video, target
